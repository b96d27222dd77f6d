"""devices.virtio.device.VirtioDevice: a tiny echo device driven like a guest driver would."""

import asyncio
import os
import struct

import pytest

from bus.types import IoSpace
from devices.virtio import features as vf
from devices.virtio import pci_transport as pt
from devices.virtio.device import VirtioDevice
from devices.virtio.dirty_log import DirtyLog
from devices.virtio.queue import ChainError, ring_sizes
from vmmd.guest_memory import GuestMemory

CFG, MMIO = IoSpace.PCI_CFG, IoSpace.MMIO
BAR0, BAR2 = 0xE0000000, 0xE0100000
V1 = 1 << vf.F_VERSION_1
EVENT_IDX = 1 << vf.F_RING_EVENT_IDX
INDIRECT = 1 << vf.F_RING_INDIRECT_DESC
NEXT, WRITE = vf.VIRTQ_DESC_F_NEXT, vf.VIRTQ_DESC_F_WRITE
QSIZE = 8
RINGS = [0x100000, 0x200000]
GSI = 10


def efd():
    return os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)


def count(fd):
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0


class FakeHost:
    def __init__(self, memory, fds=None):
        self.memory = memory
        self.fds = fds or {}
        self.irq_lines = []
        self.vectors = []
        self.msis = []
        self.checkpoints = 0

    def set_irq_line(self, gsi, level):
        self.irq_lines.append((gsi, level))

    def send_msi(self, address, data):
        self.msis.append((address, data))

    def fire_vector(self, vector):
        self.vectors.append(vector)

    def checkpoint(self):
        self.checkpoints += 1

    def request(self, what, args=None):
        pass


class EchoDevice(VirtioDevice):
    """Echoes each chain's readable bytes, reversed, into its writable buffers.

    hold=True keeps popped chains in flight instead of completing them."""
    KIND = "echo"
    VIRTIO_ID = vf.VIRTIO_ID_RNG

    def __init__(self, host, options):
        self.cfg = bytearray(b"cfgdata!")
        self.hold = False
        self.inflight = []
        self.errors = 0
        self.events = []
        self.kicked = None          # an asyncio.Event in async tests
        super().__init__(host, options)

    def device_features(self):
        return 1 << 0

    def num_queues(self):
        return 2

    def queue_max_size(self, q):
        return 16

    def config_bytes(self):
        return bytes(self.cfg)

    def config_write(self, offset, size, value):
        self.cfg[offset:offset + size] = value.to_bytes(size, "little")

    def on_driver_ok(self):
        self.events.append("driver_ok")

    def on_queue_notify(self, q, queue):
        while True:
            try:
                c = queue.pop()
            except ChainError as e:
                self.errors += 1
                queue.push_used(e.head, 0)
                continue
            if c is None:
                if not queue.enable_notification():
                    break
                continue
            if self.hold:
                self.inflight.append((q, c.head))
                continue
            data = c.read_all(self.memory)
            queue.push_used(c.head, c.write_at(self.memory, 0, data[::-1]))
        self.notify_used(q)
        if self.kicked is not None:
            self.kicked.set()

    def device_reset(self):
        self.events.append("reset")
        self.inflight.clear()

    def device_quiesce(self):
        self.events.append("quiesce")

    def device_save(self):
        return {"inflight": [list(x) for x in self.inflight], "cfg": bytes(self.cfg)}

    def device_restore(self, state):
        if not isinstance(state.get("inflight"), list):
            raise ValueError("inflight")
        self.inflight = [tuple(x) for x in state["inflight"]]
        self.cfg = bytearray(state["cfg"])


