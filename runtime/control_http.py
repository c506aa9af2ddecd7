"""Talking to the control plane over HTTP: bounded requests, backoff, failover.

    Channel(settings)   one aiohttp session, the URLs (`Targets`) and the limits, shared by
                        the client's loops (control.py, control_endpoints.py) and its
                        reporter (control_report.py)
    Channel(settings, session=s)   the same on a session someone else owns (a fleet of
                        simulated proxies shares one pool, fleet.py): `open` and `close`
                        leave it alone

    channel.request("GET", url, cap=64 KiB, deadline=45 s, what="release")  ─► Answer(status, headers, body)
         │ a Content-Length over the cap: refused before reading
         │ a body streamed past the cap (no Content-Length, endless): cut at the cap
         │ anything slower than the deadline (connect, head, body): cut at the deadline
         ▼
    ControlPlaneError / ResponseTooLarge, naming the URL and what went wrong

`Targets` holds the `--control-plane` URLs and which one is in use: a failed request
moves to the next URL (failover), and the contact state (`connected`, `last_contact`)
is logged once per change, not once per retry. `Backoff` is the jittered exponential
delay every loop waits after a failure.

The session asks for `Accept-Encoding: identity` and does not decompress, so the caps
count the bytes that arrive and a compressed body cannot expand past them.

HTTPS with mesh certificates (`--ca-cert`): `ControlPlaneSettings.tls` gives the
`ssl.SSLContext` for each request (runtime/workload.py's: only the mesh root trusted, the
control plane's host name checked, the workload certificate presented once there is
one). It is asked for per request, so a rotated certificate is used from the next new
connection on; aiohttp pools connections per context, and a pooled one keeps its own.
"""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import aiohttp

from starmesh.runtime.errors import ControlPlaneError, ResponseTooLarge, WorkloadError

if TYPE_CHECKING:  # Ed25519 keys (cryptography) are loaded by the CLI, in the control-plane form
    from starmesh.bundle.keys import PublicKey

__all__ = [
    "Answer",
    "Backoff",
    "Channel",
    "ControlLimits",
    "ControlPlaneSettings",
    "Targets",
    "WorkloadLimits",
    "new_session",
    "snippet",
]

log = logging.getLogger("starmesh.proxy")

_CHUNK = 64 * 1024


@dataclass(frozen=True, slots=True)
class ControlLimits:
    """Byte caps, deadlines and backoff for the control-plane client (the defaults are the product's)."""

    envelope_bytes: int = 64 * 1024
    bundle_bytes: int = 64 * 1024 * 1024
    endpoints_bytes: int = 8 * 1024 * 1024
    answer_bytes: int = 64 * 1024
    """Heartbeat and status answers, and error bodies."""
    wait_seconds: float = 30.0
    """The long-poll hold asked for (`?wait=`); the request's deadline is this plus `poll_slack_seconds`."""
    poll_slack_seconds: float = 15.0
    request_seconds: float = 10.0
    """Deadline of a heartbeat or a status report."""
    bundle_seconds: float = 120.0
    """Deadline of a whole bundle fetch (64 MiB at ~0.5 MB/s)."""
    backoff_base: float = 0.2
    backoff_cap: float = 10.0
    nack_backoff_base: float = 1.0
    nack_backoff_cap: float = 60.0
    heartbeat_seconds: float = 5.0
    """Until the control plane's answer says otherwise."""
    quick_answer_seconds: float = 1.0
    """A long-poll answered faster than this with nothing to do counts as a soft failure (backoff)."""


@dataclass(frozen=True, slots=True)
class WorkloadLimits:
    """Bounds and timings of the workload certificate requests (runtime/workload.py; the
    defaults are the product's). Here, beside ControlLimits, so that `ProxyConfig` carries
    both without importing the certificate code."""

    request_seconds: float = 10.0
    answer_bytes: int = 64 * 1024
    backoff_base: float = 1.0
    backoff_cap: float = 60.0
    check_seconds: float = 300.0
    """The clock is looked at least this often while waiting (it may jump)."""
    min_renew_seconds: float = 1.0
    """At least this long between two certificates, whatever lifetime the CA gives."""


@dataclass(frozen=True, slots=True)
class ControlPlaneSettings:
    """Who the proxy is and whom it trusts: the control-plane form's part of `ProxyConfig`.

    `tls` gives the TLS context for https:// URLs (None: the system's default trust)."""

    urls: tuple[str, ...]
    trusted: tuple[PublicKey, ...]
    proxy_id: str
    service: str
    version: str
    limits: ControlLimits = ControlLimits()
    tls: Callable[[], ssl.SSLContext] | None = None


@dataclass(frozen=True, slots=True)
class Answer:
    """A complete answer: status, headers (lower-case names) and the whole body, within its cap."""

    url: str
    status: int
    headers: Mapping[str, str]
    body: bytes


def snippet(body: bytes, limit: int = 200) -> str:
    """The start of a body, for an error message."""
    text = body[:limit].decode("utf-8", errors="replace").strip()
    return text + ("…" if len(body) > limit else "")


