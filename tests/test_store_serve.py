"""Serving stored snapshots: `userfaultfd serve --memory ADDRESS` to Firecracker-like clients, the
chunk cache in the page server (cached chunks served natively, misses fetched once each), a
chunk that fails (poisoned and logged, never wrong data), a store that goes away, and the
Python API that maps a stored snapshot."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import userfaultfd as u
from userfaultfd import _core
from userfaultfd.store import SnapshotStore
from userfaultfd.store.manifest import chunk_key
from userfaultfd.store.serving import StoreCache

from .conftest import MADV_DONTNEED, libc, run_child
from .test_serve import CLIENT, Server
from .test_store import realistic

pytestmark = pytest.mark.needs_uffd
PAGE = u.PAGE_SIZE
CHUNK = 64 << 10
SIZE = 4 << 20


@pytest.fixture
def pushed(store_url: str, tmp_path: Path) -> tuple[str, bytearray, Path]:
    """(address, content, local copy) of a snapshot pushed to the store."""
    data = realistic(SIZE, seed=7)
    path = tmp_path / "mem"
    path.write_bytes(data)
    SnapshotStore(store_url).push(path, "vm", chunk_size=CHUNK)
    return f"{store_url}/vm", data, path


def touch(address: int, length: int, timeout: float = 30.0) -> None:
    """Touch every page from a native thread (no GIL held while it faults)."""
    t = threading.Thread(target=_core.touch, args=(address, length, PAGE, False), daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), "the toucher is still waiting for its pages"


def test_serve_serves_a_stored_snapshot_to_a_firecracker_client(pushed, tmp_path: Path) -> None:
    address, _, local = pushed
    server = Server(tmp_path, address)  # type: ignore[arg-type]  # a path or an address
    try:
        layout = f"{SIZE // 2}@0,{SIZE // 4}@{SIZE // 2 + 2 * CHUNK}"
        proc = subprocess.run(
            [sys.executable, CLIENT, str(server.socket), str(local), layout],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert proc.stdout.split()[-1] == "OK"
    finally:
        assert server.stop() == 0


def test_cached_chunks_serve_every_byte_and_each_chunk_is_fetched_once(pushed) -> None:
    address, data, _ = pushed
    store, name = SnapshotStore.at(address)
    snap = store.open(name)
    with StoreCache(snap) as cache, u.PageServer("thread", workers=2) as server:
        region = server.map(SIZE, cache.source(), readahead="adaptive")
        threads = [
            threading.Thread(target=_core.touch, args=(region.address + k * PAGE, SIZE - k * PAGE,
                                                      4 * PAGE, False), daemon=True)
            for k in range(4)
        ]  # fmt: skip
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert not any(t.is_alive() for t in threads)
        assert bytes(region[:]) == bytes(data)
        assert cache.fetched == sum(1 for h in snap.table if h)  # no chunk fetched twice
        region.close()
        # A second region over the same cache is served without fetching anything.
        again = server.map(SIZE, cache.source())
        touch(again.address, SIZE)
        assert bytes(again[:]) == bytes(data) and cache.fetched == cache.stats()["fetched"]
        again.close()


def test_a_sigbus_mode_server_refuses_a_chunk_cache_naming_the_mode(pushed) -> None:
    address, _, _ = pushed
    store, name = SnapshotStore.at(address)
    with (
        StoreCache(store.open(name)) as cache,
        u.PageServer("sigbus") as server,
        pytest.raises(ValueError, match="thread mode only.*mode='thread'"),
    ):
        server.map(SIZE, cache.source())


def test_a_bounded_cache_evicts_and_still_serves_every_byte(pushed) -> None:
    address, data, _ = pushed
    store, name = SnapshotStore.at(address)
    with StoreCache(store.open(name), budget=0, fetchers=2) as cache, u.PageServer("thread") as s:
        assert cache.budget == 8 * CHUNK  # the least it keeps
        region = s.map(SIZE, cache.source(), readahead="adaptive")
        touch(region.address, SIZE)
        assert bytes(region[:]) == bytes(data)
        assert cache.evicted > 0
        region.close()


# A process that serves a stored snapshot to itself: a fault that is poisoned kills it with SIGBUS,
# so it runs apart from the tests. It touches chunk `first`, says so, waits for a line on stdin,
# then touches `then` (a chunk number, or "all" to touch everything and compare with `local`).
CHILD = r"""
import sys, threading, logging
import userfaultfd as u
from userfaultfd import _core
from userfaultfd.store import SnapshotStore
from userfaultfd.store.serving import StoreCache
logging.basicConfig(level=logging.INFO, format="%(message)s")
address, first, then, timeout, local = sys.argv[1:6]
store, name = SnapshotStore.at(address, timeout=float(timeout))
snap = store.open(name)
cache = StoreCache(snap, fetch_timeout=float(timeout))
server = u.PageServer("thread")
region = server.map(snap.size, cache.source())
def touch(chunk, length):
    t = threading.Thread(target=_core.touch,
                         args=(region.address + chunk * 65536, length, 4096, False))
    t.start()
    t.join(60)
    assert not t.is_alive()
