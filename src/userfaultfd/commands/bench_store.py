"""The ``restore-remote`` bench scenario: restoring a snapshot from an object store.

A snapshot of realistic content (zero runs, compressible text, random bytes) is pushed to a local
S3-compatible server (store/localserver.py; a directory store where none can run). A toucher
then walks a 10% working set (runs of 1 MiB in random order, pages in order within a run):
- ours: lazily from the store: the page server's engine serves the snapshot from a chunk cache
  that fetcher threads fill on demand (with sequential prefetch); the cache starts cold.
- reference: the eager path a user would take instead: ``snapshot pull`` into a local file, then
  restore from that file (the same page server, adaptive readahead).
Both are reported as working-set MB/s, so the ratio is the speed-up of the lazy path. Beside them:
``cached_fault_ratio``, the 4 KiB random-fault rate from a warm cache over the rate from a local
file (the fault-thread setup), ``compression_ratio`` of the base snapshot's chunks, and
``dedup_ratio``, the logical bytes of a base plus a diff layer (5% of chunks changed) over the
distinct bytes they store."""

from __future__ import annotations

import array
import os
import random
import statistics
import time
from pathlib import Path
from typing import Any

from userfaultfd import _core
from userfaultfd.page_server import PageServer
from userfaultfd.sources import File
from userfaultfd.store import SnapshotStore, localserver
from userfaultfd.store.serving import StoreCache
from userfaultfd.uffd import PAGE_SIZE
from userfaultfd.working_set import WorkingSet

from .bench import HANDLER_CPU, TOUCH_CPU, Extra, Measure, Workload, _on_cpu, _rate

RUN = 1 << 20  # working-set runs
WORKING_SET = 0.10
CACHED_ROUNDS = 3


def _realistic(path: Path, size: int, seed: int) -> None:
    """A third each of zero runs, compressible text and random bytes, in runs of 1-8 MiB."""
    rng = random.Random(seed)
    # Compressible and never repeated: random bytes over a 16-letter alphabet (about 2x by zstd).
    letters = bytes.maketrans(bytes(range(256)), b"etaoinshrdlucmfw" * 16)
    with open(path, "wb") as f:
        f.truncate(size)
        pos = 0
        while pos < size:
            n = min(size - pos, rng.randrange(1, 9) << 20)
            kind = rng.randrange(3)
            if kind:
                f.seek(pos)
                data = rng.randbytes(n)
                f.write(data if kind == 2 else data.translate(letters))
            pos += n


