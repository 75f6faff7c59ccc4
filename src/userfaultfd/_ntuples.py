"""The shapes of results, named in one place (as psutil's _ntuples.py): what the engine returns
and what the library hands to the application."""

from __future__ import annotations

from typing import NamedTuple


class Failure(NamedTuple):
    """A page the engine could not produce and poisoned (PageServer.errors())."""

    errno: int
    region: int  # the region's id, or -1 for an address in no region
    address: int
    offset: int  # in the region's source
    op: str  # what failed, e.g. "pread"


class SourceFailure(NamedTuple):
    """One entry of SourceError.failures."""

    errno: int
    address: int
    offset: int
    operation: str


class EngineInfo(NamedTuple):
    """The engine's client state and the non-cooperative events it has handled."""

    client_gone: bool  # the process whose uffd this is has exited
    remove: int
    unmap: int
    remap: int
    unknown: int
    fork: int  # FORK events: the child's uffd was closed, nobody serves children


class Piece(NamedTuple):
    """Where part of a region is mapped now (it may have moved with mremap)."""

    start: int
    end: int
    offset: int  # in the region
