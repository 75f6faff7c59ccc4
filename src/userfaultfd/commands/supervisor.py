"""The supervising process of ``userfaultfd serve``: it outlives the serving process.

It listens on the socket, takes each client's hand-off, and keeps the client's connection, uffd and
region list; a serving process (serve.ServingProcess, a fresh interpreter) gets a copy of each uffd
and serves its faults. The supervisor itself never touches a client's memory, so nothing a client
does can crash it. When the serving process dies (even by SIGKILL) a standby serving process,
started ahead and waiting, takes every client over: it wakes each client's ranges so that faults the
dead process had read but not answered are raised again. SIGHUP replaces the serving process with
one started from the code on disk now (an upgrade in place). Two serving processes never serve one
uffd at once: a replacement gets the clients only after its predecessor has exited.

Under systemd (NOTIFY_SOCKET set) the supervisor also keeps the clients' fds in systemd's fd
store (FDSTORE=1), so that a restarted service (the supervisor's own death included) takes the
clients back from it (LISTEN_FDS)."""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import selectors
import signal
import socket
import stat
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from userfaultfd.handoff import GuestRegion, HandoffError, HandoffReader, accept_handoff
from userfaultfd.sources import open_data_file

from .serve_metrics import Metrics

log = logging.getLogger("userfaultfd.serve")
HANDSHAKE_TIMEOUT = 10.0
RELEASE_TIMEOUT = 5.0  # an old serving process that does not exit by then is killed
RESPAWN_INTERVAL = 1.0  # serving processes that die at start are restarted at most this often
TICK = 0.2
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
    served_by: int = 0  # pid of the serving process it was last given to
    reader: HandoffReader = field(default_factory=HandoffReader)  # the hand-off, as it arrives
    chatty: bool = False  # it sent bytes after its hand-off (logged once)

    def name(self) -> str:
        return f"client {self.number} (pid {self.pid}, uid {self.uid})"

    def describe(self) -> dict[str, Any]:
        return {"number": self.number, "pid": self.pid, "uid": self.uid,
                "regions": [r.to_json() for r in self.regions]}  # fmt: skip


class Worker:
    """A serving process and its control socket (SOCK_SEQPACKET: one JSON message a packet)."""

    def __init__(self, config: dict[str, Any], memory_fd: int) -> None:
        self.sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        config = dict(config, ctl=theirs.fileno(), memory_fd=memory_fd)
        fds = (theirs.fileno(), memory_fd) if memory_fd >= 0 else (theirs.fileno(),)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        code = "from userfaultfd.commands.serve import worker_main; worker_main()"
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", code, json.dumps(config)],
                pass_fds=fds, env=env, stdin=subprocess.DEVNULL,
            )  # fmt: skip
        except BaseException:
            self.sock.close()
            raise
        finally:
            theirs.close()
        self.pid = self.proc.pid
        try:
            self.pidfd = os.pidfd_open(self.pid)
        except OSError:  # out of fds: a process we could not watch must not run
            self.proc.kill()
            self.proc.wait()
            self.sock.close()
            raise
        self.ready = False
        self.started = time.monotonic()

    def send(self, msg: dict[str, Any], fds: tuple[int, ...] = ()) -> bool:
        try:
            socket.send_fds(self.sock, [json.dumps(msg).encode()], list(fds))
            return True
        except OSError:  # it is dying; its exit is handled when the pidfd says so
            return False

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)

    def reap(self) -> int:
        code = self.proc.wait()
        self.sock.close()
        os.close(self.pidfd)
        return code


def _describe_exit(code: int) -> str:
    if code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"exit status {code}"


