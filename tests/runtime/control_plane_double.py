"""A control-plane double for the proxy's tests: DESIGN.md's proxy API, and bad answers on purpose.

    cp = ControlPlaneDouble()            # aiohttp on 127.0.0.1:0, its own event loop in a thread
    cp.publish(bundle)                   # signs release N+1 with cp.key; serves it and the bundle
    cp.offer(3, b"...", always=True)     # any bytes as "the newest release" (an `Offer`)
    cp.bundle_answers[digest] = "endless" | "huge-length" | "drip" | 404 | b"other bytes"
    cp.set_endpoints({"api": {"v1": ["127.0.0.1:7001"]}})
    cp.reports, cp.heartbeats, cp.release_polls, cp.events   # what proxies sent, in order
    cp.close()

Routes (DESIGN.md "Control plane ⇄ proxy"): GET /v1/release?after=N&proxy=ID&wait=S
(long-poll; 204 after the hold), GET /v1/bundles/<digest>, GET /v1/endpoints?after=N&wait=S,
POST /v1/proxies/<id> (heartbeat; answers heartbeat_seconds), POST /v1/proxies/<id>/status.
An offer with `always` is served whatever `after` says (a replay); `mode` "endless" streams
without a length until the client goes away, "huge-length" declares 100 MiB.

tests/runtime/conftest.py loads this file by path (tests have no packages) and hands the
double out as the `planes` and `cp` fixtures; it is not collected.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from aiohttp import web

from starmesh.bundle.canonical import digest_of
from starmesh.bundle.keys import PrivateKey, PublicKey
from starmesh.bundle.release import DEFAULT_TTL, issue_release

DEADLINE = 30.0
"""Seconds to wait for a condition; a bound on waiting, never an assertion about speed."""

_SAFETY_BYTES = 512 * 1024 * 1024  # an endless answer stops here even if nobody hangs up

BundleAnswer = bytes | int | Literal["endless", "huge-length", "drip"]


@dataclass(frozen=True)
class Offer:
    """What /v1/release answers: `body` as the envelope, announced as `version`."""

    version: int
    body: bytes = b""
    mode: Literal["envelope", "endless", "huge-length"] = "envelope"
    always: bool = False


@dataclass(frozen=True)
class Published:
    version: int
    digest: str
    envelope: bytes


@dataclass
class ControlPlaneDouble:
    """The double; every method may be called from the test's thread."""

    key: PrivateKey = field(default_factory=PrivateKey.generate)
    heartbeat_seconds: float = 0.2
    max_hold: float = 5.0

    def __post_init__(self) -> None:
        self.bundles: dict[str, bytes] = {}
        self.bundle_answers: dict[str, BundleAnswer] = {}
        self.reports: list[tuple[str, dict[str, Any]]] = []
        self.heartbeats: list[tuple[str, dict[str, Any]]] = []
        self.release_polls: list[dict[str, str]] = []
        self.published: list[Published] = []
        self.streamed: list[int] = []
        """Bytes each endless answer wrote before the client hung up."""
        self.events: list[str] = []
        """In order: "release" (a release answered with a body), "report", "heartbeat",
        "endpoints after N" (a poll), "endpoints N answered"."""
        self._offer: Offer | None = None
        self._endpoints: tuple[int, dict[str, dict[str, list[str]]]] = (0, {})
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self._changed: asyncio.Event = self._run(self._new_event())
        self.runner: web.AppRunner | None = None
        self.address = self._run(self._serve())
        self.url = f"http://{self.address}"

    @property
    def public_key(self) -> PublicKey:
        return self.key.public_key()

    # -- control from the test's thread ---------------------------------------------

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(DEADLINE)

    async def _new_event(self) -> asyncio.Event:
        return asyncio.Event()

    def _notify(self) -> None:
        async def swap() -> None:
            old, self._changed = self._changed, asyncio.Event()
            old.set()

        self._run(swap())

    def publish(
        self,
        data: bytes,
        *,
        version: int | None = None,
        now: datetime | None = None,
        ttl: timedelta = DEFAULT_TTL,
        key: PrivateKey | None = None,
        store: bool = True,
        serve: bool = True,
    ) -> Published:
        """Sign a release of `data` (next version unless given); serve it (`serve`) and the
        bundle (`store`)."""
        number = version if version is not None else (self.published[-1].version + 1 if self.published else 1)
        digest = digest_of(data)
        signed = issue_release(
            mesh="t",
            version=number,
            bundle=digest,
            previous=self.published[-1].digest if self.published else None,
            commit=None,
            key=key or self.key,
            now=now or datetime.now(UTC),
            ttl=ttl,
        )
        if store:
            self.bundles[digest] = data
        published = Published(number, digest, signed.envelope)
        self.published.append(published)
        if serve:
            self.offer(number, signed.envelope)
        return published

    def offer(
        self,
        version: int,
        body: bytes = b"",
        *,
        mode: Literal["envelope", "endless", "huge-length"] = "envelope",
        always: bool = False,
    ) -> None:
        """Answer /v1/release with `body`, announced as `version` (see `Offer`)."""
        self._offer = Offer(version, body, mode, always)
        self._notify()

    def set_endpoints(self, table: dict[str, dict[str, list[str]]]) -> None:
        self._endpoints = (self._endpoints[0] + 1, table)
        self._notify()

    def reports_of(self, proxy_id: str | None = None) -> list[dict[str, Any]]:
        return [body for who, body in list(self.reports) if proxy_id is None or who == proxy_id]

    def wait_for(self, test: Callable[[], Any], what: str) -> Any:
        end = time.monotonic() + DEADLINE
        while True:
            result = test()
            if result:
                return result
            if time.monotonic() > end:
                raise AssertionError(f"timed out waiting for {what}")
            time.sleep(0.01)

    def close(self) -> None:
        """Stop serving (a second call does nothing)."""
        if self.loop.is_closed():
            return

        async def stop() -> None:
            if self.runner is not None:
                await self.runner.cleanup()
            rest = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
            for task in rest:  # long-polls still held, streams still writing
                task.cancel()
            await asyncio.gather(*rest, return_exceptions=True)

        try:
            self._run(stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(DEADLINE)
            self.loop.close()

    # -- the API ---------------------------------------------------------------------

    async def _serve(self) -> str:
        app = web.Application()
        app.router.add_get("/v1/release", self._release)
        app.router.add_get("/v1/bundles/{digest}", self._bundle)
        app.router.add_get("/v1/endpoints", self._endpoints_poll)
        app.router.add_post("/v1/proxies/{id}", self._heartbeat)
        app.router.add_post("/v1/proxies/{id}/status", self._status)
        self.runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=0.5)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        host, port = self.runner.addresses[0][:2]
        return f"{host}:{port}"

    async def _hold(self, request: web.Request, ready: Callable[[], bool]) -> bool:
        """Wait until `ready()` or the hold ends; True when ready."""
        wait = min(float(request.query.get("wait", "30")), self.max_hold)
        end = asyncio.get_running_loop().time() + wait
        while not ready():
            remaining = end - asyncio.get_running_loop().time()
            if remaining <= 0:
                return False
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except TimeoutError:
                return False
        return True

    async def _release(self, request: web.Request) -> web.StreamResponse:
        self.release_polls.append(dict(request.query))
        after = int(request.query.get("after", "0"))

        def ready() -> bool:
            offer = self._offer
            return offer is not None and (offer.always or offer.version > after)

        if not await self._hold(request, ready):
            return web.Response(status=204)
        offer = self._offer
        assert offer is not None
        self.events.append("release")
        headers = {"x-starmesh-release-version": str(offer.version)}
        if offer.mode == "envelope":
            return web.Response(body=offer.body, headers=headers, content_type="application/json")
        return await self._stream(request, headers, length=100 * 1024 * 1024 if offer.mode == "huge-length" else None)

    async def _bundle(self, request: web.Request) -> web.StreamResponse:
        digest = request.match_info["digest"]
        answer = self.bundle_answers.get(digest)
        if answer is None:
            data = self.bundles.get(digest)
            if data is None:
                return web.json_response({"error": f"no bundle {digest}"}, status=404)
            return web.Response(body=data, content_type="application/json")
        if isinstance(answer, bytes):
            return web.Response(body=answer, content_type="application/json")
        if isinstance(answer, int):
            return web.json_response({"error": f"status {answer} on purpose"}, status=answer)
        if answer == "huge-length":
            return await self._stream(request, {}, length=100 * 1024 * 1024)
        return await self._stream(request, {}, drip=answer == "drip")

    async def _endpoints_poll(self, request: web.Request) -> web.Response:
        after = int(request.query.get("after", "0"))
        self.events.append(f"endpoints after {after}")
        if not await self._hold(request, lambda: self._endpoints[0] > after):
            return web.Response(status=204)
        version, table = self._endpoints
        self.events.append(f"endpoints {version} answered")
        return web.json_response({"version": version, "endpoints": table})

    async def _heartbeat(self, request: web.Request) -> web.Response:
        self.heartbeats.append((request.match_info["id"], await request.json()))
        self.events.append("heartbeat")
        return web.json_response({"heartbeat_seconds": self.heartbeat_seconds, "ttl_seconds": 3 * self.heartbeat_seconds})

    async def _status(self, request: web.Request) -> web.Response:
        self.reports.append((request.match_info["id"], await request.json()))
        self.events.append("report")
        return web.json_response({"ok": True})


    async def _stream(
        self, request: web.Request, headers: dict[str, str], *, length: int | None = None, drip: bool = False
    ) -> web.StreamResponse:
        """Write bytes until the client hangs up (bounded by _SAFETY_BYTES)."""
        response = web.StreamResponse(headers=headers)
        if length is not None:
            response.content_length = length
        await response.prepare(request)
        chunk = b"x" if drip else b"x" * 65536
        written = 0
        try:
            while written < _SAFETY_BYTES:
                await response.write(chunk)
                written += len(chunk)
                if drip:
                    await asyncio.sleep(0.05)
        except (ConnectionError, RuntimeError):
            pass
        self.streamed.append(written)
        return response
