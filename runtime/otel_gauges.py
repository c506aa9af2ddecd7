"""The proxy's state as OpenTelemetry observable instruments, read when metrics are collected.

    starmesh_config_release_version                     the applied release (-1: none, or a --bundle file)
    starmesh_config_bundle_info{digest}                 1 for the applied bundle
    starmesh_config_apply_total{result, reason}         applies: ok (reason ""), rejected by reason
    starmesh_config_last_apply_timestamp_seconds        when the live config was applied (Unix time)
    starmesh_config_releases_behind                     control-plane form: newer releases known, not live
    starmesh_control_plane_last_contact_seconds         control-plane form: age of its last answer (+Inf: none yet)
    starmesh_certificate_expiry_seconds                 with --ca-cert: seconds left (negative: expired)
    starmesh_inbound_connections_total{transport}       with mTLS: accepted, `mtls` or `plaintext`
    starmesh_inbound_connections_refused_total{reason}  with mTLS: refused (plaintext, svid, handshake, ...)
    starmesh_access_log_dropped_total                   with an access log: lines not written
    starmesh_trace_spans_dropped_total                  with a span count: spans not exported

Nothing here runs per request: the callbacks read the live objects (the applier, the
inbound TLS counts, the control link) when /metrics is scraped or an OTLP export runs.

A rejected apply is counted by the applier where it is refused, under the reason word
the refusal carries (`RejectReason`, runtime/errors.py): the counts here are exact.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Protocol

from opentelemetry.metrics import CallbackOptions, Meter, Observation

if TYPE_CHECKING:
    from starmesh.runtime.apply import Applier
    from starmesh.runtime.control_link import ControlLink
    from starmesh.runtime.tls import InboundTLS

__all__ = ["StateSources", "register_state_gauges"]


class Drops(Protocol):
    """Something that counts what it dropped (runtime/access_log.py's AccessLog)."""

    @property
    def dropped(self) -> int: ...


@dataclass(frozen=True)
class StateSources:
    """What the state gauges read: the applier, the inbound mTLS counts (None: no mTLS), the
    control link (a getter: the link is made after the metrics; None in the --bundle form),
    the access log (None: off) and the count of spans dropped (None: not tracing)."""

    applier: Applier
    inbound_tls: InboundTLS | None = None
    link: Callable[[], ControlLink | None] = lambda: None
    access_log: Drops | None = None
    spans_dropped: Callable[[], int] | None = None


def _releases_behind(applier: Applier) -> int:
    """Releases newer than the live one that the proxy knows of: the high-water mark (after a
    start from an older generation) or a refused release from the control plane."""
    applied = applier.applied
    live = applied.release_version if applied is not None and applied.release_version is not None else 0
    newest = live
    if applier.high_water is not None:
        newest = max(newest, applier.high_water.version)
    refused = applier.last_error
    if refused is not None and refused.origin == "control-plane" and refused.release_version is not None:
        newest = max(newest, refused.release_version)
    return newest - live


Callback = Callable[[CallbackOptions], Iterable[Observation]]


def register_state_gauges(meter: Meter, sources: StateSources) -> None:
    """Create the observable instruments above on `meter`, reading `sources`."""
    applier = sources.applier
    link = sources.link
    tls = sources.inbound_tls

    def release_version(_: CallbackOptions) -> Iterable[Observation]:
        applied = applier.applied
        version = -1 if applied is None or applied.release_version is None else applied.release_version
        return [Observation(version)]

    def bundle_info(_: CallbackOptions) -> Iterable[Observation]:
        applied = applier.applied
        return [] if applied is None else [Observation(1, {"digest": applied.digest})]

    def applies(_: CallbackOptions) -> Iterable[Observation]:
        ok = [Observation(applier.applies, {"result": "ok", "reason": ""})]
        by_reason = sorted(dict(applier.rejections).items())  # one C-level copy: an OTLP export runs on its thread
        return ok + [Observation(n, {"result": "rejected", "reason": r}) for r, n in by_reason]

    def last_apply(_: CallbackOptions) -> Iterable[Observation]:
        applied = applier.applied
        return [] if applied is None else [Observation(datetime.fromisoformat(applied.applied_at).timestamp())]

    def releases_behind(_: CallbackOptions) -> Iterable[Observation]:
        return [] if link() is None else [Observation(_releases_behind(applier))]

    def last_contact(_: CallbackOptions) -> Iterable[Observation]:
        current = link()
        if current is None:
            return []
        age = current.last_contact_age()
        return [Observation(float("inf") if age is None else round(age, 3))]

    def certificate_expiry(_: CallbackOptions) -> Iterable[Observation]:
        current = link()
        left = None if current is None else current.certificate_expiry()
        return [] if left is None else [Observation(round(left, 3))]

    gauges: list[tuple[str, str, str, Callback]] = [
        ("starmesh_config_release_version", "The applied release's version (-1: none, or a --bundle file).",
         "{release}", release_version),
        ("starmesh_config_bundle_info", "The applied bundle (1), by digest.", "1", bundle_info),
        ("starmesh_config_last_apply_timestamp_seconds", "When the live config was applied (Unix time).",
         "s", last_apply),
        ("starmesh_config_releases_behind", "Releases newer than the live one that this proxy knows of.",
         "{release}", releases_behind),
        ("starmesh_control_plane_last_contact_seconds", "Seconds since the control plane last answered.",
         "s", last_contact),
        ("starmesh_certificate_expiry_seconds", "Seconds until the workload certificate expires (negative: expired).",
         "s", certificate_expiry),
    ]  # fmt: skip
    for name, description, unit, callback in gauges:
        meter.create_observable_gauge(name, [callback], unit, description)
    meter.create_observable_counter(
        "starmesh_config_apply_total", [applies], "{apply}", "Config applies, by result and rejection reason."
    )
    if tls is not None:
        _register_tls(meter, tls)
    drops: list[tuple[str, str, Callable[[], int]]] = []
    if sources.access_log is not None:
        log = sources.access_log
        drops.append(("starmesh_access_log_dropped_total",
                      "Access-log lines not written: over max_lines_per_second, queue full, write errors.",
                      lambda: log.dropped))  # fmt: skip
    if sources.spans_dropped is not None:
        drops.append(("starmesh_trace_spans_dropped_total", "Sampled spans not exported (queue full).",
                      sources.spans_dropped))  # fmt: skip
    for name, description, read in drops:
        meter.create_observable_counter(name, [_reading(read)], "{event}", description)


def _reading(read: Callable[[], int]) -> Callable[[CallbackOptions], Iterable[Observation]]:
    def observe(_: CallbackOptions) -> Iterable[Observation]:
        return [Observation(read())]

    return observe


def _register_tls(meter: Meter, tls: InboundTLS) -> None:
    """The inbound listener's mTLS connection counts (InboundTLS keeps them per connection)."""

    def accepted(_: CallbackOptions) -> Iterable[Observation]:
        return [Observation(n, {"transport": t}) for t, n in sorted(dict(tls.accepted).items())]

    def refused(_: CallbackOptions) -> Iterable[Observation]:
        return [Observation(n, {"reason": r}) for r, n in sorted(dict(tls.refused).items())]

    for name, callback, description in (
        ("starmesh_inbound_connections_total", accepted, "Inbound connections accepted, by transport."),
        ("starmesh_inbound_connections_refused_total", refused, "Inbound connections refused, by reason."),
    ):
        meter.create_observable_counter(name, [callback], "{connection}", description)
