"""The sans-I/O qcow2 layer: header, extensions, L1/L2 entries, refcounts, compression,
and the fuzz entry point (which may raise only Qcow2Error)."""

from __future__ import annotations

import random
import struct
import zlib

import pytest

from devices.virtio_blk.qcow2 import format as fmt
from devices.virtio_blk.qcow2.format import Qcow2Error


def image(size=1 << 30, bits=16, **kw) -> bytearray:
    return bytearray(fmt.new_image(size, bits, **kw)[1])


def test_new_image_parses_back():
    data = image(backing_file="base.img", backing_format="raw", lazy_refcounts=True)
    h = fmt.parse_header(data, len(data))
    assert (h.version, h.cluster_size, h.size, h.l1_size) == (3, 65536, 1 << 30, 2)
    assert h.backing_file == "base.img" and h.backing_format == "raw"
    assert h.lazy_refcounts and not h.dirty
    assert h.refcount_table_offset == 65536 and h.l1_table_offset == 3 * 65536
    assert h.feature_names[(1, 0)] == "lazy refcounts"


def test_unknown_extensions_survive_a_rewrite():
    h, data = fmt.new_image(1 << 20)
    h.extensions.append((0x12345678, b"hello"))
    again = fmt.parse_header(fmt.encode_header(h) + bytes(64), len(data))
    assert again.extensions == [(0x12345678, b"hello")]


@pytest.mark.parametrize("bits", range(9, 22))
def test_cluster_sizes(bits):
    data = image(64 << 20, bits)
    h = fmt.parse_header(data, len(data))
    assert h.cluster_size == 1 << bits
    assert h.l1_size * h.l2_entries * h.cluster_size >= 64 << 20


def _patch(data: bytearray, offset: int, fmt_: str, value) -> bytearray:
    struct.pack_into(fmt_, data, offset, value)
    return data


BAD_HEADERS = [
    ("bad magic", lambda d: _patch(d, 0, ">I", 0x12345678), "not a qcow2"),
    ("version 4", lambda d: _patch(d, 4, ">I", 4), "version"),
    ("256 B clusters", lambda d: _patch(d, 20, ">I", 8), "cluster size"),
    ("4 MiB clusters", lambda d: _patch(d, 20, ">I", 22), "cluster size"),
    ("huge size", lambda d: _patch(d, 24, ">Q", 1 << 62), "too large"),
    ("L1 too small", lambda d: _patch(d, 36, ">I", 0), "too small"),
    ("L1 too large", lambda d: _patch(d, 36, ">I", 1 << 30), "too large"),
    ("L1 outside", lambda d: _patch(d, 40, ">Q", 1 << 40), "outside"),
    ("L1 unaligned", lambda d: _patch(d, 40, ">Q", 3 * 65536 + 8), "aligned"),
    ("reftable outside", lambda d: _patch(d, 48, ">Q", 1 << 40), "outside"),
    ("reftable in header", lambda d: _patch(d, 48, ">Q", 0), "outside"),
    ("reftable empty", lambda d: _patch(d, 56, ">I", 0), "refcount table"),
    ("reftable huge", lambda d: _patch(d, 56, ">I", 1 << 20), "refcount table"),
    ("overlap", lambda d: _patch(d, 40, ">Q", 65536), "overlap"),
    ("encryption", lambda d: _patch(d, 32, ">I", 1), "encrypted"),
    ("unknown incompatible", lambda d: _patch(d, 72, ">Q", 1 << 40), "unsupported incompatible"),
    ("external data file", lambda d: _patch(d, 72, ">Q", 1 << 2), "external data file"),
    ("extended L2", lambda d: _patch(d, 72, ">Q", 1 << 4), "extended L2"),
    ("compression bit without type", lambda d: _patch(d, 72, ">Q", 1 << 3), "compression"),
    ("compression type without bit", lambda d: _patch(d, 104, ">B", 1), "compression"),
    ("refcount order 7", lambda d: _patch(d, 96, ">I", 7), "refcount order"),
    ("header length odd", lambda d: _patch(d, 100, ">I", 107), "header length"),
    ("header length huge", lambda d: _patch(d, 100, ">I", 1 << 20), "header length"),
    ("snapshots outside", lambda d: _patch(_patch(d, 60, ">I", 3), 64, ">Q", 1 << 40), "outside"),
    ("too many snapshots", lambda d: _patch(_patch(d, 60, ">I", 1 << 20), 64, ">Q", 65536), "snapshots"),
    ("extension too long", lambda d: _patch(d, 116, ">I", 1 << 20), "extension"),
    ("backing name outside", lambda d: _patch(_patch(d, 8, ">Q", 65530), 16, ">I", 100), "backing"),
    ("backing name too long", lambda d: _patch(_patch(d, 8, ">Q", 512), 16, ">I", 2000), "backing"),
    ("truncated", lambda d: d[:80], "truncated"),
]


@pytest.mark.parametrize("name,mutate,match", BAD_HEADERS, ids=[b[0] for b in BAD_HEADERS])
def test_bad_headers_are_refused_by_name(name, mutate, match):
    data = mutate(image())
    with pytest.raises(Qcow2Error, match=f"(?i){match}"):
        fmt.parse_header(data, len(data))


def test_unknown_incompatible_feature_is_named_from_the_table():
    h, _ = fmt.new_image(1 << 20)
    table = struct.pack(">BB46s", 0, 9, b"warp drive")
    h.extensions.append((fmt.EXT_FEATURE_TABLE, table))
    data = bytearray(fmt.encode_header(h) + bytes(4 * 65536))
    _patch(data, 72, ">Q", 1 << 9)
    with pytest.raises(Qcow2Error, match="warp drive"):
        fmt.parse_header(data, len(data))


