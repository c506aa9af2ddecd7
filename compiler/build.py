"""From the recorded builtin calls to a typed Spec: the IR builder.

    Evaluation.declarations --Converter (args, values, conflicts)--> spec values
                            --keyed by name, uniqueness checked----> Spec + source map

Every declaration is checked, even after an error, so one run reports every problem;
the Spec is only returned when there was no error finding. Cross-references (unknown
services and versions) are checked on the Spec by compiler/lint.py, not here.

Structure rules: exactly one `mesh()` (SM301); a service is declared once (SM302); at
most one `http_route` and one `authorization` per service (SM305); request_test names
are unique (SM306). A repeat is reported where it is written, naming the first.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from starmesh.bundle.spec import (
    Authorization,
    MeshConfig,
    RequestTest,
    Rule,
    Service,
    SourceLocation,
    Spec,
)
from starmesh.compiler.args import Bound
from starmesh.compiler.calls import Call, Evaluation
from starmesh.compiler.convert import Converter
from starmesh.compiler.diagnostics import Finding
from starmesh.compiler.reporter import INVALID, Reporter

__all__ = ["BuildResult", "build_spec"]


@dataclass(frozen=True)
class BuildResult:
    """The Spec (None when any error was found) and every finding, in declaration order."""

    spec: Spec | None
    findings: list[Finding] = field(default_factory=list)


def build_spec(evaluation: Evaluation) -> BuildResult:
    """Check every declaration and assemble the Spec with its source map."""
    builder = _SpecBuilder(evaluation)
    for call in evaluation.declarations:
        builder.declare(call)
    return builder.finish()


class _SpecBuilder:
    """Accumulates declarations by key; remembers where each key was first declared."""

    def __init__(self, evaluation: Evaluation) -> None:
        self._evaluation = evaluation
        self._reporter = Reporter()
        self._converter = Converter(self._reporter)
        self._mesh: MeshConfig | None = None
        self._services: dict[str, Service] = {}
        self._routes: dict[str, tuple[Rule, ...]] = {}
        self._authorization: dict[str, Authorization] = {}
        self._tests: list[RequestTest] = []
        self._source_map: dict[str, SourceLocation] = {}

    def declare(self, call: Call) -> None:
        handler = _HANDLERS.get(call.builtin)
        if handler is None:
            # Only declaring builtins are recorded as declarations; anything else
            # would be an evaluator bug, and the builder has nothing to key it by.
            raise AssertionError(f"{call.builtin}() is not a declaring builtin")
        handler(self, call)

    def finish(self) -> BuildResult:
        if "mesh" not in self._source_map:
            entry = self._evaluation.files[0] if self._evaluation.files else "mesh.star"
            self._reporter.report(
                SourceLocation(file=entry, line=1, col=1),
                "SM301",
                "no mesh() declared; a policy declares exactly one",
                'add mesh(name = "...") to the entry file, e.g. mesh(name = "shop")',
            )
        findings = self._reporter.findings
        if self._reporter.has_errors or self._mesh is None:
            return BuildResult(None, findings)
        spec = Spec(
            mesh=self._mesh,
            services=self._services,
            routes=self._routes,
            authorization=self._authorization,
            request_tests=tuple(self._tests),
            source_map=self._source_map,
        )
        return BuildResult(spec, findings)

    # -- one method per declaring builtin ------------------------------------------

    def _declare_mesh(self, call: Call) -> None:
        bound = self._converter.check(call)
        if not self._first(
            "mesh", call, "SM301", "mesh() declared again; a policy has exactly one mesh", "remove this mesh()"
        ):
            return
        value = self._converter.build(bound)
        if value is not INVALID:
            self._mesh = value

    def _declare_service(self, call: Call) -> None:
        bound = self._converter.check(call)
        name = _key(bound, "name")
        if name is None or not self._first(
            f"service/{name}", call, "SM302", f'service "{name}" declared more than once',
            "declare each service once, with all its versions in versions = [...]",
        ):
            return
        value = self._converter.build(bound)
        if value is not INVALID:
            self._services[name] = value

    def _declare_http_route(self, call: Call) -> None:
        self._declare_per_service(
            call, "http_route", self._routes, "route", "merge the rules into one http_route (rules are tried in order)"
        )

    def _declare_authorization(self, call: Call) -> None:
        self._declare_per_service(
            call, "authorization", self._authorization, "authorization", "merge the allow rules into one authorization"
        )

    def _declare_per_service(
        self, call: Call, kind: str, into: dict[str, Any], rule_key: str, hint: str
    ) -> None:
        """An http_route or authorization: one per service, each of its rules in the source map."""
        bound = self._converter.check(call)
        service = _key(bound, "service")
        if service is None or not self._first(
            f"{kind}/{service}", call, "SM305", f'more than one {kind} for service "{service}"', hint
        ):
            return
        value = self._converter.build(bound)
        if value is INVALID:
            return
        into[service] = value
        for index, rule_call in enumerate(bound.raw["rules"]):
            self._source_map[f"{rule_key}/{service}/{index}"] = rule_call.location

    def _declare_request_test(self, call: Call) -> None:
        bound = self._converter.check(call)
        name = _key(bound, "name")
        if name is None or not self._first(
            f"request_test/{name}", call, "SM306", f'request_test "{name}" declared more than once',
            "give each golden request its own name",
        ):
            return
        value = self._converter.build(bound)
        if value is not INVALID:
            self._tests.append(value)

    def _first(self, key: str, call: Call, code: str, message: str, hint: str | None = None) -> bool:
        """Record where `key` is declared; report and return False when it already was."""
        first = self._source_map.get(key)
        if first is None:
            self._source_map[key] = call.location
            return True
        self._reporter.at_call(call, code, f"{message} (first declared at {first})", hint)
        return False


def _key(bound: Bound, param: str) -> Any:
    """The declaration's name when it checked out (its problem is reported otherwise)."""
    value = bound.valid(param)
    return value if isinstance(value, str) else None


_HANDLERS = {
    "mesh": _SpecBuilder._declare_mesh,
    "service": _SpecBuilder._declare_service,
    "http_route": _SpecBuilder._declare_http_route,
    "authorization": _SpecBuilder._declare_authorization,
    "request_test": _SpecBuilder._declare_request_test,
}
