"""devices.virtio_blk.backend: I/O on a raw image file."""

import mmap
import os
import random

import pytest

from devices.virtio_blk import backend as b
from devices.virtio_blk.request import S_IOERR, S_OK

MiB = 1 << 20


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "disk.img"
    with open(path, "wb") as f:
        f.truncate(4 * MiB)
    return path


def test_capacity_and_geometry(image, tmp_path):
    be = b.BlockBackend(str(image))
    try:
        assert be.capacity == 4 * MiB // 512
        assert not be.is_block and be.dio_align == 0
        assert be.logical_block_size == 512
        assert be.physical_block_size >= 512
    finally:
        be.close()
    odd = tmp_path / "odd.img"
    odd.write_bytes(bytes(1000))  # a trailing partial sector is not exposed
    be = b.BlockBackend(str(odd))
    assert be.capacity == 1
    be.close()


def test_bad_paths_and_options(tmp_path):
    with pytest.raises(ValueError, match="cannot open"):
        b.BlockBackend(str(tmp_path / "missing.img"))
    with pytest.raises(ValueError, match="neither a regular file"):
        b.BlockBackend("/dev/null")
    with pytest.raises(ValueError, match="cache mode"):
        b.BlockBackend(str(tmp_path / "x"), cache="bogus")


def test_read_write_round_trip_scattered(image):
    be = b.BlockBackend(str(image))
    rnd = random.Random(7)
    data = rnd.randbytes(3 * 512)
    out = [memoryview(data)[:100], memoryview(data)[100:1024], memoryview(data)[1024:]]
    assert be.write(10, out, len(data)) == S_OK
    buf = bytearray(len(data))
    views = [memoryview(buf)[:512], memoryview(buf)[512:513], memoryview(buf)[513:]]
    assert be.read(10, views, len(data)) == S_OK
    assert bytes(buf) == data
    with open(image, "rb") as f:
        f.seek(10 * 512)
        assert f.read(len(data)) == data
    assert be.flush() == S_OK
    be.close()


def test_many_buffers_beyond_iov_max(image):
    be = b.BlockBackend(str(image))
    data = random.Random(1).randbytes(512 * 5)
    bufs = [memoryview(data)[i:i + 2] for i in range(0, len(data), 2)]  # 1280 buffers
    assert be.write(0, bufs, len(data)) == S_OK
    got = bytearray(len(data))
    assert be.read(0, [memoryview(got)[i:i + 2] for i in range(0, len(got), 2)], len(got)) == S_OK
    assert got == data
    be.close()


def test_advance():
    bufs = [b"abc", b"de", b"fgh"]
    assert [bytes(x) for x in b._advance(bufs, 0)] == [b"abc", b"de", b"fgh"]
    assert [bytes(x) for x in b._advance(bufs, 4)] == [b"e", b"fgh"]
    assert [bytes(x) for x in b._advance(bufs, 5)] == [b"fgh"]
    assert b._advance(bufs, 8) == []


def test_read_past_end_of_a_shrunk_file_is_ioerr(image):
    be = b.BlockBackend(str(image))
    os.truncate(image, 512)
    buf = bytearray(1024)
    assert be.read(1, [buf], 1024) == S_IOERR
    assert be.errors == 1
    be.close()


def test_read_only(image):
    image.write_bytes(b"\x5a" * (4 * MiB))
    be = b.BlockBackend(str(image), read_only=True)
    assert be.write(0, [bytes(512)], 512) == S_IOERR
    assert be.discard([(0, 8)]) == S_IOERR
    assert be.write_zeroes([(0, 8)], [False]) == S_IOERR
    assert be.flush() == S_OK
    buf = bytearray(512)
    assert be.read(0, [buf], 512) == S_OK and buf == b"\x5a" * 512
    be.close()
    assert image.read_bytes()[:512] == b"\x5a" * 512


def _allocated(path):
    return os.stat(path).st_blocks * 512


def test_discard_punches_a_hole(image):
    image.write_bytes(random.Random(3).randbytes(4 * MiB))
    before = _allocated(image)
    be = b.BlockBackend(str(image))
    assert be.discard([(0, 2048), (4096, 2048)]) == S_OK  # 2 MiB
    after = _allocated(image)
    assert after <= before - 2 * MiB + 64 * 1024
    assert os.path.getsize(image) == 4 * MiB   # KEEP_SIZE
    be.close()


@pytest.mark.parametrize("unmap", [False, True])
def test_write_zeroes(image, unmap):
    data = random.Random(4).randbytes(4 * MiB)
    image.write_bytes(data)
    be = b.BlockBackend(str(image))
    assert be.write_zeroes([(8, 8), (100, 1)], [unmap, unmap]) == S_OK
    got = image.read_bytes()
    assert got[8 * 512:16 * 512] == bytes(4096)
    assert got[100 * 512:101 * 512] == bytes(512)
    assert got[:8 * 512] == data[:8 * 512]
    assert got[16 * 512:100 * 512] == data[16 * 512:100 * 512]
    assert got[101 * 512:] == data[101 * 512:]
    assert len(got) == 4 * MiB
    be.close()


