"""``userfaultfd serve``: the daemon that serves Firecracker-style snapshot restores.

Clients connect to a UNIX socket and send their uffd with a JSON region list (handoff.py). Each
client gets native worker threads (the page server's engine) that serve its MISSING faults from the
memory file at ``offset + (address - base)``. A REMOVE event (balloon inflation) unregisters the
range, so the client later reads fresh zero pages, as Firecracker's example handler does.

Working sets: ``--record`` records the first client's first touches into a working-set file;
``--replay`` installs a recorded set for every client in the background while its faults are
served first (working_set.py)."""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import os
import selectors
import signal
import socket
import stat
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from userfaultfd import _core
from userfaultfd._engine import Engine, Readahead, RegionSpec, parse_readahead
from userfaultfd.handoff import GuestRegion, HandoffError, HandoffReader, accept_handoff
from userfaultfd.sources import open_data_file
from userfaultfd.uffd import PAGE_SIZE
from userfaultfd.working_set import WorkingSet, plan_replay

if TYPE_CHECKING:
    from userfaultfd.store.serving import StoreCache

log = logging.getLogger("userfaultfd.serve")
HANDSHAKE_TIMEOUT = 10.0
ACCEPT_PAUSE = 0.5  # seconds between accept attempts while out of fds


@dataclass
class Client:
    number: int
    conn: socket.socket
    pid: int
    uid: int
    connected: float = field(default_factory=time.monotonic)
    uffd: int = -1
    regions: list[GuestRegion] = field(default_factory=list)
    engine: Engine | None = None
    ids: list[int] = field(default_factory=list)
    recording: bool = False  # its first touches are being recorded (--record)
    reader: HandoffReader = field(default_factory=HandoffReader)  # the hand-off, as it arrives
    error_cursor: int = 0  # the engine's failure records logged so far
    chatty: bool = False  # it sent bytes after its hand-off (logged once)

    def __post_init__(self) -> None:
        self.key = self.conn.fileno()  # stays valid after the socket is closed

    def name(self) -> str:
        return f"client {self.number} (pid {self.pid}, uid {self.uid})"


