"""The snapshot store: layered, compressed, content-addressed memory images in a local directory
(``file:///dir``) or an S3-compatible object store (``s3://bucket[/prefix]``). Format:
docs/snapshot-store.md."""

from .address import parse_address
from .errors import (
    BadAddressError,
    ChunkError,
    ManifestError,
    ParentError,
    SnapshotExistsError,
    SnapshotNotFoundError,
    StoreError,
)
from .mapping import SnapshotMapping, map_snapshot
from .store import DEFAULT_CHUNK_SIZE, GcResult, PushResult, Snapshot, SnapshotStore

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "BadAddressError",
    "ChunkError",
    "GcResult",
    "ManifestError",
    "ParentError",
    "PushResult",
    "Snapshot",
    "SnapshotMapping",
    "SnapshotExistsError",
    "SnapshotNotFoundError",
    "SnapshotStore",
    "StoreError",
    "map_snapshot",
    "parse_address",
]
