/* userfaultfd._core: the native core. Syscalls and ioctls return plain ints and tuples; every call
 * that can block or copy runs with the GIL released. Names, types and policy live in Python. */
#define PY_SSIZE_T_CLEAN
#define _GNU_SOURCE
#include <Python.h>

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include "abi.h"
#include "engine.h"
#include "seed.h"
#include "watchdog.h"
#include "forkguard.h"

/* OSError (its errno subclass) whose message names the failing call. */
static PyObject *os_error(int err, const char *call)
{
    PyObject *msg = PyUnicode_FromFormat("%s (%s)", strerror(err), call);
    if (msg) {
        PyObject *exc = PyObject_CallFunction(PyExc_OSError, "iO", err, msg);
        Py_DECREF(msg);
        if (exc) {
            PyErr_SetObject((PyObject *)Py_TYPE(exc), exc);
            Py_DECREF(exc);
        }
    }
    return NULL;
}

/* ---- creating and initialising a uffd ---- */

static PyObject *py_create(PyObject *self, PyObject *args)
{
    int flags, fd;
    if (!PyArg_ParseTuple(args, "i", &flags))
        return NULL;
    fd = (int)syscall(UFFD_NR_userfaultfd, flags);
    return fd < 0 ? os_error(errno, "userfaultfd") : PyLong_FromLong(fd);
}

static PyObject *py_create_dev(PyObject *self, PyObject *args)
{
    int flags, dev, fd, err = 0;
    if (!PyArg_ParseTuple(args, "i", &flags))
        return NULL;
    dev = open("/dev/userfaultfd", O_RDWR | O_CLOEXEC);
    if (dev < 0)
        return os_error(errno, "open /dev/userfaultfd");
    fd = ioctl(dev, USERFAULTFD_IOC_NEW, (unsigned long)flags);
    if (fd < 0)
        err = errno;
    close(dev);
    return fd < 0 ? os_error(err, "USERFAULTFD_IOC_NEW") : PyLong_FromLong(fd);
}

static PyObject *py_api(PyObject *self, PyObject *args)
{
    int fd;
    unsigned long long features;
    if (!PyArg_ParseTuple(args, "iK", &fd, &features))
        return NULL;
    struct uffdio_api a = {UFFD_API, features, 0};
    if (ioctl(fd, UFFDIO_API, &a) != 0)
        return os_error(errno, "UFFDIO_API");
    return Py_BuildValue("KKK", (unsigned long long)a.api, (unsigned long long)a.features,
                         (unsigned long long)a.ioctls);
}

/* ---- range ioctls ---- */

static PyObject *py_register(PyObject *self, PyObject *args)
{
    int fd, rc;
    unsigned long long start, len, mode;
    if (!PyArg_ParseTuple(args, "iKKK", &fd, &start, &len, &mode))
        return NULL;
    struct uffdio_register r = {{start, len}, mode, 0};
    Py_BEGIN_ALLOW_THREADS rc = ioctl(fd, UFFDIO_REGISTER, &r);
    Py_END_ALLOW_THREADS
    if (rc != 0)
        return os_error(errno, "UFFDIO_REGISTER");
    return PyLong_FromUnsignedLongLong(r.ioctls);
}

static PyObject *range_call(PyObject *args, unsigned long req, const char *name)
{
    int fd, rc;
    unsigned long long start, len;
    if (!PyArg_ParseTuple(args, "iKK", &fd, &start, &len))
        return NULL;
    struct uffdio_range r = {start, len};
    Py_BEGIN_ALLOW_THREADS rc = ioctl(fd, req, &r);
    Py_END_ALLOW_THREADS
    if (rc != 0)
        return os_error(errno, name);
    Py_RETURN_NONE;
}

static PyObject *py_unregister(PyObject *self, PyObject *args)
{
    return range_call(args, UFFDIO_UNREGISTER, "UFFDIO_UNREGISTER");
}

static PyObject *py_wake(PyObject *self, PyObject *args)
{
    return range_call(args, UFFDIO_WAKE, "UFFDIO_WAKE");
}

