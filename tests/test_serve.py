"""`userfaultfd serve` against clients that behave as Firecracker does, and every bad input."""

from __future__ import annotations

import contextlib
import ctypes
import json
import mmap
import os
import queue
import random
import resource
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import userfaultfd as u
from userfaultfd import _core
from userfaultfd.commands.serve import _listen
from userfaultfd.handoff import (
    GuestRegion,
    HandoffError,
    _complete,
    parse_regions,
    receive_uffd,
    send_uffd,
)

from .conftest import Toucher, loop_device, spawn

pytestmark = pytest.mark.needs_uffd
CLIENT = str(Path(__file__).with_name("fc_client.py"))
PAGE = u.PAGE_SIZE
MIB = 1 << 20


class Server:
    """`userfaultfd serve` in a subprocess; its log lines arrive in a queue."""

    def __init__(self, tmp: Path, memory: Path, *extra: str, max_fds: int = 0) -> None:
        self.socket = tmp / "uffd.sock"

        def limit() -> None:
            if max_fds:
                resource.setrlimit(resource.RLIMIT_NOFILE, (max_fds, max_fds))

        self.proc = subprocess.Popen(
            [sys.executable, "-m", "userfaultfd", "serve", "--socket", str(self.socket),
             "--memory", str(memory), *extra],
            stderr=subprocess.PIPE, text=True, preexec_fn=limit,
        )  # fmt: skip
        self.lines: queue.Queue[str] = queue.Queue()
        self.log: list[str] = []
        threading.Thread(target=self._pump, daemon=True).start()
        self.expect("listening on")

    def _pump(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.put(line.rstrip("\n"))

    def expect(self, text: str, timeout: float = 30) -> str:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            assert left > 0, f"no log line with {text!r}; log so far: {self.log}"
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                continue
            self.log.append(line)
            if text in line:
                return line

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(30)


@pytest.fixture
def memory(tmp_path: Path) -> Path:
    path = tmp_path / "guest.mem"
    path.write_bytes(os.urandom(8 * MIB))
    return path


@pytest.fixture
def server(tmp_path: Path, memory: Path) -> Iterator[Server]:
    s = Server(tmp_path, memory)
    yield s
    if s.proc.poll() is None:
        assert s.stop() == 0
    assert not s.socket.exists()


def client(server: Server, memory: Path, layout: str, *extra: str) -> subprocess.Popen[str]:
    return spawn([sys.executable, CLIENT, str(server.socket), str(memory), layout, *extra])


def finish(proc: subprocess.Popen[str]) -> str:
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    return out


def test_one_client_two_regions(server: Server, memory: Path) -> None:
    proc = client(server, memory, f"{4 * MIB}@0,{2 * MIB}@{5 * MIB}")
    assert finish(proc).split() == ["sent", "verified", "OK"]
    connect = server.expect("connect client 1")
    assert "2 region(s), 6 MiB" in connect and f"pid {proc.pid}" in connect
    line = server.expect("disconnect client 1")
    assert "closed the connection" in line and "errors 0" in line and "removes 1" in line
    assert int(line.split("bytes ")[1].split(",")[0]) >= 6 * MIB - 2 * MIB  # half was removed


@pytest.mark.skipif(os.geteuid() != 0, reason="reserving huge pages needs root")
def test_hugetlb_client_with_2mib_pages(server: Server, memory: Path) -> None:
    from .test_server import _reserve_huge_pages

    for _ in _reserve_huge_pages(8):
        proc = client(server, memory, f"{4 * MIB}@{2 * MIB}", "--huge")
        assert finish(proc).split() == ["sent", "verified", "OK"]
        line = server.expect("disconnect client 1")
        assert "faults 2," in line and "errors 0" in line and "removes 1" in line


def test_memory_on_a_block_device(tmp_path: Path, memory: Path) -> None:
    with loop_device(memory) as device:
        s = Server(tmp_path, Path(device))
        try:
            assert finish(client(s, Path(device), f"{2 * MIB}@{MIB}")).split()[-1] == "OK"
        finally:
            assert s.stop() == 0


def test_socket_is_private(server: Server) -> None:
    assert stat.S_IMODE(os.stat(server.socket).st_mode) == 0o600


def test_several_clients_at_once(server: Server, memory: Path) -> None:
    procs = [client(server, memory, f"{2 * MIB}@{k * MIB}") for k in range(4)]
    for p in procs:
        assert finish(p).split()[-1] == "OK"
    for _ in procs:
        server.expect("disconnect client")


def test_a_killed_client_is_dropped_and_the_others_served(server: Server, memory: Path) -> None:
    victim = client(server, memory, f"{2 * MIB}@0", "--hold", "60")
    assert victim.stdout is not None
    assert victim.stdout.readline().strip() == "sent"
    assert victim.stdout.readline().strip() == "holding"
    victim.kill()
    victim.wait(10)
    line = server.expect("disconnect client 1")
    assert "closed the connection" in line or "exited" in line
    assert finish(client(server, memory, f"{MIB}@0")).split()[-1] == "OK"


def test_prefetch_all_installs_pages_without_faults(tmp_path: Path, memory: Path) -> None:
    s = Server(tmp_path, memory, "--prefetch", "all")
    try:
        out = finish(client(s, memory, f"{4 * MIB}@{MIB}", "--resident-then-touch"))
        assert out.split() == ["sent", "resident", "verified", "OK"]
        line = s.expect("disconnect client 1")
        assert "faults" in line
    finally:
        assert s.stop() == 0


def test_a_client_killed_during_prefetch_is_dropped(tmp_path: Path) -> None:
    big = tmp_path / "big.mem"
    with big.open("wb") as f:
        f.truncate(256 * MIB)  # sparse: the prefetch of it takes a while, not the test setup
    s = Server(tmp_path, big, "--prefetch", "all")
    try:
        victim = client(s, big, f"{256 * MIB}@0", "--hold", "60")
        assert victim.stdout is not None
        assert victim.stdout.readline().strip() == "sent"
        s.expect("connect client 1")  # the prefetch has started
        victim.kill()
        victim.wait(10)
        line = s.expect("disconnect client 1")
        assert "closed the connection" in line or "exited" in line
        assert finish(client(s, big, f"{MIB}@{MIB}")).split()[-1] == "OK"
    finally:
        assert s.stop() == 0


def raw_client(server: Server, payload: bytes, fds: list[int]) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(server.socket))
    socket.send_fds(sock, [payload], fds)
    return sock


