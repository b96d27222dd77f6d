"""virtio-blk through the virtio driver harness (tests/harness): a Python guest
driving a sandboxed device process through vmmd's real PCI bus, supervisor
and fast path (FakeVm stands in for KVM's ioeventfd/irqfd/MSI routing).

The ring-level tests at the top need no device process: they check the
harness's driver-side rings against the device's devices.virtio.SplitQueue.
"""

from __future__ import annotations

import importlib.util
import os
import random
import signal
import struct
import time

import pytest

from tests.conftest import requires_root
from tests.harness.rings import (
    VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, DriverQueue, GuestAllocator)

SECTOR = 512


def _missing() -> str | None:
    for mod in ("vmmd.pci.bus", "devices.virtio.device", "devices.virtio_blk.model",
                "devices.virtio_blk.policy", "devices.virtio_blk.__main__"):
        try:
            if importlib.util.find_spec(mod) is None:
                return f"{mod} is not there yet"
        except ImportError as exc:
            return f"{mod}: {exc}"
    return None


requires_device = pytest.mark.skipif(_missing() is not None, reason=_missing() or "")


# --- ring level: DriverQueue against the device's SplitQueue -----------------------------

@pytest.fixture
def guest_mem():
    from vmmd.guest_memory import GuestMemory
    mem = GuestMemory.create(4 << 20)
    yield mem
    mem.close()


def _device_queue(mem, dq, *, event_idx=False, indirect=False):
    from devices.virtio.memory import DeviceMemory
    from devices.virtio.queue import SplitQueue
    return SplitQueue(DeviceMemory(mem), dq.size, dq.desc_gpa, dq.avail_gpa, dq.used_gpa,
                      event_idx=event_idx, indirect=indirect)


@pytest.mark.parametrize("indirect", [False, True])
def test_rings_round_trip(guest_mem, indirect):
    alloc = GuestAllocator(0x10000, 4 << 20)
    dq = DriverQueue.allocate(guest_mem, alloc, 8, indirect=indirect)
    sq = _device_queue(guest_mem, dq, indirect=indirect)
    for rnd in range(12):  # wraps the 8-entry rings several times
        heads = []
        for i in range(6 if indirect else 2):
            r = alloc.alloc(64)
            w = alloc.alloc(128)
            heads.append((dq.submit([(r, 64)], [(w, 100), (w + 100, 28)], indirect=indirect), r, w))
        for head, r, w in heads:
            chain = sq.pop()
            assert chain.head == head
            assert chain.readable == [(r, 64)] and chain.writable == [(w, 100), (w + 100, 28)]
            sq.push_used(chain.head, 128 - rnd)
        assert sq.pop() is None
        used = dq.get_used()
        assert used == [(h, 128 - rnd) for h, _, _ in heads]
        assert dq.num_free == 8 and dq.in_flight == 0


def test_rings_event_idx_suppression(guest_mem):
    alloc = GuestAllocator(0x10000, 4 << 20)
    dq = DriverQueue.allocate(guest_mem, alloc, 4, event_idx=True)
    sq = _device_queue(guest_mem, dq, event_idx=True)
    buf = alloc.alloc(16)
    dq.submit([(buf, 16)], [])
    sq.set_avail_event()              # device wants a kick for buffer 0
    assert dq.need_kick()
    sq.pop()
    sq.set_avail_event(100)           # device: no kicks until idx 100
    dq.submit([(buf, 16)], [])
    assert not dq.need_kick()
    # interrupts: the driver asks for one at the next used entry...
    dq.enable_interrupts()
    chain = sq.pop()
    sq.push_used(chain.head, 0)
    assert sq.needs_interrupt()
    assert len(dq.get_used()) == 1
    # ...and, leaving used_event behind, none for the one after
    dq.submit([(buf, 16)], [])
    sq.push_used(sq.pop().head, 0)
    assert not sq.needs_interrupt()
    dq.enable_interrupts()
    assert dq.has_used()


