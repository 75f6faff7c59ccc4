"""userfaultfd: user-space page-fault handling on Linux.

Low level: :class:`Userfaultfd`, one method per ioctl. High level: :class:`PageServer`, which
serves regions from native sources in GIL-free threads or in the faulting thread (SIGBUS mode).
Out of process: :mod:`userfaultfd.handoff` (Firecracker's protocol) and
:class:`PythonSourceServer`."""

from typing import TYPE_CHECKING

from .errors import (
    DetachWarning,
    FeatureUnavailableError,
    PartialError,
    ProtocolError,
    SourceError,
)
from .events import Event, Fork, PageFault, Remap, Remove, Unmap
from .flags import EventCode, Feature, Ioctl, PageFaultFlag, RegisterMode
from .uffd import PAGE_SIZE, Userfaultfd, available_features

__all__ = [
    "PAGE_SIZE",
    "DetachWarning",
    "Event",
    "EventCode",
    "Feature",
    "FeatureUnavailableError",
    "Fork",
    "Ioctl",
    "PageFault",
    "PageFaultFlag",
    "PartialError",
    "ProtocolError",
    "RegisterMode",
    "Remap",
    "Remove",
    "SourceError",
    "Unmap",
    "Userfaultfd",
    "available_features",
]
__version__ = "0.1.0"

from . import sources  # noqa: E402
from .page_server import PageServer, Region  # noqa: E402
from .sources import Buffer, File, Fill, Memfd, Zero  # noqa: E402
from .stats import Stats  # noqa: E402
from .working_set import WorkingSet, WorkingSetError  # noqa: E402

__all__ += ["Buffer", "File", "Fill", "Memfd", "PageServer", "Region", "Stats", "Zero", "sources"]
__all__ += ["WorkingSet", "WorkingSetError"]
from .handoff import GuestRegion, HandoffError, receive_uffd, send_uffd  # noqa: E402
from .remote import PageSource, PythonSourceServer, RemoteRegion  # noqa: E402

__all__ += [
    "GuestRegion",
    "HandoffError",
    "PageSource",
    "PythonSourceServer",
    "RemoteRegion",
    "receive_uffd",
    "send_uffd",
]
from .tracking import Snapshot, WriteTracker, read_snapshot, snapshot, track_writes  # noqa: E402

__all__ += ["Snapshot", "WriteTracker", "read_snapshot", "snapshot", "track_writes"]

if TYPE_CHECKING:
    from .store import SnapshotStore as SnapshotStore


def __getattr__(name: str) -> object:
    # The store needs the [store] extra (blake3, zstandard, obstore): imported on first use.
    if name == "SnapshotStore":
        from .store import SnapshotStore

        return SnapshotStore
    raise AttributeError(f"module 'userfaultfd' has no attribute {name!r}")
