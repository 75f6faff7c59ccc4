"""What PageServer and PythonSourceServer share about the regions they own: registering a new
mapping, closing in a forked child, and closing under live views."""

from __future__ import annotations

import contextlib
import mmap
import os
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

from . import _core
from .errors import DetachWarning
from .flags import RegisterMode
from .uffd import Userfaultfd


def _nothing() -> None:
    pass


@contextlib.contextmanager
def registering(
    uffd: Userfaultfd,
    region: _core.Mapping,
    mode: RegisterMode,
    on_failure: Callable[[], None] = _nothing,
    inherit: bool = False,
) -> Iterator[None]:
    """Registers ``region`` with ``uffd``; the block hands it to whoever serves it. If anything
    here or in the block fails, the region is unmapped and ``on_failure`` runs. ``inherit``:
    forked children keep the region (the uffd has EVENT_FORK and their faults are served)."""
    try:
        # Unserved in a forked child, the region would read zeros where pages are still
        # missing, and with shared memory zero pages it allocates would be what this
        # process reads too. Such children do not inherit regions (touching one is SIGSEGV).
        if not inherit:
            _core.madvise(region.address, region.length, mmap.MADV_DONTFORK)
        uffd.register(region.address, region.length, mode)
        yield
    except BaseException:
        _core.Mapping.close(region)  # the plain unmap, not a subclass's close
        on_failure()
        raise


def in_forked_child(owner_pid: int, regions: Iterable[_core.Mapping]) -> bool:
    """True in a forked child of the process that owns ``regions``. The regions were not
    inherited (MADV_DONTFORK): they are detached here, with nothing to unmap, and the caller
    closes only this process's copies of its fds, leaving the parent's threads alone."""
    if os.getpid() == owner_pid:
        return False
    for region in regions:
        region._rebase(0)
    return True


M = TypeVar("M", bound=_core.Mapping)


def exported(regions: Iterable[M], detach: str, cannot: str = "") -> list[M]:
    """The regions a closing server must detach: still exported (numpy arrays, memoryviews),
    they cannot be unmapped under their views. BufferError, before anything is closed, if
    ``detach`` is "error" or ``cannot`` says why they cannot be detached."""
    if detach not in ("populate", "error"):
        raise ValueError(f"detach {detach!r} is not 'populate' or 'error'")
    found = [r for r in regions if r.exports]
    if found and (detach == "error" or cannot):
        why = (
            f"{cannot}: release them first"
            if cannot
            else "release them first (detach='error'), or close(detach='populate') to install "
            "their pages and detach them"
        )
        raise BufferError(
            f"cannot close: {len(found)} region(s) still exported, first {found[0]!r} "
            f"({found[0].exports} buffer(s)); {why}"
        )
    return found


def warn_detaching(region: _core.Mapping, how: str, stacklevel: int) -> None:
    """A DetachWarning, shown by default: installing a large sparse region costs time and
    memory the program may not expect."""
    warnings.warn(
        f"{region!r} is still exported ({region.exports} buffer(s)) as its server closes: "
        f"detaching it after {how}. Release the views (numpy arrays, memoryviews) before "
        "closing, or close(detach='error') to be told instead",
        DetachWarning,
        stacklevel=stacklevel + 1,
    )
