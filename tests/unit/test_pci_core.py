"""vmmd.pci: configuration mechanism #1, host bridge, BAR decoding, GSIs."""

import pytest

from bus.pci_info import Bar
from bus.types import IoRange, IoSpace
from vmmd.chipset import ResetControl
from vmmd.iospace import IoConflict, IoSpaceMap
from vmmd.kvm.api import IrqchipRoute, MsiRoute
from vmmd.pci import bars as B
from vmmd.pci.bus import PciBus
from vmmd.pci.config_access import ConfigAddress, ConfigMechanism1
from vmmd.pci.gsi import GsiAllocator, GsiExhausted, GsiRouter, default_routes
from vmmd.pci.function import intx_gsi

PIO = IoSpace.PIO


class RecordingTarget:
    def __init__(self):
        self.calls = []

    def config_read(self, bus, dev, fn, reg, size):
        self.calls.append(("r", bus, dev, fn, reg, size))
        return 0x11223344 >> (8 * (reg % 4)) & ((1 << (8 * size)) - 1)

    def config_write(self, bus, dev, fn, reg, size, value):
        self.calls.append(("w", bus, dev, fn, reg, size, value))


def addr(bus=0, dev=0, fn=0, reg=0, enable=True):
    return ConfigAddress(enable, bus, dev, fn, reg).encode()


def test_config_address_decoding():
    a = ConfigAddress.decode(0x80000000 | 3 << 16 | 31 << 11 | 7 << 8 | 0xFC)
    assert a == ConfigAddress(True, 3, 31, 7, 0xFC)
    assert ConfigAddress.decode(0x1234_5678 & ~(1 << 31)).enabled is False
    assert ConfigAddress.decode(0x80000003).register == 0  # low bits ignored
    assert ConfigAddress.decode(a.encode()) == a


def test_data_port_byte_offsets_and_sizes():
    t = RecordingTarget()
    m = ConfigMechanism1(t)
    m.io_write(PIO, 0xCF8, 4, addr(dev=2, fn=1, reg=0x10))
    assert m.io_read(PIO, 0xCF8, 4) == addr(dev=2, fn=1, reg=0x10)
    m.io_read(PIO, 0xCFC, 4)
    m.io_read(PIO, 0xCFE, 2)
    m.io_read(PIO, 0xCFF, 1)
    m.io_write(PIO, 0xCFD, 1, 0xAB)
    m.io_write(PIO, 0xCFE, 2, 0xBEEF)
    assert t.calls == [("r", 0, 2, 1, 0x10, 4), ("r", 0, 2, 1, 0x12, 2), ("r", 0, 2, 1, 0x13, 1),
                       ("w", 0, 2, 1, 0x11, 1, 0xAB), ("w", 0, 2, 1, 0x12, 2, 0xBEEF)]
    # a word access crossing the dword is not a config access
    assert m.io_read(PIO, 0xCFF, 2) == 0xFFFF


def test_disabled_address_reads_all_ones_and_drops_writes():
    t = RecordingTarget()
    m = ConfigMechanism1(t)
    m.io_write(PIO, 0xCF8, 4, addr(dev=2, enable=False))
    assert m.io_read(PIO, 0xCFC, 4) == 0xFFFFFFFF
    m.io_write(PIO, 0xCFC, 4, 1)
    assert t.calls == []


def test_reset_control_shares_the_ports():
    resets = []
    rc = ResetControl(resets.append)
    t = RecordingTarget()
    io = IoSpaceMap()
    m = ConfigMechanism1(t, rc)
    for r in m.RANGES:
        io.add(r, m, "pci-cfg")
    io.write(PIO, 0xCF8, 4, addr(dev=3))
    assert io.read(PIO, 0xCF8, 4) == addr(dev=3)  # a dword write to 0xCF8 is not a reset
    io.write(PIO, 0xCF9, 1, 0x02)
    assert io.read(PIO, 0xCF9, 1) == 0x02 and resets == []
    io.write(PIO, 0xCF9, 1, 0x06)
    assert len(resets) == 1
    assert io.read(PIO, 0xCF8, 4) == addr(dev=3)  # the address register is untouched


