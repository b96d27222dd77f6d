"""GSI numbers and KVM's GSI routing table.

KVM_SET_GSI_ROUTING replaces the whole table, so the router always installs
it complete: KVM's default routes (IOAPIC pins 0..23, the two PICs for
0..15, as kvm_setup_default_irq_routing builds them) plus one MSI route per
allocated vector GSI. Sans-I/O apart from the `vm` it is given (anything
with vmmd.kvm.api.Vm's set_gsi_routing).
"""

from __future__ import annotations

import threading

from vmmd.kvm.api import IrqchipRoute, MsiRoute

KVM_IRQCHIP_PIC_MASTER = 0
KVM_IRQCHIP_PIC_SLAVE = 1
KVM_IRQCHIP_IOAPIC = 2
IOAPIC_PINS = 24
PIC_IRQS = 16
FIRST_MSI_GSI = IOAPIC_PINS
GSI_LIMIT = 1024  # KVM_MAX_IRQ_ROUTES is larger; this bounds a hostile guest's cost


class GsiExhausted(RuntimeError):
    pass


class GsiAllocator:
    """Hands out GSIs from 24 upward; freed numbers are reused lowest first."""

    def __init__(self, first: int = FIRST_MSI_GSI, limit: int = GSI_LIMIT):
        self.first, self.limit = first, limit
        self._next = first
        self._free: list[int] = []
        self._lock = threading.Lock()

    def alloc(self) -> int:
        with self._lock:
            if self._free:
                self._free.sort()
                return self._free.pop(0)
            if self._next >= self.limit:
                raise GsiExhausted(f"no GSI left below {self.limit}")
            gsi, self._next = self._next, self._next + 1
            return gsi

    def free(self, gsi: int) -> None:
        with self._lock:
            if not self.first <= gsi < self._next or gsi in self._free:
                raise ValueError(f"GSI {gsi} is not allocated")
            self._free.append(gsi)


def default_routes() -> list[IrqchipRoute]:
    """KVM's default table: GSI n -> IOAPIC pin n (0..23) and PIC pin n%8 (0..15)."""
    routes = []
    for gsi in range(IOAPIC_PINS):
        routes.append(IrqchipRoute(gsi, KVM_IRQCHIP_IOAPIC, gsi))
        if gsi < PIC_IRQS:
            chip = KVM_IRQCHIP_PIC_MASTER if gsi < 8 else KVM_IRQCHIP_PIC_SLAVE
            routes.append(IrqchipRoute(gsi, chip, gsi % 8))
    return routes


class GsiRouter:
    """The MSI routes of all vectors; install() writes the complete table."""

    def __init__(self):
        self.vm = None
        self._msi: dict[int, tuple[int, int]] = {}
        self._lock = threading.Lock()
        self.installs = 0

    def attach(self, vm) -> None:
        """A new VM: its table starts as KVM's default; install ours."""
        self.vm = vm
        self.install()

    def detach(self) -> None:
        self.vm = None

    def routes(self) -> list:
        with self._lock:
            msi = sorted(self._msi.items())
        return default_routes() + [MsiRoute(gsi, addr, data) for gsi, (addr, data) in msi]

    def set_msi(self, gsi: int, address: int, data: int) -> bool:
        """Route `gsi` to an MSI; installs the table if that changed it."""
        with self._lock:
            if self._msi.get(gsi) == (address, data):
                return False
            self._msi[gsi] = (address, data)
        self.install()
        return True

    def set_many(self, routes: dict[int, tuple[int, int]]) -> bool:
        """Several routes at once, one install."""
        with self._lock:
            changed = any(self._msi.get(g) != r for g, r in routes.items())
            self._msi.update(routes)
        if changed:
            self.install()
        return changed

    def remove(self, gsi: int) -> None:
        with self._lock:
            if self._msi.pop(gsi, None) is None:
                return
        self.install()

    def install(self) -> None:
        if self.vm is not None:
            self.vm.set_gsi_routing(self.routes())
            self.installs += 1
