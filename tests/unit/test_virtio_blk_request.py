"""devices.virtio_blk.request: parsing and validation of virtio-blk chains."""

import random
import struct

import pytest

from devices.virtio_blk import request as r

CAP = 2048  # sectors (1 MiB)
LIM = r.Limits(capacity=CAP, seg_max=8, size_max=1 << 20, discard=True, max_discard_sectors=1024,
               max_discard_seg=4, write_zeroes=True, max_write_zeroes_sectors=1024,
               max_write_zeroes_seg=4)


class Mem:
    """A flat fake guest memory with bounds checks and a bump allocator."""

    def __init__(self, size=1 << 20):
        self.buf = bytearray(size)
        self.next = 0x1000

    def read(self, gpa, n):
        if gpa < 0 or n < 0 or gpa + n > len(self.buf):
            raise IndexError("outside guest memory")
        return bytes(self.buf[gpa:gpa + n])

    def put(self, data, align=16):
        gpa = self.next
        self.buf[gpa:gpa + len(data)] = data
        self.next = (gpa + len(data) + align - 1) // align * align
        return (gpa, len(data))

    def alloc(self, n):
        return self.put(bytes(n))


def hdr(t, sector=0, reserved=0):
    return struct.pack("<IIQ", t, reserved, sector)


def rng(sector, num, flags=0):
    return struct.pack("<QII", sector, num, flags)


def parse(mem, readable, writable, lim=LIM):
    return r.parse_request(readable, writable, lim, mem.read)


def test_segment_helpers():
    segs = [(100, 10), (200, 0), (300, 20)]
    assert r.split_at(segs, 16) == (((100, 10), (300, 6)), ((306, 14),))
    assert r.split_at(segs, 10) == (((100, 10),), ((300, 20),))
    assert r.split_at(segs, 100) == (((100, 10), (300, 20)), ())
    assert r.split_at([], 4) == ((), ())
    assert r.split_last_byte(segs) == (((100, 10), (300, 19)), 319)
    assert r.split_last_byte([(5, 1), (9, 0)]) == ((), 5)
    assert r.split_last_byte([(5, 0)]) == ((), None)
    assert r.total_len(segs) == 30
    assert r.aligned([(4096, 512), (8192, 1024)], 512)
    assert not r.aligned([(4096, 512), (8193, 1024)], 512)
    assert not r.aligned([(4096, 100)], 512)
    assert r.in_capacity(0, CAP, CAP) and r.in_capacity(CAP, 0, CAP)
    assert not r.in_capacity(CAP, 1, CAP) and not r.in_capacity(2**64 - 1, 2, CAP)


def test_read_with_separate_descriptors():
    m = Mem()
    h = m.put(hdr(r.T_IN, 8))
    d1, d2, st = m.alloc(512), m.alloc(1024), m.alloc(1)
    req = parse(m, [h], [d1, d2, st])
    assert req.type == r.T_IN
    assert req.status_gpa == st[0]
    assert req.op == r.Read(8, (d1, d2), 1536)


def test_any_layout_header_shares_descriptor_and_status_shares_data():
    m = Mem()
    # header + 512 bytes of OUT data in one descriptor
    one = m.put(hdr(r.T_OUT, 3) + bytes(512))
    st = m.alloc(1)
    req = parse(m, [one], [st])
    assert req.op == r.Write(3, ((one[0] + 16, 512),), 512)
    # header split over two descriptors; IN data and status in one descriptor
    raw = hdr(r.T_IN, 5)
    a, b = m.put(raw[:7]), m.put(raw[7:])
    ds = m.alloc(513)
    req = parse(m, [a, b], [ds])
    assert req.op == r.Read(5, ((ds[0], 512),), 512)
    assert req.status_gpa == ds[0] + 512


def test_write_read_only_is_ioerr():
    m = Mem()
    lim = r.Limits(capacity=CAP, read_only=True, discard=True, max_discard_seg=1,
                   max_discard_sectors=8, write_zeroes=True, max_write_zeroes_seg=1,
                   max_write_zeroes_sectors=8)
    st = m.alloc(1)
    req = parse(m, [m.put(hdr(r.T_OUT, 0)), m.alloc(512)], [st], lim)
    assert req.op.status == r.S_IOERR and req.status_gpa == st[0]
    for t in (r.T_DISCARD, r.T_WRITE_ZEROES):
        assert parse(m, [m.put(hdr(t) + rng(0, 1))], [st], lim).op.status == r.S_IOERR
    # reads, flush and get_id still work
    assert isinstance(parse(m, [m.put(hdr(r.T_IN))], [m.alloc(512), st], lim).op, r.Read)
    assert parse(m, [m.put(hdr(r.T_FLUSH))], [st], lim).op is r.FLUSH


