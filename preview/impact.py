"""Sample requests decided before and after: where each went, and what changed.

`starmesh diff --requests FILE` names requests to try; the policies' golden requests
(`request_test`, either side's) are always tried first. Each is decided on both sides
with `DecisionTable.explain`, the very code the proxy runs, and flagged:

- "destination": the decided shares differ (versions at 0% ignored), or the request
  now gets no rule (404 `no-route`) or now gets one;
- "authorization": `allowed` differs, or one side does not declare the service;
- "response": the answer the proxy itself gives differs (404 `no-route`, 403
  `denied`, a fault aborting every request).

A side that does not declare the request's service gets `Outcome(error=...)`. For the
flags it counts as what its proxy does with such a request: 404 `no-route`, no
destination, authorization unknown.

The requests file is a JSON array of objects, `request_test` without expectations:

    [{"name": "jason reads reviews", "service": "reviews", "method": "GET",
      "path": "/reviews/1", "headers": {"end-user": "jason"}, "source": "productpage"}]

Only `service` is required; the values are checked as the policy language checks a
`request_test`'s (compiler/values.py). Items are numbered from 1 in messages.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from starmesh.bundle.decide import DecisionTable, UnknownService
from starmesh.bundle.explain import RequestInfo, header_map
from starmesh.bundle.files import read_bounded
from starmesh.bundle.spec import Spec
from starmesh.compiler.values import (
    ValueProblem,
    check_field_value,
    check_header_name,
    check_method,
    check_name,
    check_path,
)
from starmesh.preview.model import ImpactFlag, Outcome, RequestImpact

__all__ = [
    "MAX_REQUESTS",
    "MAX_REQUESTS_BYTES",
    "RequestsFileError",
    "SampleRequest",
    "decide",
    "golden_samples",
    "impact_flags",
    "load_requests",
    "request_impacts",
]

MAX_REQUESTS_BYTES = 1 << 20
"""A requests file holds at most 1 MiB."""
MAX_REQUESTS = 10_000
"""... and at most this many requests."""

_KEYS = ("name", "service", "method", "path", "headers", "source")
_NO_ROUTE: Mapping[str, Any] = {"status": 404, "reason": "no-route"}
"""What a proxy answers for a service its bundle does not declare (runtime/table.py)."""


@dataclass(frozen=True, slots=True)
class SampleRequest:
    """A request to decide on both sides, under a name people recognise."""

    name: str
    request: RequestInfo

    def to_json(self) -> dict[str, Any]:
        """The explain JSON's request object plus the service (RequestImpact.request)."""
        req = self.request
        return {
            "service": req.service,
            "method": req.method.upper(),
            "path": req.path,
            "headers": dict(sorted(header_map(req.headers).items())),
            "source": req.source,
        }


class RequestsFileError(ValueError):
    """The requests file cannot be read or is not a list of requests; the message names
    the file and the item."""


# -- reading the requests file -------------------------------------------------------------


class _Object(list[tuple[str, Any]]):
    """A JSON object as its (key, value) pairs, so repeated keys are seen, not lost."""


def load_requests(path: Path) -> list[SampleRequest]:
    """The sample requests in `path`, checked. Raises RequestsFileError."""
    shown = str(path)
    try:
        data = read_bounded(path, MAX_REQUESTS_BYTES)
    except OSError as exc:
        raise RequestsFileError(f"{shown}: cannot read it: {exc.strerror or exc}") from exc
    if data is None:
        raise RequestsFileError(f"{shown}: larger than 1 MiB; is it the right file?")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RequestsFileError(f"{shown}: not UTF-8 text (byte {exc.start})") from exc
    try:
        items = json.loads(text, object_pairs_hook=_Object, parse_constant=_no_constant)
    except json.JSONDecodeError as exc:
        raise RequestsFileError(f"{shown}:{exc.lineno}:{exc.colno}: not valid JSON: {exc.msg}") from exc
    except ValueError as exc:  # NaN or Infinity
        raise RequestsFileError(f"{shown}: not valid JSON: {exc}") from exc
    except RecursionError as exc:
        raise RequestsFileError(f"{shown}: JSON nested too deeply to be a list of requests") from exc
    if not isinstance(items, list) or isinstance(items, _Object):
        raise RequestsFileError(f'{shown}: expected a JSON array of requests, e.g. [{{"service": "reviews"}}]')
    if len(items) > MAX_REQUESTS:
        raise RequestsFileError(f"{shown}: {len(items):,} requests; at most {MAX_REQUESTS:,} are allowed")
    samples: list[SampleRequest] = []
    taken: dict[str, int] = {}
    for number, item in enumerate(items, start=1):
        sample = _sample(shown, number, item, taken)
        taken[sample.name] = number
        samples.append(sample)
    return samples


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _sample(shown: str, number: int, item: Any, taken: Mapping[str, int]) -> SampleRequest:
    """One item of the file as a SampleRequest; `taken` maps the names used so far."""
    if not isinstance(item, _Object):
        raise RequestsFileError(f"{shown}: item {number}: expected an object with at least a \"service\"")
    given = next((value for key, value in item if key == "name" and isinstance(value, str)), None)
    where = f"{shown}: item {number}" + ("" if given is None else f" ({json.dumps(given, ensure_ascii=False)})")
    fields = _fields(where, item)
    name = fields.get("name")
    try:
        request = _request(fields)
    except ValueProblem as exc:
        hint = f" ({exc.hint})" if exc.hint else ""
        raise RequestsFileError(f"{where}: {exc}{hint}") from exc
    if name is None:
        name = _default_name(request)
        if name in taken:
            name = f"{name} #{number}"
    elif not name.strip():
        raise RequestsFileError(f"{where}: 'name' must not be empty (leave it out for a generated one)")
    elif name in taken:
        raise RequestsFileError(f"{where}: the name is already used by item {taken[name]}")
    return SampleRequest(name, request)