def test_a_hand_off_sent_slowly_in_pieces_is_accepted_and_served(
    server: Server, memory: Path
) -> None:
    """The server reads a hand-off as it arrives instead of waiting on one client: a second
    client meanwhile is served, and the slow one, complete after 1.5 s, is accepted."""
    region = _core.Mapping(2 * MIB, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    with u.Userfaultfd(u.Feature.EVENT_REMOVE) as uffd:
        uffd.register(region.address, 2 * MIB)
        payload = json.dumps([GuestRegion(region.address, 2 * MIB, 0, PAGE).to_json()]).encode()
        sock = raw_client(server, payload[:10], [uffd.fileno()])
        other = client(server, memory, f"{MIB}@0")
        assert finish(other).split()[-1] == "OK"
        time.sleep(1.5)
        sock.sendall(payload[10:])
        server.expect("connect client 1")
        assert bytes(region) == memory.read_bytes()[: 2 * MIB]  # served by the server
        sock.close()
        server.expect("disconnect client 1")
    region.close()


def test_a_client_that_unmaps_part_of_its_memory_is_still_served(
    server: Server, memory: Path
) -> None:
    """Firecracker asks for no UNMAP event: the server still believes in the hole, and readahead
    over it fails with ENOENT. Before the fix the faulter next to the hole never returned."""
    region = _core.Mapping(2 * MIB, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    data = memory.read_bytes()[: 2 * MIB]
    with u.Userfaultfd(u.Feature.EVENT_REMOVE) as uffd:
        uffd.register(region.address, 2 * MIB)
        payload = json.dumps([GuestRegion(region.address, 2 * MIB, 0, PAGE).to_json()]).encode()
        sock = raw_client(server, payload, [uffd.fileno()])
        server.expect("connect client 1")
        hole = region.address + MIB + 8 * PAGE
        _core.munmap(hole, 8 * PAGE)  # inside the adaptive readahead of the page at 1 MiB
        spans = ((MIB, MIB + 8 * PAGE), (MIB - 16 * PAGE, MIB), (MIB + 16 * PAGE, 2 * MIB))
        for start, end in spans:
            toucher = Toucher(region.address + start, end - start)
            assert toucher.finish() == sum(data[start:end:PAGE])
            assert ctypes.string_at(region.address + start, end - start) == data[start:end]
        sock.close()
        line = server.expect("disconnect client 1")
        assert "errors 0" in line
    region.close()  # the hole in it is fine for munmap


def test_a_client_that_forks_leaks_no_fd_in_the_server(server: Server, memory: Path) -> None:
    """With EVENT_FORK the kernel installs a uffd for each child in the server's fd table.
    Before the fix the engine counted the event as unknown and kept the fd open."""
    region = _core.Mapping(MIB, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    fds = Path(f"/proc/{server.proc.pid}/fd")
    with u.Userfaultfd(u.Feature.EVENT_FORK) as uffd:
        uffd.register(region.address, MIB)
        payload = json.dumps([GuestRegion(region.address, MIB, 0, PAGE).to_json()]).encode()
        sock = raw_client(server, payload, [uffd.fileno()])
        server.expect("connect client 1")
        before = len(list(fds.iterdir()))
        for _ in range(5):
            pid = os.fork()  # returns once the server has read the FORK event
            if pid == 0:
                os._exit(0)
            assert os.waitpid(pid, 0)[1] == 0
        assert len(list(fds.iterdir())) == before
        assert Toucher(region.address, MIB).finish() == sum(memory.read_bytes()[:MIB:PAGE])
        sock.close()
        line = server.expect("disconnect client 1")
        assert "errors 0" in line and "forks 5" in line
    region.close()


@pytest.mark.kernel_faults
def test_a_page_poisoned_for_a_client_is_logged_as_it_happens(tmp_path: Path) -> None:
    """The client's thread dies of the SIGBUS and cannot say why: the server's log says it."""
    path = tmp_path / "shrinks.mem"
    path.write_bytes(os.urandom(2 * MIB))
    s = Server(tmp_path, path)
    region = _core.Mapping(2 * MIB, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        with u.Userfaultfd(u.Feature.EVENT_REMOVE) as uffd:
            uffd.register(region.address, 2 * MIB)
            payload = json.dumps([GuestRegion(region.address, 2 * MIB, 0, PAGE).to_json()])
            sock = raw_client(s, payload.encode(), [uffd.fileno()])
            s.expect("connect client 1")
            os.truncate(path, MIB)
            r, w = os.pipe()
            with pytest.raises(OSError):  # a kernel access: EFAULT from the poison
                os.write(w, memoryview(region)[MIB + PAGE : MIB + 2 * PAGE])
            os.close(r), os.close(w)
            line = s.expect("poisoned the page", timeout=10)  # before the client goes
            assert f"at {region.address + MIB + PAGE:#x} (memory file offset 0x101000)" in line
            assert "client 1" in line and "Bad address" in line
            sock.close()
            s.expect("disconnect client 1")
    finally:
        assert s.stop() == 0
        region.close()


def regions_json(*items: dict[str, object]) -> bytes:
    return json.dumps(list(items)).encode()


def region(base: int, size: int = 2 * PAGE, offset: int = 0, page: int = PAGE) -> dict[str, object]:
    return {"base_host_virt_addr": base, "size": size, "offset": offset, "page_size": page,
            "page_size_kib": page}  # fmt: skip


BASE = 0x7F0000000000
BAD = [
    ("malformed", b"[{not json", "not JSON"),
    ("oversized", b"[" + b" " * 70000 + b"]", "over 65536 bytes"),
    ("empty list", b"[]", "non-empty JSON array"),
    ("not objects", b"[1, 2]", "region 0 is not an object"),
    ("missing field", json.dumps([{"base_host_virt_addr": BASE}]).encode(), "lacks size"),
    ("negative", regions_json(region(BASE, size=-PAGE)), "size -4096 is not a non-negative"),
    ("string", regions_json({**region(BASE), "offset": "0"}), "offset '0' is not"),
    ("overlap", regions_json(region(BASE, 4 * PAGE), region(BASE + PAGE)), "overlap"),
    ("outside file", regions_json(region(BASE, offset=8 * MIB)), "outside the memory file"),
    ("unaligned base", regions_json(region(BASE + 100)), "not aligned"),
    ("page not 4K multiple", regions_json(region(BASE, page=3000)), "page_size 3000"),
    (
        "page not power of two",
        regions_json(region(BASE, 3 * PAGE, page=3 * PAGE)),
        "page_size 12288",
    ),
    ("deep nesting", b"[" * 30000 + b"]" * 30000, "nests deeper than 8 levels"),
    ("huge number", b"[" + b"7" * 5000 + b"]", "a number of 5000 digits"),
    ("huge field", regions_json({**region(BASE), "size": 10**30}), "a number of 31 digits"),
]


@pytest.mark.parametrize(("name", "payload", "reason"), BAD, ids=[b[0] for b in BAD])
def test_bad_payloads_are_refused_and_the_server_keeps_serving(
    server: Server, memory: Path, name: str, payload: bytes, reason: str
) -> None:
    with u.Userfaultfd() as uffd:
        sock = raw_client(server, payload, [uffd.fileno()])
        line = server.expect("refused")
        assert reason in line, line
        sock.settimeout(10)
        # the server closed this connection (a reset: our unread bytes were still queued)
        with contextlib.suppress(ConnectionResetError):
            assert sock.recv(1) == b""
        sock.close()
    assert finish(client(server, memory, f"{MIB}@0")).split()[-1] == "OK"


def _adversarial_payload(rng: random.Random) -> bytes:
    valid = region(BASE + rng.randrange(1 << 20) * PAGE, rng.randrange(1, 64) * PAGE)
    odd_values: list[object] = [
        "0",
        1.5,
        -0.0,
        1e308,
        True,
        None,
        [],
        {},
        [1],
        {"a": 1},
        -1,
        2**64,
        2**70,
        "\u00e9",
    ]
    kind = rng.randrange(9)
    if kind == 0:
        return os.urandom(rng.randrange(1, 3000))
    if kind == 1:
        n = rng.randrange(9, 40000)
        return b"[" * n + (b"]" * n if rng.random() < 0.5 else b"")
    if kind == 2:
        return b"[" + b"9" * rng.randrange(21, 20000) + b"]"
    if kind == 3:  # one field of the wrong type
        field = rng.choice(["base_host_virt_addr", "size", "offset", "page_size", "page_size_kib"])
        return regions_json({**valid, field: rng.choice(odd_values)})
    if kind == 4:  # the wrong shape
        return json.dumps(rng.choice([valid, [valid] * 3, [[valid]], {"regions": [valid]}, 7,
                                      "x", None, [None], [{"": valid}]])).encode()  # fmt: skip
    if kind == 5:
        return b"[" + b" " * rng.randrange(60000, 70000) + b"]"
    if kind == 6:
        return regions_json(*[region(BASE + k * MIB) for k in range(rng.randrange(1, 700))])
    if kind == 7:  # invalid UTF-8 inside a string
        return b'[{"base_host_virt_addr": "\xff\xfe' + os.urandom(8) + b'"}]'
    return regions_json(valid)


def _ready_uffd() -> int:
    with u.Userfaultfd() as uffd:
        return os.dup(uffd.fileno())


def _adversarial_fds(rng: random.Random, keep: list[int]) -> list[int]:
    def fresh(fd: int) -> int:
        keep.append(fd)
        return fd

    uffd = fresh(_core.create(os.O_CLOEXEC))  # UFFDIO_API never done on it
    choices: list[list[int]] = [
        [],
        [uffd],
        [uffd, uffd],
        [uffd] * 20,  # more than the 16 the server reads: truncated by the kernel
        [fresh(os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC))],
        [fresh(os.eventfd(0, os.EFD_CLOEXEC))],
        [fresh(os.memfd_create("fuzz", os.MFD_CLOEXEC))],
        [fresh(_ready_uffd())],  # the server serves it: no region of it is registered
    ]
    return rng.choice(choices)


def _fuzz_once(server: Server, rng: random.Random, keep: list[int]) -> socket.socket | None:
    """One adversarial client; returns its socket if it stays connected (a pending client)."""
    payload = _adversarial_payload(rng)
    fds = _adversarial_fds(rng, keep)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(server.socket))
    sock.settimeout(2)
    how = rng.randrange(5)
    try:
        if how == 0:  # the whole message
            socket.send_fds(sock, [payload], fds)
        elif how == 1:  # in pieces
            cut = rng.randrange(len(payload) + 1)
            socket.send_fds(sock, [payload[:cut]], fds)
            time.sleep(rng.random() * 0.01)
            sock.sendall(payload[cut:])
        elif how == 2:  # dies mid-message, with a reset
            socket.send_fds(sock, [payload[: rng.randrange(len(payload) + 1)]], fds)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()
            return None
        elif how == 3:  # dies mid-message, stays connected a while
            socket.send_fds(sock, [payload[: rng.randrange(len(payload) + 1)]], fds)
            return sock
        else:  # the fds alone, or nothing at all
            if fds:
                socket.send_fds(sock, [b" "], fds)
    except OSError:  # the server refused and closed early: expected
        pass
    if rng.random() < 0.5:
        sock.close()
        return None
    return sock


def test_fuzzed_hand_offs_leave_the_server_serving(server: Server, memory: Path) -> None:
    """Random and adversarial hand-offs for a few seconds; then a well-behaved client is still
    served byte-exactly, and nothing the fuzz sent was an error the server did not foresee."""
    seed = int(os.environ.get("FUZZ_SEED", time.time_ns() % 1_000_000))
    rng = random.Random(seed)
    open_socks: list[socket.socket] = []
    keep: list[int] = []
    deadline = time.monotonic() + float(os.environ.get("FUZZ_SECONDS", "4"))
    sent = 0
    try:
        while time.monotonic() < deadline:
            assert server.proc.poll() is None, f"the server died (FUZZ_SEED={seed})"
            sock = _fuzz_once(server, rng, keep)
            sent += 1
            if sock is not None:
                open_socks.append(sock)
            if len(open_socks) > 20:
                open_socks.pop(rng.randrange(len(open_socks))).close()
            for fd in keep:
                os.close(fd)
            keep.clear()
    finally:
        for sock in open_socks:
            sock.close()
    assert sent > 20
    assert server.proc.poll() is None, f"the server died (FUZZ_SEED={seed})"
    assert finish(client(server, memory, f"{2 * MIB}@{MIB},{MIB}@0")).split() == [
        "sent",
        "verified",
        "OK",
    ], f"FUZZ_SEED={seed}"
    while not server.lines.empty():
        server.log.append(server.lines.get())
    unforeseen = [line for line in server.log if "unexpected error" in line]
    assert not unforeseen, f"FUZZ_SEED={seed}: {unforeseen[:3]}"


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_out_of_fds_the_server_pauses_accepting_instead_of_spinning(
    tmp_path: Path, memory: Path
) -> None:
    """Idle connections use up the server's fds: accept fails while the listener stays
    readable. The server says so once and retries now and then, not in a busy loop; once the
    connections go, it serves again."""
    s = Server(tmp_path, memory, max_fds=24)
    idle = []
    try:
        for _ in range(40):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(str(s.socket))  # the backlog takes it even when accept cannot
            idle.append(sock)
        s.expect("cannot accept connections")
        before = _cpu_seconds(s.proc.pid)
        time.sleep(1.5)
        assert _cpu_seconds(s.proc.pid) - before < 0.5  # a spinning loop takes ~1.5 s
        for sock in idle:
            sock.close()
        idle.clear()
        assert finish(client(s, memory, f"{MIB}@0")).split()[-1] == "OK"
        while not s.lines.empty():
            s.log.append(s.lines.get())
        assert sum("cannot accept" in line for line in s.log) == 1
    finally:
        for sock in idle:
            sock.close()
        assert s.stop() == 0


def test_bad_fds_are_refused(server: Server, memory: Path) -> None:
    payload = regions_json(region(BASE))
    sock = raw_client(server, payload, [])
    assert "carries 0 fds" in server.expect("refused")
    sock.close()
    r, w = os.pipe()
    sock = raw_client(server, payload, [r])
    assert "not a userfaultfd (it is pipe:" in server.expect("refused")
    sock.close()
    with u.Userfaultfd() as a, u.Userfaultfd() as b:
        sock = raw_client(server, payload, [a.fileno(), b.fileno()])
        assert "carries 2 fds" in server.expect("refused")
        sock.close()
    os.close(r), os.close(w)
    assert finish(client(server, memory, f"{MIB}@0")).split()[-1] == "OK"


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to connect as another user")
def test_peers_of_another_uid_are_refused(memory: Path) -> None:
    where = Path(tempfile.mkdtemp(prefix="uffd-serve-"))  # reachable by another user
    where.chmod(0o755)
    s = Server(where, memory)
    try:
        os.chmod(s.socket, 0o666)
        pid = os.fork()
        if pid == 0:
            try:
                os.setgid(65534)
                os.setuid(65534)
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.connect(str(s.socket))
                sock.recv(1)
            finally:
                os._exit(0)
        assert "uid 65534 is not allowed" in s.expect("refused")
        os.waitpid(pid, 0)
    finally:
        assert s.stop() == 0
        where.rmdir()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signals_stop_cleanly(tmp_path: Path, memory: Path, sig: int) -> None:
    s = Server(tmp_path, memory)
    assert s.socket.exists()
    s.proc.send_signal(sig)
    assert s.proc.wait(30) == 0
    assert not s.socket.exists()
    s.expect("stopped")


def test_cli_errors(tmp_path: Path, memory: Path) -> None:
    def serve(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "userfaultfd", "serve", *args],
                              capture_output=True, text=True, timeout=30)  # fmt: skip

    proc = serve("--socket", str(tmp_path / "s"), "--memory", str(tmp_path / "missing"))
    assert proc.returncode == 1 and f"{str(tmp_path / 'missing')!r} does not exist" in proc.stderr
    os.mkfifo(tmp_path / "fifo")  # refused, not waited on for a writer
    proc = serve("--socket", str(tmp_path / "s"), "--memory", str(tmp_path / "fifo"))
    assert proc.returncode == 1 and "is not a regular file or a block device" in proc.stderr
    proc = serve("--socket", "/missing/dir/s", "--memory", str(memory))
    assert proc.returncode == 1
    assert "cannot listen on /missing/dir/s: No such file or directory" in proc.stderr
    proc = serve("--socket", str(tmp_path / "s"), "--memory", str(memory), "--readahead", "lots")
    assert proc.returncode == 1 and "readahead 'lots'" in proc.stderr
    (tmp_path / "plain").write_text("x")
    proc = serve("--socket", str(tmp_path / "plain"), "--memory", str(memory))
    assert proc.returncode == 1 and "is not a socket" in proc.stderr


def test_listen_replaces_a_stale_socket_and_refuses_a_live_one(tmp_path: Path) -> None:
    path = str(tmp_path / "s")
    first = _listen(path)
    with pytest.raises(FileExistsError, match="another server"):
        _listen(path)
    first.close()  # the file stays behind: stale
    second = _listen(path)
    second.close()


def test_the_socket_appears_only_once_it_listens(tmp_path: Path) -> None:
    """Bound under another name and renamed into place after listen(): a client that connects
    as soon as the path exists is never refused."""
    path = tmp_path / "s"
    sock = _listen(str(path))
    assert os.listdir(tmp_path) == ["s"]
    with socket.socket(socket.AF_UNIX) as client:
        client.connect(str(path))  # no ConnectionRefusedError: it listened before it appeared
    sock.close()


# ---- the hand-off functions ----


def test_send_and_receive_round_trip() -> None:
    a, b = socket.socketpair()
    regions = [
        GuestRegion(BASE, 4 * PAGE, 0, PAGE),
        GuestRegion(BASE + 2 * MIB, 2 * MIB, MIB, 2 * MIB),
    ]
    with u.Userfaultfd() as uffd:
        send_uffd(a, uffd.fileno(), regions)
        fd, got = receive_uffd(b, memory_size=4 * MIB)
        assert got == regions
        assert os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[userfaultfd]"
        os.close(fd)
        send_uffd(a, uffd.fileno(), regions)
        with pytest.raises(HandoffError, match="outside the memory file"):
            receive_uffd(b, memory_size=2 * MIB)
    a.close()
    with pytest.raises(ConnectionError):
        receive_uffd(b)
    b.close()


def test_send_uffd_refuses_what_the_receiver_would_naming_it() -> None:
    a, b = socket.socketpair()
    with u.Userfaultfd() as uffd, a, b:
        with pytest.raises(TypeError, match="None is not a socket"):
            send_uffd(None, uffd.fileno(), [GuestRegion(BASE, PAGE, 0, PAGE)])  # type: ignore[arg-type]
        with pytest.raises(TypeError, match=r"\(1, 2, 3, 4\) is not a GuestRegion"):
            send_uffd(a, uffd.fileno(), [(1, 2, 3, 4)])  # type: ignore[list-item]
        with pytest.raises(HandoffError, match="non-empty"):
            send_uffd(a, uffd.fileno(), [])
        with pytest.raises(HandoffError, match="base_host_virt_addr -4096"):
            send_uffd(a, uffd.fileno(), [GuestRegion(-PAGE, PAGE, 0, PAGE)])
        b.setblocking(False)
        with pytest.raises(BlockingIOError):  # nothing was sent
            b.recv(1)


def test_a_payload_cut_anywhere_reads_as_incomplete_and_a_malformed_one_as_complete() -> None:
    payloads = [
        json.dumps([GuestRegion(BASE, 2 * MIB, MIB, PAGE).to_json()] * 3).encode(),
        json.dumps([{"a": 1.5e10, "b": [True, False, None], "c": -3, "d": "\u00e9 \\"}]).encode(),
        '[{"name": "é"}]'.encode(),
    ]
    for payload in payloads:
        assert _complete(payload)
        assert [k for k in range(len(payload)) if _complete(payload[:k])] == []
    for malformed in (b"[{not json", b"[1 2]", b'{"a" 1}', b"[1,,2]", b"nope", b"[1]]"):
        assert _complete(malformed), malformed


def test_parse_regions_names_the_bad_value() -> None:
    assert parse_regions(regions_json(region(BASE))) == [GuestRegion(BASE, 2 * PAGE, 0, PAGE)]
    with pytest.raises(HandoffError, match="region 1: page_size 0"):
        parse_regions(regions_json(region(BASE), region(BASE + MIB, page=0)))
    with pytest.raises(HandoffError, match="outside the user address space"):
        parse_regions(regions_json(region(1 << 47)))
