"""The runtime package's exceptions.

    ProxyError                  anything the proxy refuses or cannot do; the message says what and why
     ├── ConfigRejected         a bundle (or endpoint table) that must not be applied: the NACK reason,
     │                          and `reason`, the word it is counted under (RejectReason)
     │    └── EndpointsError    an endpoint table (`--endpoints FILE`, the control plane) is invalid
     ├── ControlPlaneError      a request to the control plane failed (unreachable, timed out, bad answer)
     │    └── ResponseTooLarge  its answer was over the byte cap for that kind of answer; the read was cut
     ├── IdentityError          the proxy id in the state dir cannot be read or written
     ├── LastKnownGoodError     the last-known-good files in the state dir are missing parts or corrupt
     ├── ListenerError          a listener address is invalid or cannot be bound
     ├── PeerRefused            an inbound connection refused: no TLS where required, no valid SVID
     └── WorkloadError          the workload certificate cannot be had: refused, not valid, no join token

Foreign errors (BundleError, OSError, msgspec's) are mapped at the boundary where they
are caught and re-raised `from exc`, with where it happened in the message.
"""

from __future__ import annotations

from typing import Literal, get_args

__all__ = [
    "REJECT_REASONS",
    "ConfigRejected",
    "ControlPlaneError",
    "EndpointsError",
    "IdentityError",
    "LastKnownGoodError",
    "ListenerError",
    "PeerRefused",
    "ProxyError",
    "RejectReason",
    "ResponseTooLarge",
    "WorkloadError",
]


class ProxyError(Exception):
    """Root of the runtime's exceptions."""


RejectReason = Literal[
    "unreadable",
    "invalid-bundle",
    "digest-mismatch",
    "validation",
    "golden-requests",
    "endpoints",
    "fetch-failed",
    "release-refused",
    "internal-error",
]
"""Why a config was refused, as one word: `starmesh_config_apply_total{result="rejected", reason}`.

    unreadable        a --bundle or --endpoints file cannot be read
    invalid-bundle    not a bundle: JSON, canonical bytes, schema
    digest-mismatch   the bundle does not hash to the digest its release names
    validation        the proxy's own validation, or a route chain that cannot be built
    golden-requests   the bundle's request_test()s fail against the new route table
    endpoints         an endpoint table: shape, addresses, services the bundle does not declare
    fetch-failed      the control plane did not hand over the bundle a release names
    release-refused   the signed release: signature, trusted key, version, expiry, size
    internal-error    building the route table failed in the proxy itself (a bug; see its log)
"""

REJECT_REASONS: tuple[RejectReason, ...] = get_args(RejectReason)
"""Every `RejectReason`, in the order above."""


class ConfigRejected(ProxyError):
    """A config that must not be applied; `str(exc)` is the reason reported (NACK, /config),
    `reason` the word it is counted under."""

    def __init__(self, message: str, *, reason: RejectReason) -> None:
        super().__init__(message)
        self.reason: RejectReason = reason


class EndpointsError(ConfigRejected):
    """An endpoint table is invalid (shape, service/version names, `host:port` addresses)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, reason="endpoints")


class ControlPlaneError(ProxyError):
    """A request to the control plane failed: refused, timed out, or answered with something unusable.

    The message names the URL and what went wrong; the client backs off and fails over."""


class ResponseTooLarge(ControlPlaneError):
    """An answer from the control plane was over its byte cap (declared or streamed); the read was cut."""


class IdentityError(ProxyError):
    """The proxy id file (`STATE_DIR/proxy-id`) cannot be read or written."""


class LastKnownGoodError(ProxyError):
    """The last-known-good files cannot be read, or do not verify; they are never applied then."""


class ListenerError(ProxyError):
    """A listener address is invalid (`HOST:PORT`) or cannot be bound."""


class PeerRefused(ProxyError):
    """An inbound connection was refused: no TLS where the service requires it, or no valid SVID.

    Raised per connection by the mesh listener (runtime/tls.py), counted and logged there
    (bounded); the connection is closed and the proxy keeps serving."""


class WorkloadError(ProxyError):
    """The workload certificate (mesh identity) cannot be obtained, loaded or used.

    The message says what: the control plane refused the request (and why), the answer
    is not a valid certificate for this proxy, or there is none and no join token to ask
    with. At start without any certificate and without `--join-token` it is a usage
    error (exit 2); later the proxy retries with backoff."""
