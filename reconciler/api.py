"""The control plane's HTTP API: what proxies, `starmesh status` and `starmesh rollback` call.

    GET  /v1/release?after=N&proxy=ID&wait=S  long-poll: the signed envelope of the release meant
                                              for ID (staged rollouts) once its version is > N
    GET  /v1/bundles/sha256:<hex>             immutable bundle bytes
    GET  /v1/endpoints?after=N&wait=S         long-poll: {"version", "endpoints": {svc: {ver: [addr]}}}
    POST /v1/proxies/<id>                     register / heartbeat {service, version, address,
                                              release_version, bundle, requests_total}
                                              ─► {heartbeat_seconds, ttl_seconds}
    POST /v1/proxies/<id>/status              ACK / NACK {version, bundle, error} ─► {"state"}
    GET  /v1/status                           release, last compile, every proxy (with the release
                                              meant for it, how far behind, its request rate), the rollout
    GET  /metrics                             the control plane's metrics, Prometheus text (metrics.py)
    POST /v1/rollback                         {"to": "sha256:<hex>"} ─► {"release": {...}}
    GET  /healthz, /readyz                    the control plane's own health
    POST /v1/certificates                     with mesh identity only: {service, csr} ─► {certificate,
                                              ca, expires_at} (join token or the caller's own SVID)

Long-polls hold for `wait` seconds (default 30, at most 300) and answer 204 when nothing
newer came; at most `max_long_polls` are held at once (past it: 503 with Retry-After).
A proxy that NACKed the release it is offered gets it again only after the rollout's
NACK backoff (`Rollout.nack_hold`): until then its long-poll holds, or answers 204.
Every long-poll ends when the app shuts down, so SIGTERM never waits out a hold.

With mesh identity (`make_app(..., identity=)`, served over TLS) the proxy routes
(release, endpoints, proxies) need a valid client SVID (401 otherwise), and a proxy
registers and reports only as its certificate's service (403); /healthz, /readyz,
/metrics, /v1/status, /v1/rollback and /v1/bundles stay open to operators (`starmesh diff
--against` reads the bundle a release names: content-addressed policy, the same bytes
the policy repository compiles to, whose digest /v1/status already shows).
certificates.py has the checks.

Request bodies are JSON checked with msgspec; bodies over 64 KiB are 413. Every refusal
is a 4xx (or 503) with `{"error": "..."}` that says what is wrong and what to do.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import msgspec
from aiohttp import web
from aiohttp.typedefs import Handler

from starmesh.bundle.canonical import is_digest
from starmesh.reconciler.certificates import MeshIdentity, caller_mismatch, issue_route, require_svid
from starmesh.reconciler.errors import (
    InvalidRegistration,
    NotLeader,
    ReconcilerError,
    RegistryFull,
    StoreError,
    UnknownBundle,
)
from starmesh.reconciler.ledger import Ledger
from starmesh.reconciler.metrics import CONTENT_TYPE, ControlPlaneMetrics
from starmesh.reconciler.model import CompileStatus
from starmesh.reconciler.registry import Registry, check_proxy_id
from starmesh.reconciler.rollout import Rollout

if TYPE_CHECKING:  # ha.py carries the etcd client: loaded only with --store
    from starmesh.reconciler.ha import Forwarded

__all__ = ["DEFAULT_WAIT", "MAX_BODY", "MAX_LONG_POLLS", "MAX_WAIT", "ApiDeps", "make_app"]

DEFAULT_WAIT = 30.0
MAX_WAIT = 300.0
MAX_BODY = 64 * 1024
MAX_LONG_POLLS = 20_000
_BUNDLE_CACHE = 4  # bundles kept in memory: a release's bundle is fetched by every proxy at once
_T = TypeVar("_T")


@dataclass(frozen=True)
class ApiDeps:
    """What the API serves from. `ready` is None when ready, else why not (the 503 body);
    `extra_status` adds keys to `/v1/status` (with `--store`, "control_plane"). `metrics`
    are served at `/metrics`, its gauges bound to the registry, rollout and ledger here;
    without it the app makes its own (then only the gauges move: the events are
    counted by whoever was given the metrics)."""

    ledger: Ledger
    registry: Registry
    rollout: Rollout
    last_compile: Callable[[], CompileStatus | None]
    ready: Callable[[], str | None]
    extra_status: Callable[[], dict[str, object]] = dict
    metrics: ControlPlaneMetrics | None = None
    on_proxy_change: Callable[[str], None] = lambda _proxy_id: None
    """Called after a heartbeat or report changed a proxy here (HA: share its record)."""
    forward: Callable[[str, bytes], Awaitable[Forwarded]] | None = None
    """HA: send a follower's write request (rollback) to the leader; None: this process decides."""


