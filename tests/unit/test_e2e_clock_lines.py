"""The e2e tests' judgement of new guest clock lines after a restore or a
migration (tests/e2e/clock_lines.py), on lines the lab's guests logged."""

from __future__ import annotations

from tests.e2e.clock_lines import bad_clock_lines

BOOT = ["[    0.000000] tsc: Detected 2994.374 MHz processor",
        "[    0.300011] clocksource: Switched to clocksource kvm-clock"]


def test_a_pause_the_two_clocks_agree_on_is_not_a_clock_problem():
    # CI lab run, snapshot restored with --clock advance: 2.8 s, 0.5 us apart
    line = ("[   38.061330] clocksource: Long readout interval, skipping watchdog check: "
            "cs_nsec: 2848543789 wd_nsec: 2848543288")
    assert bad_clock_lines(BOOT, BOOT + [line]) == []
    skew = "[   12.5] clocksource: wd-tsc-wd read-back delay of 368210ns, clock-skew test skipped!"
    assert bad_clock_lines(BOOT, BOOT + [skew]) == []


def test_a_jumped_tsc_a_switch_or_unstable_is():
    jumped = ("[   38.0] clocksource: Long readout interval, skipping watchdog check: "
              "cs_nsec: 3848543789 wd_nsec: 2848543288")
    assert bad_clock_lines(BOOT, BOOT + [jumped]) == [jumped]
    switch = "[   40.1] clocksource: Switched to clocksource hpet"
    unstable = "[   40.0] clocksource: Marking clocksource 'tsc' as unstable because the skew is too large:"
    assert bad_clock_lines(BOOT, BOOT + [unstable, switch]) == [unstable, switch]
    # "unstable" counts even when it was already there before
    assert bad_clock_lines(BOOT + [unstable], BOOT + [unstable]) == [unstable]
