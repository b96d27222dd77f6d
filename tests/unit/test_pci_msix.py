"""vmmd.pci.msix / vmmd.pci.function with a fake vm: MSI-X table emulation,
irqfd assign/deassign on mask changes, routing contents, pending via eventfd,
BAR moves re-registering ioeventfds."""

import os

import pytest

from bus.pci_info import parse_pci_info
from bus.types import IoSpace
from tests.integration.fake_pci_device import PCI_INFO, PciConfigSpace
from vmmd.iospace import IoSpaceMap
from vmmd.kvm.api import MsiRoute
from vmmd.pci.bus import PciBus
from vmmd.pci.gsi import GsiRouter, default_routes
from vmmd.pci.msix import CTRL_ENABLE, CTRL_FUNCTION_MASK, MsixTable

MMIO, PIO, CFG = IoSpace.MMIO, IoSpace.PIO, IoSpace.PCI_CFG
MSI_ADDR = 0xFEE00000


class FakeVm:
    """Records calls with vmmd.kvm.api.Vm's method names and signatures."""

    def __init__(self):
        self.calls = []
        self.tables = []
        self.irqfds = {}      # fd -> gsi (assigned)
        self.ioeventfds = {}  # (addr, datamatch) -> fd

    def set_gsi_routing(self, routes):
        self.tables.append(list(routes))

    def irqfd(self, fd, gsi, resample_fd=None, deassign=False):
        self.calls.append(("irqfd", fd, gsi, resample_fd, deassign))
        if deassign:
            assert self.irqfds.pop(fd) == gsi
        else:
            assert fd not in self.irqfds
            self.irqfds[fd] = gsi
            if resample_fd is None:
                try:
                    os.eventfd_read(fd)  # KVM consumes a pending count at assign
                    self.calls.append(("inject", gsi))
                except BlockingIOError:
                    pass

    def ioeventfd(self, fd, addr, length, pio=False, datamatch=None, deassign=False):
        self.calls.append(("ioeventfd", fd, addr, length, datamatch, deassign))
        key = (addr, datamatch)
        if deassign:
            assert self.ioeventfds.pop(key) == fd
        else:
            assert key not in self.ioeventfds
            self.ioeventfds[key] = fd

    def signal_msi(self, addr, data, devid=None):
        self.calls.append(("msi", addr, data))
        return 1

    def irq_line(self, gsi, level):
        self.calls.append(("irq_line", gsi, level))


@pytest.fixture
def efds():
    fds = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(3)]
    yield fds
    for fd in fds:
        os.close(fd)


def program(t, v, addr=MSI_ADDR, data=0x40, masked=False):
    t.write_table(v * 16, 4, addr & 0xFFFFFFFF)
    t.write_table(v * 16 + 4, 4, addr >> 32)
    t.write_table(v * 16 + 8, 4, data)
    t.write_table(v * 16 + 12, 4, int(masked))


def test_power_on_state_and_table_access(efds):
    t = MsixTable(3, [24, 25, 26], GsiRouter(), efds)
    assert [t.entry(v) for v in range(3)] == [(0, 0, True)] * 3
    assert t.read_table(12, 4) == 1
    t.write_table(0, 8, 0x1234_FEE0_1003)  # qword: address, low 2 bits reserved
    assert t.read_table(0, 4) == 0xFEE01000 and t.read_table(4, 4) == 0x1234
    t.write_table(12, 4, 0xFFFFFFFF)  # only the mask bit sticks
    assert t.read_table(12, 4) == 1
    t.write_table(3 * 16, 4, 5)  # past the table: ignored
    assert t.read_table(3 * 16, 4) == 0xFFFFFFFF


def test_unmask_binds_irqfd_and_routes(efds):
    vm, router = FakeVm(), GsiRouter()
    router.attach(vm)
    t = MsixTable(3, [24, 25, 26], router, efds)
    t.attach(vm)
    program(t, 0, data=0x41)
    program(t, 1, data=0x42, masked=True)
    assert vm.irqfds == {}  # MSI-X disabled
    t.set_control_word(CTRL_ENABLE)
    assert vm.irqfds == {efds[0]: 24}
    assert vm.tables[-1] == default_routes() + [MsiRoute(24, MSI_ADDR, 0x41)]
    t.write_table(16 + 12, 4, 0)  # unmask vector 1
    assert vm.irqfds == {efds[0]: 24, efds[1]: 25}
    assert MsiRoute(25, MSI_ADDR, 0x42) in vm.tables[-1]
    t.write_table(12, 4, 1)  # mask vector 0
    assert vm.irqfds == {efds[1]: 25}
    t.set_control_word(CTRL_ENABLE | CTRL_FUNCTION_MASK)
    assert vm.irqfds == {}
    t.set_control_word(CTRL_ENABLE)
    assert vm.irqfds == {efds[1]: 25}
    t.set_control_word(0)
    assert vm.irqfds == {}


