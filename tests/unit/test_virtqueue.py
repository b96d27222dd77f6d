"""devices.virtio.queue: split virtqueue parsing, validation, event idx, fuzz."""

import os
import random
import struct

import pytest

from devices.virtio.dirty_log import DirtyLog
from devices.virtio.features import (VIRTQ_AVAIL_F_NO_INTERRUPT, VIRTQ_DESC_F_INDIRECT,
                                     VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, VIRTQ_USED_F_NO_NOTIFY)
from devices.virtio.memory import DeviceMemory
from devices.virtio.queue import (ChainError, DescriptorChain, QueueError, SplitQueue,
                                  ring_sizes, vring_need_event)
from vmmd.guest_memory import GuestMemory, GuestMemoryError, MemoryLayout, MemoryRegion

NEXT, WRITE, INDIRECT = VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, VIRTQ_DESC_F_INDIRECT
MiB = 1 << 20
# Two RAM regions with a hole between them: [0, 2 MiB) and [4 MiB, 5 MiB)
LAYOUT = MemoryLayout((MemoryRegion(0, 2 * MiB, 0), MemoryRegion(4 * MiB, MiB, 2 * MiB)))
RING_BASE = 0x10000
import collections
FUZZ_TOTALS = collections.Counter()


def make_memory(dirty: bool = False) -> DeviceMemory:
    fd = os.memfd_create("test-ram", os.MFD_CLOEXEC)
    os.ftruncate(fd, LAYOUT.total_size)
    g = GuestMemory(fd, LAYOUT)
    return DeviceMemory(g, DirtyLog.for_layout(LAYOUT) if dirty else None)


