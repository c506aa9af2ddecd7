"""Outlier detection: eject endpoints that fail `consecutive_5xx` times in a row.

Per service, the state lives in the StateRegistry and survives applies (kept per
endpoint, so endpoints that remain keep their history). A failure is a 5xx response
or an upstream error; any other response resets the endpoint's run.

- Ejection happens at the failure that completes the run, for
  `base_ejection_time × n`, where n counts the endpoint's ejections (growing).
- At most `max_ejection_percent` of the candidate endpoints (the version's, as the
  balancer saw them) are ejected at once, and never the last one: an ejection past
  that bound is skipped and the run starts over.
- Re-admission is lazy: the balancer drops expired ejections when it next picks, at
  the first request at or after the ejection's end (no timer task).
- `interval` is when history fades: n goes down by one for every whole `interval` the
  endpoint spent admitted since its last ejection ended (Envoy's ejection multiplier
  decay), so a host that flaps is ejected for longer each time and a host that
  recovered starts again from the base time.
"""

from __future__ import annotations

from starmesh.bundle.spec import OutlierDetection
from starmesh.runtime.telemetry import Count

__all__ = ["OutlierState"]


class OutlierState:
    """One service's ejections. `ejected` maps endpoint -> loop-independent clock time it returns.

    `ejections` counts every ejection (the chain binds the recorder's cell for the service,
    `starmesh_outlier_ejections_total`)."""

    __slots__ = ("config", "failures", "ejected", "history", "next_return", "ejections")

    def __init__(self, config: OutlierDetection) -> None:
        self.ejections = Count()
        self.config = config
        self.failures: dict[str, int] = {}
        self.ejected: dict[str, float] = {}
        self.history: dict[str, tuple[int, float]] = {}  # endpoint -> (times ejected, when the last ejection ends)
        self.next_return = float("inf")

    def admitted(self, candidates: tuple[str, ...], now: float) -> tuple[str, ...]:
        """The candidates not ejected at `now` (call only while `ejected` is non-empty)."""
        if now >= self.next_return:
            ejected = self.ejected
            for endpoint, until in list(ejected.items()):
                if until <= now:
                    del ejected[endpoint]
            self.next_return = min(ejected.values(), default=float("inf"))
            if not ejected:
                return candidates
        ejected = self.ejected
        return tuple(e for e in candidates if e not in ejected)

    def success(self, endpoint: str) -> None:
        """A non-5xx answer: the endpoint's run of failures ends."""
        if self.failures:
            self.failures.pop(endpoint, None)

    def failure(self, endpoint: str, candidates: tuple[str, ...], now: float) -> bool:
        """A 5xx or an upstream error; returns True when it ejected the endpoint."""
        config = self.config
        run = self.failures.get(endpoint, 0) + 1
        if run < config.consecutive_5xx:
            self.failures[endpoint] = run
            return False
        self.failures.pop(endpoint, None)
        ejected = self.ejected
        if endpoint in ejected:
            return False
        if ejected and now >= self.next_return:
            self.admitted(candidates, now)
        out = sum(1 for e in candidates if e in ejected)
        allowed = int(len(candidates) * float(config.max_ejection_percent) / 100.0)
        if out + 1 > allowed or out + 1 >= len(candidates):
            return False
        times, ended = self.history.get(endpoint, (0, now))
        if times and config.interval_ms > 0:
            times = max(0, times - int((now - ended) * 1000.0 // config.interval_ms))
        times += 1
        until = now + config.base_ejection_time_ms / 1000.0 * times
        ejected[endpoint] = until
        self.ejections.n += 1
        self.history[endpoint] = (times, until)
        if until < self.next_return:
            self.next_return = until
        return True

    def retain(self, endpoints: frozenset[str]) -> None:
        """Forget endpoints that are gone (state for the rest survives)."""
        for table in (self.failures, self.ejected, self.history):
            for endpoint in [e for e in table if e not in endpoints]:
                del table[endpoint]
        self.next_return = min(self.ejected.values(), default=float("inf"))
