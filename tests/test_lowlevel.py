"""The low-level API: every ioctl on its success and error paths, events, the API handshake."""

from __future__ import annotations

import errno
import mmap
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

import userfaultfd as u
from userfaultfd import _core
from userfaultfd.events import decode
from userfaultfd.flags import USER_MODE_ONLY

from .conftest import (
    MADV_DONTNEED,
    MREMAP_FIXED,
    MREMAP_MAYMOVE,
    PAGE,
    Caller,
    Toucher,
    anon,
    libc,
    read_one,
    run_child,
)

pytestmark = pytest.mark.needs_uffd


# ---- creation and the API handshake ----


def test_create_and_lifecycle() -> None:
    f = u.Userfaultfd(u.Feature.THREAD_ID)
    assert f.features == u.Feature.THREAD_ID
    assert u.Ioctl.REGISTER in f.ioctls and u.Ioctl.API in f.ioctls
    fd = f.fileno()
    assert os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[userfaultfd]"
    assert os.get_blocking(fd) is False
    assert "fd=" in repr(f)
    with f:
        pass
    assert f.closed
    f.close()  # idempotent
    with pytest.raises(ValueError, match="closed"):
        f.fileno()


def test_blocking_and_inheritable_flags() -> None:
    with u.Userfaultfd(nonblocking=False, cloexec=False) as f:
        assert os.get_blocking(f.fileno()) is True
        assert os.get_inheritable(f.fileno()) is True
        # poll() on a blocking uffd always reports POLLERR: a timeout needs nonblocking mode
        with pytest.raises(ValueError, match="nonblocking"):
            f.read_events(timeout=0.05)
        assert f.read_events(timeout=0) == []


def test_available_features_is_what_the_kernel_reports() -> None:
    with u.Userfaultfd() as f:
        api, features, ioctls = 0, 0, 0
        create = _core.create if f.created_by == "syscall" else _core.create_dev
        fd = create(os.O_CLOEXEC | (USER_MODE_ONLY if f.user_mode_only else 0))
        try:
            api, features, ioctls = _core.api(fd, 0)
        finally:
            os.close(fd)
        assert api == 0xAA and u.available_features() == features
        assert ioctls == 0x8000000000000003 == f.ioctls


def test_api_is_one_shot(uffd: u.Userfaultfd) -> None:
    with pytest.raises(OSError) as info:
        _core.api(uffd.fileno(), 0)
    assert info.value.errno == errno.EINVAL and "UFFDIO_API" in str(info.value)


def test_features_not_offered_fail_before_the_api_call() -> None:
    unknown = u.Feature(1 << 29)
    with pytest.raises(u.FeatureUnavailableError) as info:
        u.Userfaultfd(unknown | u.Feature.THREAD_ID)
    assert info.value.errno == errno.EOPNOTSUPP
    assert int(info.value.missing) == 1 << 29
    assert "536870912" in str(info.value)


def test_user_mode_only_and_device_creation() -> None:
    with u.Userfaultfd(user_mode_only=True) as f:
        assert f.user_mode_only
        region = anon(1)
        f.register(region.address, PAGE)
        # kernel accesses to a missing page fail with EFAULT instead of faulting
        r, w = os.pipe()
        os.write(w, b"hello")
        with pytest.raises(OSError) as info:
            os.readv(r, [memoryview(region)])
        assert info.value.errno == errno.EFAULT
        os.close(r), os.close(w)
        f.unregister(region.address, PAGE)
        region.close()
    if os.path.exists("/dev/userfaultfd") and os.access("/dev/userfaultfd", os.R_OK | os.W_OK):
        fd = _core.create_dev(os.O_CLOEXEC)
        assert os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[userfaultfd]"
        os.close(fd)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become another user")
