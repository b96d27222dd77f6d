"""Live migration of the real Debian guest, there and back, while it works.

A one-vCPU guest on the unprivileged switch runs a shell loop printing a
counter on its console and pings the session's main guest (`linux`) over the
switch. It is migrated to a new vmmd and from there to a third one ("back":
a migration in the other direction, on the same host). After each move the
counter goes on where it was, /proc/sys/kernel/random/boot_id is the same,
the uptime has gone on (never back, never more than the wall time that
passed), the kernel logged nothing new about its clocksource or TSC (none
"unstable"), and in the end ping has lost at most a few packets.
"""

from __future__ import annotations

import re
import time

import pytest

from tests.e2e.clock_lines import bad_clock_lines
from tests.e2e.conftest import SWITCH_IPS, boot, guest_iface, incoming, migrate
from tests.e2e.timings import BOOT_TIMES

pytestmark = [pytest.mark.e2e, pytest.mark.kvm, pytest.mark.root]

MIGRANT_IP = "10.78.0.3"
COUNT = re.compile(r"mig-count-(\d+)\r?\n")
PING_INTERVAL = 0.2
# Packets ping may lose per migration. While the vCPUs are stopped the guest
# sends nothing (ping's timer runs on the guest's clock), so what is lost is
# what was in flight at the switchover: the echo request sent just before the
# pause whose reply reaches the source's stopped NIC, and any reply the switch
# forwards to the source's port until the destination's first frame (the next
# echo request) teaches it the MAC's new port. One or two; three for slack.
LOSS_PER_MIGRATION = 3


# The clock lines a move may add: tests/e2e/clock_lines.py.


def counts(text: str) -> list[int]:
    return [int(n) for n in COUNT.findall(text)]


def guest_facts(agent) -> dict:
    """boot_id, uptime and the kernel's clocksource/TSC lines, with the host
    time bracketing the read."""
    t0 = time.monotonic()
    out = agent.check("cat /proc/sys/kernel/random/boot_id; cut -d' ' -f1 /proc/uptime; "
                      "cat /sys/devices/system/clocksource/clocksource0/current_clocksource; "
                      "dmesg | grep -i -E 'clocksource|tsc' || true", timeout=180)
    t1 = time.monotonic()
    lines = [line.strip() for line in out.strip().splitlines()]
    return {"boot_id": lines[0], "uptime": float(lines[1]), "clocksource": lines[2],
            "clock_log": lines[3:], "host_before": t0, "host_after": t1}


def check_after_migration(before: dict, after: dict) -> None:
    assert after["boot_id"] == before["boot_id"]
    assert after["clocksource"] == before["clocksource"]
    # The guest's uptime went on: forward, and by no more than the wall time
    # between the two reads (1% and 1 s for clock-rate differences).
    elapsed = after["host_after"] - before["host_before"]
    assert before["uptime"] < after["uptime"] <= before["uptime"] + elapsed * 1.01 + 1, (before, after)
    new = [line for line in after["clock_log"] if line not in before["clock_log"]]
    if new:
        print("new clock lines:", new)
    bad = bad_clock_lines(before["clock_log"], after["clock_log"])
    assert not bad, f"the kernel logged about its clock after the migration: {bad}"


def wait_count_beyond(vm, n: int, timeout: float) -> list[int]:
    """The counter values on vm's console, once one beyond n has been printed."""
    deadline = time.monotonic() + timeout
    while True:
        seen = counts(vm.output())
        if seen and seen[-1] > n:
            return seen
        if time.monotonic() > deadline or vm.proc.poll() is not None:
            raise AssertionError(f"the counter did not pass {n} within {timeout} s: {seen[-5:]}; "
                                 f"console tail {vm.output()[-1500:]!r}")
        time.sleep(0.5)


def check_counter_continues(before: list[int], after: list[int]) -> None:
    """`after` (the destination's console) goes on from `before` (the
    source's): no restart, nothing printed twice, nothing printed out of order."""
    assert after, "nothing counted on the destination"
    for seq in (before, after):
        assert seq == sorted(set(seq)), seq
    assert after[0] > before[-1], (before[-5:], after[:5])


@pytest.fixture
def ping_target(linux):
    """The session's main guest, at SWITCH_IPS[0] on its switch NIC (eth1)."""
    _, agent, _ = linux
    eth = guest_iface(agent, 1)
    agent.check(f"ip addr show dev {eth} | grep -q 'inet {SWITCH_IPS[0]}/' || "
                f"ip addr add {SWITCH_IPS[0]}/24 dev {eth}; ip link set {eth} up")
    return SWITCH_IPS[0]


