"""What runs in the handler process: the Python source, called for every fault of the
application's regions, and the loop that reads those faults and the application's requests."""

from __future__ import annotations

import bisect
import os
import pickle
import select
import signal
import socket
import sys
import time
import traceback
from collections.abc import Callable, Iterable
from typing import Any, Protocol, runtime_checkable

from userfaultfd.errors import PartialError
from userfaultfd.events import PageFault
from userfaultfd.handoff import GuestRegion, accept_handoff, recv_with_fds
from userfaultfd.uffd import PAGE_SIZE, Userfaultfd
from userfaultfd.working_set import WorkingSet

from . import messages, notices

SPIN_NS = 50_000


@runtime_checkable
class PageSource(Protocol):
    """The class form of a Python source: opened and closed in the handler process."""

    def open(self) -> None: ...

    def read(self, offset: int, length: int) -> Any:
        """Return at least ``length`` bytes (any buffer) starting at ``offset``."""
        ...

    def close(self) -> None: ...


class FunctionSource:
    """A function ``(offset, length) -> bytes-like`` as a PageSource."""

    def __init__(self, fn: Callable[[int, int], Any]) -> None:
        self.read = fn

    def open(self) -> None:
        pass

    def close(self) -> None:
        pass


class FaultLoop:
    """Serves the faults of the regions handed over, and answers the application's requests."""

    def __init__(self, sock: socket.socket, source: PageSource, board: notices.Writer) -> None:
        self.sock, self.source, self.board = sock, source, board
        self.uffd: Userfaultfd | None = None
        self.bases: list[int] = []
        self.regions: dict[int, tuple[GuestRegion, int]] = {}  # base -> (region, readahead)
        # base -> (start ns, {region offset: ns since the start}) in first-touch order
        self.recordings: dict[int, tuple[int, dict[int, int]]] = {}
        self.faults = self.pages = self.errors = 0

    def run(self) -> None:
        try:
            self.source.open()
        except BaseException as e:  # noqa: BLE001 - the application raises it
            message = f"the source's open() failed: {e!r}"
            self.reply(messages.ErrorReport(message, traceback=traceback.format_exc()))
            return
        self.reply(messages.Ready())
        try:
            while True:
                fds = [self.sock] + ([self.uffd] if self.uffd else [])
                ready, _, _ = select.select(fds, [], [])
                if self.uffd and self.uffd in ready:
                    self.serve_burst()
                if self.sock in ready and not self.control():
                    return
        finally:
            self.source.close()

    def serve_burst(self) -> None:
        """Serve faults until none came for SPIN_NS: waking an idle vCPU costs more than a
        fault in a VM, so the handler polls briefly before it sleeps again."""
        assert self.uffd is not None
        deadline = time.monotonic_ns() + SPIN_NS
        while time.monotonic_ns() < deadline:
            events = self.uffd.read_events(64, timeout=0)
            for event in events:
                if isinstance(event, PageFault):
                    self.serve(event.address)
            if events:
                deadline = time.monotonic_ns() + SPIN_NS

    def control(self) -> bool:
        """One message from the application; False when it has gone."""
        try:
            data, fds = recv_with_fds(self.sock)
        except ConnectionError:
            return False
        if fds:  # a region hand-off, with the uffd
            fd, regions = accept_handoff(data, fds)
            if self.uffd is None:
                self.uffd = Userfaultfd.from_fd(fd)
            else:
                os.close(fd)
            for r in regions:
                self.regions[r.base_host_virt_addr] = (r, r.page_size)
                bisect.insort(self.bases, r.base_host_virt_addr)
            self.reply(messages.Ok())
            return True
        msg = messages.decode(data)
        if isinstance(msg, messages.Unmap):
            if self.regions.pop(msg.base, None):
                self.bases.remove(msg.base)
            self.recordings.pop(msg.base, None)
        elif isinstance(msg, messages.Record):
            self.recordings[msg.base] = (time.monotonic_ns(), {})
        elif isinstance(msg, messages.WorkingSetRequest):  # ends the recording
            r, _ = self.regions[msg.base]
            _, touches = self.recordings.pop(msg.base)
            WorkingSet.from_touches(touches.items(), PAGE_SIZE, r.size).save(msg.path)
        elif isinstance(msg, messages.Readahead):
            r, _ = self.regions[msg.base]
            self.regions[msg.base] = (r, msg.nbytes)
        elif isinstance(msg, messages.StatsRequest):
            self.reply(messages.Counts(self.faults, self.pages, self.errors))
            return True
        self.reply(messages.Ok())
        return True

    def reply(self, msg: messages.Message) -> None:
        self.sock.send(messages.encode(msg))

    def serve(self, address: int) -> None:
        assert self.uffd is not None
        self.faults += 1
        k = bisect.bisect_right(self.bases, address) - 1
        region = self.regions[self.bases[k]] if k >= 0 else None
        if region is None or address >= region[0].end:
            self.fail(address & ~(PAGE_SIZE - 1), PAGE_SIZE, 0, "no region covers this address")
            return
        r, chunk = region
        start = address & ~(r.page_size - 1)
        recording = self.recordings.get(r.base_host_virt_addr)
        if recording:  # dict order is first-touch order; a page touched again keeps its time
            since = time.monotonic_ns() - recording[0]
            recording[1].setdefault(start - r.base_host_virt_addr, since)
        length = min(max(chunk, r.page_size), r.end - start)
        offset = r.offset + (start - r.base_host_virt_addr)
        try:
            data = memoryview(self.source.read(offset, length)).cast("B")
            if data.nbytes < length:
                raise ValueError(
                    f"the source returned {data.nbytes} bytes for {length} at {offset:#x}"
                )
        except BaseException as e:  # noqa: BLE001 - reported, never swallowed (sys.exit too)
            self.fail(start, r.page_size, offset, f"source failed at offset {offset:#x}: {e!r}",
                      traceback.format_exc())  # fmt: skip
            return
        self.install(start, data, length, r.page_size)

    def install(self, start: int, data: memoryview, length: int, page: int) -> None:
        """COPY, accepting pages someone else already installed; the faulter is woken."""
        assert self.uffd is not None
        try:
            self.pages += self.uffd.copy(start, data, length) // PAGE_SIZE  # wakes the faulter
            return
        except PartialError as e:
            done = e.done
        except FileExistsError:  # a duplicate fault, or a readahead race
            done = page
        except FileNotFoundError:
            # A COPY must lie in one VMA: the range crosses a split (mprotect or madvise on
            # part of the region), or was unregistered meanwhile. Page by page tells which.
            done = 0
        for pos in range(done, length, page):  # the rest page by page, skipping present ones
            try:
                self.uffd.copy(start + pos, data[pos : pos + page], page, dontwake=True)
                self.pages += page // PAGE_SIZE
            except (FileExistsError, FileNotFoundError):  # present, or this page is gone
                pass
        self.uffd.wake(start, length)

    def fail(self, start: int, length: int, offset: int, message: str, tb: str = "") -> None:
        """Never serve wrong data: poison the page (the toucher gets SIGBUS) and report."""
        assert self.uffd is not None
        self.errors += 1
        # The toucher may die of the SIGBUS before the application reads any report: its line
        # (said by the application's SIGBUS handler) and the traceback are written first.
        self.board.write(start, length, f"a PythonSourceServer page was poisoned: {message}")
        sys.stderr.write(f"userfaultfd: the page at {start:#x} was poisoned: {message}\n{tb}")
        sys.stderr.flush()
        # The report goes first: once the toucher is woken, the application may look for it.
        self.reply(messages.ErrorReport(message, start, offset, tb))
        try:
            self.uffd.poison(start, length)
        except OSError:
            self.uffd.wake(start, length)


