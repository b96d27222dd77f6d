"""Disk checkpoints end to end (snapshot.create {"disks": "overlay"}): real vmmd,
sandboxed virtio-blk, and the blkwriter guest (tests/guests/blkwriter.S)
writing its disk pass after pass while the snapshot is taken; qemu-img is the
independent oracle for the images.

The blkwriter's invariant ties RAM to disk: it stores (gen, i) in RAM before
it writes sector i * STRIDE of pass gen, one request at a time; so a disk
consistent with a RAM image holds gen in the sectors before i, gen - 1 after
it, and either at i.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import requires_kvm, requires_root
from tests.vmmd_process import RpcError, VmmdProcess

QEMU_IMG = shutil.which("qemu-img")
pytestmark = [requires_kvm, requires_root,
              pytest.mark.skipif(QEMU_IMG is None, reason="qemu-img (qemu-utils) is not installed")]

NSECT, STRIDE, SECTOR = 64, 16, 512      # blkwriter's defaults
VARS = 0x206000                           # QBASE + 0x6000: gen, i


@pytest.fixture(scope="module")
def blkwriter():
    if shutil.which("as") is None or shutil.which("ld") is None:
        pytest.skip("needs binutils (as, ld) to build the test guests")
    from tests.guests.build import build_guest
    return build_guest("blkwriter")


def qemu_img(*args, check=True) -> subprocess.CompletedProcess:
    r = subprocess.run([QEMU_IMG, *map(str, args)], capture_output=True, text=True)
    if check and r.returncode != 0:
        raise AssertionError(f"qemu-img {' '.join(map(str, args))}: {r.returncode}\n{r.stdout}{r.stderr}")
    return r


def start(tmp: Path, guest, *disk_slots: str) -> VmmdProcess:
    tmp.mkdir(parents=True, exist_ok=True)
    args = ["-m", "64M", "-s", "31,lpc"]
    for s in disk_slots:
        args += ["-s", s]
    return VmmdProcess(tmp, [*args, "--raw", str(guest), "--raw-mode", "long-cpl3"])


def restore(tmp: Path, snap: Path, *extra) -> VmmdProcess:
    tmp.mkdir(parents=True, exist_ok=True)
    return VmmdProcess(tmp, ["--restore", str(snap), *extra])


def shutdown(vm: VmmdProcess) -> None:
    """A clean end (the images closed by their device), then the process reaped."""
    try:
        if vm.proc.poll() is None:
            vm.rpc("vm.shutdown")
            vm.wait(60)
    finally:
        vm.stop()


def gens(image: Path, tmp: Path) -> list[int]:
    """The pass number in each sector the blkwriter writes (0: never written),
    read through qemu-img (the whole backing chain)."""
    raw = tmp / f"{image.name}.{os.getpid()}.raw"
    qemu_img("convert", "-O", "raw", image, raw)
    out = []
    with open(raw, "rb") as f:
        for i in range(NSECT):
            f.seek(i * STRIDE * SECTOR)
            words = struct.unpack("<64Q", f.read(SECTOR))
            assert len(set(words)) == 1, f"sector {i * STRIDE} is torn: {set(words)}"
            v = words[0]
            assert v == 0 or v & 0xFFFFFFFF == i * STRIDE, f"sector {i * STRIDE} holds {v:#x}"
            out.append(v >> 32)
    raw.unlink()
    return out


def position(g: list[int]) -> int:
    """Sector writes completed by a sequential writer that left `g` (asserts it could have)."""
    top = max(g)
    if top == 0:
        return 0
    k = sum(1 for x in g if x == top)
    assert g == [top] * k + [top - 1] * (NSECT - k), f"not a sequential writer's disk: {g}"
    return (top - 1) * NSECT + k


def ram_vars(snap: Path) -> tuple[int, int]:
    """(gen, i) from the snapshot's RAM image."""
    m = json.loads((snap / "manifest.json").read_text())
    for gpa, size, offset in m["memory"]["layout"]:
        if gpa <= VARS < gpa + size:
            with open(snap / "ram.img", "rb") as f:
                f.seek(offset + VARS - gpa)
                return struct.unpack("<QQ", f.read(16))
    raise AssertionError("VARS not in the layout")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def check_clean(*images: Path) -> None:
    for img in images:
        r = qemu_img("check", "--output=json", img, check=False)
        assert r.returncode == 0, f"qemu-img check {img}: {r.returncode}\n{r.stdout}{r.stderr}"


