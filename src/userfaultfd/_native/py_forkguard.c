/* The binding of the fork guard (forkguard.h). */
#define PY_SSIZE_T_CLEAN
#include "py_forkguard.h"

#include <errno.h>
#include <stdint.h>
#include <stdlib.h>

#include "forkguard.h"
#include "py_errors.h"

/* fork_guard([(start, end, message), ...]): in a forked child, name the region a touch of one of
 * these ranges hit before the SIGSEGV kills it. */
PyObject *py_fork_guard(PyObject *self, PyObject *list)
{
    PyObject *seq = PySequence_Fast(list, "fork_guard takes a list of (start, end, message)");
    if (!seq)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    uint64_t *starts = calloc((size_t)n + 1, sizeof(uint64_t));
    uint64_t *ends = calloc((size_t)n + 1, sizeof(uint64_t));
    const char **messages = calloc((size_t)n + 1, sizeof(char *));
    int rc = starts && ends && messages ? 0 : ENOMEM;
    for (Py_ssize_t k = 0; !rc && k < n; k++) {
        unsigned long long a = 0, b = 0;
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(seq, k), "KKs", &a, &b, &messages[k]))
            rc = -1;
        starts[k] = a, ends[k] = b;
    }
    if (!rc) /* the messages are copied: they belong to the tuples in seq */
        rc = forkguard_arm((int)n, starts, ends, messages);
    free(starts), free(ends), free(messages);
    Py_DECREF(seq);
    if (rc == -1)
        return NULL;
    if (rc)
        return os_error(rc, "fork_guard");
    Py_RETURN_NONE;
}
