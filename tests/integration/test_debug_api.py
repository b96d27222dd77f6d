"""debug.vcpus over JSON-RPC and `vmmctl debug-vcpus`, with the ticker guest."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import requires_kvm, requires_root
from tests.vmmd_process import RpcError, VmmdProcess

pytestmark = [requires_kvm, requires_root]

GUEST_CODE = range(0x100000, 0x101000)  # the ticker's image (tests/guests/README.md)
EFER_LMA = 1 << 10


def start(tmp_path, guest, *extra):
    return VmmdProcess(tmp_path, ["-m", "64M", "-s", "31,lpc", "--raw", str(guest),
                                  "--raw-mode", "long-cpl3", *extra])


def test_debug_vcpus_reads_registers_of_a_running_guest(tmp_path, test_guests):
    vm = start(tmp_path, test_guests["ticker"], "-c", "2")
    try:
        vm.wait_api()
        vm.wait_for("PING 2\n", 60)
        states = vm.rpc("debug.vcpus")
        assert [s["index"] for s in states] == [0, 1]
        bsp = states[0]
        assert bsp["rip"] in GUEST_CODE, hex(bsp["rip"])
        assert bsp["cpl"] == 3 and bsp["cs"] & 3 == 3
        assert bsp["efer"] & EFER_LMA
        assert bsp["mp_state"] == 0  # runnable
        assert 0 < bsp["rsp"] <= 0x80000
        assert set(bsp["gprs"]) >= {"rax", "rcx", "r15"}
        assert isinstance(bsp["exits"], dict) and isinstance(bsp["assists"], dict)
        if bsp["kvm_stats"]:  # KVM_GET_STATS_FD (Linux >= 5.14)
            assert bsp["kvm_stats"]["exits"] > 0, bsp["kvm_stats"]
        # The AP never got INIT/SIPI from this guest.
        assert states[1]["mp_state"] != 0 or states[1]["rip"] not in GUEST_CODE
        # The read left the VM running: the ticker keeps counting.
        assert vm.rpc("vm.info")["state"] == "running"
        n = len(vm.output())
        vm.wait_for("PING", 60, start=n)
        # A paused VM stays paused across the read; samples differ only by the loop.
        vm.rpc("vm.pause")
        a, b = vm.rpc("debug.vcpus"), vm.rpc("debug.vcpus")
        assert a[0]["rip"] == b[0]["rip"] and a[0]["gprs"] == b[0]["gprs"]
        assert vm.rpc("vm.info")["state"] == "paused"
        vm.rpc("vm.resume")
        # vmmctl shows a table with the RIP in hex.
        out = subprocess.run([sys.executable, "-m", "vmmd.ctl", "--api-socket", vm.api, "debug-vcpus"],
                             capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        lines = out.stdout.splitlines()
        assert lines[0].split()[:2] == ["VCPU", "RIP"]
        assert int(lines[1].split()[1], 16) in GUEST_CODE
    finally:
        vm.stop()


def test_debug_vcpus_in_the_openrpc_document(tmp_path, test_guests):
    vm = start(tmp_path, test_guests["ticker"])
    try:
        vm.wait_api()
        names = {m["name"] for m in vm.rpc("rpc.discover")["methods"]}
        assert "debug.vcpus" in names
        with pytest.raises(RpcError):
            vm.rpc("debug.vcpus", {"unexpected": 1})
    finally:
        vm.stop()
