"""`starmesh rollback`: ask the control plane to serve an older bundle as a new release.

    starmesh rollback --to sha256:<hex> ──POST /v1/rollback {"to": digest}──► control plane
        200 {new release}  → prints "release N now serves sha256:…"         exit 0
        404 unknown digest → prints the control plane's reason               exit 1
        malformed digest (checked before sending), unreachable, other errors  exit 2

With replicas (`control-plane --store`), `--control-plane` is given once per replica
and they are asked in order (control_planes.py): a replica that cannot be reached, or
answers 503 (a follower that cannot reach the leader, a leader stepping down: nothing
was done), is skipped with a warning on stderr and the next one is asked. Any other
answer is final: a follower forwards the rollback to the leader and passes its answer
on, so a 404 or 400 from one replica would be the same from every other.

Rolling back never re-sends an old release (proxies refuse a version that is not newer,
DESIGN.md "Releases"): the control plane issues a new, higher version whose bundle is
the older one, and rolls it out to every proxy at once. The digest must be of a bundle
the control plane has stored, i.e. one it compiled before: every release names the
bundle it replaced (`previous`, shown by `starmesh verify`), and `starmesh status
--format json` shows the bundles the release, the last compile and each proxy run.

The HTTP call is `starmesh.cli.control_client.call_control_plane` (urllib, 10 s timeout, byte cap).
"""

from __future__ import annotations

from pathlib import Path

import click
import msgspec

from rich.text import Text

from starmesh.cli.console import Consoles
from starmesh.cli.control_client import Answer, call_control_plane, printable
from starmesh.cli.control_planes import ReplicaURLs, control_planes_option
from starmesh.cli.errors import InputError
from starmesh.cli.options import ca_cert_option
from starmesh.cli.status import short

__all__ = ["rollback_command"]


class _NewRelease(msgspec.Struct, frozen=True):
    version: int
    bundle: str
    previous: str | None = None


class _Wrapped(msgspec.Struct, frozen=True):
    release: _NewRelease


def _new_release(body: bytes) -> _NewRelease | None:
    """The release the control plane issued, as `{version, bundle, ...}` or `{"release": {...}}`."""
    try:
        return msgspec.json.decode(body, type=_NewRelease)
    except msgspec.MsgspecError:
        pass
    try:
        return msgspec.json.decode(body, type=_Wrapped).release
    except msgspec.MsgspecError:
        return None


def _unless_unavailable(answer: Answer) -> Answer:
    """The answer, unless it is a 503 (this replica cannot act now; the next one may)."""
    if answer.status == 503:
        raise InputError(f"control plane at {answer.url} answered HTTP 503: {answer.error_text()}")
    return answer


@click.command("rollback")
@control_planes_option
@click.option("--to", "digest", required=True, metavar="sha256:<hex>", help="The digest of the bundle to serve again.")
@ca_cert_option
@click.pass_context
def rollback_command(ctx: click.Context, urls: tuple[str, ...], digest: str, ca_cert: Path | None) -> None:
    """Serve an earlier bundle again, as a new, higher release version.

    The control plane signs a release naming the bundle sha256:<hex> (one it compiled
    before) with the next version and sends it to every proxy at once. Exit status:
    0 issued (the new version is printed), 1 the control plane does not know that
    digest, 2 a malformed digest, an unreachable control plane or any other error.

    With replicas (control-plane --store), give --control-plane once per replica: they
    are asked in order, and one that cannot be reached or answers 503 (it cannot reach
    the leader) is skipped with a warning; any other answer is final.

    \b
    Examples:
      curl -s "http://127.0.0.1:8080/v1/release?after=0&wait=0" > release.json
      starmesh verify release.json --key keys/signing.pub --format json | jq -r .release.previous
      starmesh rollback --control-plane http://127.0.0.1:8080 --to sha256:4f0c...
      starmesh rollback --control-plane https://cp-0:8443 --control-plane https://cp-1:8443 --ca-cert ca.crt --to sha256:4f0c...
    """
    from starmesh.bundle.canonical import is_digest

    consoles = ctx.find_object(Consoles) or Consoles.for_process()
    if not is_digest(digest):
        raise InputError(
            f"--to {digest!r} is not a bundle digest like sha256:<64 lowercase hex> (give it in full: "
            "`starmesh status --format json` shows the bundles in use, `starmesh verify` a release's previous one)"
        )
    reached = ReplicaURLs(urls).ask(
        lambda url: _unless_unavailable(call_control_plane(url, "/v1/rollback", body={"to": digest}, ca_cert=ca_cert))
    )
    for why in reached.skipped:
        consoles.err.print(Text(printable(f"starmesh: warning: skipped: {why}")))
    answer = reached.value
    if answer.status == 404:
        consoles.err.print(f"starmesh: rollback refused: {answer.error_text()}")
        ctx.exit(1)
    if answer.status not in (200, 201):
        raise InputError(f"control plane at {answer.url} answered HTTP {answer.status}: {answer.error_text()}")
    release = _new_release(answer.body)
    if release is None:
        raise InputError(f"control plane at {answer.url} answered something that is not a release")
    consoles.out.print(f"release {release.version} now serves {printable(release.bundle)}")
    if release.previous is not None:
        consoles.out.print(f"  (replacing {short(release.previous)}; every proxy gets it at once)")
