"""`starmesh up`: one command to a running local mesh.

    starmesh up [EXAMPLE_DIR] [--state-dir DIR]
      1 lock          STATE/up.lock (flock, our pid): a second `up` on DIR exits 2
      2 policy repo   STATE/repo from EXAMPLE_DIR's policies (first run), else as it is
      3 signing key   STATE/keys/signing.key|pub (first run), else reused
      4 mesh identity STATE/ca (the mesh CA, for the policy's trust domain) and
                      STATE/join-token (0600) on the first run, else reused
      5 control plane follows the repo's branch over HTTPS with --ca; `ready release N`
                      or exit 1 with why
      6 apps and sidecars, one pair per app instance in up.json, each sidecar with
                      --ca-cert and the join token (mTLS between sidecars)
      7 sync          every sidecar runs the release (k/N proxies synced, 60 s deadline)
      then: what runs where, next things to try, and a live status until Ctrl-C

The parts are in localmesh*.py (no UI) and up_view.py (the display). SIGINT, SIGTERM
or SIGHUP stops every child (SIGTERM to each process group, ~10 s grace, then SIGKILL;
a second Ctrl-C kills at once), releases the lock, prints `stopped` and exits 0.
Exit 2: bad input (no such example, no up.json, git missing, the state dir in use);
exit 1: the mesh did not come up (the message names the part and its log), and
everything started so far is stopped.
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click

from starmesh.cli.errors import InputError

if TYPE_CHECKING:
    import asyncio

    from starmesh.cli.localmesh import LocalMesh
    from starmesh.cli.localmesh_state import StateLock
    from starmesh.cli.up_view import View

__all__ = ["up_command"]

STATUS_REFRESH_SECONDS = 1.0
SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
"""Each stops the mesh (SIGHUP: the terminal went away); a second one kills at once."""


def _setup(given: str, state_dir: Path, view: View) -> tuple[LocalMesh, StateLock]:
    """Steps 1-4 (nothing runs yet); SetupError on bad input, StartFailed when the first
    run's policy does not compile (no trust domain for the CA). The lock is held on return."""
    import os

    from starmesh.cli.localmesh import LocalMesh
    from starmesh.cli.localmesh_example import load_example
    from starmesh.cli.localmesh_identity import prepare_identity
    from starmesh.cli.localmesh_state import (
        StateLayout,
        StateLock,
        check_git,
        check_state_dir,
        prepare_keys,
        prepare_repo,
    )

    check_git()
    example = load_example(given)
    layout = StateLayout(state_dir.expanduser().resolve())
    check_state_dir(example, layout)
    lock = StateLock.acquire(layout)
    try:
        view.step(0, f"{layout.lock} (pid {os.getpid()})")
        repo = prepare_repo(example, layout)
        if repo.created:
            view.step(1, f"created {repo.path} from {example.policies} (commit {repo.commit[:12]})")
        elif repo.path == layout.repo:
            view.step(1, f"kept {repo.path} as it is (HEAD {repo.commit[:12]})")
        else:
            view.step(1, f"using the example's own repo {repo.path}, branch {repo.branch} (HEAD {repo.commit[:12]})")
        keys = prepare_keys(layout)
        view.step(2, f"{'created' if keys.created else 'reused'} {keys.private}")
        view.step(3, "compiling the policy for its trust domain" if not layout.ca.exists() else "loading", done=False)
        identity = prepare_identity(layout, repo)
        made = "created" if identity.ca_created else "reused"
        token = "created" if identity.token_created else "reused"
        view.step(3, f"{made} {identity.ca_cert} (trust domain {identity.trust_domain}), {token} {identity.token_file}")
    except BaseException:
        lock.release()
        raise
    return LocalMesh(example, layout, repo, keys, identity), lock


