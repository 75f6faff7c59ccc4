"""The page server: regions whose pages arrive on first touch, served by native code.

Two modes. ``thread``: native worker threads read fault messages and install pages. ``sigbus``
(UFFD_FEATURE_SIGBUS): the faulting thread installs its own page from a native SIGBUS handler, with
no message and no context switch. Either way no Python runs on the fault path, so any Python thread,
the main thread included, may touch region memory while holding the GIL."""

from __future__ import annotations

import atexit
import contextlib
import errno
import mmap
import os
import threading
import time
import warnings
import weakref
from typing import TYPE_CHECKING, Any, Literal

from . import _core
from ._engine import Engine, Mode, OnRemove, RegionSpec, parse_readahead
from ._ntuples import Failure, SourceFailure
from ._regions import exported, in_forked_child, registering, warn_detaching
from .errors import SourceError, expect_int, source_error
from .flags import MAP_HUGETLB, MAP_NORESERVE, Feature, RegisterMode
from .progress import populate_in_slices
from .sources import Buffer, Prepared, Source, Zero
from .stats import Stats
from .uffd import PAGE_SIZE, Userfaultfd, available_features
from .working_set import WorkingSet, plan_replay

if TYPE_CHECKING:
    from .tracking import Snapshot, WriteTracker

HUGE_PAGE_SIZE = 2 << 20

Memory = Literal["anonymous", "shmem", "hugetlb"]

_servers: weakref.WeakSet[PageServer] = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    for server in list(_servers):
        with contextlib.suppress(SourceError):  # nobody is left to report to
            server._shutdown(at_exit=True)


def _guard_forked_child() -> None:
    """In a forked child, regions that are not served there (not inherited) get a guard: a
    touch prints which region it was and why before the SIGSEGV kills the child."""
    guards = []
    for server in list(_servers):
        if server.serves_forks or server.closed:
            continue
        if server.mode == "sigbus":
            why = "a sigbus-mode server serves only the process that created it"
        elif not server._forks_asked:
            why = "its server was created with serve_forks=False"
        else:
            why = "the kernel refused UFFD_FEATURE_EVENT_FORK (it needs CAP_SYS_PTRACE)"
        for region in list(server._regions.values()):
            if region.closed:
                continue
            message = (
                f"userfaultfd: process {os.getpid()} (a forked child) touched {region!r}, which "
                f"is not mapped in forked children: {why}. Create the region in the child, or "
                "start children with 'spawn'.\n"
            )
            guards.append((region.address, region.address + len(region), message))
    if guards:
        _core.fork_guard(guards)


os.register_at_fork(after_in_child=_guard_forked_child)


