"""Python sources served from a handler process: the application touches memory holding the GIL."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import select
import signal
import subprocess
import sys
import textwrap
import time
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


class OpenWithoutClose:
    def open(self) -> None:
        raise ConnectionRefusedError("the store is down")

    def read(self, offset: int, length: int) -> bytes:
        return bytes(length)


def test_a_source_with_open_but_no_close_is_still_opened() -> None:
    """Before the fix only an object with all of open, read and close was opened: this one's
    open() was skipped, and its reads ran unconnected."""
    with pytest.raises(u.SourceError, match="the store is down"):
        u.PythonSourceServer(OpenWithoutClose())


def test_tracking_a_remote_region_is_refused_without_pointing_at_pageserver_methods() -> None:
    """Before the fix the error advised region.track_writes(), which RemoteRegion lacks."""
    with u.PythonSourceServer(page_number) as server:
        region = server.map(4 * PAGE)
        with pytest.raises(OSError, match="served by its handler process") as err:
            u.track_writes(region)
        assert "track_writes()" not in str(err.value)
        region.close()


def test_spawn_needs_a_picklable_source_and_start_is_checked() -> None:
    with pytest.raises(TypeError, match="start='spawn' needs a picklable source"):
        u.PythonSourceServer(lambda offset, length: bytes(length), start="spawn")
    with pytest.raises(ValueError, match="start 'thread' is not 'fork' or 'spawn'"):
        u.PythonSourceServer(page_number, start="thread")


SPAWN_SCRIPT = textwrap.dedent(
    """
    import userfaultfd as u

    def defined_in_main(offset, length):  # pickled as __main__.defined_in_main
        return bytes([7]) * length

    print("top level ran", flush=True)  # in the application, and once more in the handler

    if __name__ == "__main__":
        with u.PythonSourceServer(defined_in_main, start="spawn") as server:
            print(server.map(u.PAGE_SIZE)[5], flush=True)
    """
)


def test_spawn_serves_a_source_defined_in_the_scripts_main(tmp_path: Path) -> None:
    """As multiprocessing does: the handler runs the script as __mp_main__, so what the
    __name__ guard protects does not run there, and the source unpickles."""
    script = tmp_path / "app.py"
    script.write_text(SPAWN_SCRIPT)
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=60)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["top level ran", "top level ran", "7"]


def test_spawn_of_a_source_from_a_main_with_no_file_is_a_type_error() -> None:
    proc = run_child(SPAWN_SCRIPT.replace('if __name__ == "__main__":', "if True:"))
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == (
        "TypeError: start='spawn' needs a source the handler can import: this one is defined in "
        "a __main__ with no file (python -c, an interactive session); define it in a module or "
        "a script, or use start='fork'"
    )


class RefusesToUnpickle:
    def __init__(self) -> None:
        self.state = 1  # pickled: __setstate__ runs in the handler

    def read(self, offset: int, length: int) -> bytes:
        return bytes(length)

    def __setstate__(self, state: object) -> None:
        raise RuntimeError("not here")


def test_a_spawned_handler_that_cannot_load_the_source_is_reported() -> None:
    with pytest.raises(u.SourceError, match=r"could not load the source: RuntimeError\('not here'"):
        u.PythonSourceServer(RefusesToUnpickle(), start="spawn")


def test_many_threads_fault_at_once() -> None:
    with u.PythonSourceServer(page_number) as server:
        region = server.map(512 * PAGE)
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


def always_fails(offset: int, length: int) -> bytes:
    raise RuntimeError(f"cannot produce {offset:#x}")


def read_each_page(region: u.RemoteRegion, path: Path) -> int:
    """Hands every page to a system call; how many came back EFAULT (poisoned)."""
    failed = 0
    with open(path, "wb") as f:
        for k in range(len(region) // PAGE):
            try:
                os.pwrite(f.fileno(), memoryview(region)[k * PAGE : (k + 1) * PAGE], 0)
            except OSError as e:
                assert e.errno == errno.EFAULT
                failed += 1
    return failed


@pytest.mark.kernel_faults
def test_failure_reports_nobody_reads_never_block_serving(tmp_path: Path) -> None:
    """The handler reports each failure before it poisons the page; a full socket (the
    application reads reports only when it calls a method) must not stop it serving."""
    pages = 600
    with u.PythonSourceServer(always_fails) as server:
        region = server.map(pages * PAGE)
        assert Caller(read_each_page, region, tmp_path / "out").finish(30) == pages
        reports: list[str] = []
        deadline = time.monotonic() + 10
        while True:  # the handler sends what it kept as the application reads
            try:
                stats = server.stats()
                break
            except u.SourceError as err:
                reports += [f.operation for f in err.failures]
            assert time.monotonic() < deadline
        notes = [
            r for r in reports if re.fullmatch(r"\d+ more failure report\(s\) were dropped: .*", r)
        ]
        dropped = sum(int(n.split()[0]) for n in notes)
        assert notes and dropped == stats["reports_dropped"]  # some were dropped, and counted
        assert len(reports) - len(notes) + dropped == pages


UNREAD_STDERR_APP = textwrap.dedent(
    """
    import errno, os, sys
    import userfaultfd as u
    def fails(offset, length):
        raise RuntimeError("x" * 2000)  # a long traceback for each page
    with u.PythonSourceServer(fails) as server:
        region = server.map(400 * u.PAGE_SIZE)
        r, w = os.pipe()
        for k in range(400):
            try:
                os.write(w, memoryview(region)[k * u.PAGE_SIZE : (k + 1) * u.PAGE_SIZE])
            except OSError as e:  # poisoned: nothing reaches the pipe
                assert e.errno == errno.EFAULT
        print("all 400 answered", flush=True)
        os._exit(0)
    """
)


@pytest.mark.kernel_faults
def test_a_stderr_nobody_reads_never_blocks_serving() -> None:
    """The handler prints each failure to the application's stderr: a pipe nobody reads fills
    after a few dozen tracebacks, and a blocking write there would stop it serving."""
    app = subprocess.Popen([sys.executable, "-c", UNREAD_STDERR_APP], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert app.stdout is not None
        ready, _, _ = select.select([app.stdout], [], [], 30)
        assert ready, "the application hangs: the handler is blocked writing to stderr"
        assert app.stdout.readline() == "all 400 answered\n"
    finally:
        app.kill()
        app.communicate(timeout=30)


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


def test_a_source_of_the_wrong_type_is_refused_at_construction() -> None:
    for bad in (42, "pages", None):
        with pytest.raises(TypeError, match=f"source {bad!r} is a {type(bad).__name__}: give"):
            u.PythonSourceServer(bad)  # type: ignore[arg-type]


class ReadOnly:
    """Only read(): no open() or close() to call."""

    def read(self, offset: int, length: int) -> bytes:
        return page_number(offset, length)


@pytest.mark.parametrize("start", ["fork", "spawn"])
def test_an_object_with_read_only_is_a_source(start: str) -> None:
    with u.PythonSourceServer(ReadOnly(), start=start) as server:
        assert server.map(4 * PAGE)[2 * PAGE] == 2


@pytest.mark.kernel_faults
@pytest.mark.parametrize(
    ("result", "message"),
    [
        ("text", "the source returned a str for 4096 bytes at offset 0x0, not a bytes-like"),
        (None, "the source returned a NoneType for 4096 bytes at offset 0x0, not a bytes-like"),
        (b"short", "the source returned 5 bytes for 4096 at 0x0"),
    ],
)
def test_a_wrong_return_is_reported_naming_its_type_or_length(result: object, message: str) -> None:
    with u.PythonSourceServer(lambda offset, length: result) as server:
        region = server.map(PAGE)
        r, w = os.pipe()
        with pytest.raises(OSError) as info:  # poisoned, never wrong data
            os.write(w, memoryview(region))
        assert info.value.errno == errno.EFAULT
        os.close(r), os.close(w)
        with pytest.raises(u.SourceError) as err:
            server.stats()
        assert err.value.failures[0].operation.startswith(message)
        assert "Traceback" not in str(err.value)  # the source's mistake, not a crash of ours


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


def _mapped(address: int) -> bool:
    for line in Path("/proc/self/maps").read_text().splitlines():
        start, end = (int(x, 16) for x in line.split()[0].split("-"))
        if start <= address < end:
            return True
    return False


def test_a_closed_servers_notice_board_stays_mapped_and_is_reused_clean() -> None:
    """A thread dying of a SIGBUS may be reading a board in the signal handler as its server
    closes: the board is never unmapped (reading it there would fault in the handler), and
    the next server reuses it, without the old server's notices."""
    from userfaultfd.remote.notices import Board, Writer

    board = Board()
    address = board._memory.address
    Writer(board.fd).write(0x1000, PAGE, "stale")
    os.close(board.fd)
    board.close()
    assert _mapped(address)
    again = Board()
    try:
        assert again._memory.address == address
        assert bytes(again._memory) == bytes(len(again._memory))
    finally:
        os.close(again.fd)
        again.close()


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


