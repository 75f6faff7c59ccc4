/* The bindings of tracking.c: pagemap_scan() and the WpContext type. Every call that walks page
 * tables, waits or copies releases the GIL. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <string.h>

#include "abi.h"
#include "py_errors.h"
#include "py_tracking.h"
#include "tracking.h"

/* The runs as [(offset, length)] relative to lo, clipped to [lo, hi): what the tracker returns. */
static PyObject *runs_list(struct runs *r, uint64_t lo, uint64_t hi)
{
    PyObject *list = PyList_New(0);
    for (size_t k = 0; list && k < r->n; k++) {
        uint64_t a = r->v[2 * k] > lo ? r->v[2 * k] : lo;
        uint64_t b = r->v[2 * k + 1] < hi ? r->v[2 * k + 1] : hi;
        if (a >= b)
            continue;
        PyObject *t =
            Py_BuildValue("KK", (unsigned long long)(a - lo), (unsigned long long)(b - a));
        if (!t || PyList_Append(list, t) < 0)
            Py_CLEAR(list);
        Py_XDECREF(t);
    }
    runs_free(r);
    return list;
}

/* pagemap_scan(pagemap_fd, start, end, rearm, lo, hi) -> [(offset, length)] written, relative to
 * lo and clipped to [lo, hi) */
static PyObject *py_pagemap_scan(PyObject *self, PyObject *args)
{
    int fd, rearm, rc;
    unsigned long long start, end, lo, hi;
    if (!PyArg_ParseTuple(args, "iKKpKK", &fd, &start, &end, &rearm, &lo, &hi))
        return NULL;
    struct runs r = {0};
    Py_BEGIN_ALLOW_THREADS
    rc = wpt_scan(fd, start, end, rearm, &r);
    Py_END_ALLOW_THREADS
    if (rc < 0) {
        runs_free(&r);
        return os_error(-rc, "PAGEMAP_SCAN");
    }
    return runs_list(&r, lo, hi);
}

typedef struct {
    PyObject_HEAD
    struct wpc *c;
} WpObject;

static int wp_check(WpObject *o)
{
    if (!o->c) {
        PyErr_SetString(PyExc_ValueError, "the write-protect context is closed");
        return -1;
    }
    return 0;
}

static int wp_init(WpObject *o, PyObject *args, PyObject *kw)
{
    int uffd, own;
    unsigned long long start, length, page;
    if (!PyArg_ParseTuple(args, "iKKKp", &uffd, &start, &length, &page, &own))
        return -1;
    if (o->c) {
        PyErr_SetString(PyExc_ValueError, "already initialised");
        return -1;
    }
    o->c = wpc_new(uffd, start, length, page, own);
    if (!o->c) {
        os_error(errno, "wpc_new");
        return -1;
    }
    int rc = wpc_start(o->c);
    if (rc < 0) {
        wpc_free(o->c);
        o->c = NULL;
        os_error(-rc, "pthread_create");
        return -1;
    }
    return 0;
}

static void wp_close_ctx(WpObject *o)
{
    struct wpc *c = o->c;
    o->c = NULL;
    if (c) {
        Py_BEGIN_ALLOW_THREADS
        wpc_free(c);
        Py_END_ALLOW_THREADS
    }
}

static void wp_dealloc(WpObject *o)
{
    wp_close_ctx(o);
    Py_TYPE(o)->tp_free((PyObject *)o);
}

static PyObject *wp_close(WpObject *o, PyObject *unused)
{
    wp_close_ctx(o);
    Py_RETURN_NONE;
}

static PyObject *wp_arm(WpObject *o, PyObject *args)
{
    int keep, rc;
    if (wp_check(o) < 0 || !PyArg_ParseTuple(args, "p", &keep))
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    rc = wpc_arm(o->c, keep);
    Py_END_ALLOW_THREADS
    if (rc < 0)
        return os_error(-rc, "UFFDIO_WRITEPROTECT");
    Py_RETURN_NONE;
}

static PyObject *wp_set_keep(WpObject *o, PyObject *args)
{
    int keep;
    if (wp_check(o) < 0 || !PyArg_ParseTuple(args, "p", &keep))
        return NULL;
    wpc_set_keep(o->c, keep);
    Py_RETURN_NONE;
}

static PyObject *wp_written(WpObject *o, PyObject *args)
{
    int reset, rc;
    unsigned long long lo, hi;
    if (wp_check(o) < 0 || !PyArg_ParseTuple(args, "pKK", &reset, &lo, &hi))
        return NULL;
    struct runs r = {0};
    Py_BEGIN_ALLOW_THREADS
    rc = wpc_written(o->c, reset, &r);
    Py_END_ALLOW_THREADS
    if (rc < 0) {
        runs_free(&r);
        return os_error(-rc, rc == -ENOMEM ? "written" : "UFFDIO_WRITEPROTECT");
    }
    return runs_list(&r, lo, hi);
}

/* snapshot_begin(fd, file_base, lo, hi, diff) -> (bytes of native uint32 page indices (diff),
 * nanoseconds writers could be held) */
