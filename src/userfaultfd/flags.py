"""The kernel's userfaultfd numbers as Python flags (values from Linux 6.18, uapi userfaultfd.h).

Unknown bits reported by a newer kernel are kept, never rejected (IntFlag's KEEP boundary)."""

from __future__ import annotations

import enum


class Feature(enum.IntFlag):
    """``uffdio_api.features`` bits."""

    PAGEFAULT_FLAG_WP = 1 << 0
    EVENT_FORK = 1 << 1
    EVENT_REMAP = 1 << 2
    EVENT_REMOVE = 1 << 3
    MISSING_HUGETLBFS = 1 << 4
    MISSING_SHMEM = 1 << 5
    EVENT_UNMAP = 1 << 6
    SIGBUS = 1 << 7
    THREAD_ID = 1 << 8
    MINOR_HUGETLBFS = 1 << 9
    MINOR_SHMEM = 1 << 10
    EXACT_ADDRESS = 1 << 11
    WP_HUGETLBFS_SHMEM = 1 << 12
    WP_UNPOPULATED = 1 << 13
    POISON = 1 << 14
    WP_ASYNC = 1 << 15
    MOVE = 1 << 16


class Ioctl(enum.IntFlag):
    """``1 << _UFFDIO_x``: the ioctls UFFDIO_API and UFFDIO_REGISTER report as usable."""

    REGISTER = 1 << 0x00
    UNREGISTER = 1 << 0x01
    WAKE = 1 << 0x02
    COPY = 1 << 0x03
    ZEROPAGE = 1 << 0x04
    MOVE = 1 << 0x05
    WRITEPROTECT = 1 << 0x06
    CONTINUE = 1 << 0x07
    POISON = 1 << 0x08
    API = 1 << 0x3F


class RegisterMode(enum.IntFlag):
    """``uffdio_register.mode``."""

    MISSING = 1 << 0
    WP = 1 << 1
    MINOR = 1 << 2


class PageFaultFlag(enum.IntFlag):
    """``uffd_msg.arg.pagefault.flags``; neither WP nor MINOR means a missing-page fault."""

    WRITE = 1 << 0
    WP = 1 << 1
    MINOR = 1 << 2


class EventCode(enum.IntEnum):
    """``uffd_msg.event``."""

    PAGEFAULT = 0x12
    FORK = 0x13
    REMAP = 0x14
    REMOVE = 0x15
    UNMAP = 0x16


#: userfaultfd(2) flag: handle user-mode faults only (allowed without privilege).
USER_MODE_ONLY = 1
UFFD_API = 0xAA
#: Mode bits of the fill ioctls. DONTWAKE is bit 0 of every one of them.
MODE_DONTWAKE = 1 << 0
COPY_MODE_WP = 1 << 1
CONTINUE_MODE_WP = 1 << 1
MOVE_MODE_ALLOW_SRC_HOLES = 1 << 1
WRITEPROTECT_MODE_WP = 1 << 0
WRITEPROTECT_MODE_DONTWAKE = 1 << 1

#: mmap(2) flags the mmap module does not export (Linux, every architecture this runs on).
MAP_NORESERVE = 0x4000
MAP_HUGETLB = 0x40000
