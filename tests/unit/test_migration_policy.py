"""The source's convergence policy: the downtime reserve and the throttle steps."""

from types import SimpleNamespace

import pytest

from vmmd.migration import transport
from vmmd.migration.source import SWITCHOVER_RESERVE_MS, Migration

MiB = 1 << 20


def mig(downtime_ms=300):
    machine = SimpleNamespace(memory=None, vm=None, supervisor=None, control=None, loop=None)
    return Migration(machine, transport.parse_uri("unix:/nonexistent"), downtime_ms=downtime_ms)


@pytest.mark.parametrize("downtime,reserve", [(300, SWITCHOVER_RESERVE_MS), (30, 15), (1, 0.5)])
def test_reserve_for_the_non_ram_part_of_the_downtime(downtime, reserve):
    assert mig(downtime).reserve_ms == reserve


def test_throttle_follows_qemus_ramp_when_the_guest_dirties_slowly():
    m = mig()
    assert m._next_throttle(10 * MiB, 100 * MiB) == 20
    m.throttle.pct = 20
    assert m._next_throttle(10 * MiB, 100 * MiB) == 30


def test_throttle_jumps_to_what_halves_the_dirty_rate_against_the_bandwidth():
    m = mig()
    # 256 MiB/s dirtying against 128 MiB/s: at least 75 % parked to get under 64 MiB/s
    assert m._next_throttle(256 * MiB, 128 * MiB) >= 75
    # measured under a 50 % throttle: the guest's own rate is twice what was seen
    m.throttle.pct = 50
    assert m._next_throttle(128 * MiB, 128 * MiB) >= 75
    assert m._next_throttle(128 * MiB, 128 * MiB) <= 80