def test_unprivileged_user_gets_a_message_saying_how_to_fix_it() -> None:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: drop to nobody, report what happens
        try:
            os.setgid(65534)
            os.setuid(65534)
            try:
                u.uffd._open(os.O_CLOEXEC, False)
                msg = "created"
            except PermissionError as e:
                msg = str(e)
            fd, how, umo = u.uffd._open(os.O_CLOEXEC, None)
            msg += f"\nfallback {how} {umo}"
            os.write(w, msg.encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        out = f.read()
    os.waitpid(pid, 0)
    with open("/proc/sys/vm/unprivileged_userfaultfd") as sysctl:
        if sysctl.read().strip() == "1":
            pytest.skip("vm.unprivileged_userfaultfd=1 lets every user in")
    assert "vm.unprivileged_userfaultfd=1" in out and "/dev/userfaultfd" in out and "root" in out
    assert out.endswith("fallback syscall True")


def test_from_fd_adopts_a_uffd_and_rejects_other_fds(uffd: u.Userfaultfd) -> None:
    adopted = u.Userfaultfd.from_fd(os.dup(uffd.fileno()))
    assert adopted.features == uffd.features
    adopted.close()
    r, w = os.pipe()
    with pytest.raises(ValueError, match="not a userfaultfd"):
        u.Userfaultfd.from_fd(r)
    os.close(r), os.close(w)
    with pytest.raises(ValueError, match="not an open file descriptor"):
        u.Userfaultfd.from_fd(999999)


# ---- register / unregister ----


def test_register_reports_ioctls_and_validates(uffd: u.Userfaultfd) -> None:
    region = anon(4)
    ioctls = uffd.register(region.address, 4 * PAGE)
    assert int(ioctls) == 0x13C
    assert u.Ioctl.COPY in ioctls and u.Ioctl.WRITEPROTECT not in ioctls
    assert (
        int(uffd.register(region.address, 4 * PAGE, u.RegisterMode.MISSING | u.RegisterMode.WP))
        == 0x17C
    )
    with pytest.raises(ValueError, match=r"start 4097 "):
        uffd.register(4097, PAGE)
    with pytest.raises(ValueError, match=r"length 0 "):
        uffd.register(region.address, 0)
    with pytest.raises(ValueError, match="mode 8"):
        uffd.register(region.address, PAGE, 8)
    with pytest.raises(ValueError, match="mode 0"):
        uffd.register(region.address, PAGE, 0)
    with pytest.raises(TypeError, match="register: start '4096' is a str, not an int"):
        uffd.register("4096", PAGE)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"register: length 4096.0 is a float"):
        uffd.register(region.address, 4096.0)  # type: ignore[arg-type]
    uffd.unregister(region.address, 4 * PAGE)
    region.close()


def test_register_errors(uffd: u.Userfaultfd, tmp_path: object) -> None:
    # MINOR on anonymous private memory, and a regular file on disk: EINVAL
    region = anon(1)
    with pytest.raises(OSError) as info:
        uffd.register(region.address, PAGE, u.RegisterMode.MINOR)
    assert info.value.errno == errno.EINVAL and "UFFDIO_REGISTER" in str(info.value)
    path = os.path.join(str(tmp_path), "f")
    with open(path, "wb") as f:
        f.write(b"x" * PAGE)
    fd = os.open(path, os.O_RDWR)
    filemap = _core.Mapping(PAGE, mmap.MAP_SHARED, fd)
    with pytest.raises(OSError) as info:
        uffd.register(filemap.address, PAGE)
    assert info.value.errno == errno.EINVAL
    filemap.close()
    os.close(fd)
    # beyond the user address space: the kernel's own range check
    for call in (uffd.register, uffd.unregister, uffd.wake):
        with pytest.raises(OSError) as info:
            call(1 << 47, PAGE)
        assert info.value.errno == errno.EINVAL
    # no mapping there: EINVAL from REGISTER
    hole = anon(1)
    hole_addr = hole.address
    hole.close()
    with pytest.raises(OSError) as info:
        uffd.register(hole_addr, PAGE)
    assert info.value.errno == errno.EINVAL
    # registered with another uffd: EBUSY
    uffd.register(region.address, PAGE)
    with u.Userfaultfd() as other, pytest.raises(OSError) as info:
        other.register(region.address, PAGE)
    assert info.value.errno == errno.EBUSY
    uffd.unregister(region.address, PAGE)
    region.close()


# ---- resolving faults ----


