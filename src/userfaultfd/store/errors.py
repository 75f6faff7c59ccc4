"""The snapshot store's errors: each names the address, snapshot or chunk it is about."""

from __future__ import annotations

import errno


class StoreError(OSError):
    """Base class of the store's errors (an OSError: callers may catch by errno class)."""

    def __init__(self, err: int, message: str) -> None:
        super().__init__(err, message)

    def __str__(self) -> str:
        return str(self.strerror)


class BadAddressError(StoreError, ValueError):
    """A store URL or snapshot address that cannot be parsed."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.EINVAL, message)


class SnapshotNotFoundError(StoreError, FileNotFoundError):
    def __init__(self, name: str, store: str) -> None:
        super().__init__(errno.ENOENT, f"no snapshot {name!r} in {store}")
        self.name = name


class SnapshotExistsError(StoreError, FileExistsError):
    def __init__(self, name: str, store: str) -> None:
        super().__init__(errno.EEXIST, f"snapshot {name!r} already exists in {store}")


class ManifestError(StoreError):
    """A manifest that is truncated, corrupt, or of a format version we do not read."""

    def __init__(self, name: str, why: str) -> None:
        super().__init__(errno.EBADMSG, f"the manifest of snapshot {name!r} {why}")


class ParentError(StoreError):
    """A layer chain that cannot be resolved: a missing parent, or a cycle."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.ENOENT, message)


class ChunkError(StoreError):
    """A chunk that could not be fetched, or whose content does not match its hash."""

    def __init__(self, chunk: str, why: str, err: int = errno.EIO) -> None:
        super().__init__(err, f"chunk {chunk}: {why}")
        self.chunk = chunk
