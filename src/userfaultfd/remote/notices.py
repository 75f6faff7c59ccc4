"""The notice board: where the handler process writes what failed before it poisons a page.

A thread of the application that touches a poisoned page dies of the SIGBUS before the
application reads any report. The application's SIGBUS handler (native, _native/notice.c) finds
the page's notice on the board, shared memory, and writes it as the process's last line."""

from __future__ import annotations

import mmap
import os
import struct

from userfaultfd import _core

# A slot (_native/notice.h): seq (2n + 1 while notice n is written, 2n + 2 after), start, end,
# NUL-terminated text.
SLOT = struct.Struct(f"<QQQ{_core.NOTICE_TEXT}s")
SIZE = SLOT.size * _core.NOTICE_BOARD_SLOTS


class Board:
    """The application's side: a memfd the handler process maps too, read by our SIGBUS
    handler. ``fd`` is for the handler process; close it once the handler has it."""

    def __init__(self) -> None:
        self._memfd, self._memory = _retired.pop() if _retired else _new_board()
        self._memory[:] = bytes(SIZE)  # a previous server's notices would name its regions
        self.fd = os.dup(self._memfd)
        # False past 64 boards at once: those servers' notices go unsaid, they still serve.
        _core.notice_board(self._memory.address)
        self._closed = False

    def close(self) -> None:
        """The board is no longer read, but it stays mapped for the life of the process: a
        thread dying of a SIGBUS may be reading it in the signal handler right now, and reading
        unmapped memory there would fault inside the handler. The next Board reuses it."""
        if not self._closed:
            self._closed = True
            _core.notice_board_remove(self._memory.address)
            _retired.append((self._memfd, self._memory))


def _new_board() -> tuple[int, _core.Mapping]:
    fd = os.memfd_create("userfaultfd-notices", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, SIZE)
        return fd, _core.Mapping(SIZE, mmap.MAP_SHARED, fd)
    except BaseException:
        os.close(fd)
        raise


# Boards no server uses any more (memfd, mapping), never unmapped (see Board.close).
_retired: list[tuple[int, _core.Mapping]] = []


class Writer:
    """The handler process's side."""

    def __init__(self, fd: int) -> None:
        self._board = mmap.mmap(fd, SIZE)
        self._count = 0

    def write(self, start: int, length: int, text: str) -> None:
        n, self._count = self._count, self._count + 1
        at = n % _core.NOTICE_BOARD_SLOTS * SLOT.size
        data = text.encode(errors="replace")[: _core.NOTICE_TEXT - 1]
        struct.pack_into("<Q", self._board, at, 2 * n + 1)  # odd: being written
        SLOT.pack_into(self._board, at, 2 * n + 1, start, start + length, data)
        struct.pack_into("<Q", self._board, at, 2 * n + 2)