def test_fault_event_copy_and_wake(uffd: u.Userfaultfd) -> None:
    region = anon(2)
    uffd.register(region.address, 2 * PAGE)
    toucher = Toucher(region.address + 77, 1, write=True)
    event = read_one(uffd)
    assert isinstance(event, u.PageFault)
    assert event.address == region.address + 77  # EXACT_ADDRESS
    assert event.write and not event.wp and not event.minor
    assert event.thread_id == toucher.native_id
    assert uffd.copy(region.address, b"\x07" * PAGE, PAGE) == PAGE
    toucher.finish()
    assert region[77] == 8  # the toucher incremented what we copied
    with pytest.raises(FileExistsError):
        uffd.copy(region.address, b"x" * PAGE, PAGE)
    # DONTWAKE leaves the faulter asleep until an explicit wake
    toucher = Toucher(region.address + PAGE, 1)
    read_one(uffd)
    assert uffd.copy(region.address + PAGE, b"\x05" * PAGE, PAGE, dontwake=True) == PAGE
    toucher.join(0.2)
    assert toucher.is_alive()
    uffd.wake(region.address + PAGE, PAGE)
    assert toucher.finish() == 5
    region.close()


def test_copy_errors(uffd: u.Userfaultfd) -> None:
    region = anon(3)
    # not registered: ENOENT
    with pytest.raises(FileNotFoundError):
        uffd.copy(region.address, b"x" * PAGE, PAGE)
    uffd.register(region.address, 3 * PAGE)
    # MODE_WP on a range not registered WP: EINVAL
    with pytest.raises(OSError) as info:
        uffd.copy(region.address, b"x" * PAGE, PAGE, wp=True)
    assert info.value.errno == errno.EINVAL
    with pytest.raises(ValueError, match="fewer than"):
        uffd.copy(region.address, b"x", PAGE)
    with pytest.raises(ValueError, match="start"):
        uffd.copy(region.address + 1, b"x" * PAGE, PAGE)
    # partial progress: the 2nd page exists, so a 3-page COPY stops after one page
    uffd.copy(region.address + PAGE, b"b" * PAGE, PAGE)
    with pytest.raises(u.PartialError) as partial:
        uffd.copy(region.address, b"a" * 3 * PAGE, 3 * PAGE)
    assert partial.value.done == PAGE and not partial.value.event_pending
    assert partial.value.errno == errno.EAGAIN and isinstance(partial.value, BlockingIOError)
    assert region[0:1] == b"a" and region[PAGE : PAGE + 1] == b"b"
    # src may be an address; and unaligned
    src = b"_" + b"z" * PAGE
    addr, _ = _core.buffer_address(src)
    assert uffd.copy(region.address + 2 * PAGE, addr + 1, PAGE) == PAGE
    assert region[2 * PAGE] == ord("z")
    region.close()


def test_zeropage(uffd: u.Userfaultfd) -> None:
    region = anon(2)
    uffd.register(region.address, 2 * PAGE)
    toucher = Toucher(region.address, 2 * PAGE)
    read_one(uffd)
    assert uffd.zeropage(region.address, 2 * PAGE) == 2 * PAGE
    assert toucher.finish() == 0
    with pytest.raises(FileExistsError):
        uffd.zeropage(region.address, PAGE)
    region.close()


def test_writeprotect() -> None:
    feats = u.Feature.PAGEFAULT_FLAG_WP | u.Feature.WP_UNPOPULATED
    with u.Userfaultfd(feats) as f:
        region = anon(1)
        # not registered WP: ENOENT
        f.register(region.address, PAGE)
        with pytest.raises(FileNotFoundError):
            f.writeprotect(region.address, PAGE)
        f.register(region.address, PAGE, u.RegisterMode.MISSING | u.RegisterMode.WP)
        f.copy(region.address, b"\x01" * PAGE, PAGE)
        f.writeprotect(region.address, PAGE)
        assert region[0] == 1  # reads are fine
        toucher = Toucher(region.address, 1, write=True)
        event = read_one(f)
        assert isinstance(event, u.PageFault) and event.wp and event.write
        assert int(event.flags) == 0x3
        f.writeprotect(region.address, PAGE, protect=False)  # unprotect wakes
        toucher.finish()
        assert region[0] == 2
        with pytest.raises(ValueError, match="dontwake"):
            f.writeprotect(region.address, PAGE, dontwake=True)
        f.unregister(region.address, PAGE)
        region.close()


