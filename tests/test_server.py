"""The page server: sources, granularity, readahead, both modes, events, errors, lifecycle."""

from __future__ import annotations

import array
import ctypes
import errno
import mmap
import os
import pydoc
import random
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy
import pytest

import userfaultfd as u
from userfaultfd import _core

from .conftest import (
    MADV_DONTNEED,
    MADV_REMOVE,
    MAP_FIXED_NOREPLACE,
    PAGE,
    Caller,
    Toucher,
    anon,
    libc,
    loop_device,
    move,
    run_child,
    wait_for,
)

pytestmark = pytest.mark.needs_uffd
MODES = ["thread", "sigbus"]


@pytest.fixture(params=MODES)
def server(request: pytest.FixtureRequest) -> Iterator[u.PageServer]:
    with u.PageServer(request.param) as s:
        yield s


def settled(region: u.Region, pages: int) -> u.Stats:
    """Stats once `pages` base pages are counted and every fault's latency is recorded (a
    worker takes the latency sample just after waking the faulter)."""

    def done() -> bool:
        stats = region.stats()
        return stats.pages_installed >= pages and sum(stats.histogram) >= stats.faults

    wait_for(done)
    return region.stats()


# ---- sources ----


def test_zero_source_from_python_indexing(server: u.PageServer) -> None:
    region = server.map(8 * PAGE)
    assert region[0] == 0 and region[8 * PAGE - 1] == 0
    assert bytes(region) == bytes(8 * PAGE)  # the main thread faults holding the GIL
    stats = settled(region, 8)
    assert stats.faults_missing == 8 and stats.zero_pages == 8 and stats.bytes_installed == 8 * PAGE
    region.close()


def test_fill_byte_and_pattern(server: u.PageServer) -> None:
    region = server.map(64 * PAGE, u.Fill(0x5A))
    assert numpy.frombuffer(region, dtype=numpy.uint8).min() == 0x5A
    pattern = b"0123456789abc"  # a length that does not divide the page size
    region2 = server.map(64 * PAGE, u.Fill(pattern), readahead=7)
    expected = (pattern * (64 * PAGE // len(pattern) + 1))[: 64 * PAGE]
    assert region2[:] == expected
    with pytest.raises(ValueError, match="256"):
        u.Fill(256)
    with pytest.raises(ValueError, match="empty"):
        u.Fill(b"")


def test_buffer_source_kept_alive_and_zero_past_its_end(server: u.PageServer) -> None:
    data = bytearray(os.urandom(5 * PAGE + 123))
    region = server.map(8 * PAGE, u.Buffer(data), readahead=2)
    with pytest.raises(BufferError):  # the source is exported while served
        data.extend(b"x")
    assert region[: len(data)] == bytes(data)
    assert region[len(data) :] == bytes(8 * PAGE - len(data))
    region.close()
    data.extend(b"x")  # released on close


def test_file_source_with_offset_and_zeros_past_eof(server: u.PageServer, tmp_path: Path) -> None:
    path = tmp_path / "mem.bin"
    content = os.urandom(10 * PAGE + 17)
    path.write_bytes(content)
    offset = 3 * PAGE + 5  # not page aligned
    region = server.map(16 * PAGE, u.File(path, offset=offset), readahead="adaptive")
    tail = content[offset:]
    assert region[: len(tail)] == tail
    assert region[len(tail) :] == bytes(16 * PAGE - len(tail))
    with open(path, "rb") as f:
        by_fd = server.map(4 * PAGE, u.File(f.fileno()))
        assert by_fd[:] == content[: 4 * PAGE]


def test_file_source_refuses_what_is_not_a_file(server: u.PageServer, tmp_path: Path) -> None:
    for path in (tmp_path, Path("/dev/null")):
        with pytest.raises(ValueError, match=f"file {str(path)!r} is not a regular file"):
            server.map(PAGE, u.File(str(path)))
    with pytest.raises(FileNotFoundError, match="nonexistent"):
        server.map(PAGE, u.File(tmp_path / "nonexistent"))


def test_file_source_on_a_fifo_is_refused_without_waiting_for_a_writer(
    server: u.PageServer, tmp_path: Path
) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    mapping = Caller(server.map, PAGE, u.File(fifo))
    try:
        with pytest.raises(ValueError, match=f"file {str(fifo)!r} is not a regular file"):
            mapping.finish()
    finally:
        if mapping.is_alive():  # a blocked open() returns once a writer comes
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))


def test_file_source_on_a_block_device(server: u.PageServer, tmp_path: Path) -> None:
    """A block device's size comes from seeking to its end (its st_size is 0): a snapshot on
    a volume is served, not read as zeros."""
    image = tmp_path / "disk.img"
    content = os.urandom(64 * PAGE)
    image.write_bytes(content)
    with loop_device(image) as device:
        region = server.map(80 * PAGE, u.File(device, offset=PAGE))
        assert region[: 63 * PAGE] == content[PAGE:]
        assert region[63 * PAGE :] == bytes(17 * PAGE)
        region.close()


def test_memfd_source_serves_minor_faults_without_copying(server: u.PageServer) -> None:
    fd = os.memfd_create("src", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, 16 * PAGE)
        data = os.urandom(8 * PAGE)
        os.pwrite(fd, data, 0)  # pages 8..15 are holes
        region = server.map(16 * PAGE, u.Memfd(fd))
        assert region.memory == "shmem"
        assert region[:] == data + bytes(8 * PAGE)
        region[0] = 7  # a write goes to the memfd itself
        assert os.pread(fd, 1, 0) == b"\x07"
        stats = settled(region, 16)
        assert stats.faults_minor >= 1 and stats.faults == stats.faults_minor + stats.faults_missing
    finally:
        region.close()
        os.close(fd)


def test_memfd_holes_between_pages_with_readahead(server: u.PageServer) -> None:
    fd = os.memfd_create("holes", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, 32 * PAGE)
        for k in range(0, 32, 3):  # pages 0, 3, 6, ... in the page cache, the rest holes
            os.pwrite(fd, bytes([k + 1]) * PAGE, k * PAGE)
        region = server.map(32 * PAGE, u.Memfd(fd), readahead=7)
        got = [region[k * PAGE] for k in range(32)]
        assert got == [k + 1 if k % 3 == 0 else 0 for k in range(32)]
        assert settled(region, 32).errors == 0
        region.close()
    finally:
        os.close(fd)


def test_shmem_memory(server: u.PageServer) -> None:
    region = server.map(16 * PAGE, u.Fill(b"sh"), memory="shmem")
    assert region[:4] == b"shsh" and region[16 * PAGE - 2 :] == b"sh"