# ---- close under live views, populate, per-region stats ----


def fails_at_page_5(offset: int, length: int) -> bytes:
    if offset <= 5 * PAGE < offset + length:
        raise RuntimeError("page 5 is lost")
    return page_number(offset, length)


@pytest.mark.kernel_faults
def test_close_with_a_live_view_installs_every_page_then_detaches() -> None:
    """Never torn down under live memory: the view keeps reading the source's data after
    close, not zeros, and the page the source failed stays poisoned (EFAULT, not zeros)."""
    server = u.PythonSourceServer(fails_at_page_5)
    region = server.map(64 * PAGE)
    array = numpy.frombuffer(region, dtype=numpy.uint8)
    assert array[0] == 0  # one page served before
    with (
        pytest.warns(u.DetachWarning, match="installs every page"),
        pytest.raises(u.SourceError, match="page 5 is lost"),
    ):
        server.close()
    assert server._process.exitcode == 0
    assert array[32 * PAGE] == 32 and array[63 * PAGE] == 63  # installed by the detach
    r, w = os.pipe()
    with pytest.raises(OSError) as info:
        os.write(w, memoryview(region)[5 * PAGE : 6 * PAGE])
    assert info.value.errno == errno.EFAULT
    os.close(r), os.close(w)
    assert "detached" in repr(region)
    with pytest.raises(ValueError, match="detached"):
        region.stats()
    del array
    region.close()