def test_continue_minor_faults(memfd: int) -> None:
    with u.Userfaultfd(u.Feature.MINOR_SHMEM) as f:
        os.ftruncate(memfd, 2 * PAGE)
        os.pwrite(memfd, b"m" * PAGE, 0)  # page 0 in the page cache, page 1 a hole
        region = _core.Mapping(2 * PAGE, mmap.MAP_SHARED, memfd)
        f.register(region.address, 2 * PAGE, u.RegisterMode.MINOR)
        toucher = Toucher(region.address, 1)
        event = read_one(f)
        assert isinstance(event, u.PageFault) and event.minor and int(event.flags) == 0x4
        assert f.continue_(region.address, PAGE) == PAGE
        assert toucher.finish() == ord("m")
        with pytest.raises(FileExistsError):
            f.continue_(region.address, PAGE)
        with pytest.raises(OSError) as info:  # no page in the page cache
            f.continue_(region.address + PAGE, PAGE)
        assert info.value.errno == errno.EFAULT
        f.unregister(region.address, 2 * PAGE)
        region.close()


POISON_CHILD = textwrap.dedent(
    """
    import mmap, os, signal, sys
    import userfaultfd as u
    from userfaultfd import _core
    f = u.Userfaultfd(u.Feature.POISON)
    region = _core.Mapping(2 * u.PAGE_SIZE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    f.register(region.address, 2 * u.PAGE_SIZE)
    f.copy(region.address + u.PAGE_SIZE, b"x" * u.PAGE_SIZE, u.PAGE_SIZE)
    try:
        f.poison(region.address + u.PAGE_SIZE, u.PAGE_SIZE)
    except FileExistsError:
        print("EEXIST", flush=True)
    assert f.poison(region.address, u.PAGE_SIZE) == u.PAGE_SIZE
    print("poisoned", flush=True)
    region[0]
    print("read poisoned memory", flush=True)
    """
)


def test_poison_gives_sigbus_and_refuses_present_pages() -> None:
    proc = run_child(POISON_CHILD)
    assert proc.stdout.split() == ["EEXIST", "poisoned"]
    assert proc.returncode == -signal.SIGBUS


def test_move(uffd: u.Userfaultfd) -> None:
    with u.Userfaultfd(u.Feature.MOVE) as f:
        dst, src = anon(3), anon(3)
        src[0:PAGE] = b"s" * PAGE
        f.register(dst.address, 3 * PAGE)
        assert f.move(dst.address, src.address, PAGE) == PAGE
        assert dst[0:4] == b"ssss" and src[0] == 0  # the source is empty afterwards
        with pytest.raises(FileNotFoundError):  # a hole in the source
            f.move(dst.address + PAGE, src.address + PAGE, PAGE)
        assert (
            f.move(dst.address + PAGE, src.address + PAGE, 2 * PAGE, allow_src_holes=True)
            == 2 * PAGE
        )
        with pytest.raises(ValueError, match="start"):
            f.move(dst.address, src.address + 1, PAGE)
        f.unregister(dst.address, 3 * PAGE)
        dst.close(), src.close()


# ---- reading events ----


def test_read_events_timeouts_and_validation(uffd: u.Userfaultfd) -> None:
    assert uffd.read_events(timeout=0) == []
    start = time.monotonic()
    assert uffd.read_events(timeout=0.1) == []
    assert 0.09 <= time.monotonic() - start < 2
    for bad in (0, 5000, "3"):
        with pytest.raises(ValueError, match="max_events"):
            uffd.read_events(max_events=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="negative"):
        uffd.read_events(timeout=-1)
    with pytest.raises(TypeError, match="timeout '1' is not a number"):
        uffd.read_events(timeout="1")  # type: ignore[arg-type]


def test_several_faults_in_one_read(uffd: u.Userfaultfd) -> None:
    region = anon(2)
    uffd.register(region.address, 2 * PAGE)
    touchers = [Toucher(region.address, 1), Toucher(region.address + PAGE, 1)]
    events: list[u.Event] = []
    deadline = time.monotonic() + 10
    while len(events) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
        events += uffd.read_events(max_events=8, timeout=1)
    assert sorted(e.address for e in events if isinstance(e, u.PageFault)) == [
        region.address,
        region.address + PAGE,
    ]
    uffd.zeropage(region.address, 2 * PAGE)
    for t in touchers:
        t.finish()
    region.close()


