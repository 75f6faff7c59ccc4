"""SnapshotStore: push, info, pull, names, remove and gc over a backend (backends.py).

Layout under the store's root (a directory, or a bucket and prefix):
    snapshots/NAME.json      one manifest per snapshot layer (manifest.py)
    chunks/AB/ABCD...        compressed chunks, keyed by the hash of their uncompressed bytes
    pushes/NAME.ID           a push in progress (gc waits for it)
    gc/ID                    a gc in progress (pushes wait for it)

A push writes its chunks first and its manifest last, so a manifest only ever names chunks that
exist. gc and push exclude each other with the two markers: each writes its own marker, then
looks for the other's (the store is strongly consistent, so at least one of two racing parties
sees the other). A gc that sees a push withdraws and waits; a push that sees a gc waits for it to
end. So gc never deletes an unreferenced chunk that a running push has found present and will
reference."""

from __future__ import annotations

import errno
import os
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from . import chunks as codec
from .address import check_name, parse_address
from .backends import Backend, open_backend, server_now
from .errors import (
    ChunkError,
    ManifestError,
    ParentError,
    SnapshotExistsError,
    SnapshotNotFoundError,
    StoreError,
)
from .manifest import ZERO, Entry, Manifest, chunk_key, manifest_key

if TYPE_CHECKING:
    from .mapping import SnapshotMapping

DEFAULT_CHUNK_SIZE = 256 << 10
MAX_CHUNK_SIZE = 64 << 20
DEFAULT_LEVEL = 3
WORKERS = 16  # requests in flight
MARKER_STALE = 3600.0  # a marker older than this belongs to a process that died
MARKER_REFRESH = 600.0
WAIT_TIMEOUT = 600.0
SEEK_DATA, SEEK_HOLE = 3, 4

Progress = Callable[[int], None]


@dataclass
class PushResult:
    name: str
    size: int
    chunks: int
    zero_chunks: int
    inherited_chunks: int
    new_chunks: int
    stored_bytes: int
    seconds: float


@dataclass
class GcResult:
    deleted: int
    deleted_bytes: int
    kept: int


def check_chunk_size(size: int) -> int:
    if size < 4096 or size % 4096 or size > MAX_CHUNK_SIZE:
        raise ValueError(
            f"chunk size {size} is not a multiple of 4096 between 4096 and {MAX_CHUNK_SIZE}"
        )
    return size


def check_level(level: int) -> int:
    if not -7 <= level <= 22:
        raise ValueError(f"compression level {level} is not in -7..22 (zstd)")
    return level


class Snapshot:
    """A snapshot with its layers resolved: which chunk holds each range of its bytes."""

    def __init__(self, store: SnapshotStore, layers: list[Manifest]) -> None:
        self.store = store
        self.layers = layers  # the snapshot first, its base last
        top = layers[0]
        self.name, self.size, self.chunk_size = top.name, top.size, top.chunk_size
        table: list[str | None] = []
        for layer in reversed(layers):
            for i, entry in enumerate(layer.chunks):
                if i >= len(table):
                    table.append(None)
                if entry is not None:
                    table[i] = entry if isinstance(entry, str) else None
        self.table = table[: top.count]  # a hash, or None for zeros

    @property
    def count(self) -> int:
        return len(self.table)

    def length(self, i: int) -> int:
        return min(self.chunk_size, self.size - i * self.chunk_size)

    def fetch(self, i: int) -> bytes:
        """Chunk i's bytes, checked against its hash."""
        h = self.table[i]
        if h is None:
            return bytes(self.length(i))
        return self.store.fetch_chunk(h, self.length(i))

    def fetch_many(
        self, indices: Iterable[int], workers: int = WORKERS
    ) -> Iterator[tuple[int, bytes]]:
        """(i, bytes) for each index, in order, with up to ``workers`` fetches in flight."""
        with ThreadPoolExecutor(workers, thread_name_prefix="fetch") as pool:
            window: deque[tuple[int, Future[bytes]]] = deque()
            for i in indices:
                window.append((i, pool.submit(self.fetch, i)))
                if len(window) >= 2 * workers:
                    j, f = window.popleft()
                    yield j, f.result()
            while window:
                j, f = window.popleft()
                yield j, f.result()

    def read(self, offset: int, length: int) -> bytes:
        """``length`` bytes from ``offset`` (zeros past the end)."""
        out = bytearray(length)
        pos = offset
        while pos < offset + length and pos < self.size:
            i, within = divmod(pos, self.chunk_size)
            data = self.fetch(i)
            n = min(len(data) - within, offset + length - pos)
            out[pos - offset : pos - offset + n] = data[within : within + n]
            pos += n
        return bytes(out)