def test_rings_malformed_chains_seen_by_device(guest_mem):
    from devices.virtio.queue import ChainError
    alloc = GuestAllocator(0x10000, 4 << 20)
    dq = DriverQueue.allocate(guest_mem, alloc, 8)
    sq = _device_queue(guest_mem, dq)
    a, b = dq.take_descriptors(2)
    dq.write_desc(a, 0x20000, 16, VIRTQ_DESC_F_NEXT, b)
    dq.write_desc(b, 0x20000, 16, VIRTQ_DESC_F_NEXT, a)      # loop
    dq.publish_head(a)
    with pytest.raises(ChainError, match="loop"):
        sq.pop()
    (c,) = dq.take_descriptors(1)
    dq.write_desc(c, (4 << 20) + 4096, 16, VIRTQ_DESC_F_WRITE, 0)   # outside RAM
    dq.publish_head(c)
    with pytest.raises(ChainError, match="outside"):
        sq.pop()


# --- device level --------------------------------------------------------------------------

DISK_SIZE = 8 << 20


def _disk(tmp_path, name="disk.img", size=DISK_SIZE, fill: bytes | None = None) -> str:
    path = str(tmp_path / name)
    with open(path, "wb") as f:
        if fill is None:
            f.truncate(size)
        else:
            f.write(fill)
    return path


def _host_read(path, sector, n) -> bytes:
    with open(path, "rb") as f:
        f.seek(sector * SECTOR)
        return f.read(n * SECTOR)


def _alive(dev) -> bool:
    inc = dev.current
    if inc is None:
        return False
    try:
        os.kill(inc.pid, 0)
    except ProcessLookupError:
        return False
    return dev.state == "running"


@pytest.fixture
def harness():
    from tests.harness.driver import Harness
    h = Harness(sandbox="on", mem_size=128 << 20, timeout=5.0)
    yield h
    h.close()


@pytest.fixture
def bus_harness():
    from tests.harness.driver import Harness
    h = Harness(sandbox="on", mem_size=128 << 20, timeout=5.0, bus_only=True)
    yield h
    h.close()


def _attach(h, path, slot=2, options=None, **kw):
    from tests.harness.blk import VirtioBlk, blk_spec
    dev = h.add_device(blk_spec(path, slot, options or [], bus_only=h.bus_only))
    return dev, VirtioBlk(h, slot, **kw)


