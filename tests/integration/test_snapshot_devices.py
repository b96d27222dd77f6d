"""Device state through a snapshot, at device level (tests/harness): sandboxed
device processes saved concurrently over the bus, their sections through the
snapshot's JSON encoding, restored into fresh processes behind a fresh PCI
bus (a second Harness = a new vmmd), and driven on from where they were.

Covers: two virtio-blk disks (same kind, each its own state by slot),
requests in flight (made available but not yet kicked, and kicked right
before the save), a masked MSI-X vector with its pending bit, a moved BAR,
and the LPC bridge's UART and RTC registers.
"""

from __future__ import annotations

import os
import time

import pytest

from tests.conftest import requires_root
from tests.harness.blk import VirtioBlk, blk_spec
from tests.harness.driver import Harness
from tests.harness.rings import ring_sizes
from vmmd.snapshot import devices as devstate
from vmmd.snapshot import format as fmt

pytestmark = [requires_root]
SECTOR = 512


def through_json(kind: str, instance: str, payload: dict) -> dict:
    """What restore reads back: the payload encoded as a section file, verified, decoded."""
    data = fmt.encode_json_section(kind, instance, payload)
    return fmt.decode_json_section(fmt.make_section(kind, instance, data), data)


def snapshot(h: Harness) -> tuple[dict, dict, bytes]:
    devs = list(h.supervisor.devices.values())
    states = h.run(devstate.save_devices(devs))
    saved = {devstate.instance_of(d): through_json("device", devstate.instance_of(d), s)
             for d, s in zip(devs, states)}
    pci = through_json("vm", "vm", {"pci": h.call(devstate.save_pci, h.pci)})["pci"]
    return saved, pci, h.memory.read(0, h.memory.size)


def restore(h: Harness, specs, saved: dict, pci: dict, ram: bytes) -> None:
    h.memory.write(0, ram)
    devs = [h.add_device(s) for s in specs]
    h.run(devstate.restore_devices(devs, saved))
    h.call(devstate.restore_pci, h.pci, pci)
    for d in devs:
        h.call(h.pci.refresh, d)


def retarget(disk: VirtioBlk, old: Harness, new: Harness) -> None:
    """The guest driver goes on in the restored machine (same guest addresses)."""
    new.allocator, new._mmio_next, new._msi_data_next = old.allocator, old._mmio_next, old._msi_data_next
    disk.h, disk.mem = new, new.memory
    d = disk.drv
    d.h, d.vm, d.mem = new, new.vm, new.memory
    for q in d.queues:
        if q is None:
            continue
        q.mem = new.memory
        ds, av, us = ring_sizes(q.size)
        q._desc, q._avail, q._used = (new.memory.view(q.desc_gpa, ds), new.memory.view(q.avail_gpa, av),
                                      new.memory.view(q.used_gpa, us))


@pytest.fixture
def disks(tmp_path):
    paths = []
    for i in range(2):
        p = tmp_path / f"disk{i}.img"
        with open(p, "wb") as f:
            f.truncate(4 << 20)
        paths.append(str(p))
    return paths


def test_two_disks_inflight_masked_vector_moved_bar(tmp_path, disks):
    specs = [blk_spec(disks[0], slot=2), blk_spec(disks[1], slot=3)]
    a = Harness(mem_size=64 << 20)
    b = None
    try:
        for s in specs:
            a.add_device(s)
        d2, d3 = VirtioBlk(a, slot=2), VirtioBlk(a, slot=3)
        d2.write(0, b"A" * SECTOR * 2)
        d3.write(0, b"B" * SECTOR * 2)
        # Disk 3's BAR moves, as a guest reassigning resources would do.
        bar = min(d3.drv.bars)
        new_base = a.alloc_mmio(d3.drv.bars[bar][1])
        d3.drv.move_bar(bar, new_base)
        assert d3.read(0, 2) == b"B" * SECTOR * 2
        # Disk 2: queue 0's vector masked, a request completes -> pending, no MSI.
        vec = d2.drv.queue_vectors[0]
        before = d2.drv.msi_count(vec)
        d2.drv.mask_vector(vec, True)
        d2.drv.queues[0].enable_interrupts()  # the driver wants an interrupt for this one
        masked_req = d2.submit_write(4, b"M" * SECTOR)
        deadline = time.monotonic() + 10
        while not d2.drv.queues[0].has_used() and time.monotonic() < deadline:
            a.vm.poll(0.01)
        a.vm.poll(0.2)
        assert d2.drv.pba_pending(vec) and d2.drv.msi_count(vec) == before
        # In flight: one request kicked right before the save (the device completes it
        # at quiesce), one made available but never kicked (recorded by ring index).
        kicked = d3.submit_write(8, b"K" * SECTOR)
        unkicked = d3.submit_write(9, b"U" * SECTOR, kick=False)

        saved, pci, ram = snapshot(a)
        assert set(saved) == {"2.0", "3.0"}
        assert saved["2.0"] != saved["3.0"]
        a.close()

        b = Harness(mem_size=64 << 20)
        restore(b, specs, saved, pci, ram)
        retarget(d2, a, b)
        retarget(d3, a, b)
        fb = b.pci.functions[(3, 0)]
        assert any(w.base == new_base for w in fb.windows)  # the moved BAR, routed where it was moved to
        assert d2.drv.pba_pending(vec)                      # still pending, still masked
        assert b.vm.msi_count(0xFEE00000, d2.drv.msi_data(vec)) == 0
        d2.drv.mask_vector(vec, False)                      # unmask: delivered now
        assert b.vm.wait_msi(0xFEE00000, d2.drv.msi_data(vec), 0, 5.0)
        d2.complete(masked_req)
        assert masked_req.status == 0
        d3.complete(kicked)
        d3.drv.kick(0, force=True)
        d3.complete(unkicked)
        assert kicked.status == 0 and unkicked.status == 0
        assert d3.read(8, 2) == b"K" * SECTOR + b"U" * SECTOR
        assert d2.read(0, 2) == b"A" * SECTOR * 2 and d3.read(0, 2) == b"B" * SECTOR * 2
        assert d2.read(4, 1) == b"M" * SECTOR
        # Each disk kept its own backend: slot 2 is disk0, slot 3 is disk1.
        with open(disks[1], "rb") as f:
            f.seek(8 * SECTOR)
            assert f.read(SECTOR) == b"K" * SECTOR
    finally:
        a.close()
        if b is not None:
            b.close()


