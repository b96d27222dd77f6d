#!/usr/bin/env python3
"""What a disk checkpoint costs: snapshot.create with "disks": "overlay" beside
"disks": "shared" on the same VM, in the same run, and restore of each.

The VM: -m 256M, the blkwriter guest (tests/guests/blkwriter.S) writing its
qcow2 disk (64 sectors per pass, one request at a time) on the benchmark's
file system. Per run, alternating: a shared snapshot and an overlay snapshot
(each in a new directory; the overlay one switches the disk to a new overlay,
so the chain grows by one per run). Reported (vmmd's own figures from the
reply): paused_ms (vCPUs stopped), capture_ms (devices + disks + vCPUs + VM),
disks_ms (the switch: overlay created and fsynced, fd passed, the device
flushes the old image and reopens it as a backing file), total_ms. Then
`vmmd --restore` of the last snapshot of each kind (--restores times, medians),
killed once the guest printed a line: restore-to-first-guest-instruction from
vmmd's log line (the overlay restore adds the image identity checks and a new
overlay).

    python bench/snapshot_disks.py [--runs 5] [--restores 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from tests.guests.build import build_guest  # noqa: E402
from tests.vmmd_process import VmmdProcess  # noqa: E402

RESTORED = re.compile(r"restore: vCPUs started at monotonic ([\d.]+), ([\d.]+) ms after main\(\) "
                      r"\(snapshot checks ([\d.]+) ms, RAM ([\d.]+) ms, device processes started in "
                      r"([\d.]+) ms")


def _kill(vm: VmmdProcess) -> None:
    vm.crash()


def restore_ms(snap: str, work: str) -> dict:
    os.makedirs(work)
    t_spawn = time.monotonic()
    vm = VmmdProcess(Path(work), ["--restore", snap])
    try:
        deadline = time.monotonic() + 120
        m = None
        while m is None and time.monotonic() < deadline and vm.proc.poll() is None:
            m = RESTORED.search(vm.stderr())
            time.sleep(0.01)
        if m is None:
            raise RuntimeError(f"restore did not start: {vm.stderr()[-2000:]}")
        vm.wait_for("GEN", 60)
    finally:
        _kill(vm)
    return {"from_spawn_ms": (float(m.group(1)) - t_spawn) * 1000, "from_main_ms": float(m.group(2)),
            "checks_ms": float(m.group(3)), "devices_spawn_ms": float(m.group(5))}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--restores", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    guest = str(build_guest("blkwriter"))
    work = tempfile.mkdtemp(prefix="vmmd-bench-disks-", dir=os.environ.get("TMPDIR", "/var/tmp"))
    results: dict[str, list] = {"shared": [], "overlay": []}
    restores = {}
    try:
        disk = os.path.join(work, "disk.qcow2")
        subprocess.run(["qemu-img", "create", "-f", "qcow2", disk, "64M"], check=True, capture_output=True)
        os.makedirs(os.path.join(work, "a"))
        vm = VmmdProcess(Path(work, "a"), ["-m", "256M", "-s", "31,lpc", "-s", f"2,virtio-blk,{disk},format=qcow2",
                                           "--raw", guest, "--raw-mode", "long-cpl3"])
        last = {}
        try:
            vm.wait_api(60)
            vm.wait_for("GEN 2\n", 60)
            for run in range(args.runs):
                for mode in ("shared", "overlay"):
                    snap = os.path.join(work, f"snap-{mode}-{run}")
                    r = vm.rpc("snapshot.create", {"path": snap, "disks": mode}, timeout=300)
                    results[mode].append({"paused_ms": r["paused_ms"], "capture_ms": r["phases_ms"]["capture"],
                                          "disks_ms": r["phases_ms"].get("disks", 0.0),
                                          "total_ms": r["total_ms"]})
                    last[mode] = snap
                    time.sleep(0.2)   # the guest writes on between two snapshots
        finally:
            _kill(vm)
        # overlay first: the shared snapshot's restore writes the image the
        # overlay snapshot froze (a shared snapshot names the live image)
        for mode in ("overlay", "shared"):
            runs = [restore_ms(last[mode], os.path.join(work, f"r-{mode}-{i}")) for i in range(args.restores)]
            restores[mode] = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
            restores[mode]["runs_from_spawn_ms"] = [round(r["from_spawn_ms"]) for r in runs]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    load = os.getloadavg()
    if args.json:
        print(json.dumps({"create": results, "restore": restores, "loadavg": load}, indent=1))
        return 0
    print(f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; {args.runs} snapshots per mode, "
          "medians (min-max)")
    for k in ("paused_ms", "capture_ms", "disks_ms", "total_ms"):
        cells = []
        for mode in ("shared", "overlay"):
            vals = [r[k] for r in results[mode]]
            cells.append(f"{mode} {statistics.median(vals):7.1f} ({min(vals):.1f}-{max(vals):.1f})")
        print(f"  create {k:12s} " + "   ".join(cells))
    for k in ("from_spawn_ms", "from_main_ms", "checks_ms", "devices_spawn_ms"):
        print(f"  restore {k:13s} " + "   ".join(f"{m} {restores[m][k]:7.1f}" for m in ("shared", "overlay")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
