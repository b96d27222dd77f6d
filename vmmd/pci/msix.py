"""MSI-X table and PBA of one PCI function, emulated in vmmd.

Each vector has a GSI. A vector is *live* when MSI-X is enabled, the
function is not masked, the entry's mask bit is clear and its address is in
the APIC window: then its GSI carries an MSI route built from the entry and,
on the fast path, the device's `irqfd.<v>` eventfd is bound to it
(KVM_IRQFD). Masking unbinds it; the eventfd keeps counting, so re-binding
makes KVM inject at once if the device signalled meanwhile: that *is* the
pending bit, and the PBA reports it by polling the eventfd without
consuming it. In bus-only mode (no eventfds) the device reports "vector v
fired" on the bus; vmmd injects with signal_msi or remembers it as pending.

An entry whose data asks for a delivery mode other than fixed or lowest
priority (SMI, NMI, INIT, ExtINT) is never live: a device's interrupt can
only ever be a plain interrupt, whatever the table says (vmmd/authority.py).

Pure logic over an abstract `vm` (irqfd, signal_msi: vmmd.kvm.api.Vm's
names) and a vmmd.pci.gsi.GsiRouter.
"""

from __future__ import annotations

import logging
import select
import threading

from vmmd.authority import msi_delivery_ok

log = logging.getLogger(__name__)

ENTRY_SIZE = 16
VECTOR_MASKED = 1
MSI_WINDOW_MASK = 0xFFF00000
MSI_WINDOW = 0xFEE00000
# Message Control bits
CTRL_ENABLE = 1 << 15
CTRL_FUNCTION_MASK = 1 << 14


def eventfd_readable(fd: int) -> bool:
    """Whether an eventfd's counter is non-zero, without consuming it."""
    p = select.poll()
    p.register(fd, select.POLLIN)
    return bool(p.poll(0))


