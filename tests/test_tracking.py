"""Write tracking and live snapshots, checked against models: writers run in native code (GIL
released) while the tracker scans and re-arms, or while a snapshot is copied."""

from __future__ import annotations

import array
import errno
import mmap
import os
import random
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import userfaultfd as u
from userfaultfd import _core
from userfaultfd.flags import Feature

from .conftest import PAGE, TIMEOUT

needs_async = pytest.mark.skipif(
    not u.available_features() & Feature.WP_ASYNC, reason="the kernel lacks WP_ASYNC (6.7+)"
)
MECHANISMS = [pytest.param("async", marks=needs_async), "sync"]


def _addr(obj: Any) -> int:
    return _core.buffer_address(obj)[0]


def _order(pages: list[int]) -> bytes:
    return array.array("I", pages).tobytes()


def _pages(runs: list[tuple[int, int]]) -> set[int]:
    return {p for off, n in runs for p in range(off // PAGE, (off + n) // PAGE)}


@pytest.fixture(params=["plain", "thread", "sigbus"])
def memory(request: pytest.FixtureRequest) -> Iterator[Any]:
    """Anonymous memory: a plain mmap, or a PageServer region in either mode."""
    if request.param == "plain":  # large enough that write-protecting it takes a while
        m = mmap.mmap(-1, 4096 * PAGE)
        yield m
        m.close()
        return
    with u.PageServer(request.param) as server:
        region = server.map(512 * PAGE, u.Fill(b"\x00"))
        yield region
        region.close()


def _writers(
    addr: int, npages: int, stop: threading.Event, log: list[Any], epoch: list[int]
) -> Any:
    """A writer: batches of random pages written natively, each batch logged with the epochs
    read before and after it."""

    def run(seed: int) -> None:
        rng = random.Random(seed)
        while not stop.is_set():
            batch = [rng.randrange(npages) for _ in range(8)]
            before = epoch[0]
            _core.touch_pages(addr, PAGE, _order(batch), True)
            log.append((before, epoch[0], batch))

    return run


@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_written_pages_match_a_model_under_concurrent_writers(
    mechanism: str, tmp_path: Path
) -> None:
    m = mmap.mmap(-1, 256 * PAGE)
    _check_exact(m, mechanism)
    m.close()


@pytest.mark.parametrize("mode", ["thread", "sigbus"])
def test_pageserver_regions_track_exactly_in_both_modes(mode: str) -> None:
    with u.PageServer(mode) as server:
        region = server.map(256 * PAGE, u.Fill(b"\x00"))
        _check_exact(region, None)
        region.close()


def _check_exact(obj: Any, mechanism: str | None) -> None:
    npages = len(obj) // PAGE
    addr = _addr(obj)
    with u.track_writes(obj, mechanism=mechanism) as tracker:  # type: ignore[arg-type]
        assert tracker.written() == []
        stop, log, epoch = threading.Event(), [], [0]
        reports: list[set[int]] = []
        threads = [
            threading.Thread(target=_writers(addr, npages, stop, log, epoch), args=(k,))
            for k in range(3)
        ]
        for t in threads:
            t.start()
        try:
            for _ in range(40):
                reports.append(_pages(tracker.written(reset=True)))
                epoch[0] += 1
        finally:
            stop.set()
            for t in threads:
                t.join(TIMEOUT)
        reports.append(_pages(tracker.written(reset=True)))  # report k closes epoch k
        # Every write shows in a report of an epoch it overlapped (or the next one: the epoch
        # counter moves just after the report).
        written_in: dict[int, set[int]] = {}
        for before, after, batch in log:
            for p in batch:
                assert any(
                    p in reports[k] for k in range(before, min(after + 1, len(reports) - 1) + 1)
                ), (p, before, after)
                for k in range(before, min(after + 1, len(reports) - 1) + 1):
                    written_in.setdefault(k, set()).add(p)
        # And nothing is reported that no write could have caused.
        for k, pages in enumerate(reports):
            assert pages <= written_in.get(k, set()), (k, pages - written_in.get(k, set()))
        # Quiescent rounds: exact equality.
        for _ in range(3):
            pages = random.sample(range(npages), 20)
            _core.touch_pages(addr, PAGE, _order(pages), True)
            assert _pages(tracker.written(reset=False)) == set(pages)
            assert _pages(tracker.written()) == set(pages)
            assert tracker.written() == []


@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_untouched_pages_and_reads_count_as_not_written(mechanism: str) -> None:
    m = mmap.mmap(-1, 64 * PAGE)
    addr = _addr(m)
    with u.track_writes(m, mechanism=mechanism) as tracker:  # type: ignore[arg-type]
        assert tracker.mechanism == mechanism
        _core.touch(addr, 64 * PAGE, PAGE, False)
        assert tracker.written() == []
        _core.touch(addr + 5 * PAGE + 7, 1, 1, True)
        assert tracker.written() == [(5 * PAGE, PAGE)]
    m.close()


@pytest.mark.parametrize("memory", ["anonymous", "shmem", "memfd"])
@pytest.mark.parametrize("mode", ["thread", "sigbus"])
def test_pages_a_pageserver_installs_for_a_read_do_not_count(mode: str, memory: str) -> None:
    with u.PageServer(mode) as server:
        if memory == "memfd":  # minor faults: UFFDIO_CONTINUE, write-protected
            fd = os.memfd_create("tracked")
            os.write(fd, b"xy" * (16 * PAGE))
            region = server.map(32 * PAGE, u.Memfd(fd))
            os.close(fd)  # the region maps the file itself
        else:
            region = server.map(32 * PAGE, u.Fill(b"xy"), memory=memory)  # type: ignore[arg-type]
        with region.track_writes() as tracker:
            assert tracker.mechanism == "sync"
            _core.touch(region.address, 16 * PAGE, PAGE, False)  # served now, write-protected
            assert tracker.written() == []
            _core.touch(region.address + 3 * PAGE, 1, 1, True)  # installed, then written
            _core.touch(region.address + 20 * PAGE, 1, 1, True)  # missing, written at once
            assert tracker.written() == [(3 * PAGE, PAGE), (20 * PAGE, PAGE)]
            assert region[3 * PAGE] == ord("x") + 1 and region[20 * PAGE] == ord("x") + 1
        _core.touch(region.address + 4 * PAGE, 1, 1, True)  # untracked again: no fault
        assert region.stats().faults_wp == 2
        region.close()


def test_runs_are_relative_to_an_object_that_starts_inside_a_page() -> None:
    m = mmap.mmap(-1, 16 * PAGE)
    view = memoryview(m)[100 : 10 * PAGE + 50]
    with u.track_writes(view) as tracker:
        _core.touch(_addr(m) + 3 * PAGE, 1, 1, True)
        _core.touch(_addr(m) + 10 * PAGE, 1, 1, True)  # the object's last, partial page
        assert tracker.written() == [(3 * PAGE - 100, PAGE), (10 * PAGE - 100, 50)]
    view.release()
    m.close()


@needs_async
def test_async_tracking_covers_a_file_mapping_which_sync_cannot(tmp_path: Path) -> None:
    path = tmp_path / "data"
    path.write_bytes(b"\0" * 8 * PAGE)
    with open(path, "r+b") as f:
        m = mmap.mmap(f.fileno(), 8 * PAGE)
    with u.track_writes(m) as tracker:
        assert tracker.mechanism == "async"
        _core.touch(_addr(m) + 2 * PAGE, 1, 1, True)
        assert tracker.written() == [(2 * PAGE, PAGE)]
    with pytest.raises(OSError, match=r"cannot write-protect mmap at 0x[0-9a-f]+ \(32768 bytes\)"):
        u.track_writes(m, mechanism="sync")
    m.close()


def test_memory_the_tracker_cannot_handle_gets_one_clear_error() -> None:
    with pytest.raises(ValueError, match="bytes .* is a read-only buffer"):
        u.track_writes(b"x" * PAGE)
    with pytest.raises(TypeError, match="does not support the buffer protocol"):
        u.track_writes(42)
    with pytest.raises(ValueError, match="mechanism 'fast' is not"):
        u.track_writes(bytearray(10), mechanism="fast")  # type: ignore[arg-type]
    m = mmap.mmap(-1, 8 * PAGE)
    with u.track_writes(m, mechanism="sync"):
        with pytest.raises(ValueError, match="overlaps memory already write-protected"):
            u.track_writes(memoryview(m)[: 2 * PAGE])
        with pytest.raises(ValueError, match="already tracked with sync"):
            u.track_writes(m, mechanism="async")
    m.close()
    with u.PageServer() as server:
        region = server.map(4 * PAGE)
        with pytest.raises(ValueError, match="PageServer region is tracked with mechanism 'sync'"):
            u.track_writes(region, mechanism="async")
        region.close()


def test_a_closed_tracker_refuses_and_the_memory_is_free_again() -> None:
    m = mmap.mmap(-1, 4 * PAGE)
    tracker = u.track_writes(m, mechanism="sync")
    tracker.close()
    tracker.close()
    with pytest.raises(ValueError, match="closed"):
        tracker.written()
    m[0] = 1  # not registered any more: a plain write under the GIL
    m.close()  # no export left


# ---- live snapshots ----


def _counts(image: bytes, npages: int) -> list[int]:
    return [image[p * PAGE] for p in range(npages)]


def _consistent(image: bytes, base: list[int], order: list[int]) -> int:
    """The number of writes of order the image holds: it must equal base plus exactly the first
    K writes, for one K (the instant), or the snapshot is torn."""
    counts = _counts(image, len(base))
    k = sum(counts) - sum(base)
    expect = list(base)
    for p in order[:k]:
        expect[p] += 1
    assert counts == expect, "the snapshot is not the memory of one instant"
    return k


class _Writer(threading.Thread):
    """Writes the pages of order in sequence, natively, in chunks, until told to stop (join)."""

    def __init__(self, obj: Any, order: list[int]) -> None:
        super().__init__()
        self.addr, self.order, self.stop = _addr(obj), _order(order), threading.Event()
        self.chunks = 0
        self.start()

    def run(self) -> None:
        for k in range(0, len(self.order), 4 * 64):
            if self.stop.is_set():
                break
            _core.touch_pages(self.addr, PAGE, self.order[k : k + 4 * 64], True)
            self.chunks += 1
            time.sleep(0.0001)  # slow enough to be still writing when the snapshot is taken

    def join(self, timeout: float | None = None) -> None:
        self.stop.set()
        super().join(timeout)


def _writer(obj: Any, order: list[int]) -> _Writer:
    return _Writer(obj, order)


def test_a_live_snapshot_is_the_memory_of_one_instant(memory: Any, tmp_path: Path) -> None:
    npages = len(memory) // PAGE
    rng = random.Random(1)
    for _ in range(3):  # the first protects everything, the others again what was written
        order = [rng.randrange(npages) for _ in range(100 * npages)]  # < 256 writes a page
        memory[:] = bytes(len(memory))
        base = [0] * npages
        writer = _writer(memory, order)
        deadline = time.monotonic() + TIMEOUT
        while not writer.chunks and time.monotonic() < deadline:
            time.sleep(0.0001)  # the writer is writing when the snapshot starts
        snap = u.snapshot(memory, tmp_path / "image", wait=False)
        assert snap.wait(TIMEOUT) is snap
        assert 0 <= snap.stall < TIMEOUT
        writer.join(TIMEOUT)
        image = (tmp_path / "image").read_bytes()
        assert len(image) == len(memory)
        assert 0 < _consistent(image, base, order) < len(order)  # taken while it wrote


def test_diff_layers_restore_to_the_same_bytes_as_a_full_snapshot(
    memory: Any, tmp_path: Path
) -> None:
    npages = len(memory) // PAGE
    rng = random.Random(2)
    with u.track_writes(memory, mechanism="sync"):
        full = u.snapshot(memory, tmp_path / "s0")
        assert full.pages == npages
        base = _counts(bytes(memory[:]), npages)
        order = [rng.randrange(npages // 8) for _ in range(20 * npages)]  # a hot eighth
        writer = _writer(memory, order)
        layer = u.snapshot(memory, tmp_path / "s1", parent=full)
        writer.join(TIMEOUT)
        _consistent(u.read_snapshot(tmp_path / "s1"), base, order)
        assert layer.pages <= npages // 8
        layer2 = u.snapshot(memory, tmp_path / "s2", parent=layer)  # quiet: equal to a full one
        again = u.snapshot(memory, tmp_path / "s3")
        assert layer2.pages <= npages // 8
        assert u.read_snapshot(tmp_path / "s2") == (tmp_path / "s3").read_bytes() == memory[:]
        with pytest.raises(ValueError, match="not the latest snapshot"):
            u.snapshot(memory, tmp_path / "s4", parent=layer)
        assert again.parent is None
    with pytest.raises(ValueError, match="not the latest snapshot"):  # nothing tracks any more
        u.snapshot(memory, tmp_path / "s5", parent=again)


def test_a_snapshot_of_an_object_inside_pages_is_its_bytes(tmp_path: Path) -> None:
    data = bytearray(os.urandom(3 * PAGE + 123))
    snap = u.snapshot(memoryview(data)[7:], tmp_path / "img")
    assert (tmp_path / "img").read_bytes() == data[7:]
    assert snap.done and snap.parent is None


@needs_async
def test_snapshots_of_async_tracked_memory_are_refused_with_the_way_out(tmp_path: Path) -> None:
    m = mmap.mmap(-1, 4 * PAGE)
    with u.track_writes(m), pytest.raises(ValueError, match="mechanism='sync'"):
        u.snapshot(m, tmp_path / "x")
    m.close()


def test_snapshot_errors_name_the_problem(tmp_path: Path) -> None:
    m = mmap.mmap(-1, 4 * PAGE)
    with pytest.raises(ValueError, match="names no snapshot"):  # tests/test_tracking_store.py
        u.snapshot(m, "s3://bucket")
    with pytest.raises(FileNotFoundError):
        u.snapshot(m, tmp_path / "missing-dir" / "x")
    with pytest.raises(TypeError, match="is not a Snapshot"):
        u.snapshot(m, tmp_path / "x", parent="x")  # type: ignore[arg-type]
    u.snapshot(m, tmp_path / "x")  # nothing was left attached by the failures
    m.close()


def test_a_snapshot_that_cannot_be_written_says_so_and_lets_go(tmp_path: Path) -> None:
    if not stat.S_ISCHR(os.stat("/dev/full").st_mode):
        pytest.skip("/dev/full is not the full device here")
    m = mmap.mmap(-1, 64 * PAGE)
    snap = u.snapshot(m, "/dev/full", wait=False)  # every write fails with ENOSPC
    with pytest.raises(OSError, match="writing the snapshot /dev/full") as e:
        snap.wait(TIMEOUT)
    assert e.value.errno == errno.ENOSPC
    m[0] = 1  # released: plain memory again
    m.close()
    assert stat.S_ISCHR(os.stat("/dev/full").st_mode)  # left as it was


@pytest.mark.parametrize("mode", ["thread", "sigbus"])
def test_pages_not_served_yet_are_snapshotted_from_the_source(mode: str, tmp_path: Path) -> None:
    with u.PageServer(mode) as server:
        region = server.map(64 * PAGE, u.Fill(b"snap"))
        _core.touch(region.address + 5 * PAGE, 1, 1, True)
        u.snapshot(region, tmp_path / "img")
        expect = bytearray(b"snap" * (16 * PAGE))
        expect[5 * PAGE] += 1
        assert (tmp_path / "img").read_bytes() == expect
        assert region.stats().pages_installed == 64
        region.close()


def test_closing_the_tracker_during_a_snapshot_leaves_the_copy_intact(tmp_path: Path) -> None:
    m = mmap.mmap(-1, 4096 * PAGE)
    m[:] = os.urandom(len(m))
    before = m[:]
    tracker = u.track_writes(m, mechanism="sync")
    snap = u.snapshot(m, tmp_path / "img", wait=False)
    tracker.close()
    writer = _writer(m, list(range(0, 4096, 3)))
    snap.wait(TIMEOUT)
    writer.join(TIMEOUT)
    assert (tmp_path / "img").read_bytes() == before
    m[0] = 1  # nothing protects it any more
    m.close()


def test_a_pageserver_closed_under_a_tracker_detaches_the_region() -> None:
    server = u.PageServer()
    region = server.map(16 * PAGE, u.Fill(b"z"))
    tracker = region.track_writes()
    with pytest.warns(u.DetachWarning, match="still exported"):
        server.close()
    assert region[0] == ord("z")  # detached: every page installed
    region[PAGE] = 1
    with pytest.raises(ValueError, match="no longer tracked"):  # it said [] before the fix
        tracker.written()
    tracker.close()
    region.close()


def test_closing_a_region_under_its_tracker_says_to_close_the_tracker_first() -> None:
    with u.PageServer() as server:
        region = server.map(16 * PAGE, u.Fill(b"z"))
        tracker = region.track_writes()
        with pytest.raises(BufferError, match="write tracker.*close the tracker first"):
            region.close()
        with pytest.raises(BufferError, match="write tracker.*close the tracker first"):
            server.close(detach="error")
        assert region[0] == ord("z")  # still served
        tracker.close()
        region.close()
        assert region.closed


def test_a_forked_child_cannot_use_the_tracker_and_leaves_the_parent_alone() -> None:
    m = mmap.mmap(-1, 8 * PAGE)
    with u.track_writes(m, mechanism="sync") as tracker:
        pid = os.fork()
        if pid == 0:  # the child: refuses, and closing must not touch the parent's threads
            try:
                tracker.written()
                code = 1
            except RuntimeError:
                code = 0
            tracker.close()
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        _core.touch(_addr(m) + PAGE, 1, 1, True)  # still served here
        assert tracker.written() == [(PAGE, PAGE)]
    m.close()


def test_a_dropped_tracker_or_snapshot_lets_the_memory_go(tmp_path: Path) -> None:
    m = mmap.mmap(-1, 8 * PAGE)
    tracker = u.track_writes(m, mechanism="sync")
    del tracker
    u.snapshot(m, tmp_path / "img", wait=False)  # the handle is dropped at once
    with u.track_writes(m, mechanism="async") as again:  # nothing holds the range any more
        assert again.mechanism == "async"
    m.close()  # no view left either


@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_a_numpy_array_written_from_python_is_tracked(mechanism: str, tmp_path: Path) -> None:
    numpy = pytest.importorskip("numpy")
    array_ = numpy.zeros(64 * PAGE, dtype=numpy.uint8)
    with u.track_writes(array_, mechanism=mechanism) as tracker:  # type: ignore[arg-type]
        array_[10 * PAGE + 5] = 7  # under the GIL: a sync WP fault is served natively
        runs = tracker.written()
        assert any(off <= 10 * PAGE + 5 < off + n for off, n in runs)
        assert sum(n for _, n in runs) <= 3 * PAGE  # its page, and the heap's pages around it
    u.snapshot(array_, tmp_path / "img")
    assert (tmp_path / "img").read_bytes() == array_.tobytes()


def test_a_pageserver_closed_during_a_snapshot_finishes_it_first(tmp_path: Path) -> None:
    server = u.PageServer()
    region = server.map(8192 * PAGE, u.Fill(b"q"))
    _core.touch(region.address, len(region), PAGE, False)
    order = random.Random(5).sample(range(8192), 8192)  # every page once, while it is copied
    writer = _writer(region, order)
    snap = region.snapshot(tmp_path / "img", wait=False)
    with pytest.warns(u.DetachWarning, match="still exported"):
        server.close()  # waits for the copy: the engine holds the writes until then
    writer.join(TIMEOUT)
    snap.wait(TIMEOUT)
    _consistent((tmp_path / "img").read_bytes(), [ord("q")] * 8192, order)
    region.close()
