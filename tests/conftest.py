"""Shared helpers. Faults are always triggered from native code without the GIL (``touch`` in a
thread), from another process, or served by native code; every wait has a timeout."""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import userfaultfd as u
from userfaultfd import _core

PAGE = u.PAGE_SIZE
TIMEOUT = 10.0
MADV_DONTNEED, MADV_REMOVE = 4, 9
MREMAP_MAYMOVE, MREMAP_FIXED = 1, 2
MAP_FIXED_NOREPLACE = 0x100000

# libc calls for tests; ctypes releases the GIL around each, so they may fault or block on events.
libc = ctypes.CDLL(None, use_errno=True)
_vp, _sz, _int = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int
libc.mmap.restype = libc.mremap.restype = _vp
libc.mmap.argtypes = [_vp, _sz, _int, _int, _int, ctypes.c_long]
libc.mremap.argtypes = [_vp, _sz, _sz, _int, _vp]
libc.madvise.argtypes = [_vp, _sz, _int]
libc.munmap.argtypes = [_vp, _sz]
libc.msync.argtypes = [_vp, _sz, _int]


@contextlib.contextmanager
def loop_device(image: os.PathLike[str]) -> Iterator[str]:
    """A read-only loop block device over image (skips where that cannot be set up)."""
    if os.geteuid() != 0 or shutil.which("losetup") is None:
        pytest.skip("a loop device needs root and losetup")
    setup = subprocess.run(
        ["losetup", "--find", "--show", "--read-only", os.fspath(image)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    if setup.returncode:
        pytest.skip(f"no loop device: {setup.stderr.strip()}")
    device = setup.stdout.strip()
    try:
        yield device
    finally:
        subprocess.run(["losetup", "--detach", device], check=True, timeout=30)


def run_child(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Runs code in a fresh interpreter (where a SIGBUS or a crash is the expected outcome)."""
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=60
    )


def move(address: int, length: int) -> int:
    """mremaps [address, address + length) to a fresh place, from a thread (the call waits for
    its REMAP event to be read); returns the new address."""
    target = _core.Mapping(length, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    new = target.address
    target._rebase(0)  # its range is taken over by the move
    moved = Caller(libc.mremap, address, length, length, MREMAP_MAYMOVE | MREMAP_FIXED, new)
    assert moved.finish() == new
    return new


def usable() -> str | None:
    try:
        u.available_features()
    except OSError as e:
        return str(e)
    return None


def pytest_collection_modifyitems(config: Any, items: list[Any]) -> None:
    why = usable()
    if why:
        skip = pytest.mark.skip(reason=f"userfaultfd unusable here: {why}")
        for item in items:
            if "needs_uffd" in item.keywords:
                item.add_marker(skip)
        return
    with u.Userfaultfd() as f:
        user_mode_only = f.user_mode_only
    if user_mode_only:
        skip = pytest.mark.skip(
            reason="only user-mode faults are handled here (UFFD_USER_MODE_ONLY): a system call "
            "reading unpopulated memory gets EFAULT instead of a fault"
        )
        for item in items:
            if "kernel_faults" in item.keywords:
                item.add_marker(skip)


def pytest_configure(config: Any) -> None:
    config.addinivalue_line("markers", "needs_uffd: needs a working userfaultfd")
    config.addinivalue_line(
        "markers", "kernel_faults: triggers faults from system calls (not user-mode-only)"
    )


class Toucher(threading.Thread):
    """Touches memory from native code (GIL released) in a thread; join() asserts it finished."""

    def __init__(self, addr: int, length: int, stride: int = PAGE, write: bool = False) -> None:
        super().__init__(daemon=True)
        self.args_ = (addr, length, stride, write)
        self.result: int | None = None
        self.start()

    def run(self) -> None:
        self.result = _core.touch(*self.args_)

    def finish(self, timeout: float = TIMEOUT) -> int:
        self.join(timeout)
        assert not self.is_alive(), "the faulting thread is still blocked"
        assert self.result is not None
        return self.result


class Caller(threading.Thread):
    """Runs a GIL-releasing call (ctypes, a native touch) in a thread and keeps its outcome."""

    def __init__(self, fn: Callable[..., Any], *args: Any) -> None:
        super().__init__(daemon=True)
        self.fn, self.args_ = fn, args
        self.value: Any = None
        self.error: BaseException | None = None
        self.start()

    def run(self) -> None:
        try:
            self.value = self.fn(*self.args_)
        except BaseException as e:  # noqa: BLE001 - reported by finish()
            self.error = e

    def finish(self, timeout: float = TIMEOUT) -> Any:
        self.join(timeout)
        assert not self.is_alive(), f"{self.fn} is still blocked"
        if self.error:
            raise self.error
        return self.value


def anon(pages: int, shared: bool = False) -> _core.Mapping:
    flags = (mmap.MAP_SHARED if shared else mmap.MAP_PRIVATE) | mmap.MAP_ANONYMOUS
    return _core.Mapping(pages * PAGE, flags)


_children: list[subprocess.Popen[str]] = []


def spawn(args: list[str]) -> subprocess.Popen[str]:
    """A helper process of a test (a Firecracker-like client, say), pipes on all three
    streams; one the test leaves running, a failed assertion before its kill for instance, is
    killed when the test ends."""
    proc = subprocess.Popen(
        args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    _children.append(proc)
    return proc


@pytest.fixture(autouse=True)
def _no_child_outlives_its_test() -> Iterator[None]:
    yield
    while _children:
        proc = _children.pop()
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def wait_for(predicate: Callable[[], bool], timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.005)


def read_one(uffd: u.Userfaultfd, timeout: float = TIMEOUT) -> u.Event:
    events = uffd.read_events(max_events=1, timeout=timeout)
    assert events, "no event arrived in time"
    return events[0]


@pytest.fixture
def uffd() -> Iterator[u.Userfaultfd]:
    with u.Userfaultfd(u.Feature.EXACT_ADDRESS | u.Feature.THREAD_ID) as f:
        yield f


@pytest.fixture
def memfd() -> Iterator[int]:
    fd = os.memfd_create("uffd-test", os.MFD_CLOEXEC)
    yield fd
    os.close(fd)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[Any]:
    """A real S3-compatible server on loopback for the whole session (store/localserver.py),
    with the AWS_* variables pointing at it."""
    from userfaultfd.store.localserver import running

    with running() as server:
        saved = {k: os.environ.get(k) for k in server.env()}
        os.environ.update(server.env())
        try:
            yield server
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


_buckets = iter(range(1_000_000))


@pytest.fixture(params=["file", "s3"])
def store_url(request: Any, tmp_path: Any) -> str:
    """An empty store: a directory, or a fresh bucket (and prefix) on the session's S3 server."""
    if request.param == "file":
        return f"file://{tmp_path}/store"
    server = request.getfixturevalue("s3_server")
    bucket = f"test-{os.getpid()}-{next(_buckets)}"
    server.create_bucket(bucket)
    return f"s3://{bucket}/snaps"