touch(int(first), 65536)
print("first chunk served", flush=True)
sys.stdin.readline()
if then == "all":
    touch(0, snap.size)
    assert bytes(region[:]) == open(local, "rb").read(), "wrong data"
    print("all served", flush=True)
else:
    _core.touch(region.address + int(then) * 65536, 4096, 4096, False)
    print("poisoned chunk served: wrong", flush=True)
"""


def child(
    address: str, first: int, then: str, timeout: float, local: Path
) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, address, str(first), then, str(timeout), str(local)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def data_chunks(address: str) -> list[int]:
    store, name = SnapshotStore.at(address)
    return [i for i, h in enumerate(store.open(name).table) if h]


def test_a_chunk_that_fails_its_hash_is_poisoned_and_logged(pushed) -> None:
    address, _, local = pushed
    store, name = SnapshotStore.at(address)
    snap = store.open(name)
    first, bad = data_chunks(address)[:2]
    victim = snap.table[bad]
    assert victim and snap.table[first] != victim
    store.backend.put(chunk_key(victim), store.backend.get(chunk_key(snap.table[first] or "")))
    proc = child(address, first, str(bad), 5, local)
    out, err = proc.communicate("go\n", timeout=60)
    assert proc.returncode == -7, out + err  # SIGBUS: the page is poisoned
    assert "first chunk served" in out and "wrong" not in out
    assert f"chunk {bad} (offsets {bad * CHUNK:#x}-{(bad + 1) * CHUNK:#x}) poisoned" in err
    assert f"chunk {victim}: content does not match its hash" in err


@pytest.mark.parametrize("store_url", ["s3"], indirect=True)
def test_a_chunk_not_fetched_in_time_is_poisoned_never_hung(pushed, s3_server) -> None:
    address, _, local = pushed
    first, bad = data_chunks(address)[:2]
    proc = child(address, first, str(bad), 1.5, local)
    try:
        assert proc.stdout is not None and "first" in proc.stdout.readline()
        s3_server.pause()
        start = time.monotonic()
        out, err = proc.communicate("go\n", timeout=60)
    finally:
        s3_server.resume()
    assert proc.returncode == -7, out + err
    assert time.monotonic() - start < 15
    assert f"chunk {bad} " in err and "not fetched within 1.5 s" in err


@pytest.mark.parametrize("store_url", ["s3"], indirect=True)
def test_a_store_that_goes_away_and_comes_back_in_time_is_survived(pushed, s3_server) -> None:
    address, _, local = pushed
    proc = child(address, data_chunks(address)[0], "all", 20, local)
    try:
        assert proc.stdout is not None and "first" in proc.stdout.readline()
        s3_server.pause()
        assert proc.stdin is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()
        time.sleep(1.5)
    finally:
        s3_server.resume()
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, out + err
    assert "all served" in out


def test_an_application_maps_a_stored_snapshot_as_a_buffer(pushed) -> None:
    address, data, _ = pushed
    store, name = SnapshotStore.at(address)
    with store.map(name, cache_size=1 << 20) as region:
        assert region.size == len(data) and len(region) == len(data)
        # touched while holding the GIL: the handler process serves it
        assert region[CHUNK : 3 * CHUNK] == bytes(data[CHUNK : 3 * CHUNK])
        assert bytes(memoryview(region)) == bytes(data)


def test_mapping_a_missing_snapshot_names_it(store_url: str) -> None:
    with pytest.raises(FileNotFoundError, match="no snapshot 'ghost'"):
        SnapshotStore(store_url).map("ghost")


CLOSED = r"""
import sys
import userfaultfd as u
from userfaultfd import _core
from userfaultfd.store import SnapshotStore
from userfaultfd.store.serving import StoreCache
store, name = SnapshotStore.at(sys.argv[1])
snap = store.open(name)
cache = StoreCache(snap)
server = u.PageServer("thread")
region = server.map(snap.size, cache.source())
cache.close()
print("closed", flush=True)
_core.touch(region.address + int(sys.argv[2]) * 65536, 4096, 4096, False)
print("served after close: wrong", flush=True)
"""


def test_a_closed_cache_poisons_what_it_has_not_got_instead_of_hanging(pushed) -> None:
    address, _, _ = pushed
    proc = run_child(CLOSED, address, str(data_chunks(address)[0]))
    assert proc.returncode == -7, proc.stdout + proc.stderr
    assert proc.stdout == "closed\n"


def test_racing_faults_refaults_and_evictions_always_see_the_right_bytes(tmp_path: Path) -> None:
    """A bounce in the spirit of uffd-stress: 4 KiB chunks, a cache of the least size (most
    chunks are evicted and fetched again), threads faulting over each other, the region dropped
    (MADV_DONTNEED: served again) between rounds, every byte checked after each round."""
    data = realistic(1 << 20, seed=9)
    (tmp_path / "mem").write_bytes(data)
    store = SnapshotStore(f"file://{tmp_path}/store")
    store.push(tmp_path / "mem", "vm", chunk_size=PAGE)
    with (
        StoreCache(store.open("vm"), budget=0, fetchers=4) as cache,
        u.PageServer("thread", workers=2) as server,
    ):
        region = server.map(len(data), cache.source(), readahead=3)
        for _ in range(4):
            threads = [
                threading.Thread(target=_core.touch, args=(region.address + k * PAGE,
                                 len(data) - k * PAGE, 3 * PAGE, False), daemon=True)
                for k in range(3)
            ]  # fmt: skip
            for t in threads:
                t.start()
            for t in threads:
                t.join(30)
            assert not any(t.is_alive() for t in threads)
            assert bytes(region[:]) == bytes(data)
            assert libc.madvise(region.address, len(data), MADV_DONTNEED) == 0
        assert cache.evicted > 0 and cache.fetched > cache.chunks
        region.close()


def test_sequential_misses_prefetch_the_next_chunks_and_a_jump_does_not(tmp_path: Path) -> None:
    (tmp_path / "mem").write_bytes(os.urandom(16 * CHUNK))
    store = SnapshotStore(f"file://{tmp_path}/store")
    store.push(tmp_path / "mem", "vm", chunk_size=CHUNK)
    with StoreCache(store.open("vm"), prefetch=4) as cache, u.PageServer("thread") as server:
        region = server.map(16 * CHUNK, cache.source())  # no readahead: only the cache's
        state = cache.cache.state
        touch(region.address, PAGE)
        touch(region.address + CHUNK, PAGE)  # right after the chunk before: a stream
        deadline = time.monotonic() + 10
        while state(5) != _core.CHUNK_PRESENT:
            assert time.monotonic() < deadline, "chunks 2-5 were not prefetched"
            time.sleep(0.01)
        assert state(6) == _core.CHUNK_ABSENT
        touch(region.address + 10 * CHUNK, PAGE)  # a jump: no prefetch
        time.sleep(0.2)
        assert state(11) == _core.CHUNK_ABSENT and cache.fetched == 7
        region.close()


def test_serve_logs_a_poisoned_chunk_with_the_client_addresses(pushed, tmp_path: Path) -> None:
    address, _, local = pushed
    store, name = SnapshotStore.at(address)
    snap = store.open(name)
    bad = data_chunks(address)[1]
    victim = snap.table[bad] or ""
    store.backend.put(chunk_key(victim), b"not a zstd frame")
    server = Server(tmp_path, address)  # type: ignore[arg-type]  # a path or an address
    try:
        proc = subprocess.run(
            [sys.executable, CLIENT, str(server.socket), str(local), f"{SIZE}@0"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert proc.returncode == -7, proc.stdout + proc.stderr  # SIGBUS on the poisoned page
        line = server.expect(f"chunk {bad} (snapshot offsets {bad * CHUNK:#x}-")
        assert "does not decompress" in line and "pages at: client 1 (pid" in line, line
        start, end = (int(x, 16) for x in line.rsplit(" ", 1)[1].split("-"))
        assert end - start == CHUNK  # the chunk's pages in the client
    finally:
        assert server.stop() == 0


MAPPED = r"""
import sys
from userfaultfd import _core
from userfaultfd.store import SnapshotStore
store, name = SnapshotStore.at(sys.argv[1])
mem = store.map(name)
print(mem[:16] == open(sys.argv[3], "rb").read(16), flush=True)
_core.touch(mem.address + int(sys.argv[2]) * 65536, 4096, 4096, False)
print("poisoned chunk served: wrong", flush=True)
"""


def test_a_mapped_snapshot_reports_a_poisoned_chunk_on_the_applications_stderr(
    pushed,
) -> None:
    address, _, local = pushed
    store, name = SnapshotStore.at(address)
    snap = store.open(name)
    bad = data_chunks(address)[1]
    store.backend.put(chunk_key(snap.table[bad] or ""), b"garbage")
    proc = run_child(MAPPED, address, str(bad), str(local))
    assert proc.returncode == -7, proc.stdout + proc.stderr  # SIGBUS
    assert proc.stdout == "True\n"
    assert f"chunk {bad} (snapshot offsets {bad * CHUNK:#x}-" in proc.stderr
    assert "connect" not in proc.stderr and "listening" not in proc.stderr


def test_serve_replays_a_working_set_from_the_store(pushed, tmp_path: Path) -> None:
    """--replay installs the set's pages without faults: the chunks are fetched for it."""
    from userfaultfd.working_set import WorkingSet

    address, _, local = pushed
    ws = tmp_path / "all.ws"
    WorkingSet(PAGE, SIZE, [(0, SIZE // PAGE, 0)]).save(ws)
    server = Server(tmp_path, address, "--replay", str(ws))  # type: ignore[arg-type]
    try:
        proc = subprocess.run(
            [sys.executable, CLIENT, str(server.socket), str(local), f"{SIZE}@0",
             "--resident-then-touch"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "resident" in proc.stdout and proc.stdout.split()[-1] == "OK"
    finally:
        assert server.stop() == 0


def test_a_replaced_serving_process_opens_its_own_cache_and_loses_nothing(
    pushed, tmp_path: Path
) -> None:
    """The supervisor never opens the store: each serving process opens its chunk cache, so one
    started after a kill -9 fetches again what the clients touch next, every byte right."""
    from .test_serve_production import load, result, serving_pid

    address, _, local = pushed
    server = Server(tmp_path, address, "--readahead", "none", "--verbose")  # type: ignore[arg-type]
    try:
        first = serving_pid(server)
        proc = load(server, local, SIZE, 0, 3.0)
        server.expect("connect client")
        time.sleep(0.5)  # faulting, chunks fetched into the first process's cache
        os.kill(first, 9)
        assert "(killed by SIGKILL) while serving 1 client(s)" in server.expect("ended")
        server.expect("took over 1 client(s)")
        report = result(proc)  # no wrong page, before or after the takeover
        assert report["pages"] == SIZE // PAGE, report
        assert "errors 0" in server.expect("disconnect client 1")
    finally:
        assert server.stop() == 0


def test_serve_of_a_missing_stored_snapshot_exits_naming_it(store_url: str, tmp_path: Path) -> None:
    """Only the serving process opens the store: its failure to, before anything was ever
    served, ends the supervisor with that error (not a loop of replacements failing alike)."""
    proc = subprocess.run(
        [sys.executable, "-m", "userfaultfd", "serve", "--socket", str(tmp_path / "s.sock"),
         "--memory", f"{store_url}/ghost"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "error: no snapshot 'ghost'" in proc.stderr.splitlines()[-1], proc.stderr
    assert not (tmp_path / "s.sock").exists()