@requires_root
@requires_device
class TestVirtioBlk:
    def test_every_request_type(self, harness, tmp_path):
        from tests.harness.blk import S_OK
        pattern = bytes(random.Random(1).randbytes(DISK_SIZE))
        path = _disk(tmp_path, fill=pattern)
        dev, d = _attach(harness, path, options=["serial=harness-disk-1"])
        assert d.config.capacity == DISK_SIZE // SECTOR
        assert d.get_id() == b"harness-disk-1"
        assert d.read(10, 8) == pattern[10 * SECTOR:18 * SECTOR]
        data = os.urandom(16 * SECTOR)
        d.write(100, data)
        d.flush()
        assert _host_read(path, 100, 16) == data
        d.write_zeroes([(200, 8)], unmap=False)
        d.write_zeroes([(300, 16)], unmap=True)
        assert _host_read(path, 200, 8) == bytes(8 * SECTOR)
        assert _host_read(path, 300, 16) == bytes(16 * SECTOR)
        assert d.read(300, 16) == bytes(16 * SECTOR)
        d.discard([(1024, 2048), (4096, 8)])
        r = d.submit_read(0, 1)
        assert d.status_of(r) == S_OK
        assert _alive(dev)

    def test_error_statuses(self, harness, tmp_path):
        from tests.harness.blk import S_IOERR, S_UNSUPP, BlkError
        path = _disk(tmp_path)
        dev, d = _attach(harness, path)
        cap = d.config.capacity
        assert d.status_of(d.submit_read(cap - 4, 8)) == S_IOERR        # beyond capacity
        assert d.status_of(d.submit_read(cap, 1)) == S_IOERR
        assert d.status_of(d.submit_write(cap - 1, bytes(1024))) == S_IOERR
        assert d.status_of(d.submit_type(99)) == S_UNSUPP                 # unknown type
        assert d.status_of(d.submit_type(10, nbytes=48)) == S_UNSUPP     # GET_LIFETIME not offered
        d.read(cap - 1, 1)  # the last sector is fine
        ro_path = _disk(tmp_path, "ro.img", fill=b"\x5a" * DISK_SIZE)
        ro_dev, ro = _attach(harness, ro_path, slot=3, options=["ro"])
        assert ro.read_only
        with pytest.raises(BlkError) as exc:
            ro.write(0, b"\x00" * SECTOR)
        assert exc.value.status == S_IOERR
        assert ro.read(0, 1) == b"\x5a" * SECTOR
        assert _host_read(ro_path, 0, 1) == b"\x5a" * SECTOR
        assert _alive(dev) and _alive(ro_dev)

    def _expect_failed(self, d, token, q=0):
        """A malformed chain: completed with nothing written, or the device needs a reset."""
        from tests.harness.driver import STATUS_NEEDS_RESET
        try:
            written = d.drv.wait(q, token, 3.0)[token]
        except Exception:
            assert d.drv.status & STATUS_NEEDS_RESET
            return "needs_reset"
        assert written == 0
        return "failed"

    def test_malformed_descriptors(self, harness, tmp_path):
        from tests.harness.blk import S_IOERR, OUTHDR, T_IN
        from tests.harness.driver import STATUS_NEEDS_RESET
        path = _disk(tmp_path)
        dev, d = _attach(harness, path)
        pid = dev.current.pid
        mem, alloc = harness.memory, harness.allocator
        dq = d.drv.queues[0]
        hdr, buf, st = alloc.alloc(16), alloc.alloc(8192, 4096), alloc.alloc(16)
        mem.write(hdr, OUTHDR.pack(T_IN, 0, 0))
        outside = harness.memory.size + 0x10000
        R, W, N = 0, VIRTQ_DESC_F_WRITE, VIRTQ_DESC_F_NEXT

        def chain(*descs):
            idxs = dq.take_descriptors(len(descs))
            for i, (addr, n, flags) in enumerate(descs):
                nxt = idxs[i + 1] if i + 1 < len(idxs) else 0
                dq.write_desc(idxs[i], addr, n, flags | (N if i + 1 < len(idxs) else 0), nxt)
            return d.drv.submit_raw(0, idxs[0])

        outcomes = {}
        outcomes["out of range"] = self._expect_failed(d, chain((hdr, 16, R), (outside, 4096, W), (st, 1, W)))
        outcomes["straddles RAM end"] = self._expect_failed(
            d, chain((hdr, 16, R), (harness.memory.size - 512, 4096, W), (st, 1, W)))
        outcomes["zero length"] = self._expect_failed(d, chain((hdr, 16, R), (buf, 0, W), (st, 1, W)))
        outcomes["wrong direction"] = self._expect_failed(d, chain((hdr, 16, R), (st, 1, W), (buf, 512, R)))
        # a loop: a -> b -> a
        a, b = dq.take_descriptors(2)
        dq.write_desc(a, hdr, 16, R | N, b)
        dq.write_desc(b, buf, 512, R | N, a)
        outcomes["loop"] = self._expect_failed(d, d.drv.submit_raw(0, a))
        # next out of the table
        (c,) = dq.take_descriptors(1)
        dq.write_desc(c, hdr, 16, R | N, 0x7FFF)
        outcomes["next out of range"] = self._expect_failed(d, d.drv.submit_raw(0, c))
        # too many segments: seg_max + 1 data segments (indirect, so the ring has room)
        segs = d.config.seg_max + 1
        r = d.submit_read(0, segs, segments=segs, indirect=True)
        d.drv.poll_used(0)
        try:
            d.complete(r, 3.0)
            assert r.status == S_IOERR or r.written == 0
            outcomes["too many segments"] = "failed"
        except Exception:
            assert d.drv.status & STATUS_NEEDS_RESET
            outcomes["too many segments"] = "needs_reset"
        # the device is alive and serves good requests (after a reset if it asked for one)
        assert dev.current.pid == pid and _alive(dev)
        if d.drv.status & STATUS_NEEDS_RESET:
            d.init()
        data = os.urandom(4096)
        d.write(8, data)
        assert d.read(8, 8) == data
        # a broken ring (head >= queue size): NEEDS_RESET, still alive
        config_irqs = d.drv.config_interrupts()
        d.drv.queues[0].publish_head(d.drv.queues[0].size + 3)
        d.drv.kick(0, force=True)
        deadline = time.monotonic() + 5
        while not d.drv.status & STATUS_NEEDS_RESET and time.monotonic() < deadline:
            time.sleep(0.01)
        assert d.drv.status & STATUS_NEEDS_RESET
        # the config vector told the driver
        assert harness.vm.wait_msi(0xFEE00000, d.drv.msi_data(0), config_irqs, 5.0)
        assert dev.current.pid == pid and _alive(dev)
        d.init()
        assert d.read(8, 8) == data
        assert outcomes  # every case completed or asked for a reset, none killed the device

    def test_reset_during_io(self, harness, tmp_path):
        path = _disk(tmp_path)
        dev, d = _attach(harness, path)
        pid = dev.current.pid
        for i in range(64):
            d.submit_write(i * 8, os.urandom(4096), kick=(i % 8 == 7))
        d.drv.reset()
        assert d.drv.status == 0
        d.init()
        data = os.urandom(64 * 1024)
        d.write(0, data)
        assert d.read(0, 128) == data
        assert dev.current.pid == pid and _alive(dev)

    def test_two_disks(self, harness, tmp_path):
        p1, p2 = _disk(tmp_path, "a.img"), _disk(tmp_path, "b.img")
        dev1, d1 = _attach(harness, p1, slot=2, options=["serial=one"])
        dev2, d2 = _attach(harness, p2, slot=3, options=["serial=two"])
        assert dev1.current.pid != dev2.current.pid
        assert (d1.get_id(), d2.get_id()) == (b"one", b"two")
        rng = random.Random(2)
        expect1, expect2 = {}, {}
        reqs = []
        for i in range(32):
            a, b = rng.randbytes(4096), rng.randbytes(4096)
            expect1[i * 8], expect2[i * 8] = a, b
            reqs.append((d1, d1.submit_write(i * 8, a)))
            reqs.append((d2, d2.submit_write(i * 8, b)))
        for disk, r in reqs:
            disk.complete(r)
            assert r.status == 0
        for s in expect1:
            assert _host_read(p1, s, 8) == expect1[s] and _host_read(p2, s, 8) == expect2[s]
            assert d1.read(s, 8) == expect1[s] and d2.read(s, 8) == expect2[s]

    def test_multi_queue(self, harness, tmp_path):
        path = _disk(tmp_path)
        dev, d = _attach(harness, path, options=["num_queues=4"], queues=4)
        assert d.config.num_queues == 4 and d.num_queues == 4
        before = [d.drv.msi_count(v) for v in d.drv.queue_vectors]
        rng = random.Random(3)
        reqs, expect = [], {}
        for i in range(64):
            q = i % 4
            data = rng.randbytes(4096)
            expect[i * 8] = data
            reqs.append(d.submit_write(i * 8, data, q=q))
        d.complete(reqs)
        assert all(r.status == 0 for r in reqs)
        reads = [d.submit_read(s, 8, q=(s // 8 + 1) % 4) for s in expect]
        d.complete(reads)
        assert {s: r.data for s, r in zip(expect, reads)} == expect
        after = [d.drv.msi_count(v) for v in d.drv.queue_vectors]
        assert all(a > b for a, b in zip(after, before)), (before, after)  # every queue's own vector

    def test_data_integrity(self, harness, tmp_path):
        path = _disk(tmp_path)
        dev, d = _attach(harness, path)
        rng = random.Random(4)
        shadow = bytearray(DISK_SIZE)
        pending = []
        for i in range(300):
            n = rng.choice([1, 8, 16, 64, 256])
            sector = rng.randrange(0, DISK_SIZE // SECTOR - n)
            data = rng.randbytes(n * SECTOR)
            # no two in-flight writes overlap (the device may run them in any order)
            if any(not (sector + n <= s or s + m <= sector) for s, m, _ in pending):
                d.complete([r for _, _, r in pending])
                pending.clear()
            r = d.submit_write(sector, data, segments=rng.choice([1, 2, 5]))
            shadow[sector * SECTOR:(sector + n) * SECTOR] = data
            pending.append((sector, n, r))
            if len(pending) >= 32:
                d.complete([r for _, _, r in pending])
                pending.clear()
        d.complete([r for _, _, r in pending])
        d.flush()
        with open(path, "rb") as f:
            assert f.read() == bytes(shadow)
        for off in range(0, DISK_SIZE // SECTOR, 256):
            assert d.read(off, 256, segments=3) == bytes(shadow[off * SECTOR:(off + 256) * SECTOR])

    def test_bar_move_with_live_queue(self, harness, tmp_path):
        from bus.types import IoSpace
        path = _disk(tmp_path)
        dev, d = _attach(harness, path)
        data = os.urandom(4096)
        d.write(0, data)
        old_base = d.drv.bars[0][0]
        old_notify = d.drv.notify_addr(0)
        fd = dev.fds["ioeventfd.0"]
        assert harness.vm.ioeventfd_addresses(fd) == [old_notify]
        inflight = d.submit_write(64, data, kick=False)     # published, not yet kicked
        new_base = harness.alloc_mmio(d.drv.bars[0][1])
        d.drv.move_bar(0, new_base)
        assert d.drv.notify_addr(0) != old_notify
        assert harness.vm.ioeventfd_addresses(fd) == [d.drv.notify_addr(0)]
        assert harness.iospace.owner_of(IoSpace.MMIO, old_base, 4) is None
        # the old address reaches nothing: no kick, all-ones reads
        kicks = harness.vm.kicks
        harness.vm.guest_mmio_write(old_notify, 2, 0)
        assert harness.vm.kicks == kicks
        assert harness.vm.guest_mmio_read(old_base + 0x14, 1) == 0xFF
        d.drv.kick(0, force=True)
        d.complete(inflight)
        assert inflight.status == 0
        assert d.read(64, 8) == data
        # decoding off and on again without moving: still works; the same without toggling
        d.drv.move_bar(0, harness.alloc_mmio(d.drv.bars[0][1]), toggle_decode=False)
        assert harness.vm.ioeventfd_addresses(fd) == [d.drv.notify_addr(0)]
        assert d.read(0, 8) == data

    def _msix_mask(self, h, d):
        v = d.drv.queue_vectors[0]
        d.read(0, 1)
        count = d.drv.msi_count(v)
        d.drv.mask_vector(v, True)
        d.drv.queues[0].enable_interrupts()  # the driver wants an interrupt for this one
        r = d.submit_read(0, 8)
        deadline = time.monotonic() + 5
        while not d.drv.queues[0].has_used() and time.monotonic() < deadline:
            h.vm.poll(0.01)
        assert d.drv.queues[0].has_used(), "the device did not complete the request"
        h.vm.poll(0.2)
        assert d.drv.msi_count(v) == count, "a masked vector was delivered"
        assert d.drv.pba_pending(v)
        d.drv.mask_vector(v, False)
        assert h.vm.wait_msi(0xFEE00000, d.drv.msi_data(v), count, 5.0), "unmask did not deliver"
        assert not d.drv.pba_pending(v)
        d.complete(r)
        assert r.status == 0
        # the function mask works the same way
        count = d.drv.msi_count(v)
        d.drv.set_function_mask(True)
        d.drv.queues[0].enable_interrupts()
        r = d.submit_read(0, 8)
        while not d.drv.queues[0].has_used() and time.monotonic() < deadline + 5:
            h.vm.poll(0.01)
        h.vm.poll(0.2)
        assert d.drv.msi_count(v) == count
        d.drv.set_function_mask(False)
        assert h.vm.wait_msi(0xFEE00000, d.drv.msi_data(v), count, 5.0)
        d.complete(r)

    def test_msix_mask_unmask(self, harness, tmp_path):
        dev, d = _attach(harness, _disk(tmp_path))
        self._msix_mask(harness, d)

    def test_dirty_log(self, harness, tmp_path):
        pattern = bytes(random.Random(5).randbytes(DISK_SIZE))
        path = _disk(tmp_path, fill=pattern)
        dev, d = _attach(harness, path)
        d.read(0, 1)
        dev.harvest_dirty()  # start clean
        r = d.submit_read(64, 32)      # 16 KiB into a fresh buffer
        d.complete(r)
        assert r.data == pattern[64 * SECTOR:96 * SECTOR]
        w = d.submit_write(8, os.urandom(16384))
        d.complete(w)
        pages = set(int(p) for p in dev.harvest_dirty())
        data_pages = {(r.slot.data + off) >> 12 for off in range(0, 16384, 4096)}
        assert data_pages <= pages
        assert d.drv.queues[0].used_gpa >> 12 in pages                # used ring entries
        assert (r.slot.base + 16) >> 12 in pages                       # status byte
        write_pages = {(w.slot.data + off) >> 12 for off in range(0, 16384, 4096)}
        assert not (write_pages - data_pages) & pages                  # the device only read those
        assert list(dev.harvest_dirty()) == []                         # harvest clears

    def test_quiesce_save_kill_restore(self, harness, tmp_path):
        path = _disk(tmp_path)
        dev, d = _attach(harness, path)
        rng = random.Random(6)
        writes = [(i * 16, rng.randbytes(16 * SECTOR)) for i in range(200)]
        reqs = []
        for sector, data in writes[:100]:
            reqs.append(d.submit_write(sector, data, kick=len(reqs) % 4 == 3))
            if len(reqs) == 48:
                break
        d.kick()
        dev.control("quiesce")
        state = dev.control("save")
        # the guest keeps going: more requests and kicks while the device is quiesced/dead
        for sector, data in writes[48:64]:
            reqs.append(d.submit_write(sector, data))
        gen = dev.generation
        dev.last_checkpoint = state
        os.kill(dev.current.pid, signal.SIGKILL)
        harness.wait_running(dev, gen + 1)
        d.complete(reqs, timeout=10)  # the new process finishes what the old one left
        pending = []
        for sector, data in writes[64:]:
            pending.append(d.submit_write(sector, data))
            reqs.append(pending[-1])
            if len(pending) == 32:
                d.complete(pending, timeout=10)
                pending = []
        d.complete(pending, timeout=10)
        assert all(r.status == 0 for r in reqs)
        d.flush()
        for sector, data in writes:
            assert _host_read(path, sector, 16) == data
            assert d.read(sector, 16) == data
        assert dev.generation == gen + 1

    def test_intx_fallback_without_msix(self, harness, tmp_path):
        # A driver that never enables MSI-X gets INTx: a level-triggered irqfd
        # with resample on the slot's IOAPIC pin; ISR says why; EOI re-arms it.
        from tests.harness.blk import VirtioBlk, blk_spec
        from vmmd.pci.function import intx_gsi
        pattern = bytes(random.Random(9).randbytes(DISK_SIZE))
        path = _disk(tmp_path, fill=pattern)
        harness.add_device(blk_spec(path, 2, [], bus_only=False))
        d = VirtioBlk(harness, 2, probe=False)
        d.drv.probe()
        d.init(msix=False, event_idx=False)  # every completion interrupts: the test is about the line
        gsi = intx_gsi(2, 1)
        vm = harness.vm

        def wait_line(count):
            deadline = time.monotonic() + 10
            while vm.irqchip[gsi] < count and time.monotonic() < deadline:
                vm.poll(0.05)
            return vm.irqchip[gsi] >= count

        r = d.submit_read(8, 8)
        assert wait_line(1), "no INTx assertion for a completed request"
        assert d.drv.read_isr() & 1  # queue interrupt; reading ISR clears it
        vm.eoi(gsi)
        d.complete(r)
        assert r.status == 0 and r.data == pattern[8 * SECTOR:16 * SECTOR]
        # EOI while the device still has ISR set: resample makes it assert again.
        r2 = d.submit_read(16, 8)
        assert wait_line(2)
        vm.eoi(gsi)  # ISR not read yet: the device re-asserts on resample
        assert wait_line(3), "the device did not re-assert after an EOI with ISR still set"
        assert d.drv.read_isr() & 1
        vm.eoi(gsi)
        d.complete(r2)
        assert r2.data == pattern[16 * SECTOR:24 * SECTOR]

    def test_flushed_write_survives_a_device_crash(self, harness, tmp_path):
        # Acknowledged writes followed by a completed FLUSH are on the host's
        # file even if the device process dies right after (kill -9): FLUSH is
        # fdatasync on the image, done before the FLUSH completes.
        path = _disk(tmp_path)
        dev, d = _attach(harness, path)
        data = os.urandom(64 * SECTOR)
        d.write(512, data)
        d.flush()
        gen = dev.generation
        os.kill(dev.current.pid, signal.SIGKILL)
        assert _host_read(path, 512, 64) == data
        harness.wait_running(dev, gen + 1)
        assert d.read(512, 64) == data

    def test_operator_restart_keeps_queues(self, harness, tmp_path):
        path = _disk(tmp_path)
        dev, d = _attach(harness, path)
        data = os.urandom(8192)
        d.write(0, data)
        gen = dev.generation
        harness.restart(dev)
        assert dev.generation == gen + 1
        assert d.read(0, 16) == data
        d.write(32, data)
        assert _host_read(path, 32, 16) == data


@requires_root
@requires_device
class TestBusOnly:
    def test_io_and_msix_bus_only(self, bus_harness, tmp_path):
        h = bus_harness
        path = _disk(tmp_path)
        dev, d = _attach(h, path)
        assert dev.fds == {}
        data = os.urandom(32768)
        d.write(16, data)
        assert d.read(16, 64) == data
        assert h.vm.kicks == 0 and h.vm.ioeventfds == {} and h.vm.irqfds == {}
        TestVirtioBlk()._msix_mask(h, d)
