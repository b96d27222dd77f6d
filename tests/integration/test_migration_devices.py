"""Precopy honours device dirty logs (tests/harness, sandboxed device processes):
a virtio-blk read, and virtio-net frames received, that land in guest RAM
between and during passes -- written by the device process, not a vCPU, so
KVM's log never shows them -- reach the destination's RAM, through the real
sender passes and the protocol receiver."""

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


def start_precopy(h, dev, a, b):
    """A source Migration on socket `a` over the harness's memory (no KVM writes),
    a receiver thread on `b`, device dirty tracking started and the first pass sent."""
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
    return mig, dest, done, t


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
        mig, dest, done, t = start_precopy(h, dev, a, b)
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


def _rx_used_entries(mem: bytes, used_gpa: int, qsize: int) -> list[tuple[int, int]]:
    """(descriptor head, length) of every used-ring entry in a RAM image."""
    idx = int.from_bytes(mem[used_gpa + 2:used_gpa + 4], "little")
    out = []
    for i in range(idx):
        e = used_gpa + 4 + 8 * (i % qsize)
        out.append((int.from_bytes(mem[e:e + 4], "little"), int.from_bytes(mem[e + 4:e + 8], "little")))
    return out


def test_precopy_sends_frames_net_rx_wrote(tmp_path):
    """Frames arrive on a virtio-net device (socket backend on the project's
    switch) into the guest's posted receive buffers during precopy: some
    between passes, some while a pass runs. The device process writes the
    buffers and the used ring (never a vCPU: only its dirty log knows); after
    the last pass the destination's RAM equals the source's, and its used
    ring lists every frame in order, each buffer holding that frame."""
    from devices.virtio_net.backend import open_socket_port
    from devices.virtio_net.switch import Switch
    from tests.harness.net import HDR_SIZE, RXQ, VirtioNet, add_net_device, eth, net_spec

    path = str(tmp_path / "switch.sock")
    a, b = socket.socketpair()
    with Switch(path), Harness(sandbox="on", mem_size=64 << 20) as h:
        try:
            mac = "52:54:00:00:00:0a"
            dev = add_net_device(h, net_spec([f"socket={path}"], slot=3, mac=mac),
                                 {"socket": open_socket_port(path)})
            nic = VirtioNet(h, slot=3)          # posts a page-sized rx buffer per descriptor
            qsize = nic.drv.queues[RXQ].size
            peer = socket.socket(fileno=open_socket_port(path))
            peer.setblocking(True)
            peer_mac = bytes.fromhex("52540000000b")
            frames = [eth(nic.mac, peer_mac, 0x88B5, b"frame %04d " % i + bytes([i % 251]) * (900 + i))
                      for i in range(min(120, qsize - 8))]
            sent = 0

            def send(n):
                nonlocal sent
                for f in frames[sent:sent + n]:
                    peer.send(f)
                    time.sleep(0.001)
                sent += n

            def delivered(n, timeout=30):
                deadline = time.monotonic() + timeout
                while dev.control("stats")["net"]["rx_packets"] < n:
                    assert time.monotonic() < deadline, dev.control("stats")["net"]
                    time.sleep(0.01)

            mig, dest, done, t = start_precopy(h, dev, a, b)
            device_dirty = []
            for _ in range(3):  # frames land between passes
                send(20)
                delivered(sent)
                mask = mig._harvest()
                device_dirty.append(int(mask.sum()))
                mig._dirty_pass(mask)
                mig._iteration_done(time.monotonic())
            sender = threading.Thread(target=send, args=(len(frames) - sent,))
            sender.start()      # and while passes run
            while sender.is_alive():
                mig._dirty_pass(mig._harvest())
                mig._iteration_done(time.monotonic())
            sender.join()
            delivered(len(frames))
            mig._dirty_pass(mig._harvest())  # the last pass (the switchover's)
            a.shutdown(socket.SHUT_WR)
            assert done.wait(30)
            t.join(5)
            src = h.memory.read(0, h.memory.size)
            # Nothing the device wrote was lost (the driver wrote nothing after pass 1).
            lost = [pg for pg in range(len(src) // ramio.PAGE)
                    if dest[pg * ramio.PAGE:(pg + 1) * ramio.PAGE] != src[pg * ramio.PAGE:(pg + 1) * ramio.PAGE]]
            assert not lost, f"pages differing on the destination: {lost[:10]}"
            assert all(device_dirty), device_dirty   # each pass found the device's writes
            used = nic.drv.queues[RXQ].used_gpa
            desc = nic.drv.queues[RXQ].desc_gpa
            entries = _rx_used_entries(dest, used, qsize)
            assert len(entries) == len(frames)
            for (head, n), frame in zip(entries, frames):
                d = desc + 16 * head
                buf = int.from_bytes(dest[d:d + 8], "little")
                assert n == HDR_SIZE + len(frame)
                assert bytes(dest[buf + HDR_SIZE:buf + n]) == frame
            peer.close()
        finally:
            a.close()
            b.close()
