"""The runtime package's exceptions.

    ProxyError                  anything the proxy refuses or cannot do; the message says what and why
     ├── ConfigRejected         a bundle (or endpoint table) that must not be applied: the NACK reason
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

__all__ = [
    "ConfigRejected",
    "ControlPlaneError",
    "EndpointsError",
    "IdentityError",
    "LastKnownGoodError",
    "ListenerError",
    "PeerRefused",
    "ProxyError",
    "ResponseTooLarge",
    "WorkloadError",
]


class ProxyError(Exception):
    """Root of the runtime's exceptions."""


class ConfigRejected(ProxyError):
    """A config that must not be applied; `str(exc)` is the reason reported (NACK, /config)."""


class EndpointsError(ConfigRejected):
    """An endpoint table is invalid (shape, service/version names, `host:port` addresses)."""


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
