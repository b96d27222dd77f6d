"""`vmmd-guest build`: fetches Debian packages (~30 MB on the first run, then
cached in $VMMD_GUEST_CACHE or ~/.cache/vmmd/guest) and builds the guest."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from vmmd.boot import bzimage
from vmmd.boot.elf import parse_elf
from vmmd.guest import build as guest_build

ROOT = Path(__file__).resolve().parent.parent.parent

pytestmark = [
    pytest.mark.skipif(shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None,
                       reason="needs apt-get and dpkg-deb (a Debian-based host) to fetch "
                              "the kernel and busybox packages"),
]


def run_tool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vmmd.guest.build", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)


def read_newc_names(data: bytes) -> dict[str, bytes]:
    out, pos = {}, 0
    while True:
        assert data[pos:pos + 6] == b"070701"
        f = [int(data[pos + 6 + 8 * i:pos + 14 + 8 * i], 16) for i in range(13)]
        name = data[pos + 110:pos + 110 + f[11] - 1].decode()
        pos += 110 + f[11]
        pos += -pos % 4
        body = data[pos:pos + f[6]]
        pos += f[6] + (-f[6] % 4)
        if name == "TRAILER!!!":
            return out
        out[name] = body


@pytest.fixture(scope="module")
def built() -> dict:
    cache = str(guest_build.default_cache_dir())
    r = run_tool("build", "--json", "--cache", cache)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_build_outputs(built):
    for key in ("kernel", "bzimage", "initrd", "disk", "version"):
        assert built.get(key), key
    for key in ("kernel", "bzimage", "initrd", "disk"):
        assert Path(built[key]).stat().st_size > 0
    assert built["version"].endswith("-cloud-amd64")

    vmlinux = Path(built["kernel"]).read_bytes()
    image = parse_elf(vmlinux)
    assert image.entry_physical() >= 0x100000
    hdr = bzimage.parse_setup_header(Path(built["bzimage"]).read_bytes())
    assert hdr.kernel_64

    files = read_newc_names(Path(built["initrd"]).read_bytes())
    init = files["init"].decode()
    assert guest_build.INIT_STARTED in init and guest_build.READY in init
    assert files["bin/busybox"][:4] == b"\x7fELF"
    assert files["bin/sh"] == b"busybox"
    assert any(n.endswith("/virtio_blk.ko") for n in files)

    with open(built["disk"], "rb") as f:
        f.seek(1024 + 56)
        assert f.read(2) == b"\x53\xef"  # ext4 superblock magic
    assert os.path.getsize(built["disk"]) == guest_build.DISK_SIZE


def test_path_matches_build_and_second_build_is_cached(built):
    r = run_tool("path", "--json", "--cache", str(Path(built["kernel"]).parent))
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["kernel"] == built["kernel"]
    before = Path(built["kernel"]).stat().st_mtime_ns
    r = run_tool("build", "--json", "--cache", str(Path(built["kernel"]).parent))
    assert r.returncode == 0, r.stderr
    assert Path(built["kernel"]).stat().st_mtime_ns == before  # not rebuilt


def test_path_without_build_fails(tmp_path):
    r = run_tool("path", "--cache", str(tmp_path / "empty"))
    assert r.returncode == 1
    assert "vmmd-guest build" in r.stderr
