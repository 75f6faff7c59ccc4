/* Engine: the Python type over the native fault-serving engine (engine.c). It parses arguments,
 * checks the owner process and builds result tuples; engine.c never touches a Python object. */
#define PY_SSIZE_T_CLEAN
#define _GNU_SOURCE
#include <Python.h>

#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <unistd.h>

#include "engine.h"
#include "py_engine.h"
#include "py_errors.h"
#include "sigbus.h"
#include "tracking.h"

typedef struct {
    PyObject_HEAD
    struct engine *e;
    int started;
    pid_t owner;
} EngineObject;

static int engine_check(EngineObject *o)
{
    if (!o->e) {
        PyErr_SetString(PyExc_ValueError, "the engine is closed");
        return -1;
    }
    if (getpid() != o->owner) {
        PyErr_Format(PyExc_ValueError,
                     "this engine serves process %d: a forked child cannot use it", (int)o->owner);
        return -1;
    }
    return 0;
}

static int engineobj_init(EngineObject *o, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"uffd",      "mode",    "workers", "remove_policy",
                             "base_page", "spin_ns", NULL};
    int uffd, mode, workers, policy;
    unsigned long long base_page, spin_ns;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "i$iiiKK:Engine", kwlist, &uffd, &mode, &workers,
                                     &policy, &base_page, &spin_ns))
        return -1;
    if (o->e) {
        PyErr_SetString(PyExc_ValueError, "the engine is already initialised");
        return -1;
    }
    o->owner = getpid();
    o->e = engine_new(uffd, mode, workers, policy, base_page, spin_ns);
    if (!o->e) {
        os_error(errno, "engine_new");
        return -1;
    }
    return 0;
}

static void engine_shutdown(EngineObject *o)
{
    if (!o->e)
        return;
    struct engine *e = o->e;
    o->e = NULL;
    Py_BEGIN_ALLOW_THREADS
    if (o->started)
        engine_stop(e);
    engine_free(e);
    Py_END_ALLOW_THREADS
}

static void engineobj_dealloc(EngineObject *o)
{
    engine_shutdown(o);
    Py_TYPE(o)->tp_free((PyObject *)o);
}

static PyObject *engineobj_start(EngineObject *o, PyObject *unused)
{
    if (engine_check(o) < 0)
        return NULL;
    if (o->started)
        Py_RETURN_NONE;
    int rc = engine_start(o->e);
    if (rc < 0)
        return os_error(-rc, "engine_start");
    o->started = 1;
    Py_RETURN_NONE;
}

static PyObject *engineobj_stop(EngineObject *o, PyObject *unused)
{
    if (engine_check(o) < 0)
        return NULL;
    if (o->started) {
        Py_BEGIN_ALLOW_THREADS
        engine_stop(o->e);
        Py_END_ALLOW_THREADS
        o->started = 0;
    }
    Py_RETURN_NONE;
}

static PyObject *engineobj_close(EngineObject *o, PyObject *unused)
{
    engine_shutdown(o);
    Py_RETURN_NONE;
}

/* add_region(*, start, length, page_size, kind, base, base_len, tail, can_zeropage, readahead,
 *            adaptive_min, adaptive_max, label) -> id. The caller keeps base and tail alive;
 * label (what the region serves) goes into the line a poisoned page's toucher leaves. */
static PyObject *engineobj_add_region(EngineObject *o, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {
        "start",        "length",    "page_size",    "kind",         "base",  "base_len", "tail",
        "can_zeropage", "readahead", "adaptive_min", "adaptive_max", "label", NULL};
    struct region_params p;
    unsigned long long base, tail;
    int kind, can_zero;
    p.label = NULL;
    if (engine_check(o) < 0 ||
        !PyArg_ParseTupleAndKeywords(args, kw, "$KKKiKKKiKKKz:add_region", kwlist, &p.start,
                                     &p.length, &p.page_size, &kind, &base, &p.base_len, &tail,
                                     &can_zero, &p.readahead, &p.adaptive_min, &p.adaptive_max,
                                     &p.label))
        return NULL;
    p.kind = kind;
    p.base = (const char *)(uintptr_t)base;
    p.tail = (const char *)(uintptr_t)tail;
    p.can_zeropage = can_zero;
    p.cache = NULL;
    if (kind == SRC_CACHE) { /* base: a ChunkCache's handle; base_len: the snapshot offset */
        p.cache = (struct chunk_cache *)(uintptr_t)base;
        p.cache_off = p.base_len;
        p.base = NULL;
        p.base_len = 0;
    }
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = engine_add_region(o->e, &p);
    Py_END_ALLOW_THREADS
    if (rc < 0)
        return os_error(-rc, "engine_add_region");
    return PyLong_FromLong(rc);
}