def wait_passes(vm: VmmdProcess, n: int) -> None:
    start_at = len(vm.output())
    for _ in range(n):
        vm.wait_for("GEN ", 60, start=start_at)
        start_at = vm.output().index("GEN ", start_at) + 4


def test_overlay_checkpoint_while_the_guest_writes(tmp_path, blkwriter):
    disk_dir = tmp_path / "disks"
    disk_dir.mkdir()
    disk = disk_dir / "disk.qcow2"
    qemu_img("create", "-f", "qcow2", disk, "16M")
    vm = start(tmp_path / "a", blkwriter, f"2,virtio-blk,{disk},format=qcow2")
    vm2 = None
    try:
        vm.wait_api()
        vm.wait_for("GEN 3\n", 60)
        snap = tmp_path / "snap"
        r = vm.rpc("snapshot.create", {"path": str(snap), "disks": "overlay"}, timeout=120)
        assert r["state"] == "running"
        entry = r["disks"]["2.0"]
        assert entry["mode"] == "overlay" and entry["frozen"] == str(disk)
        src_overlay = Path(entry["now"])
        assert src_overlay.parent == disk_dir and src_overlay.exists()
        frozen_sha, frozen_mtime = sha256(disk), disk.stat().st_mtime_ns

        # The manifest records the frozen image with its identity (format 2).
        m = json.loads((snap / "manifest.json").read_text())
        assert m["format_version"] == 2
        d = m["disks"]["2.0"]
        assert d["path"] == str(disk) and d["mode"] == "overlay" and d["format"] == "qcow2"
        assert d["mtime_ns"] == frozen_mtime and d["file_size"] == disk.stat().st_size
        slot = next(s for s in m["config"]["slots"] if s["slot"] == 2)
        assert slot["args"][0] == str(disk)
        # The VM now runs on the overlay (and a restarted device would open it).
        assert qemu_img("info", "--output=json", src_overlay).stdout.count('"backing-filename"') == 1

        # Saved RAM and frozen disk agree.
        gen_r, i_r = ram_vars(snap)
        snap_gens = gens(disk, tmp_path)
        p = position(snap_gens)
        assert p in ((gen_r - 1) * NSECT + i_r, (gen_r - 1) * NSECT + i_r + 1), (gen_r, i_r, snap_gens)
        assert gen_r >= 3

        # The source writes on, into its overlay only; a restarted disk device
        # opens the overlay, not the frozen image.
        wait_passes(vm, 2)
        vm.rpc("device.restart", {"id": "virtio-blk2"})
        wait_passes(vm, 2)
        assert sha256(disk) == frozen_sha and disk.stat().st_mtime_ns == frozen_mtime

        # Restore while the source still runs: a new overlay over the frozen image.
        before = set(disk_dir.iterdir())
        vm2 = restore(tmp_path / "r", snap, "--paused")
        vm2.wait_api()
        new = set(disk_dir.iterdir()) - before
        assert len(new) == 1, new
        rst_overlay = new.pop()
        assert rst_overlay.name.startswith("disk.restore-") and rst_overlay != src_overlay
        # Before the restored guest runs, its disk is exactly the snapshot's.
        assert qemu_img("compare", rst_overlay, disk).returncode == 0
        assert gens(rst_overlay, tmp_path) == snap_gens
        n = len(vm2.output())
        vm2.rpc("vm.resume")
        # The restored guest goes on with the pass it was writing (its RAM and disk agree).
        vm2.wait_for("GEN ", 60, start=n)
        out = vm2.output()[n:]
        first = int(out[out.index("GEN ") + 4:].split("\n", 1)[0])
        # (gen_r + 1 if the snapshot caught the guest printing "GEN gen_r" after the pass)
        assert first == gen_r or (first == gen_r + 1 and p == gen_r * NSECT), (first, gen_r, i_r, p)
        wait_passes(vm2, 2)
        wait_passes(vm, 1)
    finally:
        shutdown(vm)
        if vm2 is not None:
            shutdown(vm2)

    check_clean(disk, src_overlay, rst_overlay)
    assert sha256(disk) == frozen_sha                           # nobody wrote the frozen image
    assert gens(disk, tmp_path) == snap_gens
    src_p, rst_p = position(gens(src_overlay, tmp_path)), position(gens(rst_overlay, tmp_path))
    assert src_p > p and rst_p > p                               # each went on in its own overlay
    assert qemu_img("compare", src_overlay, disk, check=False).returncode == 1
    for ov in (src_overlay, rst_overlay):
        info = json.loads(qemu_img("info", "--output=json", ov).stdout)
        assert info["backing-filename"] == disk.name and info["format"] == "qcow2"