class SnapshotStore:
    """Snapshots in a store: ``file:///dir`` or ``s3://bucket[/prefix]``."""

    def __init__(self, url: str, *, timeout: float = 30.0) -> None:
        """``timeout``: seconds one request to a remote store may take."""
        self.backend: Backend = open_backend(url, timeout)
        self.url = self.backend.url

    def __repr__(self) -> str:
        return f"SnapshotStore({self.url!r})"

    @classmethod
    def at(cls, address: str, *, timeout: float = 30.0) -> tuple[SnapshotStore, str]:
        """The store of a snapshot address and the snapshot's name."""
        url, name = parse_address(address)
        return cls(url, timeout=timeout), name

    # reading

    def names(self) -> list[str]:
        found = []
        for key, _, _ in self.backend.list("snapshots"):
            if key.startswith("snapshots/") and key.endswith(".json"):
                found.append(key[len("snapshots/") : -len(".json")])
        return sorted(found)

    def manifest(self, name: str) -> Manifest:
        check_name(name)
        try:
            data = self.backend.get(manifest_key(name))
        except FileNotFoundError:
            raise SnapshotNotFoundError(name, self.url) from None
        return Manifest.from_json(name, data)

    def layers(self, name: str) -> list[Manifest]:
        """The snapshot's manifest, its parent's, ... down to its base."""
        chain = [self.manifest(name)]
        seen = [name]
        while chain[-1].parent is not None:
            parent = chain[-1].parent
            if parent in seen:
                raise ParentError(
                    f"snapshot {name!r} has a parent cycle: {' -> '.join([*seen, parent])}"
                )
            try:
                m = self.manifest(parent)
            except SnapshotNotFoundError:
                raise ParentError(
                    f"snapshot {chain[-1].name!r} names parent {parent!r}, which is not in "
                    f"{self.url}"
                ) from None
            if m.chunk_size != chain[-1].chunk_size:
                raise ManifestError(
                    chain[-1].name,
                    f"has chunk size {chain[-1].chunk_size} but its parent {parent!r} has "
                    f"{m.chunk_size}",
                )
            chain.append(m)
            seen.append(parent)
        return chain

    def open(self, name: str) -> Snapshot:
        return Snapshot(self, self.layers(name))

    def fetch_chunk(self, h: str, length: int) -> bytes:
        try:
            blob = self.backend.get(chunk_key(h))
        except FileNotFoundError:
            raise ChunkError(h, f"is missing from {self.url}", errno.ENOENT) from None
        return codec.decode(h, blob, length)

    def info(self, name: str) -> dict[str, Any]:
        snap = self.open(name)
        top = snap.layers[0]
        return {
            "name": name,
            "address": f"{self.url.rstrip('/')}/{name}",
            "size": snap.size,
            "parent": top.parent,
            "layers": len(snap.layers),
            "chunk_size": snap.chunk_size,
            "chunks": snap.count,
            "zero_chunks": sum(1 for h in snap.table if h is None),
            "own_chunks": sum(1 for e in top.chunks if e is not None),
            "stored_bytes": top.stored_bytes,
            "compression_ratio": round(top.raw_bytes / top.compressed_bytes, 3)
            if top.compressed_bytes
            else 1.0,
            "level": top.level,
            "created": top.created,
        }

    def pull(
        self, name: str, outfile: str | os.PathLike[str], progress: Progress | None = None
    ) -> int:
        """Materialise every layer into a plain (sparse) memory file; returns its size."""
        snap = self.open(name)
        fd = os.open(outfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            os.ftruncate(fd, snap.size)
            data_chunks = [i for i, h in enumerate(snap.table) if h is not None]
            for i, data in snap.fetch_many(data_chunks):
                os.pwrite(fd, data, i * snap.chunk_size)
                if progress:
                    progress(len(data))
            if progress:
                progress(snap.size - sum(snap.length(i) for i in data_chunks))
        finally:
            os.close(fd)
        return snap.size

    def map(
        self, name: str, *, cache_size: int = 1 << 30, fetch_timeout: float = 30.0
    ) -> SnapshotMapping:
        """The snapshot mapped as a buffer, served lazily by a handler process (mapping.py)."""
        from .mapping import map_snapshot

        return map_snapshot(
            f"{self.url.rstrip('/')}/{name}", cache_size=cache_size, fetch_timeout=fetch_timeout
        )

    # writing

    def push(
        self,
        memfile: str | os.PathLike[str],
        name: str,
        *,
        parent: str | None = None,
        chunk_size: int | None = None,
        level: int = DEFAULT_LEVEL,
        sparse_diff: bool = False,
        progress: Progress | None = None,
        changed: list[tuple[int, int]] | None = None,
    ) -> PushResult:
        """Store memfile as snapshot ``name``, as a diff layer over ``parent`` if given: only
        chunks that differ from the parent are listed in it. ``sparse_diff``: memfile is a
        Firecracker diff snapshot, whose holes are pages unchanged since the parent; only its
        data extents are read (SEEK_DATA/SEEK_HOLE). ``changed``: the same, told as sorted
        [start, end) ranges instead of found as extents (a live snapshot's written pages)."""
        t0 = time.monotonic()
        check_name(name)
        check_level(level)
        sparse_diff = sparse_diff or changed is not None
        if sparse_diff and parent is None:
            raise ValueError("a sparse diff snapshot needs --parent: its holes mean 'unchanged'")
        base = self.open(parent) if parent is not None else None
        if chunk_size is None:
            chunk_size = base.chunk_size if base else DEFAULT_CHUNK_SIZE
        check_chunk_size(chunk_size)
        if base and base.chunk_size != chunk_size:
            raise ValueError(
                f"chunk size {chunk_size} differs from parent {parent!r}'s {base.chunk_size}"
            )
        if self.backend.size(manifest_key(name)) is not None:
            raise SnapshotExistsError(name, self.url)
        fd = os.open(memfile, os.O_RDONLY | os.O_CLOEXEC)
        marker = f"pushes/{name}.{secrets.token_hex(8)}"
        try:
            size = os.lseek(fd, 0, os.SEEK_END)
            extents = (
                changed if changed is not None else _data_extents(fd, size) if sparse_diff else None
            )
            self.backend.put(marker, b"push")
            self._wait_for("gc", "a gc")
            m = Manifest(name, size, chunk_size, parent, [], level=level, created=time.time())
            result = _Push(self, m, fd, base, extents, marker, progress).run()
            self.backend.put(manifest_key(name), m.to_json())
        finally:
            os.close(fd)
            self.backend.delete(marker)
        result.seconds = time.monotonic() - t0
        return result

    def remove(self, name: str) -> None:
        """Delete the snapshot's manifest (gc deletes its chunks). A parent of another snapshot
        is refused."""
        self.manifest(name)
        children = []
        for other in self.names():
            if other != name:
                try:
                    if self.manifest(other).parent == name:
                        children.append(other)
                except (ManifestError, SnapshotNotFoundError):
                    continue
        if children:
            raise StoreError(
                errno.EBUSY,
                f"snapshot {name!r} is the parent of {', '.join(map(repr, children))}: "
                "remove those first",
            )
        self.backend.delete(manifest_key(name))

    def gc(self, grace: float = 3600.0) -> GcResult:
        """Delete chunks no snapshot references and older than ``grace`` seconds (by the
        store's clock). Waits while pushes run (see the module's docstring)."""
        if not grace >= 0:
            raise ValueError(f"grace {grace!r} is not a number of seconds >= 0")
        marker = f"gc/{secrets.token_hex(8)}"
        deadline = time.monotonic() + WAIT_TIMEOUT
        while True:
            now = server_now(self.backend, marker)
            if not self._live("pushes", now):
                break
            self.backend.delete(marker)  # withdraw, so that the pushes can finish
            if time.monotonic() > deadline:
                raise TimeoutError(errno.ETIMEDOUT, f"pushes to {self.url} did not end in time")
            time.sleep(0.2)
        try:
            live: set[str] = set()
            for n in self.names():
                try:
                    live |= self.manifest(n).digests()  # a bad manifest stops gc: none deleted
                except SnapshotNotFoundError:
                    continue  # removed meanwhile: its chunks are unreferenced anyway
            doomed = [
                (key, size)
                for key, mtime, size in self.backend.list("chunks")
                if key.rpartition("/")[2] not in live and mtime <= now - grace
            ]
            kept = sum(1 for _ in self.backend.list("chunks")) - len(doomed)
            with ThreadPoolExecutor(WORKERS) as pool:
                list(pool.map(self.backend.delete, (k for k, _ in doomed)))
        finally:
            self.backend.delete(marker)
        return GcResult(len(doomed), sum(s for _, s in doomed), kept)

    def _live(self, kind: str, now: float) -> list[str]:
        return [k for k, mtime, _ in self.backend.list(kind) if now - mtime < MARKER_STALE]

    def _wait_for(self, kind: str, what: str) -> None:
        deadline = time.monotonic() + WAIT_TIMEOUT
        while self._live(kind, time.time()):
            if time.monotonic() > deadline:
                raise TimeoutError(errno.ETIMEDOUT, f"{what} on {self.url} did not end in time")
            time.sleep(0.2)


class _Push:
    """One push: this thread reads and hashes the memory file chunk by chunk (BLAKE3 runs at
    several GB/s); a pool compresses and uploads new chunks (both release the GIL), with a
    bounded number of chunks in memory."""

    def __init__(
        self,
        store: SnapshotStore,
        m: Manifest,
        fd: int,
        base: Snapshot | None,
        extents: list[tuple[int, int]] | None,
        marker: str,
        progress: Progress | None,
    ) -> None:
        self.store, self.m, self.fd, self.base = store, m, fd, base
        self.extents, self.marker, self.progress = extents, marker, progress
        self.uploads: dict[str, Future[tuple[int, int]]] = {}
        self.lengths: dict[str, int] = {}
        self.slots = threading.Semaphore(2 * WORKERS)
        self.lock = threading.Lock()
        self.refreshed = time.monotonic()

    def run(self) -> PushResult:
        m = self.m
        count = -(-m.size // m.chunk_size)
        with ThreadPoolExecutor(WORKERS, thread_name_prefix="push") as pool:
            for i in range(count):
                m.chunks.append(self._chunk(pool, i))
                self._refresh()
            for f in self.uploads.values():
                compressed, stored = f.result()
                m.compressed_bytes += compressed
                m.stored_bytes += stored
        m.raw_bytes = sum(self.lengths.values())
        zero = sum(1 for e in m.chunks if e == ZERO)
        inherited = sum(1 for e in m.chunks if e is None)
        return PushResult(
            m.name, m.size, count, zero, inherited, len(self.uploads), m.stored_bytes, 0.0
        )

    def _refresh(self) -> None:
        """A long push keeps its marker fresh, or gc would take it for a dead one."""
        if time.monotonic() - self.refreshed > MARKER_REFRESH:
            self.store.backend.put(self.marker, b"push")
            self.refreshed = time.monotonic()

    def _read(self, i: int) -> bytes | None:
        """Chunk i's bytes; None when a sparse diff leaves it all as in the parent."""
        m, cs = self.m, self.m.chunk_size
        start, length = i * cs, min(cs, m.size - i * cs)
        if self.extents is None:
            return os.pread(self.fd, length, start)
        parts = [(max(a, start), min(b, start + length)) for a, b in self.extents
                 if a < start + length and b > start]  # fmt: skip
        if not parts:
            return None
        if parts == [(start, start + length)]:
            return os.pread(self.fd, length, start)
        # Partly written: the rest of the chunk is the parent's.
        assert self.base is not None
        data = bytearray(length)
        if i < self.base.count:
            old = self.base.fetch(i)[:length]
            data[: len(old)] = old
        for a, b in parts:
            data[a - start : b - start] = os.pread(self.fd, b - a, a)
        return bytes(data)

    def _chunk(self, pool: ThreadPoolExecutor, i: int) -> Entry:
        data = self._read(i)
        length = min(self.m.chunk_size, self.m.size - i * self.m.chunk_size)
        if data is None:
            self._count(length)
            return None
        below = self.base.table[i] if self.base and i < self.base.count else "nothing"
        if codec.is_zero(data):
            self._count(length)
            return None if below is None else ZERO
        h = codec.digest(data)
        if h == below or h in self.uploads:
            self._count(length)
            return None if h == below else h
        self.lengths[h] = length
        self.slots.acquire()  # released when the upload is done: bounded memory
        self.uploads[h] = pool.submit(self._upload, h, data)
        return h

    def _upload(self, h: str, data: bytes) -> tuple[int, int]:
        """(compressed size, bytes added to the store) of a chunk, uploaded unless present."""
        key = chunk_key(h)
        try:
            present = self.store.backend.size(key)
            if present is not None:
                return present, 0
            blob = codec.compress(data, self.m.level)
            self.store.backend.put(key, blob)
            return len(blob), len(blob)
        finally:
            self.slots.release()
            self._count(len(data))

    def _count(self, n: int) -> None:
        if self.progress:
            with self.lock:
                self.progress(n)


def _data_extents(fd: int, size: int) -> list[tuple[int, int]]:
    """The [start, end) data extents of a sparse file (SEEK_DATA/SEEK_HOLE)."""
    extents, pos = [], 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # only a hole from pos to the end
                break
            raise
        end = min(os.lseek(fd, start, SEEK_HOLE), size)
        extents.append((start, end))
        pos = end
    return extents
