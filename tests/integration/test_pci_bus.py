"""vmmd's PCI layer with a real device process (tests/integration/fake_pci_device.py),
the real Supervisor, PciBus and IoSpaceMap, and a real KVM VM (no vCPUs): config
accesses through ports 0xCF8/0xCFC, BAR programming and moves, ioeventfd
re-registration, MSI-X pending through the device's real eventfd, restart."""

import asyncio
import json
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

from bus.types import IoSpace
from tests.integration import fake_pci_device as fake
from vmmd.devlink import DeviceSpec
from vmmd.guest_memory import GuestMemory
from vmmd.iospace import IoSpaceMap
from vmmd.kvm import Kvm
from vmmd.pci.bus import PciBus
from vmmd.pci.config_access import ConfigAddress, ConfigMechanism1
from vmmd.pci.fastpath import PciExpect
from vmmd.supervisor import SpawnError, Supervisor

ROOT = Path(__file__).resolve().parents[2]
PIO, MMIO = IoSpace.PIO, IoSpace.MMIO
SLOT = 3
BAR0 = 0xFEB00000
LAUNCH = ("import sys; sys.path.insert(0, {root!r}); from devices.runtime import main; "
          "main('fakepci', model_module='tests.integration.fake_pci_device')")

pytestmark = pytest.mark.skipif(not os.access("/dev/kvm", os.R_OK | os.W_OK), reason="no /dev/kvm")


class RecordingVm:
    """The real Vm, with its irqfd/ioeventfd/set_gsi_routing calls recorded."""

    def __init__(self, vm):
        self._vm = vm
        self.calls = []

    def __getattr__(self, name):
        return getattr(self._vm, name)

    def irqfd(self, fd, gsi, resample_fd=None, deassign=False):
        self.calls.append(("irqfd", fd, gsi, resample_fd, deassign))
        self._vm.irqfd(fd, gsi, resample_fd=resample_fd, deassign=deassign)

    def ioeventfd(self, fd, addr, length, pio=False, datamatch=None, deassign=False):
        self.calls.append(("ioeventfd", fd, addr, length, deassign))
        self._vm.ioeventfd(fd, addr, length, pio=pio, datamatch=datamatch, deassign=deassign)

    def set_gsi_routing(self, routes):
        routes = list(routes)
        self.calls.append(("routing", routes))
        self._vm.set_gsi_routing(routes)

    def ioevents(self):
        live = {}
        for c in self.calls:
            if c[0] == "ioeventfd":
                if c[4]:
                    del live[c[2]]
                else:
                    live[c[2]] = c[1]
        return live


class FakeSupervisor(Supervisor):
    def command(self, spec, boot):
        return [sys.executable, "-c", LAUNCH.format(root=str(ROOT)), "--bootstrap", json.dumps(boot)]


class Rig:
    def __init__(self, loop, rundir, fast_path=True):
        self.memory = GuestMemory.create(32 << 20)
        self.io = IoSpaceMap()
        self.pci = PciBus(self.io)
        self.cfg = ConfigMechanism1(self.pci)
        for r in self.cfg.RANGES:
            self.io.add(r, self.cfg, "pci-cfg")
        self.kvm = Kvm()
        self.raw_vm = self.kvm.create_vm()
        self.raw_vm.create_irqchip()
        self.vm = RecordingVm(self.raw_vm)
        self.irqs = []
        self.sup = FakeSupervisor(loop=loop, rundir=rundir, memory=self.memory, iospace=self.io,
                                  irq_line=lambda g, l: self.irqs.append((g, l)),
                                  on_request=lambda *a: None, sandbox="off", timeout=10.0,
                                  pci=self.pci, fast_path=fast_path)
        self.loop = loop

    def spec(self, **kw):
        args = dict(id="fakepci0", kind="fakepci", options={"intx_gsi": 19}, slot=SLOT,
                    allowed_gsis=frozenset({19}), needs_memory=True, pci=PciExpect(3, 2, True))
        args.update(kw)
        return DeviceSpec(**args)

    async def call(self, fn, *a):
        return await self.loop.run_in_executor(None, fn, *a)

    async def cfg_read(self, reg, size=4):
        await self.call(self.io.write, PIO, 0xCF8, 4, ConfigAddress(True, 0, SLOT, 0, reg & 0xFC).encode())
        return await self.call(self.io.read, PIO, 0xCFC + (reg & 3), size)

    async def cfg_write(self, reg, value, size=4):
        await self.call(self.io.write, PIO, 0xCF8, 4, ConfigAddress(True, 0, SLOT, 0, reg & 0xFC).encode())
        await self.call(self.io.write, PIO, 0xCFC + (reg & 3), size, value)

    async def close(self):
        await self.sup.stop_all()
        self.pci.detach_vm()
        self.raw_vm.close()
        self.sup.close()
        self.kvm.close()
        self.memory.close()