def test_write_zeroes_fallback_when_fallocate_unsupported(image, monkeypatch):
    data = b"\xff" * (4 * MiB)
    image.write_bytes(data)
    be = b.BlockBackend(str(image))

    def no_fallocate(fd, mode, offset, length):
        raise OSError(95, "Operation not supported")

    monkeypatch.setattr(b, "fallocate", no_fallocate)
    assert be.write_zeroes([(1, 4000)], [True]) == S_OK   # > ZERO_CHUNK: several pwrites
    assert not be.zero_range_supported
    assert be.discard([(0, 1)]) == S_OK                    # advisory: ignored
    assert not be.discard_supported
    got = image.read_bytes()
    assert got[:512] == data[:512]
    assert got[512:4001 * 512] == bytes(4000 * 512)
    assert got[4001 * 512:] == data[4001 * 512:]
    be.close()


def test_io_error_becomes_ioerr(image, monkeypatch):
    be = b.BlockBackend(str(image))

    def eio(*a):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "preadv", eio)
    monkeypatch.setattr(os, "pwritev", eio)
    monkeypatch.setattr(os, "fdatasync", eio)
    assert be.read(0, [bytearray(512)], 512) == S_IOERR
    assert be.write(0, [bytes(512)], 512) == S_IOERR
    assert be.flush() == S_IOERR
    assert be.errors == 3
    be.close()


def test_unsafe_flush_is_a_no_op(image, monkeypatch):
    be = b.BlockBackend(str(image), cache="unsafe")
    monkeypatch.setattr(os, "fdatasync", lambda fd: (_ for _ in ()).throw(AssertionError("synced")))
    assert be.flush() == S_OK
    be.close()


def test_direct_mode(image):
    be = b.BlockBackend(str(image), cache="direct")
    try:
        if be.dfd is None:
            pytest.skip("O_DIRECT not supported on the test file system")
        assert be.dio_align in (512, 1024, 2048, 4096)
        assert be.logical_block_size >= be.dio_align
        a = be.dio_align
        # aligned buffers (an anonymous mapping is page aligned) go through O_DIRECT
        src = mmap.mmap(-1, 2 * a)
        src[:] = random.Random(5).randbytes(2 * a)
        assert be._fd_for(a, 2 * a, True) == be.dfd
        assert be.write(a // 512, [memoryview(src)], 2 * a, aligned=True) == S_OK
        dst = mmap.mmap(-1, 2 * a)
        assert be.read(a // 512, [memoryview(dst)], 2 * a, aligned=True) == S_OK
        assert dst[:] == src[:]
        # unaligned requests use the buffered fd and stay coherent
        assert be._fd_for(512 if a > 512 else 1, 512, True) == be.fd or a == 512
        odd = bytearray(b"\x11" * 512)
        assert be.write(1, [memoryview(odd)], 512, aligned=False) == S_OK
        got = mmap.mmap(-1, 2 * a)
        assert be.read(0, [memoryview(got)], 2 * a, aligned=True) == S_OK
        assert got[512:1024] == bytes(odd)
        assert be.flush() == S_OK
    finally:
        be.close()


@pytest.fixture
def loop_device(image):
    import shutil
    import subprocess
    if os.geteuid() != 0 or shutil.which("losetup") is None:
        pytest.skip("needs root and losetup")
    res = subprocess.run(["losetup", "-f", "--show", str(image)], capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"losetup: {res.stderr.strip()}")
    dev = res.stdout.strip()
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)


@pytest.mark.root
@pytest.mark.parametrize("cache", ["writeback", "direct"])
def test_block_device(loop_device, cache):
    be = b.BlockBackend(loop_device, cache=cache)
    try:
        assert be.is_block
        assert be.capacity == 4 * MiB // 512
        assert be.logical_block_size in (512, 4096)
        buf = mmap.mmap(-1, 8192)
        buf[:] = random.Random(9).randbytes(8192)
        assert be.write(8, [memoryview(buf)], 8192, aligned=True) == S_OK
        assert be.flush() == S_OK
        got = mmap.mmap(-1, 8192)
        assert be.read(8, [memoryview(got)], 8192, aligned=True) == S_OK
        assert got[:] == buf[:]
        assert be.write_zeroes([(8, 8)], [False]) == S_OK
        assert be.discard([(16, 8)]) == S_OK            # advisory
        assert be.read(8, [memoryview(got)], 8192, aligned=True) == S_OK
        assert got[:4096] == bytes(4096)
    finally:
        be.close()