def test_version2_header():
    data = image()
    v2 = bytearray(data)
    _patch(v2, 4, ">I", 2)
    v2[72:112] = bytes(40)
    h = fmt.parse_header(v2, len(v2))
    assert h.version == 2 and h.refcount_order == 4 and h.header_length == 72


def test_l2_entries():
    h = fmt.parse_header(image(), 4 * 65536)
    assert fmt.decode_l2_entry(0, h) == (fmt.UNALLOCATED, 0, 0)
    assert fmt.decode_l2_entry(fmt.OFLAG_COPIED | 0x50000, h) == (fmt.NORMAL, 0x50000, 0)
    assert fmt.decode_l2_entry(fmt.OFLAG_ZERO, h) == (fmt.ZERO, 0, 0)
    assert fmt.decode_l2_entry(fmt.OFLAG_ZERO | 0x50000, h) == (fmt.ZERO, 0x50000, 0)
    e = fmt.encode_compressed(0x12345, 3000, h)
    kind, off, n = fmt.decode_l2_entry(e, h)
    assert (kind, off) == (fmt.COMPRESSED, 0x12345) and n >= 3000 and n - 3000 < 512
    for bad in (0x50000 | 2, 0x50100, 1 << 60, fmt.OFLAG_COPIED, fmt.OFLAG_COMPRESSED | fmt.OFLAG_COPIED):
        with pytest.raises(Qcow2Error):
            fmt.decode_l2_entry(bad, h)


def test_l1_and_reftable_entries_are_bounded():
    h = fmt.parse_header(image(), 4 * 65536)
    assert fmt.l1_entry_offset(0, h, 1 << 20) == 0
    assert fmt.l1_entry_offset(fmt.OFLAG_COPIED | 0x40000, h, 1 << 20) == 0x40000
    for bad in (0x40000 | 1, 0x40100, 1 << 40, 1 << 57):
        with pytest.raises(Qcow2Error):
            fmt.l1_entry_offset(bad, h, 1 << 20)
    with pytest.raises(Qcow2Error):
        fmt.reftable_entry_offset(1 << 40, h, 1 << 20)
    with pytest.raises(Qcow2Error):
        fmt.reftable_entry_offset(0x40001, h, 1 << 20)


@pytest.mark.parametrize("order", range(7))
def test_refcounts_every_order(order):
    bits = 1 << order
    block = bytearray(512)
    n = 512 * 8 // bits
    rnd = random.Random(order)
    values = [rnd.randrange(1 << bits) for _ in range(n)]
    for i, v in enumerate(values):
        fmt.refcount_set(block, i, order, v)
    assert [fmt.refcount_get(block, i, order) for i in range(n)] == values
    with pytest.raises(Qcow2Error, match="overflow"):
        fmt.refcount_set(block, 0, order, 1 << bits)
    with pytest.raises(Qcow2Error):
        fmt.refcount_set(block, 0, order, -1)


def test_deflate_and_zstd_round_trip_and_bombs():
    cs = 65536
    data = bytes(range(256)) * 256
    for ctype in (fmt.COMPRESSION_DEFLATE, fmt.COMPRESSION_ZSTD):
        packed = fmt.compress(data, ctype)
        assert fmt.decompress(packed + b"tail of the sector", ctype, cs) == data
        bomb = fmt.compress(bytes(256 << 20), ctype)       # 256 MiB of zeros
        assert len(fmt.decompress(bomb, ctype, cs)) == cs   # stops at one cluster
        with pytest.raises(Qcow2Error):
            fmt.decompress(packed[:len(packed) // 2], ctype, cs)   # short
        with pytest.raises(Qcow2Error):
            fmt.decompress(b"\xff" * 100, ctype, cs)                  # garbage
    with pytest.raises(Qcow2Error, match="decompresses to"):
        fmt.decompress(zlib.compressobj(6, zlib.DEFLATED, -15).compress(b"x" * 100) +
                       zlib.compressobj(6, zlib.DEFLATED, -15).flush(), 0, cs)


def _small_image_with_data() -> bytes:
    """A small image with an L2 table, a data cluster and a compressed cluster (bits 9)."""
    cs = 512
    h, meta = fmt.new_image(1 << 20, 9)
    data = bytearray(meta)
    l2 = len(data)
    data += bytes(cs)                      # L2 table
    host = len(data)
    data += bytes([7]) * cs                # a data cluster
    packed = fmt.compress(bytes(cs), 0)
    comp = len(data)
    data += packed + bytes(-len(packed) % cs)
    struct.pack_into(">Q", data, h.l1_table_offset, l2 | fmt.OFLAG_COPIED)
    struct.pack_into(">Q", data, l2, host | fmt.OFLAG_COPIED)
    struct.pack_into(">Q", data, l2 + 8, fmt.encode_compressed(comp, len(packed), h))
    struct.pack_into(">Q", data, l2 + 16, fmt.OFLAG_ZERO)
    return bytes(data)


def test_fuzz_entry_accepts_valid_and_raises_only_qcow2error():
    good = _small_image_with_data()
    fmt.fuzz_parse(good)
    rnd = random.Random(12)
    for _ in range(3000):
        d = bytearray(good)
        for _ in range(rnd.randrange(1, 8)):
            pos = rnd.randrange(len(d)) if rnd.random() < 0.5 else rnd.randrange(min(len(d), 128))
            d[pos] = rnd.randrange(256)
        if rnd.random() < 0.1:
            d = d[:rnd.randrange(len(d))]
        try:
            fmt.fuzz_parse(bytes(d))
        except Qcow2Error:
            pass
