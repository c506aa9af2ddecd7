"""Applying a bundle: the one code path every config source shares.

    bytes ─► decode + check (digest, canonical bytes, schema) ─► the runtime's own validation
          ─► build the RouteTable off to the side ─► golden requests against it
          ─► swap one reference ─► persist last-known-good ─► ApplyResult (ACK / NACK reason)

A control-plane apply also hands over the release's signed envelope; it is persisted
with the bundle (the control-plane form re-verifies it at the next start), and the
release high-water mark (`Applier.high_water`, the highest release version applied
here) is kept up to date and persisted with every generation.

The `--bundle FILE` form (origin `file`), a start from disk (`last-known-good`) and the
control plane (`control-plane`) all call `Applier.apply`. Any failure keeps the old
table and returns `ok=False` with a reason that says what is wrong; the same digest as
the applied one is a no-op. The swap is a plain attribute assignment with no await
between it and the endpoint update, so requests (which read `applier.current` once, at
their start) see the old config or the new one, never half of each.

What survives an apply lives outside the table, in `ChainDeps`: the connection pools
(kept for the endpoints still in use), breaker/outlier/rate-limit state, the endpoints.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import cast

from starmesh.bundle.canonical import decode_bundle, digest_of
from starmesh.bundle.decide import DecisionTable
from starmesh.bundle.errors import BundleError
from starmesh.bundle.golden import run_request_tests
from starmesh.runtime.chain import ChainDeps
from starmesh.runtime.endpoints import EndpointTable, check_endpoints, static_endpoints
from starmesh.runtime.errors import ConfigRejected, RejectReason
from starmesh.runtime.state import StateRegistry
from starmesh.runtime.lkg import HighWater, LastKnownGood, Origin, save_last_known_good
from starmesh.runtime.table import RouteTable

__all__ = ["AppliedConfig", "Applier", "ApplyResult", "RejectedApply", "rfc3339_now"]

log = logging.getLogger("starmesh.proxy")


def rfc3339_now() -> str:
    """The current time as RFC 3339 UTC with a `Z`, to the millisecond."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True, slots=True)
class ApplyResult:
    """The outcome of one apply: `ok` with the applied version and digest, or the reason it was rejected.

    `changed` is False for a no-op (the digest was already applied) and for a rejection."""

    ok: bool
    version: int | None
    digest: str | None
    error: str | None = None
    changed: bool = False


@dataclass(frozen=True, slots=True)
class AppliedConfig:
    """The live config: its table and how it got here (what `/config` reports); `envelope` is
    the signed release it came with (None for a `--bundle` file)."""

    table: RouteTable
    data: bytes
    digest: str
    release_version: int | None
    applied_at: str
    origin: Origin
    envelope: bytes | None = None


@dataclass(frozen=True, slots=True)
class RejectedApply:
    """The last apply that was refused, and why (`/config` `last_error`, the NACK reason)."""

    at: str
    origin: Origin
    digest: str | None
    release_version: int | None
    error: str

    def to_json(self) -> dict[str, object]:
        return {
            "at": self.at,
            "origin": self.origin,
            "bundle": self.digest,
            "release_version": self.release_version,
            "error": self.error,
        }


