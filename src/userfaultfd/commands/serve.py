"""``userfaultfd serve``: the daemon that serves Firecracker-style snapshot restores.

Two processes. The supervisor (supervisor.py) listens on the UNIX socket, takes each client's
hand-off (handoff.py) and keeps the client's uffd and region list; it never serves a fault. The
serving process, this module's :class:`ServingProcess`, gets each client from it and runs native
worker threads (the page server's engine) that serve the client's MISSING faults from the memory
file at ``offset + (address - base)``. A REMOVE event (balloon inflation) unregisters the range,
so the client later reads fresh zero pages, as Firecracker's example handler does. When the serving
process dies or is upgraded, the supervisor hands every client to a replacement.

Working sets: ``--record`` records the first client's first touches into a working-set file
(SIGUSR1 to the daemon ends it early); ``--replay`` installs a recorded set for every client in
the background while its faults are served first (working_set.py)."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import json
import logging
import os
import selectors
import signal
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from userfaultfd import _core
from userfaultfd._engine import Engine, Readahead, RegionSpec, parse_readahead
from userfaultfd.handoff import GuestRegion, parse_regions
from userfaultfd.stats import Stats
from userfaultfd.uffd import PAGE_SIZE
from userfaultfd.working_set import WorkingSet, plan_replay

from . import serve_log
from .supervisor import Supervisor, _listen  # noqa: F401 - _listen: part of this module's API

if TYPE_CHECKING:
    from userfaultfd.store.serving import StoreCache

log = logging.getLogger("userfaultfd.serve")
DRAIN_CHUNK = 8 << 20  # a stop's drain checks its deadline between chunks of this many bytes
REAP_INTERVAL = 0.2
STATS_INTERVAL = 0.5  # how often the serving process reports counters for --metrics


@dataclass
class Client:
    """A client as the serving process knows it: its uffd (a copy; the supervisor keeps the
    original) and the engine serving it."""

    number: int
    pid: int
    uid: int
    uffd: int
    regions: list[GuestRegion]
    engine: Engine | None = None
    ids: list[int] = field(default_factory=list)
    recording: bool = False  # its first touches are being recorded (--record)
    error_cursor: int = 0  # the engine's failure records logged so far
    connected: float = field(default_factory=time.monotonic)

    def name(self) -> str:
        return f"client {self.number} (pid {self.pid}, uid {self.uid})"

    def fields(self) -> dict[str, Any]:
        return {"client": self.number, "client_pid": self.pid, "client_uid": self.uid}

    def stats(self) -> Stats:
        assert self.engine is not None
        return self.engine.stats()

    @property
    def pages(self) -> int:
        return sum(r.size for r in self.regions) // PAGE_SIZE


class ServingProcess:
    """The serving process: one engine per client, clients given and taken by the supervisor
    over the control socket ``ctl`` (SOCK_SEQPACKET, one JSON message per packet)."""

    def __init__(
        self,
        ctl: socket.socket,
        memory_fd: int,
        *,
        address: str | None = None,
        cache_bytes: int = 1 << 30,
        fetch_timeout: float = 30.0,
        prefetch: bool = False,
        readahead: str = "adaptive",
        workers: int = 1,
        report_stats: bool = False,
        record: str | None = None,
        record_seconds: float | None = None,
        replay: WorkingSet | None = None,
        replay_threads: int = 1,
    ) -> None:
        self.ctl = ctl
        self.record_path = record  # None once the recording is written (one client is recorded)
        self.record_seconds = record_seconds
        self.record_deadline = float("inf")
        self.replay = replay
        self.replay_threads = replay_threads
        self.readahead = parse_readahead(readahead)
        self.prefetch = prefetch
        self.workers = workers
        self.report_stats = report_stats
        self.clients: dict[int, Client] = {}
        self.memory: _core.Mapping | None = None
        self.store_cache: StoreCache | None = None
        if address is not None:  # a snapshot in a store: each serving process opens its cache
            self.store_cache = _open_snapshot(address, cache_bytes, fetch_timeout, self)
            self.memory_size = self.store_cache.snapshot.size
        else:
            self.memory_size = os.lseek(memory_fd, 0, os.SEEK_END)  # a block device: st_size 0
            self.memory = _core.Mapping.__new__(_core.Mapping)
            self.memory._map_file(memory_fd, 0, self.memory_size, self.memory_size)
        self.stopping = False

    def run(self) -> None:
        """Serves until the supervisor says stop or release, or goes away."""
        self.send({"event": "ready"})
        selector = selectors.DefaultSelector()
        selector.register(self.ctl, selectors.EVENT_READ)
        last_stats = 0.0
        try:
            while not self.stopping:
                if selector.select(timeout=REAP_INTERVAL) and not self._control():
                    break
                self._reap()
                now = time.monotonic()
                if now >= self.record_deadline:
                    self._end_recording("time is up")
                if self.report_stats and now - last_stats >= STATS_INTERVAL:
                    last_stats = now
                    self.send({"event": "stats", "clients": self._all_stats()})
        finally:
            selector.close()
            for client in list(self.clients.values()):
                self._guarded(client, self._release)
            if self.memory is not None:
                self.memory.close()
            if self.store_cache is not None:
                self.store_cache.close()

    def report_poison(self, chunk: int, start: int, end: int, cause: str) -> None:
        """A chunk of a stored snapshot could not be served: log where its pages are in every
        client."""
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

    def _guarded(self, client: Client, step: Callable[[Client], None]) -> None:
        """Whatever one client makes go wrong costs that client only: an error nobody foresaw
        is logged and the client dropped (the supervisor told); the others keep being served."""
        try:
            step(client)
        except Exception:
            log.exception(
                "%s: unexpected error; dropping it",
                client.name(),
                extra={"fields": client.fields()},
            )
            self.clients.pop(client.number, None)
            self.send({"event": "gone", "number": client.number,
                       "why": "dropped after an unexpected error"})  # fmt: skip
            try:
                self._release(client)
            except Exception:
                log.exception("%s: dropping it failed too", client.name())

    def send(self, msg: dict[str, Any]) -> None:
        try:
            self.ctl.send(json.dumps(msg).encode())
        except OSError:  # the supervisor has gone: we are about to stop too
            self.stopping = True

    def _control(self) -> bool:
        """One message from the supervisor; False when it has gone."""
        try:
            data, fds, _, _ = socket.recv_fds(self.ctl, 1 << 20, 4)
        except OSError:
            return False
        if not data:
            return False
        msg = json.loads(data)
        op = msg["op"]
        if op == "attach":
            self._attach(msg, fds[0])
        elif op == "detach":
            client = self.clients.pop(msg["number"], None)
            if client is not None:
                self._guarded(client, lambda c: self._release(c, msg["why"]))
            self.send({"event": "detached", "number": msg["number"]})
        elif op == "end_recording":  # SIGUSR1 to the supervisor
            self._end_recording("asked to")
        elif op == "stop":
            self._stop(msg["on_stop"], float(msg["timeout"]))
            return False
        elif op == "release":  # an upgrade: our replacement takes over once we have exited
            log.info("handing %d client(s) over to a new serving process", len(self.clients))
            return False
        return True

    def _attach(self, msg: dict[str, Any], uffd: int) -> None:
        info = msg["client"]
        client = Client(info["number"], info["pid"], info["uid"], uffd, [])
        try:
            # (Checked here too: for a stored snapshot the supervisor does not know its size.)
            client.regions = parse_regions(json.dumps(info["regions"]).encode(), self.memory_size)
            self._start(client, resumed=msg["resumed"])
        except Exception as e:  # this client only: the others keep being served
            log.error(
                "%s: cannot serve it: %s", client.name(), e, extra={"fields": client.fields()}
            )
            self.send({"event": "gone", "number": client.number, "why": f"cannot serve it: {e}"})
            if client.engine is not None:
                client.engine.close()
            os.close(uffd)
            return
        self.clients[client.number] = client
        if msg["resumed"]:
            # Faults the previous serving process read but never answered: their threads
            # sleep until woken. Woken, they fault again, and this process reads those faults.
            for r in client.regions:
                _core.wake(uffd, r.base_host_virt_addr, r.size)
            log.info("resume %s", client.name(), extra={"fields": client.fields()})
        else:
            size = sum(r.size for r in client.regions)
            log.info(
                "connect %s: %d region(s), %d MiB", client.name(), len(client.regions), size >> 20,
                extra={"fields": {**client.fields(), "bytes": size}},
            )  # fmt: skip

    def _start(self, client: Client, resumed: bool) -> None:
        # A REMOVE (balloon inflation) unregisters the range: the guest reads fresh zero pages.
        engine = Engine(client.uffd, workers=self.workers, on_remove="zero", spin_ns=50_000)
        client.engine = engine
        # The first client is recorded, if asked, with readahead off: every first touch a fault.
        # (Not one taken over from a previous serving process: its first touches are past.)
        recorded = client.recording = (
            self.record_path is not None
            and not resumed
            and not any(c.recording for c in self.clients.values())
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

    def _end_recording(self, why: str) -> None:
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

    def _populate(self, client: Client, deadline: float | None) -> int:
        """Installs every page of the client's regions (chunk by chunk, stopping at deadline);
        returns the bytes not yet gone through. ECANCELED (the engine stopped) and ESRCH (the
        client's process has gone) end it early and quietly."""
        assert client.engine is not None
        left = sum(r.size for r in client.regions)
        for rid, region in zip(client.ids, client.regions, strict=True):
            for offset in range(0, region.size, DRAIN_CHUNK):
                if deadline is not None and time.monotonic() >= deadline:
                    return left
                length = min(DRAIN_CHUNK, region.size - offset)
                try:
                    client.engine.populate(rid, offset, length)
                except OSError as e:
                    if e.errno in (errno.ECANCELED, errno.ESRCH):
                        return left
                    raise
                left -= length
        return left

    def _all_stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for number, client in self.clients.items():
            report = dataclasses.asdict(client.stats())
            histogram = report.pop("histogram")
            out[str(number)] = {"pid": client.pid, "uid": client.uid, "stats": report,
                                "histogram": histogram}  # fmt: skip
        return out

    def _reap(self) -> None:
        for client in list(self.clients.values()):
            self._guarded(client, self._reap_client)

    def _reap_client(self, client: Client) -> None:
        assert client.engine is not None
        self._log_failures(client)
        if client.engine.info().client_gone:
            self.clients.pop(client.number)
            self._release(client, "its process exited")
            self.send({"event": "gone", "number": client.number, "why": "its process exited"})

    def _log_failures(self, client: Client) -> None:
        """A page that could not be produced is poisoned: the guest thread touching it dies of
        SIGBUS in the client, which cannot say why. The server says it, as it happens."""
        assert client.engine is not None
        client.error_cursor, errs = client.engine.errors(client.error_cursor)
        regions = dict(zip(client.ids, client.regions, strict=False))  # ids: as far as _start got
        for failure in errs:
            base = regions[failure.region].offset if failure.region in regions else 0
            log.error(
                "%s: poisoned the page at %#x (memory file offset %#x): %s (%s)",
                client.name(), failure.address, base + failure.offset,
                os.strerror(failure.errno), failure.op,
                extra={"fields": client.fields()},
            )  # fmt: skip

    def _stop(self, on_stop: str, timeout: float) -> None:
        """Drain (install every page each client still misses, all clients at once, for at most
        timeout seconds) or abandon; either way the log says how each client ended."""
        self.stopping = True
        self._end_recording("the server stops")
        if on_stop == "abandon":
            for client in self.clients.values():
                s = client.stats()
                log.warning(
                    "stop %s: abandoned; it may hang on the first page it touches that was "
                    "never installed (this process installed %d of its %d pages)",
                    client.name(), s.pages_installed, client.pages,
                    extra={"fields": {**client.fields(), "ended": "abandoned"}},
                )  # fmt: skip
            return
        if self.clients:
            log.info("stop: draining %d client(s), at most %.1f s", len(self.clients), timeout)
        deadline = time.monotonic() + timeout
        results: dict[int, tuple[int, int, float, str]] = {}

        def drain(client: Client) -> None:
            t0, before = time.monotonic(), client.stats().prefetched
            try:
                left = self._populate(client, deadline)
                how = "drained" if not left else "timed out"
            except OSError as e:
                left, how = -1, f"failed: {e}"
            assert client.engine is not None
            if client.engine.info().client_gone:
                how = "its process exited"
            installed = client.stats().prefetched - before
            results[client.number] = (installed, left, time.monotonic() - t0, how)

        threads = [threading.Thread(target=drain, args=(c,)) for c in self.clients.values()]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout + 5)
        for client in self.clients.values():
            installed, left, took, how = results.get(client.number, (0, -1, timeout, "timed out"))
            fields = {**client.fields(), "ended": how, "missing_pages": installed}
            if how in ("drained", "its process exited"):
                log.info(
                    "stop %s: %s; it was still missing %d page(s), installed in %.2f s",
                    client.name(), how, installed, took, extra={"fields": fields},
                )  # fmt: skip
            else:
                fields["unchecked_bytes"] = left
                log.warning(
                    "stop %s: %s after %.2f s; %d page(s) installed, up to %d more page(s) "
                    "never installed: it may hang on one of them",
                    client.name(), how, took, installed, max(left, 0) // PAGE_SIZE,
                    extra={"fields": fields},
                )  # fmt: skip

    def _release(self, client: Client, why: str | None = None) -> None:
        """Stops serving client and closes our copy of its uffd; with why, logs the
        disconnect and what the client was served. Safe to call again after it failed half
        way (_guarded): each resource is taken off the client as it is released."""
        engine, uffd = client.engine, client.uffd
        client.uffd = -1
        try:
            if engine is not None:
                engine.stop()
                if client.recording:
                    self._finish_recording(client, why or "handed over")
                self._log_failures(client)
                total = engine.stats()
                forks = engine.info().fork
                if why is not None:
                    log.info(
                        "disconnect %s: %s; demand faults %d, prefetched %d, pages %d, bytes %d, "
                        "races %d, errors %d, removes %d, forks %d",
                        client.name(), why, total.faults, total.prefetched, total.pages_installed,
                        total.bytes_installed, total.eexist, total.errors, total.removes, forks,
                        extra={"fields": {**client.fields(), "why": why}},
                    )  # fmt: skip
        finally:
            client.engine = None  # (a second _release, after a failed one, finds nothing left)
            if engine is not None:
                engine.close()
            if uffd >= 0:
                os.close(uffd)


