"""The newc cpio writer, read back with a tiny reader (and cpio -t if present)."""

from __future__ import annotations

import shutil
import stat
import subprocess

import pytest

from vmmd.guest.initramfs import Initramfs


def read_newc(data: bytes) -> list[dict]:
    entries, pos = [], 0
    while True:
        assert data[pos:pos + 6] == b"070701", f"bad magic at {pos}"
        f = [int(data[pos + 6 + 8 * i:pos + 14 + 8 * i], 16) for i in range(13)]
        namesize, filesize = f[11], f[6]
        name = data[pos + 110:pos + 110 + namesize]
        assert name.endswith(b"\0")
        name = name[:-1].decode()
        pos += 110 + namesize
        pos += -pos % 4
        body = data[pos:pos + filesize]
        pos += filesize
        pos += -pos % 4
        if name == "TRAILER!!!":
            assert pos == len(data)
            return entries
        entries.append({"name": name, "ino": f[0], "mode": f[1], "data": body,
                        "rdev": (f[9], f[10]), "mtime": f[5]})


def sample() -> Initramfs:
    fs = Initramfs()
    fs.add_file("bin/busybox", b"\x7fELF" + bytes(13), mode=0o755)
    fs.add_symlink("bin/sh", "busybox")
    fs.add_device("dev/console", "c", 5, 1)
    fs.add_device("/dev/ttyS0", "c", 4, 64)
    fs.add_file("init", b"#!/bin/sh\necho hi\n", mode=0o755)
    fs.add_file("lib/modules/6.1/kernel/drivers/virtio/virtio.ko", b"abc")
    fs.add_dir("proc")
    return fs


def test_roundtrip():
    data = sample().to_bytes()
    assert len(data) % 4 == 0
    entries = read_newc(data)
    by_name = {e["name"]: e for e in entries}
    names = [e["name"] for e in entries]
    # parents come before children
    for n in names:
        parent = n.rpartition("/")[0]
        if parent:
            assert names.index(parent) < names.index(n)
    assert stat.S_ISDIR(by_name["lib/modules/6.1/kernel"]["mode"])
    bb = by_name["bin/busybox"]
    assert stat.S_ISREG(bb["mode"]) and bb["mode"] & 0o777 == 0o755
    assert bb["data"] == b"\x7fELF" + bytes(13)
    sh = by_name["bin/sh"]
    assert stat.S_ISLNK(sh["mode"]) and sh["data"] == b"busybox"
    con = by_name["dev/console"]
    assert stat.S_ISCHR(con["mode"]) and con["rdev"] == (5, 1)
    assert by_name["dev/ttyS0"]["rdev"] == (4, 64)
    assert by_name["init"]["data"].startswith(b"#!/bin/sh")
    assert len({e["ino"] for e in entries}) == len(entries)
    assert all(e["mtime"] == 0 for e in entries)


def test_deterministic():
    assert sample().to_bytes() == sample().to_bytes()


def test_bad_paths_and_duplicates():
    fs = Initramfs()
    fs.add_file("a", b"")
    with pytest.raises(ValueError):
        fs.add_file("a", b"x")
    with pytest.raises(ValueError):
        fs.add_file("../etc/passwd", b"x")
    with pytest.raises(ValueError):
        fs.add_device("dev/x", "p", 1, 1)


@pytest.mark.skipif(shutil.which("cpio") is None, reason="cpio(1) not installed")
def test_cpio_tool_lists_it(tmp_path):
    r = subprocess.run(["cpio", "-it", "--quiet"], input=sample().to_bytes(),
                       capture_output=True, check=True)
    listed = r.stdout.decode().split()
    assert "init" in listed and "dev/console" in listed and "bin/sh" in listed


def test_guest_initramfs_modules_in_dependency_order(tmp_path):
    import lzma

    from vmmd.guest import build as gb

    kdir = tmp_path / "kernel"
    (kdir / "drivers/virtio").mkdir(parents=True)
    (kdir / "drivers/block").mkdir(parents=True)
    (kdir / "drivers/virtio/virtio_ring.ko").write_bytes(b"\0depends=\0name=virtio_ring\0")
    (kdir / "drivers/virtio/virtio.ko.xz").write_bytes(
        lzma.compress(b"\0depends=virtio_ring\0", format=lzma.FORMAT_XZ))
    (kdir / "drivers/block/virtio_blk.ko").write_bytes(b"\0depends=virtio,virtio_ring\0")
    (kdir / "drivers/virtio/unrelated.ko").write_bytes(b"\0depends=\0")
    mods = gb.select_modules(tmp_path, wanted=("virtio_blk", "not_there"))
    assert [m[0] for m in mods] == ["kernel/drivers/virtio/virtio_ring.ko",
                                   "kernel/drivers/virtio/virtio.ko",
                                   "kernel/drivers/block/virtio_blk.ko"]
    assert mods[1][1] == b"\0depends=virtio_ring\0"  # decompressed

    data = gb.build_initramfs(b"\x7fELF-busybox", "6.1.0-test", mods)
    files = {e["name"]: e for e in read_newc(data)}
    init = files["init"]["data"].decode()
    assert init.startswith("#!/bin/sh")
    assert init.index(gb.INIT_STARTED) < init.index("insmod") < init.index(gb.READY)
    assert init.index("virtio_ring.ko") < init.index("virtio.ko") < init.index("virtio_blk.ko")
    assert files["dev/console"]["rdev"] == (5, 1) and files["dev/ttyS0"]["rdev"] == (4, 64)
    assert files["bin/cttyhack"]["data"] == b"busybox"
    dep = files["lib/modules/6.1.0-test/modules.dep"]["data"].decode()
    assert "kernel/drivers/block/virtio_blk.ko: kernel/drivers/virtio/virtio.ko " \
           "kernel/drivers/virtio/virtio_ring.ko" in dep
