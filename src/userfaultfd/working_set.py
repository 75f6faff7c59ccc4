"""Working sets: which pages of a memory image a restore touches, in the order it first touched
them, and when. Recorded by the engine on the fault path, saved in a small versioned binary file
(docs/working-sets.md), replayed ahead of the next restore."""

from __future__ import annotations

import errno
import os
import struct
import zlib
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

MAGIC = b"UFFDWSET"
VERSION = 1
# magic, version, page size, memory size, pages, runs, duration (ns), CRC-32 of the runs, reserved
HEADER = struct.Struct("<8sIIQQQQII")
# first page (index), page count, first-touch times of its first and last pages (ns since the
# start; the pages between are taken to be touched evenly in between)
RUN = struct.Struct("<QIQQ")
MAX_RUN_PAGES = 0xFFFFFFFF


class WorkingSetError(ValueError):
    """A working-set file that cannot be used; the message names the file and the problem."""


class WorkingSet:
    """Pages in first-touch order, coalesced into runs of consecutive pages.

    ``len()`` counts pages; iterating yields ``(offset, length)`` runs in bytes, in order;
    :attr:`runs` also carries each run's first-touch time. Offsets are in the source (the memory
    file, or the region for a :class:`~userfaultfd.PageServer` region)."""

    def __init__(
        self,
        page_size: int,
        memory_size: int,
        runs: Iterable[tuple[int, ...]] = (),
        duration_ns: int = 0,
    ) -> None:
        """``runs``: (first page index, page count, first-touch ns[, ns of its last page]) in
        order."""
        if not isinstance(page_size, int) or page_size < 1 or page_size & (page_size - 1):
            raise ValueError(f"page_size {page_size!r} is not a power of two")
        if not isinstance(memory_size, int) or memory_size < 0:
            raise ValueError(f"memory_size {memory_size!r} is not a byte count >= 0")
        self.page_size = page_size
        self.memory_size = memory_size
        self.duration_ns = duration_ns
        self._runs: list[tuple[int, int, int, int]] = []
        for first, count, ns, *last in runs:
            self._append(first, count, ns, last[0] if last else ns)
        self._pages = sum(run[1] for run in self._runs)

    def _append(self, first: int, count: int, ns: int, last_ns: int) -> None:
        if self._runs:
            p_first, p_count, p_ns, _ = self._runs[-1]
            if p_first + p_count == first and p_count + count <= MAX_RUN_PAGES:
                self._runs[-1] = (p_first, p_count + count, p_ns, last_ns)
                return
        self._runs.append((first, count, ns, last_ns))

    @classmethod
    def from_touches(
        cls,
        touches: Iterable[tuple[int, int]],
        page_size: int,
        memory_size: int,
        duration_ns: int | None = None,
    ) -> WorkingSet:
        """From (byte offset, ns) first touches in order; a page touched again is kept once,
        at its first touch."""
        ws = cls(page_size, memory_size)
        seen: set[int] = set()
        last = 0
        for offset, ns in touches:
            page = offset // page_size
            if page not in seen:
                seen.add(page)
                ws._append(page, 1, ns, ns)
                last = max(last, ns)
        ws._pages = len(seen)
        ws.duration_ns = last if duration_ns is None else duration_ns
        return ws

    # ---- reading it ----

    def __len__(self) -> int:
        return self._pages

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for first, count, _, _ in self._runs:
            yield first * self.page_size, count * self.page_size

    @property
    def runs(self) -> list[tuple[int, int, int]]:
        """(offset, length, first-touch ns) in bytes, in order."""
        return [(f * self.page_size, c * self.page_size, ns) for f, c, ns, _ in self._runs]

    @property
    def nbytes(self) -> int:
        return self._pages * self.page_size

    def pages(self) -> Iterator[tuple[int, int]]:
        """(byte offset, first-touch ns) of every page, in order."""
        for first, count, ns, last_ns in self._runs:
            step = (last_ns - ns) / (count - 1) if count > 1 else 0
            for k in range(count):
                yield (first + k) * self.page_size, ns + round(k * step)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, WorkingSet) and (self.page_size, self.memory_size, self._runs) == (
            other.page_size,
            other.memory_size,
            other._runs,
        )

    def __repr__(self) -> str:
        return (
            f"<WorkingSet {self._pages} pages of {self.page_size} bytes in {len(self._runs)} "
            f"runs, memory {self.memory_size} bytes>"
        )

    # ---- combining ----

    @classmethod
    def merge(cls, sets: Sequence[WorkingSet], min_count: int = 1) -> WorkingSet:
        """The pages seen in at least ``min_count`` of ``sets``, ordered by their mean first-touch
        time over the recordings that saw them."""
        if not sets:
            raise ValueError("merge needs at least one working set")
        for ws in sets:
            if not isinstance(ws, WorkingSet):
                raise TypeError(f"merge: {ws!r:.80} is not a WorkingSet (WorkingSet.load() it)")
        if not isinstance(min_count, int) or not 1 <= min_count <= len(sets):
            raise ValueError(f"min_count {min_count!r} is not in 1..{len(sets)}")
        page_size = sets[0].page_size
        for ws in sets:
            if ws.page_size != page_size:
                raise ValueError(
                    f"cannot merge working sets of {page_size}-byte and {ws.page_size}-byte pages"
                )
        seen: dict[int, list[int]] = {}  # page -> [count, sum of times]
        for ws in sets:
            for offset, ns in ws.pages():
                entry = seen.setdefault(offset // page_size, [0, 0])
                entry[0] += 1
                entry[1] += ns
        kept = sorted(
            (total / count, page) for page, (count, total) in seen.items() if count >= min_count
        )
        return cls(
            page_size,
            max(ws.memory_size for ws in sets),
            ((page, 1, round(mean)) for mean, page in kept),
            max(ws.duration_ns for ws in sets),
        )

    # ---- the file ----

    def to_bytes(self) -> bytes:
        body = b"".join(RUN.pack(*run) for run in self._runs)
        header = HEADER.pack(
            MAGIC, VERSION, self.page_size, self.memory_size, self._pages, len(self._runs),
            self.duration_ns, zlib.crc32(body), 0,
        )  # fmt: skip
        return header + body

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the file; it appears whole or not at all (written aside, then renamed)."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            if path.is_dir():  # else the error would name the file written aside
                raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR))
            with open(tmp, "wb") as f:
                f.write(self.to_bytes())
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise type(e)(
                e.errno, f"cannot write working-set file {str(path)!r}: {e.strerror}"
            ) from None
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path: str | os.PathLike[str], page_size: int | None = None) -> WorkingSet:
        """Read a file written by :meth:`save`. ``page_size``: the page size the caller serves;
        a file recorded with another one is refused. Raises WorkingSetError naming the file and
        the problem (truncated, corrupt, unknown version, wrong page size)."""
        data = Path(path).read_bytes()
        return cls.from_bytes(data, str(path), page_size)

    @classmethod
    def from_bytes(
        cls, data: bytes, name: str = "<bytes>", page_size: int | None = None
    ) -> WorkingSet:
        def bad(problem: str) -> WorkingSetError:
            return WorkingSetError(f"working-set file {name!r}: {problem}")

        if len(data) < len(MAGIC) or data[: len(MAGIC)] != MAGIC[: len(data)]:
            raise bad("not a working-set file (bad magic)")
        if len(data) < HEADER.size:
            raise bad(f"truncated: {len(data)} bytes, the header alone is {HEADER.size}")
        magic, version, psize, memory, pages, nruns, duration, crc, _ = HEADER.unpack_from(data)
        if version != VERSION:
            raise bad(f"version {version} is not supported (this library reads version {VERSION})")
        if psize < 1 or psize & (psize - 1):
            raise bad(f"corrupt: page size {psize} is not a power of two")
        if page_size is not None and psize != page_size:
            raise bad(f"recorded with {psize}-byte pages, but pages here are {page_size} bytes")
        want = HEADER.size + nruns * RUN.size
        if len(data) < want:
            raise bad(f"truncated: {len(data)} bytes, {nruns} runs need {want}")
        if len(data) > want:
            raise bad(f"corrupt: {len(data) - want} bytes after the last run")
        body = data[HEADER.size :]
        if zlib.crc32(body) != crc:
            raise bad("corrupt: the checksum of the runs does not match")
        runs = list(RUN.iter_unpack(body))
        counted, seen_end = 0, memory // psize
        for first, count, *_ in runs:
            if count == 0 or first + count > seen_end:
                raise bad(f"corrupt: run at page {first} of {count} pages is outside the memory")
            counted += count
        if counted != pages:
            raise bad(f"corrupt: the runs hold {counted} pages, the header says {pages}")
        ws = cls(psize, memory, runs, duration)
        if len(ws) != pages:  # runs that coalesce are fine; the count must still agree
            raise bad("corrupt: page count mismatch")
        return ws


def plan_replay(
    ws: WorkingSet, regions: Sequence[tuple[int, int, int]], memory_size: int
) -> tuple[bytes, int]:
    """The engine's replay runs for ``ws``: packed native (region id, region offset, length)
    triples, in the set's order, for ``regions`` given as (region id, source offset of the
    region's start, size). Also returns how many of the set's pages lie beyond ``memory_size``
    (they are left out; the caller warns once)."""
    out = bytearray()
    beyond = 0
    for offset, length in ws:
        if offset + length > memory_size:
            beyond += (offset + length - max(offset, memory_size)) // ws.page_size
            length = max(0, memory_size - offset)
        for rid, start, size in regions:
            lo, hi = max(offset, start), min(offset + length, start + size)
            if lo < hi:
                out += struct.pack("=QQQ", rid, lo - start, hi - lo)
    return bytes(out), beyond
