/* Mapping: memory we map, with the buffer protocol and an export count. */
#ifndef UFFD_PY_MAPPING_H
#define UFFD_PY_MAPPING_H

#include <Python.h>

extern PyTypeObject MappingType;

#endif