def test_bus_host_bridge_and_absent_functions():
    io = IoSpaceMap()
    bus = PciBus(io)
    m = ConfigMechanism1(bus)
    m.io_write(PIO, 0xCF8, 4, addr())
    assert m.io_read(PIO, 0xCFC, 4) == 0x1237_8086
    m.io_write(PIO, 0xCF8, 4, addr(reg=0x08))
    assert m.io_read(PIO, 0xCFC, 4) >> 8 == 0x060000
    m.io_write(PIO, 0xCF8, 4, addr(reg=0x0C))
    assert m.io_read(PIO, 0xCFE, 1) == 0  # header type 0
    m.io_write(PIO, 0xCFC, 4, 0xFFFFFFFF)  # read-only ids
    m.io_write(PIO, 0xCF8, 4, addr())
    assert m.io_read(PIO, 0xCFC, 4) == 0x1237_8086
    for a in (addr(dev=5), addr(dev=0, fn=1), addr(bus=1)):
        m.io_write(PIO, 0xCF8, 4, a)
        assert m.io_read(PIO, 0xCFC, 4) == 0xFFFFFFFF
        assert m.io_read(PIO, 0xCFC, 2) == 0xFFFF


# -- BARs ---------------------------------------------------------------------------

MEM32 = Bar(0, 0x1000, "mem32")
MEM64 = Bar(2, 0x4000, "mem64")
BIG64 = Bar(0, 1 << 33, "mem64")
IO = Bar(4, 0x20, "io")
ON = B.CMD_IO | B.CMD_MEMORY


def test_bar_decoding_basic():
    assert B.decode_bar(MEM32, {0: 0xFEB0_0000}, ON) == B.BarWindow(0, "mem32", 0xFEB00000, 0x1000)
    assert B.decode_bar(MEM64, {2: 0x0000_000C, 3: 0x1}, ON).base == 0x1_0000_0000
    assert B.decode_bar(MEM64, {2: 0x8000_000C, 3: 0x1}, ON).base == 0x1_8000_0000
    assert B.decode_bar(IO, {4: 0xC041}, ON) == B.BarWindow(4, "io", 0xC040, 0x20)
    # untrusted low bits are masked with the declared size
    assert B.decode_bar(MEM32, {0: 0xFEB0_0FF8}, ON).base == 0xFEB00000


def test_bar_decoding_respects_command():
    regs = {0: 0xFEB00000, 4: 0xC040}
    assert B.decode_bar(MEM32, regs, B.CMD_IO) is None
    assert B.decode_bar(IO, regs, B.CMD_MEMORY) is None
    assert B.decode_bar(IO, regs, B.CMD_IO) is not None
    assert [w.index for w in B.decode_bars([MEM32, IO], regs, ON)] == [0, 4]


def test_unassigned_and_sizing_probes_are_not_mapped():
    assert B.decode_bar(MEM32, {0: 0}, ON) is None
    assert B.decode_bar(MEM32, {0: 0xFFFFF000}, ON) is None   # all-ones probe read back
    assert B.decode_bar(IO, {4: 0xFFFFFFE1}, ON) is None
    # 64-bit probe: every intermediate state of lo/hi sizing
    assert B.decode_bar(MEM64, {2: 0xFFFFC00C, 3: 0}, ON) is None
    assert B.decode_bar(MEM64, {2: 0xFFFFC00C, 3: 0xFFFFFFFF}, ON) is None
    assert B.decode_bar(MEM64, {2: 0xFE00000C, 3: 0xFFFFFFFF}, ON) is None
    # a >4 GiB 64-bit BAR: the low dword carries no address bits
    assert B.decode_bar(BIG64, {0: 0xC, 1: 0x4}, ON).base == 0x4_0000_0000
    assert B.decode_bar(BIG64, {0: 0xC, 1: 0xFFFFFFFC}, ON).base == 0xFFFFFFFC_00000000
    assert B.decode_bar(BIG64, {0: 0xC, 1: 0xFFFFFFFE}, ON) is None  # its probe read-back
    assert B.decode_bar(BIG64, {0: 0xC, 1: 0xFFFFFFFF}, ON) is None


