/* The Python type over the chunk cache (chunkcache.h): _core.ChunkCache. */
#ifndef UFFD_PY_CHUNKCACHE_H
#define UFFD_PY_CHUNKCACHE_H

#include <Python.h>

int chunkcache_add_type(PyObject *module); /* 0, or -1 with an exception set */

#endif
