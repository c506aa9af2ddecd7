"""The control plane's own metrics: OpenTelemetry instruments, served as Prometheus text.

    starmesh_compile_duration_seconds{result}   histogram: compiling one commit (ok | rejected |
                                                source-unavailable: the repository went away mid-read)
    starmesh_compile_total{result}              passes that compiled a commit, or could not read the
                                                branch (source-unavailable, no duration)
    starmesh_releases_issued_total{reason}      commit | reissue | rollback | halt
    starmesh_nacks_total                        NACK reports the registry accepted
    starmesh_proxies{state}                     known proxies by state (synced | pending | failed | stale)
    starmesh_rollout_phase{phase}               1 for the current rollout's phase, 0 for the others
    starmesh_rollout_targeted_proxies           proxies the rollout's release is meant for now
    starmesh_rollout_acked_proxies              of those, the ones that run it
    starmesh_release_version                    the newest release issued (0 before the first)
    starmesh_control_plane_store_available{kind}  1 while the state store takes writes, 0 while it
                                                is read-only (kind: etcd with --store, else file)
  with --store only (several replicas, ha.py):
    starmesh_control_plane_leader               1 on the replica that leads, 0 on the others
    starmesh_control_plane_replicas             live replicas this one sees (itself included)
    starmesh_control_plane_registration_writes_total  proxies' records this replica wrote to etcd
    starmesh_control_plane_leader_changes_total       this replica's role changes (to and from leader)

The parts report events through `Metrics` (compiles: reconcile.py; releases: issuer.py;
NACKs: registry.py; registration writes: registry_sync.py; role changes: ha.py); the base
class records nothing, so a part built without metrics (the unit tests, a tool) pays nothing. `ControlPlaneMetrics` records into a private
OpenTelemetry `MeterProvider` whose `PrometheusMetricReader` writes to its own
`CollectorRegistry`: several control planes in one process never share a series. The
gauges are read when scraped, from the registry, the rollout and the ledger (`observe`),
and with --store from the election, the replica set and the etcd store (`observe_replicas`,
which also starts the two --store counters at 0; without it their series do not exist).

The control plane is not a hot path (a compile, a release, a NACK are rare events), so
synchronous instruments are fine here. Every label has a fixed, small set of values;
each counter starts every one of them at 0, so `rate()` and alerts see a series from
the first scrape. The SDK is imported only when a `ControlPlaneMetrics` is made.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, get_args

from starmesh.reconciler.model import ProxyState, ReleaseReason
from starmesh.reconciler.rollout_state import Phase

if TYPE_CHECKING:
    from opentelemetry.metrics import CallbackOptions, Observation
    from opentelemetry.sdk.metrics import MeterProvider
    from prometheus_client import CollectorRegistry

__all__ = [
    "CONTENT_TYPE",
    "NO_METRICS",
    "CompileOutcome",
    "ControlPlaneMetrics",
    "Metrics",
    "RolloutProgress",
    "StoreState",
]

CompileOutcome = Literal["ok", "rejected", "source-unavailable"]
"""How a pass's compile ended: a bundle, a refused commit, or a repository it could not read."""

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
"""The Prometheus text exposition format `render` writes."""

COMPILE_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
"""Upper bounds (seconds) of the compile-duration histogram (DESIGN.md budget: 1,000 services < 2 s)."""


@dataclass(frozen=True)
class RolloutProgress:
    """The rollout as the gauges show it: its phase (None before any release), how many
    proxies its release is meant for now (the canaries while they run, every live proxy
    once promoted, none once halted), and how many of those run it."""

    phase: Phase | None = None
    targeted: int = 0
    acked: int = 0


@dataclass(frozen=True)
class StoreState:
    """The state store as its gauge shows it: which kind, and whether it takes writes."""

    kind: str = "file"
    available: bool = True


class Metrics:
    """The events the control plane's parts report. This base class records nothing: it is
    the default of every part (`NO_METRICS`); `ControlPlaneMetrics` records them."""

    def compiled(self, result: CompileOutcome, seconds: float | None) -> None:
        """A pass compiled a commit (`seconds` it took) or could not read the branch (None)."""

    def release_issued(self, reason: ReleaseReason) -> None:
        """A release was signed and recorded."""

    def nacked(self) -> None:
        """A proxy reported a NACK."""

    def registrations_written(self, records: int) -> None:
        """`records` proxies' records were written to the store (any thread)."""

    def leader_changed(self) -> None:
        """This replica became leader, or stopped being it."""


NO_METRICS = Metrics()
"""The metrics of a part built without any: nothing is recorded."""