def test_close_detach_error_and_a_dead_handler_raise_before_anything_is_closed() -> None:
    server = u.PythonSourceServer(page_number)
    region = server.map(8 * PAGE)
    view = memoryview(region)
    with pytest.raises(BufferError, match=r"1 region\(s\) still exported.*detach='error'"):
        server.close(detach="error")
    assert view[3 * PAGE] == 3  # still served
    os.kill(server._process.pid, signal.SIGKILL)
    server._process.join(10)
    with pytest.raises(BufferError, match="the handler process died: release them first"):
        server.close()
    assert view[3 * PAGE] == 3  # pages served before stay, none turned to zeros
    view.release()
    server.close()
    assert region.closed


def test_populate_installs_without_faults_and_stats_are_per_region() -> None:
    with u.PythonSourceServer(page_number) as server:
        a = server.map(64 * PAGE)
        b = server.map(16 * PAGE, offset=100 * PAGE)
        a.populate(8 * PAGE, 8 * PAGE)
        assert a.stats() == {"faults": 0, "pages": 8, "errors": 0}
        a.populate()
        assert a.stats()["pages"] == 64
        assert a[:] == page_number(0, 64 * PAGE)
        assert a.stats()["faults"] == 0  # every page was there
        assert b[PAGE] == 101 and b.stats() == {"faults": 1, "pages": 1, "errors": 0}
        with pytest.raises(ValueError, match="populate: range 4096\\+999999"):
            a.populate(PAGE, 999999)
        with pytest.raises(TypeError, match="populate offset '0' is a str"):
            a.populate("0")  # type: ignore[arg-type]
        assert repr(b) == (
            f"<RemoteRegion {16 * PAGE} bytes at {b.address:#x}, source offset {100 * PAGE:#x}, "
            f"readahead 0, handler pid {server._process.pid}>"
        )
        b.close()
        assert repr(b) == "<RemoteRegion closed>"
        with pytest.raises(ValueError, match="the region is closed"):
            b.populate()


def test_adaptive_readahead_grows_on_a_sequential_stream() -> None:
    with u.PythonSourceServer(page_number) as server:
        region = server.map(2048 * PAGE, readahead="adaptive")
        _core.touch(region.address, len(region), PAGE, False)  # forwards (memcpy may not)
        assert region[:] == page_number(0, 2048 * PAGE)
        stats = region.stats()
        assert stats["pages"] == 2048 and stats["faults"] < 16  # 64 KiB, 128 KiB, ... 4 MiB
        # one vocabulary with PageServer.map (before the fix "fast" was "a str, not an int")
        with pytest.raises(ValueError, match="readahead 'fast' is not a page count >= 0, 'adap"):
            server.map(PAGE, readahead="fast")  # type: ignore[arg-type]
        assert server.map(PAGE, readahead="none", record=True)[0] == 0


def test_a_dead_handler_or_a_closed_server_is_named_not_a_broken_pipe() -> None:
    server = u.PythonSourceServer(page_number)
    os.kill(server._process.pid, signal.SIGKILL)
    server._process.join(10)
    with pytest.raises(ConnectionError, match="the handler process died"):
        server.stats()
    server.close()
    with pytest.raises(ValueError, match="this PythonSourceServer is closed"):
        server.stats()
    with pytest.raises(ValueError, match="this PythonSourceServer is closed"):
        server.map(PAGE)