def _lpc_spec():
    from vmmd.devlink import DeviceSpec
    from vmmd.machine import LPC_GSIS
    from vmmd.pci.fastpath import PciExpect
    return DeviceSpec(id="lpc", kind="lpc", slot=31, function=0,
                      options={"com1": "null", "com2": None, "memory_low": 64 << 20, "memory_high": 0},
                      allowed_gsis=LPC_GSIS,
                      pci=PciExpect(vectors=0, queues=0, intx=False, fixed_ranges=True))


def test_uart_and_rtc_state_survive(tmp_path):
    spec = _lpc_spec()
    a = Harness(mem_size=64 << 20)
    b = None
    try:
        a.add_device(spec)
        vm = a.vm
        vm.guest_pio_write(0x3F8 + 7, 1, 0x5A)          # COM1 scratch register
        vm.guest_pio_write(0x3F8 + 3, 1, 0x80)          # DLAB: divisor
        vm.guest_pio_write(0x3F8 + 0, 1, 0x03)
        vm.guest_pio_write(0x3F8 + 3, 1, 0x1B)          # 8E1, DLAB off
        vm.guest_pio_write(0x3F8 + 1, 1, 0x02)          # IER: THRE interrupt
        vm.guest_pio_write(0x70, 1, 0x40)               # CMOS NVRAM byte 0x40
        vm.guest_pio_write(0x71, 1, 0xC3)
        vm.guest_pio_write(0x70, 1, 0x0B)
        reg_b = vm.guest_pio_read(0x71, 1)
        saved, pci, ram = snapshot(a)
        a.close()
        b = Harness(mem_size=64 << 20)
        restore(b, [spec], saved, pci, ram)
        vm = b.vm
        assert vm.guest_pio_read(0x3F8 + 7, 1) == 0x5A
        assert vm.guest_pio_read(0x3F8 + 3, 1) == 0x1B
        assert vm.guest_pio_read(0x3F8 + 1, 1) == 0x02
        vm.guest_pio_write(0x3F8 + 3, 1, 0x9B)
        assert vm.guest_pio_read(0x3F8 + 0, 1) == 0x03
        vm.guest_pio_write(0x3F8 + 3, 1, 0x1B)
        vm.guest_pio_write(0x70, 1, 0x40)
        assert vm.guest_pio_read(0x71, 1) == 0xC3
        vm.guest_pio_write(0x70, 1, 0x0B)
        assert vm.guest_pio_read(0x71, 1) == reg_b
    finally:
        a.close()
        if b is not None:
            b.close()


def test_two_nics_of_one_kind_keep_their_own_state(tmp_path):
    from devices.virtio_net.backend import open_socket_port
    from devices.virtio_net.switch import Switch
    from tests.harness.net import BROADCAST, VirtioNet, add_net_device, eth, net_spec
    path = str(tmp_path / "switch.sock")
    macs = {3: "52:54:00:00:00:0a", 4: "52:54:00:00:00:0b"}
    specs = {slot: net_spec([f"socket={path}"], slot=slot, mac=mac) for slot, mac in macs.items()}
    with Switch(path):
        a = Harness(mem_size=64 << 20)
        b = None
        try:
            for slot in (3, 4):
                add_net_device(a, specs[slot], {"socket": open_socket_port(path)})
            n3, n4 = VirtioNet(a, slot=3), VirtioNet(a, slot=4)
            n3.send(eth(BROADCAST, n3.mac, 0x88B5, b"before".ljust(46, b"\0")))
            assert n4.recv(5) is not None
            saved, pci, ram = snapshot(a)
            assert set(saved) == {"3.0", "4.0"} and saved["3.0"] != saved["4.0"]
            a.close()
            b = Harness(mem_size=64 << 20)
            b.memory.write(0, ram)
            devs = [add_net_device(b, specs[slot], {"socket": open_socket_port(path)}) for slot in (3, 4)]
            b.run(devstate.restore_devices(devs, saved))
            b.call(devstate.restore_pci, b.pci, pci)
            for d in devs:
                b.call(b.pci.refresh, d)
            for nic in (n3, n4):
                retarget(nic, a, b)
            assert n3.read_mac() == bytes.fromhex("52540000000a")
            assert n4.read_mac() == bytes.fromhex("52540000000b")
            # As a guest announces itself after a restore (the switch learned the old ports):
            n3.send(eth(BROADCAST, n3.mac, 0x88B5, b"announce".ljust(46, b"\0")))
            got = n4.recv(5)
            assert got is not None and got[1][14:22] == b"announce"
            n4.send(eth(n3.mac, n4.mac, 0x88B5, b"after restore".ljust(46, b"\0")))
            got = n3.recv(5)  # the receive buffers posted before the snapshot are still there
            assert got is not None and got[1][14:27] == b"after restore"
        finally:
            a.close()
            if b is not None:
                b.close()


