/* userfaultfd._core: the method table and the module init. The bindings live in py_*.c, one
 * concern each; the native mechanism (engine, seed, watchdog) never touches a Python object. */
#define PY_SSIZE_T_CLEAN
#define _GNU_SOURCE
#include <Python.h>

#include <unistd.h>

#include "engine.h"
#include "notice.h"
#include "py_chunkcache.h"
#include "py_engine.h"
#include "py_forkguard.h"
#include "py_handles.h"
#include "py_mapping.h"
#include "py_memory.h"
#include "py_tracking.h"
#include "py_uffd.h"

/* A C constant exported under its own name: Python never retypes a C number. */
#define ADD_INT_MACRO(m, c) PyModule_AddIntConstant(m, #c, c)

static PyMethodDef core_methods[] = {
    {"create", py_create, METH_VARARGS, "userfaultfd(flags) -> fd"},
    {"create_dev", py_create_dev, METH_VARARGS, "/dev/userfaultfd USERFAULTFD_IOC_NEW -> fd"},
    {"api", py_api, METH_VARARGS, "UFFDIO_API -> (api, features, ioctls)"},
    {"register", py_register, METH_VARARGS, "UFFDIO_REGISTER -> ioctls"},
    {"unregister", py_unregister, METH_VARARGS, "UFFDIO_UNREGISTER"},
    {"wake", py_wake, METH_VARARGS, "UFFDIO_WAKE"},
    {"writeprotect", py_writeprotect, METH_VARARGS, "UFFDIO_WRITEPROTECT"},
    {"copy", py_copy, METH_VARARGS, "UFFDIO_COPY -> (errno, copy)"},
    {"move", py_move, METH_VARARGS, "UFFDIO_MOVE -> (errno, move)"},
    {"zeropage", py_zeropage, METH_VARARGS, "UFFDIO_ZEROPAGE -> (errno, zeropage)"},
    {"continue_", py_continue, METH_VARARGS, "UFFDIO_CONTINUE -> (errno, mapped)"},
    {"poison", py_poison, METH_VARARGS, "UFFDIO_POISON -> (errno, updated)"},
    {"read", py_read, METH_VARARGS, "read(fd, max_msgs, timeout_ms) -> bytes"},
    {"buffer_address", py_buffer_address, METH_O, "(address, length) of a buffer"},
    {"touch", py_touch, METH_VARARGS, "touch(addr, length, stride, write) without the GIL"},
    {"munmap", py_munmap, METH_VARARGS, "munmap(addr, length) without the GIL"},
    {"madvise", py_madvise, METH_VARARGS, "madvise(addr, length, advice) without the GIL"},
    {"sigbus_first", py_sigbus_first, METH_NOARGS, "whether SIGBUS reaches our resolver first"},
    {"touch_pages", py_touch_pages, METH_VARARGS, "touch_pages(addr, page, order) -> ns"},
    {"seed_start", py_seed_start, METH_VARARGS, "start the seed's handler thread"},
    {"seed_stop", py_seed_stop, METH_O, "stop it -> (errno, faults)"},
    {"fork_guard", py_fork_guard, METH_O, "name the regions a forked child must not touch"},
    {"watchdog_start", py_watchdog_start, METH_VARARGS, "poison faults once pidfd's process dies"},
    {"watchdog_stop", py_watchdog_stop, METH_O, "stop it -> whether it fired"},
    {"notice_board", py_notice_board, METH_VARARGS, "say the failure notices at address"},
    {"notice_board_remove", py_notice_board_remove, METH_VARARGS, "stop saying them"},
    {NULL}};

static struct PyModuleDef core_module = {PyModuleDef_HEAD_INIT, "_core", NULL, -1, core_methods};

PyMODINIT_FUNC PyInit__core(void)
{
    if (PyType_Ready(&MappingType) < 0 || PyType_Ready(&EngineType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&core_module);
    if (!m || chunkcache_add_type(m) < 0)
        return NULL;
    Py_INCREF(&MappingType);
    Py_INCREF(&EngineType);
    if (PyModule_AddObject(m, "Mapping", (PyObject *)&MappingType) < 0 ||
        PyModule_AddObject(m, "Engine", (PyObject *)&EngineType) < 0)
        return NULL;
    if (add_abi_dict(m) < 0 ||
        PyModule_AddIntConstant(m, "PAGE_SIZE", sysconf(_SC_PAGE_SIZE)) < 0 || tracking_init(m) < 0)
        return NULL;
    if (ADD_INT_MACRO(m, MODE_THREAD) < 0 || ADD_INT_MACRO(m, MODE_SIGBUS) < 0 ||
        ADD_INT_MACRO(m, SRC_ZERO) < 0 || ADD_INT_MACRO(m, SRC_BYTES) < 0 ||
        ADD_INT_MACRO(m, SRC_FILL) < 0 || ADD_INT_MACRO(m, SRC_CONTINUE) < 0 ||
        ADD_INT_MACRO(m, SRC_CACHE) < 0 || ADD_INT_MACRO(m, REMOVE_REFILL) < 0 ||
        ADD_INT_MACRO(m, REMOVE_UNREGISTER) < 0 || ADD_INT_MACRO(m, NOTICE_TEXT) < 0 ||
        ADD_INT_MACRO(m, NOTICE_BOARD_SLOTS) < 0)
        return NULL;
    return m;
}
