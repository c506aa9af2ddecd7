"""Where traffic goes: mirrors, faults and versions that get none.

SM404: a mirror to a version the same rule already sends live traffic to (a backend
with weight > 0, or any version when the rule has no backends and so uses every
endpoint): that version gets both the request and its shadow copy, which doubles
writes and tells nothing about the other version.

SM409: a declared version that gets no traffic: the service has an http_route with at
least one rule, every rule names explicit backends, and no rule names this version in
its backends (even with weight 0, which is an explicit "drained") or mirrors to it.
Kept conservative: a rule without backends sends to every version, so then nothing is
reported; nor when a rule names an undeclared version (SM304), which is usually the
dead version misspelt.

SM410: a fault that aborts or delays every request (abort_percent or delay_percent of
100 on a catch-all rule), which is usually an experiment left on by mistake. A 100%
fault behind a narrower match (a test user's header, say) is a deliberate experiment
and is not reported.

SM413: settings that do nothing: a mirror with percent 0, a fault delay with
delay_percent 0 or an abort_status with abort_percent 0.
"""

from __future__ import annotations

from collections.abc import Iterator

from starmesh.compiler.diagnostics import Finding
from starmesh.compiler.durations import format_duration
from starmesh.compiler.rules.shadowing import is_catch_all
from starmesh.compiler.rules.context import LintContext, quoted, route_key, service_key

__all__ = ["dead_versions", "fault_everything", "mirror_to_live_version", "no_op_settings"]


def mirror_to_live_version(ctx: LintContext) -> Iterator[Finding]:
    """SM404: a rule mirroring to a version it already routes to."""
    for name in sorted(ctx.spec.routes):
        service = ctx.spec.services.get(name)
        for index, rule in enumerate(ctx.spec.routes[name]):
            mirror = rule.mirror
            if service is None or mirror is None or mirror.percent == 0 or mirror.version not in service.versions:
                continue  # unknown service or version: SM303/SM304
            version = mirror.version
            if rule.backends is None:
                why = "this rule has no backends, so it already sends live traffic to every version"
            elif rule.backends.get(version, 0) > 0:
                why = f"this rule already sends {rule.backends[version]}% of live traffic to it"
            else:
                continue
            yield ctx.finding(
                "SM404",
                route_key(name, index),
                f"rules[{index}] of http_route {quoted(name)} mirrors to {quoted(version)}, but {why}: "
                f"{quoted(version)} gets requests twice",
                "mirror to the version you want to try out (one that gets no live traffic from this rule)",
            )


def dead_versions(ctx: LintContext) -> Iterator[Finding]:
    """SM409: versions that no rule of a fully explicit http_route names."""
    for name in sorted(ctx.spec.routes):
        service = ctx.spec.services.get(name)
        rules = ctx.spec.routes[name]
        if service is None or not rules or any(rule.backends is None for rule in rules):
            continue
        named: set[str] = set()
        for rule in rules:
            named.update(rule.backends or {})
            if rule.mirror is not None:
                named.add(rule.mirror.version)
        if not named <= set(service.versions):
            continue  # a misspelt version (SM304) would make the right one look dead
        for version in service.versions:
            if version not in named:
                yield ctx.finding(
                    "SM409",
                    service_key(name),
                    f"version {quoted(version)} of {quoted(name)} gets no traffic: every rule of its http_route names "
                    f"backends and none names {quoted(version)}",
                    f"route to {quoted(version)} from a rule (weight 0 marks it drained on purpose), "
                    "or remove it from versions",
                )


def fault_everything(ctx: LintContext) -> Iterator[Finding]:
    """SM410: faults that hit every request."""
    for name in sorted(ctx.spec.routes):
        for index, rule in enumerate(ctx.spec.routes[name]):
            fault = rule.fault
            if fault is None or not is_catch_all(rule):
                continue
            what: list[str] = []
            if fault.abort_status is not None and fault.abort_percent >= 100:
                what.append(f"aborts every request with {fault.abort_status}")
            if fault.delay_ms is not None and fault.delay_percent >= 100:
                what.append(f"delays every request by {format_duration(fault.delay_ms)}")
            if what:
                yield ctx.finding(
                    "SM410",
                    route_key(name, index),
                    f"fault on rules[{index}] of http_route {quoted(name)} {' and '.join(what)}",
                    "if this is an experiment, give it a smaller percent or put it behind a narrower match (e.g. a test user's header); otherwise remove it",
                )


def no_op_settings(ctx: LintContext) -> Iterator[Finding]:
    """SM413: mirrors and faults configured to do nothing."""
    for name in sorted(ctx.spec.routes):
        for index, rule in enumerate(ctx.spec.routes[name]):
            key = route_key(name, index)
            where = f"rules[{index}] of http_route {quoted(name)}"
            if rule.mirror is not None and rule.mirror.percent == 0:
                yield ctx.finding(
                    "SM413",
                    key,
                    f"mirror on {where} has percent 0: it mirrors nothing",
                    "set a percent above 0, or remove the mirror",
                )
            fault = rule.fault
            if fault is None:
                continue
            if fault.delay_ms is not None and fault.delay_percent == 0:
                yield ctx.finding(
                    "SM413",
                    key,
                    f"fault on {where} sets a delay with delay_percent 0: it delays nothing",
                    "set delay_percent above 0, or remove the delay",
                )
            if fault.abort_status is not None and fault.abort_percent == 0:
                yield ctx.finding(
                    "SM413",
                    key,
                    f"fault on {where} sets abort_status with abort_percent 0: it aborts nothing",
                    "set abort_percent above 0, or remove abort_status",
                )