def test_entry_rewrite_while_live_updates_the_route(efds):
    vm, router = FakeVm(), GsiRouter()
    router.attach(vm)
    t = MsixTable(3, [24, 25, 26], router, efds)
    t.attach(vm)
    program(t, 2, data=0x50)
    t.set_control_word(CTRL_ENABLE)
    t.write_table(2 * 16 + 8, 4, 0x51)
    assert vm.tables[-1][-1] == MsiRoute(26, MSI_ADDR, 0x51)
    assert [c for c in vm.calls if c[0] == "irqfd"] == [("irqfd", efds[2], 26, None, False)]


def test_address_outside_the_apic_window_is_not_live(efds):
    vm, router = FakeVm(), GsiRouter()
    router.attach(vm)
    t = MsixTable(3, [24, 25, 26], router, efds)
    t.attach(vm)
    program(t, 0, addr=0)
    t.set_control_word(CTRL_ENABLE)
    assert vm.irqfds == {}


def test_pending_is_the_eventfd_count(efds):
    vm, router = FakeVm(), GsiRouter()
    router.attach(vm)
    t = MsixTable(3, [24, 25, 26], router, efds)
    t.attach(vm)
    program(t, 1, masked=True)
    t.set_control_word(CTRL_ENABLE)
    assert t.read_pba(0, 8) == 0
    os.eventfd_write(efds[1], 1)  # the device fires a masked vector
    assert t.read_pba(0, 8) == 0b010 and t.read_pba(0, 8) == 0b010  # not consumed by reading
    t.write_table(16 + 12, 4, 0)  # unmask: bound, KVM injects the pending one
    assert ("inject", 25) in vm.calls
    assert t.read_pba(0, 4) == 0


def test_bus_only_fire_honours_masks():
    vm, router = FakeVm(), GsiRouter()
    router.attach(vm)
    t = MsixTable(2, [24, 25], router, None)
    t.attach(vm)
    program(t, 0, data=0x33, masked=True)
    t.set_control_word(CTRL_ENABLE)
    t.fire(0)
    t.fire(7)  # out of range: ignored
    assert ("msi", MSI_ADDR, 0x33) not in vm.calls and t.read_pba(0, 8) == 1
    t.write_table(12, 4, 0)
    assert vm.calls.count(("msi", MSI_ADDR, 0x33)) == 1 and t.read_pba(0, 8) == 0
    t.fire(0)
    assert vm.calls.count(("msi", MSI_ADDR, 0x33)) == 2
    assert not any(c[0] == "irqfd" for c in vm.calls)


def test_new_vm_rebinds_and_reset_masks(efds):
    vm1, router = FakeVm(), GsiRouter()
    router.attach(vm1)
    t = MsixTable(3, [24, 25, 26], router, efds)
    t.attach(vm1)
    program(t, 0)
    t.set_control_word(CTRL_ENABLE)
    t.detach()
    vm2 = FakeVm()
    router.attach(vm2)
    t.attach(vm2)
    assert vm2.irqfds == {efds[0]: 24} and MsiRoute(24, MSI_ADDR, 0x40) in vm2.tables[-1]
    t.reset_state()
    assert vm2.irqfds == {} and not t.enabled


# -- PciFunction: config snooping, BAR windows, ioeventfds ------------------------------

class CfgDevice:
    """An in-process device owning a PciConfigSpace (what a ManagedDevice forwards to)."""

    def __init__(self):
        self.config = PciConfigSpace(intx_gsi=18)
        self.mmio = []
        self.ready = True

    def io_read(self, space, addr, size):
        if space == CFG:
            return self.config.read(addr, size)
        self.mmio.append(("r", space, addr))
        return 0x5A

    def io_write(self, space, addr, size, value):
        if space == CFG:
            self.config.write(addr, size, value)
        else:
            self.mmio.append(("w", space, addr, value))


@pytest.fixture
def rig():
    fds = {f"irqfd.{v}": os.eventfd(0, os.EFD_NONBLOCK) for v in range(3)}
    fds.update({f"ioeventfd.{q}": os.eventfd(0, os.EFD_NONBLOCK) for q in range(2)})
    fds["intx"] = os.eventfd(0, os.EFD_NONBLOCK)
    fds["intx_resample"] = os.eventfd(0, os.EFD_NONBLOCK)
    io = IoSpaceMap()
    bus = PciBus(io)
    dev = CfgDevice()
    vm = FakeVm()
    bus.attach_vm(vm)
    f = bus.add(3, 0, dev, parse_pci_info(PCI_INFO), fds=fds, intx_gsi=19, name="fake")
    yield bus, f, dev, vm, io, fds
    for fd in fds.values():
        os.close(fd)


def cfg_write(bus, reg, size, value):
    bus.config_write(0, 3, 0, reg, size, value)


def test_function_intx_and_config_forwarding(rig):
    bus, f, dev, vm, io, fds = rig
    assert ("irqfd", fds["intx"], 19, fds["intx_resample"], False) in vm.calls
    assert bus.config_read(0, 3, 0, 0, 4) == 0x10FF1AF4
    assert bus.config_read(0, 3, 0, 0x3C, 1) == 18
    assert bus.pci_irqs()[0].device == 3 and bus.pci_irqs()[0].pin == 0
    assert bus.pci_irqs()[0].ioapic_pin == 19


