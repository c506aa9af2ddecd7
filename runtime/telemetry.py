"""What the proxy counts per request and per connection, in counters bound ahead of time.

The filters talk to a `Recorder` (a protocol); the proxy passes one in `ChainDeps`.
Everything here is plain Python integers bound once (per route, per destination
service, per listener), so a request pays a dict lookup on a short tuple, a few integer
adds and one bisect; never an OpenTelemetry call, which costs ~6.5 µs each
(docs/design/issue7-interfaces.md). runtime/otel_metrics.py turns these aggregates into
OpenTelemetry metric data when /metrics is scraped or an OTLP export runs.

    starmesh_requests_total{direction, source_service, destination_service,
                            destination_version, response_code, reason}   request / bind
    starmesh_request_duration_seconds{...the same labels...}             (a histogram)
    starmesh_retries_total{destination_service}                           count("retries", s)
    starmesh_timeouts_total{destination_service}                          count("timeouts", s)
    starmesh_circuit_breaker_overflows_total{destination_service}         count("circuit_breaker_overflows", s)
    starmesh_outlier_ejections_total{destination_service}                 count("outlier_ejections", s)
    starmesh_rate_limited_total{destination_service}                      count("rate_limited", s)
    starmesh_mirror_requests_total{destination_service, result}           count("mirror_sent" | "mirror_dropped", s)
    starmesh_authorization_audit_denials_total{destination_service, source_service}   audit_denied
    starmesh_active_connections{listener}                                 connections(listener)

Labels are bounded by the config (services, versions, status codes, reason words):
never a path, a query or a header value.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from typing import Literal, Protocol

__all__ = [
    "DURATION_BUCKETS",
    "LABELS",
    "Count",
    "Listener",
    "MemoryRecorder",
    "Recorder",
    "RouteRecord",
    "SeriesKey",
    "ServiceCounter",
]

DURATION_BUCKETS: tuple[float, ...] = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
"""Upper bounds (seconds) of the duration histogram's buckets; +Inf is implied."""

_bisect_left = bisect.bisect_left

RouteRecord = Callable[[str, int, str, float], None]
"""`record(version, status, reason, seconds)`: `Recorder.request` with the first three labels fixed."""

SeriesKey = tuple[str, str, str, str, int, str]
"""(direction, source_service, destination_service, destination_version, response_code, reason)."""

LABELS = ("direction", "source_service", "destination_service", "destination_version", "response_code", "reason")
"""The names of a `SeriesKey`'s labels, in order."""

ServiceCounter = Literal[
    "retries",
    "timeouts",
    "circuit_breaker_overflows",
    "outlier_ejections",
    "rate_limited",
    "mirror_sent",
    "mirror_dropped",
]
"""What a destination service's `Count`s count (each is one metric, or one `result` of one)."""

Listener = Literal["outbound", "inbound", "mesh"]
"""Whose connections a `connections` gauge counts: the app's (outbound), peers' in
plaintext (inbound), peers' over mTLS (mesh)."""


class Count:
    """One counter cell, bound once: the hot path does `count.n += 1` (a gauge also `-= 1`)."""

    __slots__ = ("n",)

    def __init__(self) -> None:
        self.n = 0


class Recorder(Protocol):
    """Where the chain reports what happened; every method is cheap enough for the hot path,
    and the binding ones (`bind`, `count`, `connections`) are meant to be called once."""

    def request(
        self,
        direction: str,
        source: str,
        destination: str,
        version: str,
        status: int,
        reason: str,
        seconds: float,
    ) -> None:
        """One request answered (its response head): `reason` is the x-starmesh-error word or ""."""

    def bind(self, direction: str, source: str, destination: str) -> RouteRecord:
        """`request` for one route's fixed labels (built once per route, called per request)."""

    def count(self, name: ServiceCounter, service: str) -> Count:
        """The counter `name` of destination `service` (the same cell for every caller)."""

    def connections(self, listener: Listener) -> Count:
        """The gauge of open connections on `listener` (the same cell for every caller)."""

    def audit_denied(self, service: str, source: str | None, method: str, path: str) -> None:
        """Audit-mode authorization of `service` would have denied this request (`would_deny`)."""


