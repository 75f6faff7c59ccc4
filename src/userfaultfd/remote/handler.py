"""What runs in the handler process: the Python source, called for every fault of the
application's regions, and the loop that reads those faults and the application's requests."""

from __future__ import annotations

import bisect
import collections
import contextlib
import os
import pickle
import queue
import runpy
import select
import signal
import socket
import sys
import threading
import time
import traceback
import types
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from userfaultfd._engine import ADAPTIVE_MAX, ADAPTIVE_MIN
from userfaultfd.errors import PartialError
from userfaultfd.events import PageFault
from userfaultfd.handoff import GuestRegion, accept_handoff, recv_with_fds
from userfaultfd.uffd import PAGE_SIZE, Userfaultfd
from userfaultfd.working_set import WorkingSet

from . import messages, notices

SPIN_NS = 50_000
STUCK = 1.0  # seconds in one source call after which Ctrl-C interrupts it
MAX_BACKLOG = 64  # error reports kept while the application's socket is full


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


class ObjectSource:
    """An object with ``read(offset, length)``, and ``open()`` or ``close()`` if it has either
    (one without the other is still called: a source whose open() connects needs it)."""

    def __init__(self, obj: Any) -> None:
        self.obj = obj
        self.read = obj.read

    def open(self) -> None:
        if callable(getattr(self.obj, "open", None)):
            self.obj.open()

    def close(self) -> None:
        if callable(getattr(self.obj, "close", None)):
            self.obj.close()

    def __reduce__(self) -> tuple[Any, ...]:  # a bound method does not pickle by reference
        return ObjectSource, (self.obj,)


def as_page_source(source: Any) -> PageSource:
    """source as a PageSource: itself, an object with read() only, or a function. TypeError
    names anything else, before the handler starts (not at the first fault)."""
    if isinstance(source, PageSource):
        return source
    if callable(getattr(source, "read", None)):
        return ObjectSource(source)
    if callable(source):
        return FunctionSource(source)
    raise TypeError(
        f"source {source!r} is a {type(source).__name__}: give a function (offset, length) -> "
        "bytes, or an object with read(offset, length) (and optionally open() and close())"
    )


def as_bytes(result: Any, offset: int, length: int) -> memoryview:
    """The source's answer as bytes; ValueError names a wrong type or a short length."""
    try:
        data = memoryview(result).cast("B")
    except TypeError:
        raise TypeError(
            f"the source returned a {type(result).__name__} for {length} bytes at offset "
            f"{offset:#x}, not a bytes-like object"
        ) from None
    if data.nbytes < length:
        raise ValueError(f"the source returned {data.nbytes} bytes for {length} at {offset:#x}")
    return data


@dataclass
class Served:
    """A region the handler serves, how much it asks of the source per fault, and what the
    region has cost so far."""

    region: GuestRegion
    chunk: int
    adaptive: bool = False
    sequel: int = -1  # where the last chunk ended: a fault there grows an adaptive chunk
    faults: int = 0
    pages: int = 0
    errors: int = 0

    def counts(self) -> tuple[int, int, int]:
        return self.faults, self.pages, self.errors


class StderrWriter:
    """Writes to stderr from a thread of its own. The handler shares the application's stderr,
    which may be a pipe nobody reads until later: a write blocked on it must not stop serving.
    What the queue cannot hold is dropped, and the count said once there is room."""

    def __init__(self, size: int = 256) -> None:
        self.queue: queue.Queue[str] = queue.Queue(size)
        self.dropped = 0
        threading.Thread(target=self.run, daemon=True).start()

    def write(self, text: str) -> None:
        try:
            self.queue.put_nowait(text)
        except queue.Full:
            self.dropped += 1

    def run(self) -> None:
        while True:
            text = self.queue.get()
            dropped, self.dropped = self.dropped, 0  # (a count lost to a race is only a count)
            if dropped:
                text = f"userfaultfd: {dropped} message(s) not written: stderr was full\n{text}"
            sys.stderr.write(text)
            sys.stderr.flush()


class SourceTimeout(BaseException):
    """A source call ran past the server's timeout. A BaseException: the source's own
    ``except Exception`` (a retry loop) must not swallow it."""


