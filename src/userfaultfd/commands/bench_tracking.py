"""The write-tracking scenarios of ``userfaultfd bench``: dirty-scan, write-cost, live-snapshot.

Each returns (ours, reference, unit, extras) like the scenarios in bench.py: rates, higher is
better, so that ``ratio`` = ours / reference is the issue's figure. The references are C programs
(benchmarks/tracking_reference.c) or, for live-snapshot, the same writer without a snapshot."""

from __future__ import annotations

import array
import mmap
import os
import random
import shutil
import subprocess
import tempfile
import threading
import time
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from userfaultfd import _core
from userfaultfd.page_server import PageServer
from userfaultfd.sources import Fill
from userfaultfd.tracking import snapshot, track_writes
from userfaultfd.uffd import PAGE_SIZE

if TYPE_CHECKING:
    from userfaultfd.commands.bench import Extra, Measure, Reference, Workload


class TrackingReference:
    """benchmarks/tracking_reference.c, compiled once per run."""

    def __init__(self, workdir: Path) -> None:
        from userfaultfd.commands.bench import BenchError, find_compiler

        source = resources.files("userfaultfd") / "benchmarks" / "tracking_reference.c"
        self.path = workdir / "tracking_reference"
        cc = find_compiler()
        proc = subprocess.run(
            [cc, "-O2", "-o", str(self.path), str(source)], capture_output=True, text=True
        )
        if proc.returncode:
            raise BenchError(f"{cc} could not build the tracking reference: {proc.stderr.strip()}")

    def run(self, *args: object) -> list[int]:
        from userfaultfd.commands.bench import BenchError

        proc = subprocess.run(
            [str(self.path), *map(str, args)], capture_output=True, text=True, timeout=600
        )
        if proc.returncode:
            raise BenchError(f"tracking reference {args[0]} failed: {proc.stderr.strip()}")
        return [int(word) for word in proc.stdout.split()]


def _reference(w: Workload) -> TrackingReference:
    ref = getattr(w, "tracking_reference", None)
    if ref is None:
        ref = TrackingReference(w.dir)
        w.tracking_reference = ref  # type: ignore[attr-defined]
    return ref


def _populated(size: int) -> mmap.mmap:
    """Populated memory in 4 KiB pages on both sides: a transparent huge page would be tracked by
    soft-dirty as one 2 MiB unit, and split by write protection."""
    m = mmap.mmap(-1, size)
    m.madvise(mmap.MADV_NOHUGEPAGE)
    _core.touch(_core.buffer_address(m)[0], size, PAGE_SIZE, True)
    return m


def _keep(w: Workload, *objs: Any) -> None:
    for obj in objs:
        w.cleanup.append(obj.close)


