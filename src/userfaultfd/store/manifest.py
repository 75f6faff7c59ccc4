"""The manifest: one JSON object per snapshot layer (format documented in docs/snapshot-store.md).

``chunks`` has one entry per chunk of the snapshot: the BLAKE3 hex digest of its uncompressed
content, 0 for a chunk of zeros (stored nowhere), or null for "as in the parent layer"."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from .errors import ManifestError

FORMAT = "userfaultfd-snapshot"
VERSION = 1
ZERO = 0
HASH = re.compile(r"[0-9a-f]{64}")

Entry = str | int | None  # a hash, ZERO, or None (inherited)


def chunk_key(digest: str) -> str:
    return f"chunks/{digest[:2]}/{digest}"


def manifest_key(name: str) -> str:
    return f"snapshots/{name}.json"


@dataclass
class Manifest:
    name: str
    size: int
    chunk_size: int
    parent: str | None
    chunks: list[Entry]
    level: int = 3
    created: float = 0.0
    raw_bytes: int = 0  # uncompressed bytes of this layer's distinct chunks
    compressed_bytes: int = 0  # the same chunks, compressed
    stored_bytes: int = 0  # compressed bytes this push added to the store (new chunks only)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def count(self) -> int:
        return len(self.chunks)

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "format": FORMAT,
                "version": VERSION,
                "name": self.name,
                "size": self.size,
                "chunk_size": self.chunk_size,
                "parent": self.parent,
                "hash": "blake3",
                "compression": "zstd",
                "level": self.level,
                "created": self.created,
                "raw_bytes": self.raw_bytes,
                "compressed_bytes": self.compressed_bytes,
                "stored_bytes": self.stored_bytes,
                "chunks": self.chunks,
            },
            separators=(",", ":"),
        ).encode()

    @classmethod
    def from_json(cls, name: str, data: bytes) -> Manifest:
        try:
            obj = json.loads(data)
        except (ValueError, UnicodeDecodeError) as e:
            raise ManifestError(
                name, f"is truncated or not JSON ({len(data)} bytes: {e})"
            ) from None
        if not isinstance(obj, dict) or obj.get("format") != FORMAT:
            raise ManifestError(name, f"is not a {FORMAT} manifest")
        if obj.get("version") != VERSION:
            raise ManifestError(
                name, f"has format version {obj.get('version')!r}; this version reads {VERSION}"
            )
        try:
            m = cls(
                name=name,
                size=_int(obj["size"]),
                chunk_size=_int(obj["chunk_size"]),
                parent=obj["parent"],
                chunks=list(obj["chunks"]),
                level=_int(obj.get("level", 3)),
                created=float(obj.get("created", 0.0)),
                raw_bytes=_int(obj.get("raw_bytes", 0)),
                compressed_bytes=_int(obj.get("compressed_bytes", 0)),
                stored_bytes=_int(obj.get("stored_bytes", 0)),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ManifestError(name, f"lacks or mangles a field: {e!r}") from None
        if obj.get("hash", "blake3") != "blake3" or obj.get("compression", "zstd") != "zstd":
            raise ManifestError(name, "uses a hash or compression this version does not read")
        if m.parent is not None and not isinstance(m.parent, str):
            raise ManifestError(name, f"names a parent that is not a name: {m.parent!r}")
        if m.chunk_size <= 0 or m.size < 0:
            raise ManifestError(name, f"has size {m.size} and chunk size {m.chunk_size}")
        if len(m.chunks) != -(-m.size // m.chunk_size):
            raise ManifestError(
                name, f"lists {len(m.chunks)} chunks for {m.size} bytes of {m.chunk_size}"
            )
        for i, entry in enumerate(m.chunks):
            ok = entry == ZERO or (entry is None and m.parent is not None)
            if not (ok or (isinstance(entry, str) and HASH.fullmatch(entry))):
                raise ManifestError(name, f"has a bad entry for chunk {i}: {entry!r}")
        return m

    def digests(self) -> set[str]:
        """The hashes this layer itself references."""
        return {e for e in self.chunks if isinstance(e, str)}


def _int(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{value!r} is not a non-negative integer")
    return value