def test_changed_base_is_refused_and_a_copy_is_accepted(tmp_path, blkwriter):
    disk_dir = tmp_path / "disks"
    disk_dir.mkdir()
    disk = disk_dir / "disk.qcow2"
    ro = disk_dir / "ro.raw"
    ro.write_bytes(b"R" * (1 << 20))
    qemu_img("create", "-f", "qcow2", disk, "16M")
    vm = start(tmp_path / "a", blkwriter, f"2,virtio-blk,{disk},format=qcow2", f"3,virtio-blk,{ro},ro")
    try:
        vm.wait_api()
        vm.wait_for("GEN 1\n", 60)
        snap = tmp_path / "snap"
        r = vm.rpc("snapshot.create", {"path": str(snap), "disks": "overlay", "resume": False})
        assert r["state"] == "paused"
        assert r["disks"]["3.0"]["mode"] == "read-only" and r["disks"]["3.0"]["frozen"] == str(ro)
    finally:
        shutdown(vm)
    m = json.loads((snap / "manifest.json").read_text())
    assert m["disks"]["3.0"]["format"] == "raw"
    copy_dir = tmp_path / "copy"
    copy_dir.mkdir()
    copy = copy_dir / "frozen-copy.qcow2"
    shutil.copyfile(disk, copy)

    def refused(*extra, expect):
        files = set(disk_dir.iterdir()) | set(copy_dir.iterdir())
        r = restore(tmp_path / f"r{len(files)}-{len(extra)}", snap, *extra)
        try:
            assert r.wait(60) == 2
        finally:
            r.stop()
        err = r.stderr()
        errors = [line for line in err.splitlines() if line.startswith("vmmd: error:")]
        assert len(errors) == 1 and expect in errors[0], err
        assert set(disk_dir.iterdir()) | set(copy_dir.iterdir()) == files   # no overlay left behind

    # The frozen image touched (its mtime moves): refused.
    st = disk.stat()
    os.utime(disk, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    refused(expect="modified after the snapshot")
    os.utime(disk, ns=(st.st_atime_ns, st.st_mtime_ns))
    # Its header changed: refused (also through an override).
    hdr = bytearray(copy.read_bytes()[:4096])
    with open(copy, "r+b") as f:
        f.seek(100)
        f.write(b"\x01")
    refused("--disk", f"2={copy}", expect="header differs")
    with open(copy, "r+b") as f:
        f.write(bytes(hdr))
    # Grown: refused.
    with open(ro, "ab") as f:
        f.write(b"x" * 512)
    refused(expect="size is")
    with open(ro, "r+b") as f:
        f.truncate(1 << 20)
    os.utime(ro, ns=(m["disks"]["3.0"]["mtime_ns"],) * 2)

    # Refused later, by a device (its overlay was made by then): the overlay goes too.
    bad = tmp_path / "bad-snap"
    shutil.copytree(snap, bad)
    sec = bad / "device-31.0.json"
    doc = json.loads(sec.read_text())
    doc["state"]["version"] = 999
    data = (json.dumps(doc, sort_keys=True, indent=1) + "\n").encode()
    sec.write_bytes(data)
    bm = json.loads((bad / "manifest.json").read_text())
    for s in bm["sections"]:
        if s["file"] == sec.name:
            s["size"], s["sha256"] = len(data), hashlib.sha256(data).hexdigest()
    body = (json.dumps(bm, sort_keys=True, indent=1) + "\n").encode()
    (bad / "manifest.json").write_bytes(body)
    (bad / "manifest.json.sha256").write_text(hashlib.sha256(body).hexdigest() + "\n")
    files = set(disk_dir.iterdir())
    r = restore(tmp_path / "late", bad)
    try:
        assert r.wait(60) == 2
    finally:
        r.stop()
    assert "refused its saved state" in r.stderr() and set(disk_dir.iterdir()) == files, r.stderr()

    # A copy of the frozen image, given with --disk: accepted, the overlay made next to it.
    vm2 = restore(tmp_path / "ok", snap, "--disk", f"2={copy}")
    try:
        vm2.wait_api()
        n = len(vm2.output())
        vm2.wait_for("GEN ", 60, start=n)
        overlays = [p for p in copy_dir.iterdir() if p.name.startswith("frozen-copy.restore-")]
        assert len(overlays) == 1
    finally:
        shutdown(vm2)
    check_clean(copy, overlays[0])
    assert json.loads(qemu_img("info", "--output=json", overlays[0]).stdout)["backing-filename"] == copy.name


def test_raw_disk_and_bad_parameters_are_refused_with_nothing_changed(tmp_path, blkwriter):
    disk_dir = tmp_path / "disks"
    disk_dir.mkdir()
    disk = disk_dir / "disk.raw"
    with open(disk, "wb") as f:
        f.truncate(16 << 20)
    vm = start(tmp_path / "a", blkwriter, f"2,virtio-blk,{disk},format=raw")
    try:
        vm.wait_api()
        vm.wait_for("GEN 1\n", 60)
        files = set(disk_dir.iterdir())
        snap = tmp_path / "snap"
        with pytest.raises(RpcError, match="raw image") as exc:
            vm.rpc("snapshot.create", {"path": str(snap), "disks": "overlay"})
        assert "slot 2.0" in str(exc.value)
        for bad in ("bogus", 5, None, ""):
            with pytest.raises(RpcError) as exc:
                vm.rpc("snapshot.create", {"path": str(snap), "disks": bad})
            assert exc.value.code == -32602, exc.value.error
        assert not snap.exists() and set(disk_dir.iterdir()) == files
        info = vm.rpc("vm.info")
        assert info["state"] == "running" and info["snapshot"] is None
        wait_passes(vm, 1)                                    # still writing, never paused for long
        # vmmctl: the same refusal, exit status 1 with the message; a bad choice is a usage error.
        ctl = [sys.executable, "-m", "vmmd.ctl", "--api-socket", vm.api, "snapshot", str(snap)]
        r = subprocess.run([*ctl, "--disks", "overlay"], capture_output=True, text=True, timeout=120)
        assert r.returncode != 0 and "raw image" in r.stderr, r
        r = subprocess.run([*ctl, "--disks", "sideways"], capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and "invalid choice" in r.stderr, r
        # disks=shared (the default) still works on a raw disk.
        r = vm.rpc("snapshot.create", {"path": str(snap), "disks": "shared"})
        assert "disks" not in r
        assert json.loads((snap / "manifest.json").read_text())["format_version"] == 1
    finally:
        shutdown(vm)


@pytest.fixture
def small_fs(tmp_path):
    """A 1 MiB tmpfs (mounted here, unmounted after the test)."""
    d = tmp_path / "small"
    d.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs", str(d)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {r.stderr.strip()}")
    try:
        yield d
    finally:
        subprocess.run(["umount", "-l", str(d)], capture_output=True)


def test_an_overlay_that_cannot_be_made_fails_the_snapshot_with_nothing_changed(tmp_path, blkwriter, small_fs):
    """The second disk's file system is full: its overlay cannot be made. The
    overlays are made before the VM is paused, so the snapshot fails with no
    disk switched, no overlay left and the VM running on. (A switch refused
    by a device inside the pause: tests/unit/test_disk_checkpoints.py.)"""
    disk_dir = tmp_path / "disks"
    disk_dir.mkdir()
    d2, d3 = disk_dir / "d2.qcow2", small_fs / "d3.qcow2"
    qemu_img("create", "-f", "qcow2", d2, "16M")
    qemu_img("create", "-f", "qcow2", d3, "16M")
    filler = small_fs / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)   # the second disk's file system is full
    try:
        while os.write(fd, b"\xff" * 4096):
            pass
    except OSError:
        pass
    finally:
        os.close(fd)
    vm = start(tmp_path / "a", blkwriter, f"2,virtio-blk,{d2},format=qcow2", f"3,virtio-blk,{d3},format=qcow2")
    vm2 = None
    try:
        vm.wait_api()
        vm.wait_for("GEN 2\n", 60)
        snap = tmp_path / "snap"
        n = len(vm.output())
        with pytest.raises(RpcError) as exc:
            vm.rpc("snapshot.create", {"path": str(snap), "disks": "overlay"}, timeout=120)
        msg = str(exc.value)
        assert "slot 3.0" in msg and "cannot create the overlay" in msg, msg
        assert sorted(p.name for p in disk_dir.iterdir()) == ["d2.qcow2"]
        assert not snap.exists() and not (snap / "manifest.json.sha256").exists()
        assert sorted(p.name for p in small_fs.iterdir()) == ["d3.qcow2", "filler"]
        info = vm.rpc("vm.info")
        assert info["state"] == "running" and info["snapshot"] is None
        # The guest writes on, on its own image (the console shows no stop).
        wait_passes(vm, 2)
        assert "GEN" in vm.output()[n:]
        # With room again a checkpoint works; a second one freezes disk 2's first overlay.
        filler.unlink()
        r = vm.rpc("snapshot.create", {"path": str(tmp_path / "snap1"), "disks": "overlay"}, timeout=120)
        assert r["disks"]["2.0"]["frozen"] == str(d2) and r["disks"]["3.0"]["frozen"] == str(d3)
        ov2 = [Path(r["disks"]["2.0"]["now"])]
        wait_passes(vm, 1)
        r = vm.rpc("snapshot.create", {"path": str(snap), "disks": "overlay",   # a diff on top
                                       "diff_from": str(tmp_path / "snap1")}, timeout=120)
        assert r["type"] == "diff" and r["disks"]["2.0"]["frozen"] == str(ov2[0])
        gen_r, i_r = ram_vars(snap)
        p = position(gens(ov2[0], tmp_path))
        assert p in ((gen_r - 1) * NSECT + i_r, (gen_r - 1) * NSECT + i_r + 1)
        vm2 = restore(tmp_path / "r", snap)
        vm2.wait_api()
        wait_passes(vm2, 2)
    finally:
        shutdown(vm)
        if vm2 is not None:
            shutdown(vm2)
    images = [*disk_dir.iterdir(), *small_fs.iterdir()]
    assert len(images) == 2 + 4 + 2      # images, source overlays (two each), restore overlays
    check_clean(*images)
    rst = next(p for p in disk_dir.iterdir() if p.name.startswith("d2.snap-") and ".restore-" in p.name)
    assert position(gens(rst, tmp_path)) > p