def test_dontneed_keeps_shmem_pages_and_remove_drops_them(server: u.PageServer) -> None:
    """What the README says: MADV_DONTNEED on shared memory unmaps the page but its file keeps
    it (writes included); MADV_REMOVE drops it, and the source serves it again."""
    for memory, after_dontneed in (("anonymous", b"a"), ("shmem", b"z")):
        region = server.map(4 * PAGE, u.Fill(b"a"), memory=memory)  # type: ignore[arg-type]
        region[0] = ord("z")
        assert Caller(libc.madvise, region.address, PAGE, MADV_DONTNEED).finish() == 0
        assert region[:1] == after_dontneed, memory
        if memory == "shmem":
            assert Caller(libc.madvise, region.address, PAGE, MADV_REMOVE).finish() == 0
            assert region[:1] == b"a"
        region.close()


# ---- granularity and readahead ----


def test_page_size_is_the_unit_installed(server: u.PageServer) -> None:
    region = server.map(64 * PAGE, u.Fill(1), page_size=4 * PAGE)
    _core.touch(region.address + 5 * PAGE, 1, PAGE, False)  # inside the 2nd unit
    stats = settled(region, 4)
    assert stats.faults == 1 and stats.pages_installed == 4
    with pytest.raises(ValueError, match="page_size 12288"):
        server.map(64 * PAGE, page_size=3 * PAGE)
    with pytest.raises(ValueError, match="length 20480"):
        server.map(5 * PAGE, page_size=4 * PAGE)


def test_fixed_readahead_is_clipped_to_unfilled_runs(server: u.PageServer) -> None:
    region = server.map(64 * PAGE, u.Fill(2), readahead=10)
    _core.touch(region.address + 5 * PAGE, 1, PAGE, False)  # installs pages 5..15
    settled(region, 11)
    _core.touch(region.address, 1, PAGE, False)  # installs 0..4, stops at the filled page 5
    stats = settled(region, 16)
    assert stats.faults == 2 and stats.pages_installed == 16 and stats.eexist == 0


def test_adaptive_readahead_grows_on_sequential_streams(server: u.PageServer) -> None:
    pages = 2048  # 8 MiB
    region = server.map(pages * PAGE, u.Fill(3), readahead="adaptive")
    _core.touch(region.address, pages * PAGE, PAGE, False)
    stats = settled(region, pages)
    # one page, then 64 KiB, 128 KiB, ... 4 MiB: about a dozen faults instead of 2048
    assert stats.faults <= 17
    backwards = server.map(pages * PAGE, u.Fill(4), readahead="adaptive")
    order = array.array("I", reversed(range(pages)))
    _core.touch_pages(backwards.address, PAGE, order.tobytes())
    assert settled(backwards, pages).faults <= 17  # memmove copies large blocks from the end


def test_adaptive_readahead_costs_nothing_on_random_faults(server: u.PageServer) -> None:
    """A random fault installs its page alone, as with readahead off: the window opens only
    when a fault continues the last chunk."""
    pages = 2048
    scattered = server.map(pages * PAGE, u.Fill(5), readahead="adaptive")
    order = array.array("I", random.Random(1).sample(range(0, pages, 64), 32))
    _core.touch_pages(scattered.address, PAGE, order.tobytes())
    stats = settled(scattered, 32)
    assert stats.faults == 32 and stats.pages_installed == 32
    # a stream after the jumps: the second fault of it already brings 64 KiB
    _core.touch(scattered.address + 33 * PAGE, 2 * PAGE, PAGE, False)
    assert settled(scattered, 32 + 1 + 16).faults == 34


def test_populate(server: u.PageServer) -> None:
    region = server.map(32 * PAGE, u.Fill(9))
    region.populate(4 * PAGE, 8 * PAGE)
    stats = region.stats()
    assert stats.faults == 0 and stats.pages_installed == 8
    region.populate()
    assert region.stats().pages_installed == 32 and region.stats().faults == 0
    with pytest.raises(ValueError, match="outside"):
        region.populate(31 * PAGE, 2 * PAGE)


def test_kernel_access_in_sigbus_mode_needs_populate() -> None:
    with u.PageServer("sigbus") as server:
        region = server.map(4 * PAGE, u.Fill(b"k"))
        r, w = os.pipe()
        with pytest.raises(OSError) as info:
            os.write(w, memoryview(region)[:PAGE])  # the kernel reads: no fault, EFAULT
        assert info.value.errno == errno.EFAULT
        region.populate(0, PAGE)
        assert os.write(w, memoryview(region)[:PAGE]) == PAGE
        assert os.read(r, PAGE) == b"k" * PAGE
        os.close(r), os.close(w)


INTERRUPT_CHILD = textwrap.dedent(
    """
    import sys, time
    import userfaultfd as u
    with u.PageServer(sys.argv[1]) as server:
        region = server.map(96 << 30)  # zero pages: seconds to install, no memory used
        print("populating", flush=True)
        try:
            region.populate()
        except KeyboardInterrupt:
            print(time.monotonic(), flush=True)
        done = region.stats().pages_installed
        assert 0 < done < len(region) // u.PAGE_SIZE, done  # what was installed stays
        region.populate(0, 1 << 30)  # and the server is still usable
    print("OK", flush=True)
    """
)


@pytest.mark.parametrize("mode", MODES)
def test_ctrl_c_interrupts_populate_promptly(mode: str) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", INTERRUPT_CHILD, mode], stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == "populating\n"
        time.sleep(0.3)
        sent = time.monotonic()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0 and out.endswith("OK\n"), err
    latency = float(out.split()[0]) - sent  # CLOCK_MONOTONIC is the same in both processes
    assert latency < 0.3, f"KeyboardInterrupt came {latency:.3f} s after SIGINT"


def test_populate_shows_progress_when_asked(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "tqdm", None)  # the plain stderr line
    with u.PageServer("thread") as server:
        region = server.map(3 << 30)
        region.populate(progress=True)
        region.populate(0, 1 << 20)  # quiet unless asked
    lines = capsys.readouterr().err.splitlines()
    assert lines[-1] == "populate: 3072 of 3072 MiB (100%)", lines
    assert all(line.startswith("populate: ") for line in lines)


