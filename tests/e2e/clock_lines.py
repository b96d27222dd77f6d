"""Which new kernel clock lines a paused-and-resumed guest may log.

A snapshot restore or a migration stops the guest for longer than its
clocksource watchdog expects. The kernel's watchdog compares the TSC with
kvm-clock every 0.5 s; when its own timer ran more than 1 s late, it logs
both clocks' view of the interval and skips the comparison
(kernel/time/clocksource.c, WATCHDOG_INTERVAL_MAX_NS). A guest stopped for
over 1 s sees exactly that on resume, its clocks having gone on by the
pause (first lab runs: a 17.5 s interval with the two clocks 8 us apart,
a 2.8 s one 0.5 us apart). Such a line is fine when the two clocks agree
within the watchdog's own threshold (WATCHDOG_THRESHOLD, 62.5 ms); a TSC
that jumped would not. Likewise the watchdog's "wd-wd read-back delay of
N ns" / "wd-tsc-wd read-back delay ..., clock-skew test skipped!": reading
kvm-clock back to back took longer than the kernel allows (the vCPU
preempted between the reads, which under the lab's TCG happens), so it
skipped that comparison; it says nothing against the TSC. Anything else,
and any line saying "unstable", is a clock the restore or move broke.
"""

from __future__ import annotations

import re

LONG_READOUT = re.compile(r"Long readout interval, skipping watchdog check: "
                          r"cs_nsec: (-?\d+) wd_nsec: (-?\d+)")
WATCHDOG_THRESHOLD_NS = 62_500_000
READ_BACK_DELAY = re.compile(r"read-back delay of \d+ns")


def bad_clock_lines(before: list[str], after: list[str]) -> list[str]:
    """The lines in `after` (dmesg lines about clocksource/TSC) that are new
    since `before` and not one of the harmless watchdog skips above, plus
    any line at all that says "unstable"."""
    new = [line for line in after if line not in before]
    bad = [line for line in new if not READ_BACK_DELAY.search(line)
           and (not (m := LONG_READOUT.search(line))
                or abs(int(m.group(1)) - int(m.group(2))) > WATCHDOG_THRESHOLD_NS)]
    return bad + [line for line in after if "unstable" in line.lower() and line not in bad]
