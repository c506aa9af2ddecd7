"""The policy language's builtins, declared once.

This table is the single description of every Starlark builtin: its parameters, their
types and defaults, and its documentation. The evaluator predeclares a function per
entry, the IR builder checks calls against it, and docs/policy-reference.md is
generated from it, so the three cannot drift.

`kind` strings name the accepted value, checked by the IR builder (compiler/args.py;
the text formats are described in compiler/values.py):
  string, bool,
  int (an int, or a float with an integral value; within `bounds`, by default
      0..2147483647),
  percent (number 0-100), positive_number (number > 0),
  duration ("250ms", "2s", "1m", "1h"; 1ms to 24h), duration_or_zero (also "0s"),
  status (HTTP status, 100-599 unless `bounds` narrow it),
  name (a DNS label: service, version, mesh names), domain (a trust domain),
  path (starts with "/", no query), request_path (a query is allowed),
  path_pattern (a path, or a prefix when it ends in "*"), regex, method (an HTTP
  method, upper-cased), header (a header name, lower-cased), field_value (a header
  value), header_value (a string, regex() or present()),
  list[<kind>], dict[<key kind>,<kind>], value:<builtin> (what that builtin returns),
  weights (dict[name, int 0-100] summing to 100), backends (a name, or
  dict[name, percent] summing to 100), endpoints (dict[name, list of "host:port"]),
  enum:a|b|c (one of), enum_list:a|b|c (a list of some of them).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["BUILTINS", "Builtin", "Param", "REQUIRED", "builtin_names"]


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: object = _Required()
"""Default of a parameter that must be given."""


@dataclass(frozen=True)
class Param:
    """One parameter of a builtin."""

    name: str
    kind: str
    default: object = REQUIRED
    doc: str = ""
    positional: bool = False
    """May also be passed by position (only leading required parameters are)."""
    bounds: tuple[int | float, int | float] | None = None
    """Inclusive range for numeric kinds, when narrower than the kind's own."""

    @property
    def required(self) -> bool:
        return self.default is REQUIRED


@dataclass(frozen=True)
class Builtin:
    """A Starlark builtin: `declares` ones register a policy object when called."""

    name: str
    params: tuple[Param, ...]
    doc: str
    declares: bool = False
    example: str = ""

    def param(self, name: str) -> Param | None:
        for p in self.params:
            if p.name == name:
                return p
        return None


def _p(
    name: str,
    kind: str,
    default: object = REQUIRED,
    doc: str = "",
    positional: bool = False,
    bounds: tuple[int | float, int | float] | None = None,
) -> Param:
    return Param(name, kind, default, doc, positional, bounds)


_MANY = 2**31 - 1


_RETRY_ON = ["5xx", "connect-failure", "reset"]

