/* Mapping: memory we map, with the buffer protocol and an export count. */
#define PY_SSIZE_T_CLEAN
#define _GNU_SOURCE
#include <Python.h>

#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "py_errors.h"
#include "py_mapping.h"

typedef struct {
    PyObject_HEAD
    char *addr;
    size_t length;
    Py_ssize_t exports;
} MappingObject;

static int mapping_check(MappingObject *m)
{
    if (!m->addr) {
        PyErr_SetString(PyExc_ValueError, "the mapping is closed");
        return -1;
    }
    return 0;
}

/* mmap(length, prot, flags, fd, offset) at an address aligned to `align` (a power of two): the
 * unit a region installs per fault must start on a multiple of itself. */
static void *map_aligned(size_t length, int prot, int flags, int fd, off_t offset, size_t align)
{
    if (align <= (size_t)sysconf(_SC_PAGE_SIZE))
        return mmap(NULL, length, prot, flags, fd, offset);
    char *area =
        mmap(NULL, length + align, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (area == MAP_FAILED)
        return MAP_FAILED;
    char *start = (char *)(((uintptr_t)area + align - 1) & ~(uintptr_t)(align - 1));
    void *p = mmap(start, length, prot, flags | MAP_FIXED, fd, offset);
    if (p == MAP_FAILED) {
        int err = errno;
        munmap(area, length + align);
        errno = err;
        return MAP_FAILED;
    }
    if (start > area)
        munmap(area, (size_t)(start - area));
    if (start + length < area + length + align)
        munmap(start + length, (size_t)(area + length + align - (start + length)));
    return p;
}

static int mapping_init(MappingObject *m, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"length", "flags", "fd", "offset", "prot", "align", NULL};
    unsigned long long length, offset = 0, align = 0;
    int flags, fd = -1, prot = PROT_READ | PROT_WRITE;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "Ki|iKiK", kwlist, &length, &flags, &fd, &offset,
                                     &prot, &align))
        return -1;
    if (m->addr) {
        PyErr_SetString(PyExc_ValueError, "the mapping is already open");
        return -1;
    }
    if (align & (align - 1)) {
        PyErr_Format(PyExc_ValueError, "align %llu is not a power of two", align);
        return -1;
    }
    void *p = map_aligned(length, prot, flags, fd, (off_t)offset, align);
    if (p == MAP_FAILED) {
        os_error(errno, "mmap");
        return -1;
    }
    m->addr = p;
    m->length = length;
    return 0;
}

static void mapping_dealloc(MappingObject *m)
{
    if (m->addr)
        munmap(m->addr, m->length);
    Py_TYPE(m)->tp_free((PyObject *)m);
}

static int mapping_getbuffer(MappingObject *m, Py_buffer *view, int flags)
{
    if (mapping_check(m) < 0) {
        view->obj = NULL;
        return -1;
    }
    if (PyBuffer_FillInfo(view, (PyObject *)m, m->addr, (Py_ssize_t)m->length, 0, flags) < 0)
        return -1;
    m->exports++;
    return 0;
}

static void mapping_releasebuffer(MappingObject *m, Py_buffer *view) { m->exports--; }

static PyObject *mapping_close(MappingObject *m, PyObject *unused)
{
    if (m->exports) {
        PyErr_Format(PyExc_BufferError,
                     "cannot close: %zd exported buffer(s) (memoryview, numpy array, ...) still "
                     "refer to this memory",
                     m->exports);
        return NULL;
    }
    if (m->addr) {
        int rc;
        Py_BEGIN_ALLOW_THREADS
        rc = munmap(m->addr, m->length);
        Py_END_ALLOW_THREADS
        if (rc != 0)
            return os_error(errno, "munmap");
        m->addr = NULL;
    }
    Py_RETURN_NONE;
}

/* Forget the memory without unmapping it (it was unmapped behind our back), or follow it to the
 * address where it was moved (mremap). */
