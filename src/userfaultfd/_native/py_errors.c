/* errno -> OSError naming the failing call, shared by every binding. */
#define PY_SSIZE_T_CLEAN
#define _GNU_SOURCE
#include <Python.h>

#include <string.h>

#include "py_errors.h"

/* OSError (its errno subclass) whose message names the failing call. */
PyObject *os_error(int err, const char *call)
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