static PyObject *py_writeprotect(PyObject *self, PyObject *args)
{
    int fd, rc;
    unsigned long long start, len, mode;
    if (!PyArg_ParseTuple(args, "iKKK", &fd, &start, &len, &mode))
        return NULL;
    struct uffdio_writeprotect w = {{start, len}, mode};
    Py_BEGIN_ALLOW_THREADS rc = ioctl(fd, UFFDIO_WRITEPROTECT, &w);
    Py_END_ALLOW_THREADS
    if (rc != 0)
        return os_error(errno, "UFFDIO_WRITEPROTECT");
    Py_RETURN_NONE;
}

/* COPY and MOVE return (errno, result field): partial progress is the caller's to interpret. */
static PyObject *copy_call(PyObject *args, unsigned long req)
{
    int fd, rc, err = 0;
    unsigned long long dst, src, len, mode;
    if (!PyArg_ParseTuple(args, "iKKKK", &fd, &dst, &src, &len, &mode))
        return NULL;
    struct uffdio_copy c = {dst, src, len, mode, 0};
    Py_BEGIN_ALLOW_THREADS rc = ioctl(fd, req, &c);
    if (rc != 0)
        err = errno;
    Py_END_ALLOW_THREADS
    return Py_BuildValue("iL", err, (long long)c.result);
}

static PyObject *py_copy(PyObject *self, PyObject *args) { return copy_call(args, UFFDIO_COPY); }
static PyObject *py_move(PyObject *self, PyObject *args) { return copy_call(args, UFFDIO_MOVE); }

/* ZEROPAGE, CONTINUE and POISON: (errno, result field). */
static PyObject *rangeop_call(PyObject *args, unsigned long req)
{
    int fd, rc, err = 0;
    unsigned long long start, len, mode;
    if (!PyArg_ParseTuple(args, "iKKK", &fd, &start, &len, &mode))
        return NULL;
    struct uffdio_rangeop o = {{start, len}, mode, 0};
    Py_BEGIN_ALLOW_THREADS rc = ioctl(fd, req, &o);
    if (rc != 0)
        err = errno;
    Py_END_ALLOW_THREADS
    return Py_BuildValue("iL", err, (long long)o.result);
}

static PyObject *py_zeropage(PyObject *self, PyObject *args)
{
    return rangeop_call(args, UFFDIO_ZEROPAGE);
}
static PyObject *py_continue(PyObject *self, PyObject *args)
{
    return rangeop_call(args, UFFDIO_CONTINUE);
}
static PyObject *py_poison(PyObject *self, PyObject *args)
{
    return rangeop_call(args, UFFDIO_POISON);
}

/* ---- reading messages ---- */

static int64_t ms_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* read(fd, max_msgs, timeout_ms) -> bytes: whole 32-byte messages; b"" when none came in time.
 * timeout_ms < 0 waits for ever; 0 does not wait. Signals are checked while waiting. */
