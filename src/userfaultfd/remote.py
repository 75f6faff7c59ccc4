"""Pages produced by Python code, served from a handler process.

A Python source cannot run in a process whose threads fault while holding the GIL, so
:class:`PythonSourceServer` forks a handler process (with its own GIL), hands it the uffd over a
UNIX socket in Firecracker's format (handoff.py), and the handler calls the source for every fault.
An exception in the source poisons the pages it was asked for (the toucher gets SIGBUS) and comes
back to the application, traceback included, as a SourceError at its next call."""

from __future__ import annotations

import bisect
import errno
import json
import mmap
import os
import pickle
import select
import signal
import socket
import sys
import tempfile
import time
import traceback
import weakref
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

from . import _core
from .errors import PartialError, SourceError
from .events import PageFault
from .flags import RegisterMode
from .handoff import GuestRegion, accept_handoff, recv_with_fds, send_uffd
from .server import MADV_DONTFORK
from .uffd import PAGE_SIZE, Userfaultfd
from .working_set import WorkingSet

REPLY_TIMEOUT = 10.0
OPEN_TIMEOUT = 60.0  # the source's open() may connect to a remote store
SPIN_NS = 50_000


@runtime_checkable
class PageSource(Protocol):
    """The class form of a Python source: opened and closed in the handler process."""

    def open(self) -> None: ...

    def read(self, offset: int, length: int) -> Any:
        """Return at least ``length`` bytes (any buffer) starting at ``offset``."""
        ...

    def close(self) -> None: ...


class _Function:
    def __init__(self, fn: Callable[[int, int], Any]) -> None:
        self.read = fn

    def open(self) -> None:
        pass

    def close(self) -> None:
        pass


# ---- the handler process ----


