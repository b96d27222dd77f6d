"""Live migration end to end with the assembly test guests (real KVM): the
incrementer migrated over unix and tcp loopback with its invariant checked on
the destination; repeated bidirectional runs; forced convergence; failures on
either side; refused streams and configurations."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import requires_kvm, requires_root
from tests.guests.checks import check_incrementer_pages
from tests.vmmd_process import RpcError, VmmdProcess

pytestmark = [requires_kvm, requires_root]


def source(tmp: Path, guest, memory="128M", *extra) -> VmmdProcess:
    tmp.mkdir(parents=True, exist_ok=True)
    return VmmdProcess(tmp, ["-m", memory, "-s", "31,lpc", "--raw", str(guest), "--raw-mode", "long-cpl3",
                             *extra])


def destination(tmp: Path, uri: str, *extra) -> VmmdProcess:
    tmp.mkdir(parents=True, exist_ok=True)
    vm = VmmdProcess(tmp, ["--incoming", uri, *extra])
    deadline = time.monotonic() + 30
    while "waiting for an incoming migration" not in vm.stderr():
        if vm.proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"destination not listening: {vm.stderr()[-2000:]}")
        time.sleep(0.05)
    return vm


def kill(vm: VmmdProcess) -> None:
    try:
        os.killpg(vm.proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    vm.proc.wait(10)
    vm.stop()


def wait_migration(vm: VmmdProcess, timeout: float = 120, until=("completed", "failed", "cancelled")) -> dict:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = vm.rpc("migration.status", timeout=5)
        except (OSError, ValueError):
            if vm.proc.poll() is not None and last and last["state"] in ("switchover", "completed"):
                return dict(last, state="completed")
            raise
        if last["state"] in until:
            return last
        time.sleep(0.05)
    raise AssertionError(f"migration still {last} after {timeout}s")


def check_guest(vm: VmmdProcess, tmp: Path) -> str:
    """Pause the guest, snapshot it and check the incrementer's invariant in its RAM."""
    snap = tmp / f"check-{time.monotonic_ns()}"
    vm.rpc("snapshot.create", {"path": str(snap), "resume": True})
    with open(snap / "ram.img", "rb") as f:
        def read_byte(gpa):
            f.seek(gpa)
            return f.read(1)[0]
        ok, msg = check_incrementer_pages(read_byte)
    assert ok, msg
    return msg


def migrate(src: VmmdProcess, dst: VmmdProcess, uri: str, **params) -> dict:
    src.rpc("migration.start", {"uri": uri, **params})
    st = wait_migration(src)
    assert st["state"] == "completed", (st, dst.stderr()[-3000:], src.stderr()[-3000:])
    assert src.wait(30) == 0
    dst.wait_api()
    assert dst.rpc("vm.info")["state"] == "running"
    return st


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("transport", ["unix", "tcp"])
def test_incrementer_migrates_and_keeps_its_invariant(tmp_path, test_guests, transport):
    uri = f"unix:{tmp_path}/mig.sock" if transport == "unix" else f"tcp:127.0.0.1:{free_port()}"
    src = source(tmp_path / "a", test_guests["incrementer"])
    dst = None
    try:
        src.wait_api()
        src.wait_for("BB", 60)
        dst = destination(tmp_path / "b", uri)
        st = migrate(src, dst, uri)
        print(st)
        assert st["downtime_ms"] is not None and st["iteration"] >= 1 and st["bytes_sent"] > 0
        dst.wait_for("B", 60)  # the guest goes on printing on the destination
        info = dst.rpc("vm.info")
        assert info["restored_from"] == uri
        check_guest(dst, tmp_path)
        dst.wait_for("B", 60, start=len(dst.output()))
    finally:
        kill(src)
        if dst:
            kill(dst)