async def _start(mesh: LocalMesh, view: View) -> None:
    """Steps 5-7; StartFailed when a part does not come up."""
    view.step(4, "starting", done=False)
    plane = await mesh.start_control_plane()
    view.step(4, f"{plane.url}, release {plane.release_version} {plane.bundle}")
    n = len(mesh.example.apps)
    s = "" if n == 1 else "s"
    view.step(5, f"starting {n} app instance{s}, each with a sidecar", done=False)
    await mesh.start_instances()
    view.step(5, f"{n} app{s} and {n} sidecar{s} started")
    view.step(6, f"0/{n} proxies synced", done=False)

    def progress(k: int, total: int) -> None:
        if k < total:
            view.step(6, f"{k}/{total} proxies synced", done=False)

    status = await mesh.wait_synced(progress)
    view.step(6, f"{n}/{n} proxies synced; waiting for the endpoint table to reach them", done=False)
    await mesh.wait_routable()
    view.step(6, f"{n}/{n} proxies synced on release {status.release_version}")
    view.running(mesh, status)


async def _watch(mesh: LocalMesh, view: View, stop: asyncio.Event) -> None:
    """The live status (every second) until `stop` is set."""
    import asyncio
    import contextlib

    while not stop.is_set():
        status = await mesh.status()
        view.update(status, mesh.newly_exited())
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), STATUS_REFRESH_SECONDS)


async def _run(mesh: LocalMesh, view: View) -> int:
    """Start, watch until SIGINT/SIGTERM, and always stop every child; the exit code."""
    import asyncio
    import contextlib

    from starmesh.cli.localmesh_errors import StartFailed

    loop = asyncio.get_running_loop()
    stop, force = asyncio.Event(), asyncio.Event()

    def on_signal() -> None:
        (force if stop.is_set() else stop).set()

    for signum in SIGNALS:
        loop.add_signal_handler(signum, on_signal)
    code = 0
    try:
        starting = asyncio.create_task(_start(mesh, view))
        stopping = asyncio.create_task(stop.wait())
        await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():  # Ctrl-C during the start
            starting.cancel()
            with contextlib.suppress(asyncio.CancelledError, StartFailed):
                await starting
        else:
            stopping.cancel()
            try:
                starting.result()
            except StartFailed as exc:
                view.failed(str(exc))
                code = 1
            else:
                await _watch(mesh, view, stop)
    finally:
        with contextlib.suppress(OSError):  # the terminal may be gone (SIGHUP): stop anyway
            view.stopping()
        killed = await mesh.stop(force)
        with contextlib.suppress(OSError):
            view.stopped(killed)
        for signum in SIGNALS:
            loop.remove_signal_handler(signum)
    return code


@click.command("up")
@click.argument("example_dir", default="examples/bookinfo", metavar="[EXAMPLE_DIR]")
@click.option(
    "--state-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path(".starmesh"),
    show_default=True,
    metavar="DIR",
    help="Where the policy repo, keys, control-plane and proxy state and logs are kept (reused next time).",
)
def up_command(example_dir: str, state_dir: Path) -> None:
    """Run a whole mesh on this machine: control plane, apps and one sidecar each.

    EXAMPLE_DIR (default examples/bookinfo) holds up.json, the policies and the apps.
    On the first run the policies are copied into a new Git repo, STATE/repo, a
    signing key is made in STATE/keys, the mesh CA in STATE/ca (for the policy's
    trust domain) and a join token in STATE/join-token; later runs reuse them all
    (your commits stay). The control plane serves HTTPS with a certificate from the
    CA, and every sidecar gets its workload certificate from it, so sidecars talk
    mTLS as the policy's mtls modes say. Every port is a free one on 127.0.0.1, and
    every address is printed: the entry page (through its sidecar), each sidecar's
    admin /metrics and /config, the control plane's https:// /v1/status. Commit to
    the policy repo and watch the mesh follow.

    Ctrl-C (or SIGTERM) stops every child and exits 0. Only one `up` runs per state dir.

    \b
    Examples:
      starmesh up
      starmesh up examples/bookinfo --state-dir /tmp/mesh
    """
    import asyncio

    from starmesh.cli.localmesh_errors import SetupError, StartFailed
    from starmesh.cli.up_view import make_view

    view = make_view()
    try:
        mesh, lock = _setup(example_dir, state_dir, view)
    except SetupError as exc:
        view.close()
        raise InputError(str(exc)) from exc
    except StartFailed as exc:  # nothing was started
        view.failed(str(exc))
        view.close()
        sys.exit(1)
    except BaseException:
        view.close()
        raise
    try:
        code = asyncio.run(_run(mesh, view))
    finally:
        view.close()
        lock.release()
    sys.exit(code)
