"""Prometheus metrics of ``userfaultfd serve`` (``--metrics HOST:PORT``).

The serving process reports each client's engine counters to the supervisor every
STATS_INTERVAL; the supervisor serves them over HTTP. Counters keep growing across a restart of
the serving process: what a dead one had reported is carried over (what it served after its last
report, at most STATS_INTERVAL's worth, is not counted). A departed client's counts stay in the
server totals."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

from userfaultfd.stats import bucket_floor

FIELDS = ("faults_missing", "faults_minor", "faults_wp", "pages_installed", "bytes_installed",
          "zero_pages", "eexist", "poisoned", "errors", "removes", "prefetched")  # fmt: skip
# Fault-latency buckets, in seconds: 1 us to 1 s.
BOUNDS = (1e-6, 2e-6, 5e-6, 1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 0.1, 1.0)
COUNTERS = {  # metric name (without _total) -> (help, the counter(s) it sums)
    "faults": ("page faults served", ("faults_missing", "faults_minor", "faults_wp")),
    "pages_installed": ("base pages installed (faults, readahead and prefetch)",
                        ("pages_installed",)),
    "bytes_installed": ("bytes installed", ("bytes_installed",)),
    "prefetched_pages": ("base pages installed by prefetch and stop drains", ("prefetched",)),
    "races": ("installs that found the page already there (EEXIST)", ("eexist",)),
    "errors": ("pages that could not be produced", ("errors",)),
    "poisoned_pages": ("pages poisoned (the toucher gets SIGBUS)", ("poisoned",)),
    "remove_events": ("REMOVE events (balloon inflation, MADV_DONTNEED)", ("removes",)),
}  # fmt: skip


class Totals:
    """One client's counters and latency histogram (engine buckets)."""

    def __init__(self) -> None:
        self.counts = dict.fromkeys(FIELDS, 0)
        self.histogram = [0] * 256

    def add(self, other: Totals) -> None:
        for k, v in other.counts.items():
            self.counts[k] += v
        self.histogram = [a + b for a, b in zip(self.histogram, other.histogram, strict=True)]

    @classmethod
    def from_report(cls, report: dict[str, Any]) -> Totals:
        t = cls()
        t.counts.update({k: int(report["stats"][k]) for k in FIELDS})
        t.histogram = list(report["histogram"])
        return t


class Metrics:
    """What the supervisor knows of the counters; thread-safe (HTTP scrapes run in a thread)."""

    def __init__(self, clients: Callable[[], int]) -> None:
        self._clients = clients
        self._lock = threading.Lock()
        self._carried: dict[int, Totals] = {}  # from serving processes that have ended
        self._latest: dict[int, Totals] = {}  # the current serving process's last report
        self._labels: dict[int, tuple[str, str]] = {}  # client -> (pid, uid)
        self._departed = Totals()
        self._gone: set[int] = set()  # a report sent before a client left must not revive it

    def update(self, report: dict[str, dict[str, Any]]) -> None:
        with self._lock:
            for number, entry in report.items():
                n = int(number)
                if n not in self._gone:
                    self._labels[n] = (str(entry["pid"]), str(entry["uid"]))
                    self._latest[n] = Totals.from_report(entry)

    def worker_ended(self) -> None:
        with self._lock:
            for n, t in self._latest.items():
                self._carried.setdefault(n, Totals()).add(t)
            self._latest = {}

    def client_ended(self, number: int) -> None:
        with self._lock:
            self._gone.add(number)
            for part in (self._carried, self._latest):
                t = part.pop(number, None)
                if t is not None:
                    self._departed.add(t)
            self._labels.pop(number, None)

    def _per_client(self) -> dict[int, Totals]:
        out: dict[int, Totals] = {}
        for part in (self._carried, self._latest):
            for n, t in part.items():
                out.setdefault(n, Totals()).add(t)
        return out

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        with self._lock:
            clients = self._per_client()
            server = Totals()
            server.add(self._departed)
            for t in clients.values():
                server.add(t)
            labels = dict(self._labels)
        yield GaugeMetricFamily("userfaultfd_clients", "clients attached", value=self._clients())
        names = ["client", "pid", "uid"]
        for name, (text, fields) in COUNTERS.items():
            total = CounterMetricFamily(f"userfaultfd_{name}", f"{text}, all clients")
            total.add_metric([], sum(server.counts[f] for f in fields))
            yield total
            per = CounterMetricFamily(
                f"userfaultfd_client_{name}", f"{text}, per client", labels=names
            )
            for n, t in sorted(clients.items()):
                per.add_metric([str(n), *labels.get(n, ("", ""))], sum(t.counts[f] for f in fields))
            yield per
        hist = HistogramMetricFamily(
            "userfaultfd_fault_latency_seconds", "from reading a fault to its page installed"
        )
        hist.add_metric([], *_buckets(server.histogram))
        yield hist
        per_hist = HistogramMetricFamily(
            "userfaultfd_client_fault_latency_seconds", "fault latency, per client", labels=names
        )
        for n, t in sorted(clients.items()):
            per_hist.add_metric([str(n), *labels.get(n, ("", ""))], *_buckets(t.histogram))
        yield per_hist

    def serve(self, address: str) -> Any:
        """Serves the metrics over HTTP at HOST:PORT (in a thread); returns the server."""
        try:
            from prometheus_client import CollectorRegistry, start_http_server
        except ImportError:
            raise ValueError(
                "--metrics needs the prometheus-client package (pip install prometheus-client)"
            ) from None
        host, sep, port = address.rpartition(":")
        if not sep or not port.isdigit() or int(port) > 65535:
            raise ValueError(f"metrics address {address!r} is not HOST:PORT")
        registry = CollectorRegistry(auto_describe=False)
        registry.register(self)
        server, _ = start_http_server(
            int(port), addr=host.strip("[]") or "0.0.0.0", registry=registry
        )
        return server


def _buckets(histogram: list[int]) -> tuple[list[tuple[str, float]], float]:
    """Prometheus cumulative buckets and the sum (by bucket floors) from engine buckets."""
    cumulative = [0] * len(BOUNDS)
    total = 0.0
    for b, n in enumerate(histogram):
        if not n:
            continue
        upper = bucket_floor(b + 1) * 1e-9
        total += n * bucket_floor(b) * 1e-9
        for k, bound in enumerate(BOUNDS):
            if upper <= bound:
                cumulative[k] += n
    buckets = [(repr(bound), float(c)) for bound, c in zip(BOUNDS, cumulative, strict=True)]
    buckets.append(("+Inf", float(sum(histogram))))
    return buckets, total