class Region(_core.Mapping):
    """Memory whose pages come from a source on first touch. Supports the buffer protocol
    (``numpy.frombuffer(region)``, ``memoryview(region)``), ``region[i]`` and ``region[a:b]``.

    In sigbus mode a system call handed a not-yet-served part of the region fails with EFAULT
    (the kernel does not fault for it): call :meth:`populate` on such ranges first."""

    server: PageServer
    id: int
    source: Source
    page_size: int
    memory: str

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._prepared: Prepared | None = None
        self._served = True  # False once detached: plain memory
        self._recording = False
        self._working_set: WorkingSet | None = None

    def populate(
        self, offset: int = 0, length: int | None = None, *, progress: bool = False
    ) -> None:
        """Install every page of ``[offset, offset + length)`` now (the GIL is released).
        Ctrl-C interrupts it within tens of milliseconds (KeyboardInterrupt; what was installed
        stays). ``progress``: show a tqdm bar (``pip install 'userfaultfd[progress]'``), or a
        plain stderr line without tqdm."""
        self._check_served()
        expect_int("populate offset", offset)
        length = len(self) - offset if length is None else expect_int("populate length", length)
        if offset < 0 or length < 0 or offset + length > len(self):
            raise ValueError(
                f"populate: range {offset}+{length} is outside the region of {len(self)} bytes"
            )
        self.server._check()
        engine = self.server._engine
        populate_in_slices(
            lambda at, n: engine.populate(self.id, at, n), offset, length, self.page_size, progress
        )
        self.server._check()

    def track_writes(self) -> WriteTracker:
        """Track writes to this region (see :func:`userfaultfd.track_writes`): the engine serves
        its WP faults natively beside its missing pages, and pages it installs to serve a read
        are installed write-protected, so they do not count as written."""
        from .tracking import track_writes

        return track_writes(self)

    def snapshot(
        self,
        dest: str | os.PathLike[str],
        *,
        parent: Snapshot | str | None = None,
        wait: bool = True,
    ) -> Snapshot:
        """A live snapshot of this region (see :func:`userfaultfd.snapshot`); pages not served
        yet are served from the source as the copy reaches them."""
        from .tracking import snapshot

        return snapshot(self, dest, parent=parent, wait=wait)

    def stats(self) -> Stats:
        """What this region has served so far. A page is counted before its toucher resumes;
        the fault's latency sample is taken just after."""
        self._check_served()
        return self.server._engine.stats(self.id)

    def _check_served(self) -> None:
        if self.closed:
            raise ValueError(f"region {self.id} is closed")
        if not self._served:
            raise ValueError(f"region {self.id} was detached from its server as it closed")

    def working_set(self) -> WorkingSet:
        """The first touches recorded since the region was mapped with ``record=True``, in
        region offsets. Ends the recording (as closing the region or the server does); later
        calls return the same set."""
        if self._working_set is None:
            if not self._recording:
                raise ValueError(f"{self!r} was not mapped with record=True")
            self.server._check_open()
            self._finish_recording()
        assert self._working_set is not None
        return self._working_set

    def _finish_recording(self) -> None:
        if self._recording and self._working_set is None:
            touches = self.server._engine.record_finish(self.id)
            self._working_set = WorkingSet.from_touches(touches, self.page_size, len(self))

    def close(self) -> None:
        """Unmap the region and stop serving it. BufferError while exported buffers exist."""
        if self.closed:
            return
        if self.exports and self._served:
            from .tracking import holder

            held = holder(self)
            if held:
                raise BufferError(f"{self!r} cannot be closed: it is held by {held}")
        if self.exports or not self._served:
            super().close()  # raises BufferError naming the count, or unmaps plain memory
            return
        self._unmap_and_forget()
        self.server._check()

    def _unmap_and_forget(self) -> None:
        server = self.server
        # Under the server's lock: no region can be mapped at this address until the engine has
        # dropped it, or the UNMAP event for this range would drop the newcomer too.
        with server._lock:
            # Unmap exactly the pieces the region still has: where the application moved them
            # (mremap), and not what it unmapped itself (something else may live there now).
            pieces = server._engine.pieces(self.id)
            self._rebase(0)
            for start, end, _ in pieces:
                _core.munmap(start, end - start)  # the engine reads the UNMAP event
            deadline = time.monotonic() + 5.0
            while server._engine.pieces(self.id) and time.monotonic() < deadline:
                time.sleep(0.0005)  # the event is read; the worker applies it next
            self._forget()

    def _detach(self) -> None:
        """Install every page, then unregister: exported views keep reading correct data."""
        from .tracking import finish_copies

        server = self.server
        finish_copies(self)  # a live snapshot of it needs the engine until its copy is complete
        server._engine.populate(self.id, 0, len(self))
        for start, end, _ in server._engine.pieces(self.id):
            server._uffd.unregister(start, end - start)
        self._forget()
        self._served = False

    def _forget(self) -> None:
        """The engine stops serving the region; its source is released."""
        self._finish_recording()
        self.server._engine.remove_region(self.id)
        self.server._regions.pop(self.id, None)
        if self._prepared:
            self._prepared.release()
            self._prepared = None

    def __enter__(self) -> Region:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"at {self.address:#x}"
        return f"<Region {self.id} {len(self)} bytes {self.memory} {state} from {self.source!r}>"


def _open_uffd(wanted: Feature, forks: bool) -> Userfaultfd:
    """A uffd with wanted, plus EVENT_FORK if forks and the kernel grants it (it needs
    CAP_SYS_PTRACE: EPERM otherwise)."""
    if forks and Feature.EVENT_FORK in available_features():
        try:
            return Userfaultfd(wanted | Feature.EVENT_FORK)
        except PermissionError:
            pass
    return Userfaultfd(wanted)


