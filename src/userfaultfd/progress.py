"""Long installs in short slices: Ctrl-C is seen within a slice's time, progress can be shown.

A native populate call runs with the GIL released and does not return for a signal: a Python
signal handler (KeyboardInterrupt) runs only once it has returned. Calling it on slices sized to
take about SLICE_S each bounds that delay, and what the finished slices installed stays."""

from __future__ import annotations

import importlib
import sys
import time
from collections.abc import Callable
from typing import Any

SLICE_S = 0.02
FIRST_SLICE, MAX_SLICE = 16 << 20, 1 << 30
MIB = 1 << 20


class _Line:
    """The plain progress report when tqdm is absent: one stderr line, redrawn in place on a
    terminal, otherwise written anew at most every few seconds."""

    def __init__(self, total: int) -> None:
        self.total, self.done = total, 0
        self.tty = sys.stderr.isatty()
        self.last = time.monotonic()

    def update(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if now - self.last >= (0.25 if self.tty else 5.0):
            self.last = now
            self._write("\r" if self.tty else "\n")

    def close(self) -> None:
        self._write("\n")

    def _write(self, end: str) -> None:
        percent = 100 * self.done // self.total if self.total else 100
        text = f"populate: {self.done // MIB} of {self.total // MIB} MiB ({percent}%)"
        sys.stderr.write(("\r" if self.tty else "") + text + ("" if end == "\r" else end))
        sys.stderr.flush()


def _bar(total: int) -> Any:
    try:
        tqdm = importlib.import_module("tqdm")  # optional: pip install 'userfaultfd[progress]'
    except ImportError:
        return _Line(total)
    return tqdm.tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="populate")


def populate_in_slices(
    populate: Callable[[int, int], None], offset: int, length: int, unit: int, progress: bool
) -> None:
    """populate(offset, length) as calls on consecutive slices (multiples of unit) of about
    SLICE_S each; with progress, a tqdm bar (or a plain stderr line) follows them."""
    bar = _bar(length) if progress else None
    pos, end, step = offset, offset + length, FIRST_SLICE
    try:
        while pos < end:
            n = min(step, end - pos)
            started = time.monotonic()
            populate(pos, n)
            pos += n
            if bar is not None:
                bar.update(n)
            took = time.monotonic() - started
            grow = 4.0 if took <= SLICE_S / 4 else SLICE_S / took  # at most 4x per slice
            step = max(unit, min(MAX_SLICE, int(step * grow)) // unit * unit)
    finally:
        if bar is not None:
            bar.close()