def test_decode_rejects_unknown_event_codes() -> None:
    good = (
        bytes([0x15, 0, 0, 0, 0, 0, 0, 0])
        + (4096).to_bytes(8, "little")
        + (8192).to_bytes(8, "little")
        + bytes(8)
    )
    bad = bytes([0x42]) + bytes(31)
    assert decode(good, u.Userfaultfd) == [u.Remove(4096, 8192)]
    with pytest.raises(u.ProtocolError, match="0x42") as info:
        decode(good + bad, u.Userfaultfd)
    assert info.value.events == [u.Remove(4096, 8192)]
    assert info.value.errno == errno.EPROTO


def events_uffd() -> u.Userfaultfd:
    return u.Userfaultfd(u.Feature.EVENT_REMOVE | u.Feature.EVENT_UNMAP | u.Feature.EVENT_REMAP)


def test_remove_event_and_eagain_while_pending() -> None:
    with events_uffd() as f:
        region = anon(2)
        f.register(region.address, 2 * PAGE)
        f.copy(region.address, b"x" * 2 * PAGE, 2 * PAGE)
        advise = Caller(libc.madvise, region.address, 2 * PAGE, MADV_DONTNEED)
        time.sleep(0.1)
        assert advise.is_alive()  # madvise blocks until the event is read
        with pytest.raises(u.PartialError) as info:
            f.zeropage(region.address, PAGE)
        assert info.value.event_pending and info.value.done == 0
        assert read_one(f) == u.Remove(region.address, region.address + 2 * PAGE)
        assert advise.finish() == 0
        assert f.zeropage(region.address, PAGE) == PAGE  # the range stayed registered
        f.unregister(region.address, 2 * PAGE)
        region.close()


def test_unmap_event() -> None:
    with events_uffd() as f:
        region = anon(2)
        addr = region.address
        f.register(addr, 2 * PAGE)
        region._rebase(0)  # unmapped by hand below
        unmap = Caller(libc.munmap, addr, 2 * PAGE)
        assert read_one(f) == u.Unmap(addr, addr + 2 * PAGE)
        assert unmap.finish() == 0


def test_remap_event() -> None:
    with events_uffd() as f:
        region, target = anon(2), anon(2)
        old, new = region.address, target.address
        f.register(old, 2 * PAGE)
        target._rebase(0), region._rebase(0)
        remap = Caller(libc.mremap, old, 2 * PAGE, 2 * PAGE, MREMAP_MAYMOVE | MREMAP_FIXED, new)
        # the move, then the unmapping of the old range: mremap blocks until both are read
        assert read_one(f) == u.Remap(old, new, 2 * PAGE)
        assert read_one(f) == u.Unmap(old, old + 2 * PAGE)
        assert remap.finish() == new
        # the moved range is still registered with us
        toucher = Toucher(new, 1)
        assert read_one(f) == u.PageFault(new, u.PageFaultFlag(0), 0)
        f.zeropage(new, PAGE)
        toucher.finish()
        f.unregister(new, 2 * PAGE)
        libc.munmap(new, 2 * PAGE)


FORK_CHILD = textwrap.dedent(
    """
    import mmap, os, socket, sys
    import userfaultfd as u
    from userfaultfd import _core
    sock = socket.socket(fileno=int(sys.argv[1]))
    f = u.Userfaultfd(u.Feature.EVENT_FORK)
    region = _core.Mapping(u.PAGE_SIZE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    f.register(region.address, u.PAGE_SIZE)
    socket.send_fds(sock, [region.address.to_bytes(8, "little")], [f.fileno()])
    pid = os.fork()  # blocks until the monitor reads the FORK event
    if pid == 0:
        os._exit(region[5])  # a fault on the child's own uffd
    _, status = os.waitpid(pid, 0)
    print(os.waitstatus_to_exitcode(status), flush=True)
    """
)