static PyObject *mapping_rebase(MappingObject *m, PyObject *args)
{
    unsigned long long addr;
    if (!PyArg_ParseTuple(args, "K", &addr))
        return NULL;
    m->addr = (char *)(uintptr_t)addr;
    if (!addr)
        m->length = 0;
    Py_RETURN_NONE;
}

/* Maps [offset, offset + length) of fd read-only, then anonymous zeros up to total bytes: a source
 * that reads zeros past the end of the file. */
static PyObject *mapping_map_file(MappingObject *m, PyObject *args)
{
    int fd;
    unsigned long long offset, length, total;
    if (!PyArg_ParseTuple(args, "iKKK", &fd, &offset, &length, &total))
        return NULL;
    if (m->addr || length > total) {
        PyErr_SetString(PyExc_ValueError, "_map_file: mapping open or length > total");
        return NULL;
    }
    long page = sysconf(_SC_PAGE_SIZE);
    size_t data = (size_t)((length + page - 1) & ~(unsigned long long)(page - 1));
    char *p = mmap(NULL, total ? total : 1, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                   -1, 0);
    if (p == MAP_FAILED)
        return os_error(errno, "mmap");
    if (data && mmap(p, data, PROT_READ, MAP_SHARED | MAP_FIXED, fd, (off_t)offset) == MAP_FAILED) {
        int err = errno;
        munmap(p, total);
        return os_error(err, "mmap of the source file");
    }
    m->addr = p;
    m->length = total;
    Py_RETURN_NONE;
}

static PyObject *mapping_get_address(MappingObject *m, void *c)
{
    return PyLong_FromUnsignedLongLong((unsigned long long)(uintptr_t)m->addr);
}
static PyObject *mapping_get_length(MappingObject *m, void *c)
{
    return PyLong_FromSize_t(m->length);
}
static PyObject *mapping_get_closed(MappingObject *m, void *c) { return PyBool_FromLong(!m->addr); }
static PyObject *mapping_get_exports(MappingObject *m, void *c)
{
    return PyLong_FromSsize_t(m->exports);
}

static Py_ssize_t mapping_len(MappingObject *m) { return (Py_ssize_t)m->length; }

/* m[i] -> int and m[a:b] -> bytes, like mmap: a plain access while holding the GIL. */
static PyObject *mapping_subscript(MappingObject *m, PyObject *key)
{
    if (mapping_check(m) < 0)
        return NULL;
    if (PyIndex_Check(key)) {
        Py_ssize_t i = PyNumber_AsSsize_t(key, PyExc_IndexError);
        if (i == -1 && PyErr_Occurred())
            return NULL;
        if (i < 0)
            i += (Py_ssize_t)m->length;
        if (i < 0 || (size_t)i >= m->length) {
            PyErr_Format(PyExc_IndexError, "index %zd out of range for %zu bytes", i, m->length);
            return NULL;
        }
        return PyLong_FromLong((unsigned char)m->addr[i]);
    }
    if (PySlice_Check(key)) {
        Py_ssize_t start, stop, step, n;
        if (PySlice_Unpack(key, &start, &stop, &step) < 0)
            return NULL;
        n = PySlice_AdjustIndices((Py_ssize_t)m->length, &start, &stop, step);
        if (step == 1)
            return PyBytes_FromStringAndSize(m->addr + start, n);
        PyObject *r = PyBytes_FromStringAndSize(NULL, n);
        if (!r)
            return NULL;
        for (Py_ssize_t k = 0; k < n; k++)
            PyBytes_AS_STRING(r)[k] = m->addr[start + k * step];
        return r;
    }
    PyErr_Format(PyExc_TypeError, "indices must be integers or slices, not %.200s",
                 Py_TYPE(key)->tp_name);
    return NULL;
}