class Daemon:
    """The daemon: accepts clients, hands each uffd to an engine, drops clients that go away."""

    def __init__(
        self,
        socket_path: str,
        memory_path: str,
        *,
        prefetch: bool = False,
        readahead: str = "adaptive",
        allow_uids: tuple[int, ...] = (),
        workers: int = 1,
        record: str | None = None,
        record_seconds: float | None = None,
        replay: WorkingSet | None = None,
        replay_threads: int = 1,
        cache_bytes: int = 1 << 30,
        fetch_timeout: float = 30.0,
    ) -> None:
        self.readahead = parse_readahead(readahead)
        self.record_path = record  # None once the recording is written (one client is recorded)
        self.record_seconds = record_seconds
        self.record_deadline = float("inf")
        self.end_recording = False  # set by SIGUSR1
        self.replay = replay
        self.replay_threads = replay_threads
        self.prefetch = prefetch
        self.allowed = {os.getuid(), *allow_uids}
        self.workers = workers
        self.memory: _core.Mapping | None = None
        self.store_cache: StoreCache | None = None
        if "://" in memory_path:  # a snapshot in a store: served from a chunk cache
            self.store_cache = _open_snapshot(memory_path, cache_bytes, fetch_timeout, self)
            self.memory_size = self.store_cache.snapshot.size
        else:
            self._map_memory(memory_path)
        if replay is not None:
            beyond = sum(max(0, o + n - max(o, self.memory_size)) for o, n in replay) // PAGE_SIZE
            if beyond:
                log.warning(
                    "%d page(s) of the working set lie beyond the memory file's %d bytes: ignored",
                    beyond, self.memory_size,
                )  # fmt: skip
        self.path = socket_path
        try:
            self.listener = _listen(socket_path)
        except BaseException:
            self._close_memory()
            raise
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.listener, selectors.EVENT_READ)
        self.exit_with, self.parent_fd = 0, -1
        self.pending: dict[int, Client] = {}  # connected, handshake not yet received
        self.clients: dict[int, Client] = {}
        self.counter = 0
        self.stopping = False
        self.short_of_fds = False
        self.accept_again = 0.0  # while out of fds: when the listener is watched again

    def _map_memory(self, memory_path: str) -> None:
        fd = open_data_file(memory_path, "memory file")
        try:
            self.memory_size = os.lseek(fd, 0, os.SEEK_END)  # a block device's st_size is 0
            if not self.memory_size:
                raise ValueError(f"memory file {memory_path!r} is empty")
            self.memory = _core.Mapping.__new__(_core.Mapping)
            self.memory._map_file(fd, 0, self.memory_size, self.memory_size)
        finally:
            os.close(fd)

    def _close_memory(self) -> None:
        if self.memory is not None:
            self.memory.close()
        if self.store_cache is not None:
            self.store_cache.close()

    def report_poison(self, chunk: int, start: int, end: int, cause: str) -> None:
        """A chunk could not be served: log where its pages are in every client."""
        where = [
            f"{c.name()} {r.base_host_virt_addr + max(start, r.offset) - r.offset:#x}-"
            f"{r.base_host_virt_addr + min(end, r.offset + r.size) - r.offset:#x}"
            for c in list(self.clients.values())
            for r in c.regions
            if r.offset < end and start < r.offset + r.size
        ]
        log.error(
            "chunk %d (snapshot offsets %#x-%#x) poisoned: %s; pages at: %s",
            chunk, start, end, cause, ", ".join(where) or "no client maps it",
        )  # fmt: skip

    # main loop

    def serve_forever(self) -> None:
        while not self.stopping:
            for key, _ in self.selector.select(timeout=0.2):
                if key.fileobj is self.listener:
                    self._accept()
                elif key.data is None:  # the process we serve for has ended (--exit-with)
                    log.info("process %d has ended: stopping", self.exit_with)
                    self.stopping = True
                else:
                    self._guarded(key.data, self._readable)
            self._reap()
            if self.end_recording or time.monotonic() >= self.record_deadline:
                self._end_recording("asked to" if self.end_recording else "time is up")

    def end_with(self, pid: int) -> None:
        """Stop once process pid has ended (SnapshotStore.map: a handler must not outlive its
        application, which may die of the very SIGBUS a poisoned chunk raises)."""
        self.exit_with = pid
        self.parent_fd = os.pidfd_open(pid)
        self.selector.register(self.parent_fd, selectors.EVENT_READ, None)

    def _guarded(self, client: Client, step: Callable[[Client], None]) -> None:
        """Whatever one client makes go wrong costs that client only: an error nobody foresaw
        is logged and the client dropped; the others keep their handler."""
        try:
            step(client)
        except Exception:
            log.exception("%s: unexpected error; dropping it", client.name())
            try:
                self._drop(client, "dropped after an unexpected error", refused=True)
            except Exception:
                log.exception("%s: dropping it failed too", client.name())

    def stop(self, *_: object) -> None:
        self.stopping = True

    def request_end_of_recording(self, *_: object) -> None:
        """SIGUSR1: write the working set recorded so far (the loop does it, not the signal)."""
        self.end_recording = True

    def _end_recording(self, why: str) -> None:
        self.end_recording = False
        self.record_deadline = float("inf")
        for client in self.clients.values():
            if client.recording:
                self._finish_recording(client, why)

    def _finish_recording(self, client: Client, why: str) -> None:
        """Writes the client's first touches, in memory-file offsets, to the --record file."""
        assert client.engine is not None and self.record_path is not None
        client.recording = False
        touches: list[tuple[int, int]] = []
        for rid, region in zip(client.ids, client.regions, strict=True):
            for offset, ns in client.engine.record_finish(rid):
                start = region.offset + offset  # a huge page's granule: all its base pages
                touches += [(o, ns) for o in range(start, start + region.page_size, PAGE_SIZE)]
        touches.sort(key=lambda t: t[1])  # the regions' touches interleaved by time (stable)
        duration = int((time.monotonic() - client.connected) * 1e9)
        ws = WorkingSet.from_touches(touches, PAGE_SIZE, self.memory_size, duration)
        ws.save(self.record_path)
        log.info(
            "recorded %s (%s): %d pages in %d runs to %s",
            client.name(), why, len(ws), len(ws.runs), self.record_path,
        )  # fmt: skip
        self.record_path = None

    def close(self) -> None:
        for client in [*self.pending.values(), *self.clients.values()]:
            self._drop(client, "server stopping")
        self.selector.close()
        if self.parent_fd >= 0:
            os.close(self.parent_fd)
        self.listener.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        self._close_memory()

    # connections

    def _accept(self) -> None:
        try:
            conn, _ = self.listener.accept()
            pid, uid, _ = struct.unpack(
                "3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
            )
        except OSError as e:  # the peer is already gone, or we are out of fds
            with contextlib.suppress(UnboundLocalError):
                conn.close()
            if e.errno in (errno.EMFILE, errno.ENFILE):
                self._pause_accepting(e)
            else:
                log.warning("accept failed: %s", e)
            return
        self.short_of_fds = False
        self.counter += 1
        client = Client(self.counter, conn, pid, uid)
        if uid not in self.allowed:
            log.warning("refused %s: uid %d is not allowed (--allow-uid)", client.name(), uid)
            conn.close()
            return
        conn.setblocking(False)
        self.pending[client.key] = client
        self.selector.register(conn, selectors.EVENT_READ, client)

    def _pause_accepting(self, e: OSError) -> None:
        """Out of fds, the listener stays readable and every accept fails: without a pause the
        loop would spin (and log) at full speed. Connections wait in the backlog meanwhile."""
        if not self.short_of_fds:
            log.warning("cannot accept connections: %s; retrying every %.1f s", e, ACCEPT_PAUSE)
            self.short_of_fds = True
        self.selector.unregister(self.listener)
        self.accept_again = time.monotonic() + ACCEPT_PAUSE

    def _readable(self, client: Client) -> None:
        if client.engine is None:
            self._handshake(client)
            return
        try:
            data = client.conn.recv(4096)
        except OSError as e:
            data, why = b"", str(e)
        else:
            why = "closed the connection"
        if not data:
            self._drop(client, why)
        elif not client.chatty:  # said once: a client sending on and on must not flood the log
            client.chatty = True
            log.warning("%s sends unexpected bytes after its hand-off: ignored", client.name())

    def _handshake(self, client: Client) -> None:
        """Reads what has arrived of the hand-off, without waiting for the rest: a client
        sending it slowly holds up nobody (and is refused after HANDSHAKE_TIMEOUT)."""
        try:
            if not client.reader.feed(client.conn):
                return
            fds, client.reader.fds = client.reader.fds, []
            client.uffd, client.regions = accept_handoff(client.reader.data, fds, self.memory_size)
            del self.pending[client.key]
            self._start(client)
        except (HandoffError, ConnectionError, OSError) as e:
            self._drop(client, f"refused: {e}", refused=True)
            return
        self.clients[client.key] = client
        size = sum(r.size for r in client.regions)
        log.info("connect %s: %d region(s), %d MiB", client.name(), len(client.regions), size >> 20)

    def _start(self, client: Client) -> None:
        # A REMOVE (balloon inflation) unregisters the range: the guest reads fresh zero pages.
        engine = Engine(client.uffd, workers=self.workers, on_remove="zero", spin_ns=50_000)
        client.engine = engine
        # The first client is recorded, if asked, with readahead off: every first touch a fault.
        recorded = client.recording = self.record_path is not None and not any(
            c.recording for c in self.clients.values()
        )
        for r in client.regions:
            if self.store_cache is not None:  # the chunk cache, at the region's offset
                kind, base, base_len = _core.SRC_CACHE, self.store_cache.handle, r.offset
            else:
                assert self.memory is not None
                kind, base, base_len = _core.SRC_BYTES, self.memory.address + r.offset, r.size
            spec = RegionSpec(
                start=r.base_host_virt_addr,
                length=r.size,
                page_size=r.page_size,
                kind=kind,
                base=base,
                base_len=base_len,
                can_zeropage=r.page_size == PAGE_SIZE,
                readahead=Readahead() if recorded else self.readahead,
            )
            client.ids.append(engine.add_region(spec))
            if recorded:
                engine.record_start(client.ids[-1])
        if recorded and self.record_seconds is not None:
            self.record_deadline = time.monotonic() + self.record_seconds
        engine.start()
        if not recorded:
            self._replay(engine, client)

    def _replay(self, engine: Engine, client: Client) -> None:
        """The working set first, in its order, below the workers; with --prefetch all the rest
        of the memory streamed in address order, speculatively: only with CPU time nothing else
        wants, so it never competes with the set or with a fault."""
        pairs = zip(client.ids, client.regions, strict=True)
        layout = [(rid, r.offset, r.size) for rid, r in pairs]
        if self.replay:
            runs = plan_replay(self.replay, layout, self.memory_size)[0]
            if runs:
                engine.replay(runs, threads=self.replay_threads)
        if self.prefetch:
            rest = b"".join(struct.pack("=QQQ", rid, 0, size) for rid, _, size in layout)
            engine.replay(rest, threads=self.replay_threads, speculative=True)

    def _reap(self) -> None:
        now = time.monotonic()
        if self.accept_again and now >= self.accept_again:
            self.accept_again = 0.0
            self.selector.register(self.listener, selectors.EVENT_READ)
        for client in list(self.pending.values()):
            if now - client.connected > HANDSHAKE_TIMEOUT:
                self._guarded(
                    client, lambda c: self._drop(c, "refused: no hand-off message in time", True)
                )
        for client in list(self.clients.values()):
            self._guarded(client, self._reap_client)

    def _reap_client(self, client: Client) -> None:
        if client.engine is not None:
            self._log_failures(client, client.engine)
            if client.engine.info().client_gone:
                self._drop(client, "its process exited")

    def _log_failures(self, client: Client, engine: Engine) -> None:
        """A page that could not be produced is poisoned: the guest thread touching it dies of
        SIGBUS in the client, which cannot say why. The server says it, as it happens."""
        client.error_cursor, errs = engine.errors(client.error_cursor)
        regions = dict(zip(client.ids, client.regions, strict=False))  # ids: as far as _start got
        for failure in errs:
            base = regions[failure.region].offset if failure.region in regions else 0
            log.error(
                "%s: poisoned the page at %#x (memory file offset %#x): %s (%s)",
                client.name(), failure.address, base + failure.offset,
                os.strerror(failure.errno), failure.op,
            )  # fmt: skip

    def _drop(self, client: Client, why: str, refused: bool = False) -> None:
        """Forget the client and close what it had. Safe to call again after a step failed:
        every resource is taken off the client as it is released."""
        self.pending.pop(client.key, None)
        self.clients.pop(client.key, None)
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(client.conn)
        client.conn.close()
        if refused:
            log.warning("%s %s", client.name(), why)
        engine, uffd = client.engine, client.uffd
        client.uffd = -1
        try:
            if engine is not None:
                engine.stop()
                if client.recording:
                    self._finish_recording(client, why)
                self._log_failures(client, engine)
                total = engine.stats()
                forks = engine.info().fork  # their uffds were closed: children are not served
                if not refused:
                    log.info(
                        "disconnect %s: %s; demand faults %d, prefetched %d, pages %d, bytes %d, "
                        "races %d, errors %d, removes %d, forks %d",
                        client.name(), why, total.faults, total.prefetched, total.pages_installed,
                        total.bytes_installed, total.eexist, total.errors, total.removes, forks,
                    )  # fmt: skip
        finally:
            client.engine = None  # (a second _drop, after a failed step, finds nothing left)
            if engine is not None:
                engine.close()
            client.reader.close()
            if uffd >= 0:
                os.close(uffd)