class _Handler:
    def __init__(self, sock: socket.socket, source: PageSource) -> None:
        self.sock, self.source = sock, source
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
            self.reply({"error": message, "address": 0, "traceback": traceback.format_exc()})
            return
        self.reply({"ready": True})
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
            msg, fds = recv_with_fds(self.sock)
        except ConnectionError:
            return False
        if fds:  # a region hand-off, with the uffd
            fd, regions = accept_handoff(msg, fds)
            if self.uffd is None:
                self.uffd = Userfaultfd.from_fd(fd)
            else:
                os.close(fd)
            for r in regions:
                self.regions[r.base_host_virt_addr] = (r, r.page_size)
                bisect.insort(self.bases, r.base_host_virt_addr)
            self.reply({"ok": True})
            return True
        op = json.loads(msg)
        if op["op"] == "unmap":
            if self.regions.pop(op["base"], None):
                self.bases.remove(op["base"])
            self.recordings.pop(op["base"], None)
        elif op["op"] == "record":
            self.recordings[op["base"]] = (time.monotonic_ns(), {})
        elif op["op"] == "working_set":  # ends the recording; written where the caller says
            r, _ = self.regions[op["base"]]
            _, touches = self.recordings.pop(op["base"])
            WorkingSet.from_touches(touches.items(), PAGE_SIZE, r.size).save(op["path"])
        elif op["op"] == "readahead":
            r, _ = self.regions[op["base"]]
            self.regions[op["base"]] = (r, op["bytes"])
        elif op["op"] == "stats":
            self.reply({"faults": self.faults, "pages": self.pages, "errors": self.errors})
            return True
        self.reply({"ok": True})
        return True

    def reply(self, obj: dict[str, Any]) -> None:
        self.sock.send(json.dumps(obj).encode())

    def serve(self, address: int) -> None:
        assert self.uffd is not None
        self.faults += 1
        k = bisect.bisect_right(self.bases, address) - 1
        region = self.regions[self.bases[k]] if k >= 0 else None
        if region is None or address >= region[0].end:
            self.fail(address & ~(PAGE_SIZE - 1), PAGE_SIZE, "no region covers this address")
            return
        r, chunk = region
        start = address & ~(r.page_size - 1)
        recording = self.recordings.get(r.base_host_virt_addr)
        if recording:  # dict order is first-touch order; a page touched again keeps its time
            recording[1].setdefault(
                start - r.base_host_virt_addr, time.monotonic_ns() - recording[0]
            )
        length = min(max(chunk, r.page_size), r.end - start)
        offset = r.offset + (start - r.base_host_virt_addr)
        try:
            data = memoryview(self.source.read(offset, length)).cast("B")
            if data.nbytes < length:
                raise ValueError(
                    f"the source returned {data.nbytes} bytes for {length} at {offset:#x}"
                )
        except BaseException as e:  # noqa: BLE001 - reported, never swallowed (sys.exit too)
            self.fail(start, r.page_size, f"source failed at offset {offset:#x}: {e!r}",
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
        except FileNotFoundError:  # unregistered meanwhile
            self.uffd.wake(start, length)
            return
        for pos in range(done, length, page):  # the rest page by page, skipping present ones
            try:
                self.uffd.copy(start + pos, data[pos : pos + page], page, dontwake=True)
                self.pages += page // PAGE_SIZE
            except FileExistsError:
                pass
            except FileNotFoundError:
                break
        self.uffd.wake(start, length)

    def fail(self, start: int, length: int, message: str, tb: str = "") -> None:
        """Never serve wrong data: poison the page (the toucher gets SIGBUS) and report."""
        assert self.uffd is not None
        self.errors += 1
        # The report goes first: once the toucher is woken, the application may look for it.
        self.reply({"error": message, "address": start, "traceback": tb})
        try:
            self.uffd.poison(start, length)
        except OSError:
            self.uffd.wake(start, length)


# The application ends of every live server's socket. A handler process closes its copies, or
# the application closing one would not reach that server's handler as EOF.
_app_sockets: weakref.WeakSet[socket.socket] = weakref.WeakSet()


def _handler_main(sock: socket.socket, source: PageSource) -> None:
    """The handler process's life; it ends the process, with status 0 after a clean stop."""
    code = 1
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the application decides when we stop
        for inherited in list(_app_sockets):
            inherited.close()
        _Handler(sock, source).run()
        code = 0
    except BaseException:  # noqa: BLE001 - the process ends here either way
        traceback.print_exc()
    finally:
        os._exit(code)


def _spawned() -> None:
    """The entry point of a spawned handler: the socket's fd is the argument, and the pickled
    source arrives on standard input."""
    sock = socket.socket(fileno=int(sys.argv[1]))
    try:
        source = pickle.load(sys.stdin.buffer)
    except BaseException as e:  # noqa: BLE001 - reported to the application, which raises it
        message = (
            f"the handler could not unpickle the source: {e!r} (a spawned handler imports it "
            "by its module name: it cannot be defined in __main__)"
        )
        sock.send(json.dumps({"error": message, "traceback": traceback.format_exc()}).encode())
        os._exit(1)
    _handler_main(sock, source)


class _HandlerProcess:
    """The handler process: forked (the source is inherited as it is), or spawned as a fresh
    interpreter (the source travels pickled; nothing of the application's threads comes
    along). Not a multiprocessing.Process: multiprocessing's exit hook terminates every daemon
    process it knows, and it runs in a plain os.fork() child of the application too, which
    would kill the parent's handler when that child exits."""

    def __init__(self, sock: socket.socket, source: PageSource, start: str) -> None:
        self._exitcode: int | None = None
        if start == "spawn":
            self.pid = self._spawn(sock, source)
        else:
            self.pid = os.fork()
            if self.pid == 0:
                _handler_main(sock, source)
        self.pidfd = os.pidfd_open(self.pid)

    @staticmethod
    def _spawn(sock: socket.socket, source: PageSource) -> int:
        try:
            payload = pickle.dumps(source)
        except Exception as e:
            raise TypeError(
                f"start='spawn' needs a picklable source (a module-level function or class "
                f"instance): {e}"
            ) from None
        code = "from userfaultfd.remote import _spawned; _spawned()"
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        r, w = os.pipe()
        os.set_inheritable(sock.fileno(), True)
        try:
            pid = os.posix_spawn(
                sys.executable,
                [sys.executable, "-c", code, str(sock.fileno())],
                env,
                file_actions=[(os.POSIX_SPAWN_DUP2, r, 0)],
            )
        finally:
            os.set_inheritable(sock.fileno(), False)
            os.close(r)
        with open(w, "wb") as pipe:  # the child reads it at once: no deadlock past the buffer
            pipe.write(payload)
        return pid

    @property
    def exitcode(self) -> int | None:
        """None while it runs; its exit status, or minus the signal that ended it."""
        if self._exitcode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self._exitcode = os.waitstatus_to_exitcode(status)
        return self._exitcode

    def join(self, timeout: float) -> int | None:
        """Waits up to timeout seconds for it to end (and reaps it); its exit code or None."""
        if self.exitcode is None:
            select.select([self.pidfd], [], [], timeout)
        return self.exitcode

    def is_alive(self) -> bool:
        return self.exitcode is None

    def kill(self) -> None:
        if self.is_alive():
            signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)