@pytest.mark.skipif(os.geteuid() != 0, reason="EVENT_FORK needs CAP_SYS_PTRACE")
def test_fork_event_gives_a_uffd_for_the_child() -> None:
    ours, theirs = socket.socketpair()
    proc = subprocess.Popen(
        [sys.executable, "-c", FORK_CHILD, str(theirs.fileno())],
        pass_fds=[theirs.fileno()],
        stdout=subprocess.PIPE,
        text=True,
    )
    theirs.close()
    try:
        ours.settimeout(30)
        msg, fds, _, _ = socket.recv_fds(ours, 8, 1)
        address = int.from_bytes(msg, "little")
        with u.Userfaultfd.from_fd(fds[0]) as parent:
            event = read_one(parent, timeout=30)
            assert isinstance(event, u.Fork)
            with event.uffd as child:
                assert child.features & u.Feature.EVENT_FORK
                fault = read_one(child, timeout=30)
                assert isinstance(fault, u.PageFault) and fault.address == address
                child.copy(address, bytes([42]) * PAGE, PAGE)
                out, _ = proc.communicate(timeout=30)
        assert out.strip() == "42"
    finally:
        proc.kill()
        proc.wait()
        ours.close()


# ---- the Mapping type under regions: indexing, slicing, the buffer protocol ----


def test_mapping_indexing_and_slices_behave_like_bytearray() -> None:
    m = anon(1)
    ref = bytearray(PAGE)
    for key, value in [
        (0, 7),
        (-1, 255),
        (slice(10, 20), b"0123456789"),
        (slice(100, 200, 7), bytes(range(15))),
        (slice(300, 290, -2), b"abcde"),
    ]:
        m[key] = value
        ref[key] = value  # type: ignore[index]
    assert bytes(m) == ref and m[-1] == 255 and m[100:200:7] == ref[100:200:7]
    assert m[5:2] == b"" and m[::1024] == ref[::1024]
    m[1:11] = memoryview(m)[10:20]  # overlapping: copied as if through a temporary
    ref[1:11] = ref[10:20]
    assert bytes(m) == ref
    for key, value, error, text in [
        (PAGE, 1, IndexError, f"index {PAGE} out of range for {PAGE} bytes"),
        (0, 256, ValueError, "byte value 256 is not in range"),
        (slice(0, 3), b"ab", ValueError, "cannot assign 2 bytes to a slice of 3 bytes"),
        (slice(0, 8, 2), b"abc", ValueError, "cannot assign 3 bytes to a slice of 4 bytes"),
        ("x", 1, TypeError, "indices must be integers or slices"),
    ]:
        with pytest.raises(error, match=text):
            m[key] = value  # type: ignore[index]
    with pytest.raises(IndexError, match="out of range"):
        m[-PAGE - 1]
    view = memoryview(m)
    assert m.exports == 1
    with pytest.raises(BufferError, match="1 exported buffer"):
        m.close()
    view.release()
    m.close()
    assert m.closed
    with pytest.raises(ValueError, match="closed"):
        m[0]


def test_engine_takes_keywords_and_its_enums_come_from_the_native_core(
    uffd: u.Userfaultfd,
) -> None:
    from userfaultfd import sources

    assert (_core.MODE_THREAD, _core.MODE_SIGBUS) == (0, 1)
    assert (_core.REMOVE_REFILL, _core.REMOVE_UNREGISTER) == (0, 1)
    kinds = [_core.SRC_ZERO, _core.SRC_BYTES, _core.SRC_FILL, _core.SRC_CONTINUE]
    assert kinds == [sources.SRC_ZERO, sources.SRC_BYTES, sources.SRC_FILL, sources.SRC_CONTINUE]
    with pytest.raises(TypeError, match="positional"):
        _core.Engine(uffd.fileno(), 0, 1, 0, PAGE, 0)  # type: ignore[misc]
    engine = _core.Engine(
        uffd.fileno(),
        mode=_core.MODE_THREAD,
        workers=1,
        remove_policy=_core.REMOVE_REFILL,
        base_page=PAGE,
        spin_ns=0,
    )
    with pytest.raises(TypeError, match="positional"):
        engine.add_region(0, PAGE)  # type: ignore[misc]
    with pytest.raises(TypeError, match="'length'"):
        engine.add_region(start=0)  # type: ignore[call-arg]
    engine.close()
