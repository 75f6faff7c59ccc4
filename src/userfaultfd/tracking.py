"""Write tracking and live snapshots: which pages a program wrote, and point-in-time copies of
memory while the program keeps writing.

Two mechanisms (``WriteTracker.mechanism``):

- ``"async"``: UFFD_FEATURE_WP_ASYNC. The kernel resolves every write to a protected page itself
  and clears the page's uffd-wp bit; :meth:`WriteTracker.written` collects those pages with
  PAGEMAP_SCAN and protects them again in the same page-table walk, so no write between the scan
  and the re-arm is lost. A write costs a minor fault, no message, no thread.
- ``"sync"``: every first write to a protected page is a WP fault served by native code (a thread
  of ours, or the PageServer's engine): it records the page, unprotects it and wakes the writer.
  Used where WP_ASYNC is missing, on PageServer regions (their uffd must deliver MISSING faults
  and WP faults both), and whenever a live snapshot needs to copy a page before a write lands.

A uffd range belongs to one uffd, and WP_ASYNC is a property of the whole uffd: memory tracked
asynchronously cannot also take live snapshots. Track with ``mechanism="sync"`` to have both (the
snapshot after a previous one then writes only the changed pages, as a diff layer).

Snapshot files: without ``parent`` the raw memory image, byte for byte (``serve`` can serve it);
with ``parent`` a diff layer: a header naming the parent file, the page indices, the pages.
:func:`read_snapshot` rebuilds the image from a layer chain.

A snapshot-store address as ``dest`` (``file:///dir/NAME``, ``s3://bucket/prefix/NAME``): the
point-in-time image is copied exactly as for a file, into a temporary file, then pushed in the
store's own format (store/store.py) and the temporary file removed. With ``parent`` (a stored
snapshot) the push is a diff layer: only chunks whose hash differs from the parent's are stored."""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import struct
import tempfile
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Literal

from . import _core
from .flags import MAP_HUGETLB, Feature, RegisterMode
from .uffd import PAGE_SIZE, Userfaultfd, available_features

if TYPE_CHECKING:
    from .store import PushResult, SnapshotStore

Mechanism = Literal["async", "sync"]

LAYER_MAGIC = b"UFFDLAYR"
# magic, version, page size, object length, head (object start - its first page), pages, parent
_HEADER = struct.Struct("<8sIIQQQI")
_HEADER_AREA = 4096

_WP_FEATURES = Feature.PAGEFAULT_FLAG_WP | Feature.WP_UNPOPULATED | Feature.WP_HUGETLBFS_SHMEM


