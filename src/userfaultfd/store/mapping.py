"""A stored snapshot mapped into an application as a buffer.

Fetching runs Python code (the object-store client), so the pages cannot be served by threads of
the application (a thread faulting while it holds the GIL would wait for them forever). The
snapshot is served by a handler process, ``userfaultfd serve --memory ADDRESS``: the application
maps anonymous memory, registers it, and hands the uffd over as Firecracker does (handoff.py).
The handler's engine serves cached chunks natively and fetches the rest. Its log (a chunk that
could not be served, with its addresses) goes to this process's stderr. Should the handler die,
a watchdog makes faults raise SIGBUS instead of hanging."""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .. import _core
from ..handoff import GuestRegion, send_uffd
from ..uffd import PAGE_SIZE, Userfaultfd
from .store import SnapshotStore

START_TIMEOUT = 60.0
STOP_TIMEOUT = 10.0


class SnapshotMapping(_core.Mapping):
    """The snapshot's bytes; a buffer (``memoryview(m)``, ``numpy.frombuffer(m)``, ``m[a:b]``)
    whose pages arrive on first touch. Close it (or use ``with``) to stop its handler."""

    name: str
    size: int
    _handler: _Handler

    def close(self) -> None:
        if self.closed:
            return
        if self.exports:
            super().close()  # raises BufferError naming the count
        super().close()  # munmap ends the registration; then the handler may go
        self._handler.stop()

    def __enter__(self) -> SnapshotMapping:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Handler:
    """`userfaultfd serve --quiet` for one mapping, in its own process, which ends with ours. It
    writes to our stderr itself: a chunk's failure is reported before its pages are poisoned, so
    the report is there even when the SIGBUS ends this process."""

    def __init__(self, address: str, cache_size: int, fetch_timeout: float) -> None:
        self.dir = tempfile.mkdtemp(prefix="uffd-snapshot-")
        self.socket_path = Path(self.dir, "serve.sock")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "userfaultfd", "serve", "--socket", str(self.socket_path),
             "--memory", address, "--cache-size", str(cache_size),
             "--fetch-timeout", str(fetch_timeout), "--quiet", "--exit-with", str(os.getpid())],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        )  # fmt: skip
        self.uffd: Userfaultfd | None = None
        self.sock: socket.socket | None = None
        self.watchdog: object | None = None
        self.pidfd = os.pidfd_open(self.proc.pid)

    def wait_listening(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while not self.socket_path.exists():
            if self.proc.poll() is not None:
                raise OSError(
                    errno.EIO,
                    f"the snapshot's handler process exited with status {self.proc.returncode} "
                    "(its error is on stderr)",
                )
            if time.monotonic() > deadline:
                raise TimeoutError(errno.ETIMEDOUT, "the snapshot's handler process did not start")
            time.sleep(0.01)

    def attach(self, region: _core.Mapping) -> None:
        self.uffd = Userfaultfd()
        _core.madvise(region.address, len(region), mmap.MADV_DONTFORK)
        self.uffd.register(region.address, len(region))
        # From here on, faults on the region raise SIGBUS if the handler dies, never hang.
        self.watchdog = _core.watchdog_start(self.pidfd, self.uffd.fileno())
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.sock.connect(str(self.socket_path))
        send_uffd(
            self.sock, self.uffd.fileno(), [GuestRegion(region.address, len(region), 0, PAGE_SIZE)]
        )

    def stop(self) -> None:
        if self.sock is not None:
            self.sock.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(STOP_TIMEOUT)
        if self.watchdog is not None:
            _core.watchdog_stop(self.watchdog)
        os.close(self.pidfd)
        if self.uffd is not None:
            self.uffd.close()
        with contextlib.suppress(OSError):
            os.rmdir(self.dir)


def map_snapshot(
    address: str, *, cache_size: int = 1 << 30, fetch_timeout: float = 30.0
) -> SnapshotMapping:
    """Map the stored snapshot at ``address`` (``s3://bucket/.../NAME``, ``file:///dir/NAME``).
    A page that cannot be served (a chunk that fails its hash, or is not fetched within
    ``fetch_timeout`` seconds) raises SIGBUS in the thread that touches it."""
    store, name = SnapshotStore.at(address)
    size = store.open(name).size  # a bad address or snapshot is reported here, by name
    handler = _Handler(address, cache_size, fetch_timeout)
    try:
        handler.wait_listening()
        length = max(PAGE_SIZE, -(-size // PAGE_SIZE) * PAGE_SIZE)
        region = SnapshotMapping(length, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        region.name, region.size, region._handler = name, size, handler
        try:
            handler.attach(region)
        except BaseException:
            _core.Mapping.close(region)
            raise
    except BaseException:
        handler.stop()
        raise
    return region
