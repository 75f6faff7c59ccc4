"""The snapshot store, the same suite on a directory and on a real S3 server (store/localserver.py):
push, info, pull, layers, sparse diff import, rm, gc (also racing pushes), and every error."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pty
import struct
import subprocess
import sys
import termios
import threading
from pathlib import Path

import pytest

from userfaultfd.store import (
    BadAddressError,
    ChunkError,
    ManifestError,
    ParentError,
    SnapshotExistsError,
    SnapshotNotFoundError,
    SnapshotStore,
    StoreError,
    parse_address,
)
from userfaultfd.store.manifest import chunk_key, manifest_key

CHUNK = 64 << 10


def realistic(size: int, seed: int = 1) -> bytearray:
    """Zero pages, compressible text and random bytes, in runs of a few chunks."""
    rng = __import__("random").Random(seed)
    out = bytearray(size)
    pos = 0
    while pos < size:
        n = min(size - pos, rng.choice([1, 2, 3]) * CHUNK + rng.randrange(0, CHUNK, 4096))
        kind = rng.choice(["zero", "text", "random"])
        if kind == "text":
            out[pos : pos + n] = (b"page %d of the guest " % pos * (n // 16 + 1))[:n]
        elif kind == "random":
            out[pos : pos + n] = rng.randbytes(n)
        pos += n
    return out


@pytest.fixture
def memfile(tmp_path: Path) -> tuple[Path, bytearray]:
    data = realistic(2 << 20)
    path = tmp_path / "mem"
    path.write_bytes(data)
    return path, data


def test_push_then_pull_gives_back_the_same_bytes(store_url: str, memfile, tmp_path: Path) -> None:
    path, data = memfile
    store = SnapshotStore(store_url)
    result = store.push(path, "vm-1", chunk_size=CHUNK, level=5)
    assert result.size == len(data) and result.chunks == len(data) // CHUNK
    store.pull("vm-1", tmp_path / "out")
    assert (tmp_path / "out").read_bytes() == data
    assert store.names() == ["vm-1"]


def test_info_reports_chunks_zero_chunks_and_compression(store_url: str, memfile) -> None:
    path, data = memfile
    store = SnapshotStore(store_url)
    store.push(path, "vm-1", chunk_size=CHUNK)
    info = store.info("vm-1")
    chunks = [bytes(data[i : i + CHUNK]) for i in range(0, len(data), CHUNK)]
    zero = sum(1 for c in chunks if c == bytes(CHUNK))
    assert info["name"] == "vm-1" and info["size"] == len(data)
    assert info["parent"] is None and info["layers"] == 1 and info["chunk_size"] == CHUNK
    assert info["chunks"] == len(chunks) and info["zero_chunks"] == zero
    assert 0 < info["stored_bytes"] < len(data) and info["compression_ratio"] > 1


def test_identical_chunks_are_stored_once_and_zero_chunks_not_at_all(
    store_url: str, tmp_path: Path
) -> None:
    block = os.urandom(CHUNK)
    (tmp_path / "mem").write_bytes(block * 5 + bytes(3 * CHUNK))
    store = SnapshotStore(store_url)
    result = store.push(tmp_path / "mem", "same", chunk_size=CHUNK)
    assert (result.new_chunks, result.zero_chunks) == (1, 3)
    assert len(list(store.backend.list("chunks"))) == 1
    # a second snapshot of the same content adds nothing
    assert store.push(tmp_path / "mem", "again", chunk_size=CHUNK).stored_bytes == 0


def test_a_diff_layer_stores_only_what_changed(store_url: str, memfile, tmp_path: Path) -> None:
    path, data = memfile
    store = SnapshotStore(store_url)
    store.push(path, "base", chunk_size=CHUNK)
    changed = bytearray(data)
    changed[5 * CHUNK : 5 * CHUNK + 10] = b"0123456789"
    changed[9 * CHUNK : 10 * CHUNK] = bytes(CHUNK)  # a chunk zeroed in the child
    (tmp_path / "child").write_bytes(changed)
    result = store.push(tmp_path / "child", "child", parent="base")
    assert result.inherited_chunks == result.chunks - 2
    info = store.info("child")
    assert info["layers"] == 2 and info["parent"] == "base" and info["stored_bytes"] < 2 * CHUNK
    store.pull("child", tmp_path / "out")
    assert (tmp_path / "out").read_bytes() == changed
    store.pull("base", tmp_path / "out")
    assert (tmp_path / "out").read_bytes() == data


def test_a_firecracker_sparse_diff_is_imported_from_its_data_extents(
    store_url: str, memfile, tmp_path: Path
) -> None:
    path, data = memfile
    store = SnapshotStore(store_url)
    store.push(path, "base", chunk_size=CHUNK)
    diff = tmp_path / "diff"
    expected = bytearray(data)
    with open(diff, "wb") as f:  # dirty pages only: one inside a chunk, one a whole chunk
        f.truncate(len(data))
        for off, page in [(3 * CHUNK + 8192, b"\x01" * 4096), (7 * CHUNK, b"\x02" * CHUNK)]:
            f.seek(off)
            f.write(page)
            expected[off : off + len(page)] = page
    result = store.push(diff, "fc", parent="base", sparse_diff=True)
    assert result.inherited_chunks == result.chunks - 2
    store.pull("fc", tmp_path / "out")
    assert (tmp_path / "out").read_bytes() == expected


def test_rm_then_gc_deletes_the_chunks_only_the_removed_snapshot_used(
    store_url: str, memfile, tmp_path: Path
) -> None:
    path, data = memfile
    store = SnapshotStore(store_url)
    store.push(path, "keep", chunk_size=CHUNK)
    (tmp_path / "other").write_bytes(os.urandom(2 * CHUNK) + bytes(data[2 * CHUNK :]))
    store.push(tmp_path / "other", "drop", chunk_size=CHUNK)
    before = len(list(store.backend.list("chunks")))
    assert store.gc(grace=0).deleted == 0
    store.remove("drop")
    assert store.gc(grace=3600).deleted == 0  # younger than the grace period
    assert store.gc(grace=0).deleted == 2
    assert len(list(store.backend.list("chunks"))) == before - 2
    store.pull("keep", tmp_path / "out")
    assert (tmp_path / "out").read_bytes() == data


def test_rm_refuses_a_parent_and_names_its_children(store_url: str, memfile) -> None:
    path, _ = memfile
    store = SnapshotStore(store_url)
    store.push(path, "base", chunk_size=CHUNK)
    store.push(path, "child", parent="base")
    with pytest.raises(StoreError, match="'base' is the parent of 'child'"):
        store.remove("base")
    store.remove("child")
    store.remove("base")
    assert store.names() == []


def test_gc_waits_for_a_push_in_progress(store_url: str, memfile) -> None:
    path, _ = memfile
    store = SnapshotStore(store_url)
    store.push(path, "old", chunk_size=CHUNK)
    store.remove("old")
    store.backend.put("pushes/new.1234", b"push")  # a push that has begun
    done = threading.Event()
    thread = threading.Thread(target=lambda: (store.gc(grace=0), done.set()), daemon=True)
    thread.start()
    assert not done.wait(1.0)
    assert len(list(store.backend.list("chunks"))) > 0  # nothing deleted meanwhile
    store.backend.delete("pushes/new.1234")
    assert done.wait(30)
    assert list(store.backend.list("chunks")) == []


def test_gc_racing_pushes_never_deletes_a_chunk_a_push_references(
    store_url: str, memfile, tmp_path: Path
) -> None:
    """Pushes that find their chunks already present (left by a removed snapshot) race gc with
    no grace: every pushed snapshot can be pulled whole afterwards."""
    path, data = memfile
    store = SnapshotStore(store_url)
    stop = threading.Event()
    errors: list[BaseException] = []

    def collect() -> None:
        while not stop.is_set():
            try:
                store.gc(grace=0)
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)

    store.push(path, "seed", chunk_size=CHUNK)
    thread = threading.Thread(target=collect, daemon=True)
    thread.start()
    try:
        for k in range(4):
            store.remove(store.names()[0])
            store.push(path, f"round-{k}", chunk_size=CHUNK)
    finally:
        stop.set()
        thread.join(60)
    assert not errors
    store.gc(grace=0)
    store.pull("round-3", tmp_path / "out")
    assert (tmp_path / "out").read_bytes() == data


def test_a_chunk_whose_content_does_not_match_its_hash_is_refused(
    store_url: str, memfile, tmp_path: Path
) -> None:
    path, data = memfile
    store = SnapshotStore(store_url)
    store.push(path, "vm", chunk_size=CHUNK)
    victim = next(h for h in store.open("vm").table if h)
    other = next(h for h in store.open("vm").table if h and h != victim)
    store.backend.put(chunk_key(victim), store.backend.get(chunk_key(other)))
    with pytest.raises(ChunkError, match=f"chunk {victim}: .*(hash|decompresses to)"):
        store.pull("vm", tmp_path / "out")
    store.backend.delete(chunk_key(victim))
    with pytest.raises(ChunkError, match=f"chunk {victim}: is missing"):
        store.pull("vm", tmp_path / "out")


# errors, each naming what is wrong


@pytest.mark.parametrize(
    "address",
    ["vm-7", "http://x/vm", "s3://", "s3://bucket", "file://host/dir/vm", "file:///dir/.hidden",
     "s3://b/p/bad name", "file:///"],
)  # fmt: skip
def test_a_bad_address_is_refused_naming_it(address: str) -> None:
    with pytest.raises(BadAddressError, match="address|URL|name"):
        parse_address(address)


def test_addresses_split_into_store_and_name() -> None:
    assert parse_address("s3://snaps/prod/vm-7") == ("s3://snaps/prod", "vm-7")
    assert parse_address("s3://snaps/vm-7") == ("s3://snaps", "vm-7")
    assert parse_address("file:///var/snaps/vm-7") == ("file:///var/snaps", "vm-7")


def test_missing_snapshot_names_it(store_url: str) -> None:
    with pytest.raises(SnapshotNotFoundError, match="no snapshot 'ghost' in"):
        SnapshotStore(store_url).info("ghost")


def test_pushing_over_an_existing_snapshot_is_refused(store_url: str, memfile) -> None:
    path, _ = memfile
    store = SnapshotStore(store_url)
    store.push(path, "vm", chunk_size=CHUNK)
    with pytest.raises(SnapshotExistsError, match="'vm' already exists"):
        store.push(path, "vm", chunk_size=CHUNK)


def _layer(store: SnapshotStore, name: str, parent: str | None) -> None:
    m = {"format": "userfaultfd-snapshot", "version": 1, "name": name, "size": CHUNK,
         "chunk_size": CHUNK, "parent": parent, "chunks": [0]}  # fmt: skip
    store.backend.put(manifest_key(name), json.dumps(m).encode())


def test_a_parent_cycle_is_refused_naming_the_cycle(store_url: str) -> None:
    store = SnapshotStore(store_url)
    _layer(store, "a", "b")
    _layer(store, "b", "a")
    with pytest.raises(ParentError, match="cycle: a -> b -> a"):
        store.info("a")


def test_a_missing_parent_is_refused_naming_it(store_url: str) -> None:
    store = SnapshotStore(store_url)
    _layer(store, "orphan", "gone")
    with pytest.raises(ParentError, match="'orphan' names parent 'gone'"):
        store.info("orphan")


def test_a_truncated_manifest_is_refused_naming_the_snapshot(store_url: str, memfile) -> None:
    path, _ = memfile
    store = SnapshotStore(store_url)
    store.push(path, "vm", chunk_size=CHUNK)
    data = store.backend.get(manifest_key("vm"))
    store.backend.put(manifest_key("vm"), data[: len(data) // 2])
    with pytest.raises(ManifestError, match="snapshot 'vm' is truncated"):
        store.info("vm")


# the command line


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "userfaultfd", "snapshot", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


def test_the_cli_pushes_lists_describes_pulls_removes_and_collects(
    store_url: str, memfile, tmp_path: Path
) -> None:
    path, data = memfile
    address = f"{store_url}/vm-7"
    proc = cli("push", str(path), address, "--chunk-size", "64K", "--level", "1")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"pushed {address}: 2.0 MiB in 32 chunks")  # no bar: no tty
    assert json.loads(cli("ls", store_url, "--json").stdout) == ["vm-7"]
    info = json.loads(cli("info", address, "--json").stdout)
    keys = {"name", "size", "parent", "layers", "chunk_size", "chunks", "zero_chunks",
            "stored_bytes", "compression_ratio"}  # fmt: skip
    assert keys <= set(info) and info["chunk_size"] == 64 << 10 and info["layers"] == 1
    assert cli("pull", address, str(tmp_path / "out")).returncode == 0
    assert (tmp_path / "out").read_bytes() == data
    assert cli("rm", address).returncode == 0
    proc = cli("gc", store_url, "--grace", "0")
    assert proc.returncode == 0 and "deleted" in proc.stdout
    assert cli("ls", store_url).stdout == "\n"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["info", "vm-7"], "snapshot address 'vm-7' is not"),
        (["info", "file:///nowhere/ghost"], "no snapshot 'ghost' in file:///nowhere"),
        (["push", "/dev/null", "file:///x/y", "--chunk-size", "12Q"], "'12Q' is not a size"),
        (["push", "/dev/null", "file:///x/y", "--chunk-size", "1000"], "chunk size 1000"),
        (["gc", "ftp://x"], "store URL 'ftp://x' is not"),
    ],
)
def test_the_cli_gives_one_clear_line_for_bad_input(args: list[str], message: str) -> None:
    proc = cli(*args)
    assert proc.returncode in (1, 2)
    assert message in proc.stderr and proc.stderr.count("\n") == 1


@pytest.mark.parametrize("store_url", ["s3"], indirect=True)
def test_a_missing_bucket_is_one_line_naming_the_store(store_url: str) -> None:
    missing = store_url.replace("s3://", "s3://no-such-").rsplit("/", 1)[0]
    proc = cli("ls", missing)
    assert proc.returncode == 1
    assert proc.stderr == f"userfaultfd snapshot: error: {missing}: the bucket does not exist\n"


def test_push_on_a_terminal_shows_a_progress_bar(tmp_path: Path, memfile) -> None:
    path, _ = memfile
    main, child = pty.openpty()
    fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a real size
    proc = subprocess.Popen(
        [sys.executable, "-m", "userfaultfd", "snapshot", "push", str(path),
         f"file://{tmp_path}/store/vm"],
        stdin=child, stdout=child, stderr=child,
    )  # fmt: skip
    os.close(child)
    out = b""
    with contextlib.suppress(OSError):  # EIO once the child has gone
        while chunk := os.read(main, 4096):
            out += chunk
    os.close(main)
    assert proc.wait(60) == 0
    assert b"push: 100%" in out and b"pushed file://" in out