static PyObject *py_read(PyObject *self, PyObject *args)
{
    int fd, max, timeout;
    if (!PyArg_ParseTuple(args, "iii", &fd, &max, &timeout))
        return NULL;
    if (max < 1 || max > 4096) {
        PyErr_Format(PyExc_ValueError, "max_events must be in 1..4096, not %d", max);
        return NULL;
    }
    PyObject *buf = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)max * 32);
    if (!buf)
        return NULL;
    int nonblocking = (fcntl(fd, F_GETFL) & O_NONBLOCK) != 0;
    int64_t deadline = timeout < 0 ? -1 : ms_now() + timeout;
    ssize_t n;
    int err;
    for (;;) {
        int left = timeout < 0 ? -1 : (int)(deadline - ms_now() > 0 ? deadline - ms_now() : 0);
        struct iovec iov = {PyBytes_AS_STRING(buf), (size_t)max * 32};
        Py_BEGIN_ALLOW_THREADS
        if (timeout == 0)
            n = preadv2(fd, &iov, 1, -1, RWF_NOWAIT);
        else if (!nonblocking && timeout < 0)
            n = read(fd, iov.iov_base, iov.iov_len);
        else {
            struct pollfd p = {fd, POLLIN, 0};
            n = poll(&p, 1, left > 1000 || left < 0 ? 1000 : left); /* wake up for signals */
            if (n > 0 && (p.revents & POLLERR))
                n = -1, errno = EBADFD;
            else if (n > 0)
                n = read(fd, iov.iov_base, iov.iov_len);
            else if (n == 0)
                n = -1, errno = ETIMEDOUT;
        }
        err = errno;
        Py_END_ALLOW_THREADS
        if (n >= 0)
            break;
        if (err == EINTR || err == ETIMEDOUT) {
            if (PyErr_CheckSignals() < 0) {
                Py_DECREF(buf);
                return NULL;
            }
            if (err == ETIMEDOUT && timeout >= 0 && ms_now() >= deadline) {
                n = 0;
                break;
            }
            continue;
        }
        if (err == EAGAIN) { /* poll(2) promises nothing: a fault can be woken before it is read */
            if (timeout == 0 || (timeout > 0 && ms_now() >= deadline)) {
                n = 0;
                break;
            }
            continue;
        }
        Py_DECREF(buf);
        if (err == EBADFD) {
            PyErr_SetString(PyExc_ValueError,
                            "poll() reports POLLERR: a uffd in blocking mode can only be read "
                            "without a timeout (create it with nonblocking=True)");
            return NULL;
        }
        return os_error(err, "read");
    }
    if (_PyBytes_Resize(&buf, n) < 0)
        return NULL;
    return buf;
}

/* ---- native memory access (tests and benchmarks fault from here, without the GIL) ---- */