_TABLE: tuple[Builtin, ...] = (
    Builtin(
        "mesh",
        (
            _p("name", "name", doc="The mesh's name; releases are issued per mesh.", positional=True),
            _p("trust_domain", "domain", "cluster.local", "SPIFFE trust domain: identities are spiffe://<trust_domain>/service/<name>."),
            _p("mtls", "enum:strict|permissive|disable", "strict", "Mesh-wide mTLS mode; a service may override it."),
            _p("tracing", "value:tracing", None, "Trace sampling; default tracing(sample_percent = 1)."),
            _p("access_log", "value:access_log", None, "Access logging; default access_log(enabled = True, max_lines_per_second = 100)."),
            _p("rollout", "value:rollout", None, "Release staging; default rollout(canary_percent = 0, bake = \"0s\", max_failures = 0)."),
        ),
        "Mesh-wide settings. Exactly one `mesh(...)` call per policy.",
        declares=True,
        example='mesh(name = "shop", mtls = "strict")',
    ),
    Builtin(
        "tracing",
        (_p("sample_percent", "percent", 1, "Share of requests whose traces are sampled."),),
        "Trace sampling for `mesh(tracing = ...)`.",
        example="tracing(sample_percent = 5)",
    ),
    Builtin(
        "access_log",
        (
            _p("enabled", "bool", True, "Write one access-log line per request."),
            _p("max_lines_per_second", "int", 100, "Lines past this rate are dropped and counted (0 = no lines)."),
        ),
        "Access logging for `mesh(access_log = ...)`.",
        example="access_log(enabled = True, max_lines_per_second = 50)",
    ),
    Builtin(
        "rollout",
        (
            _p("canary_percent", "percent", 0, "Share of proxies that get a new release first (0 = all at once)."),
            _p("bake", "duration_or_zero", "0s", "How long the canary proxies run a release before the rest get it."),
            _p("max_failures", "int", 0, "NACKs tolerated during the bake before the rollout halts."),
        ),
        "Release staging for `mesh(rollout = ...)`.",
        example='rollout(canary_percent = 10, bake = "1m", max_failures = 0)',
    ),
    Builtin(
        "service",
        (
            _p("name", "name", doc="Service name; also its Host for routing and its mTLS identity.", positional=True),
            _p("port", "int", 80, "The port apps use for the service.", bounds=(1, 65535)),
            _p("versions", "list[name]", ["v1"], "The versions (subsets) rules can route to."),
            _p("timeout", "duration", None, "Bound on the whole request, retries included."),
            _p("retries", "value:retries", None, "Retry policy for calls to this service."),
            _p("circuit_breaker", "value:circuit_breaker", None, "Caps on connections, pending and active requests."),
            _p("outlier_detection", "value:outlier_detection", None, "Ejection of failing endpoints."),
            _p("rate_limit", "value:rate_limit", None, "Token bucket applied by each receiving proxy."),
            _p("load_balancer", "enum:round_robin|least_request|random", "round_robin", "How an endpoint is picked within a version."),
            _p("endpoints", "endpoints", None, 'Static endpoints per version, e.g. {"v1": ["127.0.0.1:9081"]}; merged with registered ones.'),
            _p("mtls", "enum:strict|permissive|disable", None, "Overrides mesh(mtls) for this service."),
        ),
        "Declares a service. Service names are unique.",
        declares=True,
        example='service(name = "reviews", versions = ["v1", "v2", "v3"], timeout = "2s")',
    ),
    Builtin(
        "retries",
        (
            _p("attempts", "int", 2, "Retries after the first try (0-10).", bounds=(0, 10)),
            _p("per_try_timeout", "duration", None, "Bound on one try; a try cut off counts as retryable."),
            _p("on", "enum_list:" + "|".join(_RETRY_ON), list(_RETRY_ON), "Conditions that trigger a retry."),
            _p("budget_percent", "percent", 20, "Retries may not exceed this share of active requests (at least 3 are always allowed)."),
        ),
        "A retry policy for `service(retries = ...)` or `rule(retries = ...)`.",
        example='retries(attempts = 2, per_try_timeout = "250ms")',
    ),
    Builtin(
        "circuit_breaker",
        (
            _p("max_connections", "int", 1024, "Connections to the service's endpoints.", bounds=(1, _MANY)),
            _p("max_pending_requests", "int", 1024, "Requests waiting for a connection.", bounds=(1, _MANY)),
            _p("max_requests", "int", 1024, "Requests in flight.", bounds=(1, _MANY)),
        ),
        "Caps for `service(circuit_breaker = ...)`; overflow is answered at once with 503 overflow.",
        example="circuit_breaker(max_requests = 100)",
    ),
    Builtin(
        "outlier_detection",
        (
            _p("consecutive_5xx", "int", 5, "5xx answers in a row that eject an endpoint.", bounds=(1, _MANY)),
            _p("interval", "duration", "10s", "How often ejections are re-evaluated."),
            _p("base_ejection_time", "duration", "30s", "First ejection time; it grows with each ejection."),
            _p("max_ejection_percent", "percent", 50, "At most this share of endpoints is ejected (one is always kept)."),
        ),
        "Endpoint ejection for `service(outlier_detection = ...)`.",
        example="outlier_detection(consecutive_5xx = 3)",
    ),
    Builtin(
        "rate_limit",
        (
            _p("requests_per_second", "positive_number", doc="Refill rate of the token bucket.", positional=True),
            _p(
                "burst",
                "int",
                None,
                "Bucket size; defaults to requests_per_second (rounded up). Buckets start full.",
                bounds=(1, _MANY),
            ),
        ),
        "Local rate limit for `service(rate_limit = ...)`; excess gets 429 with Retry-After.",
        example="rate_limit(100, burst = 200)",
    ),
    Builtin(
        "http_route",
        (
            _p("service", "name", doc="The service whose traffic these rules route.", positional=True),
            _p("rules", "list[value:rule]", doc="Rules tried in order; the first whose match holds wins."),
        ),
        "Routing rules for one service (at most one http_route per service).",
        declares=True,
        example='http_route("reviews", rules = [rule(backends = {"v1": 90, "v2": 10})])',
    ),
    Builtin(
        "rule",
        (
            _p("match", "list[value:match]", [], "Any of these matches (OR); none = match everything."),
            _p("backends", "weights", None, "Version weights (integers) summing to 100; none = all endpoints."),
            _p("timeout", "duration", None, "Overrides the service's timeout."),
            _p("retries", "value:retries", None, "Overrides the service's retries."),
            _p("fault", "value:fault", None, "Fault injection."),
            _p("mirror", "value:mirror", None, "Shadow traffic to another version."),
            _p("set_request_headers", "dict[header,field_value]", {}, "Headers set on the request."),
            _p("remove_request_headers", "list[header]", [], "Headers removed from the request."),
        ),
        "One routing rule inside `http_route(rules = [...])`.",
        example='rule(match = [match(headers = {"end-user": "jason"})], backends = {"v2": 100})',
    ),
    Builtin(
        "match",
        (
            _p("path_exact", "path", None, "The path equals this (query string ignored)."),
            _p("path_prefix", "path", None, "The path starts with this."),
            _p("path_regex", "regex", None, "A regex matching the whole path."),
            _p("methods", "list[method]", None, "Any of these HTTP methods."),
            _p("headers", "dict[header,header_value]", {}, 'Header conditions: "exact", regex("^re$") or present().'),
            _p("query", "dict[string,header_value]", {}, "Query parameter conditions, like headers."),
        ),
        "A request condition: all given fields must hold (AND).",
        example='match(path_prefix = "/api/", methods = ["GET"])',
    ),
    Builtin(
        "regex",
        (_p("pattern", "regex", doc="A regular expression that must match the whole value.", positional=True),),
        "A regex header or query condition.",
        example='regex("^v[0-9]+$")',
    ),
    Builtin(
        "present",
        (),
        "A header or query condition that holds when the name is present, whatever its value.",
        example="present()",
    ),
    Builtin(
        "fault",
        (
            _p("delay", "duration", None, "Delay added before the request goes on."),
            _p("delay_percent", "percent", 0, "Share of requests delayed."),
            _p("abort_status", "status", None, "Status the proxy answers instead of forwarding (200-599).", bounds=(200, 599)),
            _p("abort_percent", "percent", 0, "Share of requests aborted."),
        ),
        "Fault injection for `rule(fault = ...)`: delay first, then abort, drawn independently.",
        example='fault(delay = "2s", delay_percent = 10)',
    ),
    Builtin(
        "mirror",
        (
            _p("version", "name", doc="The version that receives the copy.", positional=True),
            _p("percent", "percent", 100, "Share of requests mirrored."),
        ),
        "Shadow traffic for `rule(mirror = ...)`: fire-and-forget, with Host: <service>-shadow.",
        example='mirror("v3", percent = 10)',
    ),
    Builtin(
        "authorization",
        (
            _p("service", "name", doc="The service whose receiving proxies enforce this.", positional=True),
            _p("rules", "list[value:allow]", doc="Requests no rule admits are denied."),
            _p("mode", "enum:enforce|audit", "enforce", "audit logs what would be denied instead of denying it."),
        ),
        "Authorization for one service (at most one per service).",
        declares=True,
        example='authorization("reviews", rules = [allow(sources = ["productpage"], methods = ["GET"])])',
    ),
    Builtin(
        "allow",
        (
            _p("sources", "list[name]", None, "Calling services, proven by mTLS identity; none = any caller."),
            _p("methods", "list[method]", None, "HTTP methods; none = any."),
            _p("paths", "list[path_pattern]", None, "Exact paths, or prefixes when they end in *; none = any."),
        ),
        "An authorization rule: every given field must hold.",
        example='allow(sources = ["productpage"], methods = ["GET"], paths = ["/reviews/*"])',
    ),
    Builtin(
        "request_test",
        (
            _p("name", "string", doc="Unique name of this golden request.", positional=True),
            _p("service", "name", doc="The service the request is sent to."),
            _p("path", "request_path", "/", "Request path, query string allowed."),
            _p("method", "method", "GET", "Request method."),
            _p("headers", "dict[header,field_value]", {}, "Request headers."),
            _p("source", "name", None, "The calling service (its proven identity)."),
            _p("backends", "backends", None, 'Expected share: "v2", or {"v1": 90, "v2": 10}.'),
            _p("allowed", "bool", None, "Expected authorization outcome."),
            _p("status", "status", None, "Expected status the proxy itself answers (403, 404, 429, a fault status)."),
        ),
        "A golden request: lint, the reconciler and every proxy check it against the routes.",
        declares=True,
        example='request_test("jason sees v2", service = "reviews", headers = {"end-user": "jason"}, backends = "v2")',
    ),
)

BUILTINS: dict[str, Builtin] = {b.name: b for b in _TABLE}


def builtin_names() -> tuple[str, ...]:
    """Every builtin's name, in declaration order."""
    return tuple(BUILTINS)