class FaultLoop:
    """Serves the faults of the regions handed over, and answers the application's requests.
    Runs in the handler process's main thread, where its signal handlers run."""

    def __init__(
        self,
        sock: socket.socket,
        source: PageSource,
        board: notices.Writer,
        timeout: float | None = None,
        app_pidfd: int = -1,
    ) -> None:
        self.sock, self.source, self.board, self.timeout = sock, source, board, timeout
        self.app_pidfd = app_pidfd  # readable once the application has ended
        self.calling_since = 0.0  # when the source call in progress began
        self.stderr = StderrWriter()
        self.uffd: Userfaultfd | None = None
        self.bases: list[int] = []
        self.regions: dict[int, Served] = {}  # by base address
        # base -> (start ns, {region offset: ns since the start}) in first-touch order
        self.recordings: dict[int, tuple[int, dict[int, int]]] = {}
        self.total = Served(GuestRegion(0, 0, 0, PAGE_SIZE), 0)  # the counts of every region
        self.backlog: collections.deque[bytes] = collections.deque()
        self.dropped = 0  # reports dropped since the application last heard of it
        self.dropped_total = 0

    def run(self) -> None:
        signal.signal(signal.SIGALRM, self.tick)
        signal.signal(signal.SIGINT, self.interrupt)
        # One interval timer for the handler's life bounds source calls and notices the
        # application's end. Not a timer armed around each call (two system calls per fault
        # cost a fifth of the fault rate), nor a watcher thread (a second thread makes every
        # GIL hand-over dearer: 5%). A call ends between timeout and timeout * 1.25.
        tick = min(self.timeout / 4, 1.0) if self.timeout else 1.0
        signal.setitimer(signal.ITIMER_REAL, tick, tick)
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
                waiting = [self.sock] if self.backlog or self.dropped else []
                ready, writable, _ = select.select(fds, waiting, [])
                if writable:
                    self.flush()
                if self.uffd and self.uffd in ready:
                    self.serve_burst()
                if self.sock in ready and not self.control():
                    return
        finally:
            self.source.close()

    def serve_burst(self) -> None:
        """Serve faults until none came for SPIN_NS: waking an idle vCPU costs more than a
        fault in a VM, so the handler polls briefly before it sleeps again."""
        deadline = time.monotonic_ns() + SPIN_NS
        while time.monotonic_ns() < deadline:
            if self.serve_pending():
                deadline = time.monotonic_ns() + SPIN_NS

    def serve_pending(self) -> bool:
        """Serve the faults already queued, without waiting; False if there were none."""
        assert self.uffd is not None
        events = self.uffd.read_events(64, timeout=0)
        for event in events:
            if isinstance(event, PageFault):
                self.serve(event.address)
        return bool(events)

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
                if r.base_host_virt_addr not in self.regions:
                    bisect.insort(self.bases, r.base_host_virt_addr)
                self.regions[r.base_host_virt_addr] = Served(r, r.page_size)
            self.reply(messages.Ok())
            return True
        msg = messages.decode(data)
        if isinstance(msg, messages.Cancel):  # the populate it meant has ended already
            return True
        if isinstance(msg, messages.Unmap):
            if self.regions.pop(msg.base, None):
                self.bases.remove(msg.base)
            self.recordings.pop(msg.base, None)
        elif isinstance(msg, messages.Record):
            self.recordings[msg.base] = (time.monotonic_ns(), {})
        elif isinstance(msg, messages.WorkingSetRequest):  # ends the recording
            size = self.regions[msg.base].region.size
            _, touches = self.recordings.pop(msg.base)
            WorkingSet.from_touches(touches.items(), PAGE_SIZE, size).save(msg.path)
        elif isinstance(msg, messages.Readahead):
            served = self.regions[msg.base]
            served.chunk, served.adaptive = msg.nbytes, msg.adaptive
        elif isinstance(msg, messages.Populate):
            self.populate(self.regions[msg.base], msg.offset, msg.length)
        elif isinstance(msg, messages.StatsRequest):
            counts = (self.regions[msg.base] if msg.base else self.total).counts()
            self.reply(messages.Counts(*counts, self.dropped_total))
            return True
        self.reply(messages.Ok())
        return True

    def reply(self, msg: messages.Message) -> None:
        """An answer the application waits for (and so reads): sent even if that blocks."""
        self.flush()
        self.sock.send(messages.encode(msg))

    def report(self, msg: messages.ErrorReport) -> None:
        """A report nobody asked for: the application reads them only when one of its methods
        is called. Serving never waits for that: what the socket cannot take is kept (up to
        MAX_BACKLOG), the rest dropped and counted, and the count reported once there is
        room."""
        data = messages.encode(msg)
        self.flush()
        if self.backlog or not self.send_now(data):
            if len(self.backlog) < MAX_BACKLOG:
                self.backlog.append(data)
            else:
                self.dropped += 1
                self.dropped_total += 1

    def send_now(self, data: bytes) -> bool:
        try:
            self.sock.send(data, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return False
        return True

    def flush(self) -> None:
        """Send what the backlog holds, as far as the socket takes it without waiting."""
        while self.backlog and self.send_now(self.backlog[0]):
            self.backlog.popleft()
        if self.dropped and not self.backlog:
            note = messages.ErrorReport(
                f"{self.dropped} more failure report(s) were dropped: the application read "
                "none for a while (their pages were poisoned all the same)"
            )
            if self.send_now(messages.encode(note)):
                self.dropped = 0

    def serve(self, address: int) -> None:
        assert self.uffd is not None
        self.total.faults += 1
        k = bisect.bisect_right(self.bases, address) - 1
        served = self.regions[self.bases[k]] if k >= 0 else None
        if served is None or address >= served.region.end:
            self.fail(None, address & ~(PAGE_SIZE - 1), PAGE_SIZE, 0,
                      "no region covers this address")  # fmt: skip
            return
        served.faults += 1
        r = served.region
        start = address & ~(r.page_size - 1)
        recording = self.recordings.get(r.base_host_virt_addr)
        if recording:  # dict order is first-touch order; a page touched again keeps its time
            since = time.monotonic_ns() - recording[0]
            recording[1].setdefault(start - r.base_host_virt_addr, since)
        if served.adaptive:  # a stream grows its window (64 KiB to 4 MiB), a jump resets it
            grown = min(served.chunk * 2, ADAPTIVE_MAX) if start == served.sequel else 0
            served.chunk = max(grown, ADAPTIVE_MIN)
        length = min(max(served.chunk, r.page_size), r.end - start)
        served.sequel = start + length
        self.produce(served, start, length, r.page_size)

    def populate(self, served: Served, offset: int, length: int) -> None:
        """Every page of the range installed, or poisoned where the source fails (never left
        missing: a detached region would read zeros there). The source is asked for 64 KiB at
        a time (its readahead if larger; 4 MiB if adaptive); faults keep their turn."""
        r = served.region
        pos, end = r.base_host_virt_addr + offset, r.base_host_virt_addr + offset + length
        while pos < end:
            chunk = min(max(served.chunk, ADAPTIVE_MAX if served.adaptive else ADAPTIVE_MIN),
                        end - pos)  # fmt: skip
            self.produce(served, pos, chunk, chunk)
            pos += chunk
            self.serve_pending()
            if self.cancelled():
                return

    def cancelled(self) -> bool:
        """Whether the application sent Cancel (Ctrl-C) during a populate: it waits for the
        populate's reply meanwhile, so nothing else can be queued (a peek leaves EOF)."""
        try:
            data = self.sock.recv(1 << 16, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return False
        if data != messages.encode(messages.Cancel()):
            return False
        self.sock.recv(1 << 16)
        return True

    def produce(self, served: Served, start: int, length: int, poison: int) -> None:
        """Asks the source for ``length`` bytes at ``start`` and installs them; if it fails,
        ``poison`` bytes from ``start`` are poisoned instead."""
        r = served.region
        offset = r.offset + (start - r.base_host_virt_addr)
        try:
            result = self.read(offset, length)
        except BaseException as e:  # noqa: BLE001 - reported, never swallowed (sys.exit too)
            self.fail(served, start, poison, offset, f"source failed at offset {offset:#x}: {e!r}",
                      traceback.format_exc())  # fmt: skip
            return
        try:
            data = as_bytes(result, offset, length)
        except (TypeError, ValueError) as e:  # the source's fault, not a traceback of ours
            self.fail(served, start, poison, offset, str(e))
            return
        pages = self.install(start, data, length, r.page_size)
        served.pages += pages
        self.total.pages += pages

    def read(self, offset: int, length: int) -> Any:
        """source.read, bounded: a thread of the application that touched the page waits in
        the kernel holding its GIL, freezing every other thread there, until this returns."""
        self.calling_since = time.monotonic()
        try:
            return self.source.read(offset, length)
        finally:  # a deadline just past the return only poisons a page it could have served
            self.calling_since = 0.0

    def tick(self, *_: object) -> None:
        """SIGALRM, every tick: the handler ends with the application, even while a source
        call is stuck (the closed socket would tell the loop only once the call returns); a
        source call that has run past the timeout is ended."""
        if self.app_pidfd >= 0 and select.select([self.app_pidfd], [], [], 0)[0]:
            os._exit(0)
        since = self.calling_since
        if self.timeout and since and time.monotonic() - since > self.timeout:
            raise SourceTimeout(f"the source did not return within {self.timeout} s (timeout=)")

    def interrupt(self, *_: object) -> None:
        """Ctrl-C reaches the handler too (same process group). It ends a source call stuck
        for STUCK seconds: the faulting application, frozen holding its GIL and deaf to
        Ctrl-C, gets its page poisoned, and with it a SIGBUS or EFAULT. Otherwise ignored:
        the application decides when the handler stops."""
        if self.calling_since and time.monotonic() - self.calling_since > STUCK:
            raise KeyboardInterrupt("Ctrl-C while the source was stuck")

    def install(self, start: int, data: memoryview, length: int, page: int) -> int:
        """COPY, accepting pages someone else already installed; the faulter is woken. The
        number of base pages installed."""
        assert self.uffd is not None
        try:
            return self.uffd.copy(start, data, length) // PAGE_SIZE  # wakes the faulter
        except PartialError as e:
            done = e.done
        except FileExistsError:  # a duplicate fault, or a readahead race
            done = page
        except FileNotFoundError:
            # A COPY must lie in one VMA: the range crosses a split (mprotect or madvise on
            # part of the region), or was unregistered meanwhile. Page by page tells which.
            done = 0
        pages = done // PAGE_SIZE
        for pos in range(done, length, page):  # the rest page by page, skipping present ones
            try:
                self.uffd.copy(start + pos, data[pos : pos + page], page, dontwake=True)
                pages += page // PAGE_SIZE
            except (FileExistsError, FileNotFoundError):  # present, or this page is gone
                pass
        self.uffd.wake(start, length)
        return pages

    def fail(
        self, served: Served | None, start: int, length: int, offset: int, message: str,
        tb: str = "",
    ) -> None:  # fmt: skip
        """Never serve wrong data: poison the pages (the toucher gets SIGBUS) and report."""
        assert self.uffd is not None
        self.total.errors += 1
        if served:
            served.errors += 1
        # The toucher may die of the SIGBUS before the application reads any report: its line
        # (said by the application's SIGBUS handler) and the traceback are written first.
        self.board.write(start, length, f"a PythonSourceServer page was poisoned: {message}")
        self.stderr.write(f"userfaultfd: the page at {start:#x} was poisoned: {message}\n{tb}")
        # The report goes first: once the toucher is woken, the application may look for it.
        self.report(messages.ErrorReport(message, start, offset, tb))
        try:
            self.uffd.poison(start, length)
            return
        except OSError:  # some pages are present (installed by a race): the rest one by one
            pass
        for pos in range(start, start + length, PAGE_SIZE):
            with contextlib.suppress(OSError):
                self.uffd.poison(pos, PAGE_SIZE, dontwake=True)
        self.uffd.wake(start, length)


def handler_main(
    sock: socket.socket,
    source: PageSource,
    board: int,
    inherited: Iterable[socket.socket],
    app_pid: int,
    timeout: float | None,
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
        try:
            app_pidfd = os.pidfd_open(app_pid)
        except ProcessLookupError:  # the application has ended already
            os._exit(0)
        writer = notices.Writer(board)
        os.close(board)
        FaultLoop(sock, source, writer, timeout, app_pidfd).run()
        code = 0
    except BaseException:  # noqa: BLE001 - the process ends here either way
        traceback.print_exc()
    finally:
        os._exit(code)


def _load_main(kind: str, ref: str, argv: list[str]) -> None:
    """The application's __main__, run as __mp_main__ (its guarded part does not run), standing
    in for __main__ so that the source unpickles."""
    run = runpy.run_module if kind == "module" else runpy.run_path
    sys.argv = argv
    main = types.ModuleType("__mp_main__")
    main.__dict__.update(run(ref, run_name="__mp_main__"))
    sys.modules["__main__"] = sys.modules["__mp_main__"] = main


def spawned_main() -> None:
    """The entry point of a spawned handler. Arguments: the socket's and the notice board's
    fds, the application's pid, the timeout (or "none"), and if the source refers to the
    application's __main__, how to load that and the application's argv. The pickled source
    arrives on standard input."""
    fd, board, app_pid, timeout, *main = sys.argv[1:]
    sock = socket.socket(fileno=int(fd))
    try:
        if main:
            _load_main(main[0], main[1], main[2:])
        source = pickle.load(sys.stdin.buffer)
    except BaseException as e:  # noqa: BLE001 - reported to the application, which raises it
        message = f"the handler could not load the source: {e!r}"
        sock.send(messages.encode(messages.ErrorReport(message, traceback=traceback.format_exc())))
        os._exit(1)
    handler_main(
        sock, source, int(board), (), int(app_pid), None if timeout == "none" else float(timeout)
    )