def handler_main(
    sock: socket.socket, source: PageSource, board: int, inherited: Iterable[socket.socket]
) -> None:
    """The handler process's life; it ends the process, with status 0 after a clean stop.
    ``board``: the notice board's fd. ``inherited``: the application's ends of every server's
    socket, closed here, or the application closing one would not reach that server's handler
    as EOF."""
    code = 1
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the application decides when we stop
        for other in inherited:
            other.close()
        writer = notices.Writer(board)
        os.close(board)
        FaultLoop(sock, source, writer).run()
        code = 0
    except BaseException:  # noqa: BLE001 - the process ends here either way
        traceback.print_exc()
    finally:
        os._exit(code)


def spawned_main() -> None:
    """The entry point of a spawned handler: the socket's and the notice board's fds are the
    arguments, and the pickled source arrives on standard input."""
    sock = socket.socket(fileno=int(sys.argv[1]))
    try:
        source = pickle.load(sys.stdin.buffer)
    except BaseException as e:  # noqa: BLE001 - reported to the application, which raises it
        message = (
            f"the handler could not unpickle the source: {e!r} (a spawned handler imports it "
            "by its module name: it cannot be defined in __main__)"
        )
        sock.send(messages.encode(messages.ErrorReport(message, traceback=traceback.format_exc())))
        os._exit(1)
    handler_main(sock, source, int(sys.argv[2]), ())
