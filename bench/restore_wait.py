#!/usr/bin/env python3
"""Restore-to-running of a 1 GiB idle guest, cold against a waiting vmmd, in pairs.

One snapshot of the ticker guest (-m 1G, one lpc, sandbox on), then N pairs,
alternating: a cold `vmmd --restore` (spawn -> its log line "restore: vCPUs
started") and a fresh `vmmd --restore-wait` with its spares ready
(snapshot.restore sent -> the same line; bench/snapshot.py's restore_wait()).
Alternating pairs share the load of the moment; prints medians, minimum,
maximum, every figure, and how many waiting restores took <= 200 ms.

    python bench/restore_wait.py [N]      # default 10 pairs
"""
import sys, os, re, time, shutil, tempfile, statistics
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT); sys.path.insert(0, os.path.join(ROOT, "bench"))
from pathlib import Path

import snapshot as b  # noqa: E402
from tests.guests.build import build_ticker
from tests.vmmd_process import VmmdProcess


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="fr-alt-", dir="/var/tmp"))
    try:
        (work / "a").mkdir()
        vm = VmmdProcess(work / "a", ["-m", "1G", "-s", "31,lpc", "--raw", str(build_ticker()), "--raw-mode", "long-cpl3"])
        try:
            vm.wait_api(60); vm.wait_for("PING 1\n", 120)
            vm.rpc("snapshot.create", {"path": str(work / "snap")}, timeout=300)
        finally:
            vm.crash()
        cold, wait = [], []
        load0 = os.getloadavg()
        for i in range(int(sys.argv[1]) if len(sys.argv) > 1 else 10):
            d = work / f"c{i}"; d.mkdir()
            t = time.monotonic()
            v = VmmdProcess(d, ["--restore", str(work / "snap")])
            try:
                m = None
                while m is None and v.proc.poll() is None:
                    m = re.search(r"restore: vCPUs started at monotonic ([\d.]+)", v.stderr()); time.sleep(0.005)
                cold.append((float(m.group(1)) - t) * 1000)
            finally:
                v.crash()
            r = b.restore_wait(str(work / "snap"), str(work / f"w{i}"), "idle")
            wait.append(r["wait_call_to_vcpus_ms"])
        load1 = os.getloadavg()
        q = lambda v: f"median {statistics.median(v):.0f} ms, min {min(v):.0f}, max {max(v):.0f}, all {[round(x) for x in v]}"
        print("load", [round(x, 2) for x in load0], "->", [round(x, 2) for x in load1])
        print("cold spawn->vCPUs:", q(cold)); print("wait call->vCPUs:", q(wait))
        print("wait <= 200 ms:", sum(x <= 200 for x in wait), "of", len(wait))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