# ---- slow and stuck sources ----


def sleeps(offset: int, length: int) -> bytes:
    time.sleep(30)
    return bytes(length)


@pytest.mark.kernel_faults
def test_a_source_call_past_the_timeout_poisons_the_page_and_says_so() -> None:
    with u.PythonSourceServer(sleeps, timeout=0.5) as server:
        region = server.map(PAGE)
        r, w = os.pipe()
        started = time.monotonic()
        with pytest.raises(OSError) as info:  # (a view kept alive would detach at close)
            Caller(lambda: os.write(w, memoryview(region))).finish(10)
        assert info.value.errno == errno.EFAULT and time.monotonic() - started < 5
        os.close(r), os.close(w)
        with pytest.raises(u.SourceError, match=r"did not return within 0.5 s"):
            server.stats()
    with pytest.raises(ValueError, match="timeout 0 is not"):
        u.PythonSourceServer(page_number, timeout=0)


STUCK_APP = textwrap.dedent(
    """
    import sys, threading, time
    import userfaultfd as u
    def stuck(offset, length):
        time.sleep(3600)
        return bytes(length)
    if __name__ == "__main__":
        server = u.PythonSourceServer(stuck, start=sys.argv[1], timeout=None)
        region = server.map(u.PAGE_SIZE)
        print(server._process.pid, flush=True)
        if sys.argv[2] == "thread":
            threading.Thread(target=lambda: region[0], daemon=True).start()
            time.sleep(3600)
        region[0]  # the main thread: frozen holding the GIL, deaf to Ctrl-C
    """
)


def _gone_or_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return "\nState:\tZ" in f.read()
    except FileNotFoundError:
        return True


@pytest.mark.parametrize("start", ["fork", "spawn"])
def test_the_handler_ends_with_the_application_even_inside_a_stuck_source(
    tmp_path: Path, start: str
) -> None:
    script = tmp_path / "app.py"
    script.write_text(STUCK_APP)
    app = subprocess.Popen([sys.executable, str(script), start, "thread"],
                           stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert app.stdout is not None
        handler = int(app.stdout.readline())
        time.sleep(0.5)  # the fault is with the handler, in the source
        app.terminate()
        assert app.wait(10) == -signal.SIGTERM
        deadline = time.monotonic() + 10
        while not _gone_or_zombie(handler):
            assert time.monotonic() < deadline, "the handler outlived the application"
            time.sleep(0.05)
    finally:
        app.kill()
        app.wait(10)
        with contextlib.suppress(ProcessLookupError):
            os.kill(handler, signal.SIGKILL)


def test_ctrl_c_ends_an_application_frozen_on_a_stuck_source(tmp_path: Path) -> None:
    """Ctrl-C signals the whole foreground process group: the handler, seeing the source stuck,
    gives up the page, and the frozen application gets SIGBUS instead of hanging forever."""
    script = tmp_path / "app.py"
    script.write_text(STUCK_APP)
    app = subprocess.Popen([sys.executable, str(script), "fork", "main"],
                           stdout=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip
    try:
        assert app.stdout is not None
        app.stdout.readline()
        time.sleep(1.5)  # stuck for more than a second
        os.killpg(app.pid, signal.SIGINT)  # what the terminal does on Ctrl-C
        assert app.wait(10) == -signal.SIGBUS
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(app.pid, signal.SIGKILL)
        app.wait(10)


POPULATE_APP = textwrap.dedent(
    """
    import time, userfaultfd as u
    def slow(offset, length):
        time.sleep(0.2)
        return b"s" * length
    with u.PythonSourceServer(slow) as server:
        region = server.map(64 << 20)
        print("populating", flush=True)
        try:
            region.populate()
        except KeyboardInterrupt:
            print("interrupted", flush=True)
        assert region[len(region) - 1] == ord("s")  # still served after
        print(region.stats()["pages"] < 16384, flush=True)
    """
)


def test_ctrl_c_in_a_remote_populate_stops_the_handler_populating_too(tmp_path: Path) -> None:
    """Before the fix the handler went on populating after the KeyboardInterrupt (here for
    minutes): the next call timed out, and its reply would have answered the call after."""
    script = tmp_path / "app.py"
    script.write_text(POPULATE_APP)
    app = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert app.stdout is not None
        assert app.stdout.readline() == "populating\n"
        time.sleep(1)
        app.send_signal(signal.SIGINT)
        out, err = app.communicate(timeout=10)
        assert app.returncode == 0, err
        assert out == "interrupted\nTrue\n"
    finally:
        app.kill()
        app.wait(10)
