"""Python sources served from a handler process: the application touches memory holding the GIL."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy
import pytest

import userfaultfd as u
from userfaultfd import _core

from .conftest import PAGE, Caller, anon, run_child

pytestmark = pytest.mark.needs_uffd


def page_number(offset: int, length: int) -> bytes:
    """Each page filled with its page number modulo 251."""
    return b"".join(bytes([(offset // PAGE + k) % 251]) * PAGE for k in range(length // PAGE))


@pytest.mark.parametrize("start", ["fork", "spawn"])
def test_function_source_from_the_main_thread(start: str) -> None:
    with u.PythonSourceServer(page_number, start=start) as server:
        region = server.map(64 * PAGE)
        assert region[0] == 0 and region[5 * PAGE + 7] == 5  # faults while holding the GIL
        got = numpy.frombuffer(region, dtype=numpy.uint8)[::PAGE].copy()
        assert got.tolist() == [k % 251 for k in range(64)]
        with_offset = server.map(4 * PAGE, offset=300 * PAGE)
        assert with_offset[:] == page_number(300 * PAGE, 4 * PAGE)
        stats = server.stats()
        assert stats["faults"] >= 68 and stats["pages"] == 68 and stats["errors"] == 0


def test_readahead_asks_the_source_for_more_pages() -> None:
    with u.PythonSourceServer(page_number) as server:
        region = server.map(32 * PAGE, readahead=7)
        assert region[:] == page_number(0, 32 * PAGE)
        stats = server.stats()
        assert stats["faults"] == 4 and stats["pages"] == 32


class Counter:
    """The class form: open and close run in the handler process."""

    def __init__(self, log: Path) -> None:
        self.log = log

    def open(self) -> None:
        self.log.write_text("open\n")

    def read(self, offset: int, length: int) -> bytes:
        return page_number(offset, length)

    def close(self) -> None:
        with self.log.open("a") as f:
            f.write("close\n")


@pytest.mark.parametrize("start", ["fork", "spawn"])
def test_class_source_is_opened_and_closed_in_the_handler(tmp_path: Path, start: str) -> None:
    log = tmp_path / "log"
    server = u.PythonSourceServer(Counter(log), start=start)
    region = server.map(8 * PAGE)
    assert region[3 * PAGE] == 3
    server.close()
    assert log.read_text() == "open\nclose\n"
    assert region.closed


class Unopenable:
    def open(self) -> None:
        raise ConnectionRefusedError("the store is down")

    def read(self, offset: int, length: int) -> bytes:
        return bytes(length)

    def close(self) -> None:
        pass


def test_a_source_that_cannot_open_fails_the_constructor_with_its_traceback() -> None:
    with pytest.raises(u.SourceError, match="open\\(\\) failed") as err:
        u.PythonSourceServer(Unopenable())
    assert "the store is down" in str(err.value) and "in open" in str(err.value)


def test_spawn_needs_a_picklable_source_and_start_is_checked() -> None:
    with pytest.raises(TypeError, match="start='spawn' needs a picklable source"):
        u.PythonSourceServer(lambda offset, length: bytes(length), start="spawn")
    with pytest.raises(ValueError, match="start 'thread' is not 'fork' or 'spawn'"):
        u.PythonSourceServer(page_number, start="thread")


UNIMPORTABLE_CHILD = textwrap.dedent(
    """
    import userfaultfd as u
    def defined_in_main(offset, length):  # pickled as __main__.defined_in_main
        return bytes(length)
    try:
        u.PythonSourceServer(defined_in_main, start="spawn")
    except u.SourceError as e:
        print(str(e).splitlines()[0])
    """
)


def test_a_spawned_handler_that_cannot_unpickle_the_source_is_reported() -> None:
    proc = run_child(UNIMPORTABLE_CHILD)
    assert "the handler could not unpickle the source:" in proc.stdout, proc.stderr
    assert "defined_in_main" in proc.stdout and "cannot be defined in __main__" in proc.stdout


def test_many_threads_fault_at_once() -> None:
    with u.PythonSourceServer(page_number) as server:
        region = server.map(512 * PAGE)
        from userfaultfd import _core

        callers = [Caller(_core.touch, region.address + k * PAGE, 512 * PAGE - k * PAGE, 4 * PAGE,
                          False) for k in range(4)]  # fmt: skip
        for c in callers:
            c.finish(30)
        assert numpy.frombuffer(region, dtype=numpy.uint8)[::PAGE].tolist() == [
            k % 251 for k in range(512)
        ]


def boom(offset: int, length: int) -> bytes:
    if offset >= 2 * PAGE:
        raise RuntimeError(f"cannot produce {offset:#x}")
    return bytes(length)


@pytest.mark.kernel_faults
def test_source_exception_poisons_and_reports_the_traceback() -> None:
    with u.PythonSourceServer(boom) as server:
        region = server.map(4 * PAGE)
        assert region[0] == 0
        r, w = os.pipe()
        with pytest.raises(OSError) as info:  # a kernel access to the poisoned page: EFAULT
            os.write(w, memoryview(region)[2 * PAGE : 3 * PAGE])
        assert info.value.errno == errno.EFAULT
        os.close(r), os.close(w)
        with pytest.raises(u.SourceError) as err:
            server.stats()
        text = str(err.value)
        assert "RuntimeError('cannot produce 0x2000')" in text
        assert "Traceback (most recent call last)" in text and "in boom" in text
        assert err.value.failures[0][1] == region.address + 2 * PAGE


def exits(offset: int, length: int) -> bytes:
    if offset == 0:
        sys.exit(3)
    return b"e" * length


@pytest.mark.kernel_faults
def test_a_source_that_exits_is_reported_and_the_handler_serves_on() -> None:
    with u.PythonSourceServer(exits) as server:
        region = server.map(4 * PAGE)
        r, w = os.pipe()
        with pytest.raises(OSError) as info:  # a kernel access to the poisoned page: EFAULT
            os.write(w, memoryview(region)[:PAGE])
        assert info.value.errno == errno.EFAULT
        os.close(r), os.close(w)
        assert region[PAGE] == ord("e")  # the handler is still serving
        with pytest.raises(u.SourceError, match=r"SystemExit\(3\)"):
            server.stats()


@pytest.mark.kernel_faults
def test_short_data_is_an_error_not_wrong_data() -> None:
    with u.PythonSourceServer(lambda offset, length: b"x") as server:
        region = server.map(PAGE)
        r, w = os.pipe()
        with pytest.raises(OSError):
            os.write(w, memoryview(region))
        os.close(r), os.close(w)
        with pytest.raises(u.SourceError, match="returned 1 bytes for 4096"):
            server.map(PAGE)


SPLIT_CHILD = textwrap.dedent(
    """
    import mmap
    import userfaultfd as u
    from userfaultfd import _core
    P = u.PAGE_SIZE
    def page_number(offset, length):
        return b"".join(bytes([offset // P + k]) * P for k in range(length // P))
    with u.PythonSourceServer(page_number) as server:
        region = server.map(16 * P, readahead=7)
        _core.madvise(region.address + 4 * P, 4 * P, mmap.MADV_DONTDUMP)
        assert _core.touch(region.address + 2 * P, 8 * P, P, False) == sum(range(2, 10))
        assert region[:] == page_number(0, 16 * P) and server.stats()["errors"] == 0
    print("OK", flush=True)
    """
)


def test_a_fill_crossing_a_vma_split_is_served_in_pieces() -> None:
    """madvise(MADV_DONTDUMP) on part of a region splits its VMA, and a COPY must lie in one VMA:
    before the fix the handler's readahead COPY failed with ENOENT for ever."""
    proc = subprocess.run(
        [sys.executable, "-c", SPLIT_CHILD], capture_output=True, text=True, timeout=30
    )
    assert proc.stdout == "OK\n", proc.stderr


def test_notice_boards_past_the_table_are_refused_quietly() -> None:
    """Each PythonSourceServer registers a notice board; past the table's 64 its notices go
    unsaid, and the server is still created and serves."""
    boards = [anon(1, shared=True) for _ in range(70)]
    taken = [_core.notice_board(b.address) for b in boards]
    try:
        assert taken[-1] is False and taken.count(True) <= 64
        with u.PythonSourceServer(page_number) as server:
            assert server.map(PAGE)[0] == 0
    finally:
        for b in boards:
            _core.notice_board_remove(b.address)
            b.close()


TOUCH_CHILD = textwrap.dedent(
    """
    import userfaultfd as u
    def fail(offset, length):
        raise KeyError(offset)
    with u.PythonSourceServer(fail) as server:
        region = server.map(u.PAGE_SIZE)
        print("touching", flush=True)
        region[0]
        print("read wrong data", flush=True)
    """
)


def test_toucher_of_a_failed_page_gets_sigbus() -> None:
    proc = run_child(TOUCH_CHILD)
    assert proc.stdout == "touching\n"
    assert proc.returncode == -signal.SIGBUS
    # the handler printed the source's traceback when it failed, the application one line
    assert "Traceback (most recent call last)" in proc.stderr and "\nKeyError: 0\n" in proc.stderr
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith("userfaultfd: fatal SIGBUS")]
    assert "offset 0x0" in line and "KeyError(0)" in line, line


def test_region_lifecycle_and_validation() -> None:
    with u.PythonSourceServer(page_number) as server:
        region = server.map(4 * PAGE)
        view = memoryview(region)
        with pytest.raises(BufferError):
            region.close()
        view.release()
        region.close()
        region.close()
        with pytest.raises(ValueError, match="length 100"):
            server.map(100)
        with pytest.raises(ValueError, match="offset 7"):
            server.map(PAGE, offset=7)
        with pytest.raises(ValueError, match="readahead -1"):
            server.map(PAGE, readahead=-1)
        again = server.map(4 * PAGE)  # may reuse the address: the handler forgot the old one
        assert again[PAGE] == 1
    assert server._process.exitcode == 0


@pytest.mark.kernel_faults
def test_errors_not_yet_reported_are_raised_at_close() -> None:
    server = u.PythonSourceServer(boom)
    region = server.map(4 * PAGE)
    r, w = os.pipe()
    with pytest.raises(OSError):
        os.write(w, memoryview(region)[3 * PAGE :])
    os.close(r), os.close(w)
    with pytest.raises(u.SourceError, match="cannot produce 0x3000"):
        server.close()
    assert region.closed and server._process.exitcode == 0


@pytest.mark.kernel_faults
def test_a_dead_handler_turns_faults_into_sigbus_not_a_hang() -> None:
    with u.PythonSourceServer(page_number) as server:
        region = server.map(8 * PAGE)
        assert region[0] == 0
        os.kill(server._process.pid, signal.SIGKILL)
        server._process.join(10)
        r, w = os.pipe()
        with pytest.raises(OSError) as info:  # a kernel access: EFAULT from the poison
            os.write(w, memoryview(region)[PAGE : 2 * PAGE])
        assert info.value.errno == errno.EFAULT
        os.close(r), os.close(w)
        with pytest.raises(ConnectionError, match="handler process died"):
            server.map(PAGE)
        assert region[0] == 0  # pages served before stay


HANG_CHILD = textwrap.dedent(
    """
    import os, signal, threading, time
    import userfaultfd as u
    from userfaultfd import _core
    def slow(offset, length):
        time.sleep(60)
        return bytes(length)
    server = u.PythonSourceServer(slow)
    region = server.map(u.PAGE_SIZE)
    toucher = threading.Thread(target=_core.touch, args=(region.address, 1, 1, False))
    toucher.start()
    time.sleep(0.5)  # the fault is now with the handler, which sleeps
    print("killing the handler", flush=True)
    os.kill(server._process.pid, signal.SIGKILL)
    toucher.join()
    print("the toucher came back", flush=True)
    """
)


def test_a_fault_pending_when_the_handler_dies_gets_sigbus() -> None:
    proc = run_child(HANG_CHILD)
    assert proc.stdout == "killing the handler\n"
    assert proc.returncode == -signal.SIGBUS
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith("userfaultfd: fatal SIGBUS")]
    assert "the handler process of a PythonSourceServer has died" in line, line
