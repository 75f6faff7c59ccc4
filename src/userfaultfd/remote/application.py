"""The application's side of out-of-process serving: PythonSourceServer and its regions."""

from __future__ import annotations

import dataclasses
import errno
import mmap
import os
import select
import socket
import tempfile
from collections.abc import Callable
from typing import Any, Literal

from userfaultfd import _core
from userfaultfd._engine import ADAPTIVE_MIN, Readahead, parse_readahead
from userfaultfd._ntuples import SourceFailure
from userfaultfd._regions import exported, in_forked_child, registering, warn_detaching
from userfaultfd.errors import SourceError, expect_int, source_error
from userfaultfd.flags import RegisterMode
from userfaultfd.handoff import GuestRegion, send_uffd
from userfaultfd.uffd import PAGE_SIZE, Userfaultfd
from userfaultfd.working_set import WorkingSet

from . import messages
from .handler import PageSource, as_page_source
from .notices import Board
from .process import HandlerProcess, app_sockets

REPLY_TIMEOUT = 10.0
OPEN_TIMEOUT = 60.0  # the source's open() may connect to a remote store


class RemoteRegion(_core.Mapping):
    """Memory served by the handler process; a buffer like :class:`~userfaultfd.Region`."""

    server: PythonSourceServer
    offset: int
    readahead: int | str
    _detached: bool = False
    _recording: bool = False
    _working_set: WorkingSet | None = None

    def populate(self, offset: int = 0, length: int | None = None) -> None:
        """Install every page of ``[offset, offset + length)`` now: the handler asks the source
        for what is missing (in chunks of at least 64 KiB) and keeps serving faults meanwhile.
        Waits as long as the source takes; Ctrl-C stops it, the handler included, after the
        chunk in hand (what was installed stays). SourceError for pages the source could not
        produce: they are poisoned."""
        self._check_served()
        expect_int("populate offset", offset)
        length = len(self) - offset if length is None else expect_int("populate length", length)
        if offset < 0 or length < 0 or offset + length > len(self) or offset % PAGE_SIZE:
            raise ValueError(
                f"populate: range {offset}+{length} is not page-aligned inside the region of "
                f"{len(self)} bytes"
            )
        self.server._check()
        self._install(offset, length + -length % PAGE_SIZE)
        self.server._check()

    def _install(self, offset: int, length: int) -> None:
        """The handler installs (or poisons) every page of the range; its reports are kept
        for the next check."""
        server = self.server
        server._send(messages.Populate(self.address, offset, length))
        try:
            server._reply(timeout=None)
        except KeyboardInterrupt:
            # The handler would go on populating, and its reply would answer our next request:
            # it stops after the chunk in hand (bounded by the source's timeout) and replies.
            server._sock.send(messages.encode(messages.Cancel()))
            server._reply(timeout=None)
            raise

    def stats(self) -> dict[str, int]:
        """What the handler has done for this region: faults, pages installed, source errors."""
        self._check_served()
        reply = self.server._request(messages.StatsRequest(self.address))
        assert isinstance(reply, messages.Counts), reply
        return {"faults": reply.faults, "pages": reply.pages, "errors": reply.errors}

    def _check_served(self) -> None:
        if self.closed:
            raise ValueError("the region is closed")
        if self._detached:
            raise ValueError("the region was detached from its server as it closed")

    def working_set(self) -> WorkingSet:
        """The first touches recorded since the region was mapped with ``record=True``, in
        region offsets. Ends the recording (as closing the region does); later calls return the
        same set."""
        if self._working_set is None:
            if not self._recording:
                raise ValueError("this region was not mapped with record=True")
            if self.closed:
                raise ValueError("the region was closed before its working set was taken")
            self._working_set = self.server._fetch_working_set(self.address)
        return self._working_set

    def close(self) -> None:
        if self.closed:
            return
        if self.exports or self._detached:
            super().close()  # raises BufferError naming the count, or unmaps plain memory
            return
        server, address = self.server, self.address
        try:
            if server._process.exitcode is None:
                if self._recording and self._working_set is None:
                    self._working_set = server._fetch_working_set(address)
                server._request(messages.Unmap(address))
        finally:
            # munmap ends the registration, whatever the handler answered: nothing can read the
            # region once it is gone. (Unregistering first would let a thread still touching it
            # read fresh zero pages until the munmap: wrong data.) A faulter still queued is
            # answered by the handler, which no longer knows the range, and finds no memory.
            super().close()
            server._regions.discard(self)

    def _detach(self) -> None:
        """Every page installed (or poisoned), then unregistered: exported views keep reading
        correct data, and the region no longer needs the handler."""
        server = self.server
        self._install(0, len(self))
        server._uffd.unregister(self.address, len(self))
        server._request(messages.Unmap(self.address))
        server._regions.discard(self)
        self._detached = True

    def __enter__(self) -> RemoteRegion:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        if self.closed:
            return "<RemoteRegion closed>"
        state = "detached" if self._detached else f"handler pid {self.server._process.pid}"
        return (
            f"<RemoteRegion {len(self)} bytes at {self.address:#x}, source offset "
            f"{self.offset:#x}, readahead {self.readahead!r}, {state}>"
        )


