"""Precopy honours device dirty logs (tests/harness, sandboxed device processes):
a virtio-blk read that lands in guest RAM between passes -- written by the
device process, not a vCPU, so KVM's log never shows it -- reaches the
destination's RAM, through the real sender passes and the protocol receiver."""

from __future__ import annotations

import socket
import threading
import time
from types import SimpleNamespace

from tests.conftest import requires_root
from tests.harness.blk import VirtioBlk, blk_spec
from tests.harness.driver import Harness
from vmmd.migration import protocol as p
from vmmd.migration import transport
from vmmd.migration.source import Migration
from vmmd.snapshot import ram as ramio

pytestmark = [requires_root]
SECTOR = 512


class NoKvmWrites:  # KVM's log: no vCPU wrote anything
    def get_dirty_log(self, slot, npages):
        return bytes((npages + 63) // 64 * 8)


def receiver_thread(sock, size, dest: bytearray, done: threading.Event):
    rx = p.Receiver()
    rx.feed(p.control("mig-hello", {"versions": [1]}))
    [cfg] = rx.feed(p.control("mig-config", {"config": {}, "memory": {}}))
    assert isinstance(cfg, p.Config)
    rx.accept(size // ramio.PAGE, 1, [])

    def run():
        while True:
            data = sock.recv(1 << 20)
            if not data:
                break
            for ev in rx.feed(data):
                if isinstance(ev, p.RamRun):
                    off = ev.first_page * ramio.PAGE
                    dest[off:off + len(ev.data)] = ev.data
                elif isinstance(ev, p.RamZero):
                    off = ev.first_page * ramio.PAGE
                    dest[off:off + ev.count * ramio.PAGE] = bytes(ev.count * ramio.PAGE)
        done.set()
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_precopy_sends_pages_a_device_wrote(tmp_path):
    img = tmp_path / "disk.img"
    with open(img, "wb") as f:
        f.write(b"D" * 8 * SECTOR + b"E" * 8 * SECTOR)
        f.truncate(4 << 20)
    h = Harness(mem_size=64 << 20)
    a, b = socket.socketpair()
    try:
        dev = h.add_device(blk_spec(str(img), slot=2))
        disk = VirtioBlk(h, slot=2)
        req = disk.submit_read(0, 8)
        disk.complete(req)
        machine = SimpleNamespace(memory=h.memory, vm=NoKvmWrites(), supervisor=h.supervisor,
                                  control=None, loop=None)
        mig = Migration(machine, transport.parse_uri("unix:/nonexistent"))
        mig.sock = a
        dest = bytearray(h.memory.size)
        done = threading.Event()
        t = receiver_thread(b, h.memory.size, dest, done)

        dev.harvest_dirty()  # tracking starts here
        mig._first_pass()
        mig._iteration_done(time.monotonic())
        # The device writes guest RAM after the pass: a read of other sectors into the same buffer.
        req2 = disk.submit_read(8, 8)
        disk.complete(req2)
        assert req2.data == b"E" * 8 * SECTOR
        mask = mig._harvest()
        assert mask[req2.slot.data // ramio.PAGE]  # from the device's dirty log alone
        mig._dirty_pass(mask)
        mig._iteration_done(time.monotonic())
        a.shutdown(socket.SHUT_WR)
        assert done.wait(30)
        t.join(5)
        src = h.memory.read(0, h.memory.size)
        assert bytes(dest[req2.slot.data:req2.slot.data + 8 * SECTOR]) == b"E" * 8 * SECTOR
        used = disk.drv.queues[0].used_gpa // ramio.PAGE * ramio.PAGE
        assert mask[used // ramio.PAGE]
        # The device's used-ring update arrived too (the test driver's own writes
        # -- avail ring, descriptors -- stand for a vCPU's, which KVM's log would show).
        assert bytes(dest[used:used + ramio.PAGE]) == src[used:used + ramio.PAGE]
    finally:
        a.close()
        b.close()
        h.close()