def run(coro_fn, fast_path=True):
    rundir = tempfile.mkdtemp(prefix="pci", dir="/tmp")

    async def main():
        rig = Rig(asyncio.get_running_loop(), rundir, fast_path)
        try:
            await coro_fn(rig)
        finally:
            await rig.close()
    try:
        asyncio.run(main())
    finally:
        shutil.rmtree(rundir, ignore_errors=True)


def test_config_bars_msix_and_restart():
    async def body(rig):
        dev = rig.sup.add(rig.spec())
        await rig.sup.start(dev)
        rig.pci.attach_vm(rig.vm)
        fds = dev.fds
        assert set(fds) == {"irqfd.0", "irqfd.1", "irqfd.2", "ioeventfd.0", "ioeventfd.1", "intx", "intx_resample"}
        assert ("irqfd", fds["intx"], 19, fds["intx_resample"], False) in rig.vm.calls
        assert [p.ioapic_pin for p in rig.pci.pci_irqs()] == [19]

        # config space through 0xCF8/0xCFC
        assert await rig.cfg_read(0x00) == 0x10FF1AF4
        assert await rig.cfg_read(0x02, 2) == 0x10FF
        assert await rig.cfg_read(0x3C, 1) == 19  # the device reports the GSI vmmd gave it
        await rig.cfg_write(0x10, 0xFFFFFFFF)      # sizing probe
        assert await rig.cfg_read(0x10) == 0xFFFFC004

        # program BAR0 (64-bit) and BAR2 (io), then enable decoding
        await rig.cfg_write(0x10, BAR0)
        await rig.cfg_write(0x14, 0)
        await rig.cfg_write(0x18, 0xC000)
        assert rig.io.owner_of(MMIO, BAR0) is None
        await rig.cfg_write(0x04, 0x0003, 2)
        await rig.call(rig.io.write, MMIO, BAR0, 4, 0xCAFE)
        assert await rig.call(rig.io.read, MMIO, BAR0, 4) == 0xCAFE
        assert await rig.call(rig.io.read, MMIO, BAR0 + 8, 4) == BAR0 + 8
        await rig.call(rig.io.write, PIO, 0xC000, 1, 0x77)
        assert await rig.call(rig.io.read, PIO, 0xC000, 1) == 0x77
        assert rig.vm.ioevents() == {BAR0 + 0x3000: fds["ioeventfd.0"], BAR0 + 0x3004: fds["ioeventfd.1"]}

        # MSI-X: table programmed through the BAR (vmmd), vector 0 live, vector 1 masked
        for v, data in ((0, 0x41), (1, 0x42)):
            await rig.call(rig.io.write, MMIO, BAR0 + 0x1000 + 16 * v, 4, 0xFEE00000)
            await rig.call(rig.io.write, MMIO, BAR0 + 0x1000 + 16 * v + 8, 4, data)
        await rig.call(rig.io.write, MMIO, BAR0 + 0x1000 + 12, 4, 0)
        assert await rig.call(rig.io.read, MMIO, BAR0 + 0x1000 + 8, 4) == 0x41
        await rig.cfg_write(0x42, 0x8000, 2)
        assert ("irqfd", fds["irqfd.0"], 24, None, False) in rig.vm.calls
        assert not any(c[0] == "irqfd" and c[1] == fds["irqfd.1"] for c in rig.vm.calls)
        routing = [c[1] for c in rig.vm.calls if c[0] == "routing"][-1]
        assert any(getattr(r, "gsi", None) == 24 and getattr(r, "data", None) == 0x41 for r in routing)
        # the device fires masked vector 1 through its eventfd: the PBA shows it pending
        assert await rig.call(rig.io.read, MMIO, BAR0 + 0x2000, 8) == 0
        await rig.call(rig.io.write, MMIO, BAR0 + 0x10, 4, 1)
        await rig.call(rig.io.read, MMIO, BAR0, 4)  # ordered after the write
        assert await rig.call(rig.io.read, MMIO, BAR0 + 0x2000, 8) == 0b10

        # BAR move: old window unmapped, new mapped, ioeventfds re-registered
        n = len(rig.vm.calls)
        new = 0x1_0000_0000 + BAR0
        await rig.cfg_write(0x14, 1)
        assert await rig.call(rig.io.read, MMIO, BAR0, 4) == 0xFFFFFFFF
        assert rig.io.owner_of(MMIO, BAR0) is None
        assert await rig.call(rig.io.read, MMIO, new, 4) == 0xCAFE
        assert await rig.call(rig.io.read, MMIO, new + 8, 4) == (new + 8) & 0xFFFFFFFF
        moved = [c for c in rig.vm.calls[n:] if c[0] == "ioeventfd"]
        assert [(c[2], c[4]) for c in moved] == [(BAR0 + 0x3000, True), (BAR0 + 0x3004, True),
                                                 (new + 0x3000, False), (new + 0x3004, False)]
        assert await rig.call(rig.io.read, MMIO, new + 0x2000, 8) == 0b10  # still pending

        # restart: same fds, restored BARs, routing unchanged
        n = len(rig.vm.calls)
        pid = dev.current.pid
        await rig.sup.restart(dev)
        assert dev.current.pid != pid and dev.fds == fds
        assert await rig.call(rig.io.read, MMIO, new, 4) == 0xCAFE
        assert not [c for c in rig.vm.calls[n:] if c[0] in ("ioeventfd", "irqfd")]
        assert rig.vm.ioevents() == {new + 0x3000: fds["ioeventfd.0"], new + 0x3004: fds["ioeventfd.1"]}
        # the new process writes the same eventfds: vector 2 (masked) becomes pending
        await rig.call(rig.io.write, MMIO, new + 0x10, 4, 2)
        await rig.call(rig.io.read, MMIO, new, 4)
        assert await rig.call(rig.io.read, MMIO, new + 0x2000, 8) == 0b110

        # decoding off: nothing mapped, no ioeventfds
        await rig.cfg_write(0x04, 0, 2)
        assert rig.vm.ioevents() == {} and rig.io.owner_of(MMIO, new) is None
        assert await rig.call(rig.io.read, PIO, 0xC000, 1) == 0xFF
    run(body)