class PythonSourceServer:
    """Serves regions from ``source``, a function ``(offset, length) -> bytes-like`` or an object
    with ``open()``, ``read(offset, length)`` and ``close()``, called in a handler process. The
    application may touch region memory from any thread, holding the GIL.

    ``start``: "fork" (the handler inherits the source as it is, closures included) or "spawn"
    (a fresh interpreter; the source must be picklable, and is imported by module name there;
    one from the script's __main__ is found by running the script as __mp_main__, as
    multiprocessing does).
    Spawn when the application runs threads that might hold a lock the source needs at the
    moment of the fork (Python 3.12+ warns about forking a threaded process).

    ``timeout``: seconds one source call may take (None: no bound). A thread touching a page
    not yet served waits in the kernel *holding its GIL*: every Python thread of the
    application waits with it, and Ctrl-C cannot stop it. Past the timeout the page is
    poisoned (the toucher gets SIGBUS, a system call EFAULT) and reported; Ctrl-C (which
    reaches the handler too) ends a call stuck for a second the same way. ``populate()``
    waits without holding the GIL. The handler process ends when the application does."""

    def __init__(
        self,
        source: Callable[[int, int], Any] | PageSource,
        *,
        start: str = "fork",
        timeout: float | None = 60.0,
    ) -> None:
        if start not in ("fork", "spawn"):
            raise ValueError(f"start {start!r} is not 'fork' or 'spawn'")
        if timeout is not None and (
            not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or not timeout > 0
        ):
            raise ValueError(f"timeout {timeout!r} is not a number of seconds > 0 or None")
        self._source: PageSource = as_page_source(source)
        self._pid = os.getpid()
        self._uffd = Userfaultfd()
        self._sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        app_sockets.add(self._sock)
        self._errors: list[messages.ErrorReport] = []
        self._regions: set[RemoteRegion] = set()
        try:
            self._board = Board()
        except BaseException:
            theirs.close()
            self._sock.close()
            self._uffd.close()
            raise
        try:
            self._process = HandlerProcess(theirs, self._source, start, self._board.fd, timeout)
        except BaseException:
            self._board.close()
            self._sock.close()
            self._uffd.close()
            raise
        finally:
            theirs.close()
            os.close(self._board.fd)
        self._pidfd = self._process.pidfd
        # If the handler dies, faulting threads (which may hold the GIL) get SIGBUS, not a hang.
        self._watchdog = _core.watchdog_start(self._pidfd, self._uffd.fileno())
        try:
            self._reply(OPEN_TIMEOUT)  # Ready once the source is open
        except (ConnectionError, TimeoutError):
            errs, self._errors = self._errors, []
            self.close()
            if errs:
                raise SourceError(f"{errs[0].message}\n{errs[0].traceback}", []) from None
            raise

    def map(
        self,
        length: int,
        *,
        offset: int = 0,
        readahead: int | Literal["adaptive", "none"] = 0,
        record: bool = False,
    ) -> RemoteRegion:
        """Map ``length`` bytes whose page at region offset ``o`` is ``source(offset + o, n)``.
        ``readahead``: extra pages asked of the source with each fault, "none", or "adaptive"
        (64 KiB growing to 4 MiB on sequential streams). ``record``: record the first touches
        (:meth:`RemoteRegion.working_set`); readahead must be off meanwhile."""
        self._check()
        parsed = parse_readahead(readahead)  # the vocabulary PageServer.map and serve take
        if record and parsed != Readahead():
            raise ValueError(f"readahead {readahead!r} with record=True: recording needs it off")
        if expect_int("length", length) <= 0 or length % PAGE_SIZE:
            raise ValueError(f"length {length!r} is not a positive multiple of {PAGE_SIZE}")
        if expect_int("offset", offset) < 0 or offset % PAGE_SIZE:
            raise ValueError(f"offset {offset!r} is not a non-negative multiple of {PAGE_SIZE}")
        if parsed.adaptive_max:
            ahead = messages.Readahead(0, ADAPTIVE_MIN, adaptive=True)
        else:
            ahead = messages.Readahead(0, (parsed.fixed + 1) * PAGE_SIZE)
        region = RemoteRegion(length, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        region.server, region.offset, region.readahead = self, offset, readahead
        with registering(self._uffd, region, RegisterMode.MISSING):
            send_uffd(self._sock, self._uffd.fileno(),
                      [GuestRegion(region.address, length, offset, PAGE_SIZE)])  # fmt: skip
            self._reply()
            if record:
                self._request(messages.Record(region.address))
                region._recording = True
            if parsed != Readahead():
                self._request(dataclasses.replace(ahead, base=region.address))
        self._regions.add(region)
        return region

    def _fetch_working_set(self, base: int) -> WorkingSet:
        """The handler writes the region's recording to a file (a set can outgrow a message)."""
        with tempfile.TemporaryDirectory(prefix="uffd-ws-") as tmp:
            path = os.path.join(tmp, "recording")
            self._request(messages.WorkingSetRequest(base, path))
            self._check()
            return WorkingSet.load(path)

    def stats(self) -> dict[str, int]:
        """Faults served, pages installed and source errors, counted by the handler, and the
        failure reports it dropped because nobody read them (their pages were poisoned)."""
        reply = self._request(messages.StatsRequest())
        self._check()
        assert isinstance(reply, messages.Counts), reply
        return {"faults": reply.faults, "pages": reply.pages, "errors": reply.errors,
                "reports_dropped": reply.reports_dropped}  # fmt: skip

    def _request(
        self, msg: messages.Message, timeout: float | None = REPLY_TIMEOUT
    ) -> messages.Message:
        self._send(msg)
        return self._reply(timeout)

    def _send(self, msg: messages.Message) -> None:
        self._check_alive()
        try:
            self._sock.send(messages.encode(msg))
        except ConnectionError:  # it died just now
            self._process.join(REPLY_TIMEOUT)
            self._check_alive()
            raise

    def _reply(self, timeout: float | None = REPLY_TIMEOUT) -> messages.Message:
        """The next reply; error reports that come first are kept for _check."""
        while True:
            ready, _, _ = select.select([self._sock], [], [], timeout)
            if not ready:
                raise TimeoutError(errno.ETIMEDOUT, "the handler process did not answer")
            data = self._sock.recv(1 << 20)
            if not data:
                self._process.join(REPLY_TIMEOUT)
                self._check_alive()
                raise ConnectionError(errno.EPIPE, "the handler process has gone")
            msg = messages.decode(data)
            if isinstance(msg, messages.ErrorReport):
                self._errors.append(msg)
            else:
                return msg

    def _drain(self) -> None:
        while self._sock.fileno() >= 0 and select.select([self._sock], [], [], 0)[0]:
            data = self._sock.recv(1 << 20)
            if not data:
                break
            msg = messages.decode(data)
            if isinstance(msg, messages.ErrorReport):  # else a reply that came after a timeout
                self._errors.append(msg)

    def _check_alive(self) -> None:
        """ValueError once closed, ConnectionError once the handler process has died."""
        if self._uffd.closed:
            raise ValueError("this PythonSourceServer is closed")
        if self._process.exitcode is not None and self._sock.fileno() >= 0:
            raise ConnectionError(
                errno.EPIPE,
                f"the handler process died (exit code {self._process.exitcode}); faults on its "
                "regions are answered with SIGBUS",
            )

    def _check(self) -> None:
        """Raise SourceError for source failures reported since the last check, and
        ConnectionError once the handler process has died."""
        self._check_alive()
        self._drain()
        self._raise_errors()

    def _raise_errors(self) -> None:
        if self._errors:
            errs, self._errors = self._errors, []
            failures = [SourceFailure(errno.EIO, e.address, e.offset, e.message) for e in errs]
            raise source_error(failures, f"{errs[0].message}\n{errs[0].traceback}")

    def close(self, detach: Literal["populate", "error"] = "populate") -> None:
        """Unmap the regions, stop the handler process, close the uffd. A region whose memory
        is still exported (a numpy array, a memoryview) cannot be unmapped under its views:
        ``detach="populate"`` has the handler install every page not yet served, then
        unregisters it (the views keep reading correct data), with a DetachWarning;
        ``detach="error"`` raises BufferError instead, before anything is closed, as it does
        if the handler has died (nothing could install those pages any more)."""
        self._close(detach)

    def _close(self, detach: str) -> None:
        if self._uffd.closed:
            return
        if in_forked_child(self._pid, self._regions):  # the handler and regions are the parent's
            self._regions.clear()
            _core.watchdog_stop(self._watchdog)  # leaves the parent's watchdog alone
            self._sock.close()
            os.close(self._pidfd)
            self._board.close()
            self._uffd.close()
            return
        dead = "the handler process died" if self._process.exitcode is not None else ""
        live = exported(self._regions, detach, dead)
        self._drain()
        for region in live:  # if this fails, nothing is torn down under live memory
            warn_detaching(region, "the handler installs every page not yet served", 3)
            region._detach()
        try:
            for region in list(self._regions):
                region.close()
        finally:
            self._sock.close()
            self._process.join(REPLY_TIMEOUT)
            if self._process.is_alive():
                self._process.kill()
                self._process.join(REPLY_TIMEOUT)
            _core.watchdog_stop(self._watchdog)
            os.close(self._pidfd)
            self._board.close()
            self._uffd.close()
        self._raise_errors()

    def __enter__(self) -> PythonSourceServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self._close("populate")  # as close(), the DetachWarning pointing at the with statement