class Supervisor:
    def __init__(
        self,
        socket_path: str,
        memory_path: str,
        *,
        prefetch: bool = False,
        readahead: str = "adaptive",
        allow_uids: tuple[int, ...] = (),
        workers: int = 1,
        on_stop: str = "drain",
        stop_timeout: float = 30.0,
        metrics: str | None = None,
        log_format: str = "text",
        verbosity: str = "normal",
        working_sets: dict[str, Any] | None = None,
        cache_bytes: int = 1 << 30,
        fetch_timeout: float = 30.0,
        exit_with: int | None = None,
    ) -> None:
        if on_stop not in ("drain", "abandon"):
            raise ValueError(f"on-stop {on_stop!r} is not 'drain' or 'abandon'")
        self.allowed = {os.getuid(), *allow_uids}
        self.on_stop, self.stop_timeout = on_stop, stop_timeout
        self.config = {"prefetch": prefetch, "readahead": readahead, "workers": workers,
                       "report_stats": metrics is not None, "log_format": log_format,
                       "verbosity": verbosity, "record": None, "record_seconds": None,
                       "replay": None, "replay_threads": 1, **(working_sets or {}),
                       "address": None, "cache_bytes": cache_bytes,
                       "fetch_timeout": fetch_timeout}  # fmt: skip
        self.memory_path = memory_path
        self.memory_fd = -1
        self.memory_size: int | None = None  # a stored snapshot's: the serving process checks
        if "://" in memory_path:
            # A snapshot in a store: each serving process opens its own chunk cache (a
            # replacement too), so the supervisor never needs the store.
            self.config["address"] = memory_path
        else:
            # Opened once: every serving process maps this very file, even if the path is
            # replaced. (A FIFO is refused without blocking; a missing file "does not exist".)
            self.memory_fd = open_data_file(memory_path, "memory file")
            self.memory_size = os.lseek(self.memory_fd, 0, os.SEEK_END)  # a block device's: 0
        self.exit_with, self.parent_fd = exit_with, -1
        self.short_of_fds = False
        self.accept_again = 0.0  # while out of fds: when the listener is watched again
        self.path = socket_path
        self.selector = selectors.DefaultSelector()
        self.pending: dict[int, Client] = {}  # connected, hand-off not yet complete
        self.clients: dict[int, Client] = {}
        self.counter = 0
        self.active: Worker | None = None  # the one serving process
        self.spares: list[Worker] = []  # started, waiting to take over
        self.leaving: list[Worker] = []  # told to exit, or killed: not yet reaped
        self.upgrade: Worker | None = None  # SIGHUP: the replacement being started
        self.next_spawn = 0.0
        self.stopping = False
        self.stop_pid = 0  # the serving process told to stop: it reports how each client ended
        self.served = False  # a serving process has been ready (until then a failure is fatal)
        self.fatal: str | None = None
        self.signals: list[int] = []
        self.fdstore = FdStore.from_environment()
        self.metrics = Metrics(lambda: len(self.clients))
        self.metrics_server: Any = None
        try:
            if self.memory_size == 0:
                raise ValueError(f"memory file {memory_path!r} is empty")
            self.listener = self.fdstore.take_listener() or _listen(socket_path)
            self.fdstore.store_listener(self.listener)
            if metrics is not None:
                self.metrics_server = self.metrics.serve(metrics)
        except BaseException:
            if self.memory_fd >= 0:
                os.close(self.memory_fd)
            raise
        self.selector.register(self.listener, selectors.EVENT_READ, ("listener", None))
        if exit_with is not None:  # SnapshotStore.map: a handler must not outlive its application
            self.parent_fd = os.pidfd_open(exit_with)
            self.selector.register(self.parent_fd, selectors.EVENT_READ, ("exit_with", None))
        for client in self.fdstore.take_clients(self.memory_size):
            self.counter = max(self.counter, client.number)
            self._add_client(client, restored=True)

    # the main loop

    def run(self) -> int:
        wake_r, wake_w = socket.socketpair()
        wake_r.setblocking(False)
        wake_w.setblocking(False)
        self.selector.register(wake_r, selectors.EVENT_READ, ("signal", None))
        old_wakeup = signal.set_wakeup_fd(wake_w.fileno())
        sigs = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1)
        previous = {sig: signal.signal(sig, self._on_signal) for sig in sigs}
        size = "" if self.memory_size is None else f" ({self.memory_size} bytes)"
        log.info("listening on %s, serving %s%s", self.path, self.memory_path, size)
        self.fdstore.notify("READY=1")
        try:
            while not self._finished():
                for key, _ in self.selector.select(timeout=TICK):
                    kind, obj = key.data
                    if kind == "listener":
                        self._accept()
                    elif kind == "pending":
                        self._guarded(obj, self._handshake)
                    elif kind == "client":
                        self._guarded(obj, self._readable)
                    elif kind == "exit_with":  # the process we serve for has ended: stop
                        log.info("process %d has ended: stopping", self.exit_with)
                        self.selector.unregister(self.parent_fd)
                        self._signal(signal.SIGTERM)
                    elif kind == "ctl":
                        self._from_worker(obj)
                    elif kind == "exit":
                        self._exited(obj)
                    else:
                        with contextlib.suppress(BlockingIOError):
                            wake_r.recv(64)
                while self.signals:
                    self._signal(self.signals.pop(0))
                self._tick()
        finally:
            signal.set_wakeup_fd(old_wakeup)
            for sig, old in previous.items():
                signal.signal(sig, old)
            self.selector.unregister(wake_r)
            wake_r.close()
            wake_w.close()
            self._close()
        log.info("stopped")
        if self.fatal is not None:  # the first serving process could not start: bad input
            raise ValueError(self.fatal)
        return 0

    def _guarded(self, client: Client, step: Callable[[Client], None]) -> None:
        """Whatever one client makes go wrong costs that client only: an error nobody foresaw
        is logged and the client dropped; the others keep being served."""
        try:
            step(client)
        except Exception:
            log.exception("%s: unexpected error; dropping it", client.name())
            try:
                self._drop(client, "dropped after an unexpected error", refused=True)
            except Exception:
                log.exception("%s: dropping it failed too", client.name())

    def _on_signal(self, sig: int, _: object) -> None:
        self.signals.append(sig)

    def _signal(self, sig: int) -> None:
        if sig == signal.SIGUSR1:  # --record: write the working set recorded so far
            if self.active is not None:
                self.active.send({"op": "end_recording"})
            return
        if sig == signal.SIGHUP:
            if not self.stopping:
                self._start_upgrade()
            return
        if self.stopping:
            return
        self.stopping = True
        log.info("stopping (%s): %d client(s) attached, on stop: %s",
                 signal.Signals(sig).name, len(self.clients), self.on_stop)  # fmt: skip
        with contextlib.suppress(KeyError):  # (not watched while out of fds)
            self.selector.unregister(self.listener)
        self.listener.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        for client in list(self.pending.values()):
            self._drop(client, "refused: the server is stopping", refused=True)
        if self.upgrade is not None and self.upgrade is not self.active:
            self._retire(self.upgrade, kill=True)
        self.upgrade = None
        if self.active is not None or not self.clients:
            for spare in list(self.spares):
                self._retire(spare, kill=True)
        if self.active is not None:
            self._tell_stop(self.active)

    def _tell_stop(self, worker: Worker) -> None:
        worker.send({"op": "stop", "on_stop": self.on_stop, "timeout": self.stop_timeout})
        self.stop_pid = worker.pid
        self.stop_deadline = time.monotonic() + self.stop_timeout + 10

    def _finished(self) -> bool:
        if not self.stopping:
            return False
        if self.active is not None:
            if time.monotonic() > self.stop_deadline:
                log.error("the serving process did not stop in time: killing it")
                self.active.kill()
            return False
        if self.leaving:
            return False
        # No serving process: clients left are abandoned, unless a spare is about to drain them.
        return not (self.clients and self.spares)

    def _close(self) -> None:
        for client in list(self.clients.values()):
            if client.served_by != self.stop_pid:
                log.warning("stop %s: abandoned: it may hang on a page it has not got yet",
                            client.name())  # fmt: skip
            self._drop(client, "server stopped", quiet=True)
        for worker in [*self.spares, *self.leaving]:
            worker.kill()
            worker.reap()
        if not self.stopping:
            self.listener.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        self.selector.close()
        if self.parent_fd >= 0:
            os.close(self.parent_fd)
        if self.memory_fd >= 0:
            os.close(self.memory_fd)
        if self.metrics_server is not None:
            self.metrics_server.shutdown()
            self.metrics_server.server_close()

    def _tick(self) -> None:
        now = time.monotonic()
        if self.accept_again and now >= self.accept_again and not self.stopping:
            self.accept_again = 0.0
            self.selector.register(self.listener, selectors.EVENT_READ, ("listener", None))
        for client in list(self.pending.values()):
            if now - client.connected > HANDSHAKE_TIMEOUT:
                self._guarded(
                    client, lambda c: self._drop(c, "refused: no hand-off message in time", True)
                )
        for worker in self.leaving:
            if now - worker.started > RELEASE_TIMEOUT and worker.proc.poll() is None:
                worker.kill()
        if (
            not self.stopping
            and not self.spares
            and self.upgrade is None
            and now >= self.next_spawn
        ):
            self._try_spawn()

    # serving processes

    def _spawn(self) -> Worker:
        self.next_spawn = time.monotonic() + RESPAWN_INTERVAL
        worker = Worker(self.config, self.memory_fd)
        self.spares.append(worker)
        self.selector.register(worker.sock, selectors.EVENT_READ, ("ctl", worker))
        self.selector.register(worker.pidfd, selectors.EVENT_READ, ("exit", worker))
        log.debug("started serving process %d (standby)", worker.pid)
        return worker

    def _try_spawn(self) -> None:
        """A standby, unless this process is short of something (out of fds, say): then it is
        tried again after RESPAWN_INTERVAL, and the supervisor keeps its clients meanwhile."""
        try:
            self._spawn()
        except OSError as e:
            log.warning("cannot start a serving process: %s; retrying in %.1f s",
                        e, RESPAWN_INTERVAL)  # fmt: skip

    def _from_worker(self, worker: Worker) -> None:
        try:
            data = worker.sock.recv(1 << 22)
        except OSError:
            data = b""
        if not data:  # it is exiting; handled when its pidfd becomes readable
            self.selector.unregister(worker.sock)
            return
        msg = json.loads(data)
        event = msg["event"]
        if event == "failed" and not self.served and self.fatal is None:
            # Nothing was ever served: what failed is the configuration (a stored snapshot
            # that cannot be opened), not a crash a replacement would get past.
            self.fatal = msg["error"]
            self._signal(signal.SIGTERM)
        elif event == "ready":
            self.served = True
            worker.ready = True
            self._ready(worker)
        elif event == "gone" and worker is self.active:
            client = self.clients.get(msg["number"])
            if client is not None:
                self._drop(client, msg["why"], quiet=True)
        elif event == "stats" and worker is self.active:
            self.metrics.update(msg["clients"])

    def _ready(self, worker: Worker) -> None:
        log.debug("serving process %d is ready", worker.pid)
        if worker is self.upgrade and self.active is not None:
            log.info("upgrade: serving process %d hands its clients to %d",
                     self.active.pid, worker.pid)  # fmt: skip
            self.active.send({"op": "release"})
            self._retire(self.active, kill=False)
            self.active = None
        if self.active is None and not self.leaving:
            self._promote(worker)

    def _promote(self, worker: Worker) -> None:
        """worker becomes the serving process and gets every client (its predecessor has
        exited: no two processes serve one uffd)."""
        if worker in self.spares:
            self.spares.remove(worker)
        if worker is self.upgrade:
            self.upgrade = None
        self.active = worker
        resumed = [c for c in self.clients.values() if c.served_by]
        for client in self.clients.values():
            self._attach(client)
        if resumed:
            log.info("serving process %d took over %d client(s)", worker.pid, len(resumed))
        else:
            log.info("serving process %d serves", worker.pid)
        if self.stopping:
            self._tell_stop(worker)

    def _retire(self, worker: Worker, kill: bool) -> None:
        if worker in self.spares:
            self.spares.remove(worker)
        worker.started = time.monotonic()  # RELEASE_TIMEOUT counts from now
        self.leaving.append(worker)
        if kill:
            worker.kill()

    def _exited(self, worker: Worker) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(worker.sock)
        self.selector.unregister(worker.pidfd)
        code = worker.reap()
        if worker in self.leaving:
            self.leaving.remove(worker)
            log.debug("serving process %d ended (%s)", worker.pid, _describe_exit(code))
        elif worker is self.active:
            self.active = None
            self.metrics.worker_ended()
            if self.stopping:
                log.info("serving process %d stopped (%s)", worker.pid, _describe_exit(code))
            else:
                log.warning(
                    "serving process %d ended (%s) while serving %d client(s): replacing it",
                    worker.pid, _describe_exit(code), len(self.clients),
                )  # fmt: skip
        else:
            if worker in self.spares:
                self.spares.remove(worker)
            if worker is self.upgrade:
                self.upgrade = None
                log.error("upgrade failed: the new serving process %d ended (%s)",
                          worker.pid, _describe_exit(code))  # fmt: skip
            elif not self.stopping:
                log.warning("standby serving process %d ended (%s)", worker.pid,
                            _describe_exit(code))  # fmt: skip
        if worker is not self.active and self.active is None and not self.leaving:
            ready = [w for w in ([self.upgrade] if self.upgrade else []) + self.spares if w.ready]
            if ready:
                self._promote(ready[0])
            elif not self.spares and self.upgrade is None and not self.stopping:
                self._try_spawn()  # no spare: start one now, whatever the respawn interval

    def _start_upgrade(self) -> None:
        if self.upgrade is not None:
            return
        log.info("upgrade: starting a new serving process")
        for spare in list(self.spares):  # started from the old code
            self._retire(spare, kill=True)
        self.upgrade = self._spawn()
        self.spares.remove(self.upgrade)

    def _attach(self, client: Client) -> None:
        assert self.active is not None
        if self.active.send({"op": "attach", "client": client.describe(),
                             "resumed": bool(client.served_by)}, (client.uffd,)):  # fmt: skip
            client.served_by = self.active.pid

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
        self.pending[client.number] = client
        self.selector.register(conn, selectors.EVENT_READ, ("pending", client))

    def _pause_accepting(self, e: OSError) -> None:
        """Out of fds, the listener stays readable and every accept fails: without a pause the
        loop would spin (and log) at full speed. Connections wait in the backlog meanwhile."""
        if not self.short_of_fds:
            log.warning("cannot accept connections: %s; retrying every %.1f s", e, ACCEPT_PAUSE)
            self.short_of_fds = True
        self.selector.unregister(self.listener)
        self.accept_again = time.monotonic() + ACCEPT_PAUSE

    def _handshake(self, client: Client) -> None:
        """Reads what has arrived of the hand-off, without waiting for the rest: a client
        sending it slowly holds up nobody (and is refused after HANDSHAKE_TIMEOUT)."""
        try:
            if not client.reader.feed(client.conn):
                return
            fds, client.reader.fds = client.reader.fds, []
            client.uffd, client.regions = accept_handoff(client.reader.data, fds, self.memory_size)
        except (HandoffError, ConnectionError, OSError) as e:
            self._drop(client, f"refused: {e}", refused=True)
            return
        del self.pending[client.number]
        self.selector.unregister(client.conn)
        self._add_client(client, restored=False)

    def _add_client(self, client: Client, restored: bool) -> None:
        self.clients[client.number] = client
        self.selector.register(client.conn, selectors.EVENT_READ, ("client", client))
        self.fdstore.store(client)
        if restored:
            client.served_by = -1  # an earlier supervisor's process served it: wake it too
            log.info("restored %s from the fd store", client.name())
        if self.active is not None:
            self._attach(client)

    def _readable(self, client: Client) -> None:
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

    def _drop(self, client: Client, why: str, refused: bool = False, quiet: bool = False) -> None:
        """Forgets client: the serving process stops serving it (and logs the disconnect with
        what it was served), its fds are closed."""
        self.pending.pop(client.number, None)
        known = self.clients.pop(client.number, None) is not None
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(client.conn)
        client.conn.close()
        client.reader.close()
        if refused:
            log.warning("%s %s", client.name(), why)
        if known:
            self.fdstore.remove(client)
            self.metrics.client_ended(client.number)
            served = self.active is not None and client.served_by == self.active.pid
            if served and not quiet:
                self.active.send({"op": "detach", "number": client.number, "why": why})  # type: ignore[union-attr]
            elif not quiet:
                log.info("disconnect %s: %s", client.name(), why)
        if client.uffd >= 0:
            os.close(client.uffd)
            client.uffd = -1


