"""The userfaultfd(2) manual page's example program, reproduced.

The reading loop below is plain Python indexing, so the faulting thread holds the GIL while it
waits: the handler is the seed's own loop running in a native thread (``_native/seed.c``)."""

from __future__ import annotations

import mmap
import sys
import time
from typing import TextIO

from userfaultfd import _core
from userfaultfd.flags import Feature, RegisterMode
from userfaultfd.uffd import PAGE_SIZE, Userfaultfd

MAX_PAGES = 1 << 18  # 1 GiB of 4 KiB pages: more than anyone reads at one byte per KiB


def run(pages: int, delay: float = 0.1, out: TextIO | None = None) -> int:
    """Run the demo on ``pages`` pages; returns the number of faults the handler served."""
    if not isinstance(pages, int) or not 1 <= pages <= MAX_PAGES:
        raise ValueError(f"page count {pages!r} is not in 1..{MAX_PAGES}")
    if delay < 0:
        raise ValueError(f"delay {delay!r} is negative")
    out = out or sys.stdout
    length = pages * PAGE_SIZE
    # The seed's fault address is not page aligned (offset 0xf): EXACT_ADDRESS keeps it so.
    with Userfaultfd(Feature.EXACT_ADDRESS) as uffd:
        region = _core.Mapping(length, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        try:
            addr = region.address
            print(f"Address returned by mmap() = {addr:#x}", file=out, flush=True)
            uffd.register(addr, length, RegisterMode.MISSING)
            handler = _core.seed_start(uffd.fileno(), out.fileno())
            try:
                offset = 0xF
                while offset < length:
                    c = region[offset]  # faults here, holding the GIL
                    print(
                        f"Read address {addr + offset:#x} in main(): {chr(c)}", file=out, flush=True
                    )
                    offset += 1024
                    if delay:
                        time.sleep(delay)
            finally:
                err, faults = _core.seed_stop(handler)
            if err:
                raise OSError(err, "the fault-handler thread stopped early")
            return int(faults)
        finally:
            region.close()