class _Span:
    """The whole pages an object spans, and the object's own bytes inside them."""

    def __init__(self, obj: Any, what: str) -> None:
        from .page_server import Region

        self.region: Region | None = None
        if isinstance(obj, Region):
            if obj.closed:
                raise ValueError(f"{what}: {obj!r} is closed")
            self.region = obj
        try:
            view = memoryview(obj)
        except TypeError:
            raise TypeError(
                f"{what}: {type(obj).__name__} {obj!r:.80} does not support the buffer protocol"
            ) from None
        if view.readonly:
            view.release()
            raise ValueError(
                f"{what}: {type(obj).__name__} {obj!r:.80} is a read-only buffer: nothing can "
                "write to it, and write-protecting it is refused"
            )
        if not view.contiguous or view.nbytes == 0:
            view.release()
            raise ValueError(f"{what}: {obj!r:.80} is not a non-empty contiguous buffer")
        self.view = view  # held while tracked: the memory cannot be freed or resized meanwhile
        self.name = f"{type(obj).__name__} at {_core.buffer_address(view)[0]:#x}"
        self.lo, self.length = _core.buffer_address(view)
        self.hi = self.lo + self.length
        page = obj.page_size if self.region is not None and obj.memory == "hugetlb" else PAGE_SIZE
        self.page = page
        self.start = self.lo // page * page
        self.end = -(-self.hi // page) * page


class _Attachment:
    """Write protection of one page range: its uffd and mechanism, and what uses it."""

    def __init__(self, span: _Span, mechanism: Mechanism, keep: bool) -> None:
        self.span = span
        self.mechanism = mechanism
        self.uffd: Userfaultfd | None = None
        self.ctx: _core.WpContext | None = None  # sync
        self.pagemap = -1  # async
        self.pid = os.getpid()  # a forked child inherits the objects, not the threads or tracking
        self.users = 0  # trackers and snapshots holding it (under _lock)
        self.trackers = 0
        self.copying = False  # a snapshot is in progress (no reference: a dropped one finishes)
        self.last: Snapshot | None = None  # the latest, taken while a tracker ran
        self.tracked_since_last = False
        region = span.region
        try:
            if region is not None:
                self._attach_engine(keep)
            else:
                self._attach_own(keep)
        except BaseException:
            self._release()
            raise

    def _attach_own(self, keep: bool) -> None:
        span = self.span
        if self.mechanism == "async":
            wanted = Feature.WP_ASYNC | Feature.WP_UNPOPULATED | Feature.PAGEFAULT_FLAG_WP
        else:
            wanted = Feature.PAGEFAULT_FLAG_WP
        wanted |= available_features() & _WP_FEATURES
        self.uffd = Userfaultfd(wanted)
        try:
            self.uffd.register(span.start, span.end - span.start, RegisterMode.WP)
        except OSError as e:
            raise _refused(span, e) from None
        if self.mechanism == "async":
            self.pagemap = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
            self.uffd.writeprotect(span.start, span.end - span.start)
        else:
            self.ctx = _core.WpContext(
                self.uffd.fileno(), span.start, span.end - span.start, span.page, True
            )
            if keep:  # a snapshot write-protects everything itself when it starts
                self.ctx.arm(True)

    def _attach_engine(self, keep: bool) -> None:
        region = self.span.region
        assert region is not None
        server = region.server
        server._check()
        if not server.uffd.features & Feature.PAGEFAULT_FLAG_WP:
            raise OSError(errno.EOPNOTSUPP, f"{region!r}: this kernel offers no write protection")
        pieces = server._engine.pieces(region.id)
        if pieces != [(region.address, region.address + len(region), 0)]:
            raise ValueError(f"{region!r} was moved or partly unmapped: it cannot be tracked")
        # The same uffd registers the range again with WP added: the engine serves both kinds.
        try:
            server.uffd.register(region.address, len(region), self._engine_mode() | RegisterMode.WP)
        except OSError as e:
            raise _refused(self.span, e) from None
        self.ctx = _core.WpContext(
            server.uffd.fileno(), region.address, len(region), self.span.page, False
        )
        server._engine.set_wp(region.id, self.ctx)
        if keep:
            self.ctx.arm(True)

    def _engine_mode(self) -> RegisterMode:
        region = self.span.region
        assert region is not None
        minor = region._prepared is not None and region._prepared.kind == _core.SRC_CONTINUE
        return RegisterMode.MISSING | (RegisterMode.MINOR if minor else RegisterMode(0))

    def written(self, reset: bool) -> list[tuple[int, int]]:
        """(offset, length) runs relative to the object, clipped to it."""
        if os.getpid() != self.pid:
            raise RuntimeError(
                f"this tracker watches process {self.pid}'s memory: a forked child cannot use it"
            )
        span = self.span
        if span.region is not None and not span.region._served:
            # Unregistered, its writes raise no WP fault: the bitmap would say "none written".
            raise ValueError(
                f"{span.region!r} was detached as its PageServer closed: its writes are no "
                "longer tracked (close the tracker before the server)"
            )
        if self.mechanism == "async":
            return _core.pagemap_scan(self.pagemap, span.start, span.end, reset, span.lo, span.hi)
        assert self.ctx is not None
        return self.ctx.written(reset, span.lo, span.hi)

    def _release(self) -> None:
        if os.getpid() != self.pid:  # a forked child: the uffd and threads are the parent's
            if self.uffd is not None:
                self.uffd.close()  # this process's copy of the fd
            self.span.view.release()
            return
        region = self.span.region
        if region is not None and self.ctx is not None and not region.server.closed:
            server = region.server
            try:
                server._engine.set_wp(region.id, None)
            except OSError:
                pass  # the region is gone from the engine already
            else:
                if not region.closed:
                    server.uffd.writeprotect(region.address, len(region), protect=False)
                    server.uffd.register(region.address, len(region), self._engine_mode())
        if self.ctx is not None:
            self.ctx.close()
            self.ctx = None
        if self.pagemap >= 0:
            os.close(self.pagemap)
            self.pagemap = -1
        if self.uffd is not None:
            self.uffd.close()  # unregisters: pending writers go on
            self.uffd = None
        self.span.view.release()

    def leave(self) -> None:
        """One user fewer; the last one takes the write protection away."""
        with _lock:
            self.users -= 1
            if self.users:
                return
            _attached.pop(self.span.start, None)
        self._release()


_lock = threading.Lock()
_attached: dict[int, _Attachment] = {}


def finish_copies(region: Any) -> None:
    """Before a PageServer stops serving ``region``: wait until a live snapshot of it is copied
    (its writers are held until their page is copied only while the engine serves it)."""
    with _lock:
        att = next((a for a in _attached.values() if a.span.region is region), None)
    if att is not None and att.copying and att.ctx is not None:
        att.ctx.snapshot_wait(-1)


def holder(region: Any) -> str | None:
    """What of this module holds a view of ``region``, said for a BufferError; None if nothing."""
    with _lock:
        att = next((a for a in _attached.values() if a.span.region is region), None)
        if att is None:
            return None
        if att.trackers:
            return "an open write tracker (region.track_writes()): close the tracker first"
        return "a live snapshot still copying: wait() for it first"


def _refused(span: _Span, e: OSError) -> OSError:
    if e.errno == errno.EBUSY and span.name.startswith("RemoteRegion"):
        why = "a PythonSourceServer region's uffd is served by its handler process, not here"
    elif e.errno == errno.EBUSY:
        why = (
            "it is registered with another userfaultfd (a PageServer region: use "
            "region.track_writes() and region.snapshot())"
        )
    elif e.errno == errno.EINVAL:
        why = (
            "the kernel cannot write-protect this kind of memory (synchronous write protection "
            "covers anonymous, shmem and hugetlb memory; WP_ASYNC covers any)"
        )
    else:
        why = e.strerror or os.strerror(e.errno or 0)
    return OSError(e.errno, f"cannot write-protect {span.name} ({span.length} bytes): {why}")


def _attach(obj: Any, what: str, mechanism: Mechanism | None, keep: bool) -> _Attachment:
    span = _Span(obj, what)
    with _lock:
        for att in _attached.values():
            same = (att.span.start, att.span.end) == (span.start, span.end)
            if same:
                span.view.release()
                att.users += 1
                return att
            if att.span.start < span.end and span.start < att.span.end:
                span.view.release()
                raise ValueError(
                    f"{what}: {span.name} overlaps memory already write-protected "
                    f"({att.span.name}, {att.span.length} bytes)"
                )
        if mechanism is None:
            mechanism = "sync" if span.region is not None or not _async_usable() else "async"
        elif span.region is not None and mechanism == "async":
            span.view.release()
            raise ValueError(
                f"{what}: a PageServer region is tracked with mechanism 'sync': its uffd "
                "serves missing pages too, so the kernel cannot resolve its WP faults itself"
            )
        att = _Attachment(span, mechanism, keep)
        att.users = 1
        _attached[span.start] = att
        return att


def _async_usable() -> bool:
    return bool(available_features() & Feature.WP_ASYNC) and os.path.exists("/proc/self/pagemap")


class WriteTracker:
    """The pages written in an object's memory since the last reset. Use as a context manager, or
    call :meth:`close`. ``mechanism`` says how writes are caught ("async" or "sync")."""

    def __init__(self, att: _Attachment) -> None:
        self._att: _Attachment | None = att
        self.mechanism: Mechanism = att.mechanism
        self.address = att.span.lo
        self.length = att.span.length

    @property
    def closed(self) -> bool:
        return self._att is None

    def written(self, reset: bool = True) -> list[tuple[int, int]]:
        """The written ranges as (offset, length) runs relative to the object (whole pages,
        clipped to the object). ``reset``: protect them again, atomically with the collection
        (async: PAGEMAP_SCAN with PM_SCAN_WP_MATCHING; sync: under the fault path's lock)."""
        if self._att is None:
            raise ValueError("the tracker is closed")
        return self._att.written(reset)

    def close(self) -> None:
        """Stop tracking (the memory is write-protected no more, unless a snapshot runs)."""
        att, self._att = self._att, None
        if att is None:
            return
        with _lock:
            att.trackers -= 1
            last = att.trackers == 0
            att.tracked_since_last = att.tracked_since_last and not last
        if att.ctx is not None and last:
            att.ctx.set_keep(False)
        att.leave()

    def __enter__(self) -> WriteTracker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:  # a tracker dropped unclosed must not leave memory protected
        with contextlib.suppress(Exception):
            self.close()

    def __repr__(self) -> str:
        state = "closed" if self._att is None else f"{self.mechanism}"
        return f"<WriteTracker {self.length} bytes at {self.address:#x} {state}>"


def track_writes(obj: Any, *, mechanism: Mechanism | None = None) -> WriteTracker:
    """Track writes to the whole pages ``obj`` spans (a numpy array, an mmap, a bytearray, a
    Region: any writable contiguous buffer). ``mechanism`` None picks "async" where the kernel
    offers WP_ASYNC and PAGEMAP_SCAN (and for PageServer regions "sync"). Pages never touched
    count as not written. ValueError for a read-only buffer; OSError naming the memory when the
    kernel refuses to write-protect it."""
    if mechanism not in (None, "async", "sync"):
        raise ValueError(f"mechanism {mechanism!r} is not 'async' or 'sync'")
    if mechanism == "async" and not _async_usable():
        raise OSError(errno.EOPNOTSUPP, "this kernel lacks WP_ASYNC or PAGEMAP_SCAN (6.7+)")
    att = _attach(obj, "track_writes", mechanism, keep=True)
    if mechanism is not None and att.mechanism != mechanism:
        att.leave()
        raise ValueError(f"track_writes: {att.span.name} is already tracked with {att.mechanism}")
    with _lock:
        first = att.trackers == 0
        att.trackers += 1
    if att.ctx is not None and first:
        att.ctx.arm(True)  # tracking starts now; a snapshot's copier keeps pages protected
    return WriteTracker(att)


class Snapshot:
    """A live snapshot being written, or written. :meth:`wait` returns once it is complete."""

    def __init__(
        self, att: _Attachment, path: str, fd: int, parent: Snapshot | None, pages: int
    ) -> None:
        self._att: _Attachment | None = att
        self.path = path
        self.parent = parent
        self.length = att.span.length
        self.pages = pages  # pages the file holds
        self.copied_by_faults = 0  # pages a writer's fault copied ahead of the copier
        self.started = time.monotonic()
        self.seconds: float | None = None  # the copy's duration
        self.stall = 0.0  # seconds writers could be held at the instant
        self._fd = fd
        self._error: OSError | None = None
        self._taken_while_tracked = att.trackers > 0
        self.address: str | None = None  # a store address: pushed there by wait()
        self.stored: PushResult | None = None  # what the push stored
        self.stored_parent: str | None = None  # the name of the stored parent it is a layer over
        self._push: tuple[SnapshotStore, str, str | None] | None = None  # store, name, parent

    @property
    def done(self) -> bool:
        return self._att is None

    def wait(self, timeout: float | None = None) -> Snapshot:
        """Wait for the copy to complete. TimeoutError after ``timeout`` seconds; OSError if
        writing the file failed."""
        att = self._att
        if att is not None:
            ms = -1 if timeout is None else max(int(timeout * 1000), 0)
            assert att.ctx is not None
            result = att.ctx.snapshot_wait(ms)
            if result is None:
                raise TimeoutError(f"the snapshot to {self.path} is still being copied")
            err, _, self.copied_by_faults = result
            self.seconds = time.monotonic() - self.started
            self._att = None
            att.copying = False
            try:
                os.close(self._fd)
            finally:
                with _lock:
                    if self._taken_while_tracked and att.trackers:
                        att.last, att.tracked_since_last = self, True
                att.leave()
            if err:
                self._error = OSError(err, f"writing the snapshot {self.path}: {os.strerror(err)}")
        if self._push is not None:
            self._push_to_store()
        if self._error is not None:
            raise self._error
        return self

    def _push_to_store(self) -> None:
        """The copy is complete (the memory is free again): push it, then drop the file."""
        assert self._push is not None
        (store, name, parent), self._push = self._push, None
        try:
            if self._error is None:
                # A local diff layer (only the written pages): the rest is as in the parent.
                changed = _layer_to_image(self.path) if self.parent is not None else None
                self.stored = store.push(self.path, name, parent=parent, changed=changed)
        except OSError as e:
            self._error = e
        finally:
            os.unlink(self.path)
            self.path = self.address or self.path

    def __del__(self) -> None:  # dropped without wait(): finish, and let the memory go
        with contextlib.suppress(Exception):
            self.wait()

    def __repr__(self) -> str:
        kind = "diff layer" if self.parent or self.stored_parent else "image"
        where = self.address or self.path
        return f"<Snapshot {kind} {where} {self.pages} pages{'' if self.done else ' copying'}>"


def snapshot(
    obj: Any,
    dest: str | os.PathLike[str],
    *,
    parent: Snapshot | str | None = None,
    wait: bool = True,
) -> Snapshot:
    """Write a point-in-time copy of ``obj``'s memory to the file ``dest`` while the program keeps
    writing: every page is write-protected at once, a native thread copies them, and a write to a
    page not yet copied waits until that page is copied (served natively, no Python). Without
    ``parent``: the raw image of the object, byte for byte. With ``parent`` (the previous
    snapshot of the same memory, taken while a sync tracker ran and has run since): a diff layer
    holding only the pages written since. ``wait=False`` returns at once; call ``wait()``.

    ``dest`` may be a snapshot-store address (``file:///dir/NAME``, ``s3://bucket/prefix/NAME``,
    docs/snapshot-store.md): the snapshot ends as stored snapshot NAME, pushed as the store's
    chunks (hashed, compressed, deduplicated). ``parent`` is then an earlier stored snapshot: its
    name or address in the same store, or the Snapshot an earlier call returned; the push is a
    diff layer over it that stores only the chunks that differ (compared by hash: no tracker is
    needed). Cost: the instant's image is first copied whole, exactly as for a file, into a
    temporary file (``tempfile.gettempdir()``, as large as the object), which ``wait()`` then
    reads, hashes and pushes (with ``wait=False`` the push runs in ``wait()``) and removes. When
    ``parent`` is the Snapshot returned for this memory while a sync tracker ran and has run
    since, only the pages written since are copied (then ``.parent`` is set; the push fetches the
    parent's chunks that were only partly written). ``.stored`` tells what the push stored. A
    bad address, an existing name or a missing parent raise before anything is write-protected."""
    if parent is not None and not isinstance(parent, (Snapshot, str)):
        raise TypeError(f"snapshot: parent {parent!r} is not a Snapshot")
    path = os.fspath(dest)
    if not isinstance(path, str):
        raise ValueError(f"snapshot: dest {dest!r} is not a local file path or store address")
    push = None
    if "://" in path:
        push = _store_target(path, parent)
        parent = None  # the local copy is the whole image; the store compares chunks
    elif isinstance(parent, str):
        raise TypeError(f"snapshot: parent {parent!r} is not a Snapshot (dest is a local file)")
    elif parent is not None and parent.address is not None:
        raise ValueError(
            f"snapshot: parent {parent.address} is stored; a local file's parent is a local file"
        )
    att = _attach(obj, "snapshot", "sync", keep=False)
    try:
        if att.mechanism == "async":
            raise ValueError(
                f"snapshot: {att.span.name} is tracked with WP_ASYNC, where the kernel lets every "
                "write through at once, so none can wait for its page to be copied: track it with "
                "mechanism='sync' to take live snapshots of it"
            )
        if att.copying:
            raise OSError(errno.EBUSY, f"snapshot: a snapshot of {att.span.name} is in progress")
        if isinstance(parent, Snapshot):
            parent.wait()
            if parent is not att.last or not att.tracked_since_last or not att.trackers:
                raise ValueError(
                    f"snapshot: parent {parent.path} is not the latest snapshot of "
                    f"{att.span.name} taken while a sync tracker has run since: nothing recorded "
                    "the writes since; take a full snapshot"
                )
        if push is None:
            return _start(att, path, parent, wait)
        # The tracker knows what was written since a stored parent taken of this memory: copy
        # only those pages (the push takes the rest from the parent).
        over = push[3]
        if over is not att.last or not att.tracked_since_last or not att.trackers:
            over = None
        fd, tmp = tempfile.mkstemp(prefix="uffd-snapshot-")
        os.close(fd)
        try:
            snap = _start(att, tmp, over, False)
        except BaseException:
            os.unlink(tmp)
            raise
    except BaseException:
        att.leave()
        raise
    snap.address, snap._push, snap.stored_parent = path, push[:3], push[2]
    if wait:
        snap.wait()
    return snap


def _store_target(
    address: str, parent: Snapshot | str | None
) -> tuple[SnapshotStore, str, str | None, Snapshot | None]:
    """(store, name, parent's name, parent Snapshot) of a store ``dest``, checked: the address
    parses, the name is free, the parent is a stored snapshot of the same store."""
    from .store import SnapshotExistsError, SnapshotStore
    from .store.manifest import manifest_key

    store, name = SnapshotStore.at(address)
    if store.backend.size(manifest_key(name)) is not None:
        raise SnapshotExistsError(name, store.url)
    if parent is None:
        return store, name, None, None
    if isinstance(parent, Snapshot):
        parent.wait()  # a stored parent is pushed by its wait()
        if parent.address is None:
            raise ValueError(
                f"snapshot: parent {parent.path} is a local file snapshot; a stored snapshot's "
                "parent must be stored too"
            )
        where = parent.address
    else:
        where = parent if "://" in parent else f"{store.url.rstrip('/')}/{parent}"
    there, pname = SnapshotStore.at(where)
    if there.url != store.url:
        raise ValueError(f"snapshot: parent {where} is not in the store of {address}")
    store.layers(pname)  # missing, or a broken chain: one error naming it, before protecting
    return store, name, pname, parent if isinstance(parent, Snapshot) else None


def _start(att: _Attachment, path: str, parent: Snapshot | None, wait: bool) -> Snapshot:
    span, ctx = att.span, att.ctx
    assert ctx is not None
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        npages = (span.end - span.start) // span.page
        if parent is None:
            if stat.S_ISREG(os.fstat(fd).st_mode):
                os.ftruncate(fd, span.length)
            pages, stall = ctx.snapshot_begin(fd, span.start - span.lo, span.lo, span.hi, False)
            count = npages
        else:
            data = -(-(_HEADER_AREA + 4 * npages) // span.page) * span.page
            pages, stall = ctx.snapshot_begin(fd, data, span.start, span.end, True)
            count = len(pages) // 4
            parent_path = os.path.relpath(
                os.path.abspath(parent.path), os.path.dirname(os.path.abspath(path))
            ).encode()
            head = _HEADER.pack(
                LAYER_MAGIC, 1, span.page, span.length, span.lo - span.start, count,
                len(parent_path),
            )  # fmt: skip
            os.pwrite(fd, head + parent_path, 0)
            os.pwrite(fd, pages, _HEADER_AREA)
            os.ftruncate(fd, data + count * span.page)
    except BaseException:
        os.close(fd)
        raise
    snap = Snapshot(att, path, fd, parent, count)
    snap.stall = stall / 1e9
    att.copying = True
    if wait:
        snap.wait()
    return snap


def read_snapshot(path: str | os.PathLike[str]) -> bytes:
    """The memory image a snapshot file holds: a raw image as is, a diff layer applied over the
    image of its parent (recursively)."""
    path = os.fspath(path)
    with open(path, "rb") as f:
        head = f.read(_HEADER_AREA)
        if not head.startswith(LAYER_MAGIC):
            return head + f.read()
        length, plen = _HEADER.unpack_from(head)[3], _HEADER.unpack_from(head)[6]
        parent = os.path.join(
            os.path.dirname(path), head[_HEADER.size : _HEADER.size + plen].decode()
        )
        image = bytearray(read_snapshot(parent))
        if len(image) != length:
            raise ValueError(f"{path}: its parent {parent} holds {len(image)} bytes, not {length}")
        for at, data in _layer_pages(f, path, head):
            image[at : at + len(data)] = data
        return bytes(image)


def _layer_pages(f: Any, path: str, head: bytes) -> Iterator[tuple[int, bytes]]:
    """(offset in the object, bytes) of each page a diff layer holds, clipped to the object."""
    magic, version, page, length, offset, count, plen = _HEADER.unpack_from(head)
    if version != 1:
        raise ValueError(f"{path}: diff layer version {version} is not 1")
    f.seek(_HEADER_AREA)
    index = memoryview(f.read(4 * count)).cast("I")
    npages = -(-(offset + length) // page)
    f.seek(-(-(_HEADER_AREA + 4 * npages) // page) * page)
    for k in range(count):
        block = f.read(page)
        a = index[k] * page - offset  # where the page starts in the object
        lo, hi = max(a, 0), min(a + page, length)
        yield lo, block[lo - a : hi - a]


def _layer_to_image(path: str) -> list[tuple[int, int]]:
    """Rewrite a diff layer file in place as a sparse image holding its pages at their offsets;
    returns the [start, end) ranges they cover (the rest is as in the parent). The ranges are
    told, not found with SEEK_DATA: an object that starts inside a page has its pages across
    file blocks, whose unwritten bytes read as data."""
    sparse, pages = path + ".image", []
    with open(path, "rb") as f, open(sparse, "wb") as out:
        head = f.read(_HEADER_AREA)
        out.truncate(_HEADER.unpack_from(head)[3])
        for at, data in _layer_pages(f, path, head):
            out.seek(at)
            out.write(data)
            pages.append((at, at + len(data)))
    os.replace(sparse, path)
    ranges: list[tuple[int, int]] = []
    for a, b in sorted(pages):  # in copy order (a write's page first): sort, merge
        if ranges and ranges[-1][1] == a:
            ranges[-1] = (ranges[-1][0], b)
        else:
            ranges.append((a, b))
    return ranges


def _yes() -> dict[str, Any]:
    return {"usable": True}


def _no(why: str) -> dict[str, Any]:
    return {"usable": False, "why": why}


def probe(memory: Literal["anonymous", "shmem", "hugetlb", "file"]) -> dict[str, dict[str, Any]]:
    """Whether synchronous WP, WP_ASYNC and PAGEMAP_SCAN work on a small mapping of ``memory``
    ("file": a regular file in the temporary directory): for each, {"usable": bool}, with "why"
    where it is not."""
    import mmap
    import tempfile

    size = 2 << 20 if memory == "hugetlb" else PAGE_SIZE
    flags = {
        "anonymous": mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
        "shmem": mmap.MAP_SHARED | mmap.MAP_ANONYMOUS,
        "hugetlb": mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_HUGETLB,
        "file": mmap.MAP_SHARED,
    }[memory]
    result: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryFile() as f:
        fd = -1
        if memory == "file":
            f.truncate(size)
            fd = f.fileno()
        try:
            mapping = _core.Mapping(size, flags, fd)
        except OSError as e:
            return {key: _no(e.strerror or str(e)) for key in ("wp", "wp_async", "pagemap_scan")}
        try:
            for key, extra in (("wp", Feature(0)), ("wp_async", Feature.WP_ASYNC)):
                try:
                    wanted = Feature.PAGEFAULT_FLAG_WP | extra
                    with Userfaultfd(wanted | (available_features() & _WP_FEATURES)) as uffd:
                        uffd.register(mapping.address, size, RegisterMode.WP)
                        uffd.writeprotect(mapping.address, size)
                        result[key] = _yes()
                        if extra:
                            result["pagemap_scan"] = _scan_probe(mapping.address, size)
                except OSError as e:
                    result[key] = _no(e.strerror or str(e))
        finally:
            mapping.close()
    result.setdefault("pagemap_scan", _no("needs WP_ASYNC"))
    return result


def _scan_probe(address: int, size: int) -> dict[str, Any]:
    try:
        fd = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        return _no(e.strerror or str(e))
    try:
        _core.pagemap_scan(fd, address, address + size, True, address, address + size)
        return _yes()
    except OSError as e:
        return _no(e.strerror or str(e))
    finally:
        os.close(fd)