def test_balloon_holes_stay_holes(tmp_path):
    """Ballooned (punched) pages are holes in the snapshot's RAM image and in the
    restored memfd; the restored device still accounts for them."""
    from tests.harness.balloon import VirtioBalloon, balloon_spec
    from vmmd.snapshot import ram as ramio
    spec = balloon_spec(slot=5, options=["stats_interval=0"])
    a = Harness(mem_size=64 << 20)
    b = None
    try:
        a.add_device(spec)
        bl = VirtioBalloon(a, slot=5)
        pages = bl.alloc_pages(2000)              # touched: non-zero memfd pages
        for p in pages:
            a.memory.write(p * ramio.PAGE, b"guest data")
        bl.inflate(pages[:1500])
        saved, pci, _ = snapshot(a)
        mem = a.memory
        out = os.open(tmp_path / "ram.img", os.O_CREAT | os.O_RDWR, 0o600)
        digest, written = ramio.save_ram(mem._view, mem.fd, mem.size, out)
        data_pages = {o // ramio.PAGE + i for o, n in ramio.data_extents(out, mem.size)
                      for i in range(n // ramio.PAGE)}
        assert not data_pages & set(pages[:1500])      # ballooned: holes in the image
        assert set(pages[1500:]) <= data_pages         # the rest is there
        a.close()
        b = Harness(mem_size=64 << 20)
        before = b.memory.allocated_bytes()
        assert ramio.load_ram(out, b.memory.size, b.memory._view) == digest
        os.close(out)
        # only what the image holds was allocated in the new memfd: holes stayed holes
        assert b.memory.allocated_bytes() - before <= written + (1 << 20)
        devs = [b.add_device(spec)]
        b.run(devstate.restore_devices(devs, saved))
        b.call(devstate.restore_pci, b.pci, pci)
        b.call(b.pci.refresh, devs[0])
        info = devs[0].control("device", {"op": "info"})
        assert info["ballooned_pages"] == 1500
        assert b.memory.read(pages[1600] * ramio.PAGE, 10) == b"guest data"
        assert b.memory.read(pages[0] * ramio.PAGE, 10) == bytes(10)
    finally:
        a.close()
        if b is not None:
            b.close()


def test_diff_includes_pages_a_device_wrote(tmp_path, disks):
    """A diff's page set is KVM's dirty log OR every device's dirty log OR holes:
    a virtio-blk read landing in guest RAM (written by the device process, not
    a vCPU, so KVM never sees it) is in the diff."""
    from types import SimpleNamespace
    from vmmd.snapshot import create
    from vmmd.snapshot import ram as ramio

    class NoKvmWrites:  # KVM's log: no vCPU wrote anything
        def get_dirty_log(self, slot, npages):
            return bytes((npages + 63) // 64 * 8)

    with open(disks[0], "r+b") as f:
        f.write(b"D" * 8 * SECTOR)
    h = Harness(mem_size=64 << 20)
    try:
        dev = h.add_device(blk_spec(disks[0], slot=2))
        disk = VirtioBlk(h, slot=2)
        req = disk.submit_read(0, 8)
        disk.complete(req)
        h.memory.write(req.slot.data + 4096, b"\1")  # make sure the page is not a hole either way
        machine = SimpleNamespace(memory=h.memory, vm=NoKvmWrites(), supervisor=h.supervisor)
        dev.harvest_dirty()  # tracking starts here
        req = disk.submit_read(0, 8)
        disk.complete(req)
        assert req.data == b"D" * 8 * SECTOR
        mask = create.dirty_mask(machine)
        page = req.slot.data // ramio.PAGE
        assert mask[page]                                    # the device's write is in the diff
        assert mask[disk.drv.queues[0].used_gpa // ramio.PAGE]  # and its used ring update
        quiet = [p for p in range(h.memory.size // ramio.PAGE) if not mask[p]]
        assert quiet  # pages nobody wrote (data, not holes) are left to the parent
    finally:
        h.close()