class Applier:
    """Holds the live RouteTable (`current`) and applies new bundles to it.

    `state_dir` None disables last-known-good (tests of the apply path alone)."""

    def __init__(self, deps: ChainDeps, *, app: str, state_dir: Path | None) -> None:
        self.deps = deps
        self.registry = cast(StateRegistry, deps.state)  # the proxy's registry, not a transaction
        self.app = app
        self.state_dir = state_dir
        self.current: RouteTable | None = None
        self.applied: AppliedConfig | None = None
        self.last_error: RejectedApply | None = None
        self.high_water: HighWater | None = None
        """The highest release applied here, ever (seeded from the state dir at start)."""
        self.applies = 0
        """Configs swapped in so far (a no-op apply of the live digest is not one)."""
        self.rejections: dict[RejectReason, int] = {}
        """Configs refused so far, by reason (`starmesh_config_apply_total{result="rejected"}`)."""
        self._lock = asyncio.Lock()

    async def apply(
        self,
        data: bytes,
        *,
        expected_digest: str | None,
        release_version: int | None,
        origin: Origin,
        endpoints: EndpointTable | None = None,
        endpoints_source: str = "endpoints",
        endpoints_version: int | None = None,
        envelope: bytes | None = None,
    ) -> ApplyResult:
        """Apply bundle bytes; never raises for a bad bundle (the result says why).

        `endpoints`, when given, replaces the registered endpoint table together with the
        bundle; with origin `file` every service/version in it must be declared by the
        bundle (`endpoints_source` names it in errors, e.g. the file's path). `envelope`
        is the verified release that named this bundle (persisted with it)."""
        async with self._lock:
            digest = digest_of(data)
            try:
                result = self._apply(
                    data,
                    digest,
                    expected_digest,
                    release_version,
                    origin,
                    endpoints,
                    endpoints_source,
                    endpoints_version,
                    envelope,
                )
            except ConfigRejected as exc:
                return self._reject(origin, digest, release_version, str(exc), exc.reason)
            except Exception as exc:  # a bug while building must not take the proxy down
                log.exception("building the route table for %s failed", digest)
                error = f"route table could not be built (a proxy bug; details in its log): {type(exc).__name__}: {exc}"
                return self._reject(origin, digest, release_version, error, "internal-error")
            if result.changed and origin != "last-known-good":
                await self._persist()
            return result

    def _apply(
        self,
        data: bytes,
        digest: str,
        expected_digest: str | None,
        release_version: int | None,
        origin: Origin,
        endpoints: EndpointTable | None,
        endpoints_source: str,
        endpoints_version: int | None,
        envelope: bytes | None,
    ) -> ApplyResult:
        if expected_digest is not None and digest != expected_digest:
            raise ConfigRejected(
                f"bundle rejected: bundle digest mismatch: expected {expected_digest}, got {digest}",
                reason="digest-mismatch",
            )
        applied = self.applied
        if applied is not None and applied.digest == digest:  # already decoded, checked and built
            if endpoints is not None and origin == "file":
                check_endpoints(endpoints, applied.table.bundle.spec, endpoints_source)
            return self._same_bundle(applied, release_version, origin, endpoints, endpoints_version, envelope)
        try:
            bundle = decode_bundle(data)
        except BundleError as exc:
            raise ConfigRejected(f"bundle rejected: {exc}", reason="invalid-bundle") from exc
        if endpoints is not None and origin == "file":
            check_endpoints(endpoints, bundle.spec, endpoints_source)
        static = static_endpoints(bundle.spec)
        try:
            decisions = DecisionTable.build(bundle.spec)
        except BundleError as exc:
            raise ConfigRejected(f"bundle rejected by the proxy's validation: {exc}", reason="validation") from exc
        # Build against a state transaction: nothing live changes unless this table is swapped in.
        state = self.registry.transaction()
        table = RouteTable.build(bundle, digest, replace(self.deps, state=state), app=self.app, decisions=decisions)
        failures = run_request_tests(decisions)
        if failures:
            shown = "; ".join(f.message for f in failures[:5])
            more = f" (and {len(failures) - 5} more)" if len(failures) > 5 else ""
            raise ConfigRejected(
                f"golden requests failed against the new route table: {shown}{more}", reason="golden-requests"
            )
        # The swap: no await from here to the return, so no request sees half of it.
        state.commit()
        self.deps.endpoints.set_static(static)
        if endpoints is not None:
            self.deps.endpoints.update(endpoints, version=endpoints_version)
        self.current = table
        self.applied = AppliedConfig(table, data, digest, release_version, rfc3339_now(), origin, envelope)
        self._raise_high_water(release_version, digest)
        if origin != "last-known-good":  # falling back keeps the reason the newer config was refused
            self.last_error = None
        self.applies += 1
        self._retain()
        log.info("applied %s (release %s, origin %s)", digest, release_version, origin)
        return ApplyResult(True, release_version, digest, changed=True)

    def _same_bundle(
        self,
        applied: AppliedConfig,
        release_version: int | None,
        origin: Origin,
        endpoints: EndpointTable | None,
        endpoints_version: int | None,
        envelope: bytes | None,
    ) -> ApplyResult:
        """The applied digest again: nothing to build; a new endpoint table, release number
        or origin (a file that now says what last-known-good said) still counts."""
        changed = False
        if endpoints is not None and endpoints != self.deps.endpoints.registered:
            self.deps.endpoints.update(endpoints, version=endpoints_version)
            self._retain()
            changed = True
        if (release_version, origin, envelope) != (applied.release_version, applied.origin, applied.envelope):
            applied = AppliedConfig(
                applied.table, applied.data, applied.digest, release_version, applied.applied_at, origin, envelope
            )
            self.applied = applied
            self._raise_high_water(release_version, applied.digest)
            changed = True
        if origin != "last-known-good":
            self.last_error = None
        return ApplyResult(True, applied.release_version, applied.digest, changed=changed)

    def _raise_high_water(self, release_version: int | None, digest: str) -> None:
        if release_version is not None and (self.high_water is None or release_version > self.high_water.version):
            self.high_water = HighWater(release_version, digest)

    async def update_endpoints(self, endpoints: EndpointTable, *, version: int | None = None) -> None:
        """Replace the registered endpoint table (the control plane's feed) and persist it.

        The same table again (a re-sync after a reconnect) only takes the new version number."""
        async with self._lock:
            live = self.deps.endpoints
            if endpoints == live.registered:
                if version is not None:
                    live.version = version
                return
            live.update(endpoints, version=version)
            self._retain()
            await self._persist()

    def _retain(self) -> None:
        """Keep pools and per-service state for what the live config still uses; drop the rest."""
        in_use = self.deps.endpoints.addresses() | {self.app}
        self.deps.pool.retain(in_use)
        if self.current is not None:
            self.registry.retain(self.current.decisions.services.keys(), in_use)

    def reject(
        self,
        origin: Origin,
        error: str,
        *,
        reason: RejectReason,
        digest: str | None = None,
        release_version: int | None = None,
    ) -> ApplyResult:
        """Record a config refused before it reached `apply` (an unreadable file, a bad endpoint
        table, a release that does not verify); `reason` is the word it is counted under."""
        return self._reject(origin, digest, release_version, error, reason)

    def _reject(
        self, origin: Origin, digest: str | None, release_version: int | None, error: str, reason: RejectReason
    ) -> ApplyResult:
        self.last_error = RejectedApply(rfc3339_now(), origin, digest, release_version, error)
        self.rejections[reason] = self.rejections.get(reason, 0) + 1
        keeping = self.applied.digest if self.applied else "no config"
        log.error("config from %s not applied (%s): %s; keeping %s", origin, digest or "unread", error, keeping)
        return ApplyResult(False, release_version, digest, error)

    async def _persist(self) -> None:
        applied = self.applied
        if self.state_dir is None or applied is None:
            return
        endpoints = self.deps.endpoints
        lkg = LastKnownGood(
            data=applied.data,
            digest=applied.digest,
            release_version=applied.release_version,
            applied_at=applied.applied_at,
            origin=applied.origin,
            endpoints=endpoints.registered,
            endpoints_version=endpoints.version,
            envelope=applied.envelope,
        )
        try:
            await asyncio.to_thread(save_last_known_good, self.state_dir, lkg, high_water=self.high_water)
        except OSError as exc:
            log.error("could not persist last-known-good in %s: %s (the applied config stays live)",
                      self.state_dir, exc.strerror or exc)