def worker_main() -> None:
    """The serving process: argv[1] is its configuration (JSON), fds ctl and memory inherited."""
    config = json.loads(sys.argv[1])
    serve_log.configure(config["log_format"], config["verbosity"], "serving")
    # The supervisor decides when this process ends: a terminal's Ctrl-C must not stop it
    # unannounced, and it must not outlive the supervisor (a replacement would race it).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    _die_with_parent()
    ctl = socket.socket(fileno=config["ctl"])
    try:
        serving = _serving_process(ctl, config)
    except (OSError, ValueError) as e:  # a stored snapshot that cannot be opened, say
        log.error("cannot serve: %s", e)
        with contextlib.suppress(OSError):
            ctl.send(json.dumps({"event": "failed", "error": str(e)}).encode())
        sys.exit(1)
    if config["memory_fd"] >= 0:
        os.close(config["memory_fd"])
    serving.run()
    sys.exit(0)


def _serving_process(ctl: socket.socket, config: dict[str, Any]) -> ServingProcess:
    return ServingProcess(
        ctl,
        config["memory_fd"],
        address=config["address"],
        cache_bytes=config["cache_bytes"],
        fetch_timeout=config["fetch_timeout"],
        prefetch=config["prefetch"],
        readahead=config["readahead"],
        workers=config["workers"],
        report_stats=config["report_stats"],
        record=config["record"],
        record_seconds=config["record_seconds"],
        replay=WorkingSet.load(config["replay"], page_size=PAGE_SIZE) if config["replay"] else None,
        replay_threads=config["replay_threads"],
    )


