"""qcow2 disks through a real sandboxed virtio-blk device process (tests/harness),
with qemu-img (Debian qemu-utils) as the independent oracle."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess

import pytest

from tests.conftest import requires_root

SECTOR = 512
QEMU_IMG = shutil.which("qemu-img")
requires_qemu_img = pytest.mark.skipif(QEMU_IMG is None, reason="qemu-img (qemu-utils) is not installed")


def qemu_img(*args, check=True) -> subprocess.CompletedProcess:
    return subprocess.run([QEMU_IMG, *args], capture_output=True, text=True, check=check)


def vmmd_img(*args, check=True) -> subprocess.CompletedProcess:
    import sys
    return subprocess.run([sys.executable, "-m", "vmmd.img", *args], capture_output=True,
                          text=True, check=check)


@pytest.fixture
def harness():
    from tests.harness.driver import Harness
    h = Harness(sandbox="on", mem_size=128 << 20, timeout=5.0)
    yield h
    h.close()


def _attach(h, path, slot=2, options=None, **kw):
    from tests.harness.blk import VirtioBlk, blk_spec
    dev = h.add_device(blk_spec(path, slot, options or [], bus_only=h.bus_only))
    return dev, VirtioBlk(h, slot, **kw)


def _workload(seed: int, size: int):
    """(sector, data) writes of mixed sizes and alignments, some overlapping."""
    rnd = random.Random(seed)
    out = []
    for _ in range(40):
        n = rnd.choice([1, 7, 8, 64, 128, 300])
        sector = rnd.randrange(0, size // SECTOR - n)
        out.append((sector, rnd.randbytes(n * SECTOR)))
    return out


@requires_root
@requires_qemu_img
class TestQcow2Device:
    def test_vmmd_img_create_matches_raw_through_the_driver(self, harness, tmp_path):
        size = 16 << 20
        q = str(tmp_path / "d.qcow2")
        r = str(tmp_path / "d.raw")
        vmmd_img("create", "-f", "qcow2", "-o", "cluster_size=4096", q, str(size))
        with open(r, "wb") as f:
            f.truncate(size)
        _, dq = _attach(harness, q, 2, ["format=qcow2"])
        _, dr = _attach(harness, r, 3, ["format=raw"])
        assert dq.config.capacity == size // SECTOR
        for sector, data in _workload(1, size):
            dq.write(sector, data)
            dr.write(sector, data)
        dq.write_zeroes([(4096, 64)], unmap=True)
        dr.write_zeroes([(4096, 64)], unmap=True)
        dq.discard([(8192, 256)])
        dr.write_zeroes([(8192, 256)])      # discarded qcow2 clusters read as zeros
        dq.flush()
        dr.flush()
        for sector, data in _workload(1, size)[:10]:
            assert dq.read(sector, len(data) // SECTOR) == dr.read(sector, len(data) // SECTOR)
        harness.close()
        res = qemu_img("check", q, check=False)
        assert res.returncode == 0, res.stdout + res.stderr
        res = qemu_img("compare", "-f", "qcow2", "-F", "raw", q, r, check=False)
        assert res.returncode == 0, res.stdout + res.stderr

    @pytest.mark.parametrize("cluster_size", [512, 65536, 2 << 20])
    def test_qemu_img_images_read_correctly(self, harness, tmp_path, cluster_size):
        size = 8 << 20
        raw = str(tmp_path / "src.raw")
        rnd = random.Random(cluster_size)
        data = bytearray(size)
        for _ in range(20):   # compressible and random regions, holes between
            off = rnd.randrange(0, size - 65536)
            data[off:off + 65536] = (rnd.randbytes(4096) * 16) if rnd.random() < 0.5 else rnd.randbytes(65536)
        with open(raw, "wb") as f:
            f.write(data)
        plain = str(tmp_path / "plain.qcow2")
        comp = str(tmp_path / "comp.qcow2")
        qemu_img("convert", "-f", "raw", "-O", "qcow2", "-o", f"cluster_size={cluster_size}", raw, plain)
        qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", "-o", f"cluster_size={cluster_size}",
                 raw, comp)
        _, d1 = _attach(harness, plain, 2, ["format=qcow2", "ro"])
        _, d2 = _attach(harness, comp, 3, ["format=qcow2", "ro"])
        chunk = 256
        for s in range(0, size // SECTOR, chunk):
            want = bytes(data[s * SECTOR:(s + chunk) * SECTOR])
            assert d1.read(s, chunk) == want
            assert d2.read(s, chunk) == want

    def test_zstd_compressed_and_backing_chain(self, harness, tmp_path):
        size = 4 << 20
        rnd = random.Random(7)
        base_data = rnd.randbytes(size)
        raw = str(tmp_path / "base.raw")
        with open(raw, "wb") as f:
            f.write(base_data)
        base = str(tmp_path / "base.qcow2")
        qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", "-o", "compression_type=zstd", raw, base)
        mid = str(tmp_path / "mid.qcow2")
        qemu_img("create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", mid)
        patch = rnd.randbytes(65536)
        qemu_img("create", "-f", "raw", str(tmp_path / "p.raw"), "64K")
        with open(tmp_path / "p.raw", "wb") as f:
            f.write(patch)
        subprocess.run([QEMU_IMG, "dd", "-f", "raw", "-O", "qcow2", f"if={tmp_path / 'p.raw'}",
                        f"of={tmp_path / 'unused.qcow2'}", "bs=64k", "count=1"], capture_output=True)
        top = str(tmp_path / "top.qcow2")
        qemu_img("create", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", top)
        dev, d = _attach(harness, top, 2, ["format=qcow2"])
        assert d.read(0, 64) == base_data[:64 * SECTOR]
        blk = dev.control("stats", {})["blk"]
        assert blk["format"] == "qcow2"
        assert [b["format"] for b in blk["qcow2"]["backing_chain"]] == ["qcow2", "qcow2"]
        d.write(10, b"x" * SECTOR)
        d.flush()
        expect = bytearray(base_data)
        expect[10 * SECTOR:11 * SECTOR] = b"x" * SECTOR
        assert d.read(0, 128) == bytes(expect[:128 * SECTOR])
        harness.close()
        assert qemu_img("check", top, check=False).returncode == 0
        with open(raw, "wb") as f:
            f.write(expect)
        res = qemu_img("compare", top, raw, check=False)
        assert res.returncode == 0, res.stdout
        # the backing files were opened read-only and are unchanged
        assert qemu_img("compare", base, str(tmp_path / "base.raw"), check=False).returncode == 1

    def test_detected_formats(self, harness, tmp_path):
        from tests.harness.blk import S_IOERR
        q = str(tmp_path / "d.qcow2")
        qemu_img("create", "-f", "qcow2", q, "4M")
        _, dq = _attach(harness, q, 2, [])
        assert dq.config.capacity == (4 << 20) // SECTOR          # probed: qcow2
        r = str(tmp_path / "d.raw")
        with open(r, "wb") as f:
            f.truncate(4 << 20)
        _, dr = _attach(harness, r, 3, [])
        req = dr.submit_write(0, b"QFI\xfb" + bytes(SECTOR - 4))
        assert dr.status_of(req) == S_IOERR                      # probed raw: refused
        dr.write(1, b"QFI\xfb" + bytes(SECTOR - 4))              # elsewhere: fine
        _, dr2 = _attach(harness, str(tmp_path / "d2.raw") if _mk(tmp_path / "d2.raw") else "", 4,
                         ["format=raw"])
        dr2.write(0, b"QFI\xfb" + bytes(SECTOR - 4))            # explicit raw: allowed

    def test_write_zeroes_and_discard_free_clusters(self, harness, tmp_path):
        q = str(tmp_path / "d.qcow2")
        qemu_img("create", "-f", "qcow2", q, "16M")
        _, d = _attach(harness, q, 2, ["format=qcow2"])
        for i in range(8):
            d.write(i * 2048, os.urandom(1 << 20))
        d.flush()
        used = os.stat(q).st_blocks
        d.discard([(0, (4 << 20) // SECTOR)])
        d.write_zeroes([((4 << 20) // SECTOR, (2 << 20) // SECTOR)], unmap=True)
        d.flush()
        assert d.read(0, 16) == bytes(16 * SECTOR)
        assert d.read((5 << 20) // SECTOR, 16) == bytes(16 * SECTOR)
        harness.close()
        assert os.stat(q).st_blocks < used - (5 << 20) // 512      # holes punched
        res = qemu_img("check", "--output=json", q, check=False)
        info = json.loads(res.stdout)
        assert res.returncode == 0 and info.get("leaks", 0) == 0, res.stdout
        assert qemu_img("map", "--output=json", q).stdout.count('"data": true') >= 1


def _mk(path) -> bool:
    with open(path, "wb") as f:
        f.truncate(4 << 20)
    return True


@requires_root
@requires_qemu_img
def test_switch_to_overlay_checkpoints_the_disk(harness, tmp_path):
    """The device-side primitive of disk checkpoints: after switch_overlay the
    old image holds the disk as it was, new writes go to the overlay."""
    from tests.harness.blk import VirtioBlk, blk_spec
    from vmmd.disk_overlay import create_overlay, fdpass_pair, send_fd
    base = str(tmp_path / "disk.qcow2")
    qemu_img("create", "-f", "qcow2", base, "8M")
    vmm_end, dev_end = fdpass_pair()
    dev = harness.call(harness.supervisor.add, blk_spec(base, 2, ["format=qcow2"]))
    dev.fds["fdpass"] = dev_end
    harness.run(harness.supervisor.start(dev))
    d = VirtioBlk(harness, 2)
    d.write(0, b"1" * 65536)
    with pytest.raises(Exception, match="no overlay fd"):
        dev.control("device", {"op": "switch_overlay", "args": {"path": "x"}})
    ov = str(tmp_path / "disk.snap1.qcow2")
    stale = str(tmp_path / "stale.qcow2")       # an fd left queued (a refused switch): never used
    qemu_img("create", "-f", "qcow2", stale, "4M")
    sfd = os.open(stale, os.O_RDWR)
    send_fd(vmm_end, sfd)
    os.close(sfd)
    fd = create_overlay(base, ov)
    send_fd(vmm_end, fd)
    os.close(fd)
    res = dev.control("device", {"op": "switch_overlay", "args": {"path": ov}})
    assert res["backing"] == base and res["path"] == ov
    d.write(8, b"2" * 4096)
    d.flush()
    assert d.read(0, 16) == b"1" * 4096 + b"2" * 4096
    # a second overlay may not be one with data in it
    bad = str(tmp_path / "bad.qcow2")
    qemu_img("create", "-f", "qcow2", bad, "4M")
    fd = os.open(bad, os.O_RDWR)
    send_fd(vmm_end, fd)
    os.close(fd)
    with pytest.raises(Exception, match="size"):
        dev.control("device", {"op": "switch_overlay", "args": {"path": bad}})
    assert d.read(8, 8) == b"2" * 4096          # still serving from the overlay
    harness.close()
    vmm_end.close()
    assert qemu_img("check", base, check=False).returncode == 0
    assert qemu_img("check", ov, check=False).returncode == 0
    raw = str(tmp_path / "expect.raw")
    with open(raw, "wb") as f:
        f.write(b"1" * 65536)
        f.truncate(8 << 20)
    assert qemu_img("compare", base, raw, check=False).returncode == 0     # the checkpoint
    with open(raw, "r+b") as f:
        f.seek(4096)
        f.write(b"2" * 4096)
    assert qemu_img("compare", ov, raw, check=False).returncode == 0       # the live disk
    info = json.loads(qemu_img("info", "--output=json", ov).stdout)
    assert info["backing-filename"] == "disk.qcow2"


@requires_root
@requires_qemu_img
def test_hostile_metadata_is_an_io_error_not_a_crash(harness, tmp_path):
    import struct
    from tests.harness.blk import S_IOERR, S_OK
    q = str(tmp_path / "h.qcow2")
    qemu_img("create", "-f", "qcow2", q, "4M")
    with open(tmp_path / "d.raw", "wb") as f:
        f.write(os.urandom(4 << 20))
    qemu_img("convert", "-f", "raw", "-O", "qcow2", str(tmp_path / "d.raw"), q)
    info = json.loads(qemu_img("map", "--output=json", q).stdout)
    with open(q, "r+b") as f:
        f.seek(0x28)
        l1 = struct.unpack(">Q", f.read(8))[0]
        f.seek(l1)
        l2 = struct.unpack(">Q", f.read(8))[0] & ~(1 << 63)
        f.seek(l2 + 8)                                   # guest cluster 1: past the file
        f.write(struct.pack(">Q", (1 << 63) | (1 << 40)))
    assert info
    dev, d = _attach(harness, q, 2, ["format=qcow2"])
    r = d.submit_read(128, 8)                            # 64 KiB: cluster 1
    assert d.status_of(r) == S_IOERR
    r = d.submit_write(128, b"x" * 4096)
    assert d.status_of(r) in (S_IOERR, S_OK)
    assert d.read(0, 8) == open(tmp_path / "d.raw", "rb").read(4096)   # the rest still works
    assert dev.state == "running"
    # a header the device cannot accept: it refuses to start, saying why
    bad = tmp_path / "bad.qcow2"
    data = bytearray(open(q, "rb").read(1 << 16))
    data[4:8] = struct.pack(">I", 9)
    bad.write_bytes(data)
    with pytest.raises(Exception):
        _attach(harness, str(bad), 3, ["format=qcow2"])


@requires_root
@requires_qemu_img
def test_device_killed_mid_io_loses_no_acknowledged_write(harness, tmp_path):
    """kill -9 of the device process while requests are queued: every write it
    acknowledged is in the image (metadata is written through), the restarted
    device reopens it, qemu-img check sees at most leaks."""
    import signal
    q = str(tmp_path / "k.qcow2")
    qemu_img("create", "-f", "qcow2", "-o", "cluster_size=4096", q, "32M")
    dev, d = _attach(harness, q, 2, ["format=qcow2"])
    rnd = random.Random(3)
    model = {}
    for rounds in range(3):
        reqs = []
        for i in range(48):
            sector = rnd.randrange(0, (32 << 20) // SECTOR - 64)
            data = rnd.randbytes(rnd.choice([1, 8, 24]) * SECTOR)
            reqs.append((sector, data, d.submit_write(sector, data)))
        gen = dev.generation
        d.complete([r for _, _, r in reqs[:8]])
        os.kill(dev.current.pid, signal.SIGKILL)
        res = qemu_img("check", q, check=False)
        assert res.returncode in (0, 3), res.stdout
        harness.wait_running(dev, gen + 1)
        for sector, data, r in reqs:
            if r.done and r.status == 0:           # acknowledged before the kill
                for k in range(len(data) // SECTOR):
                    model[sector + k] = data[k * SECTOR:(k + 1) * SECTOR]
            else:                                   # in flight: either content
                for k in range(len(data) // SECTOR):
                    model.pop(sector + k, None)
        for sector, data in list(model.items())[:400]:
            assert d.read(sector, 1) == data
    harness.close()
    assert vmmd_img("check", "-r", "all", q, check=False).returncode == 0
    assert qemu_img("check", q, check=False).returncode == 0
