/* Bindings of the uffd system calls: userfaultfd(2) and /dev/userfaultfd, the UFFDIO_* ioctls and
 * read(2) of its messages. Every call that can block or copy runs with the GIL released. */
#define PY_SSIZE_T_CLEAN
#define _GNU_SOURCE
#include <Python.h>

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdint.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include "abi.h"
#include "py_errors.h"
#include "py_uffd.h"

/* ---- creating and initialising a uffd ---- */

PyObject *py_create(PyObject *self, PyObject *args)
{
    int flags, fd;
    if (!PyArg_ParseTuple(args, "i", &flags))
        return NULL;
    fd = (int)syscall(UFFD_NR_userfaultfd, flags);
    return fd < 0 ? os_error(errno, "userfaultfd") : PyLong_FromLong(fd);
}

PyObject *py_create_dev(PyObject *self, PyObject *args)
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

PyObject *py_api(PyObject *self, PyObject *args)
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

PyObject *py_register(PyObject *self, PyObject *args)
{
    int fd, rc;
    unsigned long long start, len, mode;
    if (!PyArg_ParseTuple(args, "iKKK", &fd, &start, &len, &mode))
        return NULL;
    struct uffdio_register r = {{start, len}, mode, 0};
    Py_BEGIN_ALLOW_THREADS
    rc = ioctl(fd, UFFDIO_REGISTER, &r);
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
    Py_BEGIN_ALLOW_THREADS
    rc = ioctl(fd, req, &r);
    Py_END_ALLOW_THREADS
    if (rc != 0)
        return os_error(errno, name);
    Py_RETURN_NONE;
}

PyObject *py_unregister(PyObject *self, PyObject *args)
{
    return range_call(args, UFFDIO_UNREGISTER, "UFFDIO_UNREGISTER");
}

PyObject *py_wake(PyObject *self, PyObject *args)
{
    return range_call(args, UFFDIO_WAKE, "UFFDIO_WAKE");
}

PyObject *py_writeprotect(PyObject *self, PyObject *args)
{
    int fd, rc;
    unsigned long long start, len, mode;
    if (!PyArg_ParseTuple(args, "iKKK", &fd, &start, &len, &mode))
        return NULL;
    struct uffdio_writeprotect w = {{start, len}, mode};
    Py_BEGIN_ALLOW_THREADS
    rc = ioctl(fd, UFFDIO_WRITEPROTECT, &w);
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
    Py_BEGIN_ALLOW_THREADS
    rc = ioctl(fd, req, &c);
    if (rc != 0)
        err = errno;
    Py_END_ALLOW_THREADS
    return Py_BuildValue("iL", err, (long long)c.result);
}

PyObject *py_copy(PyObject *self, PyObject *args) { return copy_call(args, UFFDIO_COPY); }
PyObject *py_move(PyObject *self, PyObject *args) { return copy_call(args, UFFDIO_MOVE); }

/* ZEROPAGE, CONTINUE and POISON: (errno, result field). */
static PyObject *rangeop_call(PyObject *args, unsigned long req)
{
    int fd, rc, err = 0;
    unsigned long long start, len, mode;
    if (!PyArg_ParseTuple(args, "iKKK", &fd, &start, &len, &mode))
        return NULL;
    struct uffdio_rangeop o = {{start, len}, mode, 0};
    Py_BEGIN_ALLOW_THREADS
    rc = ioctl(fd, req, &o);
    if (rc != 0)
        err = errno;
    Py_END_ALLOW_THREADS
    return Py_BuildValue("iL", err, (long long)o.result);
}

PyObject *py_zeropage(PyObject *self, PyObject *args)
{
    return rangeop_call(args, UFFDIO_ZEROPAGE);
}
PyObject *py_continue(PyObject *self, PyObject *args)
{
    return rangeop_call(args, UFFDIO_CONTINUE);
}
PyObject *py_poison(PyObject *self, PyObject *args) { return rangeop_call(args, UFFDIO_POISON); }

/* ---- reading messages ---- */

static int64_t ms_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* read(fd, max_msgs, timeout_ms) -> bytes: whole 32-byte messages; b"" when none came in time.
 * timeout_ms < 0 waits for ever; 0 does not wait. Signals are checked while waiting. */
PyObject *py_read(PyObject *self, PyObject *args)
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

/* The numbers the native code uses, for tests/test_abi.py to check against the reference. */
int add_abi_dict(PyObject *module)
{
    static const struct {
        const char *name;
        unsigned long long value;
    } abi[] = {
        {"NR_userfaultfd", UFFD_NR_userfaultfd},
        {"USERFAULTFD_IOC_NEW", USERFAULTFD_IOC_NEW},
        {"UFFDIO_API", UFFDIO_API},
        {"UFFDIO_REGISTER", UFFDIO_REGISTER},
        {"UFFDIO_UNREGISTER", UFFDIO_UNREGISTER},
        {"UFFDIO_WAKE", UFFDIO_WAKE},
        {"UFFDIO_COPY", UFFDIO_COPY},
        {"UFFDIO_ZEROPAGE", UFFDIO_ZEROPAGE},
        {"UFFDIO_MOVE", UFFDIO_MOVE},
        {"UFFDIO_WRITEPROTECT", UFFDIO_WRITEPROTECT},
        {"UFFDIO_CONTINUE", UFFDIO_CONTINUE},
        {"UFFDIO_POISON", UFFDIO_POISON},
        {"UFFD_API", UFFD_API},
        {"sizeof_uffd_msg", sizeof(struct uffd_msg)},
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
    if (!d || PyModule_AddObject(module, "ABI", d) < 0) {
        Py_XDECREF(d);
        return -1;
    }
    return 0;
}
