"""`vmmd --restore-wait`: a started vmmd that restores a snapshot over the API
(snapshot.restore / `vmmctl restore`), with spare device processes; refusals
leave it waiting; bad command lines are one error line (real KVM, the
assembly test guests)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import requires_kvm, requires_root
from tests.integration.test_snapshot import (BAD_CASES, _rewrite_section, check_ram,  # noqa: F401
                                             good_snapshot, kill, start, vmmctl)
from tests.vmmd_process import TIME_SCALE, RpcError, VmmdProcess

pytestmark = [requires_kvm, requires_root]

SPARES = 2


def waiting(tmp: Path, *extra: str) -> VmmdProcess:
    tmp.mkdir(parents=True, exist_ok=True)
    vm = VmmdProcess(tmp, ["--restore-wait", "--spare-devices", str(SPARES), *extra], com1=None)
    vm.wait_api()
    return vm


def wait_spares_ready(vm: VmmdProcess, n: int = SPARES, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout * TIME_SCALE
    while time.monotonic() < deadline:
        if vm.rpc("vm.info")["spares"]["ready"] >= n:
            return
        time.sleep(0.1)
    raise AssertionError(f"spares never ready: {vm.rpc('vm.info')}")


def _status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def session_processes(vm: VmmdProcess) -> list[int]:
    """vmmd's session, vmmd itself left out: its spares and device processes."""
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit() and int(name) != vm.proc.pid:
            try:
                if os.getsid(int(name)) == vm.proc.pid:
                    out.append(int(name))
            except OSError:
                pass
    return out


def jailed_processes(vm: VmmdProcess) -> list[int]:
    """Device processes (jailed: no_new_privs); unused spares are not."""
    out = []
    for pid in session_processes(vm):
        try:
            if _status(pid)["NoNewPrivs"] == "1":
                out.append(pid)
        except (OSError, KeyError):
            pass
    return out


def cli_error(snap: Path, tmp: Path, *extra: str) -> str:
    """What `vmmd --restore` says of this snapshot (after "vmmd: error: ")."""
    tmp.mkdir(parents=True, exist_ok=True)
    vm = VmmdProcess(tmp, ["--restore", str(snap), *extra], com1=None)
    try:
        assert vm.wait(60) == 2, vm.stderr()
    finally:
        vm.stop()
    lines = [line for line in vm.stderr().splitlines() if line.startswith("vmmd: error: ")]
    assert len(lines) == 1, vm.stderr()
    return lines[0][len("vmmd: error: "):]


def test_waiting_vmmd_restores_over_the_api_and_the_guest_continues(tmp_path, test_guests):
    vm = start(tmp_path / "a", test_guests["incrementer"])
    snap = tmp_path / "s1"
    try:
        vm.wait_api()
        vm.wait_for("BB", 60)
        vm.rpc("snapshot.create", {"path": str(snap)})
    finally:
        kill(vm)

    w = waiting(tmp_path / "w")
    try:
        info = w.rpc("vm.info")
        assert info["state"] == "waiting" and info["devices"] == [], info
        with pytest.raises(RpcError) as exc:
            w.rpc("vm.pause")
        assert exc.value.code == -32000 and "snapshot.restore" in str(exc.value)
        wait_spares_ready(w)
        assert jailed_processes(w) == []   # nothing of a guest runs yet

        r = vmmctl(w.api, "restore", str(snap), "-l", f"com1,file,{w.console}")
        assert r.returncode == 0, r.stderr
        assert r.stdout.startswith("restored: vCPUs running"), r.stdout
        info = w.rpc("vm.info")
        assert info["state"] == "running" and info["restored_from"] == str(snap), info
        [lpc] = info["devices"]
        # The lpc is one of the spares, now jailed; the unused spare was stopped.
        assert b"devices.spare" in Path(f"/proc/{lpc['pid']}/cmdline").read_bytes()
        assert jailed_processes(w) == [lpc["pid"]]
        deadline = time.monotonic() + 10 * TIME_SCALE
        while session_processes(w) != [lpc["pid"]] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert session_processes(w) == [lpc["pid"]]

        w.wait_for("BB", 60)  # the restored guest goes on with its passes
        with pytest.raises(RpcError) as exc:
            w.rpc("snapshot.restore", {"path": str(snap)})
        assert exc.value.code == -32000
        w.rpc("snapshot.create", {"path": str(tmp_path / "s2")})
        w.rpc("vm.shutdown")
        assert w.wait(60) == 0, w.stderr()
    finally:
        w.stop()
    check_ram(tmp_path / "s2" / "ram.img")  # the invariant still holds after it ran on


