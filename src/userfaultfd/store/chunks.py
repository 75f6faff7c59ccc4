"""A chunk's life: hashed (BLAKE3 of the uncompressed bytes), compressed (zstd), and on the way
back decompressed and checked against its hash. blake3 and zstandard release the GIL on large
buffers, so several threads compress or decompress at once."""

from __future__ import annotations

import threading

import zstandard
from blake3 import blake3

from .errors import ChunkError

_local = threading.local()


def digest(data: bytes | memoryview) -> str:
    return blake3(data).hexdigest()


def compress(data: bytes | memoryview, level: int) -> bytes:
    """A zstd frame that records its content size. Compressor contexts are not thread-safe and
    costly to make: one per thread and level."""
    key = f"c{level}"
    c = getattr(_local, key, None)
    if c is None:
        c = zstandard.ZstdCompressor(level=level, write_content_size=True)
        setattr(_local, key, c)
    return bytes(c.compress(data))


def decode(name: str, blob: bytes, length: int) -> bytes:
    """The chunk's bytes from its stored form, checked: never wrong data."""
    d = getattr(_local, "d", None)
    if d is None:
        d = _local.d = zstandard.ZstdDecompressor()
    try:
        data = bytes(d.decompress(blob, max_output_size=length))
    except zstandard.ZstdError as e:
        raise ChunkError(name, f"does not decompress ({len(blob)} bytes stored): {e}") from None
    if len(data) != length:
        raise ChunkError(name, f"decompresses to {len(data)} bytes, not {length}")
    if digest(data) != name:
        raise ChunkError(name, "content does not match its hash")
    return data


def is_zero(data: bytes | memoryview) -> bool:
    return data == bytes(len(data))
