"""What the control plane's parts pass each other: frozen, JSON-ready records.

    ReleaseRecord    one signed release as issued (its envelope is what proxies fetch)
    CompileStatus    the outcome of compiling one commit (`/v1/status` `last_compile`)
    ProxyRecord      one registered proxy as `/v1/status` lists it
    ProxyEntry       one proxy as the registry holds it (its clock, its last NACK); the
                     registry hands these to the rollout and the API, `to_record` makes
                     the ProxyRecord

Times are RFC 3339 UTC strings; digests are `sha256:<hex>`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Literal

__all__ = ["CompileStatus", "ProxyEntry", "ProxyRecord", "ProxyState", "ReleaseReason", "ReleaseRecord", "utc_now"]

ReleaseReason = Literal["commit", "reissue", "rollback", "halt"]
"""Why a release was issued: a new commit's bundle, the half-life re-issue of the same
bundle, `starmesh rollback`, or a halted rollout rolling the canaries back."""

ProxyState = Literal["synced", "pending", "failed", "stale"]
"""`synced`: runs the release meant for it; `pending`: not yet; `failed`: it NACKed that
release (`error` says why); `stale`: no heartbeat within the registry's TTL."""


def utc_now() -> str:
    """The current time as RFC 3339 UTC, to the millisecond (`2026-11-26T09:00:00.000Z`)."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class ReleaseRecord:
    """A release as issued: the signed fields, why it was issued, and the DSSE envelope bytes."""

    version: int
    bundle: str
    previous: str | None
    commit: str | None
    issued_at: str
    expires_at: str
    reason: ReleaseReason
    envelope: bytes

    def to_json(self) -> dict[str, object]:
        """The summary `/v1/status` shows (no envelope)."""
        return {
            "version": self.version,
            "bundle": self.bundle,
            "previous": self.previous,
            "commit": self.commit,
            "issued_at": self.issued_at,
            "expires_at": self.expires_at,
            "reason": self.reason,
        }


@dataclass(frozen=True)
class CompileStatus:
    """Compiling one commit: `ok` with the bundle digest, or the findings that stopped it.

    `diagnostics` are finding dicts as `lint --format json` prints them (file, line, col,
    code, severity, message, hint); a commit that cannot be read at all has one
    diagnostic with code `source` and the reason."""

    commit: str | None
    ok: bool
    digest: str | None
    at: str
    diagnostics: tuple[dict[str, object], ...] = ()

    def to_json(self) -> dict[str, object]:
        return {
            "commit": self.commit,
            "ok": self.ok,
            "bundle": self.digest,
            "at": self.at,
            "diagnostics": list(self.diagnostics),
        }


@dataclass(frozen=True)
class ProxyRecord:
    """One proxy as the registry knows it: what it registered and what it last reported.

    `release_version`/`bundle` are what it runs (its last ACK, or its heartbeat's
    claim after a control-plane restart); `error` is its last NACK reason;
    `last_seen` is the wall-clock time of its last heartbeat or report, and
    `last_seen_seconds_ago` its age by the control plane's own clock.
    `desired_release_version` is the release meant for it (the rollout decides),
    `releases_behind` how many releases were issued after the one it runs up to that
    one (None while it runs none; rollout.py `releases_behind`), `request_rate` its
    requests per second over its last heartbeat interval (None until two heartbeats
    carried a count, once stale, and again until two more after it comes back)."""

    id: str
    service: str
    version: str
    address: str
    last_seen: str
    release_version: int | None = None
    bundle: str | None = None
    state: ProxyState = "pending"
    error: str | None = None
    last_seen_seconds_ago: float | None = None
    desired_release_version: int | None = None
    releases_behind: int | None = None
    request_rate: float | None = None
    extra: dict[str, object] = field(default_factory=dict)

    def to_json(self) -> dict[str, object]:
        return {
            "id": self.id,
            "service": self.service,
            "version": self.version,
            "address": self.address,
            "release_version": self.release_version,
            "bundle": self.bundle,
            "state": self.state,
            "error": self.error,
            "last_seen": self.last_seen,
            "last_seen_seconds_ago": self.last_seen_seconds_ago,
            "desired_release_version": self.desired_release_version,
            "releases_behind": self.releases_behind,
            "request_rate": self.request_rate,
            **self.extra,
        }


@dataclass(frozen=True, slots=True)
class ProxyEntry:
    """One proxy as the registry knows it; replaced whole on every heartbeat or report.

    `seen` is the registry clock (monotonic) at the last contact, `last_seen` the same
    moment as RFC 3339 UTC. `release_version`/`bundle` are what the proxy runs (its last
    ACK, or its heartbeat's claim); `error` is its last NACK reason (None after an ACK)
    and `nacked_version`/`nacked_bundle` what that NACK was about. `requests` holds the
    last two request counts its heartbeats carried, `(requests_total, seen)`, oldest
    first (none from before it went stale): `request_rate` is the slope between them."""

    id: str
    service: str
    version: str
    address: str
    seen: float
    last_seen: str
    release_version: int | None = None
    bundle: str | None = None
    error: str | None = None
    nacked_version: int | None = None
    nacked_bundle: str | None = None
    stale: bool = False
    requests: tuple[tuple[int, float], ...] = ()

    def request_rate(self) -> float | None:
        """Requests per second between the last two counts (a count that went down is a
        restarted proxy: it counts from 0, as Prometheus' `rate()` does); None without two."""
        if len(self.requests) < 2:
            return None
        (before, then), (now, at) = self.requests[-2], self.requests[-1]
        if at <= then:
            return None
        return (now - before if now >= before else now) / (at - then)

    def to_record(
        self,
        state: ProxyState,
        *,
        now: float | None = None,
        desired: int | None = None,
        behind: int | None = None,
    ) -> ProxyRecord:
        """The `/v1/status` record, with the state the rollout gives this proxy, its age at
        `now` (the registry clock), the release meant for it and how far behind it is."""
        rate = None if self.stale else self.request_rate()
        return ProxyRecord(
            id=self.id,
            service=self.service,
            version=self.version,
            address=self.address,
            last_seen=self.last_seen,
            release_version=self.release_version,
            bundle=self.bundle,
            state=state,
            error=self.error,
            last_seen_seconds_ago=None if now is None else round(max(0.0, now - self.seen), 3),
            desired_release_version=desired,
            releases_behind=behind,
            request_rate=None if rate is None else round(rate, 3),
        )
