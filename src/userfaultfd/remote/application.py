"""The application's side of out-of-process serving: PythonSourceServer and its regions."""

from __future__ import annotations

import errno
import mmap
import os
import select
import socket
import tempfile
from collections.abc import Callable
from typing import Any

from userfaultfd import _core
from userfaultfd._ntuples import SourceFailure
from userfaultfd._regions import in_forked_child, registering
from userfaultfd.errors import SourceError, source_error
from userfaultfd.flags import RegisterMode
from userfaultfd.handoff import GuestRegion, send_uffd
from userfaultfd.uffd import PAGE_SIZE, Userfaultfd
from userfaultfd.working_set import WorkingSet

from . import messages
from .handler import FunctionSource, PageSource
from .notices import Board
from .process import HandlerProcess, app_sockets

REPLY_TIMEOUT = 10.0
OPEN_TIMEOUT = 60.0  # the source's open() may connect to a remote store


class RemoteRegion(_core.Mapping):
    """Memory served by the handler process; a buffer like :class:`~userfaultfd.Region`."""

    server: PythonSourceServer
    offset: int
    _recording: bool = False
    _working_set: WorkingSet | None = None

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
        if self.exports:
            super().close()  # raises BufferError naming the count
        server, address = self.server, self.address
        if self._recording and self._working_set is None and server._process.exitcode is None:
            self._working_set = server._fetch_working_set(address)
        if server._process.exitcode is None:
            server._request(messages.Unmap(address))
        # munmap ends the registration. (Unregistering first would let a thread still touching
        # the region read fresh zero pages until the munmap: wrong data.) A faulter still queued
        # is answered by the handler, which no longer knows the range, and then finds no memory.
        super().close()
        server._regions.discard(self)

    def __enter__(self) -> RemoteRegion:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class PythonSourceServer:
    """Serves regions from ``source``, a function ``(offset, length) -> bytes-like`` or an object
    with ``open()``, ``read(offset, length)`` and ``close()``, called in a handler process. The
    application may touch region memory from any thread, holding the GIL.

    ``start``: "fork" (the handler inherits the source as it is, closures included) or "spawn"
    (a fresh interpreter; the source must be picklable, and is imported by module name there).
    Spawn when the application runs threads that might hold a lock the source needs at the
    moment of the fork (Python 3.12+ warns about forking a threaded process)."""

    def __init__(
        self, source: Callable[[int, int], Any] | PageSource, *, start: str = "fork"
    ) -> None:
        if start not in ("fork", "spawn"):
            raise ValueError(f"start {start!r} is not 'fork' or 'spawn'")
        self._source: PageSource = (
            source if isinstance(source, PageSource) else FunctionSource(source)
        )
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
            self._process = HandlerProcess(theirs, self._source, start, self._board.fd)
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
        self, length: int, *, offset: int = 0, readahead: int = 0, record: bool = False
    ) -> RemoteRegion:
        """Map ``length`` bytes whose page at region offset ``o`` is ``source(offset + o, n)``.
        ``readahead``: extra pages asked of the source with each fault. ``record``: record the
        first touches (:meth:`RemoteRegion.working_set`); readahead must be off meanwhile."""
        self._check()
        if record and readahead:
            raise ValueError(f"readahead {readahead!r} with record=True: recording needs it off")
        if not isinstance(length, int) or length <= 0 or length % PAGE_SIZE:
            raise ValueError(f"length {length!r} is not a positive multiple of {PAGE_SIZE}")
        if not isinstance(offset, int) or offset < 0 or offset % PAGE_SIZE:
            raise ValueError(f"offset {offset!r} is not a non-negative multiple of {PAGE_SIZE}")
        if not isinstance(readahead, int) or readahead < 0:
            raise ValueError(f"readahead {readahead!r} is not a page count >= 0")
        region = RemoteRegion(length, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        region.server, region.offset = self, offset
        with registering(self._uffd, region, RegisterMode.MISSING):
            send_uffd(self._sock, self._uffd.fileno(),
                      [GuestRegion(region.address, length, offset, PAGE_SIZE)])  # fmt: skip
            self._reply()
            if record:
                self._request(messages.Record(region.address))
                region._recording = True
            if readahead:
                self._request(messages.Readahead(region.address, (readahead + 1) * PAGE_SIZE))
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
        """Faults served, pages installed and source errors, counted by the handler."""
        reply = self._request(messages.StatsRequest())
        self._check()
        assert isinstance(reply, messages.Counts), reply
        return {"faults": reply.faults, "pages": reply.pages, "errors": reply.errors}

    def _request(self, msg: messages.Message) -> messages.Message:
        self._sock.send(messages.encode(msg))
        return self._reply()

    def _reply(self, timeout: float = REPLY_TIMEOUT) -> messages.Message:
        """The next reply; error reports that come first are kept for _check."""
        while True:
            ready, _, _ = select.select([self._sock], [], [], timeout)
            if not ready:
                raise TimeoutError(errno.ETIMEDOUT, "the handler process did not answer")
            data = self._sock.recv(1 << 20)
            if not data:
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

    def _check(self) -> None:
        """Raise SourceError for source failures reported since the last check, and
        ConnectionError once the handler process has died."""
        if self._process.exitcode is not None and self._sock.fileno() >= 0:
            raise ConnectionError(
                errno.EPIPE,
                f"the handler process died (exit code {self._process.exitcode}); faults on its "
                "regions are answered with SIGBUS",
            )
        self._drain()
        if self._errors:
            errs, self._errors = self._errors, []
            failures = [SourceFailure(errno.EIO, e.address, e.offset, e.message) for e in errs]
            raise source_error(failures, f"{errs[0].message}\n{errs[0].traceback}")

    def close(self) -> None:
        """Unmap the regions, stop the handler process, close the uffd."""
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
        try:
            self._drain()
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
        if self._errors:
            self._check()

    def __enter__(self) -> PythonSourceServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
