"""The sidecar proxy: listeners, the filter chain, atomic apply, last-known-good.

The names below are the public surface; docs/proxy.md draws the modules. Submodules:
`message` (Request, Response, Handler), `table` (RouteTable), `apply` (Applier: the one
apply path), `lkg` (last-known-good on disk), `endpoints` (the endpoint table),
`admin` (the admin listener), `startup` (what a proxy starts from), `proxy` (the
process), `control` (the control-plane client: release and endpoint long-polls,
heartbeats, ACK/NACK), `identity` (the proxy id kept in the state dir), `errors` (the
exception tree).
"""

# Names resolve on first use (PEP 562): importing one submodule (the CLI's argument
# checks, a filter) does not import the listeners, aiohttp or uvloop.
from __future__ import annotations

from typing import TYPE_CHECKING

from starmesh.bundle.lazy import lazy_exports

if TYPE_CHECKING:
    from starmesh.runtime.apply import AppliedConfig, Applier, ApplyResult, RejectedApply
    from starmesh.runtime.control import ControlLimits, ControlPlaneClient, ControlPlaneSettings
    from starmesh.runtime.endpoints import Endpoints, EndpointTable, parse_address, parse_endpoints
    from starmesh.runtime.errors import ConfigRejected, EndpointsError, LastKnownGoodError, ListenerError, ProxyError
    from starmesh.runtime.lkg import (
        HighWater,
        LastKnownGood,
        Origin,
        StoredState,
        load_last_known_good,
        load_state,
        save_last_known_good,
    )
    from starmesh.runtime.message import Filter, Handler, Request, Response, proxy_response
    from starmesh.runtime.proxy import Proxy, ProxyConfig, run_proxy
    from starmesh.runtime.table import RouteTable

__all__ = [
    "AppliedConfig",
    "Applier",
    "ApplyResult",
    "ConfigRejected",
    "ControlLimits",
    "ControlPlaneClient",
    "ControlPlaneSettings",
    "EndpointTable",
    "Endpoints",
    "EndpointsError",
    "Filter",
    "Handler",
    "HighWater",
    "LastKnownGood",
    "LastKnownGoodError",
    "ListenerError",
    "Origin",
    "Proxy",
    "ProxyConfig",
    "ProxyError",
    "RejectedApply",
    "Request",
    "Response",
    "RouteTable",
    "StoredState",
    "load_last_known_good",
    "load_state",
    "parse_address",
    "parse_endpoints",
    "proxy_response",
    "run_proxy",
    "save_last_known_good",
]

_WHERE: dict[str, str] = {
    "AppliedConfig": "starmesh.runtime.apply",
    "Applier": "starmesh.runtime.apply",
    "ApplyResult": "starmesh.runtime.apply",
    "ConfigRejected": "starmesh.runtime.errors",
    "ControlLimits": "starmesh.runtime.control",
    "ControlPlaneClient": "starmesh.runtime.control",
    "ControlPlaneSettings": "starmesh.runtime.control",
    "HighWater": "starmesh.runtime.lkg",
    "StoredState": "starmesh.runtime.lkg",
    "load_state": "starmesh.runtime.lkg",
    "EndpointTable": "starmesh.runtime.endpoints",
    "Endpoints": "starmesh.runtime.endpoints",
    "EndpointsError": "starmesh.runtime.errors",
    "Filter": "starmesh.runtime.message",
    "Handler": "starmesh.runtime.message",
    "LastKnownGood": "starmesh.runtime.lkg",
    "LastKnownGoodError": "starmesh.runtime.errors",
    "ListenerError": "starmesh.runtime.errors",
    "Origin": "starmesh.runtime.lkg",
    "Proxy": "starmesh.runtime.proxy",
    "ProxyConfig": "starmesh.runtime.proxy",
    "ProxyError": "starmesh.runtime.errors",
    "RejectedApply": "starmesh.runtime.apply",
    "Request": "starmesh.runtime.message",
    "Response": "starmesh.runtime.message",
    "RouteTable": "starmesh.runtime.table",
    "load_last_known_good": "starmesh.runtime.lkg",
    "parse_address": "starmesh.runtime.endpoints",
    "parse_endpoints": "starmesh.runtime.endpoints",
    "proxy_response": "starmesh.runtime.message",
    "run_proxy": "starmesh.runtime.proxy",
    "save_last_known_good": "starmesh.runtime.lkg",
}


__getattr__, __dir__ = lazy_exports(__name__, _WHERE, __all__)
