"""What PageServer and PythonSourceServer share about the regions they own: registering a new
mapping, and closing in a forked child."""

from __future__ import annotations

import contextlib
import mmap
import os
from collections.abc import Callable, Iterable, Iterator

from . import _core
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
        region.rebase(0)
    return True