def dirty_scan(w: Workload, ref: Reference) -> tuple[Measure, Measure, str, dict[str, Extra]]:
    """1% of the pages of file_bytes of tracked memory written at random places, then collected
    and re-armed: PAGEMAP_SCAN with WP matching against soft-dirty (pagemap + clear_refs)."""
    size = w.size.file_bytes
    pages = size // PAGE_SIZE
    written = array.array("I", random.Random(7).sample(range(pages), pages // 100)).tobytes()
    written_file = w.dir / "written"
    written_file.write_bytes(written)
    memory = _populated(size)
    tracker = track_writes(memory, mechanism="async")
    _keep(w, memory)
    w.cleanup.insert(0, tracker.close)
    address = _core.buffer_address(memory)[0]
    tref = _reference(w)
    found: list[int] = []

    def ours() -> float:
        tracker.written()  # armed
        _core.touch_pages(address, PAGE_SIZE, written, True)
        start = time.perf_counter_ns()
        found = tracker.written(reset=True)
        ns = time.perf_counter_ns() - start
        if sum(n for _, n in found) != len(written) // 4 * PAGE_SIZE:
            raise RuntimeError(f"dirty-scan: the tracker found {len(found)} runs, not the writes")
        return 1e9 / ns

    def reference() -> float:
        ns, pages_found = tref.run("softdirty", size, written_file)
        found.append(pages_found)
        return 1e9 / ns

    # 0 where the kernel lacks CONFIG_MEM_SOFT_DIRTY: the reference then only walks (a lower bound)
    extra: dict[str, Extra] = {"soft_dirty_pages_found": ("figure", lambda: found[-1])}
    return ours, reference, "scans/s", extra


def write_cost(w: Workload, ref: Reference) -> tuple[Measure, Measure, str, dict[str, Extra]]:
    """The first write to each page after arming (random order): WP_ASYNC against an
    mprotect + SIGSEGV tracker in C."""
    pages = w.size.pages
    memory = _populated(pages * PAGE_SIZE)
    tracker = track_writes(memory, mechanism="async")
    _keep(w, memory)
    w.cleanup.insert(0, tracker.close)
    address = _core.buffer_address(memory)[0]
    tref = _reference(w)

    def ours() -> float:
        tracker.written()  # re-arm every page
        return pages / (_core.touch_pages(address, PAGE_SIZE, w.order, True) / 1e9)

    def reference() -> float:
        return pages / (tref.run("mprotect", w.order_file, pages)[0] / 1e9)

    return ours, reference, "writes/s", {}


class _Writer:
    """A native writer thread: batches of pages drawn at random from the whole memory, each batch
    timed."""

    BATCH = 64

    def __init__(self, address: int, pages: int, pause: float) -> None:
        self.address, self.pages, self.pause = address, pages, pause
        self.log: list[tuple[int, int]] = []  # (end time ns, writes)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        rng = random.Random(3)
        while not self._stop.is_set():
            batch = array.array("I", [rng.randrange(self.pages) for _ in range(self.BATCH)])
            _core.touch_pages(self.address, PAGE_SIZE, batch.tobytes(), True)
            self.log.append((time.perf_counter_ns(), self.BATCH))
            if self.pause:
                time.sleep(self.pause)

    def __enter__(self) -> _Writer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def rate(self, start: int, end: int) -> float:
        """Writes per second in batches that ended within [start, end]."""
        n = sum(count for t, count in self.log if start <= t <= end)
        return n / ((end - start) / 1e9)


def live_snapshot(w: Workload, ref: Reference) -> tuple[Measure, Measure, str, dict[str, Extra]]:
    """A writer thread writes random pages (64 at a time, then 1 ms of other work) while a
    snapshot of file_bytes is taken: its write rate during the snapshot against its rate without;
    stall_fraction: the time writers can be held at the snapshot's instant (Snapshot.stall)
    against a stop-the-world copy of the same memory to the same file."""
    size = w.size.file_bytes
    pages = size // PAGE_SIZE
    memory = _populated(size)
    _keep(w, memory)
    address = _core.buffer_address(memory)[0]
    shm = "/dev/shm" if os.path.isdir("/dev/shm") else str(w.dir)
    dest = Path(tempfile.mkdtemp(prefix="uffd-bench-", dir=shm))
    w.cleanup.append(lambda: shutil.rmtree(dest, ignore_errors=True))
    fractions: list[float] = []
    pause = 1e-3

    def stop_the_world() -> int:
        path = dest / "stw"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            start = time.perf_counter_ns()
            view = memoryview(memory)
            done = 0
            while done < size:
                done += os.pwrite(fd, view[done:], done)
            view.release()
            return time.perf_counter_ns() - start
        finally:
            os.close(fd)
            path.unlink()

    def during(obj: Any, addr: int) -> tuple[float, int]:
        """The writer's rate during a snapshot of obj, and the nanoseconds the start took."""
        with _Writer(addr, pages, pause) as writer:
            time.sleep(0.05)
            start = time.perf_counter_ns()
            snap = snapshot(obj, dest / "snap", wait=False)
            snap.wait()
            end = time.perf_counter_ns()
        (dest / "snap").unlink()
        return writer.rate(start, end), int(snap.stall * 1e9)

    def ours() -> float:
        stw = stop_the_world()
        rate, stall = during(memory, address)
        fractions.append(stall / stw)
        return rate

    # The same in a sigbus-mode PageServer region: the writer copies and unprotects its own page
    # in the SIGBUS resolver, without a round trip to a handler thread.
    server = PageServer("sigbus")
    w.cleanup.insert(0, server.close)
    region = server.map(size, Fill(0x5A))
    region.populate()

    def reference() -> float:
        with _Writer(address, pages, pause) as writer:
            time.sleep(0.05)
            start = time.perf_counter_ns()
            time.sleep(0.5)
            end = time.perf_counter_ns()
        return writer.rate(start, end)

    extra: dict[str, Extra] = {
        "stall_fraction": ("figure", lambda: fractions[-1]),
        "sigbus_region": ("variant", lambda: during(region, region.address)[0]),
    }
    return ours, reference, "writes/s", extra
