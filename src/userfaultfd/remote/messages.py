"""The control messages between a PythonSourceServer (the application) and its handler process,
defined once for both sides: one JSON object per SOCK_SEQPACKET message, named by its "kind".
The region hand-off itself travels in Firecracker's format (handoff.py): it carries the uffd."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Unmap:
    """Application -> handler: stop serving the region at ``base`` (it is being unmapped)."""

    base: int


@dataclass(frozen=True)
class Readahead:
    """Application -> handler: ask the source for ``nbytes`` per fault in the region at
    ``base``; ``adaptive``: start there and grow on sequential faults."""

    base: int
    nbytes: int
    adaptive: bool = False


@dataclass(frozen=True)
class Populate:
    """Application -> handler: install (or, where the source fails, poison) every page of
    ``length`` bytes at region offset ``offset`` of the region at ``base``; Ok when done."""

    base: int
    offset: int
    length: int


@dataclass(frozen=True)
class Cancel:
    """Application -> handler: stop the Populate in progress (Ctrl-C); its Ok comes at once
    after the chunk being produced. Never answered itself: one that comes after the populate
    ended is ignored."""


@dataclass(frozen=True)
class Record:
    """Application -> handler: record the first touches of the region at ``base`` from now."""

    base: int


@dataclass(frozen=True)
class WorkingSetRequest:
    """Application -> handler: end the recording of the region at ``base`` and write it as a
    working-set file at ``path`` (a set can outgrow a message)."""

    base: int
    path: str


@dataclass(frozen=True)
class StatsRequest:
    """Application -> handler: answer with Counts, of the region at ``base`` (0: of all)."""

    base: int = 0


@dataclass(frozen=True)
class Ready:
    """Handler -> application: the source is open."""


@dataclass(frozen=True)
class Ok:
    """Handler -> application: the request (or region hand-off) is done."""


@dataclass(frozen=True)
class Counts:
    """Handler -> application: faults served, pages installed, source errors, and error reports
    dropped because the application read none of them for a while."""

    faults: int
    pages: int
    errors: int
    reports_dropped: int = 0


@dataclass(frozen=True)
class ErrorReport:
    """Handler -> application, unasked: pages at ``address`` (source ``offset``) could not be
    produced and were poisoned; or, with address 0, the source could not be opened."""

    message: str
    address: int = 0
    offset: int = 0
    traceback: str = ""


Message = (
    Unmap
    | Readahead
    | Populate
    | Cancel
    | Record
    | WorkingSetRequest
    | StatsRequest
    | Ready
    | Ok
    | Counts
    | ErrorReport
)
_KINDS: dict[str, type[Message]] = {
    kind.__name__: kind
    for kind in (
        Unmap, Readahead, Populate, Cancel, Record, WorkingSetRequest, StatsRequest, Ready, Ok,
        Counts,
        ErrorReport,
    )
}  # fmt: skip


def encode(msg: Message) -> bytes:
    return json.dumps({"kind": type(msg).__name__, **asdict(msg)}).encode()


def decode(data: bytes) -> Message:
    """The message in ``data``; ValueError names a message that is none of ours."""
    obj = json.loads(data)
    kind = _KINDS.get(obj.pop("kind", None)) if isinstance(obj, dict) else None
    if kind is None:
        raise ValueError(f"not a control message: {data[:80]!r}")
    return kind(**obj)
