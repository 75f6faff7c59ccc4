"""Serving a stored snapshot: a chunk cache the engine serves from natively, filled by fetcher
threads of this process.

The engine copies faults on present chunks straight from the cache (as from a local file). A
fault on a missing chunk waits in the cache (chunkcache.h), which queues the chunk and signals
an eventfd; the dispatcher thread here hands queued chunks to a pool of fetchers (many in
flight; the cache hands each chunk to one fetcher only), which fetch, decompress and verify it
(obstore, zstandard and blake3 release the GIL), fill it, and the fill wakes the faults. These
threads never touch registered memory, so they never block on a fault while holding the GIL.

A chunk that fails its hash, is missing, or cannot be fetched within ``fetch_timeout`` (retried
with backoff: a store that goes away and comes back in time is survived) is poisoned: its pages
raise SIGBUS in the client, and the failure is logged with the chunk, its offsets and the cause.
The cache keeps at most ``budget`` bytes of chunks; the oldest are evicted first."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from .. import _core
from .._core import SRC_CACHE
from ..sources import Prepared, Source
from .errors import ChunkError
from .store import Snapshot

log = logging.getLogger("userfaultfd.store")

DEFAULT_BUDGET = 1 << 30
DEFAULT_FETCH_TIMEOUT = 30.0
FETCHERS = 16
PREFETCH = 4  # chunks fetched ahead of a sequential stream of misses
BACKOFF_MAX = 1.0

# (chunk, first snapshot offset, end offset, cause): called when a chunk is poisoned
PoisonReport = Callable[[int, int, int, str], None]


class StoreCache:
    """The chunk cache of one snapshot, shared by every region (and client) served from it."""

    def __init__(
        self,
        snapshot: Snapshot,
        *,
        budget: int = DEFAULT_BUDGET,
        fetch_timeout: float = DEFAULT_FETCH_TIMEOUT,
        fetchers: int = FETCHERS,
        prefetch: int = PREFETCH,
        on_poison: PoisonReport | None = None,
    ) -> None:
        if not fetch_timeout > 0:
            raise ValueError(f"fetch timeout {fetch_timeout!r} is not a number of seconds > 0")
        self.snapshot = snapshot
        self.chunk_size = snapshot.chunk_size
        # A fault's run and the fetches in flight must fit, or chunks would be evicted before
        # their faults are served.
        self.budget = max(budget, 4 * fetchers * self.chunk_size)
        self.fetch_timeout, self.prefetch = fetch_timeout, prefetch
        self.on_poison = on_poison or self._log_poison
        self.cache = _core.ChunkCache(max(snapshot.size, 1), self.chunk_size)
        self.handle, self.eventfd, _, self.chunks = self.cache.info()
        for i, h in enumerate(snapshot.table):
            if h is None:
                self.cache.settle(i, _core.CHUNK_ZERO)
        self.present: OrderedDict[int, None] = OrderedDict()  # filled chunks, oldest first
        self.lock = threading.Lock()
        self.recent: OrderedDict[int, None] = OrderedDict()  # chunks missed lately
        self.fetched = self.fetched_bytes = self.poisoned = self.evicted = self.retries = 0
        self.pool = ThreadPoolExecutor(fetchers, thread_name_prefix="uffd-fetch")
        self._stop_r, self._stop_w = os.pipe2(os.O_CLOEXEC)
        self.closed = False
        self.dispatcher = threading.Thread(target=self._dispatch, name="uffd-dispatch", daemon=True)
        self.dispatcher.start()

    def source(self) -> Source:
        """A page source serving this snapshot from offset 0 (for PageServer.map)."""
        return Cached(self)

    # the fetchers

    def _dispatch(self) -> None:
        while True:
            ready, _, _ = select.select([self.eventfd, self._stop_r], [], [])
            if self._stop_r in ready:
                return
            with contextlib.suppress(BlockingIOError):  # another wake-up drained it
                os.read(self.eventfd, 8)
            while batch := self.cache.take(256):
                for chunk, urgent in batch:
                    self.pool.submit(self._fetch, chunk)
                    if urgent:
                        self._follow(chunk)

    def _follow(self, chunk: int) -> None:
        """A miss right after a miss on the chunk before it: a sequential stream. Fetch the
        next chunks before they are asked for."""
        sequential = chunk - 1 in self.recent
        self.recent[chunk] = None
        while len(self.recent) > 64:
            self.recent.popitem(last=False)
        if sequential:
            for nxt in range(chunk + 1, min(chunk + 1 + self.prefetch, self.chunks)):
                self.recent[nxt] = None
                self.cache.request(nxt)

    def _fetch(self, chunk: int) -> None:
        """Fetch, verify and fill one chunk; whatever goes wrong ends in a poisoned chunk, never
        in one left fetching (its faults would wait forever)."""
        try:
            self._fetch_or_poison(chunk)
        except Exception as e:  # noqa: BLE001 - reported with the chunk, which is poisoned
            self._poison(chunk, f"fetcher failed: {e!r}")

    def _fetch_or_poison(self, chunk: int) -> None:
        deadline = time.monotonic() + self.fetch_timeout
        delay = 0.05
        while True:
            try:
                data = self.snapshot.fetch(chunk)
                break
            except ChunkError as e:
                if e.errno != errno.ENOENT or time.monotonic() + delay > deadline:
                    self._poison(chunk, str(e))  # wrong content: no retry makes it right
                    return
                cause: BaseException = e  # a missing chunk may be a store coming back
            except Exception as e:  # noqa: BLE001 - a fetch failing for any reason is retried
                cause = e
            if self.closed or time.monotonic() + delay > deadline:
                self._poison(chunk, f"not fetched within {self.fetch_timeout:g} s: {cause}")
                return
            with self.lock:
                self.retries += 1
            time.sleep(delay)
            delay = min(delay * 2, BACKOFF_MAX)
        if self.closed:
            return
        with self.lock:  # counted before the fill wakes the faults: stats never trail them
            self.fetched += 1
            self.fetched_bytes += len(data)
        self.cache.fill(chunk, data)
        with self.lock:
            self.present[chunk] = None
            excess = len(self.present) * self.chunk_size - self.budget
            victims = []
            while excess > 0 and self.present:
                victims.append(self.present.popitem(last=False)[0])
                excess -= self.chunk_size
        evicted = sum(1 for victim in victims if self.cache.evict(victim))
        with self.lock:
            self.evicted += evicted

    def _poison(self, chunk: int, cause: str) -> None:
        with self.lock:
            self.poisoned += 1
        start = chunk * self.chunk_size
        self.on_poison(chunk, start, min(start + self.chunk_size, self.snapshot.size), cause)
        self.cache.settle(chunk, _core.CHUNK_POISONED)

    def _log_poison(self, chunk: int, start: int, end: int, cause: str) -> None:
        log.error(
            "snapshot %s: chunk %d (offsets %#x-%#x) poisoned: %s",
            self.snapshot.name, chunk, start, end, cause,
        )  # fmt: skip

    def warm(self) -> None:
        """Fetch every chunk now (and wait): the cache then serves every fault natively."""
        for i in range(self.chunks):
            self.cache.request(i)
        while any(
            self.cache.state(i) in (_core.CHUNK_REQUESTED, _core.CHUNK_FETCHING)
            for i in range(self.chunks)
        ):
            time.sleep(0.01)

    def stats(self) -> dict[str, int]:
        return {
            "fetched": self.fetched,
            "fetched_bytes": self.fetched_bytes,
            "poisoned": self.poisoned,
            "evicted": self.evicted,
            "retries": self.retries,
        }

    def close(self) -> None:
        """Stop fetching. A region still served from the cache then gets SIGBUS, never a hang,
        on a chunk it has not got: every chunk not present is poisoned. The cache's memory is
        freed with the last region that uses it (each holds a reference)."""
        if self.closed:
            return
        self.closed = True
        os.write(self._stop_w, b"x")
        self.dispatcher.join()
        self.pool.shutdown(wait=True, cancel_futures=True)
        os.close(self._stop_r)
        os.close(self._stop_w)
        served = (_core.CHUNK_PRESENT, _core.CHUNK_ZERO, _core.CHUNK_POISONED)
        for i in range(self.chunks):
            if self.cache.state(i) not in served:
                self.cache.settle(i, _core.CHUNK_POISONED)

    def __enter__(self) -> StoreCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Cached(Source):
    """Pages from a StoreCache, for PageServer.map (thread mode)."""

    def __init__(self, cache: StoreCache, offset: int = 0) -> None:
        self.store_cache, self.offset = cache, offset

    def prepare(self, length: int, page_size: int) -> Prepared:
        if self.store_cache.chunk_size % page_size:
            raise ValueError(
                f"chunk size {self.store_cache.chunk_size} is not a multiple of the page size "
                f"{page_size}"
            )
        return Prepared(SRC_CACHE, self.store_cache.handle, self.offset, keep=[self.store_cache])

    def __repr__(self) -> str:
        return f"Cached({self.store_cache.snapshot.name!r}, offset={self.offset})"