static PyObject *py_buffer_address(PyObject *self, PyObject *obj)
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
static PyObject *py_touch(PyObject *self, PyObject *args)
{
    unsigned long long addr, len, stride;
    int write, sum = 0;
    if (!PyArg_ParseTuple(args, "KKKp", &addr, &len, &stride, &write))
        return NULL;
    if (!stride) {
        PyErr_SetString(PyExc_ValueError, "stride must be positive");
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS for (unsigned long long o = 0; o < len; o += stride)
    {
        volatile unsigned char *p = (volatile unsigned char *)(uintptr_t)(addr + o);
        if (write) /* a locked add faults as a write, and increments */
            __atomic_fetch_add(p, 1, __ATOMIC_RELAXED);
        else
            sum += *p;
    }
    Py_END_ALLOW_THREADS return PyLong_FromLong(sum);
}

/* munmap(addr, length) without the GIL: unmapping registered memory waits for its UNMAP event to
 * be read. */
static PyObject *py_munmap(PyObject *self, PyObject *args)
{
    unsigned long long addr, len;
    int rc;
    if (!PyArg_ParseTuple(args, "KK", &addr, &len))
        return NULL;
    Py_BEGIN_ALLOW_THREADS rc = munmap((void *)(uintptr_t)addr, len);
    Py_END_ALLOW_THREADS if (rc != 0) return os_error(errno, "munmap");
    Py_RETURN_NONE;
}

/* madvise(addr, length, advice) without the GIL (MADV_DONTNEED on registered memory waits for its
 * REMOVE event to be read). */
static PyObject *py_madvise(PyObject *self, PyObject *args)
{
    unsigned long long addr, len;
    int advice, rc;
    if (!PyArg_ParseTuple(args, "KKi", &addr, &len, &advice))
        return NULL;
    Py_BEGIN_ALLOW_THREADS rc = madvise((void *)(uintptr_t)addr, len, advice);
    Py_END_ALLOW_THREADS if (rc != 0) return os_error(errno, "madvise");
    Py_RETURN_NONE;
}

static PyObject *py_sigbus_first(PyObject *self, PyObject *unused)
{
    return PyBool_FromLong(engine_sigbus_first());
}

/* touch_pages(addr, page_size, order, write=False) -> nanoseconds: reads (or increments with a
 * locked add) the first byte of each page listed in order (native-endian uint32 page indices). */
static PyObject *py_touch_pages(PyObject *self, PyObject *args)
{
    unsigned long long addr, page;
    int write = 0;
    Py_buffer order;
    if (!PyArg_ParseTuple(args, "KKy*|p", &addr, &page, &order, &write))
        return NULL;
    const uint32_t *idx = order.buf;
    size_t n = (size_t)order.len / sizeof(uint32_t);
    struct timespec a, b;
    Py_BEGIN_ALLOW_THREADS clock_gettime(CLOCK_MONOTONIC, &a);
    for (size_t k = 0; k < n; k++) {
        volatile unsigned char *p = (volatile unsigned char *)(uintptr_t)(addr + idx[k] * page);
        if (write)
            __atomic_fetch_add(p, 1, __ATOMIC_RELAXED);
        else
            (void)*p;
    }
    clock_gettime(CLOCK_MONOTONIC, &b);
    Py_END_ALLOW_THREADS PyBuffer_Release(&order);
    return PyLong_FromLongLong((long long)(b.tv_sec - a.tv_sec) * 1000000000LL +
                               (b.tv_nsec - a.tv_nsec));
}

/* ---- Mapping: memory we map, with the buffer protocol and an export count ---- */

typedef struct {
    PyObject_HEAD char *addr;
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
    char *area = mmap(NULL, length + align, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                      -1, 0);
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
        Py_BEGIN_ALLOW_THREADS rc = munmap(m->addr, m->length);
        Py_END_ALLOW_THREADS if (rc != 0) return os_error(errno, "munmap");
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
        PyErr_SetString(PyExc_ValueError, "map_file: mapping open or length > total");
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
    {"rebase", (PyCFunction)mapping_rebase, METH_VARARGS, "Follow the memory to a new address (0: forget it)."},
    {"map_file", (PyCFunction)mapping_map_file, METH_VARARGS, "Map a file, zeros past its end."},
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

static PyTypeObject MappingType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "userfaultfd._core.Mapping",
    .tp_basicsize = sizeof(MappingObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .tp_doc = "Mapping(length, flags, fd=-1, offset=0, prot=PROT_READ|PROT_WRITE, align=0): mmap'd memory.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)mapping_init,
    .tp_dealloc = (destructor)mapping_dealloc,
    .tp_methods = mapping_methods,
    .tp_getset = mapping_getset,
    .tp_as_mapping = &mapping_as_mapping,
    .tp_as_buffer = &mapping_as_buffer,
};

/* ---- Engine ---- */

typedef struct {
    PyObject_HEAD struct engine *e;
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
    int uffd, mode, workers, policy;
    unsigned long long base_page, spin_ns;
    if (!PyArg_ParseTuple(args, "iiiiKK", &uffd, &mode, &workers, &policy, &base_page, &spin_ns))
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
    Py_BEGIN_ALLOW_THREADS if (o->started) engine_stop(e);
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
        Py_BEGIN_ALLOW_THREADS engine_stop(o->e);
        Py_END_ALLOW_THREADS o->started = 0;
    }
    Py_RETURN_NONE;
}

static PyObject *engineobj_close(EngineObject *o, PyObject *unused)
{
    engine_shutdown(o);
    Py_RETURN_NONE;
}

/* add_region(start, length, page_size, kind, base_addr, base_len, tail_addr, can_zeropage,
 *            readahead, adaptive_min, adaptive_max) -> id. The caller keeps base and tail alive. */
static PyObject *engineobj_add_region(EngineObject *o, PyObject *args)
{
    struct region_params p;
    unsigned long long base, tail;
    int kind, can_zero;
    if (engine_check(o) < 0 ||
        !PyArg_ParseTuple(args, "KKKiKKKiKKK", &p.start, &p.length, &p.page_size, &kind, &base,
                          &p.base_len, &tail, &can_zero, &p.readahead, &p.adaptive_min,
                          &p.adaptive_max))
        return NULL;
    p.kind = kind;
    p.base = (const char *)(uintptr_t)base;
    p.tail = (const char *)(uintptr_t)tail;
    p.can_zeropage = can_zero;
    int rc;
    Py_BEGIN_ALLOW_THREADS rc = engine_add_region(o->e, &p);
    Py_END_ALLOW_THREADS if (rc < 0) return os_error(-rc, "engine_add_region");
    return PyLong_FromLong(rc);
}

static PyObject *engineobj_remove_region(EngineObject *o, PyObject *args)
{
    int id, rc;
    if (engine_check(o) < 0 || !PyArg_ParseTuple(args, "i", &id))
        return NULL;
    Py_BEGIN_ALLOW_THREADS rc = engine_remove_region(o->e, id);
    Py_END_ALLOW_THREADS if (rc < 0) return os_error(-rc, "engine_remove_region");
    Py_RETURN_NONE;
}

static PyObject *engineobj_populate(EngineObject *o, PyObject *args)
{
    int id, rc;
    unsigned long long off, len;
    if (engine_check(o) < 0 || !PyArg_ParseTuple(args, "iKK", &id, &off, &len))
        return NULL;
    Py_BEGIN_ALLOW_THREADS rc = engine_populate(o->e, id, off, len);
    Py_END_ALLOW_THREADS if (rc < 0) return os_error(-rc, "populate");
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
        PyObject *t = Py_BuildValue("KKK", (unsigned long long)p[3 * k],
                                    (unsigned long long)p[3 * k + 1],
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
    uint64_t ev[4];
    if (engine_check(o) < 0)
        return NULL;
    engine_event_counts(o->e, ev);
    return Py_BuildValue("iKKKK", engine_client_gone(o->e), ev[0], ev[1], ev[2], ev[3]);
}

static PyMethodDef engine_methods[] = {
    {"start", (PyCFunction)engineobj_start, METH_NOARGS, NULL},
    {"stop", (PyCFunction)engineobj_stop, METH_NOARGS, "stop the threads; populate calls return"},
    {"close", (PyCFunction)engineobj_close, METH_NOARGS, NULL},
    {"add_region", (PyCFunction)engineobj_add_region, METH_VARARGS, NULL},
    {"remove_region", (PyCFunction)engineobj_remove_region, METH_VARARGS, NULL},
    {"populate", (PyCFunction)engineobj_populate, METH_VARARGS, NULL},
    {"stats", (PyCFunction)engineobj_stats, METH_VARARGS, NULL},
    {"pieces", (PyCFunction)engineobj_pieces, METH_VARARGS, "[(start, end, offset)] mapped now"},
    {"errors", (PyCFunction)engineobj_errors, METH_VARARGS, NULL},
    {"info", (PyCFunction)engineobj_info, METH_NOARGS, "(client_gone, remove, unmap, remap, unknown)"},
    {NULL}};

static PyTypeObject EngineType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "userfaultfd._core.Engine",
    .tp_basicsize = sizeof(EngineObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Engine(uffd, mode, workers, remove_policy, base_page, spin_ns): native fault serving.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)engineobj_init,
    .tp_dealloc = (destructor)engineobj_dealloc,
    .tp_methods = engine_methods,
};

/* ---- the seed's handler thread ---- */

static void seed_capsule_free(PyObject *cap)
{
    struct seed_handler *h = PyCapsule_GetPointer(cap, "seed_handler");
    int faults;
    if (h)
        seed_stop(h, &faults);
}

static PyObject *py_seed_start(PyObject *self, PyObject *args)
{
    int uffd, out;
    if (!PyArg_ParseTuple(args, "ii", &uffd, &out))
        return NULL;
    struct seed_handler *h = seed_start(uffd, out);
    if (!h)
        return os_error(errno, "pthread_create");
    return PyCapsule_New(h, "seed_handler", seed_capsule_free);
}

/* seed_stop(handle) -> (errno that ended the thread early or 0, faults handled) */
static PyObject *py_seed_stop(PyObject *self, PyObject *cap)
{
    struct seed_handler *h = PyCapsule_GetPointer(cap, "seed_handler");
    int faults = 0, err = 0;
    if (!h)
        return NULL;
    if (PyCapsule_SetPointer(cap, (void *)1) < 0 || PyCapsule_SetDestructor(cap, NULL) < 0)
        return NULL;
    Py_BEGIN_ALLOW_THREADS err = seed_stop(h, &faults);
    Py_END_ALLOW_THREADS return Py_BuildValue("ii", err, faults);
}

/* ---- the watchdog of an out-of-process handler ---- */

static void watchdog_capsule_free(PyObject *cap)
{
    struct watchdog *w = PyCapsule_GetPointer(cap, "watchdog");
    if (w)
        watchdog_stop(w);
}

/* fork_guard([(start, end, message), ...]): see forkguard.h */
static PyObject *py_fork_guard(PyObject *self, PyObject *list)
{
    PyObject *seq = PySequence_Fast(list, "fork_guard takes a list of (start, end, message)");
    if (!seq)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    uint64_t *starts = calloc((size_t)n + 1, sizeof(uint64_t));
    uint64_t *ends = calloc((size_t)n + 1, sizeof(uint64_t));
    const char **messages = calloc((size_t)n + 1, sizeof(char *));
    int rc = starts && ends && messages ? 0 : ENOMEM;
    for (Py_ssize_t k = 0; !rc && k < n; k++) {
        unsigned long long a, b;
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(seq, k), "KKs", &a, &b, &messages[k]))
            rc = -1;
        starts[k] = a, ends[k] = b;
    }
    if (!rc)
        rc = forkguard_arm((int)n, starts, ends, messages);
    free(starts), free(ends), free(messages);
    Py_DECREF(seq);
    if (rc == -1)
        return NULL;
    if (rc)
        return os_error(rc, "fork_guard");
    Py_RETURN_NONE;
}

