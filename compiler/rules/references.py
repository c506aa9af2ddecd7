"""SM303 unknown service and SM304 unknown version: names that point at nothing.

SM303: an http_route, authorization or request_test for a service that is not
declared, an `allow(sources = [...])` or a request_test `source` naming one.
SM304: rule backends, a mirror's version, a request_test's expected backends, or a
service's `endpoints` keys naming a version not in the service's `versions`.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Iterator

from starmesh.compiler.diagnostics import Finding
from starmesh.compiler.rules.context import LintContext, authorization_key, quoted, route_key, service_key

__all__ = ["unknown_services", "unknown_versions"]


def _did_you_mean(name: str, known: Iterable[str], otherwise: str) -> str:
    close = difflib.get_close_matches(name, sorted(known), n=1)
    return f"did you mean {quoted(close[0])}? {otherwise}" if close else otherwise


def unknown_services(ctx: LintContext) -> Iterator[Finding]:
    """SM303: every reference to a service name that no `service(...)` declares."""
    spec = ctx.spec
    known = spec.services

    def hint(name: str) -> str:
        return _did_you_mean(name, known, f'declare it with service(name = "{name}") or fix the name')

    for name in sorted(spec.routes):
        if name not in known:
            yield ctx.finding(
                "SM303", f"http_route/{name}", f"http_route for unknown service {quoted(name)}", hint(name)
            )
    for name in sorted(spec.authorization):
        if name not in known:
            yield ctx.finding(
                "SM303", authorization_key(name), f"authorization for unknown service {quoted(name)}", hint(name)
            )
        for index, allow in enumerate(spec.authorization[name].rules):
            for source in allow.sources or ():
                if source not in known:
                    yield ctx.finding(
                        "SM303",
                        authorization_key(name, index),
                        f"allow on {quoted(name)} names unknown source service {quoted(source)}",
                        hint(source),
                    )
    for test in spec.request_tests:
        key = f"request_test/{test.name}"
        if test.service not in known:
            yield ctx.finding(
                "SM303",
                key,
                f"request_test {quoted(test.name)} targets unknown service {quoted(test.service)}",
                hint(test.service),
            )
        if test.source is not None and test.source not in known:
            yield ctx.finding(
                "SM303",
                key,
                f"request_test {quoted(test.name)} has unknown source service {quoted(test.source)}",
                hint(test.source),
            )


def unknown_versions(ctx: LintContext) -> Iterator[Finding]:
    """SM304: every reference to a version its service does not declare."""
    spec = ctx.spec

    def problem(service: str, version: str, what: str, key: str) -> Finding:
        versions = spec.services[service].versions
        listed = ", ".join(quoted(v) for v in versions)
        return ctx.finding(
            "SM304",
            key,
            f"{what} names version {quoted(version)}, which service {quoted(service)} does not declare "
            f"(versions: {listed})",
            _did_you_mean(
                version, versions, f'add "{version}" to the versions of service(name = "{service}") or fix the name'
            ),
        )

    for name in sorted(spec.services):
        service = spec.services[name]
        for version in sorted(service.endpoints or {}):
            if version not in service.versions:
                yield problem(name, version, "endpoints", service_key(name))
    for name in sorted(spec.routes):
        if name not in spec.services:
            continue  # SM303 already
        versions = spec.services[name].versions
        for index, rule in enumerate(spec.routes[name]):
            for version in sorted(rule.backends or {}):
                if version not in versions:
                    yield problem(name, version, f"rules[{index}] backends", route_key(name, index))
            if rule.mirror is not None and rule.mirror.version not in versions:
                yield problem(name, rule.mirror.version, f"rules[{index}] mirror", route_key(name, index))
    for test in spec.request_tests:
        if test.service not in spec.services:
            continue  # SM303 already
        for version in sorted(test.backends or {}):
            if version not in spec.services[test.service].versions:
                what = f"request_test {quoted(test.name)} backends"
                yield problem(test.service, version, what, f"request_test/{test.name}")
