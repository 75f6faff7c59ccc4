"""The seam between Python and the native engine (_native/engine.c): the one module that calls
``_core.Engine``. Keyword arguments in, named results out (_ntuples.py); the engine's enums come
from _core, never retyped here. PageServer and the ``serve`` daemon both serve through it."""

from __future__ import annotations

import array
import contextlib
from dataclasses import dataclass, field
from typing import Literal

from . import _core
from ._ntuples import EngineInfo, Failure, Piece
from .stats import Stats
from .uffd import PAGE_SIZE

Mode = Literal["thread", "sigbus"]
OnRemove = Literal["refill", "zero"]
ADAPTIVE_MIN, ADAPTIVE_MAX = 64 << 10, 4 << 20  # CRIU's lazy-pages daemon grows 64 KiB -> 4 MiB


@dataclass(frozen=True)
class Readahead:
    """What is installed after each fault: ``fixed`` more units, or, when ``adaptive_max`` is
    set, a window of ``adaptive_min`` bytes growing to ``adaptive_max`` on sequential streams."""

    fixed: int = 0
    adaptive_min: int = 0
    adaptive_max: int = 0

    def for_unit(self, page_size: int) -> Readahead:
        """The same, with an adaptive window of at least one unit."""
        if not self.adaptive_max:
            return self
        return Readahead(
            self.fixed, max(self.adaptive_min, page_size), max(self.adaptive_max, page_size)
        )


def parse_readahead(value: int | str) -> Readahead:
    """A page count (an int, or its text as on the command line), "adaptive" or "none"."""
    if value == "adaptive":
        return Readahead(0, ADAPTIVE_MIN, ADAPTIVE_MAX)
    if value == "none":
        return Readahead()
    pages = -1
    if isinstance(value, int):
        pages = value
    elif isinstance(value, str):
        with contextlib.suppress(ValueError):
            pages = int(value)
    if pages < 0:
        raise ValueError(f"readahead {value!r} is not a page count >= 0, 'adaptive' or 'none'")
    return Readahead(fixed=pages)


@dataclass(frozen=True)
class RegionSpec:
    """A region for the engine: ``length`` bytes at ``start`` installed in ``page_size`` units,
    produced as ``kind`` (a _core.SRC_* source kind) says from ``base_len`` bytes at ``base``
    (and a padded last unit at ``tail``)."""

    start: int
    length: int
    page_size: int
    kind: int
    base: int = 0
    base_len: int = 0
    tail: int = 0
    can_zeropage: bool = True  # UFFDIO_ZEROPAGE works here (not on hugetlb)
    readahead: Readahead = field(default_factory=Readahead)
    label: str | None = None  # what it serves, for the line a poisoned page's toucher leaves


class Engine:
    """Native fault serving for one uffd. ``mode``: "thread" (``workers`` native threads read the
    faults) or "sigbus" (the faulting thread installs its own page). ``on_remove``: after
    MADV_DONTNEED/MADV_REMOVE, "refill" serves the range again, "zero" unregisters it.
    ``spin_ns``: how long a worker that just served polls before it sleeps."""

    def __init__(
        self,
        uffd: int,
        *,
        mode: Mode = "thread",
        workers: int = 1,
        on_remove: OnRemove = "refill",
        spin_ns: int = 50_000,
    ) -> None:
        self._native = _core.Engine(
            uffd,
            mode=_core.MODE_SIGBUS if mode == "sigbus" else _core.MODE_THREAD,
            workers=workers,
            remove_policy=_core.REMOVE_REFILL if on_remove == "refill" else _core.REMOVE_UNREGISTER,
            base_page=PAGE_SIZE,
            spin_ns=spin_ns,
        )

    def start(self) -> None:
        self._native.start()

    def stop(self) -> None:
        self._native.stop()

    def close(self) -> None:
        self._native.close()

    def add_region(self, spec: RegionSpec) -> int:
        """Serve the region from now on; its id."""
        readahead = spec.readahead.for_unit(spec.page_size)
        return self._native.add_region(
            start=spec.start,
            length=spec.length,
            page_size=spec.page_size,
            kind=spec.kind,
            base=spec.base,
            base_len=spec.base_len,
            tail=spec.tail,
            can_zeropage=spec.can_zeropage,
            readahead=readahead.fixed,
            adaptive_min=readahead.adaptive_min,
            adaptive_max=readahead.adaptive_max,
            label=spec.label,
        )

    def remove_region(self, region: int) -> None:
        self._native.remove_region(region)

    def populate(self, region: int, offset: int, length: int) -> None:
        """Install every page of the range now (the GIL is released)."""
        self._native.populate(region, offset, length)

    def stats(self, region: int = -1) -> Stats:
        """What the region (-1: every region) has served."""
        return Stats.from_engine(self._native.stats(region))

    def pieces(self, region: int) -> list[Piece]:
        return [Piece(*p) for p in self._native.pieces(region)]

    def errors(self, cursor: int) -> tuple[int, list[Failure]]:
        """The failures recorded since ``cursor``, and the cursor to pass next time."""
        cursor, errs = self._native.errors(cursor)
        return cursor, [Failure(*e) for e in errs]

    def info(self) -> EngineInfo:
        gone, remove, unmap, remap, unknown, fork = self._native.info()
        return EngineInfo(bool(gone), remove, unmap, remap, unknown, fork)

    # working sets (working_set.py)

    def record_start(self, region: int) -> None:
        """Record the first touch of every granule of the region from now on."""
        self._native.record_start(region)

    def record_finish(self, region: int) -> list[tuple[int, int]]:
        """End the recording: its (offset in the region, ns since the start) first touches, in
        order. Again: the same."""
        raw = array.array("Q", self._native.record_finish(region))
        return list(zip(raw[0::2], raw[1::2], strict=True))

    def replay(self, runs: bytes, *, threads: int, speculative: bool = False) -> None:
        """Install ``runs`` (working_set.plan_replay) in the background, faults first.
        ``speculative``: runs nobody predicted (the rest of the memory), installed only with CPU
        time that would otherwise idle."""
        self._native.replay(runs, threads=threads, speculative=speculative)

    def replays_running(self) -> int:
        return self._native.replays_running()

    def set_wp(self, region: int, context: _core.WpContext | None) -> None:
        """The region's pages are installed write-protected and its WP faults go to ``context``
        (tracking.py), served natively; None: back to plain installs. The context must outlive
        the next call."""
        self._native.set_wp(region, None if context is None else context.capsule())
