"""Where a region's pages come from. Each source is served natively, without the GIL."""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from dataclasses import dataclass, field
from typing import Any

from . import _core

# The engine's source kinds, as _native/engine.h defines them.
from ._core import SRC_BYTES, SRC_CONTINUE, SRC_FILL, SRC_ZERO
from .errors import expect_int
from .uffd import PAGE_SIZE


def _round_up(n: int, to: int) -> int:
    return -(-n // to) * to


@dataclass
class Prepared:
    """What the engine needs: a kind and addresses kept valid by ``keep`` while served."""

    kind: int
    base: int = 0
    base_len: int = 0
    tail: int = 0
    keep: list[Any] = field(default_factory=list)
    memfd: int = -1  # Memfd: the region maps this file itself

    def release(self) -> None:
        for obj in self.keep:
            if isinstance(obj, _core.Mapping):
                obj.close()
            elif isinstance(obj, memoryview):
                obj.release()
        self.keep.clear()


class Source:
    """Base class of page sources."""

    def prepare(self, length: int, page_size: int) -> Prepared:
        raise NotImplementedError


class Zero(Source):
    """Zero pages (UFFDIO_ZEROPAGE; on hugetlb, copies of a zero page)."""

    def prepare(self, length: int, page_size: int) -> Prepared:
        return Prepared(SRC_ZERO)

    def __repr__(self) -> str:
        return "Zero()"


class Fill(Source):
    """A byte, or a pattern repeated from offset 0 of the region."""

    def __init__(self, pattern: int | bytes) -> None:
        if isinstance(pattern, int):
            if not 0 <= pattern <= 255:
                raise ValueError(f"fill byte {pattern!r} is not in 0..255")
            pattern = bytes([pattern])
        try:
            with memoryview(pattern) as view:
                pattern = view.tobytes()
        except TypeError:
            raise TypeError(
                f"fill pattern {pattern!r} is a {type(pattern).__name__}: give a byte value "
                "0..255 or a bytes-like object"
            ) from None
        if not pattern:
            raise ValueError("fill pattern is empty")
        if len(pattern) > 1 << 20:
            raise ValueError(f"fill pattern of {len(pattern)} bytes is longer than 1 MiB")
        self.pattern = pattern

    def prepare(self, length: int, page_size: int) -> Prepared:
        base, size = _core.buffer_address(self.pattern)
        return Prepared(SRC_FILL, base, size, keep=[self.pattern])

    def __repr__(self) -> str:
        return f"Fill({self.pattern[:16]!r}{'...' if len(self.pattern) > 16 else ''})"


class Buffer(Source):
    """Any buffer-protocol object, copied from in place (kept alive while served). Bytes past its
    end read as zeros."""

    def __init__(self, obj: Any) -> None:
        try:
            view = memoryview(obj)
        except TypeError:
            raise TypeError(
                f"buffer source {obj!r:.60} is a {type(obj).__name__}, not a bytes-like object"
            ) from None
        with view:
            if not view.contiguous:
                raise ValueError("buffer source must be C-contiguous")
            self.nbytes = view.nbytes
        self.obj = obj

    def prepare(self, length: int, page_size: int) -> Prepared:
        # An export of our own while served: the buffer can be neither resized nor freed.
        view = memoryview(self.obj).cast("B")
        base, size = _core.buffer_address(view)
        size = min(size, length)
        body = size - size % page_size
        prepared = Prepared(SRC_BYTES, base, body, keep=[view])
        if size > body:  # the last partial granule: a padded copy
            tail = bytearray(page_size)
            tail[: size - body] = view[body:size]
            prepared.tail = _core.buffer_address(tail)[0]
            prepared.keep.append(tail)
        return prepared

    def __repr__(self) -> str:
        return f"Buffer({self.nbytes} bytes)"


def open_data_file(file: str | os.PathLike[str] | int, what: str) -> int:
    """A new read-only fd of a regular file or a block device (``file`` a path or an open fd).
    The open does not block: a FIFO's would wait for a writer, forever, before its type could be
    refused. FileNotFoundError and ValueError name ``what`` and the path."""
    if isinstance(file, int):
        name = f"{what} fd {file}"
        fd = fcntl.fcntl(file, fcntl.F_DUPFD_CLOEXEC, 0)
    else:
        name = f"{what} {os.fspath(file)!r}"
        try:
            fd = os.open(file, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
        except FileNotFoundError:
            raise FileNotFoundError(errno.ENOENT, f"{name} does not exist") from None
    mode = os.fstat(fd).st_mode
    if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
        os.close(fd)
        raise ValueError(f"{name} is not a regular file or a block device")
    return fd


class File(Source):
    """A regular file or a block device (path or open fd) from ``offset``. Bytes past its end
    read as zeros. If the file shrinks while served, the pages that can no longer be read are
    poisoned and reported."""

    def __init__(self, file: str | os.PathLike[str] | int, offset: int = 0) -> None:
        if expect_int("file offset", offset) < 0:
            raise ValueError(f"file offset {offset!r} is not a non-negative integer")
        self.file = file
        self.offset = offset

    def prepare(self, length: int, page_size: int) -> Prepared:
        fd = open_data_file(self.file, "file")
        try:
            size = os.lseek(fd, 0, os.SEEK_END)  # st_size is 0 for a block device
            data = max(0, min(size - self.offset, length))
            aligned = self.offset - self.offset % PAGE_SIZE
            delta = self.offset - aligned
            mapping = _core.Mapping.__new__(_core.Mapping)
            mapping._map_file(fd, aligned, delta + data, delta + _round_up(length, page_size))
        finally:
            os.close(fd)
        return Prepared(
            SRC_BYTES, mapping.address + delta, _round_up(data, page_size), keep=[mapping]
        )

    def __repr__(self) -> str:
        return f"File({self.file!r}, offset={self.offset})"


class Memfd(Source):
    """A memfd (or any shmem file) whose pages are mapped in place: the region maps the file and
    serves minor faults with UFFDIO_CONTINUE, copying no byte. Holes read as zeros."""

    def __init__(self, fd: int) -> None:
        if expect_int("memfd", fd) < 0:
            raise ValueError(f"memfd {fd!r} is not a file descriptor")
        self.fd = fd

    def prepare(self, length: int, page_size: int) -> Prepared:
        size = os.fstat(self.fd).st_size
        if size < length:
            raise ValueError(f"memfd has {size} bytes, fewer than the region's {length}")
        return Prepared(SRC_CONTINUE, memfd=self.fd)

    def __repr__(self) -> str:
        return f"Memfd({self.fd})"