def _listen(path: str) -> socket.socket:
    """A listening socket at path, mode 0600. A stale socket file is replaced; anything else at
    path is an error."""
    if os.path.lexists(path):
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise FileExistsError(errno.EEXIST, f"{path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except ConnectionRefusedError:
            os.unlink(path)  # stale: nobody listens
        else:
            raise FileExistsError(errno.EADDRINUSE, f"another server is listening on {path}")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    # Bound aside and renamed into place once listening: a client that waits for the path to
    # appear and connects at once is never refused.
    aside = os.path.join(os.path.dirname(path) or ".", f".{os.path.basename(path)}.{os.getpid()}")
    old = os.umask(0o177)
    try:
        sock.bind(aside)
    except OSError as e:
        sock.close()
        raise OSError(e.errno, f"cannot listen on {path}: {e.strerror}") from None
    finally:
        os.umask(old)
    try:
        sock.listen(64)
        os.rename(aside, path)
    except BaseException:
        sock.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(aside)
        raise
    return sock


def _open_snapshot(address: str, budget: int, fetch_timeout: float, daemon: Daemon) -> StoreCache:
    from userfaultfd.store import SnapshotStore
    from userfaultfd.store.serving import StoreCache

    store, name = SnapshotStore.at(address, timeout=min(30.0, fetch_timeout))
    return StoreCache(
        store.open(name), budget=budget, fetch_timeout=fetch_timeout,
        on_poison=daemon.report_poison,
    )  # fmt: skip


def main(args: argparse.Namespace) -> int:
    level = logging.WARNING if getattr(args, "quiet", False) else logging.INFO
    logging.basicConfig(level=level, format="userfaultfd serve: %(message)s")
    daemon = Daemon(
        args.socket,
        args.memory,
        prefetch=args.prefetch == "all",
        readahead=args.readahead,
        allow_uids=tuple(args.allow_uid),
        workers=args.workers,
        cache_bytes=args.cache_size,
        fetch_timeout=args.fetch_timeout,
        record=args.record,
        record_seconds=args.record_seconds,
        replay=WorkingSet.load(args.replay, page_size=PAGE_SIZE) if args.replay else None,
        replay_threads=args.replay_threads,
    )
    if getattr(args, "exit_with", None) is not None:
        daemon.end_with(args.exit_with)
    previous = {sig: signal.signal(sig, daemon.stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    previous[signal.SIGUSR1] = signal.signal(signal.SIGUSR1, daemon.request_end_of_recording)
    log.info("listening on %s, serving %s (%d bytes)", args.socket, args.memory, daemon.memory_size)
    try:
        daemon.serve_forever()
    finally:
        daemon.close()
        for sig, old in previous.items():
            signal.signal(sig, old)
        log.info("stopped")
    return 0
