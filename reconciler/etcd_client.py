"""Reaching etcd: the `--store etcd://...` URL, and calls that fail over between members.

    etcd://127.0.0.1:2379,127.0.0.1:22379/starmesh
           └──── the members, tried in turn ─────┘└ the key prefix (default /starmesh)

`EtcdConnection.call(fn)` runs `fn(client)` with an etcd3gw client for the member in use;
when that member cannot be reached it tries the next ones, and the first that answers
stays in use. Only when none answers does the call raise `StoreUnavailable` (a
StoreError), naming every member and why. Any other refusal from etcd is a StoreError.
Calls are synchronous HTTP (etcd's JSON gateway): call them from a worker thread, never
on the event loop. Keys are given without the prefix; `key(name)` adds it.

With `EtcdTLS` every member is reached over HTTPS: the server certificate is checked
against `ca` (the system's roots without it), and `cert` + `key` are the client
certificate etcd's `--client-cert-auth` asks for. A handshake that fails says so ("TLS
handshake with 127.0.0.1:2379 failed: ...") and what to check, rather than a bare
connection error.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import requests
from etcd3gw import exceptions as etcd_errors
from etcd3gw.client import Etcd3Client

from starmesh.reconciler.errors import StoreError, StoreUnavailable

__all__ = ["DEFAULT_PREFIX", "EtcdConnection", "EtcdTLS", "EtcdURL", "parse_etcd_url"]

DEFAULT_PREFIX = "/starmesh/"
DEFAULT_TIMEOUT = 5.0
"""Seconds one call to one member may take (connect and answer)."""

_HOST_PORT = re.compile(r"^(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[A-Za-z0-9.-]+)):(?P<port>[0-9]{1,5})$")
_PREFIX = re.compile(r"^/[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*/?$")
_T = TypeVar("_T")
_SSL_DETAIL = re.compile(r"SSL\w*Error\(\d+, ['\"]((?:\[SSL[^\]]*\] )?[^'\"(]*)")


@dataclass(frozen=True)
class EtcdURL:
    """The members to try, in order, and the key prefix every key lives under."""

    members: tuple[tuple[str, int], ...]
    prefix: str = DEFAULT_PREFIX

    def __str__(self) -> str:
        hosts = ",".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in self.members)
        return f"etcd://{hosts}{self.prefix.rstrip('/')}"


@dataclass(frozen=True)
class EtcdTLS:
    """HTTPS to every member: `ca` checks etcd's server certificates (None: the system's
    roots); `cert` and `key` (PEM files, both or neither) are this client's certificate."""

    ca: str | None = None
    cert: str | None = None
    key: str | None = None

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise ValueError("a client certificate needs both its certificate and its key")


def parse_etcd_url(text: str) -> EtcdURL:
    """`etcd://HOST:PORT[,HOST:PORT...][/PREFIX]`; ValueError saying what is wrong."""
    scheme, sep, rest = text.partition("://")
    if not sep or scheme != "etcd":
        raise ValueError(f"{text!r} is not an etcd URL: use etcd://HOST:PORT[,HOST:PORT...][/PREFIX]")
    hosts, slash, path = rest.partition("/")
    members: list[tuple[str, int]] = []
    for part in hosts.split(","):
        match = _HOST_PORT.match(part.strip())
        if match is None or not 0 < int(match["port"]) < 65536:
            raise ValueError(f"{text!r}: {part.strip()!r} is not HOST:PORT (e.g. 127.0.0.1:2379)")
        members.append((match["v6"] or match["host"], int(match["port"])))
    prefix = DEFAULT_PREFIX
    if slash and path:
        if not _PREFIX.match("/" + path):
            raise ValueError(f"{text!r}: the key prefix /{path} may hold only letters, digits, '.', '_', '-' and '/'")
        prefix = "/" + path.strip("/") + "/"
    return EtcdURL(tuple(members), prefix)