def _die_with_parent() -> None:
    import ctypes

    pr_set_pdeathsig = 1
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")
    if os.getppid() == 1:  # the supervisor died before the prctl
        sys.exit(1)


def main(args: argparse.Namespace) -> int:
    serve_log.configure(args.log_format, args.verbosity, "supervisor")
    parse_readahead(args.readahead)  # bad input is refused before anything starts
    replay = WorkingSet.load(args.replay, page_size=PAGE_SIZE) if args.replay else None
    supervisor = Supervisor(
        args.socket,
        args.memory,
        prefetch=args.prefetch == "all",
        readahead=args.readahead,
        allow_uids=tuple(args.allow_uid),
        workers=args.workers,
        on_stop=args.on_stop,
        stop_timeout=args.stop_timeout,
        metrics=args.metrics,
        log_format=args.log_format,
        verbosity=args.verbosity,
        working_sets={"record": args.record, "record_seconds": args.record_seconds,
                      "replay": args.replay, "replay_threads": args.replay_threads},
        cache_bytes=args.cache_size,
        fetch_timeout=args.fetch_timeout,
        exit_with=args.exit_with,
    )  # fmt: skip
    size = supervisor.memory_size  # None for a stored snapshot: the supervisor never opens it
    if replay is not None and size is not None:  # said once here, not by every serving process
        beyond = sum(max(0, o + n - max(o, size)) for o, n in replay) // PAGE_SIZE
        if beyond:
            log.warning(
                "%d page(s) of the working set lie beyond the memory file's %d bytes: ignored",
                beyond, size,
            )  # fmt: skip
    return supervisor.run()


def _open_snapshot(
    address: str, budget: int, fetch_timeout: float, serving: ServingProcess
) -> StoreCache:
    from userfaultfd.store import SnapshotStore
    from userfaultfd.store.serving import StoreCache

    store, name = SnapshotStore.at(address, timeout=min(30.0, fetch_timeout))
    return StoreCache(
        store.open(name), budget=budget, fetch_timeout=fetch_timeout,
        on_poison=serving.report_poison,
    )  # fmt: skip
