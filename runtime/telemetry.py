"""What the telemetry filter records, and a small in-memory recorder.

The filters talk to a `Recorder` (a protocol); the proxy passes one in `ChainDeps`.
`MemoryRecorder` counts requests and a duration histogram under the labels DESIGN.md
fixes ("Metrics") and renders Prometheus text for `/metrics`. The observability issue
replaces it with OpenTelemetry; it is kept small on purpose.

    starmesh_requests_total{direction, source_service, destination_service,
                            destination_version, response_code, reason}
    starmesh_request_duration_seconds_bucket{...same labels..., le}
    starmesh_mirror_dropped_total{destination_service}
    starmesh_authorization_audit_denials_total{destination_service, source_service}
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from typing import Protocol

__all__ = ["DURATION_BUCKETS", "MemoryRecorder", "Recorder", "RouteRecord"]

DURATION_BUCKETS: tuple[float, ...] = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
"""Upper bounds (seconds) of the duration histogram's buckets; +Inf is implied."""

_bisect_left = bisect.bisect_left

RouteRecord = Callable[[str, int, str, float], None]
"""`record(version, status, reason, seconds)`: `Recorder.request` with the first three labels fixed."""

_LABELS = ("direction", "source_service", "destination_service", "destination_version", "response_code", "reason")


class Recorder(Protocol):
    """Where the chain reports what happened; every method is called on the hot path."""

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

    def mirror_dropped(self, service: str) -> None:
        """A mirror copy of a request to `service` was not sent (bound reached, body streamed, no endpoint)."""

    def audit_denied(self, service: str, source: str | None, method: str, path: str) -> None:
        """Audit-mode authorization of `service` would have denied this request (`would_deny`)."""


class _Series:
    __slots__ = ("count", "total", "buckets")

    def __init__(self) -> None:
        self.count = 0
        self.total = 0.0
        self.buckets = [0] * (len(DURATION_BUCKETS) + 1)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names: tuple[str, ...], values: tuple[object, ...], extra: str = "") -> str:
    pairs = [f'{n}="{_escape(str(v))}"' for n, v in zip(names, values, strict=True)]
    if extra:
        pairs.append(extra)
    return "{" + ",".join(pairs) + "}"


class MemoryRecorder:
    """Counts in dictionaries keyed by label tuples; `render()` gives Prometheus text."""

    __slots__ = ("_series", "mirror_drops", "audit_denials")

    def __init__(self) -> None:
        self._series: dict[tuple[str, str, str, str, int, str], _Series] = {}
        self.mirror_drops: dict[str, int] = {}
        self.audit_denials: dict[tuple[str, str], int] = {}

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
        series.count += 1
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
            series.count += 1
            series.total += seconds
            series.buckets[_bisect_left(DURATION_BUCKETS, seconds)] += 1

        return record

    def mirror_dropped(self, service: str) -> None:
        self.mirror_drops[service] = self.mirror_drops.get(service, 0) + 1

    def audit_denied(self, service: str, source: str | None, method: str, path: str) -> None:
        key = (service, source or "")
        self.audit_denials[key] = self.audit_denials.get(key, 0) + 1

    def requests_total(self, **labels: str | int) -> int:
        """The request count over every series whose labels include `labels` (for tests, /metrics)."""
        total = 0
        for key, series in self._series.items():
            values = dict(zip(_LABELS, key, strict=True))
            if all(values[name] == want for name, want in labels.items()):
                total += series.count
        return total

    def render(self) -> str:
        """Prometheus text exposition (version 0.0.4) of everything counted."""
        out = [
            "# HELP starmesh_requests_total Requests answered, by hop and outcome.",
            "# TYPE starmesh_requests_total counter",
        ]
        items = sorted(self._series.items())
        for key, series in items:
            out.append(f"starmesh_requests_total{_labels(_LABELS, key)} {series.count}")
        out.append("# HELP starmesh_request_duration_seconds Time to the response head.")
        out.append("# TYPE starmesh_request_duration_seconds histogram")
        for key, series in items:
            running = 0
            for bound, n in zip((*DURATION_BUCKETS, float("inf")), series.buckets, strict=True):
                running += n
                le = "+Inf" if bound == float("inf") else repr(bound)
                labels = _labels(_LABELS, key, 'le="' + le + '"')
                out.append(f"starmesh_request_duration_seconds_bucket{labels} {running}")
            out.append(f"starmesh_request_duration_seconds_sum{_labels(_LABELS, key)} {series.total}")
            out.append(f"starmesh_request_duration_seconds_count{_labels(_LABELS, key)} {series.count}")
        out.append("# HELP starmesh_mirror_dropped_total Mirror copies not sent (bound reached, streamed body, no endpoint).")
        out.append("# TYPE starmesh_mirror_dropped_total counter")
        for service, n in sorted(self.mirror_drops.items()):
            out.append(f"starmesh_mirror_dropped_total{_labels(('destination_service',), (service,))} {n}")
        out.append("# HELP starmesh_authorization_audit_denials_total Requests audit-mode authorization would deny.")
        out.append("# TYPE starmesh_authorization_audit_denials_total counter")
        for (service, source), n in sorted(self.audit_denials.items()):
            names = ("destination_service", "source_service")
            out.append(f"starmesh_authorization_audit_denials_total{_labels(names, (service, source))} {n}")
        return "\n".join(out) + "\n"