class _Series:
    """One label set's histogram: the request count is the sum of its buckets."""

    __slots__ = ("total", "buckets")

    def __init__(self) -> None:
        self.total = 0.0
        self.buckets = [0] * (len(DURATION_BUCKETS) + 1)


class MemoryRecorder:
    """Counts in dictionaries keyed by label tuples, read by runtime/otel_metrics.py.

    The readers (`series`, `counts`, `open_connections`, `denials`) copy what they read
    in one C-level step each, so an OTLP export on the SDK's thread sees whole entries
    while the event loop keeps counting."""

    __slots__ = ("_series", "_counts", "_connections", "audit_denials")

    def __init__(self) -> None:
        self._series: dict[SeriesKey, _Series] = {}
        self._counts: dict[tuple[ServiceCounter, str], Count] = {}
        self._connections: dict[Listener, Count] = {}
        self.audit_denials: dict[tuple[str, str], int] = {}

    # -- the hot path ----------------------------------------------------------------------

    def request(
        self,
        direction: str,
        source: str,
        destination: str,
        version: str,
        status: int,
        reason: str,
        seconds: float,
    ) -> None:
        key = (direction, source, destination, version, status, reason)
        try:
            series = self._series[key]
        except KeyError:
            series = self._series[key] = _Series()
        series.total += seconds
        series.buckets[_bisect_left(DURATION_BUCKETS, seconds)] += 1

    def bind(self, direction: str, source: str, destination: str) -> RouteRecord:
        """A per-route `request`: its own small map (version, status, reason) -> series,
        so a request hashes a 3-tuple instead of the six labels. Counts the same series."""
        cells: dict[tuple[str, int, str], _Series] = {}
        every = self._series

        def record(version: str, status: int, reason: str, seconds: float) -> None:
            cell = (version, status, reason)
            try:
                series = cells[cell]
            except KeyError:
                key = (direction, source, destination, version, status, reason)
                series = cells[cell] = every.setdefault(key, _Series())
            series.total += seconds
            series.buckets[_bisect_left(DURATION_BUCKETS, seconds)] += 1

        return record

    def count(self, name: ServiceCounter, service: str) -> Count:
        key = (name, service)
        cell = self._counts.get(key)
        if cell is None:
            cell = self._counts[key] = Count()
        return cell

    def connections(self, listener: Listener) -> Count:
        cell = self._connections.get(listener)
        if cell is None:
            cell = self._connections[listener] = Count()
        return cell

    def audit_denied(self, service: str, source: str | None, method: str, path: str) -> None:
        key = (service, source or "")
        self.audit_denials[key] = self.audit_denials.get(key, 0) + 1

    # -- readers -----------------------------------------------------------------------------

    def series(self) -> list[tuple[SeriesKey, float, list[int]]]:
        """Every request series: its labels, the seconds summed, the bucket counts (+Inf last)."""
        return [(key, series.total, list(series.buckets)) for key, series in list(self._series.items())]

    def counts(self) -> list[tuple[ServiceCounter, str, int]]:
        """Every bound service counter: (name, service, value); zero until it counts."""
        return [(name, service, cell.n) for (name, service), cell in list(self._counts.items())]

    def open_connections(self) -> list[tuple[Listener, int]]:
        """Open connections per listener that has had one."""
        return [(listener, cell.n) for listener, cell in list(self._connections.items())]

    def denials(self) -> list[tuple[tuple[str, str], int]]:
        """Audit-mode would-deny counts per (destination service, source service)."""
        return list(self.audit_denials.items())

    @property
    def mirror_drops(self) -> dict[str, int]:
        """Mirror copies dropped, per service that dropped any."""
        return {service: n for name, service, n in self.counts() if name == "mirror_dropped" and n}

    def requests_total(self, **labels: str | int) -> int:
        """The request count over every series whose labels include `labels`; with none, every
        request answered (what heartbeats report)."""
        total = 0
        for key, _, buckets in self.series():
            if labels:
                values = dict(zip(LABELS, key, strict=True))
                if not all(values[name] == want for name, want in labels.items()):
                    continue
            total += sum(buckets)
        return total

    def render(self) -> str:
        """Prometheus text of what this recorder counted, as the OpenTelemetry bridge renders it
        (for tests and debugging; the proxy's /metrics adds its state gauges)."""
        from starmesh.runtime.otel_metrics import recorder_text  # the SDK only when asked

        return recorder_text(self)