class Driver:
    """Plays the guest driver: PCI config, common config and the rings."""

    def __init__(self, dev, mem, features=V1, msix=True, vectors=True):
        self.dev, self.g = dev, mem
        self.features = features
        self.msix = msix
        self.vectors = vectors
        self.avail_idx = [0, 0]
        self.next_free = [0, 0]

    # register access
    def cfg_w(self, off, size, v):
        self.dev.io_write(CFG, off, size, v)

    def w(self, off, size, v):
        self.dev.io_write(MMIO, BAR0 + off, size, v)

    def r(self, off, size):
        return self.dev.io_read(MMIO, BAR0 + off, size)

    def program_bars(self):
        self.cfg_w(0x10, 4, BAR0)
        self.cfg_w(0x14, 4, 0)
        self.cfg_w(0x18, 4, BAR2)
        self.cfg_w(0x04, 2, pt.CMD_MEMORY | pt.CMD_MASTER)
        if self.msix:
            self.cfg_w(self.dev.transport.cap_offsets["msix"] + 2, 2, pt.MSIX_ENABLE)

    def rings(self, q):
        base = RINGS[q]
        dsize, asize, _ = ring_sizes(QSIZE)
        return base, base + dsize, (base + dsize + asize + 3) & ~3

    def setup(self, queues=(0, 1), bad_desc=None):
        self.program_bars()
        self.w(pt.COMMON_STATUS, 1, 0)
        self.w(pt.COMMON_STATUS, 1, vf.STATUS_ACKNOWLEDGE | vf.STATUS_DRIVER)
        for sel in (0, 1):
            self.w(pt.COMMON_GFSELECT, 4, sel)
            self.w(pt.COMMON_GF, 4, (self.features >> 32 * sel) & 0xFFFFFFFF)
        self.w(pt.COMMON_STATUS, 1, 0xB)
        assert self.r(pt.COMMON_STATUS, 1) & vf.STATUS_FEATURES_OK
        if self.vectors:
            self.w(pt.COMMON_MSIX, 2, 0)
        for q in queues:
            desc, avail, used = self.rings(q)
            if bad_desc is not None:
                desc = bad_desc
            self.g.write(RINGS[q], bytes(0x3000))
            self.avail_idx[q] = self.next_free[q] = 0
            self.w(pt.COMMON_Q_SELECT, 2, q)
            self.w(pt.COMMON_Q_SIZE, 2, QSIZE)
            if self.vectors:
                self.w(pt.COMMON_Q_MSIX, 2, q + 1)
            for off, v in ((pt.COMMON_Q_DESCLO, desc), (pt.COMMON_Q_AVAILLO, avail),
                           (pt.COMMON_Q_USEDLO, used)):
                self.w(off, 4, v & 0xFFFFFFFF)
                self.w(off + 4, 4, v >> 32)
            self.w(pt.COMMON_Q_ENABLE, 2, 1)
        self.w(pt.COMMON_STATUS, 1, 0xF)

    def status(self):
        return self.r(pt.COMMON_STATUS, 1)

    def submit(self, q, data, out_len, publish=True):
        """A chain [readable data][writable out_len]; returns its head."""
        desc, avail, _ = self.rings(q)
        head = self.next_free[q]
        src = 0x300000 + 0x10000 * q + 0x1000 * head
        dst = 0x400000 + 0x10000 * q + 0x1000 * head
        self.g.write(src, data)
        self.g.write(desc + 16 * head, struct.pack("<QIHH", src, len(data), NEXT, (head + 1) % QSIZE))
        self.g.write(desc + 16 * ((head + 1) % QSIZE), struct.pack("<QIHH", dst, out_len, WRITE, 0))
        self.next_free[q] = (head + 2) % QSIZE
        if publish:
            self.publish(q, head)
        return head, dst

    def publish(self, q, head):
        _, avail, _ = self.rings(q)
        i = self.avail_idx[q]
        self.g.write_u16(avail + 4 + 2 * (i % QSIZE), head)
        self.avail_idx[q] = (i + 1) & 0xFFFF
        self.g.write_u16(avail + 2, self.avail_idx[q])

    def kick(self, q):
        self.w(pt.NOTIFY_OFFSET + 4 * q, 2, q)

    def used_idx(self, q):
        return self.g.read_u16(self.rings(q)[2] + 2)

    def used(self, q, slot):
        return struct.unpack("<II", self.g.read(self.rings(q)[2] + 4 + 8 * (slot % QSIZE), 8))

    def set_used_event(self, q, v):
        self.g.write_u16(self.rings(q)[1] + 4 + 2 * QSIZE, v)


