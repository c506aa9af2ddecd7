"""How close the workload certificate is to expiry: the state and its log lines.

    none ─► valid ─► expiring ─► expired          (a new certificate: back to valid)
                     │ less than a quarter of the lifetime left and not renewed yet

Each change of state is logged once (a warning when it starts expiring, an error when it
has expired, a line when a renewal ends either), never once per retry. The gauge
`starmesh_certificate_expiry_seconds` is runtime/otel_gauges.py's.
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Literal

from starmesh.bundle.release import format_time
from starmesh.runtime.workload_cert import Credential

__all__ = ["Expiry", "ExpiryWatch"]

log = logging.getLogger("starmesh.proxy")

Expiry = Literal["none", "valid", "expiring", "expired"]


def state_of(credential: Credential | None, now: datetime) -> Expiry:
    if credential is None:
        return "none"
    if now >= credential.not_after:
        return "expired"
    return "expiring" if now >= credential.warn_at else "valid"


class ExpiryWatch:
    """The last expiry state seen, so that each change is logged once."""

    def __init__(self) -> None:
        self.state: Expiry = "none"

    @staticmethod
    def until_change(credential: Credential | None, now: datetime) -> float:
        """Seconds until the state changes by itself (inf: it will not)."""
        state = state_of(credential, now)
        if credential is None or state == "expired":
            return float("inf")
        edge = credential.warn_at if state == "valid" else credential.not_after
        return (edge - now).total_seconds()

    def note(self, credential: Credential | None, now: datetime, last_error: str | None) -> None:
        """Log a change of state, once; `last_error` says why renewals fail."""
        state = state_of(credential, now)
        previous, self.state = self.state, state
        if state == previous or credential is None:
            return
        since = "" if last_error is None else f"; last error: {last_error}"
        expires = format_time(credential.not_after)
        if state == "expiring":
            left = (credential.not_after - now).total_seconds()
            log.warning("workload certificate %s expires in %.0f s (%s) and is not renewed yet%s",
                        credential.spiffe_id, left, expires, since)  # fmt: skip
        elif state == "expired":
            log.error("workload certificate %s expired at %s: mesh connections fail until a new one is issued%s",
                      credential.spiffe_id, expires, since)  # fmt: skip
        elif previous in ("expiring", "expired"):
            log.info("workload certificate %s renewed: valid again until %s", credential.spiffe_id, expires)