static PyObject *py_watchdog_start(PyObject *self, PyObject *args)
{
    int pidfd, uffd;
    if (!PyArg_ParseTuple(args, "ii", &pidfd, &uffd))
        return NULL;
    struct watchdog *w = watchdog_start(pidfd, uffd);
    if (!w)
        return os_error(errno, "pthread_create");
    return PyCapsule_New(w, "watchdog", watchdog_capsule_free);
}

/* watchdog_stop(handle) -> True if the handler had died and faults were poisoned */
static PyObject *py_watchdog_stop(PyObject *self, PyObject *cap)
{
    struct watchdog *w = PyCapsule_GetPointer(cap, "watchdog");
    int fired;
    if (!w || PyCapsule_SetDestructor(cap, NULL) < 0 || PyCapsule_SetPointer(cap, (void *)1) < 0)
        return NULL;
    Py_BEGIN_ALLOW_THREADS fired = watchdog_stop(w);
    Py_END_ALLOW_THREADS return PyBool_FromLong(fired);
}

/* ---- module ---- */

static PyMethodDef core_methods[] = {
    {"create", py_create, METH_VARARGS, "userfaultfd(flags) -> fd"},
    {"create_dev", py_create_dev, METH_VARARGS, "/dev/userfaultfd USERFAULTFD_IOC_NEW -> fd"},
    {"api", py_api, METH_VARARGS, "UFFDIO_API -> (api, features, ioctls)"},
    {"register", py_register, METH_VARARGS, "UFFDIO_REGISTER -> ioctls"},
    {"unregister", py_unregister, METH_VARARGS, "UFFDIO_UNREGISTER"},
    {"wake", py_wake, METH_VARARGS, "UFFDIO_WAKE"},
    {"writeprotect", py_writeprotect, METH_VARARGS, "UFFDIO_WRITEPROTECT"},
    {"copy", py_copy, METH_VARARGS, "UFFDIO_COPY -> (errno, copy)"},
    {"move", py_move, METH_VARARGS, "UFFDIO_MOVE -> (errno, move)"},
    {"zeropage", py_zeropage, METH_VARARGS, "UFFDIO_ZEROPAGE -> (errno, zeropage)"},
    {"continue_", py_continue, METH_VARARGS, "UFFDIO_CONTINUE -> (errno, mapped)"},
    {"poison", py_poison, METH_VARARGS, "UFFDIO_POISON -> (errno, updated)"},
    {"read", py_read, METH_VARARGS, "read(fd, max_msgs, timeout_ms) -> bytes"},
    {"buffer_address", py_buffer_address, METH_O, "(address, length) of a buffer"},
    {"touch", py_touch, METH_VARARGS, "touch(addr, length, stride, write) without the GIL"},
    {"munmap", py_munmap, METH_VARARGS, "munmap(addr, length) without the GIL"},
    {"madvise", py_madvise, METH_VARARGS, "madvise(addr, length, advice) without the GIL"},
    {"sigbus_first", py_sigbus_first, METH_NOARGS, "whether SIGBUS reaches our resolver first"},
    {"touch_pages", py_touch_pages, METH_VARARGS, "touch_pages(addr, page, order) -> ns"},
    {"seed_start", py_seed_start, METH_VARARGS, "start the seed's handler thread"},
    {"seed_stop", py_seed_stop, METH_O, "stop it -> (errno, faults)"},
    {"fork_guard", py_fork_guard, METH_O, "name regions a forked child must not touch"},
    {"watchdog_start", py_watchdog_start, METH_VARARGS, "poison faults once pidfd's process dies"},
    {"watchdog_stop", py_watchdog_stop, METH_O, "stop it -> whether it fired"},
    {NULL}};

