/* Bindings of the uffd system calls: creating a uffd, its ioctls and reading its messages. Each
 * returns plain ints and tuples; the kernel ABI numbers come from abi.h. */
#ifndef UFFD_PY_UFFD_H
#define UFFD_PY_UFFD_H

#include <Python.h>

PyObject *py_create(PyObject *self, PyObject *args);
PyObject *py_create_dev(PyObject *self, PyObject *args);
PyObject *py_api(PyObject *self, PyObject *args);
PyObject *py_register(PyObject *self, PyObject *args);
PyObject *py_unregister(PyObject *self, PyObject *args);
PyObject *py_wake(PyObject *self, PyObject *args);
PyObject *py_writeprotect(PyObject *self, PyObject *args);
PyObject *py_copy(PyObject *self, PyObject *args);
PyObject *py_move(PyObject *self, PyObject *args);
PyObject *py_zeropage(PyObject *self, PyObject *args);
PyObject *py_continue(PyObject *self, PyObject *args);
PyObject *py_poison(PyObject *self, PyObject *args);
PyObject *py_read(PyObject *self, PyObject *args);
/* Adds the ABI dict (the numbers the native code uses) for tests/test_abi.py. */
int add_abi_dict(PyObject *module);

#endif
