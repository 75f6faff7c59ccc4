/* The binding of the fork guard (forkguard.h). */
#ifndef UFFD_PY_FORKGUARD_H
#define UFFD_PY_FORKGUARD_H

#include <Python.h>

PyObject *py_fork_guard(PyObject *self, PyObject *list);

#endif
