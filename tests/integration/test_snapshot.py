"""Snapshot and restore end to end with the assembly test guests (real KVM):
the incrementer snapshotted mid-run, vmmd killed, restored; diff chains and
merge; snapshot -> restore -> snapshot identity; every bad-input case."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import requires_kvm, requires_root
from tests.guests.checks import check_incrementer_pages
from tests.vmmd_process import RpcError, VmmdProcess

pytestmark = [requires_kvm, requires_root]

PAGE = 4096


def start(tmp, guest, *extra, memory="128M"):
    tmp.mkdir(parents=True, exist_ok=True)
    return VmmdProcess(tmp, ["-m", memory, "-s", "31,lpc", "--raw", str(guest), "--raw-mode", "long-cpl3",
                             *extra])


def restore(tmp, snap, *extra):
    tmp.mkdir(parents=True, exist_ok=True)
    return VmmdProcess(tmp, ["--restore", str(snap), *extra])


def kill(vm: VmmdProcess) -> None:
    vm.crash()


def restore_and_see_passes(tmp, snap) -> None:
    """Restore an incrementer snapshot and see it finish two more passes."""
    vm = restore(tmp, snap)
    try:
        vm.wait_api()
        vm.wait_for("BB", 60)
    finally:
        kill(vm)


def merged_ram(snap: Path, tmp: Path) -> Path:
    """The full RAM image a snapshot (or diff chain) stands for."""
    manifest = json.loads((snap / "manifest.json").read_text())
    if manifest["type"] == "full":
        return snap / "ram.img"
    out = tmp / f"merged-{snap.name}"
    run_tool("merge", str(snap), str(out))
    return out / "ram.img"


def run_tool(*args) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "vmmd.snapshot.tool", *args], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return r


def check_ram(ram: Path) -> str:
    with open(ram, "rb") as f:
        def read_byte(gpa):
            f.seek(gpa)
            return f.read(1)[0]
        ok, msg = check_incrementer_pages(read_byte)
    assert ok, msg
    return msg


def vmmctl(api: str, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vmmd.ctl", "--api-socket", api, *args],
                          capture_output=True, text=True, timeout=120)


def test_incrementer_snapshot_kill_restore_continues(tmp_path, test_guests):
    vm = start(tmp_path / "a", test_guests["incrementer"])
    try:
        vm.wait_api()
        vm.wait_for("BB", 60)
        r = vmmctl(vm.api, "snapshot", str(tmp_path / "s1"))
        assert r.returncode == 0, r.stderr
        assert "snapshot full" in r.stdout
        assert vm.rpc("vm.info")["state"] == "running"  # resumed
        vm.wait_for("B", 30, start=len(vm.output()))
    finally:
        kill(vm)
    snap = tmp_path / "s1"
    for name in os.listdir(snap):
        assert os.stat(snap / name).st_mode & 0o777 == 0o600, name
    check_ram(snap / "ram.img")

    vm2 = restore(tmp_path / "b", snap)
    try:
        vm2.wait_api()
        info = vm2.rpc("vm.info")
        assert info["state"] == "running" and info["restored_from"] == str(snap)
        assert info["restore_time"]["mode"] == "advance"
        assert info["restore_time"]["clock"] in ("kvm-realtime", "vmmd-realtime")
        vm2.wait_for("BB", 60)  # the restored guest goes on with its passes
        # without fsync (Firecracker's sync_snapshot_files=false): complete, only not yet on disk
        r = vmmctl(vm2.api, "snapshot", "--no-sync", str(tmp_path / "s2"))
        assert r.returncode == 0, r.stderr
        assert "(not fsynced)" in r.stdout
    finally:
        kill(vm2)
    check_ram(tmp_path / "s2" / "ram.img")  # the invariant still holds after it ran on
    restore_and_see_passes(tmp_path / "c", tmp_path / "s2")


def test_incrementer_diff_chain_restore_and_merge(tmp_path, test_guests):
    vm = start(tmp_path / "a", test_guests["incrementer"])
    s1, s2, s3 = tmp_path / "s1", tmp_path / "s2", tmp_path / "s3"
    try:
        vm.wait_api()
        vm.wait_for("B", 60)
        assert vm.rpc("snapshot.create", {"path": str(s1)})["type"] == "full"
        vm.wait_for("B", 30, start=len(vm.output()))
        with pytest.raises(RpcError):  # a diff needs tracking since exactly that parent
            vm.rpc("snapshot.create", {"path": str(tmp_path / "bad"), "diff_from": str(tmp_path / "nope")})
        seen, done = [], threading.Event()

        def poll():  # vm.info shows the snapshot while it runs
            while not done.is_set():
                snap = vm.rpc("vm.info").get("snapshot")
                if snap:
                    seen.append(snap)
                time.sleep(0.002)
        poller = threading.Thread(target=poll)
        poller.start()
        try:
            d2 = vm.rpc("snapshot.create", {"path": str(s2), "diff_from": str(s1)})
        finally:
            done.set()
            poller.join()
        assert d2["type"] == "diff"
        assert seen and {"phase", "bytes_done", "bytes_total"} <= set(seen[-1])
        assert vm.rpc("vm.info")["snapshot"] is None
        vm.wait_for("B", 30, start=len(vm.output()))
        r = vmmctl(vm.api, "snapshot", str(s3), "--diff-from", str(s2))
        assert r.returncode == 0, r.stderr
        with pytest.raises(RpcError):  # s1 is no longer the tracking base
            vm.rpc("snapshot.create", {"path": str(tmp_path / "bad2"), "diff_from": str(s1)})
    finally:
        kill(vm)
    assert not (tmp_path / "bad2").exists()
    check_ram(merged_ram(s3, tmp_path))
    check_ram(merged_ram(s2, tmp_path))

    vm2 = restore(tmp_path / "b", s3)
    try:
        vm2.wait_api()
        vm2.wait_for("BB", 60)
        # a diff from the restored snapshot works too (tracking starts at restore)
        vm2.rpc("snapshot.create", {"path": str(tmp_path / "s4"), "diff_from": str(s3)})
    finally:
        kill(vm2)
    check_ram(merged_ram(tmp_path / "s4", tmp_path))
    # the merged full snapshot restores like the chain
    restore_and_see_passes(tmp_path / "c", tmp_path / "merged-s3")


# Fields that must change between a snapshot and the snapshot of its restore
# (docs/snapshot.md): the guest TSC, kvmclock and the host time they were read at.
CHANGING_VCPU_MSRS = {"0x10"}


def _pit_without_load_times(text: str) -> bytes:
    """kvm_pit_state2 minus each channel's count_load_time (host ktime; KVM
    reloads it on KVM_SET_PIT2): 3 channels of 24 bytes, the time at +16."""
    import base64
    data = bytearray(base64.b64decode(text))
    for ch in range(3):
        data[ch * 24 + 16:ch * 24 + 24] = bytes(8)
    return bytes(data)


def _section(snap: Path, name: str) -> dict:
    return json.loads((snap / name).read_text())


def test_snapshot_restore_snapshot_is_identical(tmp_path, test_guests):
    vm = start(tmp_path / "a", test_guests["ticker"])
    s1, s2 = tmp_path / "s1", tmp_path / "s2"
    try:
        vm.wait_api()
        vm.wait_for("PING 2\n", 60)
        vm.rpc("snapshot.create", {"path": str(s1), "resume": False})
        assert vm.rpc("vm.info")["state"] == "paused"
    finally:
        kill(vm)
    vm2 = restore(tmp_path / "b", s1, "--paused", "--clock", "freeze")
    try:
        vm2.wait_api()
        info = vm2.rpc("vm.info")
        assert info["state"] == "paused"
        assert info["restore_time"]["mode"] == "freeze" and info["restore_time"]["clock"] == "frozen"
        vm2.rpc("snapshot.create", {"path": str(s2), "resume": False})
    finally:
        kill(vm2)
    names = sorted(n for n in os.listdir(s1) if n.startswith(("device-", "vcpu-")))
    assert names == sorted(n for n in os.listdir(s2) if n.startswith(("device-", "vcpu-")))
    for name in names:
        a, b = _section(s1, name), _section(s2, name)
        if name.startswith("vcpu-"):
            for m in CHANGING_VCPU_MSRS:
                a["state"]["msrs"].pop(m, None), b["state"]["msrs"].pop(m, None)
        assert a == b, name
    va, vb = _section(s1, "vm-vm.json")["state"], _section(s2, "vm-vm.json")["state"]
    va.pop("clock"), vb.pop("clock")
    va["pit2"], vb["pit2"] = _pit_without_load_times(va["pit2"]), _pit_without_load_times(vb["pit2"])
    assert va == vb
    assert (s1 / "ram.img").read_bytes() == (s2 / "ram.img").read_bytes()


# -- bad input -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def good_snapshot(tmp_path_factory, test_guests):
    tmp = tmp_path_factory.mktemp("good")
    vm = start(tmp / "a", test_guests["incrementer"])
    try:
        vm.wait_api()
        vm.wait_for("B", 60)
        vm.rpc("snapshot.create", {"path": str(tmp / "snap")})
    finally:
        kill(vm)
    return tmp / "snap"


def _rewrite_manifest(snap: Path, edit) -> None:
    import hashlib
    m = json.loads((snap / "manifest.json").read_text())
    edit(m)
    body = (json.dumps(m, sort_keys=True, indent=1) + "\n").encode()
    (snap / "manifest.json").write_bytes(body)
    (snap / "manifest.json.sha256").write_text(hashlib.sha256(body).hexdigest() + "\n")


def _rewrite_section(snap: Path, name: str, edit) -> None:
    import hashlib
    doc = json.loads((snap / name).read_text())
    edit(doc)
    data = (json.dumps(doc, sort_keys=True, indent=1) + "\n").encode()
    (snap / name).write_bytes(data)

    def fix(m):
        for s in m["sections"]:
            if s["file"] == name:
                s["size"], s["sha256"] = len(data), hashlib.sha256(data).hexdigest()
    _rewrite_manifest(snap, fix)


def _flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x40]))


def _ram_data_offset(ram: Path) -> int:
    fd = os.open(ram, os.O_RDONLY)
    try:
        return os.lseek(fd, 0, os.SEEK_DATA)
    finally:
        os.close(fd)


BAD_CASES = {
    "truncated-ram": (lambda s: os.truncate(s / "ram.img", os.path.getsize(s / "ram.img") - PAGE),
                      "truncated"),
    "corrupted-ram-byte": (lambda s: _flip(s / "ram.img", _ram_data_offset(s / "ram.img") + 5), "SHA-256 mismatch"),
    "byte-written-into-a-ram-hole": (lambda s: _flip(s / "ram.img", 100 << 20), "SHA-256 mismatch"),
    "corrupted-vcpu-section": (lambda s: _flip(s / "vcpu-0.json", 200), "SHA-256 mismatch"),
    "corrupted-device-section": (lambda s: _flip(s / "device-31.0.json", 50), "SHA-256 mismatch"),
    "truncated-vm-section": (lambda s: os.truncate(s / "vm-vm.json", 100), "truncated"),
    "corrupted-manifest": (lambda s: _flip(s / "manifest.json", 30), "corrupted"),
    "missing-manifest-digest": (lambda s: os.unlink(s / "manifest.json.sha256"), "not a vmmd snapshot"),
    "foreign-directory": (lambda s: [os.unlink(s / n) for n in os.listdir(s)] and (s / "data.bin").write_bytes(b"x"),
                          "not a vmmd snapshot"),
    "foreign-manifest": (lambda s: _rewrite_manifest(s, lambda m: m.update(format="firecracker")),
                         "not a vmmd snapshot"),
    "newer-format": (lambda s: _rewrite_manifest(s, lambda m: m.update(format_version=99)), "newer"),
    "newer-section-version": (lambda s: _rewrite_manifest(
        s, lambda m: m["sections"][0].update(version=99)), "newer"),
    "config-mismatch-cpus": (lambda s: _rewrite_manifest(s, lambda m: m["config"].update(cpus=2)),
                             "vCPU"),
    "config-mismatch-memory": (lambda s: _rewrite_manifest(s, lambda m: m["config"].update(memory=64 << 20)),
                               "memory"),
    "hostile-vcpu-registers": (lambda s: _rewrite_section(
        s, "vcpu-0.json", lambda d: d["state"].update(sregs="AAAA")), "sregs"),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_snapshot_is_refused_before_anything_runs(tmp_path, good_snapshot, case):
    snap = tmp_path / "snap"
    shutil.copytree(good_snapshot, snap)
    damage, expect = BAD_CASES[case]
    damage(snap)
    vm = restore(tmp_path / "r", snap)
    try:
        code = vm.wait(60)
    finally:
        vm.stop()
    err = vm.stderr()
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("vmmd: error:"), err
    assert expect in lines[0], lines[0]
    assert not os.path.exists(vm.api)  # refused before the API (or anything) started


def test_restore_overrides_refused_for_missing_slots(tmp_path, good_snapshot, test_guests):
    disk = tmp_path / "d.img"
    disk.write_bytes(bytes(1 << 20))
    for extra, expect in ((["--disk", f"5={disk}"], "no virtio-blk in slot 5"),
                          (["--net", "6=tap=x"], "no virtio-net in slot 6"),
                          (["--clock", "sideways"], "--clock")):
        vm = restore(tmp_path / f"r{len(expect)}", good_snapshot, *extra)
        try:
            assert vm.wait(60) == 2
        finally:
            vm.stop()
        assert vm.stderr().startswith("vmmd: error:") and expect in vm.stderr(), vm.stderr()


def _procs_mentioning(text: str) -> list[int]:
    out = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if text.encode() in cmd:
            out.append(int(pid))
    return out


def test_device_refusing_its_state_tears_everything_down(tmp_path, good_snapshot):
    snap = tmp_path / "snap"
    shutil.copytree(good_snapshot, snap)
    # Consistent checksums, but a device state the LPC device must refuse.
    _rewrite_section(snap, "device-31.0.json", lambda d: d["state"].update(version=999))
    vm = restore(tmp_path / "r", snap)
    try:
        code = vm.wait(60)
    finally:
        vm.stop()
    err = vm.stderr()
    assert code == 2, err
    errors = [line for line in err.splitlines() if line.startswith("vmmd: error:")]
    assert len(errors) == 1 and "refused its saved state" in errors[0], err
    time.sleep(0.5)
    assert _procs_mentioning(str(tmp_path / "r")) == []  # no device process left behind


def test_vm_with_two_disks_two_nics_and_a_balloon_restores_with_overrides(tmp_path, test_guests):
    from devices.virtio_net.switch import Switch
    disks = []
    for i in range(2):
        p = tmp_path / f"disk{i}.img"
        p.write_bytes(bytes([i + 1]) * (1 << 20))
        disks.append(p)
    sw_path = str(tmp_path / "sw.sock")
    with Switch(sw_path):
        vm = start(tmp_path / "a", test_guests["ticker"],
                   "-s", f"2,virtio-blk,{disks[0]}", "-s", f"3,virtio-blk,{disks[1]},num_queues=2",
                   "-s", f"4,virtio-net,socket={sw_path}", "-s", f"5,virtio-net,socket={sw_path}",
                   "-s", "6,virtio-balloon")
        try:
            vm.wait_api()
            vm.wait_for("PING 1\n", 60)
            vm.rpc("snapshot.create", {"path": str(tmp_path / "s")})
        finally:
            kill(vm)
        m = json.loads((tmp_path / "s" / "manifest.json").read_text())
        devs = {s["instance"]: s["device_kind"] for s in m["sections"] if s["kind"] == "device"}
        assert devs == {"2.0": "virtio_blk", "3.0": "virtio_blk", "4.0": "virtio_net", "5.0": "virtio_net",
                        "6.0": "virtio_balloon", "31.0": "lpc"}
        macs = [a for s in m["config"]["slots"] for a in s["args"] if a.startswith("mac=")]
        assert len(set(macs)) == 2  # generated MACs made explicit: the NICs come back as they were
        moved = tmp_path / "moved0.img"
        shutil.copy(disks[0], moved)
        vm2 = restore(tmp_path / "b", tmp_path / "s", "--disk", f"2={moved}")
        try:
            vm2.wait_api()
            n = len(vm2.output())
            vm2.wait_for("PING", 60, start=n)
            listed = {d["id"]: d["state"] for d in vm2.rpc("device.list")}
            assert set(listed.values()) == {"running"} and len(listed) == 6
            cfg_slots = {s["slot"]: s["args"] for s in json.loads(
                (tmp_path / "s" / "manifest.json").read_text())["config"]["slots"]}
            assert cfg_slots[2][0] == str(disks[0])
            # the override took effect: slot 2's device has the moved image open
            pid = next(d["pid"] for d in vm2.rpc("device.list") if d["id"] == "virtio-blk2")
            opened = {os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
            assert str(moved) in opened and str(disks[0]) not in opened
        finally:
            kill(vm2)


def test_reset_after_restore_boots_the_guest_afresh(tmp_path, test_guests):
    vm = start(tmp_path / "a", test_guests["ticker"])
    try:
        vm.wait_api()
        vm.wait_for("PING 3\n", 60)
        vm.rpc("snapshot.create", {"path": str(tmp_path / "s")})
    finally:
        kill(vm)
    vm2 = restore(tmp_path / "b", tmp_path / "s")
    try:
        vm2.wait_api()
        vm2.wait_for("PING", 60)
        assert "PING 0\n" not in vm2.output()  # it went on from where it was
        vm2.rpc("vm.reset")
        vm2.wait_for("PING 0\n", 60)           # a reset boots the configured guest
        assert vm2.rpc("vm.info")["resets"] == 1
        with pytest.raises(RpcError, match="no dirty tracking"):  # new memslots: no diff base
            vm2.rpc("snapshot.create", {"path": str(tmp_path / "d"), "diff_from": str(tmp_path / "s")})
    finally:
        kill(vm2)