REFUSED = ("corrupted-ram-byte", "newer-format", "hostile-vcpu-registers", "foreign-directory")


def test_refused_snapshots_leave_vmmd_waiting_then_a_good_one_restores(tmp_path, good_snapshot):
    cases = {}
    for case in REFUSED:
        snap = tmp_path / case
        shutil.copytree(good_snapshot, snap)
        BAD_CASES[case][0](snap)
        cases[case] = snap
    device_refuses = tmp_path / "device-refuses"
    shutil.copytree(good_snapshot, device_refuses)
    _rewrite_section(device_refuses, "device-31.0.json", lambda d: d["state"].update(version=999))
    cases["device-refuses"] = device_refuses

    w = waiting(tmp_path / "w")
    try:
        for case, snap in cases.items():
            want = cli_error(snap, tmp_path / f"cli-{case}")
            with pytest.raises(RpcError) as exc:
                w.rpc("snapshot.restore", {"path": str(snap)}, timeout=120)
            assert exc.value.code == -32003, (case, exc.value.error)
            assert exc.value.error["message"] == want, case
            assert w.rpc("vm.info")["state"] == "waiting", case
            assert jailed_processes(w) == [], case   # a device it started is gone too
        # Bad parameters: the restore command line's own checks.
        with pytest.raises(RpcError) as exc:
            w.rpc("snapshot.restore", {"path": str(good_snapshot), "disks": {"5": "/nonexistent.img"}})
        assert exc.value.code == -32602 and "--disk 5" in exc.value.error["message"], exc.value.error
        with pytest.raises(RpcError) as exc:
            w.rpc("snapshot.restore", {"path": str(good_snapshot), "clock": "sideways"})
        assert exc.value.code == -32602, exc.value.error
        r = vmmctl(w.api, "restore", str(device_refuses))
        assert r.returncode != 0 and "refused its saved state" in r.stderr, r.stderr

        wait_spares_ready(w)   # the used ones were replaced
        console = tmp_path / "w" / "com1.out"
        out = w.rpc("snapshot.restore", {"path": str(good_snapshot), "clock": "freeze",
                                         "consoles": {"com1": f"file,{console}"}}, timeout=120)
        assert out["state"] == "running" and out["total_ms"] > 0, out
        w.wait_for("B", 60)
        assert w.rpc("vm.info")["restored_from"] == str(good_snapshot)
    finally:
        w.stop()


@pytest.mark.parametrize("args,expect", [
    ([], "needs --api-socket"),
    (["--api-socket", "{sock}", "--restore", "/tmp"], "takes no --restore"),
    (["--api-socket", "{sock}", "--incoming", "unix:/tmp/x"], "takes no --incoming"),
    (["--api-socket", "{sock}", "-s", "31,lpc"], "unrecognized arguments"),
    (["--api-socket", "{sock}", "--spare-devices", "99"], "--spare-devices"),
    (["--api-socket", "{sock}", "--sandbox", "maybe"], "--sandbox"),
    (["--api-socket", "/nonexistent-dir/api.sock"], "does not exist"),
])
def test_bad_wait_command_lines_are_one_error_line(tmp_path, args, expect):
    argv = [a.replace("{sock}", str(tmp_path / "api.sock")) for a in args]
    r = subprocess.run([sys.executable, "-m", "vmmd.cli", "--restore-wait", *argv],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("vmmd: error: ") and expect in lines[0], r.stderr
    assert not os.path.exists(tmp_path / "api.sock")


@pytest.mark.parametrize("mode,from_spare", [("log", True), ("off", False)])
def test_sandbox_log_takes_a_spare_and_off_starts_cold(tmp_path, good_snapshot, mode, from_spare):
    """Spares wait in their namespaces: they serve sandbox on and log; off starts cold."""
    w = waiting(tmp_path / "w")
    try:
        wait_spares_ready(w)
        console = tmp_path / "w" / "com1.out"
        w.rpc("snapshot.restore", {"path": str(good_snapshot), "sandbox": mode,
                                   "consoles": {"com1": f"file,{console}"}}, timeout=120)
        [lpc] = w.rpc("vm.info")["devices"]
        assert lpc["sandbox"] == mode and lpc["state"] == "running", lpc
        assert (b"devices.spare" in Path(f"/proc/{lpc['pid']}/cmdline").read_bytes()) == from_spare
        st = _status(lpc["pid"])
        assert st["Seccomp"] == ("2" if mode == "log" else "0"), st
        w.wait_for("B", 60)
    finally:
        w.stop()