class PageServer:
    """Owns a uffd and serves the faults of the regions it maps.

    ``mode``: "thread" (``workers`` native threads) or "sigbus" (the faulting thread resolves its
    own fault). ``on_remove``: after MADV_DONTNEED/MADV_REMOVE, "refill" serves the pages again
    from the source; "zero" unregisters the range so it reads fresh zero pages. ``spin_us``: how
    long a worker that just served keeps polling before it sleeps; waking an idle vCPU costs more
    than a fault in a VM (0 never spins). ``serve_forks``: in thread mode, ask for EVENT_FORK so
    that forked children keep the regions and are served (where the kernel grants it); False
    leaves children without them (a touch there names the region before its SIGSEGV)."""

    def __init__(
        self,
        mode: Mode = "thread",
        workers: int = 2,
        *,
        on_remove: OnRemove = "refill",
        spin_us: float = 50.0,
        serve_forks: bool = True,
    ) -> None:
        if mode not in ("thread", "sigbus"):
            raise ValueError(f"mode {mode!r} is not 'thread' or 'sigbus'")
        expect_int("workers", workers)
        if not isinstance(spin_us, (int, float)) or isinstance(spin_us, bool):
            raise TypeError(f"spin_us {spin_us!r} is a {type(spin_us).__name__}, not a number")
        if not 1 <= workers <= 64:
            raise ValueError(f"workers {workers!r} is not in 1..64")
        if not 0 <= spin_us <= 1e6:
            raise ValueError(f"spin_us {spin_us!r} is not in 0..1000000")
        if on_remove not in ("refill", "zero"):
            raise ValueError(f"on_remove {on_remove!r} is not 'refill' or 'zero'")
        self.mode = mode
        wanted = Feature.EVENT_REMOVE | Feature.EVENT_UNMAP | Feature.EVENT_REMAP | Feature.POISON
        wanted |= available_features() & (Feature.MINOR_SHMEM | Feature.MINOR_HUGETLBFS)
        # Write protection on demand (Region.track_writes, Region.snapshot), served by the engine
        wanted |= available_features() & (Feature.PAGEFAULT_FLAG_WP | Feature.WP_HUGETLBFS_SHMEM)
        if mode == "sigbus":
            wanted |= Feature.SIGBUS
        self._uffd = _open_uffd(wanted, forks=mode == "thread" and serve_forks)
        # With EVENT_FORK a forked child keeps the regions, and the engine serves its faults
        # (the child's uffd arrives with the FORK event).
        self.serves_forks = Feature.EVENT_FORK in self._uffd.features
        self._forks_asked = serve_forks
        self._pid = os.getpid()
        self._lock = threading.RLock()
        self._regions: dict[int, Region] = {}
        self._error_cursor = 0
        self._pending_errors: list[Failure] = []
        self._engine = Engine(
            self._uffd.fileno(),
            mode=mode,
            workers=workers,
            on_remove=on_remove,
            spin_ns=int(spin_us * 1000),
        )
        try:
            self._engine.start()
        except BaseException:
            self._engine.close()
            self._uffd.close()
            raise
        _servers.add(self)

    @property
    def closed(self) -> bool:
        return self._uffd.closed

    @property
    def uffd(self) -> Userfaultfd:
        return self._uffd

    def map(
        self,
        length: int,
        source: Source | None = None,
        *,
        memory: Memory = "anonymous",
        page_size: int | None = None,
        readahead: int | Literal["adaptive"] = 0,
        record: bool = False,
        replay: WorkingSet | None = None,
        replay_threads: int = 1,
    ) -> Region:
        """Map ``length`` bytes served from ``source`` (default zeros).

        ``memory``: "anonymous" (private), "shmem" (shared anonymous) or "hugetlb" (2 MiB pages,
        needs reserved huge pages). A :class:`~userfaultfd.sources.Memfd` source maps that file
        itself and serves minor faults. ``page_size``: the unit installed per fault, a power-of-two
        multiple of the base page. ``readahead``: extra units installed after each fault, or
        "adaptive" (the faulting unit alone, then 64 KiB growing to 4 MiB on a stream).

        ``record``: record the first touches (:meth:`Region.working_set`); readahead must be off,
        so that every first touch is a fault. ``replay``: a working set (in region offsets)
        installed in the background, in its order, by ``replay_threads`` threads, while faults
        are served first; :meth:`Region.stats` counts those pages as ``prefetched``."""
        self._check()
        if record and readahead != 0:
            raise ValueError(f"readahead {readahead!r} with record=True: recording needs it off")
        if replay is not None and not isinstance(replay, WorkingSet):
            raise TypeError(f"replay {replay!r} is not a userfaultfd.WorkingSet")
        if not isinstance(replay_threads, int) or not 1 <= replay_threads <= 16:
            raise ValueError(f"replay_threads {replay_threads!r} is not in 1..16")
        if self.mode == "sigbus" and not _core.sigbus_first():
            raise RuntimeError(
                "another SIGBUS handler was installed after this server started (was "
                "faulthandler.enable() called?): it would take this server's faults as fatal "
                "errors. Install such handlers before creating a sigbus-mode server."
            )
        source = Zero() if source is None else source
        if not isinstance(source, Source):
            raise TypeError(f"source {source!r} is not a userfaultfd.sources.Source")
        if memory not in ("anonymous", "shmem", "hugetlb"):
            raise ValueError(f"memory {memory!r} is not 'anonymous', 'shmem' or 'hugetlb'")
        base = HUGE_PAGE_SIZE if memory == "hugetlb" else PAGE_SIZE
        page_size = base if page_size is None else expect_int("page_size", page_size)
        expect_int("length", length)
        if page_size < base or page_size & (page_size - 1):
            raise ValueError(f"page_size {page_size!r} is not a power-of-two multiple of {base}")
        if length <= 0 or length % page_size:
            raise ValueError(
                f"length {length!r} is not a positive multiple of page_size {page_size}"
            )
        ahead = parse_readahead(readahead)

        prepared = source.prepare(length, page_size)
        if prepared.kind == _core.SRC_CACHE and self.mode == "sigbus":
            # A miss waits for a fetcher thread: a SIGBUS handler cannot wait in the toucher.
            raise ValueError(f"{source!r} is served in thread mode only, not by this sigbus-mode "
                             "PageServer: use PageServer(mode='thread')")  # fmt: skip
        mode = RegisterMode.MISSING
        if prepared.kind == _core.SRC_CONTINUE:
            if memory == "hugetlb":
                raise ValueError("a Memfd source maps its own file: use memory='shmem'")
            flags, fd, memory = mmap.MAP_SHARED, prepared.memfd, "shmem"
            mode |= RegisterMode.MINOR
        elif memory == "shmem":
            flags, fd = mmap.MAP_SHARED | mmap.MAP_ANONYMOUS, -1
        elif memory == "hugetlb":
            flags, fd = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_HUGETLB, -1
        else:
            flags, fd = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_NORESERVE, -1
        with self._lock:
            try:
                region = Region(length, flags, fd, align=page_size)
            except OSError as e:
                prepared.release()
                if memory == "hugetlb" and e.errno == errno.ENOMEM:
                    raise OSError(
                        e.errno,
                        f"cannot map {length} bytes of hugetlb memory: reserve huge pages first "
                        "(vm.nr_hugepages)",
                    ) from None
                raise
            region.server, region.source = self, source
            region.page_size, region.memory = page_size, memory
            region._prepared = prepared
            # Without EVENT_FORK a forked child does not inherit the region; touching it there
            # is SIGSEGV with a message naming it (_guard_forked_child).
            with registering(self._uffd, region, mode, on_failure=prepared.release,
                             inherit=self.serves_forks):  # fmt: skip
                region.id = self._engine.add_region(
                    RegionSpec(
                        start=region.address,
                        length=length,
                        page_size=page_size,
                        kind=prepared.kind,
                        base=prepared.base,
                        base_len=prepared.base_len,
                        tail=prepared.tail,
                        can_zeropage=memory != "hugetlb",
                        readahead=ahead,
                        label=repr(source),
                    )
                )
                self._regions[region.id] = region
                if record:
                    self._engine.record_start(region.id)
                    region._recording = True
            if replay is not None:
                try:
                    self._replay(region, replay, replay_threads)
                except BaseException:
                    region.close()
                    raise
        return region

    def _replay(self, region: Region, ws: WorkingSet, threads: int) -> None:
        runs, beyond = plan_replay(ws, [(region.id, 0, len(region))], len(region))
        if beyond:
            warnings.warn(
                f"{beyond} page(s) of {ws!r} lie beyond the region's {len(region)} bytes: ignored",
                RuntimeWarning,
                stacklevel=3,
            )
        if runs:
            self._engine.replay(runs, threads=threads)

    def stats(self) -> Stats:
        """Totals over the regions currently mapped."""
        self._check_open()
        return self._engine.stats()

    def events(self) -> dict[str, int]:
        """Non-cooperative events handled so far."""
        self._check_open()
        info = self._engine.info()
        return {"remove": info.remove, "unmap": info.unmap, "remap": info.remap,
                "unknown": info.unknown, "fork": info.fork}  # fmt: skip

    def errors(self) -> list[Failure]:
        """Every source failure since the last call: (errno, region id, address, offset, op)."""
        self._collect()
        errs, self._pending_errors = self._pending_errors, []
        return errs

    def _collect(self) -> None:
        if not self.closed:
            self._error_cursor, errs = self._engine.errors(self._error_cursor)
            self._pending_errors.extend(errs)

    def _check_open(self) -> None:
        if self.closed:
            raise ValueError(f"this {self.mode}-mode PageServer is closed")

    def _check(self) -> None:
        """Raise ValueError once closed, SourceError for failures recorded since the last
        check."""
        self._check_open()
        errs = self.errors()
        if errs:
            first = errs[0]
            region = self._regions.get(first.region)
            where = (
                f"region {first.region} ({region.source!r})"
                if region
                else "an address in no region"
            )
            raise source_error(
                _source_failures(errs),
                f"{where} at offset {first.offset:#x}, address {first.address:#x}: "
                f"{os.strerror(first.errno)} ({first.op})",
            )

    def close(self, detach: Literal["populate", "error"] = "populate") -> None:
        """Unmap every region, stop the engine's threads, close the uffd. A region whose memory
        is still exported (a numpy array, a memoryview) cannot be unmapped under its views:
        ``detach="populate"`` installs every page it has not served yet, then unregisters it
        (the views keep reading correct data; the memory stays until they are gone), with a
        :class:`DetachWarning`; ``detach="error"`` raises BufferError instead, before anything
        is closed. Raises SourceError for failures not yet reported."""
        if not self.closed and os.getpid() == self._pid:
            if detach == "error":
                from .tracking import holder

                for region in self._viewed():
                    held = holder(region)
                    if held:
                        raise BufferError(f"cannot close: {region!r} is held by {held}")
            exported(self._viewed(), detach)
        self._shutdown(at_exit=False)

    def _viewed(self) -> list[Region]:
        """The regions exported beyond what this server's own Buffer sources hold of them
        (each holds one view of its region while it is served, released as it closes)."""
        held: dict[int, int] = {}
        for region in self._regions.values():
            if isinstance(region.source, Buffer) and region._prepared:
                held[id(region.source.obj)] = held.get(id(region.source.obj), 0) + 1
        return [r for r in self._regions.values() if r.exports > held.get(id(r), 0)]

    def _shutdown(self, at_exit: bool) -> None:
        if self.closed:
            return
        if in_forked_child(self._pid, self._regions.values()):  # engine, regions: the parent's
            self._regions.clear()
            self._engine.close()  # leaves the parent's threads alone
            self._uffd.close()  # this process's copy of the fd
            _servers.discard(self)
            return
        if at_exit and self._viewed():
            # A view alive at exit may still be read (a daemon thread, a later exit hook), and
            # an unregistered page reads as zeros: wrong data. Installing every page first could
            # hang the exit on a slow or stuck source, so the server is left as it is, serving
            # until the process ends (its threads and uffd go with it; nothing waits for them).
            return
        # Newest first: a region that is another's Buffer source is exported by that one,
        # and closing that one first releases it instead of detaching it.
        for region in reversed(list(self._regions.values())):
            if region.exports:
                how = f"installing every page of its {len(region)} bytes not yet served"
                warn_detaching(region, how, stacklevel=3)
                region._detach()
            else:
                region._unmap_and_forget()
        self._collect()
        self._engine.close()
        self._uffd.close()
        _servers.discard(self)
        if self._pending_errors:
            errs, self._pending_errors = self._pending_errors, []
            raise source_error(_source_failures(errs))

    def __enter__(self) -> PageServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self._shutdown(at_exit=False)  # as close(), the warning pointing at the with statement

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"{len(self._regions)} regions"
        return f"<PageServer {self.mode} {state}>"


def _source_failures(errs: list[Failure]) -> list[SourceFailure]:
    return [SourceFailure(e.errno, e.address, e.offset, e.op) for e in errs]
