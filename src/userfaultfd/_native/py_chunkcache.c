/* _core.ChunkCache: the chunk cache (chunkcache.h) for the serving process's fetcher threads.
 * Every call that may wait (the cache's lock, a fill's copy and wake-ups, an eviction waiting
 * for copies to finish) releases the GIL. */
#define PY_SSIZE_T_CLEAN
#include "py_chunkcache.h"

#include <errno.h>

#include "chunkcache.h"
#include "py_errors.h"

typedef struct {
    PyObject_HEAD
    struct chunk_cache *c;
} CacheObject;

static int cache_check(CacheObject *o, unsigned long long chunk)
{
    if (!o->c) {
        PyErr_SetString(PyExc_ValueError, "the chunk cache is closed");
        return -1;
    }
    if (chunk >= cache_chunks(o->c)) {
        PyErr_Format(PyExc_ValueError, "chunk %llu is not below the cache's %llu chunks", chunk,
                     (unsigned long long)cache_chunks(o->c));
        return -1;
    }
    return 0;
}

static int cacheobj_init(CacheObject *o, PyObject *args, PyObject *kw)
{
    unsigned long long size, chunk_size;
    if (!PyArg_ParseTuple(args, "KK", &size, &chunk_size))
        return -1;
    if (o->c) {
        PyErr_SetString(PyExc_ValueError, "the chunk cache is already initialised");
        return -1;
    }
    o->c = cache_new(size, chunk_size);
    if (!o->c) {
        os_error(errno, "cache_new");
        return -1;
    }
    return 0;
}

static void cache_close(CacheObject *o)
{
    if (o->c) {
        cache_free(o->c);
        o->c = NULL;
    }
}

static void cacheobj_dealloc(CacheObject *o)
{
    cache_close(o);
    Py_TYPE(o)->tp_free((PyObject *)o);
}

static PyObject *cacheobj_close(CacheObject *o, PyObject *unused)
{
    cache_close(o);
    Py_RETURN_NONE;
}

static PyObject *cacheobj_take(CacheObject *o, PyObject *args)
{
    int max, n;
    if (!PyArg_ParseTuple(args, "i", &max) || cache_check(o, 0) < 0)
        return NULL;
    if (max < 1 || max > 4096)
        return PyErr_Format(PyExc_ValueError, "take: max %d is not in 1..4096", max);
    uint64_t chunks[4096];
    uint8_t urgent[4096];
    Py_BEGIN_ALLOW_THREADS
    n = cache_take(o->c, chunks, urgent, max);
    Py_END_ALLOW_THREADS
    PyObject *out = PyList_New(n);
    for (int k = 0; out && k < n; k++) {
        PyObject *t =
            Py_BuildValue("(KO)", (unsigned long long)chunks[k], urgent[k] ? Py_True : Py_False);
        if (!t) {
            Py_CLEAR(out);
            break;
        }
        PyList_SET_ITEM(out, k, t);
    }
    return out;
}

static PyObject *cacheobj_fill(CacheObject *o, PyObject *args)
{
    unsigned long long chunk;
    Py_buffer view;
    int rc;
    if (!PyArg_ParseTuple(args, "Ky*", &chunk, &view))
        return NULL;
    if (cache_check(o, chunk) < 0) {
        PyBuffer_Release(&view);
        return NULL;
    }
    struct chunk_cache *c = o->c;
    const void *data = view.buf;
    uint64_t len = (uint64_t)view.len;
    Py_BEGIN_ALLOW_THREADS
    rc = cache_fill(c, chunk, data, len);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&view);
    if (rc == -EEXIST)
        Py_RETURN_FALSE; /* present already */
    if (rc < 0)
        return os_error(-rc, "cache_fill");
    Py_RETURN_TRUE;
}

static PyObject *cacheobj_settle(CacheObject *o, PyObject *args)
{
    unsigned long long chunk;
    int state, rc;
    if (!PyArg_ParseTuple(args, "Ki", &chunk, &state) || cache_check(o, chunk) < 0)
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    rc = cache_settle(o->c, chunk, state);
    Py_END_ALLOW_THREADS
    if (rc == -EEXIST)
        Py_RETURN_FALSE;
    if (rc < 0)
        return os_error(-rc, "cache_settle");
    Py_RETURN_TRUE;
}

