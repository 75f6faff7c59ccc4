"""The low-level API: one method per userfaultfd ioctl, errors as OSError subclasses."""

from __future__ import annotations

import errno
import functools
import os
from typing import Any

from . import _core
from .errors import FeatureUnavailableError, PartialError, expect_int, os_error
from .events import Event, decode
from .flags import (
    CONTINUE_MODE_WP,
    COPY_MODE_WP,
    MODE_DONTWAKE,
    MOVE_MODE_ALLOW_SRC_HOLES,
    USER_MODE_ONLY,
    WRITEPROTECT_MODE_DONTWAKE,
    WRITEPROTECT_MODE_WP,
    Feature,
    Ioctl,
    RegisterMode,
)

PAGE_SIZE: int = _core.PAGE_SIZE

_HOW_TO_FIX = (
    "userfaultfd is not permitted here. Run as root (CAP_SYS_PTRACE), or set "
    "`sysctl vm.unprivileged_userfaultfd=1`, or get read-write access to /dev/userfaultfd "
    "(e.g. a group owning it); with user_mode_only=True only user-mode faults are handled"
)


def _open(flags: int, user_mode_only: bool | None) -> tuple[int, str, bool]:
    """Create a uffd: the syscall first, then /dev/userfaultfd; (fd, how, user_mode_only)."""
    tries: list[tuple[Any, str, bool]] = []
    if user_mode_only is not True:
        tries += [(_core.create, "syscall", False), (_core.create_dev, "device", False)]
    if user_mode_only is not False:
        tries += [(_core.create, "syscall", True), (_core.create_dev, "device", True)]
    denied: list[str] = []
    for create, how, umo in tries:
        try:
            return create(flags | (USER_MODE_ONLY if umo else 0)), how, umo
        except OSError as e:
            if e.errno == errno.ENOSYS:
                raise OSError(
                    errno.ENOSYS, "this kernel lacks userfaultfd (CONFIG_USERFAULTFD is off)"
                ) from None
            if e.errno not in (errno.EPERM, errno.EACCES, errno.ENOENT):
                raise
            denied.append(f"{how}{' user-mode-only' if umo else ''}: {e.strerror}")
    raise PermissionError(errno.EPERM, f"{_HOW_TO_FIX} (tried {'; '.join(denied)})")


@functools.cache
def _probe() -> tuple[int, int, str, bool]:
    fd, how, umo = _open(os.O_CLOEXEC, None)
    try:
        _, features, ioctls = _core.api(fd, 0)
    finally:
        os.close(fd)
    return features, ioctls, how, umo


def available_features() -> Feature:
    """What this kernel offers, probed once on a throw-away uffd (UFFDIO_API is one-shot)."""
    return Feature(_probe()[0])


def _check_range(name: str, start: int, length: int, align: int = PAGE_SIZE) -> None:
    expect_int(f"{name}: start", start)
    expect_int(f"{name}: length", length)
    if start < 0 or start % align:
        raise ValueError(f"{name}: start {start!r} is not a non-negative multiple of {align}")
    if length <= 0 or length % align:
        raise ValueError(f"{name}: length {length!r} is not a positive multiple of {align}")


def _fill_result(call: str, err: int, result: int) -> int:
    if err == 0:
        return result
    if err == errno.EAGAIN:
        raise PartialError(call, max(result, 0), event_pending=result == -errno.EAGAIN)
    raise os_error(err, call)