def check_uptime_log(awk_out: str, last_count: int) -> None:
    assert "back:" not in awk_out, awk_out
    rows = int(re.search(r"rows: (\d+)", awk_out).group(1))
    assert rows > last_count, (awk_out, last_count)  # a row for every count printed


def check_ping(log: str) -> None:
    m = re.search(r"(\d+) packets transmitted, (\d+) packets received", log)
    assert m, log
    sent, received = int(m.group(1)), int(m.group(2))
    assert sent >= 20, log
    assert sent - received <= 2 * LOSS_PER_MIGRATION, log
    # and the replies went on to the end (the losses were at the moves)
    last_seq = int(re.search(r"seq=(\d+)\s*$", log).group(1))
    assert last_seq >= sent - 1 - LOSS_PER_MIGRATION, log


class Checks:
    """The properties checked after each move, all reported at the end (a lab
    run takes many minutes: one run tells every property that broke)."""

    def __init__(self):
        self.failed: list[str] = []

    def __call__(self, what: str, fn, *args) -> None:
        try:
            fn(*args)
        except AssertionError as e:
            self.failed.append(f"{what}: {e}")


@pytest.mark.timeout(3000)
def test_migrate_there_and_back_while_counting_and_pinging(ping_target, default_guest, e2e_dir, switch):
    vms = []
    check = Checks()
    try:
        (e2e_dir / "mig0").mkdir()
        vm, agent = boot(e2e_dir / "mig0", ["-c", "1", "-m", "256M",
                                            "-s", f"5,virtio-net,socket={switch}"],
                         default_guest, name="migrating guest, 1 vCPU")
        vms.append(vm)
        eth = guest_iface(agent, 0)
        agent.check(f"ip addr add {MIGRANT_IP}/24 dev {eth} && ip link set {eth} up")
        assert " 0% packet loss" in agent.check(f"ping -c 3 -W 5 {ping_target}", timeout=120)

        facts = guest_facts(agent)
        first_clock_log = facts["clock_log"]
        assert not [line for line in facts["clock_log"] if "unstable" in line.lower()], facts
        # The counter on the console (read by the test) and, with the uptime
        # of each step, in a file: the uptime must never go back across moves.
        agent.check("(i=0; while :; do echo $i $(cut -d' ' -f1 /proc/uptime) >> /tmp/count.log; "
                    "echo mig-count-$i > /dev/ttyS0; i=$((i+1)); usleep 200000; done"
                    " > /dev/null 2>&1 & echo $! > /tmp/count.pid); true")
        agent.check(f"(ping -i {PING_INTERVAL} {ping_target} > /tmp/ping.log 2>&1 & "
                    "echo $! > /tmp/ping.pid); true")
        seen = wait_count_beyond(vm, 3, 300)

        for hop in (1, 2):  # there, and back
            dst, uri = incoming(e2e_dir / f"mig{hop}")
            vms.append(dst)
            status, agent = migrate(vm, dst, uri, name=f"migrating guest, move {hop}")
            src, vm = vm, dst
            before, facts = facts, guest_facts(agent)
            check(f"move {hop}: guest facts", check_after_migration, before, facts)
            after = wait_count_beyond(vm, 0, 300)
            check(f"move {hop}: counter", check_counter_continues, counts(src.output()), after)
            seen = wait_count_beyond(vm, after[-1] + 3, 300)
            print(f"migration {hop}: downtime {status.get('downtime_ms')} ms, "
                  f"{status.get('iteration')} passes, {status.get('bytes_sent')} bytes, "
                  f"switchover {status.get('switchover_ms')}")

        agent.check("kill $(cat /tmp/count.pid)")
        # The uptime logged by the loop never went back, across both moves.
        back = agent.check("awk 'NF == 2 && NR > 1 && $2 < p {print \"back:\", p, $2} {p = $2} "
                           "END {print \"rows:\", NR}' /tmp/count.log", timeout=120)
        check("uptime log", check_uptime_log, back, seen[-1])
        agent.check("kill -INT $(cat /tmp/ping.pid); sleep 1")
        log = agent.check("tail -n 4 /tmp/ping.log; grep -o 'seq=[0-9]*' /tmp/ping.log | tail -n 1",
                          timeout=120)
        check("ping", check_ping, log)
        summary = re.search(r"\d+ packets transmitted.*", log)
        BOOT_TIMES.append(f"migrating guest: ping over both moves: {summary and summary.group(0)}; "
                          f"clock lines added: {len(facts['clock_log']) - len(first_clock_log)}")
        assert not check.failed, "\n".join(check.failed)
    finally:
        for v in vms:
            v.stop()