def test_populate_progress_uses_tqdm_when_installed(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("tqdm")
    with u.PageServer("thread") as server:
        server.map(64 << 20).populate(progress=True)
    last = capsys.readouterr().err.rstrip().split("\r")[-1]
    assert last.startswith("populate: 100%") and "64.0M/64.0M" in last, last


def test_readme_pattern_for_system_calls_on_sigbus_regions_works() -> None:
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    block = readme.split("<!-- example: sigbus-syscalls")[1].split("```python\n")[1]
    proc = run_child(block.split("```")[0])
    assert proc.returncode == 0, proc.stderr


def test_efault_from_an_unpopulated_sigbus_region_names_the_fix() -> None:
    """A COPY whose source is an unpopulated sigbus-mode region: the kernel reads it, no fault."""
    with u.PageServer("sigbus") as server, u.Userfaultfd() as uffd:
        source = server.map(PAGE, u.Fill(b"s"))
        target = anon(1)
        uffd.register(target.address, PAGE)
        with pytest.raises(OSError, match=r"sigbus-mode region, populate\(\) that range") as e:
            uffd.copy(target.address, source, PAGE)
        assert e.value.errno == errno.EFAULT
        source.populate()
        assert uffd.copy(target.address, source, PAGE) == PAGE
        assert target[:] == b"s" * PAGE
        target.close()
        # the engine says the same when a Buffer source is such a region
        copy = server.map(PAGE, u.Buffer(server.map(PAGE, u.Fill(b"t"))))
        with pytest.raises(u.SourceError, match="unpopulated sigbus-mode region"):
            copy.populate()


@pytest.mark.kernel_faults
def test_kernel_access_in_thread_mode_is_served() -> None:
    with u.PageServer("thread") as server:
        region = server.map(4 * PAGE, u.Fill(b"t"))
        r, w = os.pipe()
        assert os.write(w, memoryview(region)[:PAGE]) == PAGE
        assert os.read(r, PAGE) == b"t" * PAGE
        os.close(r), os.close(w)


# ---- concurrency ----


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("readahead", [0, 3, "adaptive"])
def test_bounce(mode: str, readahead: int | str) -> None:
    """uffd-stress in spirit: threads increment per-page counters in random and sequential order
    while faults race with background populates and a Python reader; every page is checked."""
    pages, threads, rounds = 512, 4, 4
    rng = random.Random(7)
    initial = bytes(i % 251 for i in range(pages))
    source = bytearray(pages * PAGE)
    source[::PAGE] = initial
    with u.PageServer(mode, workers=2) as server:  # type: ignore[arg-type]
        for _ in range(rounds):
            region = server.map(pages * PAGE, u.Buffer(source), readahead=readahead)  # type: ignore[arg-type]
            orders = [array.array("I", rng.sample(range(pages), pages)) for _ in range(threads)]
            orders.append(array.array("I", range(pages)))
            workers = [
                Caller(_core.touch_pages, region.address, PAGE, o.tobytes(), True) for o in orders
            ]
            filler = Caller(region.populate, (pages // 2) * PAGE, (pages // 4) * PAGE)
            reader = [region[i * PAGE + 1] for i in rng.sample(range(pages), 64)]  # holds the GIL
            for w in workers:
                w.finish(30)
            filler.finish(30)
            assert set(reader) == {0}
            got = numpy.frombuffer(region, dtype=numpy.uint8)[::PAGE].copy()
            expected = (
                numpy.frombuffer(initial, dtype=numpy.uint8).astype(int) + threads + 1
            ) % 256
            assert (got == expected).all(), numpy.nonzero(got != expected)
            del got
            stats = settled(region, pages)
            assert stats.pages_installed == pages and stats.errors == 0
            region.close()


@pytest.mark.parametrize("mode", MODES)
def test_reads_stay_correct_while_pages_are_dropped(mode: str) -> None:
    """Readers check every page they read against the source while another thread drops random
    ranges (MADV_DONTNEED) over and over: refills race with faults, readahead and REMOVE events."""
    pages = 256
    content = b"".join(bytes([k % 251 + 1]) * PAGE for k in range(pages))
    with u.PageServer(mode, workers=2) as server:  # type: ignore[arg-type]
        region = server.map(pages * PAGE, u.Buffer(content), readahead="adaptive")
        stop = time.monotonic() + 1.0

        def read(seed: int) -> list[tuple[int, int, int]]:
            rng, wrong = random.Random(seed), []
            while time.monotonic() < stop:
                k = rng.randrange(pages)
                n = min(rng.randint(1, 16), pages - k)
                got = _core.touch(region.address + k * PAGE, n * PAGE, PAGE, False)
                if got != sum(content[k * PAGE : (k + n) * PAGE : PAGE]):
                    wrong.append((k, n, got))
            return wrong

        def drop(seed: int) -> int:
            rng, count = random.Random(seed), 0
            while time.monotonic() < stop:
                k = rng.randrange(pages)
                n = min(rng.randint(1, 32), pages - k)
                assert libc.madvise(region.address + k * PAGE, n * PAGE, MADV_DONTNEED) == 0
                count += 1
            return count

        readers = [Caller(read, seed) for seed in (1, 2)]
        dropper = Caller(drop, 3)
        assert [r.finish(30) for r in readers] == [[], []]
        drops = dropper.finish(30)
        # madvise returns once its REMOVE event has been read; the worker counts it just after.
        deadline = time.monotonic() + 5
        while server.events()["remove"] < drops and time.monotonic() < deadline:
            time.sleep(0.001)
        assert drops > 0 and server.events()["remove"] == drops
        assert bytes(region) == content
        assert region.stats().errors == 0


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("memory", ["anonymous", "shmem"])
@pytest.mark.parametrize(("units", "readahead"), [(1, 0), (1, "adaptive"), (4, 2), (4, "adaptive")])
def test_random_operations_against_a_model(
    mode: str, memory: str, units: int, readahead: int | str
) -> None:
    """Random writes, drops (of any page range, cutting units: MADV_DONTNEED, or MADV_REMOVE
    for shared memory), populates and reads, each read checked against a model: a dropped page
    reads from the source again."""
    pages, rng = 256, random.Random(f"{mode}{memory}{units}{readahead}")
    content = bytes(rng.randrange(256) for _ in range(pages)) * PAGE
    written: dict[int, int] = {}
    drop = MADV_DONTNEED if memory == "anonymous" else MADV_REMOVE
    with u.PageServer(mode) as server:  # type: ignore[arg-type]
        region = server.map(
            pages * PAGE,
            u.Buffer(content),
            memory=memory,  # type: ignore[arg-type]
            page_size=units * PAGE,
            readahead=readahead,  # type: ignore[arg-type]
        )

        def expect(page: int) -> int:
            return written.get(page, content[page * PAGE + 1])

        for _ in range(400):
            op, page = rng.randrange(4), rng.randrange(pages)
            count = min(rng.randint(1, 9), pages - page)
            if op == 0:
                written[page] = rng.randrange(256)
                region[page * PAGE + 1] = written[page]
            elif op == 1:
                addr = region.address + page * PAGE
                assert libc.madvise(addr, count * PAGE, drop) == 0
                for k in range(page, page + count):
                    written.pop(k, None)
            elif op == 2:
                region.populate(page * PAGE, count * PAGE)
            else:
                assert [region[k * PAGE + 1] for k in range(page, page + count)] == [
                    expect(k) for k in range(page, page + count)
                ]
        assert bytes(region[1::PAGE]) == bytes(expect(k) for k in range(pages))
        assert region.stats().errors == 0


def test_duplicate_faults_from_signals_are_harmless() -> None:
    """A signal makes a blocked faulter fault again: the duplicate message ends in EEXIST."""
    with u.PageServer("thread", workers=1) as server:
        region = server.map(256 * PAGE, u.Fill(1))
        stop = threading.Event()
        signal.signal(signal.SIGUSR1, lambda *a: None)
        toucher = Toucher(region.address, 256 * PAGE)

        def pester() -> None:
            while not stop.is_set() and toucher.native_id:
                try:
                    signal.pthread_kill(toucher.ident, signal.SIGUSR1)  # type: ignore[arg-type]
                except ProcessLookupError:
                    return

        pest = threading.Thread(target=pester, daemon=True)
        pest.start()
        assert toucher.finish() == 256
        stop.set()
        pest.join(5)
        assert region.stats().errors == 0


# ---- non-cooperative events ----


def test_remove_serves_pages_again_from_the_source(server: u.PageServer) -> None:
    region = server.map(8 * PAGE, u.Fill(b"r"))
    region[0:8] = b"modified"
    region[4 * PAGE] = 0
    assert Caller(libc.madvise, region.address, 8 * PAGE, MADV_DONTNEED).finish() == 0
    assert region[0:8] == b"rrrrrrrr" and region[4 * PAGE] == ord("r")
    assert server.events()["remove"] == 1
    wait_for(lambda: region.stats().removes == 1)


def test_remove_of_part_of_a_unit_serves_the_rest_of_it(server: u.PageServer) -> None:
    """A unit of 4 pages with one page dropped: the refill skips the 3 present pages."""
    region = server.map(16 * PAGE, u.Fill(b"p"), page_size=4 * PAGE)
    assert bytes(region) == b"p" * 16 * PAGE
    region[5 * PAGE] = ord("x")  # page 5: the second page of unit 1
    assert Caller(libc.madvise, region.address + 5 * PAGE, PAGE, MADV_DONTNEED).finish() == 0
    result = Caller(_core.touch, region.address + 5 * PAGE, 1, 1, False)
    assert result.finish() == ord("p")
    assert region[4 * PAGE] == region[6 * PAGE] == ord("p")


def test_remove_with_zero_policy_reads_fresh_zero_pages() -> None:
    with u.PageServer("thread", on_remove="zero") as server:
        region = server.map(4 * PAGE, u.Fill(b"z"))
        assert region[0] == ord("z")
        assert Caller(libc.madvise, region.address, 4 * PAGE, MADV_DONTNEED).finish() == 0
        assert region[:] == bytes(4 * PAGE)


def test_unmap_stops_serving_and_close_unmaps_exactly_once(server: u.PageServer) -> None:
    region = server.map(8 * PAGE, u.Fill(b"u"))
    addr = region.address
    assert Caller(libc.munmap, addr, 8 * PAGE).finish() == 0  # behind the region's back
    wait_for(lambda: not server._engine.pieces(region.id))
    assert server.events()["unmap"] == 1
    # something else now lives there; closing the region must not unmap it
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_FIXED_NOREPLACE
    got = libc.mmap(addr, PAGE, mmap.PROT_READ | mmap.PROT_WRITE, flags, -1, 0)
    assert got == addr  # MAP_FIXED_NOREPLACE succeeded: the range really was free
    region.close()
    ctypes.memset(addr, 1, PAGE)  # still mapped: would crash if close had unmapped it
    libc.munmap(addr, PAGE)


def test_remap_follows_the_region(server: u.PageServer) -> None:
    region = server.map(8 * PAGE, u.Fill(b"m"))
    assert region[0] == ord("m")  # page 0 installed before the move, the rest not
    new = move(region.address, 8 * PAGE)
    assert _core.touch(new, 8 * PAGE, PAGE, False) == 8 * ord("m")  # served at the new address
    assert server.events()["remap"] == 1
    region.close()  # unmaps at the new address
    assert f"{new:x}-" not in Path("/proc/self/maps").read_text()


def _mapped(addr: int) -> bool:
    """Whether a page is mapped at addr (msync fails with ENOMEM on a hole)."""
    return libc.msync(addr, PAGE, 0) == 0


def test_partial_munmap_then_close_leaves_the_newcomer_alone(server: u.PageServer) -> None:
    region = server.map(8 * PAGE, u.Fill(b"p"))
    addr = region.address
    assert Caller(libc.munmap, addr + 4 * PAGE, 4 * PAGE).finish() == 0  # the tail, by hand
    wait_for(lambda: [p[:2] for p in server._engine.pieces(region.id)] == [(addr, addr + 4 * PAGE)])
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_FIXED_NOREPLACE
    got = libc.mmap(addr + 4 * PAGE, PAGE, mmap.PROT_READ | mmap.PROT_WRITE, flags, -1, 0)
    assert got == addr + 4 * PAGE
    assert region[PAGE] == ord("p")  # the head is still served
    region.close()
    assert not _mapped(addr) and _mapped(addr + 4 * PAGE)
    ctypes.memset(addr + 4 * PAGE, 1, PAGE)
    libc.munmap(addr + 4 * PAGE, PAGE)


def test_partial_mremap_serves_both_pieces_and_close_unmaps_both(server: u.PageServer) -> None:
    region = server.map(8 * PAGE, u.Fill(b"h"))
    old = region.address
    new = move(old + 4 * PAGE, 4 * PAGE)
    assert _core.touch(new, 4 * PAGE, PAGE, False) == 4 * ord("h")  # the tail, at its new place
    assert region[: 4 * PAGE] == b"h" * 4 * PAGE  # the head, where it was
    pieces = sorted(p for p in server._engine.pieces(region.id))
    assert pieces == sorted([(old, old + 4 * PAGE, 0), (new, new + 4 * PAGE, 4 * PAGE)])
    region.close()
    assert not _mapped(old) and not _mapped(new)


def test_mremap_inside_a_unit_then_populate_installs_every_piece(server: u.PageServer) -> None:
    """Moving pages 2-5 of two 4-page units splits both: each piece is served on its own."""
    region = server.map(8 * PAGE, u.Buffer(bytes(range(8)) * 4 * PAGE), page_size=4 * PAGE)
    new = move(region.address + 2 * PAGE, 4 * PAGE)
    wait_for(lambda: len(server._engine.pieces(region.id)) == 3)
    region.populate()
    assert region.stats().pages_installed == 8 and region.stats().faults_missing == 0
    assert bytes(region[: 2 * PAGE]) == (bytes(range(8)) * 4 * PAGE)[: 2 * PAGE]
    want = (bytes(range(8)) * 4 * PAGE)[2 * PAGE : 6 * PAGE]
    assert ctypes.string_at(new, 4 * PAGE) == want
    region.close()


# ---- VMA splits: one fill must lie in one VMA ----

SPLIT_CHILD = textwrap.dedent(
    """
    import array, ctypes, mmap, sys
    import userfaultfd as u
    from userfaultfd import _core
    P = u.PAGE_SIZE
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    data = b"".join(bytes([k]) * P for k in range(32))
    with u.PageServer(sys.argv[1]) as server:
        # readahead 2..9 crosses the split at 4 (and at 8): each piece is filled on its own
        a = server.map(32 * P, u.Buffer(data), readahead=7)
        _core.madvise(a.address + 4 * P, 4 * P, mmap.MADV_DONTDUMP)
        assert _core.touch(a.address + 2 * P, 8 * P, P, False) == sum(range(2, 10))
        assert a[:] == data
        # adaptive readahead running backwards over a split
        b = server.map(32 * P, u.Buffer(data), readahead="adaptive")
        assert libc.mprotect(b.address + 13 * P, 3 * P, mmap.PROT_READ) == 0
        order = array.array("I", reversed(range(32)))
        _core.touch_pages(b.address, P, order.tobytes())
        assert b[:] == data
        # populate crosses the splits too, and installs every page
        c = server.map(32 * P, u.Buffer(data))
        assert libc.mprotect(c.address + 10 * P, 3 * P, mmap.PROT_READ) == 0
        _core.madvise(c.address + 20 * P, P, mmap.MADV_DONTDUMP)
        c.populate()
        assert c.stats().pages_installed == 32 and c.stats().faults == 0, c.stats()
        assert c[:] == data
    print("OK", flush=True)
    """
)


@pytest.mark.parametrize("mode", MODES)
def test_a_fill_crossing_a_vma_split_installs_each_piece(mode: str) -> None:
    """mprotect or madvise(MADV_DONTDUMP) on part of a region splits its VMA; a COPY must lie
    in one VMA (ENOENT otherwise). Before the fix the faulter looped forever."""
    proc = subprocess.run(
        [sys.executable, "-c", SPLIT_CHILD, mode], capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 0 and proc.stdout == "OK\n", proc.stderr


# ---- errors: never wrong data ----


@pytest.mark.kernel_faults
def test_file_that_shrank_poisons_pages_and_reports(tmp_path: Path) -> None:
    path = tmp_path / "shrinks.bin"
    path.write_bytes(os.urandom(16 * PAGE))
    with u.PageServer("thread") as server:
        region = server.map(16 * PAGE, u.File(path))
        assert region[0] == path.read_bytes()[0]
        os.truncate(path, 2 * PAGE)
        r, w = os.pipe()
        with pytest.raises(OSError) as info:  # a kernel access gets EFAULT from the poison
            os.write(w, memoryview(region)[8 * PAGE : 9 * PAGE])
        assert info.value.errno == errno.EFAULT
        with pytest.raises(u.SourceError) as err:
            region.stats()
            server.map(PAGE)
        assert "poisoned" in str(err.value) and "offset 0x8000" in str(err.value)
        assert err.value.failures[0][0] == errno.EFAULT
        assert region.stats().poisoned >= 1
        with pytest.raises(u.SourceError):
            region.populate(10 * PAGE, PAGE)
        os.close(r), os.close(w)
        region.close()


SHRINK_CHILD = textwrap.dedent(
    """
    import os, sys
    import userfaultfd as u
    path = sys.argv[1]
    with u.PageServer(sys.argv[2]) as server:
        region = server.map(16 * u.PAGE_SIZE, u.File(path))
        os.truncate(path, 0)
        print("touching", flush=True)
        region[8 * u.PAGE_SIZE]
        print("read wrong data", flush=True)
    """
)


@pytest.mark.parametrize("mode", MODES)
def test_toucher_of_a_lost_page_gets_sigbus(mode: str, tmp_path: Path) -> None:
    path = tmp_path / "lost.bin"
    path.write_bytes(b"x" * 16 * PAGE)
    proc = run_child(SHRINK_CHILD, str(path), mode)
    assert proc.stdout == "touching\n"
    assert proc.returncode == -signal.SIGBUS
    # one line before the process dies: where, which region and offset, what failed
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith("userfaultfd:")]
    assert "fatal SIGBUS at 0x" in line and f"region 0 File({str(path)!r}, offset=0)" in line
    assert "offset 0x8000" in line and "EFAULT" in line and "UFFDIO_COPY" in line, line


REMAP_RACE_CHILD = textwrap.dedent(
    """
    import ctypes, mmap, threading, time
    import userfaultfd as u
    from userfaultfd import _core
    PAGE = u.PAGE_SIZE
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mremap.restype = ctypes.c_void_p
    libc.mremap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int,
                            ctypes.c_void_p]
    libc.msync.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    uffd = u.Userfaultfd(u.Feature.EVENT_REMAP | u.Feature.EVENT_UNMAP | u.Feature.POISON)
    anon = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
    region, target = _core.Mapping(4 * PAGE, anon), _core.Mapping(4 * PAGE, anon)
    old, new = region.address, target.address
    target._rebase(0)
    uffd.register(old, 4 * PAGE)
    pattern = b"m"
    engine = _core.Engine(uffd.fileno(), mode=0, workers=1, remove_policy=0, base_page=PAGE,
                          spin_ns=0)
    engine.add_region(start=old, length=4 * PAGE, page_size=PAGE, kind=2,
                      base=_core.buffer_address(pattern)[0], base_len=1, tail=0,
                      can_zeropage=1, readahead=0, adaptive_min=0, adaptive_max=0, label=None)
    # mremap blocks until its REMAP event is read; the engine is not started yet
    args = (old, 4 * PAGE, 4 * PAGE, 3, new)
    threading.Thread(target=libc.mremap, args=args, daemon=True).start()
    deadline = time.monotonic() + 10
    while libc.msync(new, PAGE, 0) != 0 and time.monotonic() < deadline:
        time.sleep(0.001)
    got = []
    toucher = threading.Thread(
        target=lambda: got.append(_core.touch(new, PAGE, PAGE, False)), daemon=True
    )
    toucher.start()  # faults at the new address: its message is read before the event
    time.sleep(0.2)
    engine.start()
    toucher.join(10)
    print(got, engine.errors(0)[1], flush=True)
    engine.close()
    """
)


def test_fault_read_before_its_remap_event_is_served_at_the_new_address() -> None:
    """The kernel hands out queued faults before queued events: a fault at the new address of
    an mremap can come in the same read as the REMAP event, ahead of it."""
    proc = run_child(REMAP_RACE_CHILD)
    assert (proc.returncode, proc.stdout) == (0, f"[{ord('m')}] []\n"), proc.stderr


LATE_HANDLER_CHILD = textwrap.dedent(
    """
    import faulthandler
    import userfaultfd as u
    faulthandler.disable()
    with u.PageServer("sigbus") as server:
        region = server.map(4 * u.PAGE_SIZE, u.Fill(b"f"))
        print(chr(region[0]), flush=True)
        faulthandler.enable()  # now SIGBUS reaches faulthandler first
        try:
            server.map(u.PAGE_SIZE)
        except RuntimeError as e:
            print(e, flush=True)
    """
)


def test_a_sigbus_handler_installed_after_the_server_is_reported() -> None:
    proc = run_child(LATE_HANDLER_CHILD)
    assert proc.returncode == 0, proc.stderr
    first, message = proc.stdout.splitlines()
    assert first == "f" and "another SIGBUS handler was installed after this server" in message
    assert "faulthandler.enable()" in message


LATE_HANDLER_FAULT_CHILD = textwrap.dedent(
    """
    import faulthandler, signal, sys, time
    import userfaultfd as u
    faulthandler.disable()
    with u.PageServer("sigbus") as server:
        region = server.map(4 * u.PAGE_SIZE, u.Fill(b"f"))
        print(chr(region[0]), flush=True)
        if sys.argv[1] == "python":
            signal.signal(signal.SIGBUS, lambda *_: print("python handler", flush=True))
        else:
            faulthandler.enable()
            time.sleep(1.0)  # the server notices it within 100 ms
        region[u.PAGE_SIZE]  # the main thread, holding the GIL: the Python handler never runs
        print("read the page", flush=True)
    """
)


@pytest.mark.parametrize("late", ["python", "faulthandler"])
def test_a_sigbus_handler_installed_after_map_fails_the_next_fault_loudly(late: str) -> None:
    """Before the fix a Python handler made the next fault spin at 100% CPU for ever (it returns
    and the access faults again); faulthandler reported a plain fatal Bus error."""
    proc = subprocess.run(
        [sys.executable, "-c", LATE_HANDLER_FAULT_CHILD, late], capture_output=True, text=True,
        timeout=30,
    )  # fmt: skip
    assert proc.stdout == "f\n" and proc.returncode == -signal.SIGBUS
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith("userfaultfd: fatal SIGBUS")]
    assert "a SIGBUS handler installed after the sigbus-mode PageServer started" in line
    assert "region 0 Fill(b'f') at offset 0x1000" in line and "mode='thread'" in line, line
    if late == "faulthandler":
        assert "Fatal Python error: Bus error" in proc.stderr  # its traceback comes too


CHAIN_CHILD = textwrap.dedent(
    """
    import faulthandler, mmap, os, sys
    faulthandler.enable()
    import userfaultfd as u
    with u.PageServer("sigbus") as server:
        region = server.map(4 * u.PAGE_SIZE, u.Fill(b"c"))
        assert region[0] == ord("c")
        f = open(sys.argv[1], "r+b")
        m = mmap.mmap(f.fileno(), 2 * u.PAGE_SIZE)
        os.truncate(sys.argv[1], 0)
        print("ours served; touching a truncated file", flush=True)
        m[u.PAGE_SIZE]
    """
)


def test_sigbus_handler_chains_to_the_previous_one(tmp_path: Path) -> None:
    path = tmp_path / "t.bin"
    path.write_bytes(b"x" * 2 * PAGE)
    proc = run_child(CHAIN_CHILD, str(path))
    assert proc.stdout == "ours served; touching a truncated file\n"
    assert "Fatal Python error: Bus error" in proc.stderr  # faulthandler ran
    assert proc.returncode == -signal.SIGBUS


# ---- validation, stats, lifecycle ----


def test_bad_arguments_name_the_value(server: u.PageServer) -> None:
    with pytest.raises(ValueError, match="mode 'fast'"):
        u.PageServer("fast")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="workers 0"):
        u.PageServer(workers=0)
    with pytest.raises(ValueError, match="length 100"):
        server.map(100)
    with pytest.raises(ValueError, match="memory 'disk'"):
        server.map(PAGE, memory="disk")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="readahead -1"):
        server.map(PAGE, readahead=-1)
    with pytest.raises(TypeError, match="not a userfaultfd.sources.Source"):
        server.map(PAGE, b"x")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="file offset -1"):
        u.File("x", offset=-1)
    with pytest.raises(FileNotFoundError, match="file '/nonexistent/file' does not exist"):
        server.map(PAGE, u.File("/nonexistent/file"))