def test_bus_only_mode_vectors_are_bus_events():
    async def body(rig):
        dev = rig.sup.add(rig.spec())
        assert dev.fds == {}
        await rig.sup.start(dev)
        rig.pci.attach_vm(rig.vm)
        await rig.cfg_write(0x10, BAR0)
        await rig.cfg_write(0x14, 0)
        await rig.cfg_write(0x04, 0x0002, 2)
        assert rig.vm.ioevents() == {}
        await rig.call(rig.io.write, MMIO, BAR0 + 0x1000, 4, 0xFEE00000)  # vector 0, masked
        await rig.cfg_write(0x42, 0x8000, 2)
        await rig.call(rig.io.write, MMIO, BAR0 + 0x10, 4, 0)  # device: VECTOR 0 event
        for _ in range(200):
            if await rig.call(rig.io.read, MMIO, BAR0 + 0x2000, 8) == 1:
                break
            await asyncio.sleep(0.01)
        assert await rig.call(rig.io.read, MMIO, BAR0 + 0x2000, 8) == 1
        await rig.call(rig.io.write, MMIO, BAR0 + 0x1000 + 12, 4, 0)  # unmask: injected
        assert await rig.call(rig.io.read, MMIO, BAR0 + 0x2000, 8) == 0
        assert rig.pci.function_of(dev).msix.injected == 1
        assert not any(c[0] == "irqfd" and c[2] >= 24 for c in rig.vm.calls)
    run(body, fast_path=False)


@pytest.mark.parametrize("spec_kw, decl, why", [
    ({"pci": PciExpect(4, 2, True)}, None, "vmmd expects 4 and 2"),
    ({}, {**fake.PCI_INFO, "bars": [[0, 0x3000, "mem64"]]}, "not a power of two"),
    ({}, {**fake.PCI_INFO, "msix": {"cap": 0x40, "vectors": 3, "table": [0, 0x3000], "pba": [0, 0x2000]}},
     "overlaps the notify region"),
    ({"options": {"intx_gsi": 20}}, None, "does not route to GSI 20"),
])
def test_hostile_declaration_is_rejected_at_handshake(caplog, spec_kw, decl, why):
    async def body(rig):
        spec = rig.spec(**spec_kw)
        if decl is not None:
            spec.options["pci_info"] = decl
        dev = rig.sup.add(spec)
        with caplog.at_level(logging.ERROR, logger="vmmd.supervisor"):
            with pytest.raises(SpawnError, match=why):
                await rig.sup.start(dev)
        assert any("rejected at its handshake" in r.getMessage() and why in r.getMessage()
                   for r in caplog.records)
        assert rig.pci.functions == {} and dev.current is None
    run(body)
