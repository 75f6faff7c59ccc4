"""Working sets: recording first touches, the file, merging, replay in the page server and in
`userfaultfd serve`, and the `ws` commands."""

from __future__ import annotations

import array
import contextlib
import ctypes
import json
import os
import random
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest

import userfaultfd as u
from userfaultfd import _core
from userfaultfd.commands import cli
from userfaultfd.working_set import HEADER, RUN, plan_replay

from .conftest import wait_for
from .test_serve import MIB, Server, finish
from .test_serve import client as fc_client

pytestmark = pytest.mark.needs_uffd
PAGE = u.PAGE_SIZE
MADV_DONTNEED = 4
libc = ctypes.CDLL(None, use_errno=True)
libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]


def resident_pages(address: int, length: int) -> list[int]:
    vec = ctypes.create_string_buffer(length // PAGE)
    assert libc.mincore(address, length, vec) == 0
    return [k for k, b in enumerate(vec.raw) if b & 1]


def order_bytes(pages: list[int]) -> bytes:
    return array.array("I", pages).tobytes()


def first_touches(order: list[int]) -> list[int]:
    return list(dict.fromkeys(order))


# ---- recording in the page server ----


@pytest.mark.parametrize("mode", ["thread", "sigbus"])
def test_recording_keeps_every_distinct_page_touched_in_first_touch_order(mode: str) -> None:
    rng = random.Random(7)
    order = rng.choices(range(512), k=400) + list(range(100, 140))  # repeats, and a stream
    with u.PageServer(mode) as server:  # type: ignore[arg-type]
        region = server.map(512 * PAGE, u.Fill(b"ws"), record=True)
        _core.touch_pages(region.address, PAGE, order_bytes(order))
        ws = region.working_set()
        assert [offset // PAGE for offset, _ in ws.pages()] == first_touches(order)
        assert len(ws) == len(set(order)) and ws.nbytes == len(ws) * PAGE
        assert ws.page_size == PAGE and ws.memory_size == 512 * PAGE
        times = [ns for _, ns in ws.pages()]
        assert times == sorted(times)  # one faulting thread: times follow the order
        assert sum(length for _, length in ws) == ws.nbytes
        # the recording has ended: later touches are not in it, and the set is kept
        _core.touch(region.address, 512 * PAGE, PAGE, False)
        assert region.working_set() is ws


def test_a_sequential_walk_is_recorded_as_one_run() -> None:
    with u.PageServer() as server:
        region = server.map(64 * PAGE, u.Fill(1), record=True)
        _core.touch(region.address + 8 * PAGE, 16 * PAGE, PAGE, False)
        assert list(region.working_set()) == [(8 * PAGE, 16 * PAGE)]


def test_recording_ends_when_the_region_closes_and_the_set_stays() -> None:
    with u.PageServer() as server:
        region = server.map(32 * PAGE, u.Fill(1), record=True)
        _core.touch_pages(region.address, PAGE, order_bytes([3, 1, 2]))
        region.close()
        assert [o // PAGE for o, _ in region.working_set().pages()] == [3, 1, 2]


def test_recording_needs_readahead_off_and_only_recorded_regions_have_a_set() -> None:
    with u.PageServer() as server:
        with pytest.raises(ValueError, match="readahead 'adaptive' with record=True"):
            server.map(PAGE, u.Fill(1), record=True, readahead="adaptive")
        with pytest.raises(ValueError, match="not mapped with record=True"):
            server.map(PAGE).working_set()
        with pytest.raises(ValueError, match="replay_threads 0"):
            server.map(PAGE, replay=u.WorkingSet(PAGE, PAGE), replay_threads=0)


def test_a_python_source_region_is_recorded_too() -> None:
    order = [5, 9, 5, 0, 31, 9, 1]
    with u.PythonSourceServer(lambda off, n: bytes([off // PAGE]) * n) as server:
        region = server.map(32 * PAGE, record=True)
        _core.touch_pages(region.address, PAGE, order_bytes(order))
        assert region[9 * PAGE] == 9
        ws = region.working_set()
        assert [o // PAGE for o, _ in ws.pages()] == first_touches(order)
        other = server.map(4 * PAGE, record=True)
        _core.touch_pages(other.address, PAGE, order_bytes([2]))
        other.close()  # closing ends the recording; the set is kept
        assert list(other.working_set()) == [(2 * PAGE, PAGE)]
        with pytest.raises(ValueError, match="readahead 2 with record=True"):
            server.map(PAGE, record=True, readahead=2)


# ---- the file ----


def sample_set() -> u.WorkingSet:
    touches = [(p * PAGE, 1000 * k) for k, p in enumerate([7, 8, 9, 2, 3, 40, 41, 0])]
    return u.WorkingSet.from_touches(touches, PAGE, 64 * PAGE)


def test_a_saved_set_loads_back_equal_with_its_runs_and_times(tmp_path: Path) -> None:
    ws = sample_set()
    assert list(ws) == [(7 * PAGE, 3 * PAGE), (2 * PAGE, 2 * PAGE), (40 * PAGE, 2 * PAGE),
                        (0, PAGE)]  # fmt: skip
    assert [ns for _, _, ns in ws.runs] == [0, 3000, 5000, 7000]
    path = tmp_path / "a.ws"
    ws.save(path)
    assert path.stat().st_size == HEADER.size + 4 * RUN.size  # compact: 28 bytes a run
    loaded = u.WorkingSet.load(path, page_size=PAGE)
    assert loaded == ws and len(loaded) == 8 and loaded.duration_ns == 7000
    assert not list(tmp_path.glob(".*tmp"))  # written aside, then renamed


def test_bad_files_raise_one_clear_error_naming_the_file(tmp_path: Path) -> None:
    good = sample_set().to_bytes()
    version = struct.pack("<I", 99)
    cases = {
        "truncated: 20 bytes": good[:20],
        "truncated: 100 bytes, 4 runs need": good[:100],
        "bad magic": b"GIF89a" + good[6:],
        "version 99 is not supported": good[:8] + version + good[12:],
        "checksum of the runs does not match": good[:-1] + bytes([good[-1] ^ 1]),
        "bytes after the last run": good + b"\0",
        "recorded with 8192-byte pages": good[:12] + struct.pack("<I", 8192) + good[16:],
        "page size 3000 is not a power of two": good[:12] + struct.pack("<I", 3000) + good[16:],
    }
    for problem, data in cases.items():
        path = tmp_path / "bad.ws"
        path.write_bytes(data)
        with pytest.raises(u.WorkingSetError, match=problem) as info:
            u.WorkingSet.load(path, page_size=PAGE)
        assert str(path) in str(info.value)
        assert isinstance(info.value, ValueError)
    # a run outside the memory, with a checksum that matches: corrupt all the same
    body = RUN.pack(60, 8, 0, 0)
    header = HEADER.pack(b"UFFDWSET", 1, PAGE, 64 * PAGE, 8, 1, 0, zlib.crc32(body), 0)
    (tmp_path / "outside.ws").write_bytes(header + body)
    with pytest.raises(u.WorkingSetError, match="outside the memory"):
        u.WorkingSet.load(tmp_path / "outside.ws")


def test_merge_keeps_pages_seen_often_enough_ordered_by_mean_time() -> None:
    a = u.WorkingSet.from_touches([(1 * PAGE, 0), (2 * PAGE, 10), (3 * PAGE, 20)], PAGE, 8 * PAGE)
    b = u.WorkingSet.from_touches([(3 * PAGE, 0), (2 * PAGE, 30), (5 * PAGE, 40)], PAGE, 16 * PAGE)
    c = u.WorkingSet.from_touches([(3 * PAGE, 1), (6 * PAGE, 2)], PAGE, 8 * PAGE)
    merged = u.WorkingSet.merge([a, b, c])
    # means: 1 -> 0, 2 -> 20, 3 -> 7, 5 -> 40, 6 -> 2
    assert [o // PAGE for o, _ in merged.pages()] == [1, 6, 3, 2, 5]
    assert merged.memory_size == 16 * PAGE
    assert [o // PAGE for o, _ in u.WorkingSet.merge([a, b, c], min_count=2).pages()] == [3, 2]
    assert [o // PAGE for o, _ in u.WorkingSet.merge([a, b, c], min_count=3).pages()] == [3]
    with pytest.raises(ValueError, match="min_count 4 is not in 1..3"):
        u.WorkingSet.merge([a, b, c], min_count=4)
    with pytest.raises(ValueError, match="4096-byte and 8192-byte"):
        u.WorkingSet.merge([a, u.WorkingSet(8192, 8192)])


def test_plan_replay_keeps_the_order_and_counts_pages_beyond_the_memory() -> None:
    ws = u.WorkingSet(PAGE, 100 * PAGE, [(50, 4, 0), (0, 2, 1), (98, 2, 2)])
    runs, beyond = plan_replay(ws, [(7, 0, 10 * PAGE), (8, 40 * PAGE, 20 * PAGE)], 99 * PAGE)
    triples = list(struct.iter_unpack("=QQQ", runs))
    assert triples == [(8, 10 * PAGE, 4 * PAGE), (7, 0, 2 * PAGE)]
    assert beyond == 1


# ---- replay in the page server ----


@pytest.mark.parametrize("threads", [1, 3])
def test_replay_installs_the_set_in_the_background_and_the_walk_takes_no_fault(
    tmp_path: Path, threads: int
) -> None:
    content = os.urandom(1024 * PAGE)
    path = tmp_path / "memory"
    path.write_bytes(content)
    order = random.Random(2).sample(range(1024), 300)
    with u.PageServer() as server:
        recorded = server.map(1024 * PAGE, u.File(path), record=True)
        _core.touch_pages(recorded.address, PAGE, order_bytes(order))
        ws = recorded.working_set()
        region = server.map(1024 * PAGE, u.File(path), replay=ws, replay_threads=threads)
        wait_for(lambda: region.stats().prefetched == 300)
        assert sorted(resident_pages(region.address, len(region))) == sorted(order)
        _core.touch_pages(region.address, PAGE, order_bytes(order))
        stats = region.stats()
        assert stats.faults == 0 and stats.pages_installed == 300
        assert region[:] == content  # and every byte, the rest served on demand
        assert region.stats().prefetched == 300


def test_a_fault_during_replay_is_served_at_once() -> None:
    """Demand faults do not wait behind the replay: one on the last page of a large set is
    served while the replay threads are still busy with the rest."""
    pages = 131072  # 512 MiB
    ws = u.WorkingSet(PAGE, pages * PAGE, [(0, pages, 0)])
    with u.PageServer() as server:
        region = server.map(pages * PAGE, u.Fill(b"prio"), replay=ws)
        _core.touch(region.address + (pages - 1) * PAGE, PAGE, PAGE, False)
        assert region.stats().prefetched < pages - 1  # served before the replay got there
        assert region.stats().faults == 1
        assert region[(pages - 1) * PAGE : (pages - 1) * PAGE + 4] == b"prio"


def test_replay_beyond_the_region_warns_once_and_installs_the_rest() -> None:
    ws = u.WorkingSet(PAGE, 64 * PAGE, [(2, 2, 0), (30, 10, 1)])
    with u.PageServer() as server:
        with pytest.warns(RuntimeWarning, match="8 page.*beyond the region's") as caught:
            region = server.map(32 * PAGE, u.Fill(3), replay=ws)
        assert len(caught) == 1
        wait_for(lambda: region.stats().prefetched == 4)
        assert resident_pages(region.address, len(region)) == [2, 3, 30, 31]


def test_replay_never_refills_a_range_removed_after_the_hand_off() -> None:
    pages = 16384  # 64 MiB; the removed quarter comes last in the set
    ws = u.WorkingSet(PAGE, pages * PAGE, [(0, pages, 0)])
    with u.PageServer(on_remove="refill") as server:
        region = server.map(pages * PAGE, u.Fill(b"r"), replay=ws, replay_threads=2)
        removed = 3 * pages // 4 * PAGE
        _core.madvise(region.address + removed, pages * PAGE - removed, MADV_DONTNEED)
        wait_for(lambda: server._engine.replays_running() == 0)
        present = resident_pages(region.address, len(region))
        assert not [p for p in present if p * PAGE >= removed]
        assert region.stats().removes == 1
        # a fault still serves a removed page from the source
        assert region[removed : removed + 1] == b"r"


def test_closing_the_server_during_a_replay_stops_it() -> None:
    pages = 65536  # 256 MiB of fill: the replay is still running at close
    ws = u.WorkingSet(PAGE, pages * PAGE, [(0, pages, 0)])
    server = u.PageServer()
    region = server.map(pages * PAGE, u.Fill(1), replay=ws, replay_threads=2)
    assert server._engine.replays_running() == 1
    start = time.monotonic()
    region.close()
    server.close()
    assert time.monotonic() - start < 10


# ---- `userfaultfd serve --record / --replay` ----


@pytest.fixture
def memory(tmp_path: Path) -> Path:
    path = tmp_path / "guest.mem"
    path.write_bytes(os.urandom(8 * MIB))
    return path


def record_with_serve(tmp_path: Path, memory: Path, order: list[int], offset: int) -> u.WorkingSet:
    """A Firecracker-like client touches `order` in a 4 MiB region at `offset` of the memory
    file; SIGUSR1 ends the recording; then it reads every byte (not recorded)."""
    (tmp_path / "order").write_bytes(order_bytes(order))
    recording = tmp_path / "rec.ws"
    s = Server(tmp_path, memory, "--record", str(recording))
    try:
        proc = fc_client(s, memory, f"{4 * MIB}@{offset}", "--touch", str(tmp_path / "order"))
        assert proc.stdout is not None and proc.stdin is not None
        assert proc.stdout.readline().strip() == "sent"
        assert proc.stdout.readline().strip() == "touched"
        s.proc.send_signal(signal.SIGUSR1)
        line = s.expect("recorded client 1")
        assert f"{len(set(order))} pages" in line and str(recording) in line
        proc.stdin.write("go\n")
        proc.stdin.flush()
        assert finish(proc).split() == ["verified", "OK"]
        s.expect("disconnect client 1")
    finally:
        assert s.stop() == 0
    return u.WorkingSet.load(recording, page_size=PAGE)


def test_serve_records_a_client_then_replays_the_set_for_the_next(
    tmp_path: Path, memory: Path
) -> None:
    order = random.Random(5).choices(range(1024), k=700)
    ws = record_with_serve(tmp_path, memory, order, MIB)
    # offsets are in the memory file: the region starts at 1 MiB of it
    assert [o for o, _ in ws.pages()] == [MIB + p * PAGE for p in first_touches(order)]
    assert ws.memory_size == 8 * MIB
    s = Server(tmp_path, memory, "--replay", str(tmp_path / "rec.ws"), "--replay-threads", "2")
    try:
        proc = fc_client(s, memory, f"{4 * MIB}@{MIB}", "--resident-pages", str(len(ws)))
        assert finish(proc).split() == ["sent", "resident", "verified", "OK"]  # byte-exact
        line = s.expect("disconnect client 1")
        prefetched = int(line.split("prefetched ")[1].split(",")[0])
        assert prefetched >= len(ws)
        assert "demand faults" in line and "errors 0" in line
    finally:
        assert s.stop() == 0


def test_serve_ends_a_recording_after_record_seconds_and_when_the_client_goes(
    tmp_path: Path, memory: Path
) -> None:
    recording = tmp_path / "timed.ws"
    s = Server(tmp_path, memory, "--record", str(recording), "--record-seconds", "0.3")
    try:
        proc = fc_client(s, memory, f"{2 * MIB}@0", "--hold", "1")
        assert "time is up" in s.expect("recorded client 1")
        assert len(u.WorkingSet.load(recording)) == 0  # it held still: nothing touched
        assert finish(proc).split()[-1] == "OK"
        s.expect("disconnect client 1")
    finally:
        assert s.stop() == 0
    s = Server(tmp_path, memory, "--record", str(recording))
    try:
        assert finish(fc_client(s, memory, f"{2 * MIB}@{2 * MIB}")).split()[-1] == "OK"
        assert "closed the connection" in s.expect("recorded client 1")
        ws = u.WorkingSet.load(recording)  # it read everything (memcpy: in its own order)
        assert sorted(o for o, _ in ws.pages()) == list(range(2 * MIB, 4 * MIB, PAGE))
    finally:
        assert s.stop() == 0


def test_serve_replay_with_prefetch_all_streams_the_rest_after_the_set(
    tmp_path: Path, memory: Path
) -> None:
    ws = u.WorkingSet(PAGE, 8 * MIB, [(300, 20, 0), (10, 5, 1)])
    ws.save(tmp_path / "set.ws")
    s = Server(tmp_path, memory, "--replay", str(tmp_path / "set.ws"), "--prefetch", "all")
    try:
        proc = fc_client(s, memory, f"{4 * MIB}@0", "--resident-then-touch")
        assert finish(proc).split() == ["sent", "resident", "verified", "OK"]
        line = s.expect("disconnect client 1")
        assert int(line.split("prefetched ")[1].split(",")[0]) >= 1024 - 30
    finally:
        assert s.stop() == 0


def test_serve_replay_stops_when_the_client_exits(tmp_path: Path) -> None:
    big = tmp_path / "big.mem"
    with big.open("wb") as f:
        f.truncate(256 * MIB)
    u.WorkingSet(PAGE, 256 * MIB, [(0, 65536, 0)]).save(tmp_path / "all.ws")
    s = Server(tmp_path, big, "--replay", str(tmp_path / "all.ws"))
    try:
        victim = fc_client(s, big, f"{256 * MIB}@0", "--hold", "60")
        assert victim.stdout is not None
        assert victim.stdout.readline().strip() == "sent"
        s.expect("connect client 1")
        victim.kill()
        victim.wait(10)
        line = s.expect("disconnect client 1")
        assert "closed the connection" in line or "exited" in line
        assert finish(fc_client(s, big, f"{MIB}@{MIB}")).split()[-1] == "OK"
    finally:
        assert s.stop() == 0


def test_serve_warns_once_about_set_pages_beyond_the_memory_file(
    tmp_path: Path, memory: Path
) -> None:
    big = u.WorkingSet(PAGE, 16 * MIB, [(0, 4, 0), (8 * MIB // PAGE - 2, 6, 1)])
    big.save(tmp_path / "big.ws")
    s = Server(tmp_path, memory, "--replay", str(tmp_path / "big.ws"))
    try:
        assert "4 page(s) of the working set lie beyond" in "\n".join(s.log)
        proc = fc_client(s, memory, f"{8 * MIB}@0", "--resident-pages", "6")
        assert finish(proc).split() == ["sent", "resident", "verified", "OK"]
        line = s.expect("disconnect client 1")
        assert int(line.split("prefetched ")[1].split(",")[0]) == 6
    finally:
        assert s.stop() == 0


def test_serve_refuses_a_bad_replay_file_naming_it(tmp_path: Path, memory: Path) -> None:
    bad = tmp_path / "bad.ws"
    bad.write_bytes(b"UFFDWSET")
    proc = subprocess.run(
        [sys.executable, "-m", "userfaultfd", "serve", "--socket", str(tmp_path / "s"),
         "--memory", str(memory), "--replay", str(bad)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 1
    assert f"working-set file {str(bad)!r}: truncated" in proc.stderr
    proc = subprocess.run(
        [sys.executable, "-m", "userfaultfd", "serve", "--socket", str(tmp_path / "s"),
         "--memory", str(memory), "--record-seconds", "1"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 1 and "--record-seconds needs --record" in proc.stderr


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["--replay-threads", "3"], "--replay-threads needs --replay PATH"),
        (["--record", "/missing/dir/ws"], "/missing/dir is not a writable directory"),
        (["--record", "."], "is a directory"),
    ],
)
def test_serve_refuses_record_and_replay_options_it_could_not_honour(
    tmp_path: Path, args: list[str], said: str
) -> None:
    """Before the fix a --record path in a missing folder was found out only when the restore
    was over (the recording lost), and --replay-threads without --replay was ignored."""
    memory = tmp_path / "mem"
    memory.write_bytes(bytes(PAGE))
    proc = subprocess.run(
        [sys.executable, "-m", "userfaultfd", "serve", "--socket", str(tmp_path / "s"),
         "--memory", str(memory), *args],
        capture_output=True, text=True, timeout=10,
    )  # fmt: skip
    assert proc.returncode == 1 and said in proc.stderr, proc.stderr


def test_saving_where_it_cannot_names_the_path_given(tmp_path: Path) -> None:
    """Before the fix the error named the file written aside (for a directory, one in its
    parent: '/.tmp.PID.tmp' for '/tmp')."""
    ws = sample_set()
    with pytest.raises(IsADirectoryError, match=f"working-set file {str(tmp_path)!r}"):
        ws.save(tmp_path)
    missing = tmp_path / "missing" / "a.ws"
    with pytest.raises(FileNotFoundError, match=f"working-set file {str(missing)!r}"):
        ws.save(missing)
    assert os.listdir(tmp_path) == []


def test_merging_paths_instead_of_sets_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="'a.ws' is not a WorkingSet"):
        u.WorkingSet.merge(["a.ws"])  # type: ignore[list-item]


# ---- `userfaultfd ws` ----


def test_ws_show_prints_the_summary_and_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sample_set().save(tmp_path / "a.ws")
    assert cli.main(["ws", "show", str(tmp_path / "a.ws"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["version"] == 1 and report["page_size"] == PAGE
    assert report["memory_size"] == 64 * PAGE and report["pages"] == 8
    assert report["bytes"] == 8 * PAGE and report["runs"] == 4
    assert report["duration_s"] == pytest.approx(7e-6)
    assert cli.main(["ws", "show", str(tmp_path / "a.ws")]) == 0
    assert "pages     8 x 4,096 bytes = 32,768 bytes (12.5% of 262,144" in capsys.readouterr().out
    (tmp_path / "bad.ws").write_bytes(b"nonsense")
    assert cli.main(["ws", "show", str(tmp_path / "bad.ws")]) == 1
    err = capsys.readouterr().err
    assert "bad.ws" in err and "not a working-set file" in err


def test_ws_merge_writes_the_merged_set(tmp_path: Path) -> None:
    a = u.WorkingSet.from_touches([(0, 0), (PAGE, 5)], PAGE, 4 * PAGE)
    b = u.WorkingSet.from_touches([(PAGE, 1), (3 * PAGE, 2)], PAGE, 4 * PAGE)
    a.save(tmp_path / "a.ws")
    b.save(tmp_path / "b.ws")
    out = tmp_path / "m.ws"
    args = ["ws", "merge", str(tmp_path / "a.ws"), str(tmp_path / "b.ws"), "-o", str(out)]
    assert cli.main([*args, "--min-count", "2"]) == 0
    assert list(u.WorkingSet.load(out)) == [(PAGE, PAGE)]
    assert cli.main(args) == 0
    assert [o // PAGE for o, _ in u.WorkingSet.load(out).pages()] == [0, 3, 1]
    assert cli.main([*args, "--min-count", "3"]) == 1


def test_ws_plot_writes_a_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    sample_set().save(tmp_path / "a.ws")
    out = tmp_path / "a.png"
    assert cli.main(["ws", "plot", str(tmp_path / "a.ws"), "-o", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000


def test_ws_plot_without_matplotlib_names_the_extra(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    sample_set().save(tmp_path / "a.ws")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    assert cli.main(["ws", "plot", str(tmp_path / "a.ws"), "-o", str(tmp_path / "a.png")]) == 1
    assert "pip install 'userfaultfd[plot]'" in capsys.readouterr().err


def replay_threads(pid: str = "self") -> list[int]:
    tids = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError):  # a thread that just ended
            if (task / "comm").read_text().strip() == "uffd-replay":
                tids.append(int(task.name))
    return tids


@pytest.mark.parametrize("right", [True, False])
def test_replay_runs_niced_and_idles_once_faults_miss_the_set(right: bool) -> None:
    """Below the workers either way; a replay whose set the faults keep missing runs only on
    otherwise idle CPUs (SCHED_IDLE), where it cannot delay them."""
    pages = 262144  # 1 GiB of fill: the replay is still running when we look
    ws = u.WorkingSet(PAGE, pages * PAGE, [(0, pages // 2, 0)])
    with u.PageServer() as server:
        region = server.map(pages * PAGE, u.Fill(1), replay=ws)
        base = pages // 2 if not right else pages // 4
        order = random.Random(1).sample(range(base, base + pages // 4), 64)
        _core.touch_pages(region.address, PAGE, order_bytes(order))
        if right:  # let the replay pass the pages touched: they were hits, not misses
            _core.touch(region.address + (pages // 2 - 1) * PAGE, PAGE, PAGE, False)
        want = os.SCHED_OTHER if right else os.SCHED_IDLE

        def settled() -> bool:  # a thread looks at the faults before each piece it takes
            tids = replay_threads()
            with contextlib.suppress(ProcessLookupError):
                return not tids or {os.sched_getscheduler(t) for t in tids} == {want}
            return False

        wait_for(settled)
        tids = replay_threads()
        if not tids:
            pytest.skip("the replay finished before it could be looked at")
        with contextlib.suppress(ProcessLookupError):  # it may end meanwhile
            assert os.getpriority(os.PRIO_PROCESS, tids[0]) == 10


def test_serve_streams_the_rest_only_with_idle_cpu_time(tmp_path: Path) -> None:
    """--prefetch all without a set: speculative, SCHED_IDLE from the start."""
    big = tmp_path / "big.mem"
    with big.open("wb") as f:
        f.truncate(1 << 30)  # sparse: the stream of it lasts while we look
    s = Server(tmp_path, big, "--prefetch", "all")
    try:
        client = fc_client(s, big, f"{1 << 30}@0", "--hold", "60")
        assert client.stdout is not None and client.stdout.readline().strip() == "sent"
        line = s.expect("connect client 1")  # said by the serving process, which replays
        serving = line.split("[serving ")[1].split("]")[0]
        deadline = time.monotonic() + 10  # the stream starts just after the connect line
        while not (tids := replay_threads(serving)) and time.monotonic() < deadline:
            time.sleep(0.01)
        with contextlib.suppress(ProcessLookupError):  # a stream that has just ended
            assert tids and {os.sched_getscheduler(t) for t in tids} == {os.SCHED_IDLE}
        client.kill()
        client.wait(10)
        s.expect("disconnect client 1")
    finally:
        assert s.stop() == 0


def test_a_speculative_replay_waits_for_the_predicted_one() -> None:
    """What `serve --prefetch all` streams beside a working set comes after the set: its pieces
    start only once no predicted replay is running."""
    pages = 196608  # 768 MiB of fill: the set's half takes a while
    with u.PageServer() as server:
        region = server.map(pages * PAGE, u.Fill(1))
        half = pages // 2 * PAGE
        server._engine.replay(struct.pack("=QQQ", region.id, 0, half), threads=1)
        rest = struct.pack("=QQQ", region.id, half, pages * PAGE - half)
        server._engine.replay(rest, threads=1, speculative=True)
        seen_early, deadline = False, time.monotonic() + 10
        while True:
            assert time.monotonic() < deadline, "the set's replay did not finish"
            rest_present = len(resident_pages(region.address + half, pages * PAGE - half))
            set_present = len(resident_pages(region.address, half))
            if set_present == half // PAGE:
                break
            seen_early = True
            assert rest_present == 0  # the set was not finished before this look, nor at it
        wait_for(lambda: region.stats().prefetched == pages)
        if not seen_early:
            pytest.skip("the set's replay finished before it could be looked at")
