"""The qcow2 I/O layer (Qcow2Image over a file) and a hostile-image corpus:
every bad image gives a Qcow2Error at open or for the request touching the
bad metadata; never another exception, a hang or an access outside the file."""

from __future__ import annotations

import errno
import os
import random
import shutil
import struct
import subprocess

import pytest

from devices.virtio_blk.qcow2 import format as fmt
from devices.virtio_blk.qcow2.format import Qcow2Error
from devices.virtio_blk.qcow2.image import create_qcow2, open_image

QEMU_IMG = shutil.which("qemu-img")
needs_qemu_img = pytest.mark.skipif(QEMU_IMG is None, reason="qemu-img (qemu-utils) is not installed")


def qemu_check(path) -> int:
    return subprocess.run([QEMU_IMG, "check", str(path)], capture_output=True).returncode


def _written(tmp_path, name="a.qcow2", size=4 << 20, cluster=65536, data=True) -> str:
    path = str(tmp_path / name)
    create_qcow2(path, size, cluster_size=cluster)
    if data:
        img = open_image(path, read_only=False)
        img.write(0, b"A" * cluster * 2)
        img.write(size - cluster, b"B" * cluster)
        img.close()
    return path


def _hdr(path):
    with open(path, "rb") as f:
        head = f.read(65536)
    return fmt.parse_header(head, os.path.getsize(path))


def _poke(path, offset, fmt_, value):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(fmt_, value))


def _l2_of(path) -> int:
    h = _hdr(path)
    with open(path, "rb") as f:
        f.seek(h.l1_table_offset)
        return struct.unpack(">Q", f.read(8))[0] & fmt.L1E_OFFSET_MASK


# --- behaviour ------------------------------------------------------------------------------

