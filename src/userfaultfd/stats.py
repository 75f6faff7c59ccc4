"""Counters kept by the engine, and percentiles from its latency histogram."""

from __future__ import annotations

import array
from dataclasses import dataclass, field, fields
from typing import Any


def bucket_floor(b: int) -> int:
    """Smallest latency in ns of histogram bucket b (4 sub-buckets per power of two)."""
    if b < 8:
        return b
    return (4 + b % 4) << (b // 4 - 2)


def percentile(hist: list[int], q: float) -> int:
    """The latency in ns below which a fraction q of the resolved faults fell (bucket floor)."""
    total = sum(hist)
    if not total:
        return 0
    rank = q * total
    seen = 0
    for b, n in enumerate(hist):
        seen += n
        if seen >= rank:
            return bucket_floor(b)
    return bucket_floor(len(hist) - 1)


@dataclass(frozen=True)
class Stats:
    """What a region (or a whole server) has served. Latencies are measured from reading a fault
    (thread mode) or entering the SIGBUS handler to the page being installed."""

    faults_missing: int
    faults_minor: int
    faults_wp: int
    pages_installed: int
    bytes_installed: int
    zero_pages: int
    eexist: int
    poisoned: int
    errors: int
    removes: int
    prefetched: int  # installed by a replay or populate (prefetch, a stop's drain), not a fault
    histogram: tuple[int, ...] = field(repr=False)  # 250 buckets: the percentiles say it

    @property
    def faults(self) -> int:
        return self.faults_missing + self.faults_minor + self.faults_wp

    @property
    def latency_p50_ns(self) -> int:
        return percentile(list(self.histogram), 0.50)

    @property
    def latency_p99_ns(self) -> int:
        return percentile(list(self.histogram), 0.99)

    @classmethod
    def from_engine(cls, raw: tuple[Any, ...]) -> Stats:
        counts: list[int] = [int(c) for c in raw[:-1]]
        buckets = array.array("Q")
        buckets.frombytes(raw[-1])
        return cls(*counts, histogram=tuple(buckets))  # type: ignore[misc, arg-type]

    def __repr__(self) -> str:
        counts = ", ".join(f"{f.name}={getattr(self, f.name)}" for f in fields(self) if f.repr)
        return (
            f"Stats({counts}, latency_p50_ns={self.latency_p50_ns}, "
            f"latency_p99_ns={self.latency_p99_ns})"
        )

    def __str__(self) -> str:
        return (
            f"faults {self.faults} (missing {self.faults_missing}, minor {self.faults_minor}, "
            f"wp {self.faults_wp}), installed {self.pages_installed} pages / "
            f"{self.bytes_installed} bytes, races {self.eexist}, poisoned {self.poisoned}, "
            f"errors {self.errors}, latency p50 {self.latency_p50_ns / 1000:.1f} us "
            f"p99 {self.latency_p99_ns / 1000:.1f} us"
        )
