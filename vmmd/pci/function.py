"""vmmd's side of one device-owned PCI function: routing derived from its
configuration registers.

The device owns its configuration space; vmmd forwards accesses and, after a
guest write that touches COMMAND, a BAR or the MSI-X Message Control word,
reads the registers back (a read is ordered after the posted write) and
re-derives: the BAR windows in the IoSpaceMap (with the MSI-X table and PBA
carved out to vmmd's emulation), the ioeventfds of the notify addresses, and
MSI-X enable/function mask. `device` is anything with io_read/io_write (a
vmmd.devlink.ManagedDevice); `vm` anything with vmmd.kvm.api.Vm's irqfd and
ioeventfd.
"""

from __future__ import annotations

import logging
import threading

from bus.pci_info import PciInfo
from bus.types import IoRange, IoSpace
from vmmd.pci import bars as barmod
from vmmd.pci.msix import MsixTable

log = logging.getLogger(__name__)

CFG = IoSpace.PCI_CFG


class _Window:
    """A sub-range of a BAR handled inside vmmd (the MSI-X table or PBA)."""

    def __init__(self, base: int, read, write):
        self.base, self._read, self._write = base, read, write

    def io_read(self, space, addr, size):
        return self._read(addr - self.base, size)

    def io_write(self, space, addr, size, value):
        self._write(addr - self.base, size, value)


def _ignore(offset, size, value):
    pass


def intx_gsi(slot: int, pin: int) -> int:
    """The IOAPIC pin (= GSI) of INTx `pin` (1 = INTA) of a device in `slot`."""
    return 16 + (slot + pin - 1) % 8