class MsixTable:
    def __init__(self, vectors: int, gsis: list[int], router, irqfds: list[int] | None = None,
                 name: str = "msix"):
        if len(gsis) != vectors or (irqfds is not None and len(irqfds) != vectors):
            raise ValueError("one GSI (and irqfd) per vector")
        self.vectors = vectors
        self.gsis = list(gsis)
        self.router = router
        self.irqfds = list(irqfds) if irqfds is not None else None
        self.name = name
        self.vm = None
        self._lock = threading.RLock()
        self._assigned: set[int] = set()
        self._pending: set[int] = set()  # bus-only pending vectors
        self.injected = 0
        self.reset_state()

    # -- state -------------------------------------------------------------------
    def reset_state(self) -> None:
        """Power-on state: every vector masked, MSI-X disabled."""
        with self._lock:
            self.table = bytearray(self.vectors * ENTRY_SIZE)
            for v in range(self.vectors):
                self.table[v * ENTRY_SIZE + 12] = VECTOR_MASKED
            self.enabled = False
            self.function_masked = False
            self._pending.clear()
            self._sync_all()

    def entry(self, v: int) -> tuple[int, int, bool]:
        """(address, data, masked) of vector v."""
        base = v * ENTRY_SIZE
        t = self.table
        addr = int.from_bytes(t[base:base + 8], "little")
        data = int.from_bytes(t[base + 8:base + 12], "little")
        return addr, data, bool(t[base + 12] & VECTOR_MASKED)

    def live(self, v: int) -> bool:
        addr, data, masked = self.entry(v)
        return (self.enabled and not self.function_masked and not masked
                and (addr & MSI_WINDOW_MASK) == MSI_WINDOW and msi_delivery_ok(data))

    # -- the VM ------------------------------------------------------------------
    def attach(self, vm) -> None:
        """A (new) VM: nothing of ours is registered in it yet."""
        with self._lock:
            self.vm = vm
            self._assigned.clear()
            self._sync_all()

    def detach(self) -> None:
        with self._lock:
            self.vm = None
            self._assigned.clear()

    def release(self) -> None:
        """Unbind every irqfd (the device goes away for good)."""
        with self._lock:
            for v in sorted(self._assigned):
                self._unbind(v)

    # -- guest accesses ----------------------------------------------------------
    def read_table(self, offset: int, size: int) -> int:
        if offset < 0 or offset + size > len(self.table):
            return (1 << (8 * size)) - 1
        with self._lock:
            return int.from_bytes(self.table[offset:offset + size], "little")

    def write_table(self, offset: int, size: int, value: int) -> None:
        if offset < 0 or offset + size > len(self.table) or offset % size:
            return
        data = value.to_bytes(size, "little")
        with self._lock:
            touched = set()
            for i, byte in enumerate(data):
                off = offset + i
                field = off % ENTRY_SIZE
                if field == 0:
                    byte &= 0xFC  # message address is dword aligned
                elif field == 12:
                    byte &= VECTOR_MASKED  # only the mask bit is writable
                elif field > 12:
                    byte = 0
                self.table[off] = byte
                touched.add(off // ENTRY_SIZE)
            for v in sorted(touched):
                self._sync(v)

    def read_pba(self, offset: int, size: int) -> int:
        value = 0
        for i in range(8 * size):
            v = offset * 8 + i
            if v < self.vectors and self.pending(v):
                value |= 1 << i
        return value

    def pending(self, v: int) -> bool:
        with self._lock:
            if v in self._pending:
                return True
            if self.irqfds is not None and v not in self._assigned:
                return eventfd_readable(self.irqfds[v])
            return False

    def set_control(self, enabled: bool, function_masked: bool) -> None:
        """The guest changed MSI-X Message Control (as read back from the device)."""
        with self._lock:
            if (enabled, function_masked) == (self.enabled, self.function_masked):
                return
            self.enabled, self.function_masked = enabled, function_masked
            self._sync_all()

    def set_control_word(self, word: int) -> None:
        self.set_control(bool(word & CTRL_ENABLE), bool(word & CTRL_FUNCTION_MASK))

    # -- bus-only interrupts -------------------------------------------------------
    def fire(self, v: int) -> None:
        """The device signalled vector v over the bus."""
        if not 0 <= v < self.vectors:
            return
        with self._lock:
            if self.live(v) and self.vm is not None:
                self._inject(v)
            else:
                self._pending.add(v)

    # -- routing -------------------------------------------------------------------
    def _inject(self, v: int) -> None:
        addr, data, _ = self.entry(v)
        self._pending.discard(v)
        self.injected += 1
        try:
            self.vm.signal_msi(addr, data)
        except OSError as exc:
            log.warning("%s: MSI for vector %d not delivered: %s", self.name, v, exc)

    def _bind(self, v: int) -> None:
        self.vm.irqfd(self.irqfds[v], self.gsis[v])
        self._assigned.add(v)

    def _unbind(self, v: int) -> None:
        self._assigned.discard(v)
        if self.vm is not None:
            try:
                self.vm.irqfd(self.irqfds[v], self.gsis[v], deassign=True)
            except OSError as exc:
                log.warning("%s: irqfd deassign for vector %d: %s", self.name, v, exc)

    def _sync(self, v: int, install: bool = True) -> None:
        if self.vm is None:
            return
        if self.live(v):
            addr, data, _ = self.entry(v)
            if install:
                self.router.set_msi(self.gsis[v], addr, data)
            if self.irqfds is not None:
                if v not in self._assigned:
                    self._bind(v)
            elif v in self._pending:
                self._inject(v)
        elif v in self._assigned:
            self._unbind(v)

    def _sync_all(self) -> None:
        if self.vm is None:
            return
        routes = {}
        for v in range(self.vectors):
            if self.live(v):
                addr, data, _ = self.entry(v)
                routes[self.gsis[v]] = (addr, data)
        self.router.set_many(routes)
        for v in range(self.vectors):
            self._sync(v, install=False)