@needs_qemu_img
@pytest.mark.parametrize("cluster", [512, 4096, 65536, 2 << 20])
def test_random_io_matches_a_model_and_passes_qemu_check(tmp_path, cluster):
    size = 8 << 20
    path = str(tmp_path / "a.qcow2")
    create_qcow2(path, size, cluster_size=cluster)
    model = bytearray(size)
    rnd = random.Random(cluster)
    img = open_image(path, read_only=False)
    for i in range(150):
        off = rnd.randrange(size - 70000)
        n = rnd.randrange(1, 70000)
        op = rnd.random()
        if op < 0.6:
            data = rnd.randbytes(n)
            img.write(off, data)
            model[off:off + n] = data
        elif op < 0.75:
            img.write_zeroes(off, n)
            model[off:off + n] = bytes(n)
        elif op < 0.9:
            img.discard(off, n)   # whole clusters inside the range read as zeros
            a = -(-off // cluster) * cluster
            b = (off + n) // cluster * cluster
            if b > a:
                model[a:b] = bytes(b - a)
        else:
            img.flush()
        if i % 25 == 0:
            assert img.read(0, size) == bytes(model)
    img.close()
    assert qemu_check(path) == 0
    img = open_image(path)
    assert img.read(0, size) == bytes(model)
    img.close()


@needs_qemu_img
def test_refcount_table_grows(tmp_path):
    # 512-byte clusters: one refcount table cluster covers 8 MiB of file
    path = str(tmp_path / "g.qcow2")
    create_qcow2(path, 64 << 20, cluster_size=512)
    img = open_image(path, read_only=False)
    data = os.urandom(1 << 20)
    for i in range(24):
        img.write(i << 20, data)
    img.close()
    assert _hdr(path).refcount_table_clusters > 1
    assert qemu_check(path) == 0
    img = open_image(path)
    assert img.read(23 << 20, 1 << 20) == data
    img.close()


@needs_qemu_img
def test_lazy_refcounts_dirty_bit_and_repair_on_open(tmp_path):
    path = str(tmp_path / "l.qcow2")
    create_qcow2(path, 8 << 20, lazy_refcounts=True)
    img = open_image(path, read_only=False)
    img.write(0, os.urandom(1 << 20))
    assert _hdr(path).dirty                      # marked before the first refcount change
    os.close(os.dup(img.fd))
    # simulate a crash: drop the object without close(), refcounts never written
    fd, img.fd = img.fd, -1
    os.close(fd)
    assert _hdr(path).dirty
    img = open_image(path, read_only=False)      # repairs
    assert not _hdr(path).dirty
    img.close()
    assert qemu_check(path) == 0


@needs_qemu_img
def test_check_finds_and_repairs_leaks(tmp_path):
    path = _written(tmp_path)
    h = _hdr(path)
    # leak: one more cluster at the end of the file, counted but unused
    n = os.path.getsize(path) // h.cluster_size
    os.truncate(path, (n + 1) * h.cluster_size)
    with open(path, "r+b") as f:
        f.seek(h.refcount_table_offset)
        rb = struct.unpack(">Q", f.read(8))[0]
        f.seek(rb + 2 * n)
        f.write(struct.pack(">H", 1))
    img = open_image(path)
    res = img.check()
    img.close()
    assert res["leaks"] == 1 and res["corruptions"] == 0
    assert qemu_check(path) == 3
    img = open_image(path, read_only=False)
    res = img.check("leaks")
    img.close()
    assert res["leaks"] == 0 and res["leaks-fixed"] == 1
    assert qemu_check(path) == 0


def test_backing_chain_reads_and_writes(tmp_path):
    base = str(tmp_path / "base.raw")
    with open(base, "wb") as f:
        f.write(b"b" * (1 << 20))
    top = str(tmp_path / "top.qcow2")
    create_qcow2(top, 2 << 20, backing_file="base.raw", backing_format="raw")
    img = open_image(top, read_only=False)
    assert img.read(0, 4) == b"bbbb"
    assert img.read((1 << 20) + 10, 4) == bytes(4)      # past the backing file: zeros
    img.write(1000, b"T")
    assert img.read(999, 3) == b"bTb"
    img.discard(0, 65536)                               # must not uncover the backing data
    assert img.read(0, 4) == bytes(4)
    img.close()
    with open(base, "rb") as f:
        assert f.read() == b"b" * (1 << 20)


# --- hostile images --------------------------------------------------------------------------

def _open_or_io_fails(path):
    """Open, then read and write everything; a Qcow2Error must come somewhere."""
    try:
        img = open_image(path, read_only=False)
    except Qcow2Error as exc:
        return str(exc)
    try:
        try:
            img.read(0, img.size)
            img.write(0, b"x" * 4096)
            img.write(img.size - 4096, b"x" * 4096)
            img.write(img.size // 2, b"x" * 4096)
            img.flush()
        except Qcow2Error as exc:
            return str(exc)
    finally:
        try:
            img.close()
        except (Qcow2Error, OSError):
            pass
    return None


def _case_l1_past_eof(p):
    _poke(p, _hdr(p).l1_table_offset, ">Q", fmt.OFLAG_COPIED | (1 << 40))


def _case_l1_into_reftable(p):
    _poke(p, _hdr(p).l1_table_offset, ">Q", fmt.OFLAG_COPIED | _hdr(p).refcount_table_offset)


def _case_l2_data_past_eof(p):
    _poke(p, _l2_of(p), ">Q", fmt.OFLAG_COPIED | (1 << 40))


def _case_l2_data_into_l1(p):
    _poke(p, _l2_of(p), ">Q", fmt.OFLAG_COPIED | _hdr(p).l1_table_offset)


def _case_l2_data_into_own_l2(p):
    _poke(p, _l2_of(p), ">Q", fmt.OFLAG_COPIED | _l2_of(p))


def _case_l2_reserved_bits(p):
    _poke(p, _l2_of(p), ">Q", fmt.OFLAG_COPIED | 0x50000 | 0x100)


def _case_compressed_past_eof(p):
    h = _hdr(p)
    _poke(p, _l2_of(p), ">Q", fmt.encode_compressed(1 << 30, 4000, h))


def _case_compressed_garbage(p):
    h = _hdr(p)
    _poke(p, _l2_of(p), ">Q", fmt.encode_compressed(h.l1_table_offset + 3, 4000, h))


def _case_reftable_past_eof(p):
    _poke(p, _hdr(p).refcount_table_offset, ">Q", 1 << 40)


def _case_refblock_is_l1(p):
    _poke(p, _hdr(p).refcount_table_offset, ">Q", _hdr(p).l1_table_offset)


def _case_truncated_l1(p):
    os.truncate(p, _hdr(p).l1_table_offset + 4)


def _case_truncated_l2(p):
    os.truncate(p, _l2_of(p) + 100)


def _case_huge_size(p):
    _poke(p, 24, ">Q", 1 << 60)


def _case_dirty_and_corrupt_refcounts(p):
    h = _hdr(p)
    _poke(p, 72, ">Q", fmt.INCOMPAT_DIRTY)
    _poke(p, h.refcount_table_offset, ">Q", 1 << 40)


HOSTILE = [_case_l1_past_eof, _case_l1_into_reftable, _case_l2_data_past_eof, _case_l2_data_into_l1,
           _case_l2_data_into_own_l2, _case_l2_reserved_bits, _case_compressed_past_eof,
           _case_compressed_garbage, _case_reftable_past_eof, _case_refblock_is_l1,
           _case_truncated_l1, _case_truncated_l2, _case_huge_size,
           _case_dirty_and_corrupt_refcounts]


@pytest.mark.parametrize("case", HOSTILE, ids=[c.__name__[6:] for c in HOSTILE])
def test_hostile_image(tmp_path, case):
    path = _written(tmp_path)
    size_before = os.path.getsize(path)
    case(path)
    msg = _open_or_io_fails(path)
    assert msg, f"{case.__name__}: no error"
    assert os.path.getsize(path) <= max(size_before, os.path.getsize(path)) + (4 << 20)


def test_backing_loops_and_depth(tmp_path):
    a, b = str(tmp_path / "a.qcow2"), str(tmp_path / "b.qcow2")
    create_qcow2(a, 1 << 20, backing_file="b.qcow2", backing_format="qcow2")
    create_qcow2(b, 1 << 20, backing_file="a.qcow2", backing_format="qcow2")
    with pytest.raises(Qcow2Error, match="loops"):
        open_image(a)
    s = str(tmp_path / "self.qcow2")
    create_qcow2(s, 1 << 20, backing_file="self.qcow2")
    with pytest.raises(Qcow2Error, match="loops"):
        open_image(s)
    prev = None
    for i in range(20):
        p = str(tmp_path / f"c{i}.qcow2")
        create_qcow2(p, 1 << 20, backing_file=prev, backing_format="qcow2" if prev else None)
        prev = f"c{i}.qcow2"
    with pytest.raises(Qcow2Error, match="longer than"):
        open_image(str(tmp_path / "c19.qcow2"))
    missing = str(tmp_path / "m.qcow2")
    create_qcow2(missing, 1 << 20, backing_file="nope.raw", backing_format="raw")
    with pytest.raises(Qcow2Error, match="cannot open"):
        open_image(missing)


def test_decompression_bomb_is_bounded(tmp_path):
    path = str(tmp_path / "bomb.qcow2")
    create_qcow2(path, 1 << 20, cluster_size=65536)
    img = open_image(path, read_only=False)
    img.write(0, b"z" * 65536)
    img.close()
    bomb = fmt.compress(bytes(64 << 20), 0)            # 64 MiB of zeros in ~64 KiB
    h = _hdr(path)
    at = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.seek(at)
        f.write(bomb)
    _poke(path, _l2_of(path), ">Q", fmt.encode_compressed(at, min(len(bomb), 2 * 65536 - 512), h))
    img = open_image(path)
    assert img.read(0, 65536) == bytes(65536)         # one cluster's worth, no more
    img.close()


@needs_qemu_img
def test_refcounts_at_their_maximum(tmp_path):
    """Every refcount of the first block at 65535: reported as leaks, no
    overflow on the way, repaired; compressed packing past the maximum fails."""
    path = _written(tmp_path)
    h = _hdr(path)
    with open(path, "r+b") as f:
        f.seek(h.refcount_table_offset)
        rb = struct.unpack(">Q", f.read(8))[0]
        f.seek(rb)
        f.write(b"\xff" * h.cluster_size)
    img = open_image(path, read_only=False)
    img.write(1 << 20, b"y" * 4096)            # allocates past the end of the file
    res = img.check()
    assert res["leaks"] > 0 and res["corruptions"] == 0
    assert img.check("all")["leaks"] == 0
    img._cpack = [0x10000, 0]                  # pack into a cluster counted 65535 times
    img._refcount_set(0x10000, 65535)
    with pytest.raises(Qcow2Error, match="overflow"):
        img.write_compressed(2 << 20, bytes(65536))
    img._refcount_set(0x10000, 1)
    img.close()


@needs_qemu_img
@pytest.mark.parametrize("opts,writable", [
    ("compat=0.10", False), ("refcount_bits=1", False), ("refcount_bits=64", False),
    ("lazy_refcounts=on", True), ("cluster_size=512", True), ("cluster_size=2M", True),
    ("compression_type=zstd", True)])
def test_qemu_img_variants(tmp_path, opts, writable):
    raw = tmp_path / "s.raw"
    data = os.urandom(1 << 20) + bytes(1 << 20) + os.urandom(1 << 20)
    raw.write_bytes(data)
    q = str(tmp_path / "t.qcow2")
    subprocess.run([QEMU_IMG, "convert", "-O", "qcow2", "-o", opts, str(raw), q], check=True)
    img = open_image(q)
    assert img.read(0, len(data)) == data
    img.close()
    if not writable:
        with pytest.raises(Qcow2Error, match="read-only"):
            open_image(q, read_only=False)
        return
    img = open_image(q, read_only=False)
    img.write(12345, b"w" * 100000)
    img.close()
    assert qemu_check(q) == 0


@needs_qemu_img
def test_internal_snapshots_read_only_and_checked(tmp_path):
    q = str(tmp_path / "s.qcow2")
    subprocess.run([QEMU_IMG, "create", "-f", "qcow2", q, "4M"], check=True, capture_output=True)
    img = open_image(q, read_only=False)
    img.write(0, b"a" * 200000)
    img.close()
    subprocess.run([QEMU_IMG, "snapshot", "-c", "s1", q], check=True)
    with pytest.raises(Qcow2Error, match="internal snapshots"):
        open_image(q, read_only=False)
    img = open_image(q)
    assert img.read(0, 4) == b"aaaa"
    res = img.check()
    img.close()
    assert res["leaks"] == 0 and res["corruptions"] == 0


@needs_qemu_img
@pytest.mark.parametrize("cluster", [512, 65536])
def test_writes_over_compressed_clusters(tmp_path, cluster):
    """Copy-on-write of compressed clusters (several share a host cluster):
    the data is right and the refcounts of the shared clusters drop right."""
    raw = tmp_path / "s.raw"
    rnd = random.Random(cluster)
    data = bytearray(b"".join(bytes([rnd.randrange(4)]) * 256 for _ in range(4 << 20 >> 8)))
    raw.write_bytes(data)
    q = str(tmp_path / "c.qcow2")
    subprocess.run([QEMU_IMG, "convert", "-c", "-O", "qcow2", "-o", f"cluster_size={cluster}",
                    str(raw), q], check=True)
    img = open_image(q, read_only=False)
    for _ in range(60):
        off = rnd.randrange(len(data) - 3000)
        n = rnd.randrange(1, 3000)
        kind = rnd.random()
        if kind < 0.6:
            chunk = rnd.randbytes(n)
            img.write(off, chunk)
            data[off:off + n] = chunk
        elif kind < 0.8:
            img.write_zeroes(off, n)
            data[off:off + n] = bytes(n)
        else:
            img.discard(off, n)
            a, b = -(-off // cluster) * cluster, (off + n) // cluster * cluster
            if b > a:
                data[a:b] = bytes(b - a)
    assert img.read(0, len(data)) == bytes(data)
    img.close()
    assert qemu_check(q) == 0
    assert subprocess.run([QEMU_IMG, "compare", q, str(_save(tmp_path, data))],
                          capture_output=True).returncode == 0


def _save(tmp_path, data) -> str:
    p = tmp_path / "expect.raw"
    p.write_bytes(bytes(data))
    return str(p)


# --- allocation runs, the pool, range-limited barriers -----------------------------------------

@needs_qemu_img
def test_sequential_allocation_is_contiguous_and_needs_no_fdatasync(tmp_path, monkeypatch):
    """Whole clusters written in order land contiguously, one run per request;
    the pool's refcounts are made durable by RWF_DSYNC writes, not fdatasync."""
    path = str(tmp_path / "s.qcow2")
    create_qcow2(path, 16 << 20, cluster_size=65536)
    img = open_image(path, read_only=False)
    syncs = []
    real = os.fdatasync
    monkeypatch.setattr(os, "fdatasync", lambda fd: (syncs.append(fd), real(fd)))
    data = os.urandom(12 << 20)
    for off in range(0, len(data), 128 << 10):
        img.write(off, data[off:off + (128 << 10)])
    if img._dsync:                       # else this file system refused RWF_DSYNC
        assert syncs == []
    assert img.pool_size > img.pool_base                  # claimed past the end: it grew
    ext = [e for e in img.block_status(0, img.size) if e[2] == "data"]
    assert len(ext) == 1 and ext[0][:2] == (0, len(data))
    before = len(syncs)
    img.flush()
    assert len(syncs) == before + 1
    monkeypatch.setattr(os, "fdatasync", real)
    img.close()
    assert qemu_check(path) == 0
    img = open_image(path)
    assert img.read(0, len(data)) == data
    img.close()


@needs_qemu_img
def test_without_rwf_dsync_barriers_are_fdatasync(tmp_path, monkeypatch):
    path = str(tmp_path / "f.qcow2")
    create_qcow2(path, 8 << 20, cluster_size=4096)
    img = open_image(path, read_only=False)
    real_pwritev, real_sync = os.pwritev, os.fdatasync
    calls = {"sync": 0}

    def pwritev(fd, bufs, off, flags=0):
        if flags:
            raise OSError(errno.EOPNOTSUPP, "not here")
        return real_pwritev(fd, bufs, off)

    def fdatasync(fd):
        calls["sync"] += 1
        real_sync(fd)

    monkeypatch.setattr(os, "pwritev", pwritev)
    monkeypatch.setattr(os, "fdatasync", fdatasync)
    data = os.urandom(3 << 20)
    img.write(4096, data)
    assert img._dsync == 0 and calls["sync"] >= 2          # the L2 table and the pool
    monkeypatch.undo()
    img.close()
    assert qemu_check(path) == 0
    img = open_image(path)
    assert img.read(4096, len(data)) == data
    img.close()


@needs_qemu_img
@pytest.mark.parametrize("reuse", [False, True])
def test_kill_leaks_at_most_one_small_pool(tmp_path, reuse):
    """A kill -9 leaves the pool's refcounts behind: a grown pool lies past
    the end of the file (not a leak); free clusters are pooled 1 MiB at a time."""
    path = str(tmp_path / "k.qcow2")
    create_qcow2(path, 64 << 20, cluster_size=65536)
    img = open_image(path, read_only=False)
    img.write(0, os.urandom(40 << 20))
    if reuse:
        img.discard(0, 20 << 20)
        img.close()
        img = open_image(path, read_only=False)
        img.write(41 << 20, os.urandom(4 << 20) + b"x")   # new clusters: freed ones
        assert len(img.pool) < img.pool_size == img.pool_base
    fd, img.fd = img.fd, -1          # a kill -9: no close, the pool is not given back
    os.close(fd)
    assert qemu_check(path) in (0, 3)                 # leaks at most, no corruption
    img = open_image(path)
    res = img.check()
    img.close()
    assert res["corruptions"] == 0 and res["leaks"] <= (img.pool_base if reuse else 0)


@needs_qemu_img
def test_whole_cluster_runs_over_every_kind_of_cluster(tmp_path):
    """1 KiB clusters (128 per L2 table): long writes cross L2 tables and
    replace zero, compressed, allocated, unallocated-over-backing clusters."""
    cluster, size = 1024, 1 << 20
    rnd = random.Random(7)
    base = tmp_path / "base.raw"
    base_data = bytes(rnd.randrange(4) for _ in range(size))
    base.write_bytes(base_data)
    q = str(tmp_path / "mid.qcow2")
    subprocess.run([QEMU_IMG, "convert", "-c", "-O", "qcow2", "-o", f"cluster_size={cluster}",
                    str(base), q], check=True)      # compressed clusters
    top = str(tmp_path / "top.qcow2")
    create_qcow2(top, size, cluster_size=cluster, backing_file="base.raw", backing_format="raw")
    model = bytearray(base_data)
    for path in (q, top):
        img = open_image(path, read_only=False)
        img.write(10 * cluster, b"x" * 5 * cluster)               # allocated
        model[10 * cluster:15 * cluster] = b"x" * 5 * cluster
        img.write_zeroes(20 * cluster, 8 * cluster)              # zero clusters
        model[20 * cluster:28 * cluster] = bytes(8 * cluster)
        for i in range(40):
            off = rnd.randrange(size - 300 * cluster)
            n = rnd.randrange(1, 300 * cluster)
            if i % 2:                   # whole clusters only (the never-written fast path)
                off, n = off - off % cluster, max(cluster, n - n % cluster)
            data = rnd.randbytes(n)
            img.write(off, data)
            model[off:off + n] = data
        assert img.read(0, size) == bytes(model)
        img.close()
        assert qemu_check(path) == 0
        img = open_image(path)
        assert img.read(0, size) == bytes(model)
        img.close()
        model[:] = base_data
