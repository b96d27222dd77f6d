"""PCI bus 0: slot/function -> owner, configuration access dispatch, and
the VM-wide interrupt plumbing (GSI allocation and the routing table).

00:00.0 is the host bridge (vmmd); every other function belongs to a device
process (vmmd.pci.function.PciFunction). Config writes are serialised (one
lock) so two vCPUs reprogramming BARs never interleave their re-routing.
"""

from __future__ import annotations

import logging
import threading

from vmmd.boot.mptable import PciIrq
from vmmd.pci.function import PciFunction
from vmmd.pci.gsi import GsiAllocator, GsiRouter
from vmmd.pci.host_bridge import HostBridge

log = logging.getLogger(__name__)


class PciBus:
    def __init__(self, iospace):
        self.iospace = iospace
        self.host_bridge = HostBridge()
        self.router = GsiRouter()
        self.gsis = GsiAllocator()
        self.functions: dict[tuple[int, int], PciFunction] = {}
        self.vm = None
        self._lock = threading.RLock()

    # -- membership ----------------------------------------------------------------
    def add(self, slot: int, function: int, device, info, *, fds=None, intx_gsi=None,
            name: str = "") -> PciFunction:
        if not (0 < slot < 32 and 0 <= function < 8):
            raise ValueError(f"bad PCI address {slot}.{function}")
        with self._lock:
            if (slot, function) in self.functions:
                raise ValueError(f"PCI slot {slot}.{function} is taken")
            f = PciFunction(slot, function, device, info, iospace=self.iospace, router=self.router,
                            gsis=self.gsis, fds=fds, intx_gsi=intx_gsi, name=name)
            self.functions[(slot, function)] = f
            if self.vm is not None:
                f.attach_vm(self.vm)
            return f

    def remove(self, slot: int, function: int) -> None:
        with self._lock:
            f = self.functions.pop((slot, function), None)
            if f is not None:
                f.remove()

    def function_of(self, device) -> PciFunction | None:
        for f in self.functions.values():
            if f.device is device:
                return f
        return None

    # -- configuration accesses (from ConfigMechanism1) -------------------------------
    def config_read(self, bus: int, device: int, function: int, reg: int, size: int) -> int:
        ones = (1 << (8 * size)) - 1
        if bus != 0:
            return ones
        if (device, function) == (0, 0):
            return self.host_bridge.config_read(reg, size)
        f = self.functions.get((device, function))
        return f.config_read(reg, size) & ones if f else ones

    def config_write(self, bus: int, device: int, function: int, reg: int, size: int, value: int) -> None:
        if bus != 0:
            return
        with self._lock:
            if (device, function) == (0, 0):
                self.host_bridge.config_write(reg, size, value)
                return
            f = self.functions.get((device, function))
            if f is not None:
                f.config_write(reg, size, value)

    def refresh(self, device) -> None:
        """Re-derive a device's routing from its registers (after a restart/restore)."""
        with self._lock:
            f = self.function_of(device)
            if f is not None:
                f.refresh()

    # -- the VM ------------------------------------------------------------------------
    def attach_vm(self, vm) -> None:
        with self._lock:
            self.vm = vm
            self.router.attach(vm)
            for f in self.functions.values():
                f.attach_vm(vm)

    def detach_vm(self) -> None:
        with self._lock:
            for f in self.functions.values():
                f.detach_vm()
            self.router.detach()
            self.vm = None

    def reset(self) -> None:
        """Machine reset: vmmd's PCI state to power-on (devices reset themselves)."""
        with self._lock:
            self.host_bridge.reset()
            for f in self.functions.values():
                f.reset()

    # -- boot tables -------------------------------------------------------------------
    def pci_irqs(self) -> list[PciIrq]:
        """MP table / _PRT entries: each INTx pin in use -> its IOAPIC pin."""
        seen = {}
        for (slot, _), f in sorted(self.functions.items()):
            if f.intx_gsi is not None:
                seen[(slot, f.info.intx_pin - 1)] = f.intx_gsi
        return [PciIrq(0, slot, pin, gsi) for (slot, pin), gsi in sorted(seen.items())]

    def describe(self) -> list[dict]:
        return [f.describe() for _, f in sorted(self.functions.items())]
