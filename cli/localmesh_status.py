"""What a local mesh is doing, condensed from the control plane's `/v1/status`.

    GET /v1/status ─► StatusDocument (cli/status.py) ─► condense() ─► MeshStatus
        release {version, bundle, commit}      release_version, release_bundle, release_commit
        last_compile {ok, commit, diagnostics} compile_ok, compile_commit, first_diagnostic
        rollout {phase, version}               rollout_phase, rollout_version
        proxies [{id, service, state, ...}]    proxies (ProxyView)

`starmesh up` shows a MeshStatus in its live view and compares two of them to say what
changed; `reachable` is False (and `error` says why) when the control plane did not
answer. `fetch_status` and `fetch_registered` ask the control plane (aiohttp; every
answer is capped at 8 MiB and every call at the session's timeout).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass

import aiohttp
import msgspec

from starmesh.cli.control_client import printable
from starmesh.cli.status import StatusDocument

__all__ = ["MAX_ANSWER_BYTES", "MeshStatus", "ProxyView", "condense", "fetch_registered", "fetch_status"]

MAX_ANSWER_BYTES = 8 * 1024 * 1024


@dataclass(frozen=True)
class ProxyView:
    """One proxy as the control plane sees it."""

    id: str
    service: str
    version: str
    state: str
    release_version: int | None
    error: str | None


@dataclass(frozen=True)
class MeshStatus:
    """The release, the last compile, the rollout and every proxy, at one poll."""

    reachable: bool
    error: str | None = None
    release_version: int | None = None
    release_bundle: str | None = None
    release_commit: str | None = None
    compile_ok: bool | None = None
    compile_commit: str | None = None
    first_diagnostic: str | None = None
    rollout_phase: str | None = None
    rollout_version: int | None = None
    proxies: tuple[ProxyView, ...] = ()

    @classmethod
    def unreachable(cls, why: str) -> MeshStatus:
        return cls(reachable=False, error=why)

    def synced(self, ids: Iterable[str]) -> set[str]:
        """Which of `ids` run the release meant for them."""
        wanted = set(ids)
        return {proxy.id for proxy in self.proxies if proxy.id in wanted and proxy.state == "synced"}

    def all_on(self, ids: Iterable[str], version: int) -> bool:
        """Whether every one of `ids` is synced on release `version`."""
        wanted = set(ids)
        on = {p.id for p in self.proxies if p.id in wanted and p.state == "synced" and p.release_version == version}
        return on == wanted


def condense(doc: StatusDocument) -> MeshStatus:
    """The parts of a status document `starmesh up` shows (strings made printable)."""
    release, compiled, rollout = doc.release, doc.last_compile, doc.rollout
    first: str | None = None
    if compiled is not None and compiled.diagnostics:
        d = compiled.diagnostics[0]
        where = f"{d.file}:{d.line}:{d.col}: " if d.file and d.line is not None else f"{d.file}: " if d.file else ""
        first = printable(f"{where}{d.code + ' ' if d.code else ''}{d.message}")
    return MeshStatus(
        reachable=True,
        release_version=None if release is None else release.version,
        release_bundle=None if release is None else release.bundle,
        release_commit=None if release is None else release.commit,
        compile_ok=None if compiled is None else compiled.ok,
        compile_commit=None if compiled is None else compiled.commit,
        first_diagnostic=first,
        rollout_phase=None if rollout is None else rollout.phase,
        rollout_version=None if rollout is None else rollout.version,
        proxies=tuple(
            ProxyView(
                id=printable(p.id),
                service=printable(p.service or "-"),
                version=printable(p.version or "-"),
                state=printable(p.state),
                release_version=p.release_version,
                error=None if p.error is None else printable(p.error),
            )
            for p in doc.proxies
        ),
    )


class _Registered(msgspec.Struct, frozen=True):
    state: str
    service: str | None = None
    version: str | None = None
    address: str | None = None


class _RegisteredAnswer(msgspec.Struct, frozen=True):
    proxies: list[_Registered] = msgspec.field(default_factory=list)


async def _get(session: aiohttp.ClientSession, url: str) -> bytes:
    """The body of a 200 answer; ValueError saying why otherwise (aiohttp and OS errors pass)."""
    async with session.get(url) as answer:
        body = await answer.content.read(MAX_ANSWER_BYTES + 1)
        if answer.status != 200:
            raise ValueError(f"{url} answered HTTP {answer.status}")
    if len(body) > MAX_ANSWER_BYTES:
        raise ValueError(f"{url} answered more than {MAX_ANSWER_BYTES} bytes")
    return body


async def fetch_status(session: aiohttp.ClientSession, base_url: str) -> MeshStatus:
    """`GET /v1/status`, condensed; MeshStatus.unreachable(why) when there is no good answer."""
    url = f"{base_url}/v1/status"
    try:
        return condense(msgspec.json.decode(await _get(session, url), type=StatusDocument))
    except msgspec.DecodeError as exc:
        return MeshStatus.unreachable(f"{url} answered something that is not a status document: {exc}")
    except ValueError as exc:
        return MeshStatus.unreachable(str(exc))
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
        return MeshStatus.unreachable(f"{url}: {exc or type(exc).__name__}")


async def fetch_registered(session: aiohttp.ClientSession, base_url: str) -> set[tuple[str, str, str]]:
    """(service, version, address) of every live proxy in `/v1/status`: what the control
    plane's endpoint table lists (it is made of live registrations). Empty when it does not
    answer. (`/v1/endpoints` itself is served only to a client with a mesh certificate.)"""
    url = f"{base_url}/v1/status"
    try:
        proxies = msgspec.json.decode(await _get(session, url), type=_RegisteredAnswer).proxies
    except (ValueError, aiohttp.ClientError, asyncio.TimeoutError, OSError):  # DecodeError is a ValueError
        return set()
    return {
        (p.service, p.version, p.address)
        for p in proxies
        if p.state != "stale" and p.service is not None and p.version is not None and p.address is not None
    }