class FdStore:
    """systemd's file-descriptor store (sd_notify FDSTORE=1), when NOTIFY_SOCKET is set: each
    client's uffd, connection and description (a memfd holding JSON) is stored under names
    c<N>.uffd, c<N>.conn, c<N>.meta, the listening socket as "listener"; a restarted service
    gets them back as LISTEN_FDS. Without NOTIFY_SOCKET it does nothing."""

    def __init__(self, address: str | None, inherited: dict[str, int]) -> None:
        self.address = address
        self.inherited = inherited

    @classmethod
    def from_environment(cls) -> FdStore:
        address = os.environ.get("NOTIFY_SOCKET") or None
        if address and address.startswith("@"):
            address = "\0" + address[1:]
        inherited: dict[str, int] = {}
        if os.environ.get("LISTEN_PID") == str(os.getpid()):
            count = int(os.environ.get("LISTEN_FDS", "0"))
            names = os.environ.get("LISTEN_FDNAMES", "").split(":")
            for k in range(count):
                fd = 3 + k
                os.set_inheritable(fd, False)
                inherited[names[k] if k < len(names) else f"fd{fd}"] = fd
            for var in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
                os.environ.pop(var, None)  # not for our serving processes
        return cls(address, inherited)

    def notify(self, state: str, fds: list[int] | None = None) -> None:
        if not self.address:
            return
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            try:
                sock.connect(self.address)
                socket.send_fds(sock, [state.encode()], fds or [])
            except OSError as e:
                log.warning("sd_notify %r to %s failed: %s", state.split("\n")[0], self.address, e)

    def take_listener(self) -> socket.socket | None:
        fd = self.inherited.pop("listener", None)
        if fd is not None:
            return socket.socket(fileno=fd)
        return None

    def store_listener(self, listener: socket.socket) -> None:
        self.notify("FDSTORE=1\nFDNAME=listener", [listener.fileno()])

    def store(self, client: Client) -> None:
        if not self.address:
            return
        meta = os.memfd_create(f"userfaultfd-client-{client.number}", os.MFD_CLOEXEC)
        try:
            os.write(meta, json.dumps(client.describe()).encode())
            tag = f"c{client.number}"
            for what, fd in (("uffd", client.uffd), ("conn", client.conn.fileno()), ("meta", meta)):
                self.notify(f"FDSTORE=1\nFDNAME={tag}.{what}", [fd])
        finally:
            os.close(meta)

    def remove(self, client: Client) -> None:
        for what in ("uffd", "conn", "meta"):
            self.notify(f"FDSTOREREMOVE=1\nFDNAME=c{client.number}.{what}")

    def take_clients(self, memory_size: int | None) -> list[Client]:
        """The clients a previous supervisor stored (their fds are ours now)."""
        clients = []
        tags = sorted({name.split(".")[0] for name in self.inherited if name.startswith("c")})
        for tag in tags:
            fds = {
                what: self.inherited.pop(f"{tag}.{what}", -1) for what in ("uffd", "conn", "meta")
            }
            try:
                if min(fds.values()) < 0:
                    raise HandoffError(f"the fd store lacks part of {tag}")
                desc = json.loads(os.pread(fds["meta"], 1 << 20, 0))
                uffd, regions = accept_handoff(json.dumps(desc["regions"]).encode(),
                                               [fds["uffd"]], memory_size)  # fmt: skip
                fds["uffd"] = -1
                conn = socket.socket(fileno=fds["conn"])
                fds["conn"] = -1
                conn.setblocking(False)
                clients.append(Client(desc["number"], conn, desc["pid"], desc["uid"],
                                      uffd=uffd, regions=regions))  # fmt: skip
            except (HandoffError, OSError, ValueError, KeyError) as e:
                log.warning("fd store: cannot restore %s: %s", tag, e)
            finally:
                for fd in fds.values():
                    if fd >= 0:
                        os.close(fd)
        for name, fd in self.inherited.items():
            log.warning("fd store: ignoring unknown fd %r", name)
            os.close(fd)
        self.inherited = {}
        return clients


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
