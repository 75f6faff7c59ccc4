"""``userfaultfd bench``: every performance figure as a ratio against a C reference, measured
side by side in one run (benchmarks/reference.c, compiled here with the system compiler).

Method: one warm-up run of each side first (fresh guest memory is several times slower on first
touch), then ours, the reference and any extra sides run in turn, each taking every place in the
rotation; medians and the spread are reported. Both sides touch the same pages in the same order,
and both run the faulting thread on one CPU and the handler on another: left to the scheduler,
whether the two share a vCPU decides the rate (a cross-CPU wake-up of an idle vCPU costs several
times a fault), and it would decide differently for the two sides."""

from __future__ import annotations

import argparse
import array
import contextlib
import json
import mmap
import os
import platform
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from userfaultfd import _core
from userfaultfd._engine import ADAPTIVE_MAX
from userfaultfd.commands import bench_tracking
from userfaultfd.flags import Feature
from userfaultfd.handoff import GuestRegion, send_uffd
from userfaultfd.page_server import PageServer
from userfaultfd.sources import File, Fill
from userfaultfd.uffd import PAGE_SIZE, Userfaultfd
from userfaultfd.working_set import WorkingSet


class BenchError(Exception):
    """The benchmark cannot run here (no compiler, a reference failed)."""


@dataclass
class Size:
    pages: int  # fault scenarios
    file_bytes: int  # restore-seq
    runs: int


QUICK = Size(pages=2048, file_bytes=128 << 20, runs=3)
FULL = Size(pages=8192, file_bytes=1 << 30, runs=7)


def find_compiler() -> str:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    raise BenchError("no C compiler found: install gcc (apt-get install gcc) or set CC")


class Reference:
    """The compiled reference program."""

    def __init__(self, workdir: Path) -> None:
        source = resources.files("userfaultfd") / "benchmarks" / "reference.c"
        self.path = workdir / "reference"
        cc = find_compiler()
        proc = subprocess.run(
            [cc, "-O2", "-o", str(self.path), str(source), "-lpthread"],
            capture_output=True,
            text=True,
        )
        if proc.returncode:
            raise BenchError(f"{cc} could not build the reference: {proc.stderr.strip()}")

    def ns(self, *args: object) -> int:
        proc = subprocess.run(
            [str(self.path), *map(str, args)], capture_output=True, text=True, timeout=600
        )
        if proc.returncode:
            raise BenchError(f"reference {args[0]} failed: {proc.stderr.strip()}")
        return int(proc.stdout)


class Workload:
    """The files both sides read: a page order and a memory file."""

    def __init__(self, workdir: Path, size: Size) -> None:
        self.dir, self.size = workdir, size
        order = array.array("I", random.Random(42).sample(range(size.pages), size.pages))
        self.order = order.tobytes()
        self.order_file = workdir / "order"
        self.order_file.write_bytes(self.order)
        self._memory_file: Path | None = None
        self.cleanup: list[Callable[[], None]] = []  # servers to close at the end

    @property
    def memory_file(self) -> Path:
        if self._memory_file is None:
            path = self.dir / "memory.bin"
            block = random.Random(1).randbytes(1 << 20)
            with open(path, "wb") as f:
                for _ in range(self.size.file_bytes >> 20):
                    f.write(block)
                os.fsync(f.fileno())  # no writeback running while we measure
            with open(path, "rb") as f:  # into the page cache
                while f.read(16 << 20):
                    pass
            self._memory_file = path
        return self._memory_file


def _cpus() -> tuple[int, int]:
    """(faulting CPU, handler CPU), or (-1, -1) where fewer than two CPUs are ours."""
    mine = sorted(os.sched_getaffinity(0))
    return (mine[0], mine[1]) if len(mine) >= 2 else (-1, -1)


TOUCH_CPU, HANDLER_CPU = _cpus()