@pytest.mark.parametrize("n", [0, 1, 8, 15])
def test_short_header_is_ioerr(n):
    m = Mem()
    st = m.alloc(1)
    req = parse(m, [m.put(hdr(r.T_IN)[:n])] if n else [], [m.alloc(512), st])
    assert req.type is None
    assert req.op.status == r.S_IOERR
    assert req.status_gpa == st[0]


def test_no_writable_byte_has_no_status_location():
    m = Mem()
    req = parse(m, [m.put(hdr(r.T_FLUSH))], [])
    assert req.status_gpa is None and req.op.status == r.S_IOERR
    req = parse(m, [m.put(hdr(r.T_FLUSH))], [(0x2000, 0)])
    assert req.status_gpa is None


def test_unknown_types_are_unsupp():
    m = Mem()
    st = m.alloc(1)
    for t in (2, 3, 5, r.T_GET_LIFETIME, r.T_SECURE_ERASE, 0xFFFFFFFF):
        req = parse(m, [m.put(hdr(t))], [st])
        assert req.type == t and req.op.status == r.S_UNSUPP


def test_flush_and_get_id():
    m = Mem()
    st = m.alloc(1)
    assert parse(m, [m.put(hdr(r.T_FLUSH, 1234))], [st]).op is r.FLUSH
    idbuf = m.alloc(20)
    req = parse(m, [m.put(hdr(r.T_GET_ID))], [idbuf, st])
    assert req.op == r.GetId((idbuf,), 20)
    # a shorter id buffer gets what fits; a longer one gets 20 bytes
    small = m.alloc(8)
    assert parse(m, [m.put(hdr(r.T_GET_ID))], [small, st]).op == r.GetId((small,), 8)
    big = m.alloc(64)
    assert parse(m, [m.put(hdr(r.T_GET_ID))], [big, st]).op == r.GetId(((big[0], 20),), 20)
    assert r.encode_id(b"abc", 20) == b"abc" + bytes(17)
    assert r.encode_id(b"x" * 20, 8) == b"x" * 8


@pytest.mark.parametrize("length", [1, 511, 513, 1000])
def test_data_not_sector_multiple_is_ioerr(length):
    m = Mem()
    st = m.alloc(1)
    assert parse(m, [m.put(hdr(r.T_IN))], [m.alloc(length), st]).op.status == r.S_IOERR
    assert parse(m, [m.put(hdr(r.T_OUT)), m.alloc(length)], [st]).op.status == r.S_IOERR


def test_zero_length_data_is_allowed():
    m = Mem()
    st = m.alloc(1)
    assert parse(m, [m.put(hdr(r.T_IN, CAP))], [st]).op == r.Read(CAP, (), 0)


@pytest.mark.parametrize("sector,sectors,ok", [
    (0, CAP, True), (CAP - 1, 1, True), (CAP - 1, 2, False), (CAP, 1, False),
    (2**64 - 1, 1, False), (2**64 - 2, 4, False), (2**63, 1, False),
])
def test_capacity_bounds(sector, sectors, ok):
    m = Mem(4 << 20)
    st = m.alloc(1)
    for t in (r.T_IN, r.T_OUT):
        d = m.alloc(sectors * 512)
        req = parse(m, [m.put(hdr(t, sector))] + ([d] if t == r.T_OUT else []),
                    ([d] if t == r.T_IN else []) + [st])
        assert isinstance(req.op, r.Fail) != ok, (t, req.op)
        if not ok:
            assert req.op.status == r.S_IOERR
        m.next = 0x1000 + 16


def test_seg_max_and_size_max():
    m = Mem()
    st = m.alloc(1)
    segs = [m.alloc(512) for _ in range(9)]
    assert parse(m, [m.put(hdr(r.T_IN))], segs[:8] + [st]).op.nbytes == 8 * 512
    assert parse(m, [m.put(hdr(r.T_IN))], segs + [st]).op.status == r.S_IOERR
    lim = r.Limits(capacity=CAP, seg_max=8, size_max=1024)
    assert parse(m, [m.put(hdr(r.T_OUT)), m.alloc(1536)], [st], lim).op.status == r.S_IOERR
    assert isinstance(parse(m, [m.put(hdr(r.T_OUT)), m.alloc(1024)], [st], lim).op, r.Write)


def test_discard_and_write_zeroes():
    m = Mem()
    st = m.alloc(1)
    req = parse(m, [m.put(hdr(r.T_DISCARD)), m.put(rng(0, 8) + rng(100, 16))], [st])
    assert req.op == r.Discard(((0, 8), (100, 16)))
    req = parse(m, [m.put(hdr(r.T_WRITE_ZEROES) + rng(8, 8, r.FLAG_UNMAP) + rng(64, 1))], [st])
    assert req.op == r.WriteZeroes(((8, 8), (64, 1)), (True, False))