def new_session(*, connections: int = 8, user_agent: str = "starmesh-proxy") -> aiohttp.ClientSession:
    """The client's one session: bounded connections, no decompression, no proxy from the environment."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=connections),
        timeout=aiohttp.ClientTimeout(total=None),
        auto_decompress=False,
        headers={"Accept-Encoding": "identity", "User-Agent": user_agent},
        trust_env=False,
    )


async def _read_capped(response: aiohttp.ClientResponse, cap: int, what: str) -> bytes:
    declared = response.content_length
    if declared is not None and declared > cap:
        response.close()
        raise ResponseTooLarge(f"the answer declares {declared} bytes, over the {cap}-byte cap for a {what}; not read")
    chunks: list[bytes] = []
    total = 0
    async for chunk in response.content.iter_chunked(_CHUNK):
        total += len(chunk)
        if total > cap:
            response.close()
            raise ResponseTooLarge(f"the answer went past the {cap}-byte cap for a {what}; the read was cut there")
        chunks.append(chunk)
    return b"".join(chunks)


class Backoff:
    """Jittered exponential delays: base × 2^failures, capped, times a random 0.5–1.0."""

    def __init__(self, base: float, cap: float, rng: random.Random) -> None:
        self.base = base
        self.cap = cap
        self.rng = rng
        self.failures = 0

    def next(self) -> float:
        """The delay before the next try (and count this failure)."""
        delay: float = min(self.cap, self.base * 2.0 ** min(self.failures, 32))
        self.failures += 1
        return delay * (0.5 + self.rng.random() / 2)

    def reset(self) -> None:
        self.failures = 0


class Targets:
    """The control-plane URLs in failover order, the one in use, and the contact state.

    `failovers` counts the moves to the next URL (a failure of the URL in use)."""

    def __init__(self, urls: tuple[str, ...], *, clock: Callable[[], float] = time.monotonic) -> None:
        if not urls:
            raise ValueError("at least one control-plane URL is needed")
        self.urls = urls
        self._index = 0
        self._clock = clock
        self.connected = False
        self.last_contact: str | None = None
        self._last_contact_at: float | None = None
        self.last_failure: str | None = None
        self.failovers = 0
        self._said_down = False

    @property
    def current(self) -> str:
        return self.urls[self._index]

    def succeeded(self, url: str) -> None:
        """A complete answer came from `url` (a late one from a URL left behind only counts as contact)."""
        self._last_contact_at = self._clock()
        self.last_contact = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        if url != self.current:
            return
        if not self.connected:
            log.info("control plane %s: connected", url)
        self.connected = True
        self._said_down = False

    def failed(self, url: str, reason: str) -> None:
        """A request to `url` failed: move on to the next URL.

        A failure of a URL already left behind (another loop moved on) is old news and
        changes nothing. Logged once when contact is lost (or never made), not per retry."""
        if url != self.current:
            return
        self.last_failure = reason
        if not self._said_down:
            more = f"; failing over among {len(self.urls)} URLs" if len(self.urls) > 1 else ""
            log.warning("control plane unavailable: %s; retrying with backoff%s", reason, more)
            self._said_down = True
        self.connected = False
        self._index = (self._index + 1) % len(self.urls)
        self.failovers += 1

    def age(self) -> float | None:
        """Seconds since the last contact (None: never)."""
        return None if self._last_contact_at is None else self._clock() - self._last_contact_at

    def to_json(self) -> dict[str, object]:
        return {"url": self.current, "last_contact": self.last_contact, "connected": self.connected}


class Channel:
    """The client's one session, its URLs (`targets`) and `limits`; `open` before use.

    Given a `session`, the channel uses that one and does not own it: `open` and `close`
    leave it alone (its owner closes it, after the channel's last request)."""

    def __init__(self, settings: ControlPlaneSettings, *, session: aiohttp.ClientSession | None = None) -> None:
        self.settings = settings
        self.limits = settings.limits
        self.targets = Targets(settings.urls)
        self._session = session
        self._owns_session = session is None

    def open(self) -> None:
        if self._owns_session:
            self._session = new_session()

    async def close(self) -> None:
        if self._owns_session and self._session is not None:
            await self._session.close()
            self._session = None

    async def request(
        self,
        method: str,
        url: str,
        *,
        cap: int,
        deadline: float,
        what: str,
        params: Mapping[str, str] | None = None,
        body: Any = None,
        headers: Mapping[str, str] | None = None,
    ) -> Answer:
        """One request with a byte cap on the body and a deadline on the whole exchange.

        Raises ResponseTooLarge past the cap, ControlPlaneError for everything else that
        goes wrong (refused, reset, timed out, not HTTP, the channel not open); any status
        is returned."""
        if self._session is None:
            raise ControlPlaneError(f"{what} ({method} {url}): the client is not running")
        tls = self.settings.tls
        try:
            context: ssl.SSLContext | bool = True if tls is None else tls()
            async with asyncio.timeout(deadline):
                async with self._session.request(
                    method, url, params=params, json=body, headers=headers, allow_redirects=False, ssl=context
                ) as response:
                    content = await _read_capped(response, cap, what)
                    headers = {name.lower(): value for name, value in response.headers.items()}
                    return Answer(str(response.url), response.status, headers, content)
        except TimeoutError:
            raise ControlPlaneError(f"{what} ({method} {url}): no complete answer within {deadline:g} s") from None
        except aiohttp.ClientError as exc:
            raise ControlPlaneError(f"{what} ({method} {url}): {type(exc).__name__}: {exc}") from exc
        except (ssl.SSLError, WorkloadError) as exc:
            raise ControlPlaneError(f"{what} ({method} {url}): TLS: {exc}") from exc
        except ResponseTooLarge as exc:
            raise ResponseTooLarge(f"{what} ({method} {url}): {exc}") from None