def test_wrong_types_are_type_errors_naming_the_value(server: u.PageServer) -> None:
    with pytest.raises(TypeError, match="length '4096' is a str, not an int"):
        server.map("4096")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="page_size 4096.0 is a float"):
        server.map(PAGE, page_size=4096.0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="fill pattern 'x' is a str: give a byte value"):
        u.Fill("x")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="buffer source 'x' is a str, not a bytes-like"):
        u.Buffer("x")
    with pytest.raises(TypeError, match="file offset '0' is a str"):
        u.File("x", offset="0")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="workers '2' is a str"):
        u.PageServer(workers="2")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="populate offset '0' is a str"):
        server.map(PAGE).populate("0")  # type: ignore[arg-type]
    assert u.Fill(bytearray(b"ab")).pattern == b"ab"


def test_a_closed_server_or_region_says_so(server: u.PageServer) -> None:
    region = server.map(PAGE)
    region.close()
    for call in (region.stats, region.populate):
        with pytest.raises(ValueError, match=f"region {region.id} is closed"):
            call()
    kept = server.map(PAGE)
    server.close()
    for call in (lambda: server.map(PAGE), server.stats, server.events, kept.stats):
        with pytest.raises(ValueError, match=r"PageServer is closed|region \d+ is closed"):
            call()