class PciFunction:
    def __init__(self, slot: int, function: int, device, info: PciInfo, *, iospace, router, gsis,
                 fds: dict[str, int] | None = None, intx_gsi: int | None = None, name: str = ""):
        self.slot, self.function = slot, function
        self.device = device
        self.info = info
        self.iospace = iospace
        self.name = name or f"pci{slot}.{function}"
        self.fds = dict(fds or {})
        self.intx_gsi = intx_gsi if info.intx_pin else None
        self.vm = None
        self._lock = threading.RLock()
        self.command = 0
        self.bar_regs: dict[int, int] = {}
        self.windows: list[barmod.BarWindow] = []
        self.ioevents: dict[int, tuple[int, int]] = {}  # queue -> (address, length)
        self._intx_bound = False
        self.refreshes = 0
        self.msix = None
        if info.msix:
            gsi_list = [gsis.alloc() for _ in range(info.msix.vectors)]
            irqfds = None
            if all(f"irqfd.{v}" in self.fds for v in range(info.msix.vectors)):
                irqfds = [self.fds[f"irqfd.{v}"] for v in range(info.msix.vectors)]
            self.msix = MsixTable(info.msix.vectors, gsi_list, router, irqfds, self.name)
        self._gsis = gsis

    # -- config space ------------------------------------------------------------
    def config_read(self, reg: int, size: int) -> int:
        return self.device.io_read(CFG, reg, size)

    def config_write(self, reg: int, size: int, value: int) -> None:
        self.device.io_write(CFG, reg, size, value)
        if self.snooped(reg, size):
            self.refresh()

    def snooped(self, reg: int, size: int) -> bool:
        if barmod.touches(reg, size, barmod.COMMAND, barmod.COMMAND + 2):
            return True
        if barmod.touches(reg, size, barmod.BAR0, barmod.BAR_END):
            return True
        m = self.info.msix
        return bool(m and barmod.touches(reg, size, m.cap + 2, m.cap + 4))

    def _ready(self) -> bool:
        return getattr(self.device, "ready", True)

    def refresh(self) -> bool:
        """Read COMMAND, the BARs and MSI-X control back and re-derive routing.

        Skipped (routing kept) while the device process is down: its state
        comes back with the next incarnation, which is refreshed then."""
        if not self._ready():
            return False
        command = self.config_read(barmod.COMMAND, 2)
        regs = {i: self.config_read(barmod.bar_register(i), 4) for i in barmod.registers_of(self.info.bars)}
        ctrl = self.config_read(self.info.msix.cap + 2, 2) if self.info.msix else 0
        if not self._ready():
            return False  # it died while we were reading: all-ones, not its registers
        self.apply(command, regs, ctrl)
        return True

    # -- routing -------------------------------------------------------------------
    def apply(self, command: int, regs: dict[int, int], msix_ctrl: int = 0) -> None:
        with self._lock:
            self.refreshes += 1
            self.command, self.bar_regs = command, dict(regs)
            windows = barmod.decode_bars(self.info.bars, regs, command)
            rejected = self.iospace.replace(self, self._items(windows))
            bad = set()
            for rng, name, err in rejected:
                log.warning("%s: BAR window not mapped: %s", self.name, err)
                bad.update(w.index for w in windows if w.space == rng.space and w.base <= rng.base < w.end)
            self.windows = [w for w in windows if w.index not in bad]
            self._sync_ioevents()
            if self.msix:
                self.msix.set_control_word(msix_ctrl)

    def window(self, index: int) -> barmod.BarWindow | None:
        for w in self.windows:
            if w.index == index:
                return w
        return None

    def _items(self, windows):
        items = []
        m = self.info.msix
        for w in windows:
            subs = []
            if m and w.kind != "io":
                if m.table_bar == w.index:
                    subs.append((m.table_offset, m.table_size,
                                 _Window(w.base + m.table_offset, self.msix.read_table, self.msix.write_table),
                                 "msix-table"))
                if m.pba_bar == w.index:
                    subs.append((m.pba_offset, m.pba_size,
                                 _Window(w.base + m.pba_offset, self.msix.read_pba, _ignore), "msix-pba"))
            subs.sort(key=lambda s: s[0])
            pos = 0
            for off, length, handler, what in subs:
                if off > pos:
                    items.append((IoRange(w.space, w.base + pos, off - pos), self.device,
                                  f"{self.name} BAR{w.index}"))
                items.append((IoRange(w.space, w.base + off, length), handler, f"{self.name} {what}"))
                pos = off + length
            if pos < w.size:
                items.append((IoRange(w.space, w.base + pos, w.size - pos), self.device,
                              f"{self.name} BAR{w.index}"))
        return items

    def _wanted_ioevents(self) -> dict[int, tuple[int, int]]:
        n = self.info.notify
        if n is None or self.vm is None:
            return {}
        w = self.window(n.bar)
        if w is None:
            return {}
        out = {}
        for q in range(n.queues):
            if f"ioeventfd.{q}" in self.fds:
                # multiplier 0: every queue notifies at one address, told apart by the value
                out[q] = (w.base + n.queue_offset(q), 2 if n.multiplier == 0 else 0)
        return out

    def _ioeventfd(self, q: int, addr: int, length: int, deassign: bool) -> None:
        datamatch = q if length else None
        self.vm.ioeventfd(self.fds[f"ioeventfd.{q}"], addr, length, datamatch=datamatch,
                          deassign=deassign)

    def _sync_ioevents(self) -> None:
        wanted = self._wanted_ioevents()
        if self.vm is None:
            return
        for q, (addr, length) in list(self.ioevents.items()):
            if wanted.get(q) != (addr, length):
                del self.ioevents[q]
                try:
                    self._ioeventfd(q, addr, length, deassign=True)
                except OSError as exc:
                    log.warning("%s: ioeventfd deassign for queue %d at %#x: %s", self.name, q, addr, exc)
        for q, (addr, length) in wanted.items():
            if q not in self.ioevents:
                try:
                    self._ioeventfd(q, addr, length, deassign=False)
                    self.ioevents[q] = (addr, length)
                except OSError as exc:
                    log.warning("%s: ioeventfd for queue %d at %#x: %s", self.name, q, addr, exc)

    # -- the VM ----------------------------------------------------------------------
    def attach_vm(self, vm) -> None:
        """A (new) VM: register INTx, MSI-X and the current BAR state in it."""
        with self._lock:
            self.vm = vm
            self.ioevents.clear()
            self._intx_bound = False
            if self.intx_gsi is not None and "intx" in self.fds and "intx_resample" in self.fds:
                try:
                    vm.irqfd(self.fds["intx"], self.intx_gsi, resample_fd=self.fds["intx_resample"])
                    self._intx_bound = True
                except OSError as exc:
                    log.error("%s: INTx irqfd on GSI %d: %s", self.name, self.intx_gsi, exc)
            if self.msix:
                self.msix.attach(vm)
            self._sync_ioevents()
        self.refresh()

    def detach_vm(self) -> None:
        """The VM is going away (its fd closes every registration)."""
        with self._lock:
            self.vm = None
            self.ioevents.clear()
            self._intx_bound = False
            if self.msix:
                self.msix.detach()

    def reset(self) -> None:
        """Machine reset: vmmd's MSI-X state back to power-on."""
        if self.msix:
            self.msix.reset_state()

    def remove(self) -> None:
        """Unregister everything (the device is gone for good)."""
        with self._lock:
            self.iospace.replace(self, [])
            self.windows = []
            self._sync_ioevents()
            if self.vm is not None:
                for q, (addr, length) in list(self.ioevents.items()):
                    try:
                        self._ioeventfd(q, addr, length, deassign=True)
                    except OSError:
                        pass
                self.ioevents.clear()
                if self._intx_bound:
                    try:
                        self.vm.irqfd(self.fds["intx"], self.intx_gsi, deassign=True)
                    except OSError:
                        pass
                    self._intx_bound = False
            if self.msix:
                self.msix.release()
                for g in self.msix.gsis:
                    self.msix.router.remove(g)
                    self._gsis.free(g)

    # -- bus-only interrupts ---------------------------------------------------------
    def fire_vector(self, v: int) -> None:
        if self.msix:
            self.msix.fire(v)

    def describe(self) -> dict:
        return {
            "slot": self.slot, "function": self.function, "command": self.command,
            "bars": [{"index": w.index, "kind": w.kind, "base": w.base, "size": w.size} for w in self.windows],
            "msix": None if not self.msix else {"enabled": self.msix.enabled,
                                                "masked": self.msix.function_masked,
                                                "gsis": self.msix.gsis},
            "intx_gsi": self.intx_gsi,
            "ioeventfds": {q: a for q, (a, _) in self.ioevents.items()},
        }
