"""A compromised device breaks only itself (issue 9).

Real vmmd with KVM and the ticker guest, real device programs in their
sandbox; the hostile ones (tests/hostile/) send, from inside the jail, every
kind of message a device must not send: foreign MSI-X vector indices, raw
MSIs with INIT/NMI/SMI/ExtINT delivery, foreign interrupt lines, reset and
quit requests it does not own, a 1 MiB state, garbage, unsolicited replies,
forged log lines, and a flood of all that. vmmd and the guest survive, the
VM is neither reset nor stopped, and the refusals are counted per device.

Also: a SIGSTOPped fast-path device is noticed by the heartbeat and
replaced; API calls to a hung device do not hold up another device's
restart; 20 kill -9 of the lpc lose at most the line in flight each; the
crash-loop limit marks a device failed and device.restart revives it.
No timing assertions: bounded waits only keep a broken build from hanging.
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time

import pytest

from tests.conftest import ROOT, requires_kvm, requires_root
from tests.vmmd_process import RpcError, VmmdProcess

pytestmark = [requires_kvm, requires_root]

WAIT = 90.0  # generous bound for anything that should happen in seconds


def start(tmp_path, guest, *extra, hostile=(), flood="3", req_garbage=False):
    env = {"VMMD_HOSTILE_KINDS": ",".join(hostile), "VMMD_HOSTILE_FLOOD": flood,
           "VMMD_HOSTILE_REQ": "1" if req_garbage else "0", "PYTHONPATH": str(ROOT)}
    return VmmdProcess(tmp_path, ["-m", "64M", "-s", "31,lpc", "--raw", str(guest), "--raw-mode", "long-cpl3",
                                  *extra], extra_env=env, entry="tests.hostile.vmmd_hostile")


def image(tmp_path, size=1 << 20):
    path = tmp_path / "disk.img"
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def pings(text: str) -> list[int]:
    return [int(x) for x in re.findall(r"PING (\d+)\n", text)]


def lost_lines(text: str) -> int:
    """Lines missing or damaged in the ticker's output: gaps in the counter
    (a damaged line leaves one) or damaged lines, whichever is more; the
    last, unfinished line is not counted."""
    lines = text.split("\n")[:-1]
    good = [int(m.group(1)) for m in (re.fullmatch(r"PING (\d+)", ln) for ln in lines) if m]
    if not good:
        return len(lines)
    gaps = good[-1] - good[0] + 1 - len(set(good))
    damaged = sum(1 for ln in lines if not re.fullmatch(r"PING \d+", ln))
    return max(gaps, damaged)


def device(vm, dev_id):
    return next(d for d in vm.rpc("device.list") if d["id"] == dev_id)


def until(pred, what, timeout=WAIT, vm=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = pred()
        if got:
            return got
        if vm is not None and vm.proc.poll() is not None:
            raise AssertionError(f"vmmd exited {vm.proc.returncode} waiting for {what}: {vm.stderr()[-3000:]}")
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}" + (f": {vm.stderr()[-3000:]}" if vm else ""))


def attack_done(vm, dev_id):
    stats = vm.rpc("device.stats", {"id": dev_id})
    hostile = stats.get("hostile") or {}
    return stats if hostile.get("done") else None


def assert_not_restarted_by_the_attack(vm, dev):
    # A start-up death by seccomp (SIGSYS, issue 9 item 3, another branch) is
    # not the attack's doing; anything else would be.
    assert "unresponsive" not in vm.stderr()
    assert dev["restarts"] == 0 or "SIGSYS" in (dev["last_exit"] or ""), dev


def assert_vm_unharmed(vm, lpc_kills=0):
    info = vm.rpc("vm.info")
    assert info["state"] == "running" and info["resets"] == 0, info
    n = pings(vm.output())[-1]
    vm.wait_for(f"PING {n + 3}\n", WAIT)   # the guest keeps running
    out = vm.output()
    assert pings(out)[0] == 0 and lost_lines(out) <= lpc_kills, "the guest was reset or lost output"
    assert vm.proc.poll() is None


@pytest.mark.parametrize("kind,slot_args,dev_id", [
    ("virtio_balloon", ["-s", "4,virtio-balloon"], "virtio-balloon4"),
    ("virtio_blk", None, "virtio-blk2"),
])
def test_a_hostile_pci_device_is_refused_and_counted(tmp_path, test_guests, kind, slot_args, dev_id):
    args = slot_args or ["-s", f"2,virtio-blk,{image(tmp_path)}"]
    vm = start(tmp_path, test_guests["ticker"], *args, hostile=(kind,))
    try:
        vm.wait_api()
        vm.wait_for("PING 2\n", WAIT)
        stats = until(lambda: attack_done(vm, dev_id), "the attack to finish", vm=vm)
        sent = stats["hostile"]["sent"]
        assert sent["msi"] == 10 and sent["request"] == 2 and sent["state_size"] == 1, sent
        dev = device(vm, dev_id)
        refused = dev["refused"]
        # Each forbidden event that reached vmmd was refused: all the one-shot ones...
        assert refused.get("vector", 0) >= 4 and refused.get("irq_line", 0) >= 18, refused
        assert refused.get("msi", 0) >= 10 and refused.get("request", 0) >= 2, refused
        assert refused.get("state_size", 0) >= 1 and refused.get("malformed", 0) >= 3, refused
        # ...and the flood (every flood frame that left the device is refused, none acted on).
        assert dev["refused_total"] >= sum(v for k, v in sent.items() if k not in ("log", "req")) - 1024 * 3
        assert dev["log_lines_suppressed"] > 0
        later = vm.rpc("device.stats", {"id": dev_id})   # the same counters, through device.stats
        assert later["vmmd"]["refused_total"] >= dev["refused_total"] and later["vmmd"]["refused"]["msi"] >= 10
        # The device itself keeps working (heartbeats answered, never unresponsive).
        assert dev["state"] == "running"
        assert_not_restarted_by_the_attack(vm, dev)
        assert_vm_unharmed(vm)
        # Logs: bounded, and no forged vmmd line starts a line of vmmd's log.
        err = vm.stderr()
        # vmmd.device_log lets a burst of BURST (200) lines through, then RATE a second
        assert err.count("forged line") < 1000
        assert not re.search(r"^vmmd ERROR vmmd\.machine: forged", err, re.M)
    finally:
        vm.stop()


def test_a_hostile_lpc_cannot_reset_or_quit_the_vm(tmp_path, test_guests):
    vm = start(tmp_path, test_guests["ticker"], hostile=("lpc",), flood="2")
    try:
        vm.wait_api()
        vm.wait_for("PING 2\n", WAIT)
        until(lambda: attack_done(vm, "lpc"), "the attack to finish", vm=vm)
        dev = device(vm, "lpc")
        refused = dev["refused"]
        # reset and quit once each, plus one reset per flood round
        assert refused.get("request", 0) > 2 and refused.get("msi", 0) >= 10, refused
        assert refused.get("vector", 0) >= 4 and refused.get("state_size", 0) >= 1, refused
        assert_not_restarted_by_the_attack(vm, dev)
        assert "reset request: the guest wrote no reset command" in vm.stderr()
        assert "quit request: no console of this device is attached" in vm.stderr()
        assert_vm_unharmed(vm)
    finally:
        vm.stop()


@pytest.mark.parametrize("kind,dev_id", [("lpc", "lpc"), ("virtio_balloon", "virtio-balloon4")])
def test_a_device_breaking_the_protocol_is_replaced_then_failed_and_the_vm_runs_on(
        tmp_path, test_guests, kind, dev_id):
    # Garbage and unsolicited replies on the request channel: the next read or
    # heartbeat gets a broken reply, vmmd replaces the device; the new one does
    # it again, until the crash-loop limit marks it failed.
    vm = start(tmp_path, test_guests["ticker"], "-s", "4,virtio-balloon", "--device-crash-limit", "2/600",
               hostile=(kind,), flood="0", req_garbage=True)
    try:
        vm.wait_api()
        dev = until(lambda: (lambda d: d if d["state"] == "failed" else None)(device(vm, dev_id)),
                    f"{dev_id} to be marked failed", vm=vm)
        assert dev["restarts"] == 2 and dev["refused"].get("malformed", 0) >= 3, dev
        assert "bad reply" in vm.stderr()
        info = vm.rpc("vm.info")
        assert info["state"] == "running" and info["resets"] == 0 and vm.proc.poll() is None
    finally:
        vm.stop()


@pytest.mark.parametrize("dev_id", ["virtio-blk2", "virtio-balloon4"])
def test_a_stopped_fast_path_device_is_noticed_and_replaced(tmp_path, test_guests, dev_id):
    # Nothing in the guest touches these devices: only the heartbeat can notice.
    vm = start(tmp_path, test_guests["ticker"], "-s", f"2,virtio-blk,{image(tmp_path)}",
               "-s", "4,virtio-balloon", "--device-timeout", "1")
    try:
        vm.wait_api()
        vm.wait_for("PING 1\n", WAIT)
        before = device(vm, dev_id)
        until(lambda: device(vm, dev_id)["heartbeats"] > 0, "a first heartbeat", vm=vm)
        os.kill(before["pid"], signal.SIGSTOP)
        after = until(lambda: (lambda d: d if d["restarts"] == 1 and d["state"] == "running" else None)(
            device(vm, dev_id)), "the stopped device to be replaced", vm=vm)
        assert after["pid"] != before["pid"]
        assert f"device {dev_id} is unresponsive: no heartbeat reply" in vm.stderr()
        until(lambda: device(vm, dev_id)["heartbeats"] > before["heartbeats"] + 1, "heartbeats again", vm=vm)
        assert_vm_unharmed(vm)
    finally:
        vm.stop()


def test_api_calls_to_a_hung_device_do_not_hold_up_another_restart(tmp_path, test_guests):
    vm = start(tmp_path, test_guests["ticker"], "-s", "4,virtio-balloon", "--device-timeout", "5")
    try:
        vm.wait_api()
        vm.wait_for("PING 1\n", WAIT)
        balloon = device(vm, "virtio-balloon4")
        os.kill(balloon["pid"], signal.SIGSTOP)
        answers = []

        def call():
            try:
                vm.rpc("balloon.info", timeout=WAIT)
                answers.append("ok")
            except RpcError as exc:
                answers.append(exc.code)

        callers = [threading.Thread(target=call) for _ in range(8)]
        for t in callers:
            t.start()
        lpc = device(vm, "lpc")
        os.kill(lpc["pid"], signal.SIGKILL)
        until(lambda: (lambda d: d["restarts"] == 1 and d["state"] == "running")(device(vm, "lpc")),
              "the lpc restart", vm=vm)
        for t in callers:
            t.join(WAIT)
        # Every call got an answer (an error: the device is hung, then replaced).
        assert len(answers) == 8 and all(a == -32000 for a in answers), answers
        until(lambda: device(vm, "virtio-balloon4")["restarts"] == 1, "the balloon's replacement", vm=vm)
        assert_vm_unharmed(vm, lpc_kills=1)
    finally:
        vm.stop()


def test_twenty_kills_of_the_console_device_lose_at_most_the_line_in_flight_each(tmp_path, test_guests):
    kills = 20
    vm = start(tmp_path, test_guests["ticker"], "--device-timeout", "10", "--device-crash-limit", "100/60")
    try:
        vm.wait_api()
        vm.wait_for("PING 2\n", WAIT)
        for i in range(kills):
            n = pings(vm.output())[-1]
            vm.wait_for(f"PING {n + 2}\n", WAIT)
            (lpc,) = vm.rpc("device.list")
            os.kill(lpc["pid"], signal.SIGKILL)
            until(lambda: (lambda d: d["restarts"] == i + 1 and d["state"] == "running")(vm.rpc("device.list")[0]),
                  f"restart #{i + 1}", vm=vm)
        n = pings(vm.output())[-1]
        vm.wait_for(f"PING {n + 3}\n", WAIT)
        out = vm.output()
        lost = lost_lines(out)
        print(f"{kills} kills: {len(pings(out))} lines, {lost} lost or damaged")
        assert lost <= kills, out[-3000:]
        assert vm.rpc("vm.info")["resets"] == 0
    finally:
        vm.stop()


def test_crash_loop_limit_marks_failed_and_device_restart_revives(tmp_path, test_guests):
    vm = start(tmp_path, test_guests["ticker"], "--device-crash-limit", "3/600")
    try:
        vm.wait_api()
        vm.wait_for("PING 1\n", WAIT)
        for i in range(3):
            (lpc,) = vm.rpc("device.list")
            os.kill(lpc["pid"], signal.SIGKILL)
            until(lambda: (lambda d: d["restarts"] == i + 1 and d["state"] == "running")(vm.rpc("device.list")[0]),
                  f"restart #{i + 1}", vm=vm)
        (lpc,) = vm.rpc("device.list")
        os.kill(lpc["pid"], signal.SIGKILL)   # the 4th crash within the window
        failed = until(lambda: (lambda d: d if d["state"] == "failed" else None)(vm.rpc("device.list")[0]),
                       "the lpc to be marked failed", vm=vm)
        assert failed["pid"] is None and failed["restarts"] == 3
        time.sleep(3)  # no restart comes (the back-off is at most 2 s)
        (still,) = vm.rpc("device.list")
        assert still["state"] == "failed" and still["restarts"] == 3
        assert vm.rpc("vm.info")["state"] == "running" and vm.proc.poll() is None  # the VM runs on
        vm.rpc("device.restart", {"id": "lpc"})
        (revived,) = vm.rpc("device.list")
        assert revived["state"] == "running" and revived["restarts"] == 4
        n = len(vm.output())
        vm.wait_for("PING", WAIT, start=n)  # the console works again
    finally:
        vm.stop()
