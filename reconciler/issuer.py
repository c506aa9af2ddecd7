"""Issuing releases: allocate a version, sign the release, record it.

Every release the control plane serves comes from `Issuer.issue`: a new commit's
bundle, the half-life re-issue of the current bundle (DESIGN.md: releases expire after
7 days and are re-issued at half life), `starmesh rollback`, and a halted rollout's
roll-back. Each gets a new, higher version; an old release is never re-sent.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from starmesh.bundle.canonical import decode_bundle
from starmesh.bundle.errors import BundleError
from starmesh.bundle.keys import PrivateKey
from starmesh.bundle.release import DEFAULT_TTL, issue_release
from starmesh.reconciler.errors import UnknownBundle
from starmesh.reconciler.ledger import Ledger
from starmesh.reconciler.metrics import NO_METRICS, Metrics
from starmesh.reconciler.model import ReleaseReason, ReleaseRecord

__all__ = ["Issuer"]


class Issuer:
    """Signs releases with the control plane's key and records them in the ledger."""

    def __init__(
        self,
        ledger: Ledger,
        key: PrivateKey,
        *,
        ttl: timedelta = DEFAULT_TTL,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
        metrics: Metrics = NO_METRICS,
    ) -> None:
        if ttl <= timedelta(0):
            raise ValueError(f"release ttl must be positive, got {ttl}")
        self.ledger = ledger
        self.key = key
        self.ttl = ttl
        self.now = now
        self.metrics = metrics

    def issue(self, bundle: str, *, commit: str | None, reason: ReleaseReason) -> ReleaseRecord:
        """Issue a release of the stored bundle `bundle` as the next version.

        `previous` is the current release's bundle. Raises UnknownBundle when the
        bundle is not stored (or does not decode: the mesh name comes from it)."""
        data = self.ledger.bundle(bundle)
        try:
            mesh = decode_bundle(data).spec.mesh.name
        except BundleError as exc:
            raise UnknownBundle(f"stored bundle {bundle} does not decode: {exc}") from exc
        current = self.ledger.current()
        version = self.ledger.next_version()
        signed = issue_release(
            mesh=mesh,
            version=version,
            bundle=bundle,
            previous=current.bundle if current is not None else None,
            commit=commit,
            key=self.key,
            now=self.now(),
            ttl=self.ttl,
        )
        release = signed.release
        record = ReleaseRecord(
            version=release.version,
            bundle=release.bundle,
            previous=release.previous,
            commit=release.commit,
            issued_at=release.issued_at,
            expires_at=release.expires_at,
            reason=reason,
            envelope=signed.envelope,
        )
        self.ledger.record_release(record)
        self.metrics.release_issued(reason)
        return record

    def reissue_at(self, record: ReleaseRecord) -> datetime:
        """When `record` is half-way to its expiry: the time to re-issue it."""
        issued = datetime.fromisoformat(record.issued_at)
        expires = datetime.fromisoformat(record.expires_at)
        return issued + (expires - issued) / 2

    def reissue_due(self, record: ReleaseRecord) -> bool:
        return self.now() >= self.reissue_at(record)
