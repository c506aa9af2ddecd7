"""Canonical encoding: same value, same bytes; decode(encode(x)) == x; strict decoding."""

from __future__ import annotations

import json
import random
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from starmesh.bundle.canonical import (
    API_VERSION,
    Bundle,
    BundleSource,
    decode_bundle,
    digest_of,
    encode_bundle,
    encode_canonical,
    is_digest,
)
from starmesh.bundle.errors import BundleError
from starmesh.bundle.spec import (
    AccessLog,
    Allow,
    Authorization,
    CircuitBreaker,
    Fault,
    Match,
    MeshConfig,
    Mirror,
    OutlierDetection,
    RateLimit,
    RequestTest,
    Retries,
    Rollout,
    Rule,
    Service,
    SourceLocation,
    Spec,
    StringMatch,
    Tracing,
)

# --- strategies for every Spec type --------------------------------------------------

# Any Unicode except lone surrogates (not encodable as UTF-8, so never in a policy file).
text = st.text(alphabet=st.characters(exclude_categories=("Cs",)), max_size=6)
names = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=6)
percent = st.one_of(
    st.integers(0, 100), st.floats(0, 100, allow_nan=False, allow_infinity=False)
)
millis = st.integers(1, 86_400_000)
small = st.integers(0, 10_000)


