"""Exceptions. Every one is an OSError subclass carrying errno, so callers can catch by errno
class (FileExistsError for EEXIST, ...) or by ours."""

from __future__ import annotations

import errno
import os
from collections.abc import Sequence

from ._ntuples import SourceFailure

# Where EFAULT comes from when the memory is a region's: in sigbus mode the kernel's own
# accesses get no fault (README: "System calls on sigbus-mode regions").
EFAULT_HINT = (
    "if this is memory of a sigbus-mode region, populate() that range first (the kernel's own "
    "accesses are not served in sigbus mode), or use mode='thread'"
)


def expect_int(what: str, value: object) -> int:
    """value, if it is an int (not a bool); else TypeError naming what and the value."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{what} {value!r} is a {type(value).__name__}, not an int")
    return value


def os_error(err: int, call: str) -> OSError:
    """The OSError subclass Python picks for err, with a message naming the call (and, for
    EFAULT, the likely cause)."""
    hint = f": {EFAULT_HINT}" if err == errno.EFAULT else ""
    return OSError(err, f"{os.strerror(err)} ({call}){hint}")


class PartialError(BlockingIOError):
    """EAGAIN from a fill ioctl (COPY, ZEROPAGE, CONTINUE, POISON, MOVE).

    ``done`` is the number of bytes completed before the kernel stopped. ``event_pending`` is True
    when the kernel refused because a non-cooperative event (fork, remap, remove, unmap) has not
    been read yet: read events, then retry. Otherwise retry from ``start + done`` to learn the real
    cause (often EEXIST)."""

    def __init__(self, call: str, done: int, event_pending: bool) -> None:
        why = "an event is pending; read it, then retry" if event_pending else f"{done} bytes done"
        super().__init__(errno.EAGAIN, f"{call} stopped early: {why}")
        self.done = done
        self.event_pending = event_pending


class FeatureUnavailableError(OSError):
    """Features were requested that this kernel does not offer."""

    def __init__(self, missing: object) -> None:
        super().__init__(errno.EOPNOTSUPP, f"this kernel does not offer {missing}")
        self.missing = missing


class ProtocolError(OSError):
    """The kernel sent a message this library does not know (an unknown event code)."""

    def __init__(self, message: str, events: list[object] | None = None) -> None:
        super().__init__(errno.EPROTO, message)
        self.events = events or []


class SourceError(OSError):
    """A page source could not produce pages. The pages were poisoned (the toucher got SIGBUS);
    ``failures`` lists each one as (errno, address, offset, operation)."""

    def __init__(self, message: str, failures: Sequence[SourceFailure]) -> None:
        err = failures[0].errno if failures else errno.EIO
        super().__init__(err, message)
        self.failures = list(failures)


def source_error(failures: Sequence[SourceFailure], first: str = "") -> SourceError:
    """The SourceError for pages that could not be produced and were poisoned; ``first``
    describes the first failure in full."""
    message = f"{len(failures)} page(s) could not be produced and were poisoned"
    return SourceError(message + (f"; first: {first}" if first else ""), failures)


class DetachWarning(UserWarning):
    """A server closed while a region's memory was still exported (a numpy array, a memoryview):
    the region was detached, with every page installed first so the views keep reading correct
    data. A UserWarning, shown by default: for a large sparse region that install costs time and
    memory the program may not expect."""