def test_help_shows_the_public_api_only_and_stats_repr_is_short(server: u.PageServer) -> None:
    text = pydoc.render_doc(u.Region, renderer=pydoc.plaintext)
    methods = set(re.findall(r"^ \|  ([a-z]\w*)\(", text, re.MULTILINE))
    assert methods == {"close", "populate", "snapshot", "stats", "track_writes", "working_set"}, (
        methods
    )
    region = server.map(4 * PAGE)
    bytes(region)
    text = repr(settled(region, 4))
    assert text.startswith("Stats(faults_missing=4,") and "latency_p99_ns=" in text
    assert "histogram" not in text and len(text) < 300


def test_stats_count_a_page_before_its_toucher_resumes(server: u.PageServer) -> None:
    region = server.map(32 * PAGE, u.Fill(1))
    for k in range(32):
        assert region[k * PAGE] == 1
        assert region.stats().pages_installed == k + 1  # no waiting: exact when the read returns


def test_stats_latency_and_totals(server: u.PageServer) -> None:
    a = server.map(16 * PAGE, u.Fill(1))
    b = server.map(16 * PAGE)
    _core.touch(a.address, 16 * PAGE, PAGE, False)
    _core.touch(b.address, 16 * PAGE, PAGE, False)
    sa, sb = settled(a, 16), settled(b, 16)
    assert sa.faults == 16 and sa.zero_pages == 0 and sb.zero_pages == 16
    assert 0 < sa.latency_p50_ns <= sa.latency_p99_ns < 10**9
    total = server.stats()
    assert total.faults == 32 and total.bytes_installed == 32 * PAGE
    assert "p50" in str(total) and sum(total.histogram) == 32