def _fields(where: str, item: _Object) -> dict[str, Any]:
    """The item's keys checked: known, not repeated, `service` present, strings where due."""
    fields: dict[str, Any] = {}
    for key, value in item:
        if key not in _KEYS:
            raise RequestsFileError(f"{where}: unknown key {key!r} (the keys are {', '.join(_KEYS)})")
        if key in fields:
            raise RequestsFileError(f"{where}: {key!r} is given twice")
        fields[key] = value
    if "service" not in fields:
        raise RequestsFileError(f"{where}: 'service' is required")
    for key in ("name", "service", "method", "path", "source"):
        value = fields.get(key)
        if key in fields and not isinstance(value, str) and not (key == "source" and value is None):
            also = " or null" if key == "source" else ""
            raise RequestsFileError(f"{where}: {key!r} must be a string{also}, not {_json_type(value)}")
    headers = fields.get("headers")
    if "headers" in fields and not isinstance(headers, _Object):
        raise RequestsFileError(f'{where}: \'headers\' must be an object, e.g. {{"end-user": "jason"}}')
    if isinstance(headers, _Object):
        seen: set[str] = set()
        for header, value in headers:
            if not isinstance(value, str):
                raise RequestsFileError(f"{where}: header {header!r} must be a string, not {_json_type(value)}")
            if header.lower() in seen:
                raise RequestsFileError(f"{where}: header {header!r} is given twice")
            seen.add(header.lower())
    return fields


def _request(fields: Mapping[str, Any]) -> RequestInfo:
    """The checked request; ValueProblem when a value has the wrong format."""
    headers = {
        check_header_name(header): check_field_value(value) for header, value in fields.get("headers") or _Object()
    }
    source = fields.get("source")
    return RequestInfo(
        service=check_name(fields["service"]),
        method=check_method(fields.get("method", "GET")),
        path=check_path(fields.get("path", "/"), query=True),
        headers=dict(sorted(headers.items())),
        source=None if source is None else check_name(source),
    )


def _default_name(request: RequestInfo) -> str:
    """`GET /reviews/1 → reviews`, with ` (from productpage)` for a caller."""
    name = f"{request.method} {request.path} → {request.service}"
    return name if request.source is None else f"{name} (from {request.source})"


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, _Object):
        return "an object"
    if isinstance(value, list):
        return "an array"
    return "a string"


# -- golden requests -----------------------------------------------------------------------


def golden_samples(spec: Spec) -> list[SampleRequest]:
    """A policy's golden requests (`request_test`) as sample requests, in policy order."""
    return [
        SampleRequest(
            test.name,
            RequestInfo(
                service=test.service, method=test.method, path=test.path, headers=dict(test.headers), source=test.source
            ),
        )
        for test in spec.request_tests
    ]


def _golden(old: Spec, new: Spec) -> list[SampleRequest]:
    """Both sides' golden requests by name: the head's (in its order, with its
    definition when both sides have one), then those only the base has.

    A test both sides define differently is tried with the head's request on both
    sides: "where does this request go before and after" needs one request, and the
    head's is the one being proposed. The test's own change is reported in
    `request_tests`."""
    samples = golden_samples(new)
    names = {s.name for s in samples}
    return samples + [s for s in golden_samples(old) if s.name not in names]


# -- deciding and comparing ------------------------------------------------------------------


def decide(table: DecisionTable, request: RequestInfo) -> Outcome:
    """Where `request` goes on the side `table` was built from, as the proxy decides it."""
    try:
        decision = table.explain(request).to_json()
    except UnknownService as exc:
        return Outcome(error=str(exc))
    return Outcome(
        backends=decision["backends"],
        rule=decision["rule"],
        allowed=decision["authorization"]["allowed"],
        response=decision["response"],
    )


def request_impacts(
    old: DecisionTable, new: DecisionTable, samples: Sequence[SampleRequest] = ()
) -> list[RequestImpact]:
    """Every golden request of either side (origin "golden"), then `samples` (origin
    "file"), decided on both sides and flagged with what changed."""
    tried: list[tuple[Literal["golden", "file"], SampleRequest]] = [
        *(("golden", s) for s in _golden(old.spec, new.spec)),
        *(("file", s) for s in samples),
    ]
    impacts = []
    for origin, sample in tried:
        before = decide(old, sample.request)
        after = decide(new, sample.request)
        impacts.append(RequestImpact(sample.name, origin, sample.to_json(), before, after, impact_flags(before, after)))
    return impacts


def impact_flags(before: Outcome, after: Outcome) -> tuple[ImpactFlag, ...]:
    """What differs between two outcomes of one request (module docs), in a fixed order."""
    if before.error is not None and after.error is not None:
        return ()
    flags: list[ImpactFlag] = []
    if _destination(before) != _destination(after):
        flags.append("destination")
    if before.error is not None or after.error is not None or before.allowed != after.allowed:
        flags.append("authorization")
    if _response(before) != _response(after):
        flags.append("response")
    return tuple(flags)


def _destination(outcome: Outcome) -> dict[str, int] | None:
    """The shares that receive traffic (0% entries dropped), None for no rule or no service."""
    if outcome.error is not None or outcome.backends is None:
        return None
    return {version: share for version, share in outcome.backends.items() if share}


def _response(outcome: Outcome) -> Mapping[str, Any] | None:
    return _NO_ROUTE if outcome.error is not None else outcome.response
