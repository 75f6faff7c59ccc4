"""Handing a uffd to another process: Firecracker's page-fault-handler protocol.

One message on a UNIX socket: the payload is a JSON array of objects
``{"base_host_virt_addr", "size", "offset", "page_size", "page_size_kib"}`` (both page sizes in
bytes; ``offset`` is where the region starts in the memory file), carrying exactly one fd, the
uffd (SCM_RIGHTS). The sender keeps the socket open while it wants its memory served."""

from __future__ import annotations

import array
import json
import os
import re
import select
import socket
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from .uffd import PAGE_SIZE

MAX_MESSAGE = 64 * 1024
MAX_DEPTH = 8  # a region list is 2 deep
MAX_DIGITS = 20  # 2**64 has 20 digits
FIELDS = ("base_host_virt_addr", "size", "offset", "page_size", "page_size_kib")


class HandoffError(ValueError):
    """A hand-off message that cannot be accepted; the message names what is wrong."""


@dataclass(frozen=True)
class GuestRegion:
    """One guest memory region: ``size`` bytes at ``base_host_virt_addr`` in the sender's
    address space, backed by the memory file from ``offset``, faulted in ``page_size`` units."""

    base_host_virt_addr: int
    size: int
    offset: int
    page_size: int

    def to_json(self) -> dict[str, int]:
        return {
            "base_host_virt_addr": self.base_host_virt_addr,
            "size": self.size,
            "offset": self.offset,
            "page_size": self.page_size,
            "page_size_kib": self.page_size,  # Firecracker sends bytes here too
        }

    @property
    def end(self) -> int:
        return self.base_host_virt_addr + self.size


def send_uffd(sock: socket.socket, uffd_fd: int, regions: Iterable[GuestRegion]) -> None:
    """Send the uffd and its regions in one message, as Firecracker does. TypeError for a
    wrong type; HandoffError for regions the receiving side would refuse (the same checks)."""
    if not isinstance(sock, socket.socket):
        raise TypeError(f"send_uffd: sock {sock!r:.80} is not a socket.socket")
    regions = list(regions)
    for r in regions:
        if not isinstance(r, GuestRegion):
            raise TypeError(f"send_uffd: region {r!r:.80} is not a GuestRegion")
    payload = json.dumps([r.to_json() for r in regions]).encode()
    if len(payload) > MAX_MESSAGE:
        raise HandoffError(f"the region list is {len(payload)} bytes, over {MAX_MESSAGE}")
    parse_regions(payload)  # refused here, naming the region, rather than by the receiver
    socket.send_fds(sock, [payload], [uffd_fd])


_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"?', re.DOTALL)
_NOT_BRACKET = bytes(set(range(256)) - set(b"[]{}"))


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_DIGITS:
        raise HandoffError(f"the payload has a number of {len(text)} digits: {text[:24]}...")
    return int(text)


def _loads(payload: bytes) -> Any:
    """json.loads within bounds checked first: nesting deeper than MAX_DEPTH and integers longer
    than MAX_DIGITS are HandoffError (the parser would raise RecursionError, or ValueError past
    Python's 4300-digit limit, neither of them a JSON error)."""
    depth = deepest = 0
    for bracket in _STRING.sub(b"", payload).translate(None, _NOT_BRACKET):
        depth += 1 if bracket in b"[{" else -1
        deepest = max(deepest, depth)
    if deepest > MAX_DEPTH:
        raise HandoffError(f"the payload nests deeper than {MAX_DEPTH} levels")
    return json.loads(payload, parse_int=_bounded_int)


def parse_regions(payload: bytes, memory_size: int | None = None) -> list[GuestRegion]:
    """Validate a hand-off payload. ``memory_size``: the memory file's size, which every region
    must lie within."""
    try:
        items = _loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise HandoffError(f"the payload is not JSON: {e}") from None
    if not isinstance(items, list) or not items:
        raise HandoffError(f"the payload is not a non-empty JSON array: {payload[:80]!r}")
    regions = [_region(k, item, memory_size) for k, item in enumerate(items)]
    ordered = sorted(regions, key=lambda r: r.base_host_virt_addr)
    for a, b in zip(ordered, ordered[1:], strict=False):
        if b.base_host_virt_addr < a.end:
            raise HandoffError(
                f"regions at {a.base_host_virt_addr:#x} and {b.base_host_virt_addr:#x} overlap"
            )
    return regions