def test_bar_programming_routes_mmio_with_msix_carve_out(rig):
    bus, f, dev, vm, io, fds = rig
    cfg_write(bus, 0x10, 4, 0xFEB00000)
    cfg_write(bus, 0x14, 4, 0)
    cfg_write(bus, 0x18, 4, 0xC000)
    assert io.owner_of(MMIO, 0xFEB00000) is None  # decoding still off
    assert vm.ioeventfds == {}
    cfg_write(bus, 0x04, 2, 0x0003)
    assert io.owner_of(MMIO, 0xFEB00000) is dev
    assert io.owner_of(PIO, 0xC000) is dev
    assert io.owner_of(MMIO, 0xFEB01000) is not dev  # MSI-X table: vmmd
    assert io.owner_of(MMIO, 0xFEB02000) is not dev  # PBA: vmmd
    assert io.owner_of(MMIO, 0xFEB01030) is dev      # past the 3-entry table
    io.write(MMIO, 0xFEB01000, 4, 0xFEE00000)        # guest programs the table through the BAR
    assert f.msix.read_table(0, 4) == 0xFEE00000
    assert ("w", MMIO, 0xFEB01000, 0xFEE00000) not in dev.mmio
    assert vm.ioeventfds == {(0xFEB03000, None): fds["ioeventfd.0"], (0xFEB03004, None): fds["ioeventfd.1"]}
    io.read(MMIO, 0xFEB00000, 4)
    assert dev.mmio[-1] == ("r", MMIO, 0xFEB00000)


def test_bar_move_reregisters_ioeventfds(rig):
    bus, f, dev, vm, io, fds = rig
    cfg_write(bus, 0x10, 4, 0xFEB00000)
    cfg_write(bus, 0x04, 2, 0x0002)
    vm.calls.clear()
    cfg_write(bus, 0x14, 4, 0x1)  # BAR0 -> 0x1_FEB00000
    assert io.owner_of(MMIO, 0xFEB00000) is None
    assert io.owner_of(MMIO, 0x1_FEB00000) is dev
    ev = [c for c in vm.calls if c[0] == "ioeventfd"]
    assert ev[:2] == [("ioeventfd", fds["ioeventfd.0"], 0xFEB03000, 0, None, True),
                      ("ioeventfd", fds["ioeventfd.1"], 0xFEB03004, 0, None, True)]
    assert set(vm.ioeventfds) == {(0x1_FEB03000, None), (0x1_FEB03004, None)}
    # sizing probe with decoding on: unmapped, ioeventfds gone; restoring maps again
    cfg_write(bus, 0x10, 4, 0xFFFFFFFF)
    assert vm.ioeventfds == {} and io.owner_of(MMIO, 0x1_FEB00000) is None
    cfg_write(bus, 0x10, 4, 0xFEB00000)
    assert set(vm.ioeventfds) == {(0x1_FEB03000, None), (0x1_FEB03004, None)}
    # memory decoding off: unmapped
    cfg_write(bus, 0x04, 2, 0)
    assert vm.ioeventfds == {} and io.owner_of(MMIO, 0x1_FEB00000) is None


def test_non_snooped_writes_do_not_reroute(rig):
    bus, f, dev, vm, io, fds = rig
    n = f.refreshes
    cfg_write(bus, 0x3C, 1, 5)
    cfg_write(bus, 0x0C, 4, 0)
    assert f.refreshes == n
    cfg_write(bus, 0x40 + 2, 2, 0x8000)  # MSI-X message control
    assert f.refreshes == n + 1 and f.msix.enabled


def test_overlapping_bar_is_refused(rig):
    bus, f, dev, vm, io, fds = rig
    other = object()
    from bus.types import IoRange
    io.add(IoRange(MMIO, 0xFEB00000, 0x1000), other, "other")
    cfg_write(bus, 0x10, 4, 0xFEB00000)
    cfg_write(bus, 0x04, 2, 0x0002)
    assert io.owner_of(MMIO, 0xFEB00000) is other
    assert f.window(0) is None and vm.ioeventfds == {}


def test_device_down_keeps_routing(rig):
    bus, f, dev, vm, io, fds = rig
    cfg_write(bus, 0x10, 4, 0xFEB00000)
    cfg_write(bus, 0x04, 2, 0x0002)
    dev.ready = False
    assert f.refresh() is False
    assert io.owner_of(MMIO, 0xFEB00000) is dev and len(vm.ioeventfds) == 2


def test_remove_unregisters_everything(rig):
    bus, f, dev, vm, io, fds = rig
    cfg_write(bus, 0x10, 4, 0xFEB00000)
    cfg_write(bus, 0x04, 2, 0x0002)
    f.msix.write_table(0, 4, MSI_ADDR)
    f.msix.write_table(12, 4, 0)
    cfg_write(bus, 0x42, 2, 0x8000)
    assert fds["irqfd.0"] in vm.irqfds
    bus.remove(3, 0)
    assert vm.ioeventfds == {} and vm.irqfds == {}
    assert io.owner_of(MMIO, 0xFEB00000) is None
    assert bus.gsis.alloc() == 24  # its GSIs are free again