class Userfaultfd:
    """A userfaultfd, created and initialised (UFFDIO_API) with exactly ``features``.

    ``user_mode_only=None`` takes full mode where permitted, else UFFD_USER_MODE_ONLY (then kernel
    accesses to missing pages fail with EFAULT instead of faulting). Creation tries the syscall,
    then /dev/userfaultfd. UFFDIO_API is issued once, with exactly ``features``."""

    def __init__(
        self,
        features: Feature | int = 0,
        *,
        nonblocking: bool = True,
        cloexec: bool = True,
        user_mode_only: bool | None = None,
    ) -> None:
        self._fd = -1
        wanted = Feature(features)
        missing = int(wanted) & ~int(available_features())  # ints: ~ on a flag drops unknown bits
        if missing:
            raise FeatureUnavailableError(Feature(missing))
        flags = (os.O_NONBLOCK if nonblocking else 0) | (os.O_CLOEXEC if cloexec else 0)
        fd, self.created_by, self.user_mode_only = _open(flags, user_mode_only)
        try:
            _, _, ioctls = _core.api(fd, int(wanted))
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self.features = wanted
        self.ioctls = Ioctl(ioctls)

    @classmethod
    def from_fd(cls, fd: int) -> Userfaultfd:
        """Adopt an open, initialised uffd (received over a socket, or from a Fork event).
        The object owns fd from now on. Its features are read from /proc/self/fdinfo."""
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            raise ValueError(f"fd {fd!r} is not an open file descriptor") from None
        if target != "anon_inode:[userfaultfd]":
            raise ValueError(f"fd {fd} is not a userfaultfd (it is {target})")
        api = ""
        with open(f"/proc/self/fdinfo/{fd}") as info:
            for line in info:
                if line.startswith("API:"):
                    api = line.split()[1]
        parts = api.split(":")
        if len(parts) != 3:
            raise ValueError(f"fd {fd}: cannot read its userfaultfd state from fdinfo ({api!r})")
        self = cls.__new__(cls)
        self._fd = fd
        self.created_by = "adopted"
        self.user_mode_only = False
        self.features = Feature(int(parts[1], 16) & 0x7FFFFFFF)
        self.ioctls = Ioctl(int(parts[2], 16))
        return self

    # lifecycle

    def fileno(self) -> int:
        if self._fd < 0:
            raise ValueError("I/O operation on a closed userfaultfd")
        return self._fd

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def close(self) -> None:
        """Close the fd. Blocked faulters are then resolved normally (the kernel's rule)."""
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)

    def __enter__(self) -> Userfaultfd:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_fd", -1) >= 0:
            self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"fd={self._fd}"
        return f"<Userfaultfd {state} features={getattr(self, 'features', None)!r}>"

    # range ioctls

    def register(
        self, start: int, length: int, mode: RegisterMode | int = RegisterMode.MISSING
    ) -> Ioctl:
        """UFFDIO_REGISTER. Returns the ioctls usable on the range. EINVAL: a bad range or mode, or
        memory that cannot be registered; EBUSY: registered with another uffd; EPERM: no write
        permission on a shared mapping."""
        _check_range("register", start, length)
        if not mode or int(mode) & ~0x7:
            raise ValueError(f"register: mode {mode!r} is not a non-empty RegisterMode")
        return Ioctl(_core.register(self.fileno(), start, length, int(mode)))

    def unregister(self, start: int, length: int) -> None:
        """UFFDIO_UNREGISTER; wakes faulters blocked on MISSING faults in the range."""
        _check_range("unregister", start, length)
        _core.unregister(self.fileno(), start, length)

    def wake(self, start: int, length: int) -> None:
        """UFFDIO_WAKE: wake every faulter blocked on an address in the range."""
        _check_range("wake", start, length)
        _core.wake(self.fileno(), start, length)

    def copy(
        self, dst: int, src: int | Any, length: int, *, dontwake: bool = False, wp: bool = False
    ) -> int:
        """UFFDIO_COPY ``length`` bytes from ``src`` (an address in this process, or any buffer)
        to ``dst``. Returns the bytes copied. FileExistsError (EEXIST): already populated;
        FileNotFoundError (ENOENT): not registered; PartialError (EAGAIN): stopped early."""
        _check_range("copy", dst, length)
        keep = src
        if not isinstance(src, int):
            src, size = _core.buffer_address(keep)
            if size < length:
                raise ValueError(f"copy: the source buffer has {size} bytes, fewer than {length}")
        mode = (MODE_DONTWAKE if dontwake else 0) | (COPY_MODE_WP if wp else 0)
        err, result = _core.copy(self.fileno(), dst, src, length, mode)
        del keep
        return _fill_result("UFFDIO_COPY", err, result)

    def zeropage(self, start: int, length: int, *, dontwake: bool = False) -> int:
        """UFFDIO_ZEROPAGE: map zero pages. Returns bytes done. EINVAL on hugetlb."""
        _check_range("zeropage", start, length)
        err, result = _core.zeropage(self.fileno(), start, length, MODE_DONTWAKE if dontwake else 0)
        return _fill_result("UFFDIO_ZEROPAGE", err, result)

    def writeprotect(
        self, start: int, length: int, *, protect: bool = True, dontwake: bool = False
    ) -> None:
        """UFFDIO_WRITEPROTECT: protect, or unprotect and wake. ENOENT: not registered WP."""
        _check_range("writeprotect", start, length)
        if protect and dontwake:
            raise ValueError("writeprotect: dontwake applies only to unprotecting")
        mode = (WRITEPROTECT_MODE_WP if protect else 0) | (
            WRITEPROTECT_MODE_DONTWAKE if dontwake else 0
        )
        _core.writeprotect(self.fileno(), start, length, mode)

    def continue_(
        self, start: int, length: int, *, dontwake: bool = False, wp: bool = False
    ) -> int:
        """UFFDIO_CONTINUE: map page-cache pages (minor faults). EFAULT: no page in the cache."""
        _check_range("continue_", start, length)
        mode = (MODE_DONTWAKE if dontwake else 0) | (CONTINUE_MODE_WP if wp else 0)
        err, result = _core.continue_(self.fileno(), start, length, mode)
        return _fill_result("UFFDIO_CONTINUE", err, result)

    def poison(self, start: int, length: int, *, dontwake: bool = False) -> int:
        """UFFDIO_POISON: later accesses get SIGBUS. EEXIST: a page is present."""
        _check_range("poison", start, length)
        err, result = _core.poison(self.fileno(), start, length, MODE_DONTWAKE if dontwake else 0)
        return _fill_result("UFFDIO_POISON", err, result)

    def move(
        self,
        dst: int,
        src: int,
        length: int,
        *,
        dontwake: bool = False,
        allow_src_holes: bool = False,
    ) -> int:
        """UFFDIO_MOVE pages from ``src`` to ``dst`` (private anonymous memory of the uffd's own
        process). EBUSY: a page is shared; ENOENT: a source hole without allow_src_holes."""
        _check_range("move", dst, length)
        _check_range("move", src, length)
        mode = (MODE_DONTWAKE if dontwake else 0) | (
            MOVE_MODE_ALLOW_SRC_HOLES if allow_src_holes else 0
        )
        err, result = _core.move(self.fileno(), dst, src, length, mode)
        return _fill_result("UFFDIO_MOVE", err, result)

    def read_events(self, max_events: int = 64, timeout: float | None = None) -> list[Event]:
        """Read up to ``max_events`` messages. ``timeout`` None waits, 0 does not; returns [] when
        nothing came in time. The GIL is released while waiting."""
        if not isinstance(max_events, int) or not 1 <= max_events <= 4096:
            raise ValueError(f"max_events {max_events!r} is not in 1..4096")
        if timeout is None:
            ms = -1
        elif not isinstance(timeout, (int, float)) or isinstance(timeout, bool):
            raise TypeError(f"timeout {timeout!r} is not a number of seconds or None")
        elif timeout < 0:
            raise ValueError(f"timeout {timeout!r} is negative")
        else:
            ms = int(timeout * 1000)
        data = _core.read(self.fileno(), max_events, ms)
        return decode(data, Userfaultfd)
