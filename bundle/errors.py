"""The bundle package's exceptions.

    BundleError                 anything wrong with a bundle, release or envelope
     ├── SignatureError         no trusted key signed it, or the envelope is malformed
     ├── ReleaseRejected        a verified release that must not be applied (stale, expired)
     └── IdentityError          a SPIFFE ID or X.509-SVID that is malformed or not trusted
"""

from __future__ import annotations

__all__ = ["BundleError", "IdentityError", "ReleaseRejected", "SignatureError"]


class BundleError(Exception):
    """A bundle, release or envelope is invalid; the message says what and why."""


class SignatureError(BundleError):
    """The DSSE envelope is malformed or no trusted key signed it."""


class ReleaseRejected(BundleError):
    """The release verified but must not be applied (not newer, expired)."""


class IdentityError(BundleError):
    """A SPIFFE ID is malformed, or a certificate is not a valid X.509-SVID for the mesh."""
