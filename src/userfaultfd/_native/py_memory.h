/* Memory access and memory system calls without the GIL: tests and benchmarks fault from here,
 * and munmap/madvise on registered memory block until their event is read. */
#ifndef UFFD_PY_MEMORY_H
#define UFFD_PY_MEMORY_H

#include <Python.h>

PyObject *py_buffer_address(PyObject *self, PyObject *obj);
PyObject *py_touch(PyObject *self, PyObject *args);
PyObject *py_munmap(PyObject *self, PyObject *args);
PyObject *py_madvise(PyObject *self, PyObject *args);
PyObject *py_touch_pages(PyObject *self, PyObject *args);

#endif
