"""vmmd end to end with the assembly test guests: console through the lpc
device process, reset handling, pause/resume, device crash and restart, API."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import requires_kvm, requires_root
from tests.guests.checks import HELLO_OUTPUT as HELLO_BYTES

HELLO_OUTPUT = HELLO_BYTES.decode()
from tests.vmmd_process import RpcError, VmmdProcess

pytestmark = [requires_kvm, requires_root]


def start(tmp_path, guest, *extra, sandbox="on", com1="file"):
    return VmmdProcess(tmp_path, ["-m", "64M", "-s", "31,lpc", "--raw", str(guest),
                                  "--raw-mode", "long-cpl3", *extra], sandbox=sandbox, com1=com1)


@pytest.mark.parametrize("sandbox", ["on", "off"])
def test_hello_guest_prints_through_lpc_and_exits_on_reset(tmp_path, test_guests, sandbox):
    vm = start(tmp_path, test_guests["hello"], "--no-reboot", sandbox=sandbox)
    try:
        assert vm.wait(60) == 0, vm.stderr()
        assert vm.output() == HELLO_OUTPUT
    finally:
        vm.stop()


def test_guest_reset_without_no_reboot_restarts_the_guest(tmp_path, test_guests):
    vm = start(tmp_path, test_guests["hello"])
    try:
        vm.wait_api()
        deadline = time.monotonic() + 60
        while vm.output().count(HELLO_OUTPUT) < 3 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert vm.output().count(HELLO_OUTPUT) >= 3, vm.stderr()[-3000:]
        assert vm.rpc("vm.info")["resets"] >= 2
    finally:
        vm.stop()


def ping_count(text: str) -> int:
    nums = re.findall(r"PING (\d+)\n", text)
    return int(nums[-1]) if nums else -1


def test_pause_and_resume_a_running_guest(tmp_path, test_guests):
    vm = start(tmp_path, test_guests["ticker"])
    try:
        vm.wait_api()
        vm.wait_for("PING 3\n", 60)
        assert vm.rpc("vm.pause") is None
        assert vm.rpc("vm.info")["state"] == "paused"
        frozen = vm.output()
        time.sleep(1.0)
        later = vm.output()
        # A byte the guest wrote just before the pause (a posted write) may
        # still drain to the console; the guest itself runs no further, so no
        # new line begins (each byte waits on a synchronous LSR read first).
        assert later.startswith(frozen)
        assert len(later) - len(frozen) <= 1 and "P" not in later[len(frozen):], \
            "the guest kept printing while paused"
        with pytest.raises(RpcError) as err:
            vm.rpc("vm.pause")
        assert err.value.code == -32000
        vm.rpc("vm.resume")
        assert vm.rpc("vm.info")["state"] == "running"
        n = ping_count(frozen)
        vm.wait_for(f"PING {n + 3}\n", 60)
        # The counter continues where it stopped: no gap, no restart.
        nums = [int(x) for x in re.findall(r"PING (\d+)\n", vm.output())]
        assert nums == list(range(len(nums)))
    finally:
        vm.stop()


def test_kill_9_of_the_lpc_process_is_survived_and_restarted(tmp_path, test_guests):
    vm = start(tmp_path, test_guests["ticker"])
    try:
        vm.wait_api()
        vm.wait_for("PING 2\n", 60)
        (lpc,) = [d for d in vm.rpc("device.list") if d["type"] == "lpc"]
        assert lpc["state"] == "running" and lpc["restarts"] == 0
        os.kill(lpc["pid"], signal.SIGKILL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            (now,) = vm.rpc("device.list")
            if now["restarts"] == 1 and now["state"] == "running":
                break
            time.sleep(0.05)
        assert now["restarts"] == 1 and now["state"] == "running", now
        assert now["pid"] != lpc["pid"]
        assert "SIGKILL" in (now["last_exit"] or "")
        # The console works again: new, well-formed lines keep arriving (bytes
        # the guest wrote while no process served the UART are lost, as on a
        # real unplugged line).
        n = ping_count(vm.output())
        deadline = time.monotonic() + 60
        while ping_count(vm.output()) < n + 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ping_count(vm.output()) >= n + 3, vm.stderr()[-3000:]
        assert vm.proc.poll() is None
    finally:
        vm.stop()


def test_device_restart_over_the_api(tmp_path, test_guests):
    vm = start(tmp_path, test_guests["ticker"])
    try:
        vm.wait_api()
        vm.wait_for("PING 1\n", 60)
        before = vm.rpc("device.list")[0]
        vm.rpc("device.restart", {"id": "lpc"})
        after = vm.rpc("device.list")[0]
        assert after["restarts"] == before["restarts"] + 1
        assert after["pid"] != before["pid"] and after["state"] == "running"
        with pytest.raises(RpcError) as err:
            vm.rpc("device.restart", {"id": "nope"})
        assert err.value.code == -32001
        n = ping_count(vm.output())
        vm.wait_for(f"PING {n + 2}\n", 60)
        # The guest was held while the device was swapped: no byte was lost.
        nums = [int(x) for x in re.findall(r"PING (\d+)\n", vm.output())]
        assert nums == list(range(len(nums)))
    finally:
        vm.stop()


def test_shutdown_over_the_api_and_vmmctl(tmp_path, test_guests):
    vm = start(tmp_path, test_guests["ticker"])
    try:
        vm.wait_api()
        ctl = [sys.executable, "-m", "vmmd.ctl", "--api-socket", vm.api]
        info = subprocess.run(ctl + ["info"], capture_output=True, text=True, timeout=30)
        assert info.returncode == 0 and "running" in info.stdout
        devs = subprocess.run(ctl + ["--json", "devices"], capture_output=True, text=True, timeout=30)
        assert devs.returncode == 0 and '"lpc"' in devs.stdout
        down = subprocess.run(ctl + ["shutdown"], capture_output=True, text=True, timeout=30)
        assert down.returncode == 0, down.stderr
        assert vm.wait(30) == 0
    finally:
        vm.stop()


def test_device_process_is_sandboxed(tmp_path, test_guests):
    vm = start(tmp_path, test_guests["ticker"])
    try:
        vm.wait_api()
        (lpc,) = vm.rpc("device.list")
        status = open(f"/proc/{lpc['pid']}/status").read()
        assert re.search(r"^Seccomp:\s+2$", status, re.M), status
        assert re.search(r"^NoNewPrivs:\s+1$", status, re.M), status
        for ns in ("mnt", "net", "pid"):
            assert os.readlink(f"/proc/{lpc['pid']}/ns/{ns}") != os.readlink(f"/proc/self/ns/{ns}")
        assert lpc["sandbox"] == "on"
    finally:
        vm.stop()


def test_bad_arguments_exit_2_with_one_message():
    r = subprocess.run([sys.executable, "-m", "vmmd.cli", "-c", "zero"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2
    assert r.stderr.startswith("vmmd: error:") and r.stderr.count("\n") == 1


def test_smp_guest_runs_and_pauses_with_a_waiting_application_processor(tmp_path, test_guests):
    # vCPU 1 waits for INIT/SIPI inside KVM_RUN; pause must still get it out.
    vm = start(tmp_path, test_guests["ticker"], "-c", "2")
    try:
        vm.wait_api()
        assert vm.rpc("vm.info")["vcpus"] == 2
        vm.wait_for("PING 2\n", 60)
        vm.rpc("vm.pause")
        assert vm.rpc("vm.info")["state"] == "paused"
        vm.rpc("vm.resume")
        n = ping_count(vm.output())
        vm.wait_for(f"PING {n + 2}\n", 60)
    finally:
        vm.stop()


def test_a_hung_device_reads_as_all_ones_is_failed_and_replaced(tmp_path, test_guests):
    # A stopped process never answers: a read or the heartbeat times out,
    # vmmd marks the device unresponsive, kills and restarts it.
    vm = start(tmp_path, test_guests["ticker"], "--device-timeout", "0.5")
    try:
        vm.wait_api()
        vm.wait_for("PING 2\n", 60)
        (lpc,) = vm.rpc("device.list")
        os.kill(lpc["pid"], signal.SIGSTOP)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            (now,) = vm.rpc("device.list")
            if now["restarts"] >= 1 and now["state"] == "running":
                break
            time.sleep(0.05)
        assert now["restarts"] >= 1 and now["state"] == "running", now
        assert now["pid"] != lpc["pid"]
        assert "device lpc is unresponsive" in vm.stderr()
        n = ping_count(vm.output())
        deadline = time.monotonic() + 60
        while ping_count(vm.output()) < n + 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ping_count(vm.output()) >= n + 2
        assert vm.proc.poll() is None
    finally:
        vm.stop()