@pytest.fixture
def mem():
    g = GuestMemory.create(16 << 20)
    yield g
    g.close()


def make(mem, fds=None, options=None):
    host = FakeHost(mem, fds)
    return EchoDevice(host, options or {"intx_gsi": GSI}), host


def test_bus_only_setup_kick_and_vector(mem):
    dev, host = make(mem)
    drv = Driver(dev, mem)
    drv.setup()
    assert dev.events == ["reset", "driver_ok"] and dev.queues[0] and dev.queues[1]
    head, dst = drv.submit(0, b"hello", 16)
    drv.kick(0)
    assert drv.used_idx(0) == 1 and drv.used(0, 0) == (head, 5)
    assert mem.read(dst, 5) == b"olleh"
    assert host.vectors == [1]                 # queue 0 -> vector 1, through the bus
    head, dst = drv.submit(1, b"abc", 2)
    drv.kick(1)
    assert mem.read(dst, 2) == b"cb" and drv.used(1, 0) == (head, 2)
    assert host.vectors == [1, 2]
    assert host.checkpoints > 0


def test_fast_path_ioeventfd_and_irqfd(mem):
    fds = {"ioeventfd.0": efd(), "ioeventfd.1": efd(), "irqfd.0": efd(), "irqfd.1": efd(),
           "irqfd.2": efd()}
    dev, host = make(mem, fds)
    drv = Driver(dev, mem)
    drv.setup()

    async def run():
        dev.kicked = asyncio.Event()
        await dev.start()
        head, dst = drv.submit(0, b"fast", 4)
        os.eventfd_write(fds["ioeventfd.0"], 1)      # what KVM does on the notify write
        await asyncio.wait_for(dev.kicked.wait(), 10)
        return head, dst

    head, dst = asyncio.run(run())
    assert mem.read(dst, 4) == b"tsaf" and drv.used(0, 0) == (head, 4)
    assert count(fds["irqfd.1"]) == 1 and count(fds["irqfd.2"]) == 0
    assert host.vectors == [] and count(fds["ioeventfd.0"]) == 0
    dev.close()
    for fd in fds.values():
        os.close(fd)


def test_intx_bus_only(mem):
    dev, host = make(mem)
    drv = Driver(dev, mem, msix=False)
    drv.setup()
    drv.submit(0, b"x", 1)
    drv.kick(0)
    drv.submit(0, b"y", 1)
    drv.kick(0)
    assert host.irq_lines == [(GSI, True)]               # asserted once, level
    assert dev.io_read(CFG, 0x06, 2) & pt.STATUS_INTERRUPT
    assert drv.r(pt.ISR_OFFSET, 1) == vf.ISR_QUEUE       # read clears and deasserts
    assert host.irq_lines == [(GSI, True), (GSI, False)]
    assert not dev.io_read(CFG, 0x06, 2) & pt.STATUS_INTERRUPT
    assert drv.r(pt.ISR_OFFSET, 1) == 0
    # INTx disabled in COMMAND: ISR still set, no line
    drv.cfg_w(0x04, 2, pt.CMD_MEMORY | pt.CMD_INTX_DISABLE)
    drv.submit(0, b"z", 1)
    drv.kick(0)
    assert host.irq_lines == [(GSI, True), (GSI, False)]
    assert drv.r(pt.ISR_OFFSET, 1) == vf.ISR_QUEUE


def test_intx_irqfd_with_resample(mem):
    fds = {"intx": efd(), "intx_resample": efd()}
    dev, host = make(mem, fds)
    drv = Driver(dev, mem, msix=False)
    drv.setup()
    drv.submit(0, b"x", 1)
    drv.kick(0)
    assert count(fds["intx"]) == 1 and host.irq_lines == []
    # EOI while ISR is still set: asserted again
    os.eventfd_write(fds["intx_resample"], 1)
    dev._on_resample()
    assert count(fds["intx"]) == 1
    assert drv.r(pt.ISR_OFFSET, 1) == vf.ISR_QUEUE
    os.eventfd_write(fds["intx_resample"], 1)
    dev._on_resample()
    assert count(fds["intx"]) == 0 and not dev.transport.intx_asserted
    for fd in fds.values():
        os.close(fd)