@contextlib.contextmanager
def _on_cpu(cpu: int) -> Iterator[None]:
    """Run the calling thread on `cpu`; threads and processes it starts meanwhile inherit it."""
    if cpu < 0:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def _touch_region(server: PageServer, order: bytes, pages: int, threads: int = 1) -> int:
    """Nanoseconds for `threads` native threads to touch a fresh region's pages in `order`."""
    region = server.map(pages * PAGE_SIZE, Fill(0x5A))
    try:
        if threads == 1:
            with _on_cpu(TOUCH_CPU):
                return _core.touch_pages(region.address, PAGE_SIZE, order)
        n = len(order) // 4
        cuts = [
            order[4 * (n * k // threads) : 4 * (n * (k + 1) // threads)] for k in range(threads)
        ]
        workers = [
            threading.Thread(target=_core.touch_pages, args=(region.address, PAGE_SIZE, cut))
            for cut in cuts
        ]
        start = time.perf_counter_ns()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        return time.perf_counter_ns() - start
    finally:
        region.close()


def _rate(amount: float, ns: int) -> float:
    return amount / (ns / 1e9)


Measure = Callable[[], float]
# An extra figure beside a scenario: measured by fn, and reported as ours / it ("reference") or
# as it / the reference ("variant" of ours), or as a figure of its own ("figure").
Extra = tuple[str, Measure]


def _fault(mode: str, workers: int, threads: int) -> Callable[[Workload, Reference], Any]:
    def setup(w: Workload, ref: Reference) -> tuple[Measure, Measure, str, dict[str, Extra]]:
        pages = w.size.pages
        touch, handle = (TOUCH_CPU, HANDLER_CPU) if threads == 1 else (-1, -1)
        with _on_cpu(handle):  # the workers inherit the CPU
            server = PageServer(mode, workers=workers)  # type: ignore[arg-type]
            quiet = PageServer(mode, workers=workers, spin_us=0)  # type: ignore[arg-type]
        w.cleanup += [server.close, quiet.close]

        def ours() -> float:
            return _rate(pages, _touch_region(server, w.order, pages, threads))

        def reference() -> float:
            return _rate(pages, ref.ns("handler", w.order_file, pages, threads, touch, handle))

        extra: dict[str, Extra] = {}
        if mode == "sigbus":
            extra["c_sigbus_resolver"] = (
                "reference",
                lambda: _rate(pages, ref.ns("sigbus", w.order_file, pages, touch)),
            )
        elif threads == 1:
            extra["ours_without_spinning"] = (
                "variant",
                lambda: _rate(pages, _touch_region(quiet, w.order, pages)),
            )
        return ours, reference, "faults/s", extra

    return setup


def _restore_seq(w: Workload, ref: Reference) -> tuple[Measure, Measure, str, dict[str, Extra]]:
    path = w.memory_file
    size = w.size.file_bytes
    server = PageServer("thread", workers=1)
    w.cleanup.append(server.close)

    def ours() -> float:
        region = server.map(size, File(path), readahead="adaptive")
        try:
            start = time.perf_counter_ns()
            _core.touch(region.address, size, PAGE_SIZE, False)
            return _rate(size / 1e6, time.perf_counter_ns() - start)
        finally:
            region.close()

    def reference() -> float:
        return _rate(size / 1e6, ref.ns("pread", path))

    return ours, reference, "MB/s", {}


def _readahead(sequential: bool) -> Callable[[Workload, Reference], Any]:
    """Adaptive readahead against the fixed choice that suits the access: readahead off for
    random faults (20,000 pages of the memory file, or a fifth of a small one), 4 MiB (the
    adaptive maximum) for a sequential read of the whole file."""

    def setup(w: Workload, ref: Reference) -> tuple[Measure, Measure, str, dict[str, Extra]]:
        path, size = w.memory_file, w.size.file_bytes
        pages = size // PAGE_SIZE
        order = array.array("I", random.Random(4).sample(range(pages), min(20000, pages // 5)))
        with _on_cpu(HANDLER_CPU):
            server = PageServer("thread", workers=1)
        w.cleanup.append(server.close)

        def read(readahead: int | str) -> float:
            region = server.map(size, File(path), readahead=readahead)  # type: ignore[arg-type]
            try:
                with _on_cpu(TOUCH_CPU):
                    start = time.perf_counter_ns()
                    if sequential:
                        _core.touch(region.address, size, PAGE_SIZE, False)
                    else:
                        _core.touch_pages(region.address, PAGE_SIZE, order.tobytes())
                    return _rate(size / 1e6 if sequential else len(order),
                                 time.perf_counter_ns() - start)  # fmt: skip
            finally:
                region.close()

        fixed = (ADAPTIVE_MAX // PAGE_SIZE - 1) if sequential else 0
        unit = "MB/s" if sequential else "faults/s"
        return lambda: read("adaptive"), lambda: read(fixed), unit, {}

    return setup


CACHE_LINE = 64


def _ws_layout(pages: int, seed: int) -> list[tuple[int, int]]:
    """About a tenth of `pages` as runs of 1..16 pages, in clusters of 4..16 runs a few pages
    apart at random places, listed in random order: (first page, count)."""
    rng = random.Random(seed)
    runs: list[tuple[int, int]] = []
    used: set[int] = set()
    while sum(n for _, n in runs) < pages // 10:
        pos = rng.randrange(0, max(1, pages - 1024))
        for _ in range(rng.randint(4, 16)):
            n = rng.randint(1, 16)
            if pos + n > pages:
                break
            if used.isdisjoint(range(pos, pos + n)):
                runs.append((pos, n))
                used.update(range(pos, pos + n))
            pos += n + rng.randint(1, 32)
    rng.shuffle(runs)
    return runs


def _restore_ws(w: Workload, ref: Reference) -> tuple[Measure, Measure, str, dict[str, Extra], Any]:
    """A restore that touches a recorded working set: lazy vs replay vs resident vs a wrong set.
    The walk reads every cache line of each page of the set, in the set's order (a program using
    the data it touches). The clock runs from the hand-off (map, which starts the replay) to the
    end of the walk; for resident memory the region is populated before it starts."""
    path, size = w.memory_file, w.size.file_bytes
    runs = _ws_layout(size // PAGE_SIZE, 11)
    in_set = {p for first, n in runs for p in range(first, first + n)}
    order = array.array("I", [p for first, n in runs for p in range(first, first + n)]).tobytes()
    wrong_runs = [(f, n, 0) for f, n in _ws_layout(size // PAGE_SIZE, 12)
                  if in_set.isdisjoint(range(f, f + n))]  # fmt: skip
    with _on_cpu(HANDLER_CPU):  # the worker inherits the CPU; replay threads do not
        server = PageServer("thread", workers=1)
    w.cleanup.append(server.close)
    recording = server.map(size, File(path), record=True)
    with _on_cpu(TOUCH_CPU):
        _core.touch_pages(recording.address, PAGE_SIZE, order)
    recorded = recording.working_set()
    recording.close()
    wrong = WorkingSet(PAGE_SIZE, size, wrong_runs)
    demand: list[float] = []  # faults of each replay walk, per page of the set

    def walk(replay: WorkingSet | None = None, resident: bool = False) -> tuple[float, int]:
        start = time.perf_counter_ns()
        region = server.map(size, File(path), readahead="adaptive", replay=replay,
                            replay_threads=2)  # fmt: skip
        if resident:
            region.populate()
            start = time.perf_counter_ns()
        try:
            with _on_cpu(TOUCH_CPU):
                _core.touch_pages(region.address, PAGE_SIZE, order, False, CACHE_LINE)
            return _rate(len(in_set), time.perf_counter_ns() - start), region.stats().faults
        finally:
            region.close()

    def ours() -> float:
        rate, faults = walk(recorded)
        demand.append(faults / len(recorded))
        return rate

    extra: dict[str, Extra] = {
        "resident_walk": ("reference", lambda: walk(resident=True)[0]),
        "wrong_set_walk": ("variant", lambda: walk(wrong)[0]),
    }

    def finish(result: dict[str, Any]) -> None:
        result["resident"] = result["resident_walk"]["value"] / result["ours"]
        result["wrong_set"] = result["wrong_set_walk"]["ratio"]
        result["demand_fault_fraction"] = statistics.median(demand)
        result["set_pages"] = len(recorded)
        result["set_runs"] = len(recorded.runs)

    return ours, lambda: walk()[0], "pages/s", extra, finish


def _c_handler(w: Workload, ref: Reference) -> Measure:
    """The C handler thread serving one faulting thread on the other CPU."""
    pages = w.size.pages
    return lambda: _rate(pages, ref.ns("handler", w.order_file, pages, 1, TOUCH_CPU, HANDLER_CPU))


def _python_source(w: Workload, ref: Reference) -> tuple[Measure, Measure, str, dict[str, Extra]]:
    from userfaultfd.remote import PythonSourceServer

    pages = w.size.pages
    page = bytes([0x5A]) * PAGE_SIZE

    def ours() -> float:
        with _on_cpu(HANDLER_CPU):  # the handler process inherits the CPU
            server = PythonSourceServer(lambda offset, length: page * (length // PAGE_SIZE))
        with server, _on_cpu(TOUCH_CPU):
            region = server.map(pages * PAGE_SIZE)
            ns = _core.touch_pages(region.address, PAGE_SIZE, w.order)
            region.close()
        return _rate(pages, ns)

    return ours, _c_handler(w, ref), "faults/s", {}


def _serve(w: Workload, ref: Reference) -> tuple[Measure, Measure, str, dict[str, Extra]]:
    """`userfaultfd serve` in its own process serving our faults from the memory file."""
    pages, path = w.size.pages, w.memory_file
    sock_path = w.dir / "serve.sock"
    with _on_cpu(HANDLER_CPU):
        proc = subprocess.Popen(
            [sys.executable, "-m", "userfaultfd", "serve", "--socket", str(sock_path),
             "--memory", str(path), "--readahead", "none"],
            stderr=subprocess.DEVNULL,
        )  # fmt: skip

    def stop() -> None:
        proc.terminate()
        proc.wait(30)

    w.cleanup.append(stop)
    deadline = time.monotonic() + 30
    while not sock_path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise BenchError("userfaultfd serve did not start")
        time.sleep(0.01)

    def ours() -> float:
        with (
            Userfaultfd(Feature.EVENT_REMOVE) as uffd,
            socket.socket(socket.AF_UNIX) as sock,
            _on_cpu(TOUCH_CPU),
        ):
            region = _core.Mapping(pages * PAGE_SIZE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            uffd.register(region.address, pages * PAGE_SIZE)
            sock.connect(str(sock_path))
            send_uffd(sock, uffd.fileno(), [GuestRegion(region.address, len(region), 0, PAGE_SIZE)])
            ns = _core.touch_pages(region.address, PAGE_SIZE, w.order)
            region.close()
        return _rate(pages, ns)

    return ours, _c_handler(w, ref), "faults/s", {}


def _restore_remote(w: Workload, ref: Reference) -> tuple[Measure, Measure, str, dict[str, Extra]]:
    from .bench_store import restore_remote

    return restore_remote(w, ref)


SCENARIOS: dict[str, tuple[str, Callable[[Workload, Reference], Any]]] = {
    "fault-thread": (
        "4 KiB faults in random order, page server in thread mode (1 worker) vs a C handler "
        "thread (poll/read + UFFDIO_COPY per fault)",
        _fault("thread", 1, 1),
    ),
    "fault-sigbus": (
        "the same faults resolved in the faulting thread (sigbus mode) vs the same C handler "
        "thread; c_sigbus_resolver is a C SIGBUS handler doing the same",
        _fault("sigbus", 1, 1),
    ),
    "restore-seq": (
        "sequential touch of a region backed by a file in the page cache, adaptive readahead, "
        "vs one pread of the file into fresh anonymous memory",
        _restore_seq,
    ),
    "readahead-rand": (
        "random faults on a file-backed region (20,000 pages of the memory file): adaptive "
        "readahead vs readahead off",
        _readahead(sequential=False),
    ),
    "readahead-seq": (
        "a sequential read of the memory file: adaptive readahead vs a fixed 4 MiB readahead",
        _readahead(sequential=True),
    ),
    "python-source": (
        "4 KiB random faults served by a Python function in a handler process vs the C handler "
        "thread",
        _python_source,
    ),
    "serve": (
        "4 KiB random faults served by `userfaultfd serve` (another process, the engine's native "
        "path) from the memory file vs the C handler thread",
        _serve,
    ),
    "restore-ws": (
        "a restore walking a recorded working set (10% of the memory file in clustered runs): "
        "replay of the set vs lazy (adaptive readahead); also resident memory and a wrong set",
        _restore_ws,
    ),
    "restore-remote": (
        "time to walk a 10% working set of a snapshot in a local S3 server: lazily from the "
        "store (chunk cache filled on demand) vs `snapshot pull` then restore from the file",
        _restore_remote,
    ),
    "multithread": (
        "two faulting threads, thread mode with 2 workers vs the C handler thread serving two "
        "faulting threads",
        _fault("thread", 2, 2),
    ),
    "dirty-scan": (
        "1% of the pages of tracked memory written at random places, collected and re-armed: "
        "WP_ASYNC + PAGEMAP_SCAN vs soft-dirty (/proc/self/pagemap + clear_refs) in C",
        bench_tracking.dirty_scan,
    ),
    "write-cost": (
        "the first write to each page after arming, random order: WP_ASYNC vs an mprotect + "
        "SIGSEGV tracker in C",
        bench_tracking.write_cost,
    ),
    "live-snapshot": (
        "a writer thread's rate while a live snapshot of the memory is taken vs without; "
        "stall_fraction: the snapshot's start vs a stop-the-world copy",
        bench_tracking.live_snapshot,
    ),
}


def _summary(values: list[float]) -> tuple[float, float]:
    median = statistics.median(values)
    return median, (max(values) - min(values)) / median if median else 0.0


def run_scenario(name: str, w: Workload, ref: Reference) -> dict[str, Any]:
    ours, reference, unit, extra, *finish = SCENARIOS[name][1](w, ref)
    got: dict[str, list[float]] = {"ours": [], "reference": [], **{k: [] for k in extra}}
    sides: list[tuple[str, Measure]] = [("ours", ours), ("reference", reference)]
    sides += [(name, fn) for name, (_, fn) in extra.items()]
    for _, fn in sides:
        fn()  # warm up: fresh guest memory is slow on first touch
    for k in range(w.size.runs):
        # Interleaved, every side taking every place in turn: what ran just before a side (a
        # large region just freed, caches just filled) weighs on all of them alike.
        for side, fn in sides[k % len(sides) :] + sides[: k % len(sides)]:
            got[side].append(fn())
    o, o_spread = _summary(got["ours"])
    r, r_spread = _summary(got["reference"])
    result: dict[str, Any] = {
        "ours": o,
        "reference": r,
        "unit": unit,
        "ratio": o / r,
        "runs": w.size.runs,
        "spread": {"ours": o_spread, "reference": r_spread},
    }
    for key, (kind, _) in extra.items():
        value, _ = _summary(got[key])
        if kind == "figure":  # a figure of its own, beside the ratio
            result[key] = value
            continue
        result[key] = {"value": value, "ratio": o / value if kind == "reference" else value / r}
    for hook in finish:  # figures a scenario derives from its sides
        hook(result)
    return result


def machine(ref: Reference, size: Size) -> dict[str, Any]:
    populate = size.file_bytes
    ref.ns("populate", populate)  # warm
    rates = [_rate(populate / 1e6, ref.ns("populate", populate)) for _ in range(3)]
    return {
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "compiler": find_compiler(),
        "faulting_cpu": TOUCH_CPU,
        "handler_cpu": HANDLER_CPU,
        "kernel_populate_MBps": statistics.median(rates),
    }


SPREAD_WARNING = 0.25


def run(
    names: list[str],
    size: Size,
    on_result: Callable[[str, dict[str, Any]], None] | None = None,
    on_machine: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Every scenario of names, in order. The machine (and the kernel's populate rate) is
    measured first, then on_machine(machine); on_result(name, result) as each scenario ends."""
    with tempfile.TemporaryDirectory(prefix="uffd-bench-") as tmp:
        ref = Reference(Path(tmp))
        w = Workload(Path(tmp), size)
        try:
            report: dict[str, Any] = {"scenarios": {}, "machine": machine(ref, size)}
            if on_machine:
                on_machine(report["machine"])
            for name in names:
                report["scenarios"][name] = run_scenario(name, w, ref)
                if on_result:
                    on_result(name, report["scenarios"][name])
            return report
        finally:
            for close in w.cleanup:
                close()


def render_header(m: dict[str, Any]) -> list[str]:
    return [
        f"machine: Linux {m['kernel']}, {m['cpus']} CPUs, Python {m['python']}, kernel populate "
        f"rate {m['kernel_populate_MBps']:,.0f} MB/s",
        f"{'scenario':14} {'ours':>16} {'reference':>16} {'ratio':>7}  spread ours/ref  runs",
    ]


def render_scenario(name: str, s: dict[str, Any]) -> list[str]:
    unit = s["unit"]
    spread = f"{s['spread']['ours'] * 100:4.0f}% / {s['spread']['reference'] * 100:3.0f}%"
    lines = [
        f"{name:14} {s['ours']:>10,.0f} {unit:5} {s['reference']:>10,.0f} {unit:5} "
        f"{s['ratio']:6.2f}x  {spread:15}  {s['runs']}"
    ]
    if "stall_fraction" in s:
        lines.append(f"{'':14} stall to start / stop-the-world copy: {s['stall_fraction']:.4f}")
    if "sigbus_region" in s:
        c = s["sigbus_region"]
        lines.append(
            f"{'':14} in a sigbus-mode PageServer region: {c['value']:,.0f} {unit}, "
            f"{c['ratio']:.2f}x the rate without"
        )
    if "c_sigbus_resolver" in s:
        c = s["c_sigbus_resolver"]
        lines.append(
            f"{'':14} ours vs a C SIGBUS resolver ({c['value']:,.0f} {unit}): {c['ratio']:.2f}x"
        )
    if "cached_fault_ratio" in s:
        lines.append(
            f"{'':14} cached faults {s['cached_fault_ratio']:.2f}x a local file; compression "
            f"{s['compression_ratio']:.2f}x, base + diff dedup {s['dedup_ratio']:.2f}x"
        )
    if "resident" in s:
        lines.append(
            f"{'':14} replay {s['resident']:.2f}x the time of resident memory; a wrong set "
            f"{1 / s['wrong_set']:.2f}x the time of lazy; demand faults "
            f"{s['demand_fault_fraction'] * 100:.1f}% of the set's {s['set_pages']:,} pages"
        )
    if "ours_without_spinning" in s:
        c = s["ours_without_spinning"]
        lines.append(
            f"{'':14} ours with spin_us=0: {c['value']:,.0f} {unit}, "
            f"{c['ratio']:.2f}x the reference"
        )
    return lines


def render_notes(report: dict[str, Any]) -> list[str]:
    """The legend, a warning for each spread too wide to trust the ratio, and why restore-seq
    may beat the populate rate."""
    runs = {s["runs"] for s in report["scenarios"].values()}
    lines = [
        "",
        f"ours, reference: medians of {'/'.join(map(str, sorted(runs)))} runs of each side, "
        "interleaved, after a warm-up run; the reference is a C program doing the same work "
        "(see docs/benchmarks.md). ratio: ours / reference (rates: higher is better). "
        "spread: (max - min) / median of one side's runs.",
    ]
    for name, s in report["scenarios"].items():
        for side, spread in s["spread"].items():
            if spread > SPREAD_WARNING:
                lines.append(
                    f"warning: {name}: the spread of {side} is {spread * 100:.0f}% (over "
                    f"{SPREAD_WARNING * 100:.0f}%): the machine was busy or noisy; treat the "
                    "ratio as rough, or rerun"
                )
    if "restore-seq" in report["scenarios"]:
        s, m = report["scenarios"]["restore-seq"], report["machine"]
        lines.append(
            f"restore-seq ran at {s['ours'] / m['kernel_populate_MBps']:.2f}x the kernel "
            "populate rate. It can exceed 1: the populate rate is measured in a fresh process "
            "whose memory is new to this VM (backed on first touch) and zeroed page by page, "
            "where restore-seq reuses memory its earlier runs freed and UFFDIO_COPY writes each "
            "page once, with its data, without zeroing it first."
        )
    return [textwrap.fill(line, 100, subsequent_indent="  ") for line in lines]


def render(report: dict[str, Any]) -> str:
    lines = render_header(report["machine"])
    for name, s in report["scenarios"].items():
        lines += render_scenario(name, s)
    return "\n".join(lines + render_notes(report))


def scenario_names(args: list[str] | None) -> list[str]:
    """The scenarios asked for (each argument may be a comma-separated list), in order, once
    each; ValueError names an unknown one and lists the choices."""
    if not args:
        return list(SCENARIOS)
    names = list(dict.fromkeys(n.strip() for a in args for n in a.split(",") if n.strip()))
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown or not names:
        raise ValueError(
            f"unknown scenario {unknown[0] if unknown else ''!r}; choose from "
            f"{', '.join(SCENARIOS)}"
        )
    return names


def main(args: argparse.Namespace) -> int:
    try:
        names = scenario_names(args.scenario)
    except ValueError as e:
        print(f"userfaultfd bench: error: {e}", file=sys.stderr)
        return 2

    def header(m: dict[str, Any]) -> None:
        if not args.json:
            print("\n".join(render_header(m)), flush=True)

    def finished(name: str, result: dict[str, Any]) -> None:
        if args.json:  # stdout is the one JSON object: progress goes to stderr
            print(f"userfaultfd bench: {name} done", file=sys.stderr, flush=True)
        else:
            print("\n".join(render_scenario(name, result)), flush=True)

    try:
        report = run(names, QUICK if args.quick else FULL, finished, header)
    except BenchError as e:
        print(f"userfaultfd bench: error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(report, indent=2) if args.json else "\n".join(render_notes(report)))
    return 0
