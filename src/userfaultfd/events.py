"""Decoded ``struct uffd_msg`` events: immutable values, one class per event type."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import ProtocolError
from .flags import EventCode, PageFaultFlag

if TYPE_CHECKING:
    from .uffd import Userfaultfd

MSG_SIZE = 32
_HEAD = struct.Struct("<BBHI")
_PAGEFAULT = struct.Struct("<QQI4x")
_FORK = struct.Struct("<I20x")
_REMAP = struct.Struct("<QQQ")
_REMOVE = struct.Struct("<QQ8x")


@dataclass(frozen=True)
class PageFault:
    """A fault at ``address`` (page-aligned unless EXACT_ADDRESS was requested)."""

    address: int
    flags: PageFaultFlag
    thread_id: int  # the faulting TID with Feature.THREAD_ID, else 0

    @property
    def write(self) -> bool:
        return bool(self.flags & PageFaultFlag.WRITE)

    @property
    def wp(self) -> bool:
        return bool(self.flags & PageFaultFlag.WP)

    @property
    def minor(self) -> bool:
        return bool(self.flags & PageFaultFlag.MINOR)


@dataclass(frozen=True)
class Fork:
    """The monitored process forked; ``uffd`` serves the child (a new fd in this process)."""

    uffd: Userfaultfd


@dataclass(frozen=True)
class Remap:
    """mremap() moved ``length`` bytes from ``old`` to ``new``; the new range stays registered."""

    old: int
    new: int
    length: int


@dataclass(frozen=True)
class Remove:
    """MADV_DONTNEED/MADV_REMOVE dropped ``[start, end)``; it stays registered."""

    start: int
    end: int


@dataclass(frozen=True)
class Unmap:
    """``[start, end)`` was unmapped; no more faults come from it."""

    start: int
    end: int


Event = PageFault | Fork | Remap | Remove | Unmap


def decode(data: bytes, adopt: type[Userfaultfd]) -> list[Event]:
    """Decode whole 32-byte messages. An unknown event code raises ProtocolError, carrying the
    events decoded before it (none is dropped silently)."""
    events: list[Event] = []
    for pos in range(0, len(data) - len(data) % MSG_SIZE, MSG_SIZE):
        code = data[pos]
        body = pos + 8
        if code == EventCode.PAGEFAULT:
            flags, address, tid = _PAGEFAULT.unpack_from(data, body)
            events.append(PageFault(address, PageFaultFlag(flags), tid))
        elif code == EventCode.FORK:
            (fd,) = _FORK.unpack_from(data, body)
            events.append(Fork(adopt.from_fd(fd)))
        elif code == EventCode.REMAP:
            events.append(Remap(*_REMAP.unpack_from(data, body)))
        elif code == EventCode.REMOVE:
            events.append(Remove(*_REMOVE.unpack_from(data, body)))
        elif code == EventCode.UNMAP:
            events.append(Unmap(*_REMOVE.unpack_from(data, body)))
        else:
            raise ProtocolError(f"unknown userfaultfd event code {code:#x}", list(events))
    return events