def test_event_idx_interrupt_suppression(mem):
    dev, host = make(mem)
    drv = Driver(dev, mem, features=V1 | EVENT_IDX)
    drv.setup()
    drv.submit(0, b"a", 1)
    drv.kick(0)
    assert host.vectors == [1]
    drv.set_used_event(0, 5)                   # the driver wants one interrupt at used idx 6
    for n in range(4):
        drv.submit(0, b"b", 1)
        drv.kick(0)
    assert drv.used_idx(0) == 5 and host.vectors == [1]
    drv.submit(0, b"c", 1)
    drv.kick(0)
    assert host.vectors == [1, 1]
    # the device asks for a kick at the next avail index
    assert mem.read_u16(drv.rings(0)[2] + 4 + 8 * QSIZE) == 6


def test_malformed_chain_completed_with_error(mem):
    dev, host = make(mem)
    drv = Driver(dev, mem)
    drv.setup()
    desc = drv.rings(0)[0]
    mem.write(desc, struct.pack("<QIHH", 0x300000, 0, 0, 0))   # zero-length
    drv.next_free[0] = 1
    drv.publish(0, 0)
    head, dst = drv.submit(0, b"ok", 2)
    drv.kick(0)
    assert dev.errors == 1
    assert drv.used(0, 0) == (0, 0) and drv.used(0, 1) == (head, 2)
    assert not drv.status() & vf.STATUS_NEEDS_RESET


def test_broken_ring_sets_needs_reset_then_reset_recovers(mem):
    dev, host = make(mem)
    drv = Driver(dev, mem)
    drv.setup()
    drv.publish(0, QSIZE + 3)                  # a head outside the queue
    drv.kick(0)
    assert drv.status() & vf.STATUS_NEEDS_RESET
    assert host.vectors == [0]                 # config change interrupt on the config vector
    assert drv.r(pt.ISR_OFFSET, 1) & vf.ISR_CONFIG
    assert "head" in dev.needs_reset_reason
    drv.submit(0, b"ignored", 8)
    drv.kick(0)
    assert drv.used_idx(0) == 0                # no processing until reset
    drv.setup()                                # status 0, then a fresh start
    assert not drv.status() & vf.STATUS_NEEDS_RESET and dev.needs_reset_reason is None
    head, dst = drv.submit(0, b"again", 5)
    drv.kick(0)
    assert mem.read(dst, 5) == b"niaga"


def test_bad_ring_address_at_driver_ok_needs_reset(mem):
    dev, host = make(mem)
    drv = Driver(dev, mem)
    drv.setup(bad_desc=0x7FFF_0000_0000)
    assert drv.status() & vf.STATUS_NEEDS_RESET
    assert "driver_ok" not in dev.events
    assert dev.queues == [None, None]


def test_invalid_queue_size_needs_reset(mem):
    dev, host = make(mem)
    drv = Driver(dev, mem)
    drv.program_bars()
    drv.w(pt.COMMON_STATUS, 1, 3)
    drv.w(pt.COMMON_GFSELECT, 4, 1)
    drv.w(pt.COMMON_GF, 4, 1)
    drv.w(pt.COMMON_STATUS, 1, 0xB)
    drv.w(pt.COMMON_Q_SIZE, 2, 12)
    drv.w(pt.COMMON_Q_ENABLE, 2, 1)
    drv.w(pt.COMMON_STATUS, 1, 0xF)
    assert drv.status() & vf.STATUS_NEEDS_RESET