def test_close_joins_engine_threads_and_region_close_refuses_exported() -> None:
    before = set(os.listdir("/proc/self/task"))
    server = u.PageServer("thread", workers=3)
    assert len(set(os.listdir("/proc/self/task")) - before) == 3
    region = server.map(4 * PAGE, u.Fill(1))
    view = memoryview(region)
    with pytest.raises(BufferError, match="exported"):
        region.close()
    assert view[0] == 1  # still served
    view.release()
    region.close()
    region.close()  # idempotent
    server.close()
    assert set(os.listdir("/proc/self/task")) == before
    assert server.closed


def test_close_with_exported_regions_detaches_them() -> None:
    server = u.PageServer("thread")
    region = server.map(8 * PAGE, u.Fill(b"d"))
    view = memoryview(region)
    with pytest.warns(u.DetachWarning, match="detaching"):
        server.close()
    assert bytes(view) == b"d" * 8 * PAGE  # every page installed, then unregistered
    view.release()
    region.close()


DETACH_CHILD = textwrap.dedent(
    """
    import numpy, userfaultfd as u
    with u.PageServer() as server:
        array = numpy.frombuffer(server.map(64 * u.PAGE_SIZE, u.Fill(b"w")), dtype=numpy.uint8)
    print(chr(array[-1]))
    """
)