class EtcdConnection:
    """One etcd3gw client per member; calls go to the member in use and fail over (thread-safe)."""

    def __init__(self, url: EtcdURL, *, timeout: float = DEFAULT_TIMEOUT, tls: EtcdTLS | None = None) -> None:
        self.url = url
        self.timeout = timeout
        self.tls = tls
        self._clients = [self._new_client(host, port) for host, port in url.members]
        self._current = 0
        self._lock = threading.Lock()

    def key(self, name: str) -> str:
        """The etcd key for a store key (`releases/000000000007` → `/starmesh/releases/000000000007`)."""
        return self.url.prefix + name

    @property
    def member(self) -> str:
        """The member in use, HOST:PORT."""
        host, port = self.url.members[self._current]
        return f"{host}:{port}"

    def client(self) -> Etcd3Client:
        """The client for the member in use (for calls that must stay on one member, like a watch)."""
        return self._clients[self._current]

    def clone(self, client: Etcd3Client) -> Etcd3Client:
        """A new client for the same member as `client`, on a session of its own (a watch's:
        closing it leaves the other calls' connection pool alone); the caller closes it."""
        return self._new_client(client.host, client.port)

    def call(self, fn: Callable[[Etcd3Client], _T], what: str) -> _T:
        """`fn(client)` on the member in use, then on each other member while they cannot be
        reached; StoreUnavailable when none can, StoreError when etcd refuses (`what` names
        the operation in the message)."""
        with self._lock:
            start = self._current
        reasons: list[str] = []
        for step in range(len(self._clients)):
            index = (start + step) % len(self._clients)
            try:
                result = fn(self._clients[index])
            except (etcd_errors.ConnectionFailedError, etcd_errors.ConnectionTimeoutError) as exc:
                reasons.append(_tls_reason(self._name(index), _reason(exc, 2000)) or f"{self._name(index)}: {_reason(exc)}")
                continue
            except requests.RequestException as exc:  # a watch stream or a raw session call
                tls = _tls_reason(self._name(index), str(exc)) if isinstance(exc, requests.exceptions.SSLError) else None
                reasons.append(tls or f"{self._name(index)}: {type(exc).__name__}")
                continue
            except etcd_errors.Etcd3Exception as exc:
                raise StoreError(f"etcd refused {what}: {_reason(exc)}") from exc
            if index != start:
                with self._lock:
                    self._current = index
            return result
        raise StoreUnavailable(f"etcd cannot be reached for {what} ({'; '.join(reasons)})")

    def close(self) -> None:
        for client in self._clients:
            client.session.close()

    def _new_client(self, host: str, port: int) -> Etcd3Client:
        if self.tls is None:
            return Etcd3Client(host=host, port=port, timeout=self.timeout, api_path="/v3/")
        session = requests.Session()
        if self.tls.ca is not None:
            # requests lets REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE override a session's CA (its
            # issue 3829): with a CA of our own, the environment is not consulted at all
            session.trust_env = False
            session.verify = self.tls.ca
        if self.tls.cert is not None and self.tls.key is not None:
            session.cert = (self.tls.cert, self.tls.key)
        return Etcd3Client(
            host=host, port=port, protocol="https", timeout=self.timeout, api_path="/v3/", session=session
        )

    def _name(self, index: int) -> str:
        host, port = self.url.members[index]
        return f"{host}:{port}"


def _tls_reason(member: str, text: str) -> str | None:
    """A failed TLS handshake, said plainly with what to check; None when `text` is no TLS failure."""
    if "SSL" not in text:
        return None
    found = _SSL_DETAIL.search(text)
    detail = " ".join(found.group(1).split()) if found else "TLS error"
    if "CERTIFICATE_VERIFY_FAILED" in text or "certificate verify failed" in text:
        return f"{member}: etcd's server certificate is not trusted ({detail}): check --store-ca, the CA that signed it"
    return (
        f"{member}: etcd refused the TLS handshake ({detail}): it wants a client certificate signed by "
        "its --trusted-ca-file; check --store-cert and --store-key"
    )


def _reason(exc: Exception, limit: int = 300) -> str:
    detail = getattr(exc, "detail_text", None) or str(exc) or type(exc).__name__
    text = " ".join(str(detail).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"