def test_reset_during_io(mem):
    dev, host = make(mem)
    drv = Driver(dev, mem)
    drv.setup()
    dev.hold = True
    drv.submit(0, b"one", 3)
    drv.submit(0, b"two", 3)
    drv.kick(0)
    assert len(dev.inflight) == 2 and drv.used_idx(0) == 0
    drv.w(pt.COMMON_STATUS, 1, 0)              # the driver resets with requests in flight
    assert dev.inflight == [] and dev.queues == [None, None]
    assert drv.status() == 0 and dev.transport.isr == 0
    drv.kick(0)                                # stale kick: ignored
    assert drv.used_idx(0) == 0
    dev.hold = False
    drv.setup()
    head, dst = drv.submit(0, b"three", 5)
    drv.kick(0)
    assert drv.used(0, 0) == (head, 5) and mem.read(dst, 5) == b"eerht"


def test_function_reset_clears_bars(mem):
    dev, host = make(mem)
    drv = Driver(dev, mem)
    drv.setup()
    dev.reset()
    assert dev.io_read(CFG, 0x10, 4) == 0x4 and dev.io_read(CFG, 0x04, 2) == 0
    assert drv.r(pt.COMMON_NUMQ, 2) == 0xFFFF               # not decoded any more
    assert dev.queues == [None, None] and dev.events[-1] == "reset"


def test_config_space_and_config_change(mem):
    fds = {"irqfd.0": efd()}
    dev, host = make(mem, fds)
    drv = Driver(dev, mem)
    drv.setup()
    assert drv.r(pt.DEVICE_OFFSET, 4) == int.from_bytes(b"cfgd", "little")
    drv.w(pt.DEVICE_OFFSET + 4, 4, int.from_bytes(b"DATA", "little"))
    assert dev.cfg == bytearray(b"cfgdDATA")
    gen = drv.r(pt.COMMON_CFGGENERATION, 1)
    dev.config_changed()
    assert drv.r(pt.COMMON_CFGGENERATION, 1) == gen + 1
    assert count(fds["irqfd.0"]) == 1
    os.close(fds["irqfd.0"])


def test_unrouted_accesses(mem):
    dev, _ = make(mem)
    drv = Driver(dev, mem)
    drv.setup()
    assert dev.io_read(MMIO, 0xD0000000, 4) == 0xFFFFFFFF
    assert dev.io_read(MMIO, BAR2, 4) == 0xFFFFFFFF          # the MSI-X table is vmmd's
    assert dev.io_read(IoSpace.PIO, 0x60, 1) == 0xFF
    dev.io_write(MMIO, BAR2, 4, 0)
    dev.io_write(IoSpace.PIO, 0x60, 1, 0)


def test_hello_info_declaration(mem):
    dev, _ = make(mem)
    decl = dev.hello_info()["pci"]
    assert decl["notify"]["queues"] == 2 and decl["msix"]["vectors"] == 3
    try:
        from bus.pci_info import parse_pci_info
    except ImportError:
        return
    parse_pci_info(decl)


def test_save_restore_mid_queue(mem):
    dev, host = make(mem)
    drv = Driver(dev, mem, features=V1 | EVENT_IDX)
    drv.setup()
    drv.submit(0, b"first", 5)
    drv.kick(0)
    dev.hold = True
    held, _ = drv.submit(0, b"held", 4)        # popped, in flight at save time
    drv.kick(0)
    pending, pdst = drv.submit(0, b"later", 5)  # published, not yet popped
    dev.quiesce()
    state = dev.save_state()
    assert state["queues"][0]["last_avail_idx"] == 2 and state["queues"][0]["used_idx"] == 1
    import msgpack
    state = msgpack.unpackb(msgpack.packb(state))
    # a fresh process on the same guest memory
    dev2, host2 = make(mem)
    dev2.restore_state(state)
    assert dev2.inflight == [(0, held)]
    assert dev2.transport.msix_enabled and dev2.transport.bar_address(0) == BAR0
    assert dev2.save_state()["transport"] == state["transport"]
    asyncio.run(dev2.start())                  # polls the live queues once
    assert drv.used_idx(0) == 2 and drv.used(0, 1) == (pending, 5)
    assert mem.read(pdst, 5) == b"retal"
    # the device finishes the in-flight request with the restored queue
    dev2.queues[0].push_used(held, 0)
    assert drv.used_idx(0) == 3
    d2 = Driver(dev2, mem)
    d2.avail_idx, d2.next_free = drv.avail_idx, drv.next_free
    head, dst = d2.submit(0, b"more", 4)
    d2.kick(0)
    assert drv.used(0, 3) == (head, 4) and mem.read(dst, 4) == b"erom"