static PyObject *engineobj_remove_region(EngineObject *o, PyObject *args)
{
    int id, rc;
    if (engine_check(o) < 0 || !PyArg_ParseTuple(args, "i", &id))
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    rc = engine_remove_region(o->e, id);
    Py_END_ALLOW_THREADS
    if (rc < 0)
        return os_error(-rc, "engine_remove_region");
    Py_RETURN_NONE;
}

static PyObject *engineobj_populate(EngineObject *o, PyObject *args)
{
    int id, rc;
    unsigned long long off, len;
    if (engine_check(o) < 0 || !PyArg_ParseTuple(args, "iKK", &id, &off, &len))
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    rc = engine_populate(o->e, id, off, len);
    Py_END_ALLOW_THREADS
    if (rc < 0)
        return os_error(-rc, "populate");
    Py_RETURN_NONE;
}

/* stats(id) -> (faults_missing, faults_minor, faults_wp, pages, bytes, zero_pages, eexist,
 *               poisoned, errors, removes, prefetched, histogram bytes); id -1: all regions. */
static PyObject *engineobj_stats(EngineObject *o, PyObject *args)
{
    int id;
    struct region_stats s;
    if (engine_check(o) < 0 || !PyArg_ParseTuple(args, "i", &id))
        return NULL;
    if (engine_region_stats(o->e, id, &s) < 0)
        return os_error(ENOENT, "stats");
    return Py_BuildValue("KKKKKKKKKKKy#", s.faults_missing, s.faults_minor, s.faults_wp,
                         s.pages_installed, s.bytes_installed, s.zero_pages, s.eexist, s.poisoned,
                         s.errors, s.removes, s.prefetched, (const char *)s.hist,
                         (Py_ssize_t)sizeof(s.hist));
}

/* pieces(id) -> [(start, end, offset), ...]: where the region's memory is mapped now */
static PyObject *engineobj_pieces(EngineObject *o, PyObject *args)
{
    int id, rc;
    uint64_t *p;
    size_t n;
    if (engine_check(o) < 0 || !PyArg_ParseTuple(args, "i", &id))
        return NULL;
    if ((rc = engine_region_pieces(o->e, id, &p, &n)) < 0)
        return rc == -ENOMEM ? PyErr_NoMemory() : os_error(-rc, "pieces");
    PyObject *list = PyList_New((Py_ssize_t)n);
    for (size_t k = 0; list && k < n; k++) {
        PyObject *t =
            Py_BuildValue("KKK", (unsigned long long)p[3 * k], (unsigned long long)p[3 * k + 1],
                          (unsigned long long)p[3 * k + 2]);
        if (!t)
            Py_CLEAR(list);
        else
            PyList_SET_ITEM(list, (Py_ssize_t)k, t);
    }
    free(p);
    return list;
}

/* errors(cursor) -> (new cursor, [(errno, region_id, address, offset, op), ...]) */
static PyObject *engineobj_errors(EngineObject *o, PyObject *args)
{
    unsigned long long cursor;
    struct engine_error errs[64];
    if (engine_check(o) < 0 || !PyArg_ParseTuple(args, "K", &cursor))
        return NULL;
    uint64_t c = cursor;
    int n = engine_errors(o->e, &c, errs, 64);
    PyObject *list = PyList_New(n);
    if (!list)
        return NULL;
    for (int k = 0; k < n; k++) {
        PyObject *t = Py_BuildValue("iiKKs", errs[k].err, errs[k].region_id,
                                    (unsigned long long)errs[k].address,
                                    (unsigned long long)errs[k].offset, errs[k].op);
        if (!t) {
            Py_DECREF(list);
            return NULL;
        }
        PyList_SET_ITEM(list, k, t);
    }
    return Py_BuildValue("KN", (unsigned long long)c, list);
}