@pytest.mark.parametrize("t", [r.T_DISCARD, r.T_WRITE_ZEROES])
@pytest.mark.parametrize("payload,status", [
    (b"", r.S_IOERR),                                  # no segment
    (rng(0, 8)[:15], r.S_IOERR),                       # not n * 16
    (rng(0, 8) * 5, r.S_IOERR),                        # > max_seg
    (rng(0, 1025), r.S_IOERR),                         # > max sectors
    (rng(CAP - 4, 8), r.S_IOERR),                      # beyond capacity
    (rng(2**64 - 1, 2), r.S_IOERR),                    # wraps
    (rng(0, 8, 2), r.S_UNSUPP),                        # unknown flag
    (rng(0, 8) + rng(0, 8, 0x80000000), r.S_UNSUPP),   # unknown flag in a later segment
])
def test_bad_ranges(t, payload, status):
    m = Mem()
    st = m.alloc(1)
    readable = [m.put(hdr(t))] + ([m.put(payload)] if payload else [])
    assert parse(m, readable, [st]).op.status == status


def test_discard_with_unmap_is_unsupp_and_unoffered_types_are_unsupp():
    m = Mem()
    st = m.alloc(1)
    assert parse(m, [m.put(hdr(r.T_DISCARD) + rng(0, 8, r.FLAG_UNMAP))], [st]).op.status == r.S_UNSUPP
    plain = r.Limits(capacity=CAP)
    for t in (r.T_DISCARD, r.T_WRITE_ZEROES):
        assert parse(m, [m.put(hdr(t) + rng(0, 8))], [st], plain).op.status == r.S_UNSUPP


def test_range_payload_size_checked_before_reading():
    """A huge payload is refused without reading it."""
    reads = []

    def read(gpa, n):
        reads.append(n)
        return hdr(r.T_DISCARD)[:n] if gpa == 0 else bytes(n)

    req = r.parse_request([(0, 16), (4096, 16 * 100000)], [(1 << 30, 1)], LIM, read)
    assert req.op.status == r.S_IOERR
    assert reads == [16]


def test_reader_errors_propagate():
    def read(gpa, n):
        raise IndexError("outside guest RAM")

    with pytest.raises(IndexError):
        r.parse_request([(0, 16)], [(100, 1)], LIM, read)


def test_fuzz_never_raises_and_stays_in_capacity():
    rnd = random.Random(1234)
    m = Mem(1 << 16)
    m.buf[:] = rnd.randbytes(len(m.buf))
    types = [r.T_IN, r.T_OUT, r.T_FLUSH, r.T_GET_ID, r.T_DISCARD, r.T_WRITE_ZEROES, 7, 99]
    for i in range(20000):
        # random headers: a mix of known types and garbage sectors
        gpa = rnd.randrange(0, len(m.buf) - 64)
        if rnd.random() < 0.7:
            sector = rnd.choice([0, 1, CAP - 1, CAP, CAP + 1, 2**64 - 1, rnd.randrange(2**64)])
            m.buf[gpa:gpa + 16] = hdr(rnd.choice(types), sector)
        if rnd.random() < 0.5:
            p = gpa + 16
            for k in range(rnd.randrange(1, 4)):
                m.buf[p:p + 16] = rng(rnd.choice([0, CAP - 8, 2**64 - 1, rnd.randrange(2**64)]),
                                      rnd.choice([0, 1, 8, 1024, 2**32 - 1]),
                                      rnd.choice([0, 1, 2, rnd.randrange(2**32)]))
                p += 16

        def segs(n_max, start=None):
            out = []
            for _ in range(rnd.randrange(0, n_max)):
                g = rnd.randrange(0, len(m.buf) - 1) if start is None else start
                start = None
                out.append((g, rnd.randrange(0, min(4096, len(m.buf) - g))))
            return out

        readable = segs(5, gpa)
        if readable and rnd.random() < 0.5:
            readable[0] = (gpa, 16)          # the fast-path layout
        writable = segs(5)
        if writable and rnd.random() < 0.3:
            writable[-1] = (writable[-1][0], 1)
        req = r.parse_request(readable, writable, LIM, m.read)
        assert req == r.parse_general(readable, writable, LIM, m.read)
        op = req.op
        if isinstance(op, (r.Read, r.Write)):
            assert op.nbytes % 512 == 0
            assert op.sector + op.nbytes // 512 <= CAP
            assert sum(n for _, n in op.segments) == op.nbytes
            assert len(op.segments) <= LIM.seg_max
        elif isinstance(op, (r.Discard, r.WriteZeroes)):
            for s, n in op.ranges:
                assert s + n <= CAP and n <= 1024
        elif isinstance(op, r.Fail):
            assert op.status in (r.S_IOERR, r.S_UNSUPP)
        if req.status_gpa is not None:
            assert any(g <= req.status_gpa < g + n for g, n in writable)
