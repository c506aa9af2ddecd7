"""The proxy's link to the control plane: its client and, with `--ca-cert`, its workload identity.

    start()   the workload identity's renewal loop (which also gets the first certificate),
              then the ControlPlaneClient's loops: at once when there is a certificate (or
              no --ca-cert), else as soon as the first one is in, since the control plane
              serves releases and endpoints to certified proxies only
    close()   the client first (no apply starts while the proxy winds down), the rest after

The two have a session each: a certificate request never waits behind a long-poll.
"""

from __future__ import annotations

import asyncio

from starmesh.runtime.control import ControlPlaneClient
from starmesh.runtime.control_http import ControlPlaneSettings
from starmesh.runtime.workload import WorkloadIdentity

__all__ = ["ControlLink"]


class ControlLink:
    """Starts and stops the client and the workload identity in the right order."""

    def __init__(
        self, settings: ControlPlaneSettings, client: ControlPlaneClient, workload: WorkloadIdentity | None
    ) -> None:
        self.settings = settings
        self.client = client
        self.workload = workload
        self._gate: asyncio.Task[None] | None = None

    async def start(self) -> None:
        workload = self.workload
        if workload is None:
            await self.client.start()
            return
        workload.start(self.settings)
        if workload.current is not None:
            await self.client.start()
        else:
            self._gate = asyncio.get_running_loop().create_task(self._start_when_certified(workload))

    async def _start_when_certified(self, workload: WorkloadIdentity) -> None:
        await workload.wait_ready()
        await self.client.start()

    async def close(self) -> None:
        if self._gate is not None:
            self._gate.cancel()
            await asyncio.gather(self._gate, return_exceptions=True)
        await self.client.close()
        if self.workload is not None:
            await self.workload.close()

    def waiting_for(self) -> str:
        """What the link waits for, for a not-ready reason: the first certificate, else a release."""
        if self.workload is not None and self.workload.current is None:
            return self.workload.waiting_for()
        return self.client.waiting_for()

    def last_contact_age(self) -> float | None:
        """Seconds since the control plane last answered (None: never); the metrics' gauge."""
        return self.client.targets.age()

    def certificate_expiry(self) -> float | None:
        """Seconds until the workload certificate expires, negative once past (None: no
        certificate, or no --ca-cert); the metrics' gauge."""
        return None if self.workload is None else self.workload.expires_in()
