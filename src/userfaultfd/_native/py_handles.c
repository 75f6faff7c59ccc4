/* Capsule handles on the native helper threads: the seed's fault handler and the watchdog. */
#define PY_SSIZE_T_CLEAN
#define _GNU_SOURCE
#include <Python.h>

#include <errno.h>

#include "notice.h"
#include "py_errors.h"
#include "py_handles.h"
#include "seed.h"
#include "sigbus.h"
#include "watchdog.h"

/* ---- the seed's handler thread ---- */

static void seed_capsule_free(PyObject *cap)
{
    struct seed_handler *h = PyCapsule_GetPointer(cap, "seed_handler");
    int faults;
    if (h)
        seed_stop(h, &faults);
}

PyObject *py_seed_start(PyObject *self, PyObject *args)
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
PyObject *py_seed_stop(PyObject *self, PyObject *cap)
{
    struct seed_handler *h = PyCapsule_GetPointer(cap, "seed_handler");
    int faults = 0, err = 0;
    if (!h)
        return NULL;
    if (PyCapsule_SetPointer(cap, (void *)1) < 0 || PyCapsule_SetDestructor(cap, NULL) < 0)
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    err = seed_stop(h, &faults);
    Py_END_ALLOW_THREADS
    return Py_BuildValue("ii", err, faults);
}

/* ---- the watchdog of an out-of-process handler ---- */

static void watchdog_capsule_free(PyObject *cap)
{
    struct watchdog *w = PyCapsule_GetPointer(cap, "watchdog");
    if (w)
        watchdog_stop(w);
}

PyObject *py_watchdog_start(PyObject *self, PyObject *args)
{
    int pidfd, uffd;
    if (!PyArg_ParseTuple(args, "ii", &pidfd, &uffd))
        return NULL;
    int rc = sigbus_install(); /* for the notice of a page it poisons */
    if (rc)
        return os_error(rc, "sigaction");
    struct watchdog *w = watchdog_start(pidfd, uffd);
    if (!w)
        return os_error(errno, "pthread_create");
    return PyCapsule_New(w, "watchdog", watchdog_capsule_free);
}

/* watchdog_stop(handle) -> True if the handler had died and faults were poisoned */
PyObject *py_watchdog_stop(PyObject *self, PyObject *cap)
{
    struct watchdog *w = PyCapsule_GetPointer(cap, "watchdog");
    int fired;
    if (!w || PyCapsule_SetDestructor(cap, NULL) < 0 || PyCapsule_SetPointer(cap, (void *)1) < 0)
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    fired = watchdog_stop(w);
    Py_END_ALLOW_THREADS
    return PyBool_FromLong(fired);
}

/* ---- notice boards: failure lines written by a handler process ---- */

/* notice_board(address) -> bool: say the NOTICE_BOARD_SLOTS notice slots at address (shared
 * memory a handler process writes before it poisons a page) when a toucher dies of it; installs
 * the SIGBUS handler that says them. False when every board slot is taken: the notices of this
 * one are not said, which is no reason to refuse serving. */
PyObject *py_notice_board(PyObject *self, PyObject *args)
{
    unsigned long long addr;
    if (!PyArg_ParseTuple(args, "K", &addr))
        return NULL;
    int rc = sigbus_install();
    if (rc)
        return os_error(rc, "sigaction");
    return PyBool_FromLong(notice_board_add((const struct notice_slot *)(uintptr_t)addr) == 0);
}

PyObject *py_notice_board_remove(PyObject *self, PyObject *args)
{
    unsigned long long addr;
    if (!PyArg_ParseTuple(args, "K", &addr))
        return NULL;
    notice_board_remove((const struct notice_slot *)(uintptr_t)addr);
    Py_RETURN_NONE;
}
