"""Device processes and vmmd's PCI side in a snapshot: shared by snapshot.create,
restore and (next) migration, and usable without a KVM VM (the test harness).

Every device process is quiesced and then saved concurrently over its bus
(CONTROL quiesce, CONTROL save): a device completes or records its in-flight
requests (ring indices and heads) before it answers. vmmd's own part of a
PCI function is its MSI-X table and pending bits (the device owns its
configuration space, BARs included, and saves it itself); the BAR windows,
ioeventfds and irqfds are re-derived from the restored registers when the
function is attached to the new VM.
"""

from __future__ import annotations

import asyncio
import os

from vmmd.snapshot import format as fmt
from vmmd.snapshot.format import SnapshotError


def instance_of(dev) -> str:
    """A device's section instance: its PCI address, so two devices of one kind differ."""
    return f"{dev.spec.slot}.{dev.spec.function}"


async def save_devices(devices) -> list[dict]:
    loop = asyncio.get_running_loop()

    async def call(dev, op):
        return await loop.run_in_executor(None, dev.control, op, {})

    try:
        await asyncio.gather(*(call(d, "quiesce") for d in devices))
        return list(await asyncio.gather(*(call(d, "save") for d in devices)))
    except Exception as exc:
        raise SnapshotError(f"a device could not save its state: {exc}") from None


async def resume_devices(devices, log=None) -> None:
    loop = asyncio.get_running_loop()

    async def one(dev):
        try:
            await loop.run_in_executor(None, dev.control, "resume", {})
        except Exception as exc:
            if log:
                log.warning("device %s did not resume: %s", dev.spec.id, exc)
    await asyncio.gather(*(one(d) for d in devices))


def save_pci(pci) -> dict:
    out = {}
    for (slot, function), f in sorted(pci.functions.items()):
        if f.msix is None:
            continue
        out[f"{slot}.{function}"] = {
            "msix_table": fmt.b64(bytes(f.msix.table)),
            "pending": [v for v in range(f.msix.vectors) if f.msix.pending(v)],
        }
    return out


class RestoreError(SnapshotError):
    pass


async def restore_devices(devices, states: dict) -> None:
    """Each (fresh) device process gets its saved state (by instance), concurrently."""
    loop = asyncio.get_running_loop()

    async def one(dev):
        inst = instance_of(dev)
        try:
            await loop.run_in_executor(None, dev.control, "restore", {"state": states[inst]})
        except Exception as exc:
            raise RestoreError(f"device {dev.spec.id} (slot {inst}) refused its saved state: {exc}") from None
    await asyncio.gather(*(one(d) for d in devices))


def restore_pci(pci, state: dict) -> None:
    """MSI-X tables and pending bits back into vmmd's PCI functions (before
    attach_vm / refresh re-derive the routing from them)."""
    for (slot, function), f in pci.functions.items():
        if f.msix is None:
            continue
        p = state.get(f"{slot}.{function}")
        if p is None:
            raise RestoreError(f"no MSI-X state for PCI function {slot}.{function}")
        table = fmt.unb64(p["msix_table"], "MSI-X table")
        if len(table) != len(f.msix.table):
            raise RestoreError(f"MSI-X table of {slot}.{function} has {len(table)} bytes, "
                               f"the device {len(f.msix.table)}")
        pending = p["pending"]
        if not all(type(v) is int and 0 <= v < f.msix.vectors for v in pending):
            raise RestoreError(f"bad pending MSI-X vector in {pending!r}")
        with f.msix._lock:
            f.msix.table[:] = table
            for v in pending:
                if f.msix.irqfds is not None:
                    os.eventfd_write(f.msix.irqfds[v], 1)  # counted while unbound: the pending bit
                else:
                    f.msix._pending.add(v)
            f.msix._sync_all()