static PyObject *engineobj_info(EngineObject *o, PyObject *unused)
{
    uint64_t ev[5];
    if (engine_check(o) < 0)
        return NULL;
    engine_event_counts(o->e, ev);
    return Py_BuildValue("iKKKKK", engine_client_gone(o->e), ev[0], ev[1], ev[2], ev[3], ev[4]);
}

/* record_start(id): first touches of region id are recorded from now on */
static PyObject *engineobj_record_start(EngineObject *o, PyObject *args)
{
    int id, rc;
    if (engine_check(o) < 0 || !PyArg_ParseTuple(args, "i", &id))
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    rc = engine_record_start(o->e, id);
    Py_END_ALLOW_THREADS
    if (rc < 0)
        return os_error(-rc, "record_start");
    Py_RETURN_NONE;
}

/* record_finish(id) -> bytes: (offset, ns) pairs as native uint64, in first-touch order */
static PyObject *engineobj_record_finish(EngineObject *o, PyObject *args)
{
    int id, rc;
    uint64_t *p;
    size_t n;
    if (engine_check(o) < 0 || !PyArg_ParseTuple(args, "i", &id))
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    rc = engine_record_finish(o->e, id, &p, &n);
    Py_END_ALLOW_THREADS
    if (rc < 0)
        return rc == -ENOMEM ? PyErr_NoMemory() : os_error(-rc, "record_finish");
    PyObject *out = PyBytes_FromStringAndSize((const char *)p, (Py_ssize_t)(n * 2 * sizeof(*p)));
    free(p);
    return out;
}

/* replay(runs, *, threads=1, speculative=False): runs is a buffer of (region id, offset, length)
 * native uint64 triples */
static PyObject *engineobj_replay(EngineObject *o, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"runs", "threads", "speculative", NULL};
    Py_buffer runs;
    int threads = 1, speculative = 0, rc;
    if (engine_check(o) < 0 || !PyArg_ParseTupleAndKeywords(args, kw, "y*|$ip:replay", kwlist,
                                                            &runs, &threads, &speculative))
        return NULL;
    if (runs.len % (Py_ssize_t)(3 * sizeof(uint64_t))) {
        PyErr_Format(PyExc_ValueError, "replay: %zd bytes is not a whole number of runs", runs.len);
        PyBuffer_Release(&runs);
        return NULL;
    }
    size_t n = (size_t)runs.len / (3 * sizeof(uint64_t));
    const uint64_t *buf = runs.buf;
    Py_BEGIN_ALLOW_THREADS
    rc = engine_replay(o->e, buf, n, threads, speculative);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&runs);
    if (rc < 0)
        return rc == -ENOMEM ? PyErr_NoMemory() : os_error(-rc, "replay");
    Py_RETURN_NONE;
}

static PyObject *engineobj_replays_running(EngineObject *o, PyObject *unused)
{
    if (engine_check(o) < 0)
        return NULL;
    return PyLong_FromLong(engine_replays_running(o->e));
}

/* Every method raises ValueError once the engine is closed or in a forked child of its owner. */
/* set_wp(id, capsule or None): the region's WP faults go to a WpContext (tracking.c). The caller
 * keeps the context alive until set_wp(id, None) has returned. */
static PyObject *engineobj_set_wp(EngineObject *o, PyObject *args)
{
    int id, rc;
    PyObject *cap;
    if (engine_check(o) < 0 || !PyArg_ParseTuple(args, "iO", &id, &cap))
        return NULL;
    void *ctx = cap == Py_None ? NULL : PyCapsule_GetPointer(cap, "wpc");
    if (cap != Py_None && !ctx)
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    rc = engine_region_set_wp(o->e, id, ctx ? wpc_fault : NULL, ctx);
    Py_END_ALLOW_THREADS
    if (rc < 0)
        return os_error(-rc, "engine_region_set_wp");
    Py_RETURN_NONE;
}