class _Heartbeat(msgspec.Struct, frozen=True):
    service: str
    version: str
    address: str
    release_version: int | None = None
    bundle: str | None = None
    requests_total: int | None = None  # older proxies omit it


class _Report(msgspec.Struct, frozen=True):
    version: int | None
    bundle: str | None
    error: str | None = None


class _Rollback(msgspec.Struct, frozen=True):
    to: str


class _Problem(Exception):
    """A request refused: the status and the `{"error": ...}` message."""

    def __init__(self, status: int, message: str, *, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.retry_after = status, message, retry_after


class _LongPolls:
    """The long-polls held now (bounded) and the app's closing, which ends them all."""

    def __init__(self, limit: int) -> None:
        self.limit, self.active = limit, 0
        self.closing = asyncio.Event()

    @contextlib.contextmanager
    def slot(self) -> Iterator[None]:
        if self.active >= self.limit:
            raise _Problem(503, f"{self.limit} long-polls are held already; try again shortly", retry_after=5)
        self.active += 1
        try:
            yield
        finally:
            self.active -= 1

    async def hold(self, waiting: Coroutine[Any, Any, _T]) -> _T | None:
        """Await `waiting` unless the app closes first (then None)."""
        if self.closing.is_set():
            waiting.close()
            return None
        task = asyncio.ensure_future(waiting)
        closing = asyncio.ensure_future(self.closing.wait())
        try:
            await asyncio.wait((task, closing), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for pending in (task, closing):
                pending.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await pending
        return task.result() if not task.cancelled() else None


def make_app(
    deps: ApiDeps, *, max_long_polls: int = MAX_LONG_POLLS, identity: MeshIdentity | None = None
) -> web.Application:
    """The API as an aiohttp application (serve it with AppRunner/TCPSite; with `identity`,
    over TLS with `certificates.ServerTLS`'s context, since the proxy routes read the
    caller's client certificate)."""
    ledger, registry, rollout = deps.ledger, deps.registry, deps.rollout
    polls = _LongPolls(max_long_polls)
    bundle_bytes = functools.lru_cache(maxsize=_BUNDLE_CACHE)(ledger.bundle)
    endpoints_body: dict[int, bytes] = {}
    metrics = deps.metrics if deps.metrics is not None else ControlPlaneMetrics()
    metrics.observe(
        proxies=lambda: registry.states(rollout.state_of),
        rollout=rollout.progress,
        release_version=lambda: None if (current := ledger.current()) is None else current.version,
    )

    async def release(request: web.Request) -> web.StreamResponse:
        after, wait = _after(request), _wait(request)
        proxy = request.query.get("proxy")
        if proxy is not None:
            _check_id(proxy)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        with polls.slot():
            while not polls.closing.is_set():
                record, remaining = rollout.release_for(proxy), deadline - loop.time()
                newer = record is not None and record.version > after
                hold = rollout.nack_hold(proxy) if newer and proxy is not None else 0.0
                if record is not None and newer and hold <= 0:
                    headers = {"x-starmesh-release-version": str(record.version), "cache-control": "no-store"}
                    return web.Response(body=record.envelope, content_type="application/json", headers=headers)
                if remaining <= 0:
                    break
                # Wait for something newer than what the proxy has, or (held after a NACK)
                # for the hold to pass or a release newer than the one it refused.
                seen = record.version if record is not None and newer else after
                await polls.hold(rollout.wait_release(proxy, seen, min(hold, remaining) if hold > 0 else remaining))
        return web.Response(status=204)

    async def bundle(request: web.Request) -> web.Response:
        digest = request.match_info["digest"]
        if not is_digest(digest):
            raise _Problem(400, f"{digest[:80]!r} is not a bundle digest: use /v1/bundles/sha256:<64 lowercase hex>")
        try:
            data = await asyncio.to_thread(bundle_bytes, digest)
        except UnknownBundle as exc:
            raise _Problem(404, str(exc)) from None
        headers = {"cache-control": "public, max-age=31536000, immutable", "etag": f'"{digest}"'}
        return web.Response(body=data, content_type="application/json", headers=headers)

    async def endpoints(request: web.Request) -> web.Response:
        after, wait = _after(request), _wait(request)
        with polls.slot():
            answer = await polls.hold(registry.wait_endpoints(after, wait))
        if answer is None:
            return web.Response(status=204)
        version, table = answer
        body = endpoints_body.get(version)
        if body is None:
            body = msgspec.json.encode({"version": version, "endpoints": table})
            endpoints_body.clear()
            endpoints_body[version] = body
        return web.Response(body=body, content_type="application/json", headers={"cache-control": "no-store"})

    async def heartbeat(request: web.Request) -> web.Response:
        proxy_id = _check_id(request.match_info["proxy_id"])
        beat = await _body(request, _Heartbeat, "heartbeat")
        _check_caller(request, registry, proxy_id, beat.service)
        try:
            registry.heartbeat(
                proxy_id, beat.service, beat.version, beat.address,
                release_version=beat.release_version, bundle=beat.bundle, requests_total=beat.requests_total,
            )  # fmt: skip
        except InvalidRegistration as exc:
            raise _Problem(400, str(exc)) from None
        except RegistryFull as exc:
            raise _Problem(503, str(exc), retry_after=30) from None
        deps.on_proxy_change(proxy_id)
        return _json({"heartbeat_seconds": registry.heartbeat_seconds, "ttl_seconds": registry.ttl})

    async def report(request: web.Request) -> web.Response:
        proxy_id = _check_id(request.match_info["proxy_id"])
        sent = await _body(request, _Report, "status report")
        _check_caller(request, registry, proxy_id, None)
        try:
            registry.report(proxy_id, sent.version, sent.bundle, sent.error)
        except InvalidRegistration as exc:
            raise _Problem(400, str(exc)) from None
        except KeyError:
            raise _Problem(
                404, f"proxy {proxy_id} is not registered (or was forgotten): POST /v1/proxies/{proxy_id} first"
            ) from None
        rollout.on_report(proxy_id, sent.version, sent.bundle, sent.error)
        deps.on_proxy_change(proxy_id)
        entry = registry.get(proxy_id)
        return _json({"state": None if entry is None else rollout.state_of(entry)})

    def proxy_records() -> list[dict[str, object]]:
        versions, now, records = rollout.issued_versions(), registry.clock(), []
        for entry in registry.entries():
            desired, behind = rollout.lag(entry, versions)
            record = registry.record(entry, rollout.state_of(entry), now=now, desired=desired, behind=behind)
            records.append(record.to_json())
        return records

    async def status(_: web.Request) -> web.Response:
        current, compiled = ledger.current(), deps.last_compile()
        release = None if current is None else current.to_json()
        document: dict[str, object] = {
            "release": None if release is None else {k: release[k] for k in ("version", "bundle", "previous", "commit", "reason")},
            "last_compile": None if compiled is None else compiled.to_json(),
            "proxies": proxy_records(),
            "rollout": rollout.to_json(),
            **deps.extra_status(),
        }  # fmt: skip
        return _json(document)

    async def rollback(request: web.Request) -> web.Response:
        asked = await _body(request, _Rollback, "rollback request")
        if not is_digest(asked.to):
            raise _Problem(400, f"\"to\" {asked.to[:80]!r} is not a bundle digest like sha256:<64 lowercase hex>")
        if deps.forward is not None and not rollout.writable:  # a follower: the leader signs
            try:
                answer = await deps.forward("/v1/rollback", msgspec.json.encode(asked))
            except ReconcilerError as exc:
                raise _Problem(503, f"this replica follows and cannot forward the rollback: {exc}", retry_after=5) from None
            return web.Response(status=answer.status, body=answer.body, content_type="application/json")
        try:
            record = rollout.rollback(asked.to)
        except UnknownBundle as exc:
            raise _Problem(404, f"cannot roll back to {asked.to}: {exc}") from None
        except NotLeader as exc:
            raise _Problem(503, f"this replica just stopped leading: {exc}; try again", retry_after=5) from None
        return _json({"release": record.to_json()})

    async def metrics_text(_: web.Request) -> web.Response:
        return web.Response(body=metrics.render(), headers={"content-type": CONTENT_TYPE, "cache-control": "no-store"})

    async def healthz(_: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(_: web.Request) -> web.Response:
        why = deps.ready()
        return web.Response(text="ready\n") if why is None else web.Response(status=503, text=f"not ready: {why}\n")

    async def sweeper(_: web.Application) -> AsyncIterator[None]:
        """Stale proxies leave the endpoint table (and wake its long-polls) without waiting for a read."""
        task = asyncio.get_running_loop().create_task(_sweep(registry), name="starmesh-registry-sweep")
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def closing(_: web.Application) -> None:
        polls.closing.set()

    async def own_metrics_closed(_: web.Application) -> None:
        if deps.metrics is None:
            metrics.close()

    # The proxies' routes: with mesh identity, only for callers with a valid client SVID.
    proxies_only = _unguarded if identity is None else require_svid(identity)
    app = web.Application(client_max_size=MAX_BODY, middlewares=[_errors])
    app.router.add_get("/v1/release", proxies_only(release))
    app.router.add_get("/v1/bundles/{digest}", bundle)  # open: `diff --against` reads it (module docs)
    app.router.add_get("/v1/endpoints", proxies_only(endpoints))
    app.router.add_post("/v1/proxies/{proxy_id}", proxies_only(heartbeat))
    app.router.add_post("/v1/proxies/{proxy_id}/status", proxies_only(report))
    app.router.add_post("/v1/certificates", _no_certificates if identity is None else issue_route(identity))
    app.router.add_get("/v1/status", status)
    app.router.add_post("/v1/rollback", rollback)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_text)  # open, like /v1/status: what operators scrape
    app.cleanup_ctx.append(sweeper)
    app.on_shutdown.append(closing)
    app.on_cleanup.append(own_metrics_closed)
    return app


def _unguarded(handler: Handler) -> Handler:
    return handler


async def _no_certificates(_: web.Request) -> web.Response:
    raise _Problem(404, "this control plane issues no certificates: it runs without --ca (plain HTTP, no mesh identity)")


def _check_caller(request: web.Request, registry: Registry, proxy_id: str, service: str | None) -> None:
    entry = registry.get(proxy_id)
    why = caller_mismatch(request, proxy_id, claimed=service, registered=None if entry is None else entry.service)
    if why is not None:
        raise _Problem(403, why)


async def _sweep(registry: Registry) -> None:
    interval = min(1.0, registry.heartbeat_seconds / 2)
    while True:
        await asyncio.sleep(interval)
        registry.sweep()


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Refusals as `{"error": ...}` JSON; a failing state store as 503 (try again)."""
    try:
        return await handler(request)
    except _Problem as problem:
        response = _json({"error": problem.message}, problem.status)
        if problem.retry_after is not None:
            response.headers["retry-after"] = str(problem.retry_after)
        return response
    except StoreError as exc:
        return _json({"error": f"the control plane's state store failed: {exc}; try again"}, 503)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return _json({"error": f"{exc.reason}: {request.method} {request.path}"}, exc.status)


def _json(document: object, status: int = 200) -> web.Response:
    return web.Response(status=status, body=msgspec.json.encode(document), content_type="application/json")


def _check_id(proxy_id: str) -> str:
    try:
        return check_proxy_id(proxy_id)
    except InvalidRegistration as exc:
        raise _Problem(400, str(exc)) from None


def _after(request: web.Request) -> int:
    text = request.query.get("after", "0")
    if not text.isdigit() or len(text) > 18:
        raise _Problem(400, f"after={text[:40]!r}: give the version you have, a whole number >= 0")
    return int(text)


def _wait(request: web.Request) -> float:
    text = request.query.get("wait")
    if text is None:
        return DEFAULT_WAIT
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not math.isfinite(seconds) or seconds < 0:
        raise _Problem(400, f"wait={text[:40]!r}: give the seconds to hold, a number from 0 to {MAX_WAIT:g}")
    return min(seconds, MAX_WAIT)


async def _body(request: web.Request, kind: type[_T], what: str) -> _T:
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise _Problem(413, f"the {what} is over {MAX_BODY} bytes") from None
    try:
        return msgspec.json.decode(raw, type=kind)
    except msgspec.ValidationError as exc:
        raise _Problem(400, f"invalid {what}: {exc}") from None
    except msgspec.DecodeError as exc:
        raise _Problem(400, f"the {what} is not JSON: {exc}") from None
