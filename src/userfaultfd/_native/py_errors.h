/* The one way the bindings turn an errno into a Python exception. */
#ifndef UFFD_PY_ERRORS_H
#define UFFD_PY_ERRORS_H

#include <Python.h>

/* Sets OSError (its errno subclass, e.g. PermissionError) with a message naming the failing call;
 * returns NULL so a binding can `return os_error(errno, "UFFDIO_COPY")`. */
PyObject *os_error(int err, const char *call);

#endif