def _region(k: int, item: Any, memory_size: int | None) -> GuestRegion:
    if not isinstance(item, dict):
        raise HandoffError(f"region {k} is not an object: {item!r}")
    missing = [f for f in FIELDS[:4] if f not in item]
    if missing:
        raise HandoffError(f"region {k} lacks {', '.join(missing)}")
    for field in FIELDS:
        value = item.get(field, 0)
        if type(value) is not int or value < 0:
            raise HandoffError(f"region {k}: {field} {value!r} is not a non-negative integer")
    base, size, offset, page = (item[f] for f in FIELDS[:4])
    if page < PAGE_SIZE or page % PAGE_SIZE or page & (page - 1):
        raise HandoffError(
            f"region {k}: page_size {page} is not a power-of-two multiple of {PAGE_SIZE}"
        )
    if not size or size % page or base % page or offset % PAGE_SIZE:
        raise HandoffError(
            f"region {k}: base {base:#x}, size {size:#x} and offset {offset:#x} are not aligned "
            f"to its page size {page:#x} (and the offset to {PAGE_SIZE:#x}), or size is 0"
        )
    if base + size > 1 << 47:
        raise HandoffError(f"region {k}: {base:#x}+{size:#x} is outside the user address space")
    if memory_size is not None and offset + size > memory_size:
        raise HandoffError(
            f"region {k}: offset {offset:#x} + size {size:#x} lies outside the memory file "
            f"({memory_size:#x} bytes)"
        )
    return GuestRegion(base, size, offset, page)


_PARTIAL_NUMBER = re.compile(r"-?\d*(\.\d*)?([eE][+-]?\d*)?")


def _complete(payload: bytes) -> bool:
    """False while payload could be the start of a JSON value still arriving: it parses, or
    fails somewhere a cut could not explain (a malformed message is complete, and refused)."""
    try:
        _loads(payload)
    except HandoffError:
        return True  # out of bounds already: refused whatever follows
    except UnicodeDecodeError as e:
        return e.reason != "unexpected end of data"  # cut inside a multi-byte character
    except json.JSONDecodeError as e:
        tail = e.doc[e.pos :].strip()  # from where parsing failed: a token cut short?
        cut = (
            e.msg.startswith("Unterminated string")
            or (e.msg.startswith("Invalid \\uXXXX escape") and e.pos + 6 > len(e.doc))
            or any(word.startswith(tail) for word in ("true", "false", "null"))
            or _PARTIAL_NUMBER.fullmatch(tail) is not None
        )
        return not cut
    return True


class HandoffReader:
    """Assembles one message and the fds it carries from a socket as its pieces arrive: on a
    stream socket a long JSON payload may come in several reads."""

    def __init__(self) -> None:
        self.data = b""
        self.fds: list[int] = []

    def feed(self, sock: socket.socket) -> bool:
        """Reads what has arrived; True once the message is complete (a datagram, a complete
        JSON value, or whatever came before EOF). EOF before anything raises ConnectionError; a
        message that is too long or carries too many fds raises HandoffError, its fds closed.
        On a non-blocking socket with nothing to read, returns False."""
        fds = array.array("i")
        try:
            msg, ancdata, flags, _ = sock.recvmsg(
                MAX_MESSAGE + 1 - len(self.data), socket.CMSG_SPACE(16 * fds.itemsize)
            )
        except BlockingIOError:
            return False
        for level, kind, data in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
        self.fds += fds
        if not msg and not fds and not self.data:
            raise ConnectionError("the peer closed the connection")
        self.data += msg
        if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC) or len(self.data) > MAX_MESSAGE:
            self.close()
            raise HandoffError(f"the message is over {MAX_MESSAGE} bytes or carries over 16 fds")
        return sock.type != socket.SOCK_STREAM or not msg or _complete(self.data)

    def close(self) -> None:
        """Closes the fds received and not taken."""
        for fd in self.fds:
            os.close(fd)
        self.fds = []


def recv_with_fds(sock: socket.socket) -> tuple[bytes, list[int]]:
    """One message and the fds it carries, waiting up to a second for the rest of a payload
    that arrives in pieces. Errors as for :meth:`HandoffReader.feed`."""
    reader = HandoffReader()
    deadline = time.monotonic() + 1.0
    while not reader.feed(sock):
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([sock], [], [], left)[0]:
            break
    return reader.data, reader.fds


def accept_handoff(
    msg: bytes, fds: list[int], memory_size: int | None = None
) -> tuple[int, list[GuestRegion]]:
    """Check a received hand-off: exactly one fd, a uffd, and valid regions. On error every fd
    is closed and HandoffError names the problem."""
    try:
        if len(fds) != 1:
            raise HandoffError(f"the message carries {len(fds)} fds, not exactly one (the uffd)")
        target = os.readlink(f"/proc/self/fd/{fds[0]}")
        if target != "anon_inode:[userfaultfd]":
            raise HandoffError(f"the fd sent is not a userfaultfd (it is {target})")
        return fds[0], parse_regions(msg, memory_size)
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise


def receive_uffd(
    sock: socket.socket, memory_size: int | None = None
) -> tuple[int, list[GuestRegion]]:
    """Receive one hand-off message: (uffd fd, regions). HandoffError names what is wrong (every
    fd received is then closed); EOF raises ConnectionError."""
    msg, fds = recv_with_fds(sock)
    return accept_handoff(msg, fds, memory_size)