def test_leaving_a_server_with_a_live_view_warns_visibly_by_default() -> None:
    """The install of every page is no silent cost: the warning shows under default filters."""
    proc = run_child(DETACH_CHILD)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "w\n"
    assert "DetachWarning" in proc.stderr and "installing every page" in proc.stderr
    assert proc.stderr.startswith("<string>:3: DetachWarning")  # the user's with statement


def test_close_detach_error_does_not_count_a_buffer_source_of_its_own() -> None:
    """A region that is another region's Buffer source is exported by that one, which the
    close releases first: no live view of the user's, nothing to refuse or to detach."""
    server = u.PageServer("thread")
    source = server.map(4 * PAGE, u.Fill(b"b"))
    copy = server.map(4 * PAGE, u.Buffer(source))
    assert copy[:4] == b"bbbb"
    server.close(detach="error")
    assert source.closed and copy.closed


def test_close_detach_error_raises_before_closing_anything() -> None:
    server = u.PageServer("thread")
    region = server.map(8 * PAGE, u.Fill(b"e"))
    other = server.map(8 * PAGE, u.Fill(b"o"))
    view = memoryview(region)
    with pytest.raises(BufferError, match=r"1 region\(s\) still exported.*1 buffer"):
        server.close(detach="error")
    assert not server.closed and not other.closed
    assert Toucher(other.address, 8 * PAGE).finish() == 8 * ord("o")  # still served
    assert view[-1] == ord("e")
    with pytest.raises(ValueError, match="detach 'later'"):
        server.close(detach="later")  # type: ignore[arg-type]
    view.release()
    server.close(detach="error")
    assert server.closed and region.closed and other.closed


@pytest.mark.parametrize("mode", MODES)
def test_close_while_faults_are_pending_on_an_exported_region(mode: str) -> None:
    """A thread faults its way through a region while the server closes: the detach installs
    every page and unregisters; the toucher reads correct data to the end, nothing hangs."""
    pages = 4096
    server = u.PageServer(mode)  # type: ignore[arg-type]
    region = server.map(pages * PAGE, u.Fill(b"c"))
    view = memoryview(region)
    toucher = Caller(_core.touch, region.address, pages * PAGE, PAGE, False)
    with pytest.warns(u.DetachWarning, match="detaching"):
        server.close()
    assert toucher.finish(30) == pages * ord("c")
    assert view[-1] == ord("c")
    view.release()
    region.close()


EXIT_CHILD = textwrap.dedent(
    """
    import sys, userfaultfd as u
    server = u.PageServer(sys.argv[1])
    region = server.map(64 * u.PAGE_SIZE, u.Fill(b"e"))
    view = memoryview(region)
    print(chr(view[5]), flush=True)
    # exit without closing anything
    """
)


FORK_CHILD = textwrap.dedent(
    """
    import os, signal, sys
    import userfaultfd as u
    with u.PageServer(sys.argv[1]) as server:
        for memory in ("anonymous", "shmem"):
            region = server.map(4 * u.PAGE_SIZE, u.Fill(b"s"), memory=memory)
            pid = os.fork()
            if pid == 0:  # the region is not inherited: no zeros here, no zero page for the parent
                os.write(1, b"child read %d\\n" % region[0])
                os._exit(0)
            _, status = os.waitpid(pid, 0)
            killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGSEGV
            print(memory, "child killed by SIGSEGV" if killed else status, chr(region[0]))
            region.close()
    """
)