def _working_set(size: int, seed: int) -> tuple[bytes, WorkingSet]:
    """Runs of RUN bytes covering WORKING_SET of size, in random order: the toucher's page
    numbers, and the same pages as the working set a recording of that walk gives."""
    rng = random.Random(seed)
    runs = rng.sample(range(size // RUN), max(1, int(size / RUN * WORKING_SET)))
    pages = RUN // PAGE_SIZE
    order = array.array("I", (r * pages + k for r in runs for k in range(pages))).tobytes()
    ws = WorkingSet(PAGE_SIZE, size, [(r * pages, pages, k) for k, r in enumerate(runs)])
    return order, ws


def _start_store(w: Workload) -> str:
    """A store URL: a bucket on a local S3 server started for the bench, or a directory."""
    if not localserver.available():
        return f"file://{w.dir}/store"
    server = localserver.S3Server()
    saved = {k: os.environ.get(k) for k in server.env()}
    os.environ.update(server.env())

    def stop() -> None:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v

    w.cleanup.append(stop)
    server.create_bucket("bench")
    return "s3://bench/snapshots"


def _push_layers(store: SnapshotStore, base: Path, size: int, w: Workload) -> dict[str, float]:
    store.push(base, "base")
    info = store.info("base")
    cs = info["chunk_size"]
    diff = w.dir / "diff.bin"  # a Firecracker-style sparse diff: 5% of the chunks written to
    rng = random.Random(3)
    with open(diff, "wb") as f:
        f.truncate(size)
        for k in rng.sample(range(size // cs), max(1, size // cs // 20)):
            f.seek(k * cs + PAGE_SIZE)
            f.write(rng.randbytes(PAGE_SIZE))
    store.push(diff, "diff", parent="base", sparse_diff=True)
    diff.unlink()
    raw = store.manifest("base").raw_bytes + store.manifest("diff").raw_bytes
    return {
        "compression_ratio": info["compression_ratio"],
        "dedup_ratio": round(2 * size / raw, 2) if raw else 0.0,
    }


def restore_remote(w: Workload, ref: Any) -> tuple[Measure, Measure, str, dict[str, Extra]]:
    size = w.size.file_bytes
    url = _start_store(w)
    base = w.dir / "snapshot.bin"
    _realistic(base, size, seed=2)
    store = SnapshotStore(url)
    figures = _push_layers(store, base, size, w)
    base.unlink()
    order, working_set = _working_set(size, seed=4)
    ws_mb = len(order) // 4 * PAGE_SIZE / 1e6
    with _on_cpu(HANDLER_CPU):
        server = PageServer("thread", workers=1)
    w.cleanup.append(server.close)
    pulled = w.dir / "pulled.bin"

    def touch(source: Any, replay: WorkingSet | None = None) -> None:
        region = server.map(size, source, readahead="adaptive", replay=replay, replay_threads=2)
        try:
            with _on_cpu(TOUCH_CPU):
                _core.touch_pages(region.address, PAGE_SIZE, order)
        finally:
            region.close()

    def ours() -> float:
        start = time.perf_counter_ns()
        with StoreCache(SnapshotStore(url).open("base")) as cache:
            touch(cache.source(), working_set)  # its chunks fetched ahead of the walk
        return _rate(ws_mb, time.perf_counter_ns() - start)

    def reference() -> float:
        start = time.perf_counter_ns()
        SnapshotStore(url).pull("base", pulled)
        touch(File(pulled))
        ns = time.perf_counter_ns() - start
        pulled.unlink()
        return _rate(ws_mb, ns)

    def figure(value: float) -> Extra:  # fixed by the setup
        return "figure", lambda: value

    extra: dict[str, Extra] = {
        "cached_fault_ratio": ("figure", _cached_fault_ratio(w, store)),
        **{key: figure(value) for key, value in figures.items()},
    }
    return ours, reference, "MB/s", extra


def _cached_fault_ratio(w: Workload, store: SnapshotStore) -> Measure:
    """4 KiB faults in random order (fault-thread's), from a warm chunk cache and from a local
    file of the same bytes: the median of the ratios of CACHED_ROUNDS side-by-side pairs."""
    pages = w.size.pages
    length = pages * PAGE_SIZE
    path = w.dir / "faults.bin"
    path.write_bytes(random.Random(5).randbytes(length))
    store.push(path, "faults")
    with _on_cpu(HANDLER_CPU):
        server = PageServer("thread", workers=1)
    cache = StoreCache(store.open("faults"))
    cache.warm()
    w.cleanup += [server.close, cache.close]  # the server first: its regions use the cache

    def rate(source: Any) -> float:
        region = server.map(length, source)
        try:
            with _on_cpu(TOUCH_CPU):
                return _rate(pages, _core.touch_pages(region.address, PAGE_SIZE, w.order))
        finally:
            region.close()

    def measure() -> float:
        ratios = []
        for k in range(CACHED_ROUNDS):
            # Side by side, alternating who goes first: the load of a shared VM drifts less
            # within a pair than over a whole run.
            if k % 2:
                local = rate(File(path))
                cached = rate(cache.source())
            else:
                cached = rate(cache.source())
                local = rate(File(path))
            ratios.append(cached / local)
        return round(statistics.median(ratios), 3)

    return measure
