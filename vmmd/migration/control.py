"""migration.start / status / cancel on a running Machine (the JSON-RPC side is
vmmd/api/migration.py). One migration at a time; it holds the machine's
transition lock while it runs, so pause/resume/snapshot/reset wait for it."""

from __future__ import annotations

import asyncio
import logging

from vmmd.api.methods import VmStateError
from vmmd.migration import transport

log = logging.getLogger(__name__)
EXIT_GRACE_S = 1.0  # the source's API stays up this long after a completed migration


class MigrationControl:
    def __init__(self, machine):
        self.m = machine
        self.current = None  # vmmd.migration.source.Migration
        self.task: asyncio.Task | None = None

    @property
    def active(self) -> bool:
        return self.task is not None and not self.task.done()

    async def start(self, params: dict) -> dict:
        m = self.m
        if self.active:
            raise VmStateError("a migration is already running")
        if m.state != "running":
            raise VmStateError(f"cannot migrate a VM that is {m.state}")
        try:
            uri = transport.parse_uri(params["uri"])
            tls = None
            if params.get("tls"):
                t = params["tls"]
                tls = transport.Tls(t["cert"], t["key"], t["ca"])
            transport.check_security(uri, tls, bool(params.get("insecure")))
        except transport.TransportError as exc:
            raise VmStateError(str(exc)) from None
        from vmmd.migration.source import Migration
        mig = Migration(m, uri, downtime_ms=params.get("downtime_ms", 300),
                        max_bandwidth_mibs=params.get("max_bandwidth_mibs"),
                        auto_converge=params.get("auto_converge", True),
                        timeout_s=params.get("timeout_s"), tls=tls)
        self.current = mig
        self.task = m.loop.create_task(self._run(mig))
        return self.status()

    async def _run(self, mig) -> None:
        m = self.m
        async with m._transition:
            if m.state != "running":
                mig.status.update(state="failed", error=f"the VM is {m.state}")
                return
            await m.loop.run_in_executor(None, mig.run)
        if mig.status["state"] == "completed":
            # The destination runs the guest: this vmmd is done (after a moment
            # for clients polling migration.status to see "completed").
            await asyncio.sleep(EXIT_GRACE_S)
            m._finish(0)

    def status(self) -> dict:
        if self.current is None:
            return {"state": "none"}
        return dict(self.current.status)

    async def cancel(self) -> dict:
        mig = self.current
        if not self.active or mig is None:
            raise VmStateError("no migration is running")
        if mig.committed:
            raise VmStateError("too late to cancel: the destination has taken over")
        mig.cancel_requested = True
        await asyncio.wait_for(asyncio.shield(self.task), 60)
        return self.status()