class ControlPlaneMetrics(Metrics):
    """The instruments above on a private MeterProvider; `render()` is the `/metrics` body."""

    def __init__(self) -> None:
        from opentelemetry.exporter.prometheus import PrometheusMetricReader
        from opentelemetry.sdk.metrics import MeterProvider
        from prometheus_client import CollectorRegistry

        self._registry: CollectorRegistry = CollectorRegistry(auto_describe=False)
        reader = PrometheusMetricReader(disable_target_info=True, scope_info_enabled=False, registry=self._registry)
        self._provider: MeterProvider = MeterProvider(metric_readers=[reader], shutdown_on_exit=False)
        self._proxies: Callable[[], Mapping[ProxyState, int]] = dict
        self._rollout: Callable[[], RolloutProgress] = RolloutProgress
        self._release_version: Callable[[], int | None] = _none
        self._store: Callable[[], StoreState] = StoreState  # a FileStore always takes writes
        self._leading: Callable[[], bool] | None = None  # None: no --store, no replica gauges
        self._replica_count: Callable[[], int] = int
        meter = self._provider.get_meter("starmesh.reconciler")
        self._compile_seconds = meter.create_histogram(
            "starmesh_compile_duration_seconds", unit="s", description="Time to compile one commit, by result.",
            explicit_bucket_boundaries_advisory=COMPILE_BUCKETS,
        )  # fmt: skip
        self._compiles = meter.create_counter("starmesh_compile_total", description="Commits compiled (or not readable), by result.")
        self._releases = meter.create_counter("starmesh_releases_issued_total", description="Releases signed, by reason.")
        self._nacks = meter.create_counter("starmesh_nacks_total", description="NACK reports from proxies.")
        for result in get_args(CompileOutcome):
            self._compiles.add(0, {"result": result})
        for reason in get_args(ReleaseReason):
            self._releases.add(0, {"reason": reason})
        self._nacks.add(0)
        meter.create_observable_gauge(
            "starmesh_proxies", [self._observe_proxies], description="Known proxies, by state."
        )
        meter.create_observable_gauge(
            "starmesh_rollout_phase", [self._observe_phase], description="1 for the current rollout phase, 0 for the others."
        )
        meter.create_observable_gauge(
            "starmesh_rollout_targeted_proxies", [self._observe_targeted],
            description="Proxies the rollout's release is meant for now.",
        )  # fmt: skip
        meter.create_observable_gauge(
            "starmesh_rollout_acked_proxies", [self._observe_acked],
            description="Proxies the rollout's release is meant for that run it.",
        )  # fmt: skip
        meter.create_observable_gauge(
            "starmesh_release_version", [self._observe_release], description="The newest release version issued (0: none)."
        )
        meter.create_observable_gauge(
            "starmesh_control_plane_store_available", [self._observe_store],
            description="1 while the state store takes writes, 0 while the control plane serves read-only.",
        )  # fmt: skip
        meter.create_observable_gauge(
            "starmesh_control_plane_leader", [self._observe_leader],
            description="1 on the control-plane replica that leads, 0 on the others (--store only).",
        )  # fmt: skip
        meter.create_observable_gauge(
            "starmesh_control_plane_replicas", [self._observe_replicas],
            description="Live control-plane replicas this one sees, itself included (--store only).",
        )  # fmt: skip
        self._registration_writes = meter.create_counter(
            "starmesh_control_plane_registration_writes_total",
            description="Proxies' registration records this replica wrote to the store (--store only).",
        )
        self._leader_changes = meter.create_counter(
            "starmesh_control_plane_leader_changes_total",
            description="Times this replica became leader or stopped being it (--store only).",
        )

    # -- events ------------------------------------------------------------------------

    def compiled(self, result: CompileOutcome, seconds: float | None) -> None:
        self._compiles.add(1, {"result": result})
        if seconds is not None:
            self._compile_seconds.record(seconds, {"result": result})

    def release_issued(self, reason: ReleaseReason) -> None:
        self._releases.add(1, {"reason": reason})

    def nacked(self) -> None:
        self._nacks.add(1)

    def registrations_written(self, records: int) -> None:
        self._registration_writes.add(records)

    def leader_changed(self) -> None:
        self._leader_changes.add(1)

    # -- what the gauges read ------------------------------------------------------------

    def observe(
        self,
        *,
        proxies: Callable[[], Mapping[ProxyState, int]],
        rollout: Callable[[], RolloutProgress],
        release_version: Callable[[], int | None],
    ) -> None:
        """Where the gauges read, each time they are scraped: proxies by state, the
        rollout's progress, the newest release version."""
        self._proxies, self._rollout, self._release_version = proxies, rollout, release_version

    def observe_replicas(
        self, *, leading: Callable[[], bool], replicas: Callable[[], int], store: Callable[[], StoreState]
    ) -> None:
        """With --store: where the replica gauges read (this replica's role, the live replicas,
        the etcd store's state); starts the --store counters' series at 0."""
        self._leading, self._replica_count, self._store = leading, replicas, store
        self._registration_writes.add(0)
        self._leader_changes.add(0)

    def render(self) -> bytes:
        """Prometheus text (`CONTENT_TYPE`) of every instrument, read now."""
        from prometheus_client import generate_latest

        return generate_latest(self._registry)

    def close(self) -> None:
        """Stop the provider (its reader leaves the private registry); idempotent."""
        self._provider.shutdown()

    def _observe_proxies(self, _: CallbackOptions) -> Iterable[Observation]:
        counts = self._proxies()
        return _observations((counts.get(state, 0), {"state": state}) for state in get_args(ProxyState))

    def _observe_phase(self, _: CallbackOptions) -> Iterable[Observation]:
        phase = self._rollout().phase
        return _observations((int(name == phase), {"phase": name}) for name in get_args(Phase))

    def _observe_targeted(self, _: CallbackOptions) -> Iterable[Observation]:
        return _observations([(self._rollout().targeted, {})])

    def _observe_acked(self, _: CallbackOptions) -> Iterable[Observation]:
        return _observations([(self._rollout().acked, {})])

    def _observe_release(self, _: CallbackOptions) -> Iterable[Observation]:
        return _observations([(self._release_version() or 0, {})])

    def _observe_store(self, _: CallbackOptions) -> Iterable[Observation]:
        state = self._store()
        return _observations([(int(state.available), {"kind": state.kind})])

    def _observe_leader(self, _: CallbackOptions) -> Iterable[Observation]:
        return [] if self._leading is None else _observations([(int(self._leading()), {})])

    def _observe_replicas(self, _: CallbackOptions) -> Iterable[Observation]:
        return [] if self._leading is None else _observations([(self._replica_count(), {})])


def _observations(values: Iterable[tuple[int, dict[str, str]]]) -> list[Observation]:
    from opentelemetry.metrics import Observation

    return [Observation(value, attributes) for value, attributes in values]


def _none() -> int | None:
    return None
