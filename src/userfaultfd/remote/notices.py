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
    """The application's side: a memfd the handler process maps too, said by our SIGBUS
    handler. ``fd`` is for the handler process; close it once the handler has it."""

    def __init__(self) -> None:
        self.fd = os.memfd_create("userfaultfd-notices", os.MFD_CLOEXEC)
        try:
            os.ftruncate(self.fd, SIZE)
            self._memory = _core.Mapping(SIZE, mmap.MAP_SHARED, self.fd)
        except BaseException:
            os.close(self.fd)
            raise
        # False past 64 boards at once: those servers' notices go unsaid, they still serve.
        _core.notice_board(self._memory.address)

    def close(self) -> None:
        if not self._memory.closed:
            _core.notice_board_remove(self._memory.address)
            self._memory.close()


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