static struct PyModuleDef core_module = {PyModuleDef_HEAD_INIT, "_core", NULL, -1, core_methods};

PyMODINIT_FUNC PyInit__core(void)
{
    if (PyType_Ready(&MappingType) < 0 || PyType_Ready(&EngineType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&core_module);
    if (!m)
        return NULL;
    Py_INCREF(&MappingType);
    Py_INCREF(&EngineType);
    if (PyModule_AddObject(m, "Mapping", (PyObject *)&MappingType) < 0 ||
        PyModule_AddObject(m, "Engine", (PyObject *)&EngineType) < 0)
        return NULL;
    /* The numbers the native code uses, for tests/test_abi.py to check against the reference. */
    static const struct {
        const char *name;
        unsigned long long value;
    } abi[] = {
        {"NR_userfaultfd", UFFD_NR_userfaultfd}, {"USERFAULTFD_IOC_NEW", USERFAULTFD_IOC_NEW},
        {"UFFDIO_API", UFFDIO_API},              {"UFFDIO_REGISTER", UFFDIO_REGISTER},
        {"UFFDIO_UNREGISTER", UFFDIO_UNREGISTER}, {"UFFDIO_WAKE", UFFDIO_WAKE},
        {"UFFDIO_COPY", UFFDIO_COPY},            {"UFFDIO_ZEROPAGE", UFFDIO_ZEROPAGE},
        {"UFFDIO_MOVE", UFFDIO_MOVE},            {"UFFDIO_WRITEPROTECT", UFFDIO_WRITEPROTECT},
        {"UFFDIO_CONTINUE", UFFDIO_CONTINUE},    {"UFFDIO_POISON", UFFDIO_POISON},
        {"UFFD_API", UFFD_API},                  {"sizeof_uffd_msg", sizeof(struct uffd_msg)},
    };
    PyObject *d = PyDict_New();
    for (size_t k = 0; d && k < sizeof(abi) / sizeof(abi[0]); k++) {
        PyObject *v = PyLong_FromUnsignedLongLong(abi[k].value);
        if (!v || PyDict_SetItemString(d, abi[k].name, v) < 0) {
            Py_XDECREF(v);
            Py_CLEAR(d);
            break;
        }
        Py_DECREF(v);
    }
    if (!d || PyModule_AddObject(m, "ABI", d) < 0 ||
        PyModule_AddIntConstant(m, "PAGE_SIZE", sysconf(_SC_PAGE_SIZE)) < 0)
        return NULL;
    return m;
}
