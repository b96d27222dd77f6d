"""Snapshot and restore of a running stock Linux guest (issue 10), checked
through the guest itself: its shell answers after a restore into a new vmmd,
its boot and uptime continue, its clocksource did not change and its TSC was
never marked unstable, and with --clock advance its wall clock agrees with
the host's."""

from __future__ import annotations

import os
import re
import signal
import time

import pytest

from tests.e2e.clock_lines import bad_clock_lines
from tests.e2e.conftest import boot, restore
from tests.e2e.guest_agent import GuestAgent
from tests.e2e.timings import BOOT_TIMES

pytestmark = [pytest.mark.e2e, pytest.mark.kvm, pytest.mark.root]

CLOCK_LINES = "dmesg | grep -i -E 'clocksource|tsc' || true"
WALL_CLOCK_SLACK = 0.050   # seconds: the bound, around the command's round trip


def guest_clock_facts(agent: GuestAgent) -> dict:
    return {
        "boot_id": agent.check("cat /proc/sys/kernel/random/boot_id").strip(),
        "uptime": float(agent.check("cat /proc/uptime").split()[0]),
        "clocksource": agent.check(
            "cat /sys/devices/system/clocksource/clocksource0/current_clocksource").strip(),
        "dmesg": agent.check(CLOCK_LINES).splitlines(),
    }


def wall_clock_error(agent: GuestAgent) -> float:
    """How far the guest's CLOCK_REALTIME is outside the host's, read around
    one agent round trip (0: inside [before, after])."""
    before = time.time()
    # busybox's date has no %N; its adjtimex (read-only without options)
    # prints CLOCK_REALTIME to the microsecond.
    out = agent.check("adjtimex")
    after = time.time()
    fields = dict(re.findall(r"time\.(tv_sec|tv_usec):\s+(\d+)", out))
    guest = int(fields["tv_sec"]) + int(fields["tv_usec"]) / 1e6
    return max(before - guest, guest - after, 0.0)


@pytest.fixture(scope="module")
def snapguest(default_guest, e2e_dir):
    tmp = e2e_dir / "snap-src"
    tmp.mkdir()
    vm, agent = boot(tmp, ["-c", "1", "-m", "256M"], default_guest, name="snapshot guest, 1 vCPU")
    yield vm, agent
    agent.close()
    vm.stop()


def test_snapshot_kill_restore_the_guest_continues_with_its_clock(snapguest, e2e_dir):
    vm, agent = snapguest
    assert wall_clock_error(agent) <= WALL_CLOCK_SLACK, "the guest's clock was off before the snapshot"
    agent.check("echo before-snapshot > /tmp/marker")
    facts = guest_clock_facts(agent)
    snap = e2e_dir / "linux-snap"
    t0 = time.monotonic()
    vm.rpc("snapshot.create", {"path": str(snap)}, timeout=900)
    BOOT_TIMES.append(f"snapshot guest: snapshot.create {time.monotonic() - t0:.1f} s")
    agent.close()
    os.killpg(vm.proc.pid, signal.SIGKILL)     # vmmd and everything it started
    vm.proc.wait(60)
    time.sleep(3)                              # guest time must catch up with this too (advance)

    tmp = e2e_dir / "snap-dst"
    tmp.mkdir()
    vm2, agent2 = restore(tmp, snap, ["--clock", "advance"], name="snapshot guest, restored")
    try:
        assert agent2.check("cat /tmp/marker").strip() == "before-snapshot"
        after = guest_clock_facts(agent2)
        assert after["boot_id"] == facts["boot_id"]
        assert after["uptime"] >= facts["uptime"]
        assert after["clocksource"] == facts["clocksource"]
        new = [line for line in after["dmesg"] if line not in facts["dmesg"]]
        if new:
            print("new clock lines:", new)
        bad = bad_clock_lines(facts["dmesg"], after["dmesg"])
        assert not bad, f"new clock messages after the restore: {bad}"
        err = wall_clock_error(agent2)
        assert err <= WALL_CLOCK_SLACK, f"guest wall clock {err * 1000:.0f} ms off the host's after restore"
    finally:
        agent2.close()
        vm2.stop()