class RingDriver:
    """The driver side of a split ring, written straight into guest memory."""

    def __init__(self, mem: DeviceMemory, size: int, base: int = RING_BASE):
        self.g = mem.guest
        self.size = size
        dsize, asize, _ = ring_sizes(size)
        self.desc = base
        self.avail = base + dsize
        self.used = (self.avail + asize + 3) & ~3
        self.avail_idx = 0
        self.next_free = 0

    def queue(self, mem, **kw) -> SplitQueue:
        return SplitQueue(mem, self.size, self.desc, self.avail, self.used, **kw)

    def set_desc(self, i, addr, length, flags=0, nxt=0, table=None):
        base = self.desc if table is None else table
        self.g.write(base + 16 * i, struct.pack("<QIHH", addr, length, flags, nxt))

    def publish(self, head: int) -> None:
        self.g.write_u16(self.avail + 4 + 2 * (self.avail_idx % self.size), head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.g.write_u16(self.avail + 2, self.avail_idx)

    def chain(self, segments, publish=True) -> int:
        """segments: [(addr, len, writable)]; uses the next free descriptors."""
        head = self.next_free
        for k, (addr, length, w) in enumerate(segments):
            i = (head + k) % self.size
            last = k == len(segments) - 1
            self.set_desc(i, addr, length, (WRITE if w else 0) | (0 if last else NEXT),
                          (i + 1) % self.size)
        self.next_free = (head + len(segments)) % self.size
        if publish:
            self.publish(head)
        return head

    def used_idx(self) -> int:
        return self.g.read_u16(self.used + 2)

    def used_elem(self, slot: int) -> tuple[int, int]:
        return struct.unpack("<II", self.g.read(self.used + 4 + 8 * (slot % self.size), 8))

    def set_used_event(self, v):
        self.g.write_u16(self.avail + 4 + 2 * self.size, v)

    def avail_event(self):
        return self.g.read_u16(self.used + 4 + 8 * self.size)


@pytest.fixture
def mem():
    m = make_memory()
    yield m
    m.guest.close()


def test_simple_chain_read_write_and_used(mem):
    d = RingDriver(mem, 8)
    q = d.queue(mem)
    assert q.pop() is None and not q.pending()
    mem.guest.write(0x20000, b"request-header")
    head = d.chain([(0x20000, 14, False), (0x21000, 4, True), (0x22000, 8, True)])
    assert q.pending()
    c = q.pop()
    assert isinstance(c, DescriptorChain)
    assert c.head == head == 0
    assert c.readable == [(0x20000, 14)] and c.writable == [(0x21000, 4), (0x22000, 8)]
    assert (c.readable_len, c.writable_len) == (14, 12)
    assert c.read_all(mem) == b"request-header"
    assert c.read_all(mem, 7) == b"request"
    buf = bytearray(5)
    assert c.read_into(mem, buf, offset=8) == 5 and bytes(buf) == b"heade"
    assert c.write_at(mem, 2, b"0123456789abcdef") == 10   # truncated at the end
    assert mem.read(0x21000, 4) == b"\0\x00" + b"01"
    assert mem.read(0x22000, 8) == b"23456789"
    q.push_used(c.head, 10)
    assert d.used_idx() == 1 and d.used_elem(0) == (0, 10)
    assert q.pop() is None


def test_views_for_zero_copy_io(mem):
    d = RingDriver(mem, 4)
    q = d.queue(mem)
    mem.guest.write(0x30000, b"abcdef")
    d.chain([(0x30000, 3, False), (0x30003, 3, False), (0x31000, 2, True), (0x32000, 6, True)])
    c = q.pop()
    assert b"".join(bytes(v) for v in c.readable_views(mem, 1)) == b"bcdef"
    views = c.writable_views(mem, 1, 5)
    assert [len(v) for v in views] == [1, 4]
    views[0][:] = b"X"
    views[1][:] = b"YYYY"
    assert mem.read(0x31001, 1) == b"X" and mem.read(0x32000, 4) == b"YYYY"
    with pytest.raises(TypeError):
        c.readable_views(mem)[0][0] = 1   # read-only


def test_queue_construction_validation(mem):
    with pytest.raises(QueueError):
        SplitQueue(mem, 6, 0x1000, 0x2000, 0x3000)           # not a power of 2
    with pytest.raises(QueueError):
        SplitQueue(mem, 0, 0x1000, 0x2000, 0x3000)
    with pytest.raises(QueueError):
        SplitQueue(mem, 65536, 0x1000, 0x2000, 0x3000)
    with pytest.raises(QueueError):
        SplitQueue(mem, 8, 0x1008, 0x2000, 0x3000)           # desc not 16-aligned
    with pytest.raises(QueueError):
        SplitQueue(mem, 8, 0x1000, 0x2001, 0x3000)
    with pytest.raises(QueueError):
        SplitQueue(mem, 8, 0x1000, 0x2000, 0x3002)
    with pytest.raises(QueueError):
        SplitQueue(mem, 256, 2 * MiB - 0x800, 0x2000, 0x3000)  # desc table runs into the hole
    with pytest.raises(QueueError):
        SplitQueue(mem, 8, 0x1000, 0x2000, 5 * MiB)           # used ring past the end
    SplitQueue(mem, 8, 4 * MiB, 4 * MiB + 0x1000, 4 * MiB + 0x2000)  # high region is fine


def test_head_out_of_range_breaks_the_ring(mem):
    d = RingDriver(mem, 8)
    q = d.queue(mem)
    d.publish(8)
    with pytest.raises(QueueError) as ei:
        q.pop()
    assert not isinstance(ei.value, ChainError)


def test_avail_idx_jump_breaks_the_ring(mem):
    d = RingDriver(mem, 8)
    q = d.queue(mem)
    mem.guest.write_u16(d.avail + 2, 9)
    with pytest.raises(QueueError):
        q.pop()
    mem.guest.write_u16(d.avail + 2, 8)   # exactly size ahead is fine
    for i in range(8):
        d.set_desc(i, 0x40000, 16)
    for _ in range(8):
        assert q.pop() is not None
    assert q.pop() is None


def _bad_chain(mem, build, **kw):
    d = RingDriver(mem, 8)
    q = d.queue(mem, **kw)
    head = build(d)
    d.publish(head)
    with pytest.raises(ChainError) as ei:
        q.pop()
    assert ei.value.head == head
    # the ring goes on: the next chain is fine
    d.set_desc(7, 0x40000, 8, WRITE)
    d.publish(7)
    c = q.pop()
    assert c.head == 7
    return ei.value


def test_next_out_of_range(mem):
    e = _bad_chain(mem, lambda d: (d.set_desc(0, 0x40000, 8, NEXT, 8), 0)[1])
    assert "out of range" in e.reason


def test_descriptor_loop(mem):
    def build(d):
        d.set_desc(2, 0x40000, 8, NEXT, 3)
        d.set_desc(3, 0x41000, 8, NEXT, 2)
        return 2
    assert "loop" in _bad_chain(mem, build).reason


def test_self_loop(mem):
    assert "loop" in _bad_chain(mem, lambda d: (d.set_desc(1, 0x40000, 8, NEXT, 1), 1)[1]).reason


def test_chain_longer_than_max_chain_len(mem):
    def build(d):
        for i in range(4):
            d.set_desc(i, 0x40000 + i * 0x100, 8, NEXT if i < 3 else 0, i + 1)
        return 0
    assert "longer" in _bad_chain(mem, build, max_chain_len=3).reason


def test_zero_length_descriptor_rejected(mem):
    def build(d):
        d.set_desc(0, 0x40000, 8, NEXT, 1)
        d.set_desc(1, 0x41000, 0, WRITE)
        return 0
    assert "zero-length" in _bad_chain(mem, build).reason


@pytest.mark.parametrize("addr,length", [
    (2 * MiB - 8, 16),          # runs into the hole
    (3 * MiB, 8),               # in the hole
    (5 * MiB - 4, 8),           # past the end of RAM
    (1 << 63, 8),               # far away
    ((1 << 64) - 4, 8),         # wraps 64 bits
    (0, 0xFFFFFFFF),            # larger than a region
])
def test_buffer_outside_guest_ram(mem, addr, length):
    e = _bad_chain(mem, lambda d: (d.set_desc(5, addr, length, WRITE), 5)[1])
    assert "outside guest RAM" in e.reason


def test_buffer_at_region_edges_is_fine(mem):
    d = RingDriver(mem, 4)
    q = d.queue(mem)
    d.chain([(2 * MiB - 8, 8, False), (4 * MiB, 8, True), (5 * MiB - 1, 1, True)])
    c = q.pop()
    assert c.readable_len == 8 and c.writable_len == 9


def test_readable_after_writable_rejected(mem):
    def build(d):
        d.set_desc(0, 0x40000, 8, WRITE | NEXT, 1)
        d.set_desc(1, 0x41000, 8, 0)
        return 0
    assert "after" in _bad_chain(mem, build).reason


def _indirect_table(mem, gpa, descs):
    mem.guest.write(gpa, b"".join(struct.pack("<QIHH", *x) for x in descs))


def test_indirect_chain(mem):
    d = RingDriver(mem, 4)
    q = d.queue(mem, indirect=True)
    _indirect_table(mem, 0x50000, [(0x60000, 16, NEXT, 1), (0x61000, 32, NEXT, 2),
                                   (0x62000, 1, WRITE, 0)])
    d.set_desc(0, 0x50000, 48, INDIRECT | WRITE)   # WRITE on the pointer is ignored
    d.publish(0)
    c = q.pop()
    assert c.head == 0
    assert c.readable == [(0x60000, 16), (0x61000, 32)] and c.writable == [(0x62000, 1)]


def test_indirect_after_direct_descriptors(mem):
    d = RingDriver(mem, 4)
    q = d.queue(mem, indirect=True)
    _indirect_table(mem, 0x50000, [(0x62000, 4, WRITE, 0)])
    d.set_desc(0, 0x60000, 16, NEXT, 1)
    d.set_desc(1, 0x50000, 16, INDIRECT)
    d.publish(0)
    c = q.pop()
    assert c.readable == [(0x60000, 16)] and c.writable == [(0x62000, 4)]


def test_indirect_snapshot_is_used(mem):
    """The indirect table is read once: what was validated is what we use."""
    d = RingDriver(mem, 4)
    q = d.queue(mem, indirect=True)
    _indirect_table(mem, 0x50000, [(0x60000, 16, 0, 0)])
    d.set_desc(0, 0x50000, 16, INDIRECT)
    d.publish(0)
    c = q.pop()
    _indirect_table(mem, 0x50000, [(1 << 60, 16, 0, 0)])   # changed after the pop
    assert c.readable == [(0x60000, 16)]


@pytest.mark.parametrize("case", ["not_negotiated", "nested", "with_next", "len0", "len_not_16",
                                  "too_many", "table_outside", "loop", "next_range",
                                  "zero_len_inside", "direction"])
def test_indirect_violations(mem, case):
    kw = {"indirect": case != "not_negotiated", "max_chain_len": 8}

    def build(d):
        table = 0x50000
        entries = [(0x60000, 16, 0, 0)]
        length, flags = 16, INDIRECT
        if case == "nested":
            entries = [(0x51000, 16, INDIRECT, 0)]
        elif case == "with_next":
            flags |= NEXT
            d.set_desc(1, 0x60000, 8)
        elif case == "len0":
            length = 0
        elif case == "len_not_16":
            length = 24
        elif case == "too_many":
            entries = [(0x60000, 16, NEXT, i + 1) for i in range(9)]
            length = 16 * 9
        elif case == "table_outside":
            table = 2 * MiB - 8
        elif case == "loop":
            entries = [(0x60000, 16, NEXT, 1), (0x61000, 16, NEXT, 0)]
            length = 32
        elif case == "next_range":
            entries = [(0x60000, 16, NEXT, 1)]
        elif case == "zero_len_inside":
            entries = [(0x60000, 0, 0, 0)]
        elif case == "direction":
            entries = [(0x60000, 16, WRITE | NEXT, 1), (0x61000, 16, 0, 0)]
            length = 32
        if table < 2 * MiB - 64:
            _indirect_table(mem, table, entries)
        d.set_desc(0, table, length, flags, 1)
        return 0
    _bad_chain(mem, build, **kw)


def test_index_wraparound(mem):
    d = RingDriver(mem, 4)
    q = d.queue(mem)
    start = 0xFFFE
    q.restore({"last_avail_idx": start, "used_idx": start, "signalled_used": start,
               "signalled_valid": True})
    d.avail_idx = start
    mem.guest.write_u16(d.used + 2, start)
    seen = []
    for n in range(10):
        d.chain([(0x40000 + n * 0x100, 8, True)])
        c = q.pop()
        assert c is not None and q.pop() is None
        seen.append(c.head)
        q.push_used(c.head, n)
        assert q.needs_interrupt()
    assert seen == [n % 4 for n in range(10)]
    assert q.last_avail_idx == q.used_idx == (start + 10) & 0xFFFF == d.used_idx() == 8
    assert d.used_elem((start + 9) & 0xFFFF) == (9 % 4, 9)


@pytest.mark.parametrize("event,new,old,expect", [
    (0, 1, 0, True),        # the event index passed
    (1, 1, 0, False),       # the driver wants to hear after idx 2
    (5, 10, 3, True),
    (10, 10, 3, False),
    (2, 3, 3, False),       # nothing new
    (0xFFFF, 0, 0xFFFE, True),   # across the wrap
    (0xFFFE, 0, 0xFFFF, False),
    (3, 5, 0xFFFD, True),
])
def test_vring_need_event(event, new, old, expect):
    assert vring_need_event(event, new, old) is expect


def test_event_idx_interrupt_suppression(mem):
    d = RingDriver(mem, 8)
    q = d.queue(mem, event_idx=True)
    d.set_used_event(1)       # interrupt when used idx passes 1, i.e. reaches 2
    for n in range(3):
        d.chain([(0x40000, 8, True)])
    heads = [q.pop().head for _ in range(3)]
    q.push_used(heads[0], 0)
    assert q.needs_interrupt()       # first check after creation: always (not yet valid)
    q.push_used(heads[1], 0)
    assert q.needs_interrupt()       # used idx 2 passed event 1
    q.push_used(heads[2], 0)
    assert not q.needs_interrupt()   # event 1 already passed
    assert not q.needs_interrupt()   # nothing new
    d.set_used_event(3)
    d.chain([(0x40000, 8, True)])
    q.push_used(q.pop().head, 0)
    assert q.needs_interrupt()


def test_no_interrupt_flag_without_event_idx(mem):
    d = RingDriver(mem, 8)
    q = d.queue(mem)
    d.chain([(0x40000, 8, True)])
    d.chain([(0x40000, 8, True)])
    mem.guest.write_u16(d.avail, VIRTQ_AVAIL_F_NO_INTERRUPT)
    q.push_used(q.pop().head, 0)
    assert not q.needs_interrupt()
    mem.guest.write_u16(d.avail, 0)
    q.push_used(q.pop().head, 0)
    assert q.needs_interrupt()
    assert not q.needs_interrupt()


def test_avail_event_and_enable_notification(mem):
    d = RingDriver(mem, 8)
    q = d.queue(mem, event_idx=True)
    d.chain([(0x40000, 8, True)])
    q.pop()
    assert q.enable_notification() is False
    assert d.avail_event() == 1
    d.chain([(0x40000, 8, True)])
    assert q.enable_notification() is True
    q.set_avail_event(0x1234)
    assert d.avail_event() == 0x1234
    # without event idx: the used flags carry NO_NOTIFY
    d2 = RingDriver(mem, 8, base=0x80000)
    q2 = d2.queue(mem)
    q2.disable_notification()
    assert mem.guest.read_u16(d2.used) == VIRTQ_USED_F_NO_NOTIFY
    assert q2.enable_notification() is False
    assert mem.guest.read_u16(d2.used) == 0


def test_save_restore_and_sync_from_ring(mem):
    d = RingDriver(mem, 8)
    q = d.queue(mem, event_idx=True)
    for _ in range(3):
        d.chain([(0x40000, 8, True)])
    a, b = q.pop(), q.pop()
    q.push_used(a.head, 1)
    state = q.save()
    q2 = d.queue(mem, event_idx=True)
    q2.restore(state)
    assert q2.save() == state
    q2.push_used(b.head, 2)
    assert q2.pop().head == 2 and q2.pop() is None
    assert d.used_elem(1) == (b.head, 2)
    for bad in [None, {}, dict(state, used_idx=-1), dict(state, last_avail_idx=70000),
                dict(state, signalled_valid=1), dict(state, last_avail_idx=9, used_idx=0)]:
        with pytest.raises(ValueError):
            q2.restore(bad)
    q3 = d.queue(mem)
    q3.sync_from_ring()
    assert q3.used_idx == q3.last_avail_idx == d.used_idx() == 2


def test_push_used_rejects_bad_head(mem):
    q = RingDriver(mem, 8).queue(mem)
    with pytest.raises(QueueError):
        q.push_used(8, 0)


def test_used_ring_and_data_writes_are_dirty_logged():
    mem = make_memory(dirty=True)
    d = RingDriver(mem, 8, base=0x10000)
    q = d.queue(mem, event_idx=True)
    d.chain([(0x40000, 8, False), (0x7FFFE, 4, True)])
    c = q.pop()
    c.write_at(mem, 0, b"abcd")            # straddles pages 0x7f and 0x80
    q.push_used(c.head, 4)
    q.set_avail_event()
    pages = set(mem.dirty_log.harvest(mem.dirty_log.active).tolist())
    assert pages == {0x7F, 0x80, d.used >> 12, (d.used + 4 + 8 * 8) >> 12}
    assert 0x40 not in pages               # read-only buffers are not marked
    mem.guest.close()


# --- fuzz -------------------------------------------------------------------------------

def _interesting_addr(rng):
    edges = [0, 2 * MiB, 4 * MiB, 5 * MiB, 3 * MiB, 1 << 32, (1 << 64) - 1]
    r = rng.random()
    if r < 0.4:
        return rng.randrange(0, 2 * MiB)
    if r < 0.8:
        return max(0, rng.choice(edges) + rng.randrange(-64, 64)) & ((1 << 64) - 1)
    return rng.getrandbits(64)


@pytest.mark.parametrize("seed", range(40))
def test_fuzz_random_rings(seed):
    rng = random.Random(seed)
    mem = make_memory(dirty=True)
    size = rng.choice([1, 2, 4, 8, 16, 64])
    d = RingDriver(mem, size)
    q = d.queue(mem, event_idx=rng.random() < 0.5, indirect=rng.random() < 0.7,
                max_chain_len=rng.choice([None, 4, 300]))
    # a few indirect tables of random entries
    tables = []
    for _ in range(3):
        n = rng.randrange(1, 12)
        gpa = rng.randrange(0x100000, 0x180000) & ~15
        mem.guest.write(gpa, bytes(rng.getrandbits(8) for _ in range(16 * n)))
        for i in range(n):
            if rng.random() < 0.8:
                flags = rng.choice([0, NEXT, WRITE, NEXT | WRITE, INDIRECT, rng.getrandbits(16)])
                mem.guest.write(gpa + 16 * i, struct.pack(
                    "<QIHH", _interesting_addr(rng), rng.choice([1, 8, 512, 4096, 0, rng.getrandbits(32)]),
                    flags, rng.randrange(0, n + 2)))
        tables.append((gpa, 16 * n))
    outcomes = {"chain": 0, "chain_error": 0, "queue_error": 0}
    for rnd in range(30):
        for i in range(size):
            if rng.random() < 0.5:
                if rng.random() < 0.2 and tables:
                    gpa, ln = rng.choice(tables)
                    d.set_desc(i, gpa, rng.choice([ln, ln + 8, 0, 16]),
                               rng.choice([INDIRECT, INDIRECT | NEXT, INDIRECT | WRITE]),
                               rng.randrange(size + 1))
                else:
                    d.set_desc(i, _interesting_addr(rng),
                               rng.choice([1, 16, 4096, 0, rng.getrandbits(32)]),
                               rng.choice([0, NEXT, WRITE, NEXT | WRITE, rng.getrandbits(16)]),
                               rng.randrange(size + 2))
        for _ in range(rng.randrange(0, size + 1)):
            d.publish(rng.randrange(size + 1) if rng.random() < 0.1 else rng.randrange(size))
        if rng.random() < 0.05:
            mem.guest.write_u16(d.avail + 2, rng.getrandbits(16))
        for _ in range(size + 2):
            try:
                c = q.pop()
            except ChainError as e:
                assert 0 <= e.head < size
                q.push_used(e.head, 0)
                outcomes["chain_error"] += 1
                continue
            except QueueError:
                outcomes["queue_error"] += 1
                q.sync_from_ring()
                q.last_avail_idx = d.avail_idx = q.avail_idx()
                break
            if c is None:
                break
            outcomes["chain"] += 1
            for gpa, n in c.readable + c.writable:
                assert n > 0 and LAYOUT.contains(gpa, n)
            seen_w = False
            assert c.readable_len + c.writable_len <= q.max_chain_len * 0xFFFFFFFF
            c.read_all(mem, 4096)
            c.write_at(mem, max(0, c.writable_len - 8), b"Z" * 16)
            q.push_used(c.head, min(c.writable_len, 8))
            q.needs_interrupt()
            q.enable_notification()
    assert sum(outcomes.values()) > 0
    FUZZ_TOTALS.update(outcomes)
    mem.guest.close()


def test_fuzz_reached_every_outcome():
    """The fuzz above is not vacuous: it produced good chains, bad chains and broken rings."""
    if len(FUZZ_TOTALS) < 3:
        for seed in range(40):
            test_fuzz_random_rings(seed)
    assert all(FUZZ_TOTALS[k] > 0 for k in ("chain", "chain_error", "queue_error")), FUZZ_TOTALS