def maybe(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.none() | strategy


def tuples(strategy: st.SearchStrategy[Any], max_size: int = 3) -> st.SearchStrategy[Any]:
    return st.lists(strategy, max_size=max_size).map(tuple)


string_match = st.one_of(
    st.builds(StringMatch, kind=st.just("exact"), value=text),
    st.builds(StringMatch, kind=st.just("regex"), value=text),
    st.builds(StringMatch, kind=st.just("present"), value=st.none()),
)
retries = st.builds(
    Retries,
    attempts=st.integers(0, 10),
    per_try_timeout_ms=maybe(millis),
    on=tuples(st.sampled_from(["5xx", "connect-failure", "reset"])),
    budget_percent=percent,
)
match = st.builds(
    Match,
    path_exact=maybe(text),
    path_prefix=maybe(text),
    path_regex=maybe(text),
    methods=maybe(tuples(st.sampled_from(["GET", "POST", "PUT", "DELETE"]))),
    headers=st.dictionaries(names, string_match, max_size=2),
    query=st.dictionaries(names, string_match, max_size=2),
)
rule = st.builds(
    Rule,
    match=tuples(match, 2),
    backends=maybe(st.dictionaries(names, st.integers(0, 100), max_size=3)),
    timeout_ms=maybe(millis),
    retries=maybe(retries),
    fault=maybe(
        st.builds(
            Fault,
            delay_ms=maybe(millis),
            delay_percent=percent,
            abort_status=maybe(st.integers(200, 599)),
            abort_percent=percent,
        )
    ),
    mirror=maybe(st.builds(Mirror, version=names, percent=percent)),
    set_request_headers=st.dictionaries(names, text, max_size=2),
    remove_request_headers=tuples(names),
)
service = st.builds(
    Service,
    port=st.integers(1, 65535),
    versions=tuples(names).filter(bool),
    timeout_ms=maybe(millis),
    retries=maybe(retries),
    circuit_breaker=maybe(st.builds(CircuitBreaker, max_connections=small,
                                    max_pending_requests=small, max_requests=small)),
    outlier_detection=maybe(st.builds(OutlierDetection, consecutive_5xx=small,
                                      interval_ms=millis, base_ejection_time_ms=millis,
                                      max_ejection_percent=percent)),
    rate_limit=maybe(st.builds(RateLimit, requests_per_second=percent, burst=small)),
    load_balancer=st.sampled_from(["round_robin", "least_request", "random"]),
    endpoints=maybe(st.dictionaries(names, tuples(text), max_size=2)),
    mtls=maybe(st.sampled_from(["strict", "permissive", "disable"])),
)  # fmt: skip
authorization = st.builds(
    Authorization,
    rules=tuples(st.builds(Allow, sources=maybe(tuples(names)), methods=maybe(tuples(names)),
                           paths=maybe(tuples(text))), 2),
    mode=st.sampled_from(["enforce", "audit"]),
)  # fmt: skip
request_test = st.builds(
    RequestTest,
    name=text,
    service=names,
    path=text,
    method=st.sampled_from(["GET", "POST"]),
    headers=st.dictionaries(names, text, max_size=2),
    source=maybe(names),
    backends=maybe(st.dictionaries(names, percent, max_size=2)),
    allowed=maybe(st.booleans()),
    status=maybe(st.integers(100, 599)),
)
mesh_config = st.builds(
    MeshConfig,
    name=names,
    trust_domain=names,
    mtls=st.sampled_from(["strict", "permissive", "disable"]),
    tracing=st.builds(Tracing, sample_percent=percent),
    access_log=st.builds(AccessLog, enabled=st.booleans(), max_lines_per_second=small),
    rollout=st.builds(Rollout, canary_percent=percent, bake_ms=st.integers(0, 10**7),
                      max_failures=small),
)  # fmt: skip
specs = st.builds(
    Spec,
    mesh=mesh_config,
    services=st.dictionaries(names, service, max_size=3),
    routes=st.dictionaries(names, tuples(rule, 2), max_size=2),
    authorization=st.dictionaries(names, authorization, max_size=2),
    request_tests=tuples(request_test, 2),
    source_map=st.dictionaries(
        text,
        st.builds(SourceLocation, file=text, line=st.integers(1, 10**6),
                  col=st.integers(1, 1000)),
        max_size=3,
    ),
)  # fmt: skip
bundles = st.builds(
    Bundle,
    source=st.builds(BundleSource, commit=maybe(st.text("0123456789abcdef", min_size=40,
                                                        max_size=40)), path=text),
    spec=specs,
)  # fmt: skip


def _reordered(value: Any, rng: random.Random) -> Any:
    """The same JSON value with every object's keys in a shuffled insertion order."""
    if isinstance(value, dict):
        items = list(value.items())
        rng.shuffle(items)
        return {key: _reordered(item, rng) for key, item in items}
    if isinstance(value, list):
        return [_reordered(item, rng) for item in value]
    return value


def _sorted_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [key for key, _ in pairs]
    assert keys == sorted(set(keys)), f"object keys not sorted and unique: {keys}"
    return dict(pairs)


def _bundle_bytes(**overrides: Any) -> bytes:
    document = json.loads(encode_canonical(Bundle(
        source=BundleSource(commit=None, path="mesh.star"),
        spec=Spec(mesh=MeshConfig(name="bookinfo"), services={"ratings": Service()}),
    )))  # fmt: skip
    document.update(overrides)
    return encode_canonical(document)


# --- properties ----------------------------------------------------------------------


@settings(max_examples=75, deadline=None)
@given(bundles)
def test_decode_of_encode_is_identity(bundle: Bundle) -> None:
    data, digest = encode_bundle(bundle)
    assert decode_bundle(data, expected_digest=digest) == bundle


@settings(max_examples=75, deadline=None)
@given(bundles)
def test_encoding_is_deterministic_and_canonical(bundle: Bundle) -> None:
    data, digest = encode_bundle(bundle)
    # Same value, same bytes, same digest, every time.
    assert encode_bundle(bundle) == (data, digest)
    assert digest == digest_of(data)
    assert is_digest(digest)
    # Canonical JSON: every object's keys sorted and unique, and the bytes are exactly
    # what encoding the parsed JSON value gives (so no insignificant whitespace).
    document = json.loads(data.decode("utf-8"), object_pairs_hook=_sorted_object)
    assert encode_canonical(document) == data


@settings(max_examples=75, deadline=None)
@given(bundles, st.randoms(use_true_random=False))
def test_insertion_order_does_not_matter(bundle: Bundle, rng: random.Random) -> None:
    data, _ = encode_bundle(bundle)
    shuffled = _reordered(json.loads(data), rng)
    # As a plain JSON value ...
    assert encode_canonical(shuffled) == data
    # ... and as Structs built from dicts filled in another order.
    rebuilt = msgspec.convert(shuffled, type=Bundle)
    assert encode_bundle(rebuilt)[0] == data


def test_dict_insertion_order_does_not_change_the_digest() -> None:
    services = {name: Service(port=port) for name, port in [("b", 2), ("a", 1), ("c", 3)]}
    forward = Spec(mesh=MeshConfig(name="m"), services=services)
    backward = Spec(mesh=MeshConfig(name="m"), services=dict(reversed(list(services.items()))))
    source = BundleSource(commit=None, path="mesh.star")
    assert list(forward.services) != list(backward.services)
    assert encode_bundle(Bundle(source=source, spec=forward)) == encode_bundle(
        Bundle(source=source, spec=backward)
    )


def test_canonical_bytes_are_compact_sorted_utf8() -> None:
    assert encode_canonical({"b": 1, "a": ["é", 2.5, None]}) == '{"a":["é",2.5,null],"b":1}'.encode()


@pytest.mark.parametrize(
    ("number", "encoded"),
    [
        (0, b"0"),
        (100, b"100"),
        (100.0, b"100.0"),
        (0.1, b"0.1"),
        (12.5, b"12.5"),
        (1e-05, b"0.00001"),
        (1e-07, b"1e-7"),
        (1e16, b"1e16"),
        (1.2345678901234568e17, b"1.2345678901234568e17"),
    ],
)
def test_number_encoding_is_pinned(number: float, encoded: bytes) -> None:
    """Bundle digests depend on how numbers are written: a library upgrade that changes
    it would change every digest, so the exact forms are pinned here."""
    assert encode_canonical(number) == encoded


# --- strict decoding -----------------------------------------------------------------


def test_decode_accepts_a_good_bundle() -> None:
    data = _bundle_bytes()
    bundle = decode_bundle(data, expected_digest=digest_of(data))
    assert bundle.api_version == API_VERSION
    assert bundle.spec.mesh.name == "bookinfo"


def test_decode_rejects_a_digest_mismatch() -> None:
    data = _bundle_bytes()
    wrong = "sha256:" + "0" * 64
    with pytest.raises(BundleError, match=f"digest mismatch: expected {wrong}, got sha256:"):
        decode_bundle(data, expected_digest=wrong)


def test_decode_rejects_non_canonical_bytes() -> None:
    pretty = json.dumps(json.loads(_bundle_bytes()), indent=2).encode()
    with pytest.raises(BundleError, match="not canonical"):
        decode_bundle(pretty)
    document = json.loads(_bundle_bytes())
    unsorted = json.dumps(dict(reversed(document.items())), separators=(",", ":")).encode()
    assert unsorted.startswith(b'{"spec":')
    with pytest.raises(BundleError, match="not canonical"):
        decode_bundle(unsorted)


def test_decode_rejects_a_wrong_api_version() -> None:
    with pytest.raises(BundleError, match=r"apiVersion 'starmesh/v0'.*reads starmesh/v1 Bundle"):
        decode_bundle(_bundle_bytes(apiVersion="starmesh/v0"))
    with pytest.raises(BundleError, match="kind 'Release'"):
        decode_bundle(_bundle_bytes(kind="Release"))


def test_decode_rejects_unknown_fields_and_says_where() -> None:
    with pytest.raises(BundleError, match="unknown field `extra`"):
        decode_bundle(_bundle_bytes(extra=1))
    document = json.loads(_bundle_bytes())
    document["spec"]["services"]["ratings"]["colour"] = "blue"
    with pytest.raises(BundleError, match=r"unknown field `colour` - at `\$.spec.services"):
        decode_bundle(encode_canonical(document))


def test_decode_rejects_wrong_types_and_says_where() -> None:
    document = json.loads(_bundle_bytes())
    document["spec"]["services"]["ratings"]["port"] = "80"
    with pytest.raises(BundleError, match=r"Expected `int`, got `str` - at `\$.spec.services"):
        decode_bundle(encode_canonical(document))


def test_decode_rejects_missing_fields() -> None:
    document = json.loads(_bundle_bytes())
    del document["spec"]
    with pytest.raises(BundleError, match="missing required field `spec`"):
        decode_bundle(encode_canonical(document))


def test_decode_rejects_invalid_json() -> None:
    with pytest.raises(BundleError, match="not valid JSON"):
        decode_bundle(b"{")