static PyMethodDef engine_methods[] = {
    {"start", (PyCFunction)engineobj_start, METH_NOARGS,
     "Start the worker threads (thread mode) or the event thread and SIGBUS resolver (sigbus "
     "mode); a second call does nothing. OSError if a thread cannot be created."},
    {"stop", (PyCFunction)engineobj_stop, METH_NOARGS,
     "Stop and join the engine's threads; a populate running elsewhere returns ECANCELED."},
    {"close", (PyCFunction)engineobj_close, METH_NOARGS,
     "Stop the threads and free the engine (once; the uffd is the caller's)."},
    {"add_region", (PyCFunction)(void (*)(void))engineobj_add_region, METH_VARARGS | METH_KEYWORDS,
     "add_region(*, start, length, page_size, kind, base, base_len, tail, can_zeropage, "
     "readahead, adaptive_min, adaptive_max, label) -> id: serve faults in [start, "
     "start+length) from the source (SRC_*); the caller keeps base and tail alive; label names "
     "the source (or None) in the line a poisoned page's toucher leaves. OSError EINVAL (bad "
     "parameters), "
     "EEXIST (overlaps a region), ENOMEM."},
    {"remove_region", (PyCFunction)engineobj_remove_region, METH_VARARGS,
     "remove_region(id): stop serving a region. OSError ENOENT for an unknown id."},
    {"populate", (PyCFunction)engineobj_populate, METH_VARARGS,
     "populate(id, offset, length): install every missing page of that part of the region "
     "(UFFDIO_COPY / ZEROPAGE / CONTINUE) without the GIL. OSError ECANCELED (engine stopped), "
     "ESRCH (the owner's memory is gone)."},
    {"stats", (PyCFunction)engineobj_stats, METH_VARARGS,
     "stats(id) -> (faults_missing, faults_minor, faults_wp, pages, bytes, zero_pages, eexist, "
     "poisoned, errors, removes, prefetched, histogram); id -1: all regions (with the engines "
     "of forked children). OSError ENOENT for an unknown "
     "id."},
    {"pieces", (PyCFunction)engineobj_pieces, METH_VARARGS,
     "pieces(id) -> [(start, end, offset)]: where the region's memory is mapped now. OSError "
     "ENOENT for an unknown id."},
    {"errors", (PyCFunction)engineobj_errors, METH_VARARGS,
     "errors(cursor) -> (new cursor, [(errno, region_id, address, offset, op)]): the source "
     "failures recorded since cursor (pages poisoned)."},
    {"info", (PyCFunction)engineobj_info, METH_NOARGS,
     "info() -> (client_gone, remove, unmap, remap, unknown, fork): whether the owner's memory "
     "went away, and the non-cooperative events handled (a FORK event's uffd is closed)."},
    {"record_start", (PyCFunction)engineobj_record_start, METH_VARARGS,
     "record_start(id): record the first touch of every granule of the region from now on (its "
     "offset and the ns since now). OSError ENOENT (unknown id), EBUSY (recorded before), "
     "ENOMEM."},
    {"record_finish", (PyCFunction)engineobj_record_finish, METH_VARARGS,
     "record_finish(id) -> bytes: end the recording and return its (offset, ns) pairs as native "
     "uint64, in first-touch order; again: the same. OSError ENOENT, EINVAL (never recorded)."},
    {"replay", (PyCFunction)(void (*)(void))engineobj_replay, METH_VARARGS | METH_KEYWORDS,
     "replay(runs, *, threads=1, speculative=False): install (region id, offset, length) native "
     "uint64 triples in this order in `threads` background threads, faults first; present and "
     "removed granules are skipped. speculative: only with CPU time that would otherwise idle. "
     "OSError EINVAL (threads not in 1..16), EAGAIN (16 replays running)."},
    {"replays_running", (PyCFunction)engineobj_replays_running, METH_NOARGS,
     "replays_running() -> how many replays still have threads installing."},
    {"set_wp", (PyCFunction)engineobj_set_wp, METH_VARARGS,
     "set_wp(id, context): the region's pages are installed write-protected and its WP faults go "
     "to the WpContext's capsule (None: back to plain installs). OSError ENOENT for an unknown "
     "id."},
    {NULL}};

PyTypeObject EngineType = {
    .tp_name = "userfaultfd._core.Engine",
    .tp_basicsize = sizeof(EngineObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc =
        "Engine(uffd, *, mode, workers, remove_policy, base_page, spin_ns): native fault serving.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)engineobj_init,
    .tp_dealloc = (destructor)engineobj_dealloc,
    .tp_methods = engine_methods,
    /* Last: the macro brings its own trailing comma, which clang-format cannot see. */
    .ob_base = PyVarObject_HEAD_INIT(NULL, 0)};

PyObject *py_sigbus_first(PyObject *self, PyObject *unused)
{
    return PyBool_FromLong(sigbus_first());
}