def test_bar_registers_and_touches():
    assert B.registers_of([MEM64, IO]) == [2, 3, 4]
    assert B.touches(0x04, 4, 0x04, 0x06) and B.touches(0x05, 1, 0x04, 0x06)
    assert not B.touches(0x06, 2, 0x04, 0x06) and not B.touches(0x00, 4, 0x04, 0x06)


# -- GSIs -----------------------------------------------------------------------------

def test_gsi_allocator():
    a = GsiAllocator(limit=27)
    assert [a.alloc(), a.alloc(), a.alloc()] == [24, 25, 26]
    with pytest.raises(GsiExhausted):
        a.alloc()
    a.free(25)
    with pytest.raises(ValueError):
        a.free(25)
    with pytest.raises(ValueError):
        a.free(5)
    assert a.alloc() == 25


def test_default_routes_match_kvm():
    routes = default_routes()
    assert len(routes) == 24 + 16
    assert IrqchipRoute(0, 2, 0) in routes and IrqchipRoute(0, 0, 0) in routes
    assert IrqchipRoute(9, 1, 1) in routes and IrqchipRoute(23, 2, 23) in routes
    assert not any(r.gsi >= 16 and r.chip != 2 for r in routes)


class FakeVm:
    def __init__(self):
        self.tables = []

    def set_gsi_routing(self, routes):
        self.tables.append(list(routes))


def test_router_installs_complete_tables():
    vm = FakeVm()
    r = GsiRouter()
    r.set_msi(24, 0xFEE00000, 0x41)  # no VM yet: remembered
    assert vm.tables == []
    r.attach(vm)
    assert vm.tables[-1] == default_routes() + [MsiRoute(24, 0xFEE00000, 0x41)]
    assert r.set_msi(24, 0xFEE00000, 0x41) is False and len(vm.tables) == 1
    r.set_many({25: (0xFEE01000, 0x42), 24: (0xFEE00000, 0x41)})
    assert vm.tables[-1][-2:] == [MsiRoute(24, 0xFEE00000, 0x41), MsiRoute(25, 0xFEE01000, 0x42)]
    r.remove(24)
    assert vm.tables[-1] == default_routes() + [MsiRoute(25, 0xFEE01000, 0x42)]


def test_intx_swizzle():
    assert intx_gsi(0, 1) == 16 and intx_gsi(2, 1) == 18 and intx_gsi(7, 2) == 16
    assert intx_gsi(31, 4) == 16 + (31 + 3) % 8


# -- IoSpaceMap.replace ----------------------------------------------------------------

def test_iospace_replace_is_atomic_per_key():
    io = IoSpaceMap()
    a, b, key = object(), object(), object()
    io.add(IoRange(IoSpace.MMIO, 0x1000, 0x100), a, "a")
    assert io.replace(key, [(IoRange(IoSpace.MMIO, 0x2000, 0x100), b, "b1"),
                            (IoRange(PIO, 0x100, 4), b, "b2")]) == []
    assert io.owner_of(IoSpace.MMIO, 0x2000) is b and io.owner_of(PIO, 0x102) is b
    rejected = io.replace(key, [(IoRange(IoSpace.MMIO, 0x1080, 0x100), b, "b3"),
                                (IoRange(IoSpace.MMIO, 0x3000, 0x100), b, "b4")])
    assert [name for _, name, _ in rejected] == ["b3"] and isinstance(rejected[0][2], IoConflict)
    assert io.owner_of(IoSpace.MMIO, 0x2000) is None and io.owner_of(PIO, 0x100) is None
    assert io.owner_of(IoSpace.MMIO, 0x3000) is b and io.owner_of(IoSpace.MMIO, 0x1000) is a
    io.replace(key, [])
    assert [n for _, n in io.ranges_of(key)] == []
    io.remove_owner(a)
    assert io.owner_of(IoSpace.MMIO, 0x1000) is None
