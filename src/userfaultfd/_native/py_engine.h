/* Engine: the Python type over the native fault-serving engine (engine.h). */
#ifndef UFFD_PY_ENGINE_H
#define UFFD_PY_ENGINE_H

#include <Python.h>

extern PyTypeObject EngineType;
PyObject *py_sigbus_first(PyObject *self, PyObject *unused);

#endif
