/* Adds pagemap_scan(), WpContext and their ABI numbers to the _core module. */
#ifndef UFFD_PY_TRACKING_H
#define UFFD_PY_TRACKING_H

#include <Python.h>

int tracking_init(PyObject *module); /* 0, or -1 with an exception set */

#endif
