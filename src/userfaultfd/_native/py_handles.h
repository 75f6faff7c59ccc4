/* Capsule handles on the native helper threads: the seed's fault handler and the watchdog of an
 * out-of-process handler. */
#ifndef UFFD_PY_HANDLES_H
#define UFFD_PY_HANDLES_H

#include <Python.h>

PyObject *py_seed_start(PyObject *self, PyObject *args);
PyObject *py_seed_stop(PyObject *self, PyObject *cap);
PyObject *py_watchdog_start(PyObject *self, PyObject *args);
PyObject *py_watchdog_stop(PyObject *self, PyObject *cap);
PyObject *py_notice_board(PyObject *self, PyObject *args);
PyObject *py_notice_board_remove(PyObject *self, PyObject *args);

#endif