@pytest.mark.parametrize("mode", MODES)
def test_forked_children_do_not_inherit_regions(mode: str) -> None:
    """Unregistered in a child, a region would read zeros there; with shared memory the zero
    pages the child allocates would be what the parent reads too."""
    proc = run_child(FORK_CHILD, mode)
    assert proc.stdout.splitlines() == [
        "anonymous child killed by SIGSEGV s",
        "shmem child killed by SIGSEGV s",
    ], proc.stderr


FORK_EXIT_CHILD = textwrap.dedent(
    """
    import os, sys, threading
    import userfaultfd as u
    from userfaultfd import _core
    PAGE = u.PAGE_SIZE
    server = u.PageServer(sys.argv[1])
    region = server.map(64 * PAGE, u.Fill(b"p"))
    remote = u.PythonSourceServer(lambda offset, length: b"q" * length)
    remote_region = remote.map(16 * PAGE)
    pid = os.fork()
    if pid == 0:
        try:
            server.map(PAGE)
        except ValueError as e:
            print("child:", e, flush=True)
        with remote:  # closes this process's copies only
            pass
        sys.exit(0)  # a normal exit: the atexit hook closes the server here too
    os.waitpid(pid, 0)
    got = []
    touch = lambda addr: _core.touch(addr, PAGE, PAGE, False)
    t = threading.Thread(
        target=lambda: got.append((touch(region.address + 8 * PAGE),
                                   touch(remote_region.address + 3 * PAGE))),
        daemon=True,
    )
    t.start()
    t.join(10)
    print("parent:", got, flush=True)
    remote.close()
    server.close()
    """
)


@pytest.mark.parametrize("mode", MODES)
def test_a_forked_child_that_exits_leaves_the_parent_serving(mode: str) -> None:
    """The engine's and the watchdog's stop eventfds are shared with a forked child: closing the
    servers there (at its exit) must not stop the parent's threads, nor wait for them."""
    proc = run_child(FORK_EXIT_CHILD, mode)
    lines = proc.stdout.splitlines()
    assert len(lines) == 2, proc.stderr
    assert lines[0].startswith("child: this engine serves process ")
    assert lines[0].endswith("a forked child cannot use it")
    assert lines[1] == f"parent: [({ord('p')}, {ord('q')})]", proc.stderr


@pytest.mark.parametrize("mode", MODES)
def test_nothing_hangs_at_interpreter_exit(mode: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", EXIT_CHILD, mode],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "e\n"


@pytest.mark.parametrize("mode", MODES)
def test_regions_added_and_removed_while_serving(mode: str) -> None:
    with u.PageServer(mode) as server:  # type: ignore[arg-type]
        pages = 8192  # the toucher is still faulting while regions come and go
        keep = server.map(pages * PAGE, u.Fill(b"k"))
        toucher = Caller(_core.touch, keep.address, pages * PAGE, PAGE, False)
        for k in range(50):
            r = server.map(4 * PAGE, u.Fill(bytes([k + 1])))
            assert r[PAGE] == k + 1
            r.close()
        assert toucher.finish(30) == pages * ord("k")


def test_several_servers_at_once_and_one_closes_while_the_other_serves() -> None:
    """SIGBUS resolvers of two servers and a thread-mode server share the process: each fault
    finds its own server, and closing one leaves the others serving."""
    pages = 4096
    with u.PageServer("sigbus") as keep, u.PageServer("thread") as threaded:
        a = keep.map(pages * PAGE, u.Fill(b"a"))
        b = threaded.map(pages * PAGE, u.Fill(b"b"))
        touchers = [Caller(_core.touch, r.address, pages * PAGE, PAGE, False) for r in (a, b)]
        for k in range(10):
            with u.PageServer("sigbus") as brief:
                c = brief.map(64 * PAGE, u.Fill(bytes([k + 1])))
                assert _core.touch(c.address, 64 * PAGE, PAGE, False) == 64 * (k + 1)
        assert [t.finish(30) for t in touchers] == [pages * ord("a"), pages * ord("b")]


def _reserve_huge_pages(n: int) -> Iterator[None]:
    path = Path("/proc/sys/vm/nr_hugepages")
    old = path.read_text()
    try:
        path.write_text(str(n))
    except OSError as e:
        pytest.skip(f"cannot reserve huge pages: {e}")
    try:
        if int(path.read_text()) < n:
            pytest.skip("the kernel could not reserve the huge pages")
        yield
    finally:
        path.write_text(old)


@pytest.fixture
def huge_pages() -> Iterator[None]:
    yield from _reserve_huge_pages(8)


@pytest.mark.skipif(os.geteuid() != 0, reason="reserving huge pages needs root")
@pytest.mark.parametrize("mode", MODES)
def test_hugetlb_regions(mode: str, huge_pages: None, tmp_path: Path) -> None:
    huge = 2 << 20
    path = tmp_path / "h.bin"
    content = os.urandom(huge + 3 * PAGE)
    path.write_bytes(content)
    with u.PageServer(mode) as server:  # type: ignore[arg-type]
        zero = server.map(2 * huge, memory="hugetlb")
        assert zero.page_size == huge and zero[huge + 5] == 0 and zero[0] == 0
        fill = server.map(huge, u.Fill(b"H"), memory="hugetlb")
        assert fill[:4] == b"HHHH"
        backed = server.map(2 * huge, u.File(path), memory="hugetlb")
        assert backed[: len(content)] == content and backed[len(content) :] == bytes(
            2 * huge - len(content)
        )
        assert settled(backed, 1024).faults == 2
        with pytest.raises(ValueError, match="page_size 4096"):
            server.map(huge, memory="hugetlb", page_size=PAGE)


# Registered before userfaultfd is imported, so it runs after the library's own exit hook: a
# view still alive then (a daemon thread reading it) must read the source's bytes, not zeros.
VIEW_AT_EXIT = """
import atexit, sys
views = []
def read_late():
    view = views[0]
    print(sorted({view[k] for k in range(0, len(view), 4096)}))
atexit.register(read_late)
import userfaultfd as u
if sys.argv[1] == "python":
    server = u.PythonSourceServer(lambda offset, length: b"\\x07" * length)
    region = server.map(64 * 4096)
else:
    server = u.PageServer(sys.argv[1])
    region = server.map(64 * 4096, u.Fill(b"\\x07"))
views.append(memoryview(region))
"""


@pytest.mark.parametrize("mode", [*MODES, "python"])
def test_a_view_alive_at_interpreter_exit_still_reads_the_source(mode: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", VIEW_AT_EXIT, mode],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "[7]\n"
