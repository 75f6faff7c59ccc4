/* Memory access and memory system calls without the GIL (tests and benchmarks fault from here). */
#define PY_SSIZE_T_CLEAN
#define _GNU_SOURCE
#include <Python.h>

#include <errno.h>
#include <stdint.h>
#include <sys/mman.h>
#include <time.h>

#include "py_errors.h"
#include "py_memory.h"

PyObject *py_buffer_address(PyObject *self, PyObject *obj)
{
    Py_buffer view;
    if (PyObject_GetBuffer(obj, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    PyObject *r = Py_BuildValue("Kn", (unsigned long long)(uintptr_t)view.buf, view.len);
    PyBuffer_Release(&view);
    return r;
}

/* touch(addr, length, stride, write) -> sum of the bytes read: one access every stride bytes;
 * write increments each byte touched instead. */
PyObject *py_touch(PyObject *self, PyObject *args)
{
    unsigned long long addr, len, stride;
    int write, sum = 0;
    if (!PyArg_ParseTuple(args, "KKKp", &addr, &len, &stride, &write))
        return NULL;
    if (!stride) {
        PyErr_SetString(PyExc_ValueError, "stride must be positive");
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    for (unsigned long long o = 0; o < len; o += stride) {
        volatile unsigned char *p = (volatile unsigned char *)(uintptr_t)(addr + o);
        if (write) /* a locked add faults as a write, and increments */
            __atomic_fetch_add(p, 1, __ATOMIC_RELAXED);
        else
            sum += *p;
    }
    Py_END_ALLOW_THREADS
    return PyLong_FromLong(sum);
}

/* munmap(addr, length) without the GIL: unmapping registered memory waits for its UNMAP event to
 * be read. */
PyObject *py_munmap(PyObject *self, PyObject *args)
{
    unsigned long long addr, len;
    int rc;
    if (!PyArg_ParseTuple(args, "KK", &addr, &len))
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    rc = munmap((void *)(uintptr_t)addr, len);
    Py_END_ALLOW_THREADS
    if (rc != 0)
        return os_error(errno, "munmap");
    Py_RETURN_NONE;
}

/* madvise(addr, length, advice) without the GIL (MADV_DONTNEED on registered memory waits for its
 * REMOVE event to be read). */
PyObject *py_madvise(PyObject *self, PyObject *args)
{
    unsigned long long addr, len;
    int advice, rc;
    if (!PyArg_ParseTuple(args, "KKi", &addr, &len, &advice))
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    rc = madvise((void *)(uintptr_t)addr, len, advice);
    Py_END_ALLOW_THREADS
    if (rc != 0)
        return os_error(errno, "madvise");
    Py_RETURN_NONE;
}

/* touch_pages(addr, page_size, order, write=False, stride=0) -> nanoseconds: reads (or increments
 * with a locked add) the first byte of each page listed in order (native-endian uint32 page
 * indices); with a stride, every stride-th byte of the page (a program using its data). */
PyObject *py_touch_pages(PyObject *self, PyObject *args)
{
    unsigned long long addr, page, stride = 0;
    int write = 0;
    Py_buffer order;
    if (!PyArg_ParseTuple(args, "KKy*|pK", &addr, &page, &order, &write, &stride))
        return NULL;
    if (!stride || stride > page)
        stride = page;
    const uint32_t *idx = order.buf;
    size_t n = (size_t)order.len / sizeof(uint32_t);
    struct timespec a, b;
    Py_BEGIN_ALLOW_THREADS
    clock_gettime(CLOCK_MONOTONIC, &a);
    for (size_t k = 0; k < n; k++)
        for (unsigned long long o = 0; o < page; o += stride) {
            volatile unsigned char *p =
                (volatile unsigned char *)(uintptr_t)(addr + idx[k] * page + o);
            if (write)
                __atomic_fetch_add(p, 1, __ATOMIC_RELAXED);
            else
                (void)*p;
        }
    clock_gettime(CLOCK_MONOTONIC, &b);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&order);
    return PyLong_FromLongLong((long long)(b.tv_sec - a.tv_sec) * 1000000000LL +
                               (b.tv_nsec - a.tv_nsec));
}
