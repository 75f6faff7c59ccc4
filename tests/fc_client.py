"""A client that behaves as Firecracker does when it loads a snapshot with a Uffd memory backend.

    python fc_client.py SOCKET MEMORY_FILE LAYOUT [--hold SECONDS] [--resident-then-touch] [--huge]
                        [--touch ORDER_FILE] [--resident-pages N]

LAYOUT is "size@offset,size@offset,..." (bytes; pages of 4 KiB, or 2 MiB hugetlb with --huge).
It creates a uffd with EVENT_REMOVE, maps each region privately and registers it MISSING, sends
one message whose payload is the JSON region list and which carries the uffd, keeps the socket
open, then reads every byte
(plain Python slicing: the faulting thread holds the GIL) and compares with the memory file, then
MADV_DONTNEEDs a range and expects zeros there. It prints one line per step and "OK" at the end.
It uses none of the library's hand-off code, only its low-level uffd and mmap wrappers.

--touch: first touch the pages of the first region listed in ORDER_FILE (uint32 page indices, in
order), print "touched" and wait for a line on standard input. --resident-pages: wait until N pages
are present without touching any (a replay), print "resident"."""

from __future__ import annotations

import ctypes
import json
import mmap
import socket
import sys
import time

import userfaultfd as u
from userfaultfd import _core

MADV_DONTNEED = 4
MAP_HUGETLB = 0x40000
libc = ctypes.CDLL(None, use_errno=True)
libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]


def resident(region: _core.Mapping) -> int:
    pages = len(region) // u.PAGE_SIZE
    vec = ctypes.create_string_buffer(pages)
    assert libc.mincore(region.address, len(region), vec) == 0
    return sum(b & 1 for b in vec.raw)


def main() -> None:
    sock_path, memory_path, layout = sys.argv[1:4]
    hold = float(sys.argv[sys.argv.index("--hold") + 1]) if "--hold" in sys.argv else 0.0
    with open(memory_path, "rb") as f:
        memory = f.read()
    huge = "--huge" in sys.argv
    page = 2 << 20 if huge else u.PAGE_SIZE
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | (MAP_HUGETLB if huge else 0)
    uffd = u.Userfaultfd(u.Feature.EVENT_REMOVE)
    regions = []
    for part in layout.split(","):
        size, offset = (int(x, 0) for x in part.split("@"))
        region = _core.Mapping(size, flags, align=page)
        uffd.register(region.address, size, u.RegisterMode.MISSING)
        regions.append((region, offset))
    payload = json.dumps(
        [
            {
                "base_host_virt_addr": r.address,
                "size": len(r),
                "offset": off,
                "page_size": page,
                "page_size_kib": page,
            }
            for r, off in regions
        ]
    ).encode()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(sock_path)
    socket.send_fds(sock, [payload], [uffd.fileno()])
    print("sent", flush=True)
    if "--touch" in sys.argv:
        with open(sys.argv[sys.argv.index("--touch") + 1], "rb") as f:
            _core.touch_pages(regions[0][0].address, page, f.read())
        print("touched", flush=True)
        sys.stdin.readline()
    if "--resident-pages" in sys.argv:
        want = int(sys.argv[sys.argv.index("--resident-pages") + 1])
        deadline = time.monotonic() + 20
        while sum(resident(r) for r, _ in regions) < want:
            assert time.monotonic() < deadline, "the replay did not install the pages"
            time.sleep(0.005)
        print("resident", flush=True)
    if "--resident-then-touch" in sys.argv:  # --prefetch all: pages arrive without faults
        deadline = time.monotonic() + 20
        while any(resident(r) < len(r) // u.PAGE_SIZE for r, _ in regions):
            assert time.monotonic() < deadline, "prefetch did not install every page"
            time.sleep(0.01)
        print("resident", flush=True)
    if hold:
        print("holding", flush=True)
        time.sleep(hold)
    for region, off in regions:
        assert region[:] == memory[off : off + len(region)], "wrong data"
    print("verified", flush=True)
    region, off = regions[0]
    half = len(region) // 2
    assert libc.madvise(region.address, half, MADV_DONTNEED) == 0  # balloon inflation
    assert region[:half] == bytes(half), "removed range is not zero"
    assert region[half:] == memory[off + half : off + len(region)], "the rest changed"
    print("OK", flush=True)


if __name__ == "__main__":
    main()
