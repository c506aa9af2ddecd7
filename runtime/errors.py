"""The runtime package's exceptions.

    ProxyError                  anything the proxy refuses or cannot do; the message says what and why
     ├── ConfigRejected         a bundle (or endpoint table) that must not be applied: the NACK reason
     │    └── EndpointsError    an endpoint table (`--endpoints FILE`, the control plane) is invalid
     ├── LastKnownGoodError     the last-known-good files in the state dir are missing parts or corrupt
     └── ListenerError          a listener address is invalid or cannot be bound

Foreign errors (BundleError, OSError, msgspec's) are mapped at the boundary where they
are caught and re-raised `from exc`, with where it happened in the message.
"""

from __future__ import annotations

__all__ = ["ConfigRejected", "EndpointsError", "LastKnownGoodError", "ListenerError", "ProxyError"]


class ProxyError(Exception):
    """Root of the runtime's exceptions."""


class ConfigRejected(ProxyError):
    """A config that must not be applied; `str(exc)` is the reason reported (NACK, /config)."""


class EndpointsError(ConfigRejected):
    """An endpoint table is invalid (shape, service/version names, `host:port` addresses)."""


class LastKnownGoodError(ProxyError):
    """The last-known-good files cannot be read, or do not verify; they are never applied then."""


class ListenerError(ProxyError):
    """A listener address is invalid (`HOST:PORT`) or cannot be bound."""