def test_restore_from_a_stale_checkpoint_resyncs_from_the_ring(mem):
    dev, host = make(mem)
    drv = Driver(dev, mem)
    drv.setup()
    stale = dev.save_state()
    for n in range(3):
        drv.submit(0, b"x", 1)
        drv.kick(0)
    assert drv.used_idx(0) == 3
    dev2, _ = make(mem)
    dev2.restore_state(stale)
    assert dev2.queues[0].used_idx == 3 and dev2.queues[0].last_avail_idx == 3
    head, dst = drv.submit(0, b"ab", 2)
    drv.dev = dev2
    drv.kick(0)
    assert drv.used(0, 3) == (head, 2)


def test_restore_rejects_bad_state_and_changes_nothing(mem):
    dev, host = make(mem)
    drv = Driver(dev, mem)
    drv.setup()
    good = dev.save_state()
    dev2, _ = make(mem)
    before = dev2.save_state()
    bad_states = [None, {}, dict(good, virtio=2), dict(good, queues=[None]),
                  dict(good, device=None), dict(good, device={"inflight": None, "cfg": b""}),
                  {k: v for k, v in good.items() if k != "transport"},
                  dict(good, transport=dict(good["transport"], status=999))]
    for bad in bad_states:
        with pytest.raises(ValueError):
            dev2.restore_state(bad)
        assert dev2.save_state() == before


def test_quiesce_holds_kicks_until_resume(mem):
    fds = {"ioeventfd.0": efd()}
    dev, host = make(mem, fds)
    drv = Driver(dev, mem)
    drv.setup()

    async def run():
        await dev.start()
        dev.quiesce()
        assert dev.events[-1] == "quiesce"
        head, dst = drv.submit(0, b"q", 1)
        drv.kick(0)                                # bus-only kick: remembered only
        os.eventfd_write(fds["ioeventfd.0"], 1)    # fast-path kick: not read while quiesced
        for _ in range(5):
            await asyncio.sleep(0)
        assert drv.used_idx(0) == 0
        dev.kicked = asyncio.Event()
        dev.resume()
        await asyncio.wait_for(dev.kicked.wait(), 10)
        return dst

    dst = asyncio.run(run())
    assert drv.used_idx(0) == 1 and mem.read(dst, 1) == b"q"
    dev.close()
    os.close(fds["ioeventfd.0"])


def test_device_writes_are_dirty_logged(mem):
    vmm_log = DirtyLog.for_layout(mem.layout)
    fds = {"dirty_log": os.dup(vmm_log.fd)}
    dev, host = make(mem, fds)
    drv = Driver(dev, mem)
    drv.setup()
    old = vmm_log.flip()
    dev.dirty_sync()
    vmm_log.harvest(old)                       # start clean (setup wrote nothing anyway)
    head, dst = drv.submit(1, b"dirty", 5)
    drv.kick(1)
    old = vmm_log.flip()
    dev.dirty_sync()
    pages = set(vmm_log.harvest(old).tolist())
    assert pages == {dst >> 12, drv.rings(1)[2] >> 12}
    dev.close()
    os.close(fds["dirty_log"])
    vmm_log.close()


def test_stats(mem):
    dev, _ = make(mem)
    drv = Driver(dev, mem)
    drv.setup()
    drv.submit(0, b"s", 1)
    drv.kick(0)
    s = dev.stats()
    assert s["kicks"] == 1 and s["queues"][0]["used"] == 1 and s["needs_reset_reason"] is None and s["needs_reset"] == 0
