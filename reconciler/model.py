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
    `last_seen` is the wall-clock time of its last heartbeat or report."""

    id: str
    service: str
    version: str
    address: str
    last_seen: str
    release_version: int | None = None
    bundle: str | None = None
    state: ProxyState = "pending"
    error: str | None = None
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
            **self.extra,
        }


@dataclass(frozen=True, slots=True)
class ProxyEntry:
    """One proxy as the registry knows it; replaced whole on every heartbeat or report.

    `seen` is the registry clock (monotonic) at the last contact, `last_seen` the same
    moment as RFC 3339 UTC. `release_version`/`bundle` are what the proxy runs (its last
    ACK, or its heartbeat's claim); `error` is its last NACK reason (None after an ACK)
    and `nacked_version`/`nacked_bundle` what that NACK was about."""

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

    def to_record(self, state: ProxyState) -> ProxyRecord:
        """The `/v1/status` record, with the state the rollout gives this proxy."""
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
        )
