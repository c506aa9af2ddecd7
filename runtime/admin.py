"""The admin listener (`--admin`): health, readiness, the live config, explain, metrics.

    GET /healthz    200 while the process runs
    GET /readyz     200 once a config is applied (file, control plane, last-known-good), else 503 and why
    GET /config     JSON: release_version, bundle, applied_at, origin, service, version,
                    last_error (the last rejected apply and why), listeners,
                    control_plane ({url, last_contact, connected, proxy_id}; null in the --bundle form)
    GET /explain    ?service=S&path=P&method=M&source=S&header=name:value (header repeats):
                    the decision trace against the live table, as `starmesh explain --format json`
    GET /metrics    Prometheus text (text/plain; version=0.0.4): everything the proxy counts
                    and its state, rendered by OpenTelemetry's Prometheus exporter (otel_metrics.py)

aiohttp serves it: it is off the hot path, and an operator's curl deserves clear
answers. Requests here are not access-logged.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from starmesh.bundle.decide import RequestInfo, UnknownService
from starmesh.runtime.apply import Applier

__all__ = ["PROMETHEUS_CONTENT_TYPE", "AdminInfo", "admin_app", "start_admin"]

PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@dataclass(frozen=True, slots=True)
class AdminInfo:
    """What the admin listener reports besides the applied config.

    `listeners` maps a listener's name (outbound, inbound, admin, app) to its address;
    `metrics` renders the Prometheus text (ProxyMetrics.render, called in a worker
    thread); `not_ready` says why there is no config (None: no config has been offered
    yet); `control_plane` is `/config`'s block about the control-plane connection (None
    in the `--bundle` form)."""

    service: str
    version: str
    listeners: Mapping[str, str]
    metrics: Callable[[], bytes]
    not_ready: Callable[[], str | None]
    control_plane: Callable[[], Mapping[str, object] | None] = lambda: None


def _optional_dict(block: Mapping[str, object] | None) -> dict[str, object] | None:
    return None if block is None else dict(block)


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(
        status=status, text=json.dumps(data, indent=2, sort_keys=False) + "\n", content_type="application/json"
    )


def admin_app(applier: Applier, info: AdminInfo) -> web.Application:
    """The admin endpoints as an aiohttp application."""

    async def healthz(_: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(_: web.Request) -> web.Response:
        if applier.current is not None:
            return web.Response(text="ready\n")
        why = info.not_ready() or "no config applied yet"
        return web.Response(status=503, text=f"not ready: {why}\n")

    async def config(_: web.Request) -> web.Response:
        applied = applier.applied
        last_error = applier.last_error
        return _json(
            {
                "release_version": None if applied is None else applied.release_version,
                "bundle": None if applied is None else applied.digest,
                "applied_at": None if applied is None else applied.applied_at,
                "origin": None if applied is None else applied.origin,
                "service": info.service,
                "version": info.version,
                "last_error": None if last_error is None else last_error.to_json(),
                "listeners": dict(info.listeners),
                "control_plane": _optional_dict(info.control_plane()),
            }
        )

    async def explain(request: web.Request) -> web.Response:
        query = request.query
        service = query.get("service")
        if not service:
            return _json({"error": "give the service to explain: /explain?service=NAME&path=/&method=GET"}, 400)
        headers: list[tuple[str, str]] = []
        for item in query.getall("header", []):
            name, sep, value = item.partition(":")
            if not sep or not name.strip():
                return _json({"error": f"header {item!r} is not name:value"}, 400)
            headers.append((name.strip(), value.strip()))
        table = applier.current
        if table is None:
            why = info.not_ready() or "no config applied yet"
            return _json({"error": f"not ready: {why}"}, 503)
        info_ = RequestInfo(
            service=service,
            method=query.get("method", "GET"),
            path=query.get("path", "/"),
            headers=tuple(headers),
            source=query.get("source") or None,
        )
        try:
            decision = table.decisions.explain(info_)
        except UnknownService as exc:
            return _json({"error": str(exc)}, 404)
        return _json(decision.to_json())

    async def metrics(_: web.Request) -> web.Response:
        # Rendering thousands of samples takes tens of ms: in a worker thread, not on the loop.
        response = web.Response(body=await asyncio.to_thread(info.metrics))
        response.headers["Content-Type"] = PROMETHEUS_CONTENT_TYPE
        return response

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/config", config)
    app.router.add_get("/explain", explain)
    app.router.add_get("/metrics", metrics)
    return app


async def start_admin(applier: Applier, info: AdminInfo, host: str, port: int) -> tuple[web.AppRunner, str]:
    """Serve the admin app on host:port (0 = ephemeral); returns the runner and the bound `host:port`."""
    runner = web.AppRunner(admin_app(applier, info), access_log=None, handle_signals=False, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    bound = runner.addresses[0]
    return runner, _format_address(bound[0], bound[1])


def _format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
