"""A client that keeps faulting, as a restoring Firecracker guest does, and times every fault.

    python load_client.py SOCKET MEMORY_FILE SIZE OFFSET SECONDS [--until-told]

It creates a uffd with EVENT_REMOVE only (as Firecracker does), maps SIZE bytes privately,
registers them MISSING, sends the hand-off and prints "sent". Then it reads the pages one by one
in a random order, spread over SECONDS, each compared with the memory file at OFFSET; with
--until-told it pauses halfway, prints "half", and goes on when a line arrives on stdin. At the
end it prints one JSON line: pages read, wrong pages, and the longest single page read (the
stall a restart of the server causes). Exit status 1 if any page was wrong."""

from __future__ import annotations

import json
import mmap
import random
import socket
import sys
import time

import userfaultfd as u
from userfaultfd import _core


def main() -> None:
    sock_path, memory_path = sys.argv[1:3]
    size, offset, seconds = int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
    page = u.PAGE_SIZE
    with open(memory_path, "rb") as f:
        f.seek(offset)
        memory = f.read(size)
    uffd = u.Userfaultfd(u.Feature.EVENT_REMOVE)
    region = _core.Mapping(size, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    uffd.register(region.address, size, u.RegisterMode.MISSING)
    payload = [{"base_host_virt_addr": region.address, "size": size, "offset": offset,
                "page_size": page, "page_size_kib": page}]  # fmt: skip
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(sock_path)
    socket.send_fds(sock, [json.dumps(payload).encode()], [uffd.fileno()])
    print("sent", flush=True)
    order = list(range(size // page))
    random.shuffle(order)
    pace = seconds / len(order)
    start = time.monotonic()
    wrong = worst = 0.0
    for k, i in enumerate(order):
        if "--until-told" in sys.argv and k == len(order) // 2:
            print("half", flush=True)
            sys.stdin.readline()
            start = time.monotonic() - k * pace
        t0 = time.monotonic()
        got = region[i * page : (i + 1) * page]  # faults, holding the GIL: the server is elsewhere
        worst = max(worst, time.monotonic() - t0)
        wrong += got != memory[i * page : (i + 1) * page]
        ahead = start + (k + 1) * pace - time.monotonic()
        if ahead > 0:
            time.sleep(ahead)
    print(json.dumps({"pages": len(order), "wrong": int(wrong), "max_stall": worst}), flush=True)
    sys.exit(1 if wrong else 0)


if __name__ == "__main__":
    main()