# ---- the application side ----


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
            server._request({"op": "unmap", "base": address})
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
        self._source: PageSource = source if isinstance(source, PageSource) else _Function(source)
        self._pid = os.getpid()
        self._uffd = Userfaultfd()
        self._sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        _app_sockets.add(self._sock)
        self._errors: list[dict[str, Any]] = []
        self._regions: set[RemoteRegion] = set()
        try:
            self._process = _HandlerProcess(theirs, self._source, start)
        except BaseException:
            self._sock.close()
            self._uffd.close()
            raise
        finally:
            theirs.close()
        self._pidfd = self._process.pidfd
        # If the handler dies, faulting threads (which may hold the GIL) get SIGBUS, not a hang.
        self._watchdog = _core.watchdog_start(self._pidfd, self._uffd.fileno())
        try:
            self._reply(OPEN_TIMEOUT)  # {"ready": true} once the source is open
        except (ConnectionError, TimeoutError):
            errs, self._errors = self._errors, []
            self.close()
            if errs:
                raise SourceError(f"{errs[0]['error']}\n{errs[0]['traceback']}", []) from None
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
        try:
            _core.madvise(region.address, length, MADV_DONTFORK)  # see PageServer.map
            self._uffd.register(region.address, length, RegisterMode.MISSING)
            send_uffd(self._sock, self._uffd.fileno(),
                      [GuestRegion(region.address, length, offset, PAGE_SIZE)])  # fmt: skip
            self._reply()
            if record:
                self._request({"op": "record", "base": region.address})
                region._recording = True
            if readahead:
                self._request({"op": "readahead", "base": region.address,
                               "bytes": (readahead + 1) * PAGE_SIZE})  # fmt: skip
        except BaseException:
            _core.Mapping.close(region)
            raise
        self._regions.add(region)
        return region

    def _fetch_working_set(self, base: int) -> WorkingSet:
        """The handler writes the region's recording to a file (a set can outgrow a message)."""
        with tempfile.TemporaryDirectory(prefix="uffd-ws-") as tmp:
            path = os.path.join(tmp, "recording")
            self._request({"op": "working_set", "base": base, "path": path})
            self._check()
            return WorkingSet.load(path)

    def stats(self) -> dict[str, int]:
        """Faults served, pages installed and source errors, counted by the handler."""
        reply = self._request({"op": "stats"})
        self._check()
        return reply

    def _request(self, msg: dict[str, Any]) -> dict[str, Any]:
        self._sock.send(json.dumps(msg).encode())
        return self._reply()

    def _reply(self, timeout: float = REPLY_TIMEOUT) -> dict[str, Any]:
        """The next reply; error reports that come first are kept for _check."""
        while True:
            ready, _, _ = select.select([self._sock], [], [], timeout)
            if not ready:
                raise TimeoutError(errno.ETIMEDOUT, "the handler process did not answer")
            data = self._sock.recv(1 << 20)
            if not data:
                raise ConnectionError(errno.EPIPE, "the handler process has gone")
            msg: dict[str, Any] = json.loads(data)
            if "error" in msg:
                self._errors.append(msg)
            else:
                return msg

    def _drain(self) -> None:
        while self._sock.fileno() >= 0 and select.select([self._sock], [], [], 0)[0]:
            data = self._sock.recv(1 << 20)
            if not data:
                break
            self._errors.append(json.loads(data))

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
            first = errs[0]
            raise SourceError(
                f"{len(errs)} fault(s) could not be served and were poisoned; first: "
                f"{first['error']}\n{first['traceback']}",
                [(errno.EIO, e["address"], 0, e["error"]) for e in errs],
            )

    def close(self) -> None:
        """Unmap the regions, stop the handler process, close the uffd."""
        if self._uffd.closed:
            return
        if os.getpid() != self._pid:
            # A forked child: the handler and the regions are the parent's; close our copies.
            for region in self._regions:
                region.rebase(0)
            self._regions.clear()
            _core.watchdog_stop(self._watchdog)  # leaves the parent's watchdog alone
            self._sock.close()
            os.close(self._pidfd)
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
            self._uffd.close()
        if self._errors:
            self._check()

    def __enter__(self) -> PythonSourceServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
