"""Live snapshots whose dest is a snapshot-store address: the point-in-time image, pushed as the
store's chunks; diff layers over a stored parent store only the chunks that changed."""

from __future__ import annotations

import mmap
import os
import random
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import userfaultfd as u
from userfaultfd import tracking
from userfaultfd.store import BadAddressError, SnapshotExistsError, SnapshotNotFoundError

from .conftest import PAGE, TIMEOUT
from .test_tracking import _consistent, _counts, _writer


def _pull(store_url: str, name: str, tmp_path: Path) -> bytes:
    out = tmp_path / f"pulled-{name}"
    u.SnapshotStore(store_url).pull(name, out)
    return out.read_bytes()


def _fill(m: Any) -> None:
    """Random bytes (so that no two chunks are alike), a zero counter byte at each page's start."""
    m[:] = os.urandom(len(m))
    for p in range(len(m) // PAGE):
        m[p * PAGE] = 0


@pytest.fixture(params=["plain", "thread", "sigbus"])
def memory(request: pytest.FixtureRequest) -> Iterator[Any]:
    """As in test_tracking.py: a plain mmap, or a PageServer region in either mode."""
    if request.param == "plain":
        m = mmap.mmap(-1, 4096 * PAGE)
        yield m
        m.close()
        return
    with u.PageServer(request.param) as server:
        region = server.map(512 * PAGE, u.Fill(b"\x00"))
        yield region
        region.close()


@pytest.fixture
def own_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The temporary directory the local copy goes to, to check that it is removed."""
    where = tmp_path / "tmp"
    where.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(where))
    return where


def test_a_stored_live_snapshot_is_the_memory_of_one_instant(
    memory: Any, store_url: str, tmp_path: Path, own_tmp: Path
) -> None:
    npages = len(memory) // PAGE
    rng = random.Random(3)
    order = [rng.randrange(npages) for _ in range(100 * npages)]  # < 256 writes a page
    _fill(memory)
    base = [0] * npages
    writer = _writer(memory, order)
    deadline = time.monotonic() + TIMEOUT
    while not writer.chunks and time.monotonic() < deadline:
        time.sleep(0.0001)  # the writer is writing when the snapshot starts
    snap = u.snapshot(memory, f"{store_url}/live", wait=False)
    assert snap.wait(TIMEOUT) is snap
    writer.join(TIMEOUT)
    assert snap.address == snap.path == f"{store_url}/live" and snap.parent is None
    assert snap.stored is not None and snap.stored.chunks == snap.stored.new_chunks
    image = _pull(store_url, "live", tmp_path)
    assert len(image) == len(memory)
    assert 0 < _consistent(image, base, order) < len(order)  # taken while it wrote
    assert list(own_tmp.iterdir()) == []  # the local copy is gone


@pytest.mark.parametrize("tracked", [True, False])
def test_a_stored_diff_layer_stores_only_changed_chunks_and_restores_the_same_bytes(
    store_url: str, tmp_path: Path, tracked: bool
) -> None:
    m = mmap.mmap(-1, 2048 * PAGE)  # 32 chunks of 256 KiB
    npages = len(m) // PAGE
    _fill(m)
    tracker = u.track_writes(m, mechanism="sync") if tracked else None
    full = u.snapshot(m, f"{store_url}/s0")
    assert full.stored is not None
    base = _counts(bytes(m[:]), npages)
    order = [random.randrange(npages // 8) for _ in range(20 * npages)]  # a hot eighth
    writer = _writer(m, order)
    layer = u.snapshot(m, f"{store_url}/s1", parent=full)  # by the Snapshot it returned
    writer.join(TIMEOUT)
    assert layer.stored is not None
    if tracked:  # only the pages written since were copied, and the push keeps the rest
        assert layer.parent is full and layer.pages <= npages // 8
    else:  # the whole image was copied, and the push compared its chunks
        assert layer.parent is None and layer.pages == npages
    _consistent(_pull(store_url, "s1", tmp_path), base, order)
    assert layer.stored.inherited_chunks >= layer.stored.chunks * 7 // 8
    assert layer.stored.stored_bytes <= full.stored.stored_bytes // 4
    assert u.SnapshotStore(store_url).info("s1")["parent"] == "s0"
    u.snapshot(m, f"{store_url}/s2", parent="s1")  # by name (the writer wrote after s1)
    quiet = u.snapshot(m, f"{store_url}/s2q", parent="s2")  # unchanged: nothing stored
    assert quiet.stored is not None and quiet.stored.stored_bytes == 0
    assert quiet.stored.inherited_chunks == quiet.stored.chunks and "diff layer" in repr(quiet)
    again = u.snapshot(m, f"{store_url}/s3", parent=f"{store_url}/s0")  # by address
    assert _pull(store_url, "s2q", tmp_path) == _pull(store_url, "s3", tmp_path) == m[:]
    if tracker is not None:
        tracker.close()
    assert again.stored is not None and not tracking._attached
    m.close()


def test_stored_snapshot_errors_come_before_anything_is_protected(
    tmp_path: Path, own_tmp: Path
) -> None:
    m = mmap.mmap(-1, 4 * PAGE)
    url = f"file://{tmp_path}/store"
    local = u.snapshot(m, tmp_path / "local")
    stored = u.snapshot(m, f"{url}/there")
    other = u.snapshot(m, f"file://{tmp_path}/other/x")
    cases: list[tuple[str, Any, type[Exception], str]] = [
        ("s3://bucket", None, BadAddressError, "names no snapshot"),
        (f"{url}/bad name", None, BadAddressError, "'bad name'"),
        ("ftp://host/x", None, BadAddressError, "ftp://host/x"),
        (f"{url}/there", None, SnapshotExistsError, "'there' already exists"),
        (f"{url}/new", "missing", SnapshotNotFoundError, "no snapshot 'missing'"),
        (f"{url}/new", local, ValueError, "is a local file snapshot"),
        (f"{url}/new", other, ValueError, "is not in the store"),
        (str(tmp_path / "file"), stored, ValueError, "a local file's parent is a local file"),
        (str(tmp_path / "file"), "there", TypeError, "is not a Snapshot"),
    ]
    for dest, parent, kind, words in cases:
        with pytest.raises(kind, match=words):
            u.snapshot(m, dest, parent=parent)
        assert not tracking._attached  # nothing was protected
    assert u.SnapshotStore(url).names() == ["there"]
    assert list(own_tmp.iterdir()) == []
    m[0] = 1  # plain memory
    m.close()


def test_a_stored_layer_of_an_object_inside_pages_is_its_bytes(
    store_url: str, tmp_path: Path
) -> None:
    m = mmap.mmap(-1, 300 * PAGE)
    m[:] = os.urandom(len(m))
    v = memoryview(m)[7:-100]  # its pages straddle the file blocks of the local copy
    with u.track_writes(v, mechanism="sync"):
        full = u.snapshot(v, f"{store_url}/a")
        for at in (3, 10, 5 * PAGE, 299 * PAGE + 5):  # before, in, and at the end of the object
            m[at] = (m[at] + 1) % 256
        layer = u.snapshot(v, f"{store_url}/b", parent=full)
    assert layer.parent is full and layer.pages == 3
    assert _pull(store_url, "b", tmp_path) == bytes(v)
    v.release()
    m.close()