static PyObject *cacheobj_evict(CacheObject *o, PyObject *args)
{
    unsigned long long chunk;
    int rc;
    if (!PyArg_ParseTuple(args, "K", &chunk) || cache_check(o, chunk) < 0)
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    rc = cache_evict(o->c, chunk);
    Py_END_ALLOW_THREADS
    return PyBool_FromLong(rc == 0);
}

static PyObject *cacheobj_request(CacheObject *o, PyObject *args)
{
    unsigned long long chunk;
    int rc;
    if (!PyArg_ParseTuple(args, "K", &chunk) || cache_check(o, chunk) < 0)
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    rc = cache_request(o->c, chunk);
    Py_END_ALLOW_THREADS
    return PyBool_FromLong(rc);
}

static PyObject *cacheobj_state(CacheObject *o, PyObject *args)
{
    unsigned long long chunk;
    if (!PyArg_ParseTuple(args, "K", &chunk) || cache_check(o, chunk) < 0)
        return NULL;
    return PyLong_FromLong(cache_state(o->c, chunk));
}

static PyObject *cacheobj_info(CacheObject *o, PyObject *unused)
{
    if (cache_check(o, 0) < 0)
        return NULL;
    /* (handle for Engine.add_region, eventfd, chunk size, chunks) */
    return Py_BuildValue("(KiKK)", (unsigned long long)(uintptr_t)o->c, cache_eventfd(o->c),
                         (unsigned long long)cache_chunk_size(o->c),
                         (unsigned long long)cache_chunks(o->c));
}

static PyMethodDef cache_methods[] = {
    {"info", (PyCFunction)cacheobj_info, METH_NOARGS, "(handle, eventfd, chunk_size, chunks)"},
    {"take", (PyCFunction)cacheobj_take, METH_VARARGS, "take(max) -> [(chunk, urgent)]"},
    {"fill", (PyCFunction)cacheobj_fill, METH_VARARGS, "fill(chunk, data) -> filled"},
    {"settle", (PyCFunction)cacheobj_settle, METH_VARARGS, "settle(chunk, ZERO|POISONED)"},
    {"evict", (PyCFunction)cacheobj_evict, METH_VARARGS, "evict(chunk) -> evicted"},
    {"request", (PyCFunction)cacheobj_request, METH_VARARGS, "request(chunk) -> queued"},
    {"state", (PyCFunction)cacheobj_state, METH_VARARGS, "state(chunk) -> CHUNK_*"},
    {"close", (PyCFunction)cacheobj_close, METH_NOARGS, "free it (no engine may use it)"},
    {NULL}};

static PyTypeObject CacheType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "userfaultfd._core.ChunkCache",
    .tp_basicsize = sizeof(CacheObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)cacheobj_init,
    .tp_dealloc = (destructor)cacheobj_dealloc,
    .tp_methods = cache_methods,
};

int chunkcache_add_type(PyObject *m)
{
    if (PyType_Ready(&CacheType) < 0)
        return -1;
    Py_INCREF(&CacheType);
    if (PyModule_AddObject(m, "ChunkCache", (PyObject *)&CacheType) < 0)
        return -1;
    static const struct {
        const char *name;
        int value;
    } names[] = {
        {"CHUNK_ABSENT", CHUNK_ABSENT},     {"CHUNK_REQUESTED", CHUNK_REQUESTED},
        {"CHUNK_FETCHING", CHUNK_FETCHING}, {"CHUNK_PRESENT", CHUNK_PRESENT},
        {"CHUNK_ZERO", CHUNK_ZERO},         {"CHUNK_POISONED", CHUNK_POISONED},
        {"CHUNK_EVICTING", CHUNK_EVICTING},
    };
    for (size_t k = 0; k < sizeof(names) / sizeof(names[0]); k++)
        if (PyModule_AddIntConstant(m, names[k].name, names[k].value) < 0)
            return -1;
    return 0;
}