static PyObject *wp_snapshot_begin(WpObject *o, PyObject *args)
{
    int fd, diff, rc;
    long long base;
    unsigned long long lo, hi;
    if (wp_check(o) < 0 || !PyArg_ParseTuple(args, "iLKKp", &fd, &base, &lo, &hi, &diff))
        return NULL;
    uint32_t *pages;
    size_t n;
    uint64_t stall;
    Py_BEGIN_ALLOW_THREADS
    rc = wpc_snapshot_begin(o->c, fd, base, lo, hi, diff, &pages, &n, &stall);
    Py_END_ALLOW_THREADS
    if (rc < 0)
        return os_error(-rc, "snapshot");
    /* a raw image lists no pages (n counts them all then) */
    PyObject *r =
        Py_BuildValue("y#K", pages ? (const char *)pages : "",
                      (Py_ssize_t)(pages ? n * sizeof(uint32_t) : 0), (unsigned long long)stall);
    free(pages);
    return r;
}

/* snapshot_wait(timeout_ms) -> None (still copying) or (errno, copied, copied_by_faults) */
static PyObject *wp_snapshot_wait(WpObject *o, PyObject *args)
{
    int timeout, done;
    if (wp_check(o) < 0 || !PyArg_ParseTuple(args, "i", &timeout))
        return NULL;
    for (;;) { /* in slices, so that Ctrl-C gets through */
        int slice = timeout < 0 || timeout > 200 ? 200 : timeout;
        Py_BEGIN_ALLOW_THREADS
        done = wpc_snapshot_wait(o->c, slice);
        Py_END_ALLOW_THREADS
        if (done || timeout == slice)
            break;
        if (timeout > 0)
            timeout -= slice;
        if (PyErr_CheckSignals() < 0)
            return NULL;
    }
    if (!done)
        Py_RETURN_NONE;
    int err;
    uint64_t copied, by_faults;
    wpc_snapshot_result(o->c, &err, &copied, &by_faults);
    return Py_BuildValue("iKK", err, (unsigned long long)copied, (unsigned long long)by_faults);
}

static PyObject *wp_capsule(WpObject *o, PyObject *unused)
{
    if (wp_check(o) < 0)
        return NULL;
    return PyCapsule_New(o->c, "wpc", NULL);
}

static PyMethodDef wp_methods[] = {
    {"close", (PyCFunction)wp_close, METH_NOARGS, "stop the threads, free the context"},
    {"arm", (PyCFunction)wp_arm, METH_VARARGS, "arm(keep): protect every page"},
    {"set_keep", (PyCFunction)wp_set_keep, METH_VARARGS, "set_keep(keep)"},
    {"written", (PyCFunction)wp_written, METH_VARARGS,
     "written(reset, lo, hi) -> [(offset, length)]"},
    {"snapshot_begin", (PyCFunction)wp_snapshot_begin, METH_VARARGS, NULL},
    {"snapshot_wait", (PyCFunction)wp_snapshot_wait, METH_VARARGS, NULL},
    {"capsule", (PyCFunction)wp_capsule, METH_NOARGS, "the context for Engine.set_wp"},
    {NULL}};

static PyTypeObject WpType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "userfaultfd._core.WpContext",
    .tp_basicsize = sizeof(WpObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "WpContext(uffd, start, length, page, own_thread): synchronous write protection.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)wp_init,
    .tp_dealloc = (destructor)wp_dealloc,
    .tp_methods = wp_methods,
};

static PyMethodDef tracking_functions[] = {
    {"pagemap_scan", py_pagemap_scan, METH_VARARGS,
     "pagemap_scan(fd, start, end, rearm, lo, hi) -> [(offset, length)] written"},
    {NULL}};

int tracking_init(PyObject *m)
{
    if (PyType_Ready(&WpType) < 0 || PyModule_AddFunctions(m, tracking_functions) < 0)
        return -1;
    Py_INCREF(&WpType);
    if (PyModule_AddObject(m, "WpContext", (PyObject *)&WpType) < 0)
        return -1;
    /* The numbers this file uses, for tests/test_abi.py. */
    PyObject *abi = PyObject_GetAttrString(m, "ABI");
    static const struct {
        const char *name;
        unsigned long long value;
    } nums[] = {
        {"PAGEMAP_SCAN", PAGEMAP_SCAN},
        {"sizeof_pm_scan_arg", sizeof(struct pm_scan_arg)},
        {"sizeof_page_region", sizeof(struct page_region)},
        {"PM_SCAN_WP_MATCHING", PM_SCAN_WP_MATCHING},
        {"PM_SCAN_CHECK_WPASYNC", PM_SCAN_CHECK_WPASYNC},
        {"PAGE_IS_WRITTEN", PAGE_IS_WRITTEN},
        {"UFFDIO_COPY_MODE_WP", UFFDIO_COPY_MODE_WP},
        {"UFFD_FEATURE_WP_ASYNC", UFFD_FEATURE_WP_ASYNC},
        {"UFFD_FEATURE_WP_UNPOPULATED", UFFD_FEATURE_WP_UNPOPULATED},
    };
    for (size_t k = 0; abi && k < sizeof(nums) / sizeof(nums[0]); k++) {
        PyObject *v = PyLong_FromUnsignedLongLong(nums[k].value);
        if (!v || PyDict_SetItemString(abi, nums[k].name, v) < 0) {
            Py_XDECREF(v);
            Py_DECREF(abi);
            return -1;
        }
        Py_DECREF(v);
    }
    Py_XDECREF(abi);
    return abi ? 0 : -1;
}