static int mapping_ass_subscript(MappingObject *m, PyObject *key, PyObject *value)
{
    if (mapping_check(m) < 0)
        return -1;
    if (!value) {
        PyErr_SetString(PyExc_TypeError, "cannot delete bytes of a mapping");
        return -1;
    }
    if (PyIndex_Check(key)) {
        Py_ssize_t i = PyNumber_AsSsize_t(key, PyExc_IndexError);
        long v = PyLong_AsLong(value);
        if ((i == -1 || v == -1) && PyErr_Occurred())
            return -1;
        if (i < 0)
            i += (Py_ssize_t)m->length;
        if (i < 0 || (size_t)i >= m->length) {
            PyErr_Format(PyExc_IndexError, "index %zd out of range for %zu bytes", i, m->length);
            return -1;
        }
        if (v < 0 || v > 255) {
            PyErr_Format(PyExc_ValueError, "byte value %ld is not in range(0, 256)", v);
            return -1;
        }
        m->addr[i] = (char)v;
        return 0;
    }
    Py_ssize_t start, stop, step, n;
    if (!PySlice_Check(key) || PySlice_Unpack(key, &start, &stop, &step) < 0) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_TypeError, "indices must be integers or slices");
        return -1;
    }
    n = PySlice_AdjustIndices((Py_ssize_t)m->length, &start, &stop, step);
    Py_buffer v;
    if (PyObject_GetBuffer(value, &v, PyBUF_SIMPLE) < 0)
        return -1;
    int rc = 0;
    if (v.len != n) {
        PyErr_Format(PyExc_ValueError, "cannot assign %zd bytes to a slice of %zd bytes", v.len, n);
        rc = -1;
    } else if (step == 1) {
        memmove(m->addr + start, v.buf, (size_t)n); /* the value may be a view of this memory */
    } else {
        PyObject *copy = PyBytes_FromStringAndSize(v.buf, n); /* likewise */
        for (Py_ssize_t k = 0; copy && k < n; k++)
            m->addr[start + k * step] = PyBytes_AS_STRING(copy)[k];
        rc = copy ? 0 : -1;
        Py_XDECREF(copy);
    }
    PyBuffer_Release(&v);
    return rc;
}

static PyMethodDef mapping_methods[] = {
    {"close", (PyCFunction)mapping_close, METH_NOARGS, "Unmap the memory (once)."},
    {"_rebase", (PyCFunction)mapping_rebase, METH_VARARGS,
     "Follow the memory to a new address (0: forget it)."},
    {"_map_file", (PyCFunction)mapping_map_file, METH_VARARGS, "Map a file, zeros past its end."},
    {NULL}};

static PyGetSetDef mapping_getset[] = {
    {"address", (getter)mapping_get_address, NULL, "start address", NULL},
    {"length", (getter)mapping_get_length, NULL, "length in bytes", NULL},
    {"closed", (getter)mapping_get_closed, NULL, "True once unmapped", NULL},
    {"exports", (getter)mapping_get_exports, NULL, "buffers exported and not released", NULL},
    {NULL}};

static PyMappingMethods mapping_as_mapping = {(lenfunc)mapping_len, (binaryfunc)mapping_subscript,
                                              (objobjargproc)mapping_ass_subscript};
static PyBufferProcs mapping_as_buffer = {(getbufferproc)mapping_getbuffer,
                                          (releasebufferproc)mapping_releasebuffer};

PyTypeObject MappingType = {
    .tp_name = "userfaultfd._core.Mapping",
    .tp_basicsize = sizeof(MappingObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .tp_doc = "Mapping(length, flags, fd=-1, offset=0, prot=PROT_READ|PROT_WRITE, align=0): "
              "mmap'd memory.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)mapping_init,
    .tp_dealloc = (destructor)mapping_dealloc,
    .tp_methods = mapping_methods,
    .tp_getset = mapping_getset,
    .tp_as_mapping = &mapping_as_mapping,
    .tp_as_buffer = &mapping_as_buffer,
    /* Last: the macro brings its own trailing comma, which clang-format cannot see. */
    .ob_base = PyVarObject_HEAD_INIT(NULL, 0)};
