"""devices.virtio_blk.model: options, config space, and request processing
over real guest memory with hand-built split rings."""

import os
import random
import struct

import pytest

from devices.virtio.dirty_log import DirtyLog
from devices.virtio.memory import DeviceMemory
from devices.virtio.queue import SplitQueue
from devices.virtio_blk import model as m
from devices.virtio_blk import request as rq
from devices.virtio_blk.backend import BlockBackend
from vmmd.guest_memory import GuestMemory

MiB = 1 << 20
F_NEXT, F_WRITE, F_INDIRECT = 1, 2, 4


class RingDriver:
    """Plays the guest driver for one split queue in guest memory."""

    def __init__(self, mem: GuestMemory, base: int, size: int = 64):
        self.mem, self.size = mem, size
        self.desc = base
        self.avail = base + 16 * size
        self.used = (self.avail + 6 + 2 * size + 3) // 4 * 4
        self.avail_idx = 0
        self.used_seen = 0
        self.free = list(range(size))
        self.chains = {}
        mem.write(base, bytes(16 * size + 6 + 2 * size + 8 + 6 + 8 * size))

    def queue(self, dmem, **kw) -> SplitQueue:
        return SplitQueue(dmem, self.size, self.desc, self.avail, self.used, **kw)

    def write_desc(self, i, addr, length, flags, nxt=0):
        self.mem.write(self.desc + 16 * i, struct.pack("<QIHH", addr, length, flags, nxt))

    def add(self, bufs) -> int:
        """bufs: [(gpa, len, writable)]; returns the head."""
        idx = [self.free.pop(0) for _ in bufs]
        for k, (gpa, length, w) in enumerate(bufs):
            last = k == len(bufs) - 1
            self.write_desc(idx[k], gpa, length, (F_WRITE if w else 0) | (0 if last else F_NEXT),
                            0 if last else idx[k + 1])
        self.chains[idx[0]] = idx
        self.publish(idx[0])
        return idx[0]

    def add_indirect(self, table_gpa, bufs) -> int:
        table = b"".join(struct.pack("<QIHH", g, n, (F_WRITE if w else 0) | (F_NEXT if k < len(bufs) - 1 else 0),
                                     k + 1 if k < len(bufs) - 1 else 0)
                         for k, (g, n, w) in enumerate(bufs))
        self.mem.write(table_gpa, table)
        head = self.free.pop(0)
        self.write_desc(head, table_gpa, len(table), F_INDIRECT)
        self.publish(head)
        return head

    def publish(self, head):
        self.mem.write_u16(self.avail + 4 + 2 * (self.avail_idx % self.size), head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.mem.write_u16(self.avail + 2, self.avail_idx)

    def used_entries(self):
        out = []
        idx = self.mem.read_u16(self.used + 2)
        while self.used_seen != idx:
            slot = self.used + 4 + 8 * (self.used_seen % self.size)
            head, length = struct.unpack("<II", self.mem.read(slot, 8))
            out.append((head, length))
            self.used_seen = (self.used_seen + 1) & 0xFFFF
            self.free.extend(self.chains.pop(head, [head]))
        return out


class Alloc:
    def __init__(self, mem, start, end):
        self.mem, self.next, self.end = mem, start, end

    def __call__(self, n, data=None, align=512):
        gpa = (self.next + align - 1) // align * align
        self.next = gpa + n
        assert self.next <= self.end
        if data is not None:
            self.mem.write(gpa, data)
        return gpa


def hdr(t, sector=0):
    return struct.pack("<IIQ", t, 0, sector)


class Rig:
    def __init__(self, tmp_path, args=(), size=8 * MiB, queues=1, dirty=False, fill=None):
        self.path = tmp_path / "disk.img"
        with open(self.path, "wb") as f:
            if fill is None:
                f.truncate(size)
            else:
                f.write(fill)
        self.opts = m.parse_options({"args": [str(self.path), *args, f"num_queues={queues}"]})
        self.backend = BlockBackend(str(self.path), read_only=self.opts.read_only,
                                    cache=self.opts.cache, serial=self.opts.serial)
        self.guest = GuestMemory.create(32 * MiB)
        self.log = DirtyLog.for_layout(self.guest.layout) if dirty else None
        self.dmem = DeviceMemory(self.guest, self.log)
        self.core = m.BlkCore(self.backend, m.limits_for(self.opts, self.backend), queues)
        self.core.memory = self.dmem
        self.drivers = [RingDriver(self.guest, 0x10000 * (q + 1)) for q in range(queues)]
        self.queues = [d.queue(self.dmem, indirect=True) for d in self.drivers]
        self.alloc = Alloc(self.guest, 1 * MiB, 32 * MiB)

    def run(self, q=0):
        return self.core.process_queue(q, self.queues[q])

    def status_buf(self):
        return self.alloc(1, b"\xee", align=1)

    def submit(self, t, sector=0, out=None, in_len=None, q=0, payload=None):
        """A request in the usual 3-descriptor layout; returns (head, data_gpa, status_gpa)."""
        h = self.alloc(16, hdr(t, sector), align=16)
        bufs = [(h, 16, False)]
        data_gpa = None
        if out is not None:
            data_gpa = self.alloc(len(out), out)
            bufs.append((data_gpa, len(out), False))
        if payload is not None:
            p = self.alloc(len(payload), payload, align=16)
            bufs.append((p, len(payload), False))
        if in_len:
            data_gpa = self.alloc(in_len)
            bufs.append((data_gpa, in_len, True))
        st = self.status_buf()
        bufs.append((st, 1, True))
        return self.drivers[q].add(bufs), data_gpa, st

    def close(self):
        self.backend.close()
        self.guest.close()


@pytest.fixture
def rig(tmp_path):
    r = Rig(tmp_path)
    yield r
    r.close()


# --- options and config ----------------------------------------------------------

def test_parse_options():
    o = m.parse_options({"args": ["/d.img"]})
    assert o == m.BlkOptions("/d.img")
    o = m.parse_options({"args": ["/d.img", "ro", "cache=direct", "serial=abc", "num_queues=4",
                                  "queue_size=128"], "other": 1})
    assert o == m.BlkOptions("/d.img", True, "direct", b"abc", 4, 128)
    assert m.parse_options({"args": ["/d", "nocache", "ser=X1"]}).cache == "direct"
    assert m.parse_options({"args": ["/d", "ser=X1"]}).serial == b"X1"


@pytest.mark.parametrize("args,msg", [
    ([], "needs a disk image path"),
    (None, "needs a disk image path"),
    ([""], "first argument"),
    (["cache=direct"], "first argument"),
    (["/d", "rw"], "unknown option 'rw'"),
    (["/d", "cache=none"], "cache='none'"),
    (["/d", "serial=" + "x" * 21], "at most 20"),
    (["/d", "serial=a\tb"], "printable"),
    (["/d", "num_queues=0"], "outside 1..64"),
    (["/d", "num_queues=x"], "not an integer"),
    (["/d", "queue_size=100"], "power of 2"),
    (["/d", "queue_size=2"], "outside"),
    (["/d", "bogus=1"], "unknown option"),
])
def test_bad_options(args, msg):
    with pytest.raises(ValueError, match=msg):
        m.parse_options({"args": args} if args is not None else {})


def test_features_and_config(tmp_path):
    r = Rig(tmp_path, queues=2)
    try:
        f = m.device_features(r.opts)
        for bit in (m.F_SEG_MAX, m.F_SIZE_MAX, m.F_BLK_SIZE, m.F_FLUSH, m.F_TOPOLOGY, m.F_MQ,
                    m.F_DISCARD, m.F_WRITE_ZEROES):
            assert f >> bit & 1, bit
        assert not f >> m.F_RO & 1 and not f >> m.F_CONFIG_WCE & 1
        cfg = m.build_config(r.opts, r.backend)
        assert len(cfg) == 60
        assert struct.unpack_from("<Q", cfg, 0)[0] == 8 * MiB // 512
        assert struct.unpack_from("<I", cfg, 8)[0] == m.SIZE_MAX
        assert struct.unpack_from("<I", cfg, 12)[0] == 254
        assert struct.unpack_from("<I", cfg, 20)[0] == 512
        assert struct.unpack_from("<H", cfg, 34)[0] == 2
        assert struct.unpack_from("<II", cfg, 36) == (m.MAX_DISCARD_SECTORS, m.MAX_DISCARD_SEG)
        assert struct.unpack_from("<II", cfg, 48) == (m.MAX_WRITE_ZEROES_SECTORS, m.MAX_WRITE_ZEROES_SEG)
        assert cfg[56] == 1
        ro = m.parse_options({"args": ["/x", "ro"]})
        f = m.device_features(ro)
        assert f >> m.F_RO & 1 and not f >> m.F_DISCARD & 1 and not f >> m.F_MQ & 1
        assert m.build_config(ro, r.backend)[36:60] == bytes(24)
    finally:
        r.close()


# --- requests -----------------------------------------------------------------------

def test_write_then_read_back_matches_the_file(rig):
    rnd = random.Random(11)
    data = rnd.randbytes(8192)
    head, _, st = rig.submit(rq.T_OUT, 40, out=data)
    assert rig.run() == 1
    assert rig.drivers[0].used_entries() == [(head, 1)]
    assert rig.guest.read(st, 1) == b"\0"
    with open(rig.path, "rb") as f:
        f.seek(40 * 512)
        assert f.read(8192) == data
    head, buf, st = rig.submit(rq.T_IN, 40, in_len=8192)
    rig.run()
    assert rig.drivers[0].used_entries() == [(head, 8193)]
    assert rig.guest.read(st, 1) == b"\0"
    assert rig.guest.read(buf, 8192) == data
    s = rig.core.stats[0]
    assert (s["reads"], s["writes"], s["read_bytes"], s["write_bytes"]) == (1, 1, 8192, 8192)


def test_random_patterns_scattered_and_any_layout(tmp_path):
    """Many random writes with random segmentation, then reads; the file and
    the guest buffers agree with a model of the disk."""
    rnd = random.Random(42)
    r = Rig(tmp_path, size=2 * MiB)
    try:
        disk = bytearray(2 * MiB)
        for round_ in range(6):
            expect = []
            for _ in range(20):
                nsec = rnd.randrange(1, 17)
                sector = rnd.randrange(0, 4096 - nsec)
                data = rnd.randbytes(nsec * 512)
                disk[sector * 512:(sector + nsec) * 512] = data
                # header + first part of the data in one descriptor, the rest split randomly
                cut = rnd.randrange(0, len(data) + 1)
                bufs = [(r.alloc(16 + cut, hdr(rq.T_OUT, sector) + data[:cut], align=8), 16 + cut, False)]
                cuts = sorted(rnd.sample(range(cut + 1, len(data)), min(rnd.randrange(0, 12), len(data) - cut - 1)))
                for a, z in zip([cut] + cuts, cuts + [len(data)]):
                    if z > a:
                        bufs.append((r.alloc(z - a, data[a:z], align=1), z - a, False))
                st = r.status_buf()
                bufs.append((st, 1, True))
                if len(bufs) > 4 and rnd.random() < 0.5:
                    expect.append((r.drivers[0].add_indirect(r.alloc(16 * len(bufs), align=16), bufs), st))
                else:
                    expect.append((r.drivers[0].add(bufs), st))
                if len(r.drivers[0].free) < 16:
                    break
            r.run()
            used = dict(r.drivers[0].used_entries())
            for head, st in expect:
                assert used[head] == 1
                assert r.guest.read(st, 1) == b"\0"
            r.alloc.next = 1 * MiB
        assert r.path.read_bytes() == bytes(disk)
        # read everything back through the device, 64 KiB at a time, IN data and status sharing a descriptor
        for sector in range(0, 4096, 128):
            h = r.alloc(16, hdr(rq.T_IN, sector), align=16)
            buf = r.alloc(65536 + 1)
            head = r.drivers[0].add([(h, 16, False), (buf, 65537, True)])
            r.run()
            assert r.drivers[0].used_entries() == [(head, 65537)]
            assert r.guest.read(buf + 65536, 1) == b"\0"
            assert r.guest.read(buf, 65536) == bytes(disk[sector * 512:sector * 512 + 65536])
            r.alloc.next = 1 * MiB
    finally:
        r.close()


def test_flush_get_id_and_unsupported(tmp_path):
    r = Rig(tmp_path, args=("serial=disk-0001",))
    try:
        h1, _, st1 = r.submit(rq.T_FLUSH)
        h2, idbuf, st2 = r.submit(rq.T_GET_ID, in_len=20)
        h3, _, st3 = r.submit(rq.T_GET_LIFETIME, in_len=8)
        h4, _, st4 = r.submit(77)
        r.run()
        used = dict(r.drivers[0].used_entries())
        assert used == {h1: 1, h2: 21, h3: 1, h4: 1}
        assert r.guest.read(idbuf, 20) == b"disk-0001" + bytes(11)
        assert [r.guest.read(s, 1)[0] for s in (st1, st2, st3, st4)] == [0, 0, rq.S_UNSUPP, rq.S_UNSUPP]
        t = r.core.totals()
        assert t["flushes"] == 1 and t["get_ids"] == 1 and t["unsupp"] == 2
    finally:
        r.close()


def test_discard_and_write_zeroes(tmp_path):
    data = random.Random(5).randbytes(4 * MiB)
    r = Rig(tmp_path, fill=data)
    try:
        blocks = os.stat(r.path).st_blocks
        payload = struct.pack("<QII", 0, 2048, 0) + struct.pack("<QII", 4096, 2048, 0)
        h1, _, st1 = r.submit(rq.T_DISCARD, payload=payload)
        h2, _, st2 = r.submit(rq.T_WRITE_ZEROES, payload=struct.pack("<QII", 3000, 16, 0))
        h3, _, st3 = r.submit(rq.T_WRITE_ZEROES, payload=struct.pack("<QII", 6200, 8, rq.FLAG_UNMAP))
        h4, _, st4 = r.submit(rq.T_DISCARD, payload=struct.pack("<QII", 8190, 8, 0))  # beyond capacity
        r.run()
        assert dict(r.drivers[0].used_entries()) == {h1: 1, h2: 1, h3: 1, h4: 1}
        assert [r.guest.read(s, 1)[0] for s in (st1, st2, st3, st4)] == [0, 0, 0, rq.S_IOERR]
        assert os.stat(r.path).st_blocks * 512 <= blocks * 512 - 2 * MiB + 65536
        got = r.path.read_bytes()
        assert len(got) == 4 * MiB
        assert got[3000 * 512:3016 * 512] == bytes(16 * 512)
        assert got[6200 * 512:6208 * 512] == bytes(8 * 512)
        assert got[3016 * 512:4096 * 512] == data[3016 * 512:4096 * 512]
    finally:
        r.close()


def test_read_only_disk(tmp_path):
    data = b"\x77" * MiB
    r = Rig(tmp_path, args=("ro",), fill=data)
    try:
        h1, _, st1 = r.submit(rq.T_OUT, 0, out=bytes(512))
        h2, _, st2 = r.submit(rq.T_DISCARD, payload=struct.pack("<QII", 0, 8, 0))
        h3, buf, st3 = r.submit(rq.T_IN, 0, in_len=512)
        r.run()
        assert dict(r.drivers[0].used_entries()) == {h1: 1, h2: 1, h3: 513}
        assert r.guest.read(st1, 1)[0] == rq.S_IOERR
        assert r.guest.read(st2, 1)[0] == rq.S_UNSUPP    # discard is not offered on ro
        assert r.guest.read(st3, 1)[0] == rq.S_OK and r.guest.read(buf, 512) == b"\x77" * 512
        assert r.path.read_bytes() == data
    finally:
        r.close()


def test_out_of_range_and_malformed_requests(rig):
    d = rig.drivers[0]
    h1, _, st1 = rig.submit(rq.T_IN, 16384 - 1, in_len=1024)   # crosses the end
    h2, _, st2 = rig.submit(rq.T_OUT, 2**64 - 1, out=bytes(512))
    h3, _, st3 = rig.submit(rq.T_IN, 0, in_len=100)            # not a sector multiple
    short = rig.alloc(8, hdr(rq.T_IN)[:8], align=16)           # short header
    st4 = rig.status_buf()
    h4 = d.add([(short, 8, False), (st4, 1, True)])
    h5 = d.add([(rig.alloc(16, hdr(rq.T_FLUSH), align=16), 16, False)])  # no status byte
    rig.run()
    assert dict(d.used_entries()) == {h1: 1, h2: 1, h3: 1, h4: 1, h5: 0}
    for st in (st1, st2, st3, st4):
        assert rig.guest.read(st, 1)[0] == rq.S_IOERR
    assert rig.core.totals()["ioerr"] == 5
    assert rig.path.read_bytes() == bytes(8 * MiB)


def test_bad_chains_are_completed_and_processing_goes_on(rig):
    d = rig.drivers[0]
    # a descriptor loop
    h = d.free.pop(0)
    d.write_desc(h, rig.alloc(16, hdr(rq.T_FLUSH), align=16), 16, F_NEXT, h)
    d.publish(h)
    # a buffer outside guest RAM
    st = rig.status_buf()
    h2 = d.add([(rig.alloc(16, hdr(rq.T_IN), align=16), 16, False), (1 << 40, 512, True), (st, 1, True)])
    # readable after writable
    h3 = d.add([(rig.status_buf(), 1, True), (rig.alloc(16, hdr(rq.T_FLUSH), align=16), 16, False)])
    # a good one after them
    h4, _, st4 = rig.submit(rq.T_FLUSH)
    assert rig.run() == 4
    assert dict(d.used_entries()) == {h: 0, h2: 0, h3: 0, h4: 1}
    assert rig.guest.read(st4, 1) == b"\0"
    assert rig.core.totals()["bad_chains"] == 3


def test_broken_ring_raises_queue_error(rig):
    from devices.virtio.queue import QueueError
    d = rig.drivers[0]
    rig.guest.write_u16(d.avail + 2, 200)     # avail idx far ahead of a 64-entry ring
    with pytest.raises(QueueError):
        rig.run()


def test_io_error_from_the_backend(rig, monkeypatch):
    def eio(*a):
        raise OSError(5, "Input/output error")
    monkeypatch.setattr(os, "preadv", eio)
    head, buf, st = rig.submit(rq.T_IN, 0, in_len=512)
    rig.run()
    assert rig.drivers[0].used_entries() == [(head, 1)]
    assert rig.guest.read(st, 1)[0] == rq.S_IOERR


def test_unexpected_exception_is_contained(rig, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("bug")
    monkeypatch.setattr(rig.backend, "flush", boom)
    head, _, st = rig.submit(rq.T_FLUSH)
    h2, _, st2 = rig.submit(rq.T_GET_ID, in_len=20)
    rig.run()
    assert dict(rig.drivers[0].used_entries()) == {head: 1, h2: 21}
    assert rig.guest.read(st, 1)[0] == rq.S_IOERR
    assert rig.guest.read(st2, 1)[0] == rq.S_OK


def test_writethrough_flushes_every_write(rig, monkeypatch):
    synced = []
    monkeypatch.setattr(os, "fdatasync", lambda fd: synced.append(fd))
    rig.submit(rq.T_OUT, 0, out=bytes(512))
    rig.run()
    assert synced == []
    rig.core.writethrough = True
    rig.submit(rq.T_OUT, 0, out=bytes(512))
    rig.run()
    assert len(synced) == 1


def test_multi_queue(tmp_path):
    rnd = random.Random(3)
    r = Rig(tmp_path, queues=4)
    try:
        expected = {}
        for q in range(4):
            for k in range(8):
                sector = (q * 8 + k) * 16
                data = rnd.randbytes(16 * 512)
                expected[sector] = data
                r.submit(rq.T_OUT, sector, out=data, q=q)
        for q in range(4):
            assert r.run(q) == 8
            assert len(r.drivers[q].used_entries()) == 8
        disk = r.path.read_bytes()
        for sector, data in expected.items():
            assert disk[sector * 512:sector * 512 + len(data)] == data
        for q in range(4):
            assert r.core.stats[q]["writes"] == 8
        # read back on other queues than the writes
        for q in range(4):
            sector = ((3 - q) * 8) * 16
            head, buf, st = r.submit(rq.T_IN, sector, in_len=16 * 512, q=q)
            r.run(q)
            assert r.drivers[q].used_entries() == [(head, 16 * 512 + 1)]
            assert r.guest.read(buf, 16 * 512) == expected[sector]
    finally:
        r.close()


def test_device_writes_are_in_the_dirty_log(tmp_path):
    r = Rig(tmp_path, dirty=True, fill=b"\x42" * MiB)
    try:
        head, buf, st = r.submit(rq.T_IN, 0, in_len=3 * 4096)
        r.run()
        pages = set(int(p) for p in r.log.harvest(r.log.flip()))
        want = {buf >> 12, (buf >> 12) + 1, (buf >> 12) + 2, st >> 12,
                (r.drivers[0].used + 4) >> 12, (r.drivers[0].used + 2) >> 12}
        assert want <= pages
    finally:
        r.close()


def test_fuzzed_rings_never_escape(tmp_path):
    """Random descriptor tables and headers: every request ends in a used
    element or a QueueError; the image is only written inside its capacity."""
    from devices.virtio.queue import QueueError
    rnd = random.Random(99)
    r = Rig(tmp_path, size=MiB)
    try:
        d = r.drivers[0]
        for it in range(300):
            n = rnd.randrange(1, 6)
            bufs = []
            for k in range(n):
                length = rnd.choice([0, 1, 8, 16, 17, 511, 512, 1024, rnd.randrange(1, 5000)])
                gpa = rnd.choice([r.alloc(max(length, 1), rnd.randbytes(max(length, 1)), align=1),
                                  rnd.randrange(0, 1 << 36)])
                bufs.append((gpa, length, rnd.random() < 0.5))
            if rnd.random() < 0.6:   # make the header plausible
                g = r.alloc(16, hdr(rnd.choice([0, 1, 4, 8, 11, 13, 99]),
                                    rnd.choice([0, 100, 2047, 2048, 2**64 - 1])), align=16)
                bufs[0] = (g, 16, False)
            d.add(bufs)
            try:
                r.run()
            except QueueError:
                pytest.fail("a well-formed ring was declared broken")
            assert len(d.used_entries()) == 1
            r.alloc.next = 1 * MiB
        assert os.path.getsize(r.path) == MiB
    finally:
        r.close()


# --- the device through its PCI function (bus-only: MMIO kicks, INTx) ---------------

from bus.types import IoSpace  # noqa: E402
from devices.virtio import features as vf  # noqa: E402
from devices.virtio import pci_transport as pt  # noqa: E402

BAR = 0xC000_0000


class FakeHost:
    def __init__(self, memory):
        self.memory = memory
        self.fds = {}
        self.irqs = []
        self.checkpoints = 0

    def set_irq_line(self, gsi, level):
        self.irqs.append((gsi, level))

    def send_msi(self, address, data):
        raise AssertionError("no MSI expected")

    def checkpoint(self):
        self.checkpoints += 1

    def request(self, what, args=None):
        raise AssertionError(f"unexpected request {what}")


class PciDriver:
    """Just enough of a virtio-pci driver: BAR setup, negotiation, queues."""

    def __init__(self, dev):
        self.dev = dev
        dev.io_write(IoSpace.PCI_CFG, 0x10, 4, BAR)
        dev.io_write(IoSpace.PCI_CFG, 0x14, 4, 0)
        dev.io_write(IoSpace.PCI_CFG, 0x04, 2, pt.CMD_MEMORY | pt.CMD_MASTER)

    def r(self, off, size):
        return self.dev.io_read(IoSpace.MMIO, BAR + off, size)

    def w(self, off, size, value):
        self.dev.io_write(IoSpace.MMIO, BAR + off, size, value)

    def offered(self):
        self.w(pt.COMMON_DFSELECT, 4, 0)
        lo = self.r(pt.COMMON_DF, 4)
        self.w(pt.COMMON_DFSELECT, 4, 1)
        return lo | self.r(pt.COMMON_DF, 4) << 32

    def config(self, off, size):
        return self.r(pt.DEVICE_OFFSET + off, size)

    def status(self):
        return self.r(pt.COMMON_STATUS, 1)

    def bring_up(self, drivers, features=None):
        self.w(pt.COMMON_STATUS, 1, 0)
        self.w(pt.COMMON_STATUS, 1, vf.STATUS_ACKNOWLEDGE | vf.STATUS_DRIVER)
        offered = self.offered()
        feats = offered if features is None else features & offered
        for sel in (0, 1):
            self.w(pt.COMMON_GFSELECT, 4, sel)
            self.w(pt.COMMON_GF, 4, feats >> (32 * sel) & 0xFFFFFFFF)
        st = vf.STATUS_ACKNOWLEDGE | vf.STATUS_DRIVER | vf.STATUS_FEATURES_OK
        self.w(pt.COMMON_STATUS, 1, st)
        assert self.status() & vf.STATUS_FEATURES_OK
        for q, d in enumerate(drivers):
            self.w(pt.COMMON_Q_SELECT, 2, q)
            assert self.r(pt.COMMON_Q_SIZE, 2) >= d.size
            self.w(pt.COMMON_Q_SIZE, 2, d.size)
            for off, gpa in ((pt.COMMON_Q_DESCLO, d.desc), (pt.COMMON_Q_AVAILLO, d.avail),
                             (pt.COMMON_Q_USEDLO, d.used)):
                self.w(off, 4, gpa & 0xFFFFFFFF)
                self.w(off + 4, 4, gpa >> 32)
            self.w(pt.COMMON_Q_ENABLE, 2, 1)
        self.w(pt.COMMON_STATUS, 1, st | vf.STATUS_DRIVER_OK)
        return feats

    def kick(self, q):
        self.w(pt.NOTIFY_OFFSET + pt.NOTIFY_MULTIPLIER * q, 2, q)


class DevRig:
    def __init__(self, tmp_path, args=(), size=4 * MiB, queues=1, guest=None):
        self.path = tmp_path / "disk.img"
        if not self.path.exists():
            with open(self.path, "wb") as f:
                f.truncate(size)
        self.guest = guest or GuestMemory.create(16 * MiB)
        self.host = FakeHost(self.guest)
        self.dev = m.VirtioBlkDevice(self.host, {"args": [str(self.path), *args,
                                                          f"num_queues={queues}", "queue_size=64"]})
        self.pci = PciDriver(self.dev)
        self.drivers = [RingDriver(self.guest, 0x10000 * (q + 1), 64) for q in range(queues)] \
            if guest is None else None
        self.alloc = Alloc(self.guest, 1 * MiB, 16 * MiB)

    def request(self, q, t, sector=0, out=None, in_len=0):
        h = self.alloc(16, hdr(t, sector), align=16)
        bufs = [(h, 16, False)]
        if out is not None:
            bufs.append((self.alloc(len(out), out), len(out), False))
        data = None
        if in_len:
            data = self.alloc(in_len)
            bufs.append((data, in_len, True))
        st = self.alloc(1, b"\xee", align=1)
        bufs.append((st, 1, True))
        head = self.drivers[q].add(bufs)
        return head, data, st

    def close(self):
        self.dev.close()


@pytest.fixture
def dev_rig(tmp_path):
    r = DevRig(tmp_path)
    yield r
    r.close()


def test_device_identity_features_and_config(tmp_path):
    r = DevRig(tmp_path, args=("serial=S1",), queues=2)
    try:
        assert r.dev.io_read(IoSpace.PCI_CFG, 0, 4) == (0x1040 + 2) << 16 | 0x1AF4
        offered = r.pci.offered()
        for bit in (m.F_SEG_MAX, m.F_SIZE_MAX, m.F_BLK_SIZE, m.F_FLUSH, m.F_TOPOLOGY, m.F_MQ,
                    m.F_DISCARD, m.F_WRITE_ZEROES, vf.F_VERSION_1):
            assert offered >> bit & 1, bit
        assert r.pci.config(0, 8) == 4 * MiB // 512
        assert r.pci.config(0, 4) == (4 * MiB // 512) & 0xFFFFFFFF
        assert r.pci.config(12, 4) == 62               # seg_max = queue_size - 2
        assert r.pci.config(34, 2) == 2                # num_queues
        assert r.pci.config(20, 4) == 512              # blk_size
        assert r.pci.r(pt.COMMON_NUMQ, 2) == 2
        r.pci.w(pt.DEVICE_OFFSET + 32, 1, 1)           # writeback is read-only
        assert r.pci.config(32, 1) == 0
    finally:
        r.close()


def test_device_end_to_end_over_the_transport(tmp_path):
    r = DevRig(tmp_path, queues=2)
    try:
        r.pci.bring_up(r.drivers)
        assert not r.dev.core.writethrough
        data = random.Random(8).randbytes(4096)
        head, _, st = r.request(1, rq.T_OUT, 64, out=data)
        r.pci.kick(1)
        assert r.drivers[1].used_entries() == [(head, 1)]
        assert r.guest.read(st, 1) == b"\0"
        assert r.host.irqs[-1] == (0, True)            # INTx (MSI-X not enabled)
        head, buf, st = r.request(0, rq.T_IN, 64, in_len=4096)
        r.pci.kick(0)
        assert r.drivers[0].used_entries() == [(head, 4097)]
        assert r.guest.read(buf, 4096) == data
        assert r.path.read_bytes()[64 * 512:64 * 512 + 4096] == data
        assert r.pci.r(pt.ISR_OFFSET, 1) & vf.ISR_QUEUE
        s = r.dev.stats()
        assert s["blk"]["total"]["reads"] == 1 and s["blk"]["total"]["writes"] == 1
        assert s["blk"]["per_queue"][1]["write_bytes"] == 4096
    finally:
        r.close()


def test_device_writethrough_without_flush(tmp_path, monkeypatch):
    r = DevRig(tmp_path)
    try:
        r.pci.bring_up(r.drivers, features=~(1 << m.F_FLUSH))
        assert r.dev.core.writethrough
        synced = []
        monkeypatch.setattr(os, "fdatasync", lambda fd: synced.append(fd))
        r.request(0, rq.T_OUT, 0, out=bytes(512))
        r.pci.kick(0)
        assert synced
        r.pci.w(pt.COMMON_STATUS, 1, 0)                 # reset
        assert not r.dev.core.writethrough
    finally:
        r.close()


def test_device_broken_ring_needs_reset(dev_rig):
    r = dev_rig
    r.pci.bring_up(r.drivers)
    r.guest.write_u16(r.drivers[0].avail + 2, 1000)    # avail idx far ahead
    r.pci.kick(0)
    assert r.pci.status() & vf.STATUS_NEEDS_RESET
    r.pci.w(pt.COMMON_STATUS, 1, 0)
    assert r.pci.status() == 0


def test_device_save_restore_on_a_fresh_device(tmp_path):
    r = DevRig(tmp_path, queues=2)
    try:
        r.pci.bring_up(r.drivers)
        rnd = random.Random(21)
        written = {}
        for q in (0, 1):
            for k in range(3):
                sector = (q * 3 + k) * 8
                written[sector] = rnd.randbytes(4096)
                r.request(q, rq.T_OUT, sector, out=written[sector])
            r.pci.kick(q)
            assert len(r.drivers[q].used_entries()) == 3
        # requests made available while quiesced are served by the new process
        r.dev.quiesce()
        pending = [r.request(q, rq.T_IN, 8 * q, in_len=4096) for q in (0, 1)]
        r.pci.kick(0)
        assert r.drivers[0].used_entries() == []
        state = r.dev.save_state()
        assert state["device"] == {"version": 1, "capacity": 8192, "read_only": False,
                                   "num_queues": 2, "queue_size": 64}
        r.dev.close()
        # a fresh device over the same guest memory and image
        r2 = DevRig(tmp_path, queues=2, guest=r.guest)
        r2.drivers = r.drivers
        r2.dev.restore_state(state)
        assert r2.pci.status() & vf.STATUS_DRIVER_OK
        assert r2.dev._poll_on_start
        r2.dev._poll_all()
        for q, (head, buf, st) in zip((0, 1), pending):
            assert r2.drivers[q].used_entries() == [(head, 4097)]
            assert r2.guest.read(buf, 4096) == written[8 * q]
        # and it goes on
        head, buf, st = r2.request(1, rq.T_IN, 16, in_len=4096)
        r2.pci.kick(1)
        assert r2.drivers[1].used_entries() == [(head, 4097)]
        assert r2.guest.read(buf, 4096) == written[16]
        r2.dev.close()
    finally:
        r.guest.close()


def test_device_restore_refuses_a_different_disk_shape(tmp_path):
    r = DevRig(tmp_path)
    try:
        r.pci.bring_up(r.drivers)
        state = r.dev.save_state()
        bad = {**state, "device": {**state["device"], "read_only": True}}
        with pytest.raises(ValueError, match="read_only"):
            r.dev.restore_state(bad)
        bad = {**state, "device": {**state["device"], "version": 9}}
        with pytest.raises(ValueError, match="version"):
            r.dev.restore_state(bad)
        # nothing changed: the device still works
        head, _, st = r.request(0, rq.T_FLUSH)
        r.pci.kick(0)
        assert r.drivers[0].used_entries() == [(head, 1)]
        # a resized image is accepted, with a config change interrupt
        resized = {**state, "device": {**state["device"], "capacity": 1}}
        gen = r.pci.r(pt.COMMON_CFGGENERATION, 1)
        r.dev.restore_state(resized)
        assert r.pci.r(pt.COMMON_CFGGENERATION, 1) == (gen + 1) & 0xFF
    finally:
        r.close()


def test_device_bad_options_close_the_image(tmp_path):
    guest = GuestMemory.create(4 * MiB)
    try:
        with pytest.raises(ValueError, match="unknown option"):
            m.VirtioBlkDevice(FakeHost(guest), {"args": [str(tmp_path / "x"), "bogus"]})
        with pytest.raises(ValueError, match="cannot open"):
            m.VirtioBlkDevice(FakeHost(guest), {"args": [str(tmp_path / "missing.img")]})
        img = tmp_path / "d.img"
        img.write_bytes(bytes(4096))
        before = len(os.listdir("/proc/self/fd"))
        with pytest.raises(ValueError):
            m.VirtioBlkDevice(FakeHost(None), {"args": [str(img)]})   # no guest memory
        assert len(os.listdir("/proc/self/fd")) == before
    finally:
        guest.close()
