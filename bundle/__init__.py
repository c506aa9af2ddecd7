"""The shared contract: bundle and release types, canonical encoding, the DSSE
envelope and the decision engine. It imports no stage (compiler, runtime, reconciler).

The names below are the public surface; submodules hold the details:
`spec` (the policy types), `canonical` (bytes and digests), `decide` (the one
implementation of "where does this request go, and is it allowed"), `golden` (golden
requests), `keys`/`dsse`/`release` (signed releases), `identity` (SPIFFE IDs and X.509-SVID
checks), `errors` (the exception tree).
"""

# Names resolve on first use (PEP 562), so importing one submodule (the proxy's
# `starmesh.bundle.spec`, the evaluation worker) does not import the whole package.
from __future__ import annotations

from typing import TYPE_CHECKING

from starmesh.bundle.lazy import lazy_exports

if TYPE_CHECKING:
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
    from starmesh.bundle.decide import Decision, DecisionTable, RequestInfo, UnknownService
    from starmesh.bundle.dsse import RELEASE_PAYLOAD_TYPE, sign_envelope, verify_envelope
    from starmesh.bundle.errors import BundleError, IdentityError, ReleaseRejected, SignatureError
    from starmesh.bundle.golden import RequestTestFailure, run_request_tests
    from starmesh.bundle.identity import SPIFFE_SCHEME, load_certificates, parse_spiffe_id, spiffe_id, verify_svid
    from starmesh.bundle.release import Release, VerifiedRelease, issue_release, verify_release
    from starmesh.bundle.spec import Spec

__all__ = [
    "API_VERSION",
    "Bundle",
    "BundleError",
    "BundleSource",
    "Decision",
    "DecisionTable",
    "IdentityError",
    "RELEASE_PAYLOAD_TYPE",
    "Release",
    "ReleaseRejected",
    "RequestInfo",
    "RequestTestFailure",
    "SPIFFE_SCHEME",
    "SignatureError",
    "Spec",
    "UnknownService",
    "VerifiedRelease",
    "decode_bundle",
    "digest_of",
    "encode_bundle",
    "encode_canonical",
    "is_digest",
    "issue_release",
    "load_certificates",
    "parse_spiffe_id",
    "run_request_tests",
    "sign_envelope",
    "spiffe_id",
    "verify_envelope",
    "verify_release",
    "verify_svid",
]

_WHERE: dict[str, str] = {
    "API_VERSION": "starmesh.bundle.canonical",
    "Bundle": "starmesh.bundle.canonical",
    "BundleError": "starmesh.bundle.errors",
    "BundleSource": "starmesh.bundle.canonical",
    "Decision": "starmesh.bundle.decide",
    "DecisionTable": "starmesh.bundle.decide",
    "IdentityError": "starmesh.bundle.errors",
    "RELEASE_PAYLOAD_TYPE": "starmesh.bundle.dsse",
    "Release": "starmesh.bundle.release",
    "ReleaseRejected": "starmesh.bundle.errors",
    "RequestInfo": "starmesh.bundle.decide",
    "RequestTestFailure": "starmesh.bundle.golden",
    "SPIFFE_SCHEME": "starmesh.bundle.identity",
    "SignatureError": "starmesh.bundle.errors",
    "Spec": "starmesh.bundle.spec",
    "UnknownService": "starmesh.bundle.decide",
    "VerifiedRelease": "starmesh.bundle.release",
    "decode_bundle": "starmesh.bundle.canonical",
    "digest_of": "starmesh.bundle.canonical",
    "encode_bundle": "starmesh.bundle.canonical",
    "encode_canonical": "starmesh.bundle.canonical",
    "is_digest": "starmesh.bundle.canonical",
    "issue_release": "starmesh.bundle.release",
    "load_certificates": "starmesh.bundle.identity",
    "parse_spiffe_id": "starmesh.bundle.identity",
    "run_request_tests": "starmesh.bundle.golden",
    "sign_envelope": "starmesh.bundle.dsse",
    "spiffe_id": "starmesh.bundle.identity",
    "verify_envelope": "starmesh.bundle.dsse",
    "verify_release": "starmesh.bundle.release",
    "verify_svid": "starmesh.bundle.identity",
}


__getattr__, __dir__ = lazy_exports(__name__, _WHERE, __all__)
