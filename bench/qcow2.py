#!/usr/bin/env python3
"""qcow2 against raw through the virtio-blk driver harness, same file system, same run.

Sandboxed virtio-blk devices in one harness (tests.harness; the fast path:
ioeventfd kicks, irqfd interrupts):

  * slot 2 a raw file, slot 3 a qcow2 image with the same content (converted
    with vmmd-img, so every cluster is allocated: the "allocated data" case),
    both in the page cache: random and sequential reads and writes;
  * slot 4 a sparse raw file, slot 5 an empty qcow2 image of the same virtual
    size (--alloc-size): sequential writes into clusters never written
    before (the "allocating" case: the qcow2 side takes clusters from its
    pool, writes L2 entries and makes refcounts durable). Each run goes on
    where the previous one stopped, and stops at the end of the disk, so
    every write of this workload allocates. A run writes at most --alloc-run
    MiB, and both files are fsynced before each run (outside the timing), so
    that no run pays for the previous runs' writeback.

Each workload runs raw, qcow2, raw, qcow2 ... (--rounds times each, default
3); the figure is the best run of each (the machine is shared), with the
median and the longest wait for a completion beside it. Target: qcow2 >= 80 %
of raw. Beside the rates, the device process's CPU time per request (median
over the runs; /proc/PID/stat) for each format, and raw's as a percentage
of qcow2's: the backend's own cost, which a busy machine barely changes,
while the rates swing with the other processes' load.

A run that gets no completion for 10 s is reported on stderr and waited for
up to 120 s (a starved machine); past that the benchmark stops with what it
has and says which workload and disk stalled, with the load average
(likewise if a request fails).

    python bench/qcow2.py [--seconds S] [--rounds N] [--size MiB] [--alloc-size MiB]
                          [--alloc-run MiB] [--cluster-size N] [--only NAME,...] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from bench.virtio_blk import run_harness  # noqa: E402
from tests.harness.blk import VirtioBlk, blk_spec  # noqa: E402
from tests.harness.driver import Harness  # noqa: E402

WORKLOADS = [
    # name, rw, block size, queue depth, sequential, disks (allocated / allocating)
    ("randread-4k-qd1", "read", 4096, 1, False, "data"),
    ("randread-4k-qd32", "read", 4096, 32, False, "data"),
    ("randwrite-4k-qd1", "write", 4096, 1, False, "data"),
    ("randwrite-4k-qd32", "write", 4096, 32, False, "data"),
    ("seqread-128k-qd8", "read", 128 << 10, 8, True, "data"),
    ("seqwrite-128k-qd8", "write", 128 << 10, 8, True, "data"),
    ("seqwrite-alloc-128k-qd8", "write", 128 << 10, 8, True, "alloc"),
]


def _median_cpu(runs: list) -> float | None:
    v = [r["device_cpu_us"] for r in runs if r.get("device_cpu_us") is not None]
    return statistics.median(v) if v else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=2.0, help="per workload and run (default 2)")
    ap.add_argument("--rounds", type=int, default=3, help="runs per workload and format (default 3)")
    ap.add_argument("--size", type=int, default=256, help="disk size in MiB (default 256)")
    ap.add_argument("--alloc-size", type=int, default=2048,
                    help="virtual size of the allocating disks in MiB (default 2048)")
    ap.add_argument("--alloc-run", type=int, default=256,
                    help="MiB written at most per allocating run (default 256)")
    ap.add_argument("--cluster-size", type=int, default=65536)
    ap.add_argument("--only", default=None, help="comma-separated workload names")
    ap.add_argument("--dir", default=None, help="where the disk files go (default: a temp dir)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    workloads = [w for w in WORKLOADS if args.only is None or w[0] in args.only.split(",")]
    if not workloads:
        ap.error(f"--only: no such workload (one of {', '.join(w[0] for w in WORKLOADS)})")

    tmp = tempfile.mkdtemp(prefix="vmmd-bench-qcow2-", dir=args.dir)
    raw, qcow = os.path.join(tmp, "disk.raw"), os.path.join(tmp, "disk.qcow2")
    araw, aqcow = os.path.join(tmp, "alloc.raw"), os.path.join(tmp, "alloc.qcow2")
    runs: dict = {"raw": {}, "qcow2": {}}
    stalled = None
    try:
        with open(raw, "wb") as f:
            chunk = os.urandom(1 << 20)
            for _ in range(args.size):
                f.write(chunk)
        subprocess.run([sys.executable, "-m", "vmmd.img", "convert", "-O", "qcow2", "-o",
                        f"cluster_size={args.cluster_size}", raw, qcow], check=True, cwd=ROOT)
        with open(araw, "wb") as f:
            f.truncate(args.alloc_size << 20)
        subprocess.run([sys.executable, "-m", "vmmd.img", "create", "-f", "qcow2", "-o",
                        f"cluster_size={args.cluster_size}", aqcow, f"{args.alloc_size}M"],
                       check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
        for p in (raw, qcow):
            with open(p, "rb") as f:   # into the page cache
                while f.read(1 << 24):
                    pass
        load = os.getloadavg()
        with Harness(sandbox="on", mem_size=256 << 20, timeout=60.0) as h:
            devs = [h.add_device(blk_spec(raw, 2, ["cache=writeback", "format=raw"])),
                    h.add_device(blk_spec(qcow, 3, ["cache=writeback", "format=qcow2"])),
                    h.add_device(blk_spec(araw, 4, ["cache=writeback", "format=raw"])),
                    h.add_device(blk_spec(aqcow, 5, ["cache=writeback", "format=qcow2"]))]
            pids = dict(zip((("data", "raw"), ("data", "qcow2"), ("alloc", "raw"), ("alloc", "qcow2")),
                            (d.current.pid if d.current else None for d in devs)))
            disks = {("data", "raw"): VirtioBlk(h, 2), ("data", "qcow2"): VirtioBlk(h, 3),
                     ("alloc", "raw"): VirtioBlk(h, 4), ("alloc", "qcow2"): VirtioBlk(h, 5)}
            for (which, _), d in disks.items():
                d.copy_data = False
                if which == "data":
                    run_harness(d, "read", 4096, 1, False, min(0.3, args.seconds))  # warm up
            next_block = {"raw": 0, "qcow2": 0}
            try:
                for name, rw, bs, qd, seq, which in workloads:
                    for _ in range(args.rounds):
                        for kind in ("raw", "qcow2"):
                            if which == "alloc":
                                for p in (araw, aqcow):
                                    fd = os.open(p, os.O_RDONLY)
                                    os.fsync(fd)
                                    os.close(fd)
                                r = run_harness(disks[which, kind], rw, bs, qd, seq, args.seconds,
                                                start_block=next_block[kind], stop_at_end=True,
                                                max_requests=(args.alloc_run << 20) // bs,
                                                device_pid=pids[which, kind])
                                next_block[kind] = r["next_block"]
                                if r["wrapped"]:
                                    print(f"bench: {kind} allocating disk full (--alloc-size)",
                                          file=sys.stderr)
                            else:
                                r = run_harness(disks[which, kind], rw, bs, qd, seq, args.seconds,
                                                device_pid=pids[which, kind])
                            runs[kind].setdefault(name, []).append(r)
            except RuntimeError as exc:   # Stalled, or a request that failed
                stalled = f"{name} on {kind}: {exc}"
                print(f"bench: {stalled}; stopping here", file=sys.stderr)
        load_after = os.getloadavg()
        check = subprocess.run(["qemu-img", "check", qcow], capture_output=True, text=True) \
            if shutil.which("qemu-img") else None
        acheck = subprocess.run(["qemu-img", "check", aqcow], capture_output=True, text=True) \
            if shutil.which("qemu-img") else None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    rows = []
    for name, *_ in workloads:
        rr, qq = runs["raw"].get(name), runs["qcow2"].get(name)
        if not rr or not qq:
            continue
        r = max(rr, key=lambda x: x["iops"])
        q = max(qq, key=lambda x: x["iops"])
        rows.append({"workload": name, "raw_iops": r["iops"], "raw_mbps": r["mbps"],
                     "qcow2_iops": q["iops"], "qcow2_mbps": q["mbps"],
                     "ratio": q["iops"] / r["iops"] if r["iops"] else None,
                     "raw_median_iops": statistics.median(x["iops"] for x in rr),
                     "qcow2_median_iops": statistics.median(x["iops"] for x in qq),
                     "raw_runs": [round(x["iops"]) for x in rr],
                     "qcow2_runs": [round(x["iops"]) for x in qq],
                     "max_wait_s": max(x["max_wait_s"] for x in rr + qq),
                     "raw_cpu_us": _median_cpu(rr), "qcow2_cpu_us": _median_cpu(qq)})
    out = {"seconds": args.seconds, "rounds": args.rounds, "size_mib": args.size,
           "alloc_size_mib": args.alloc_size, "cluster_size": args.cluster_size,
           "loadavg_before": load, "loadavg_after": load_after, "rows": rows, "stalled": stalled,
           "qemu_img_check_rc": check.returncode if check else None,
           "qemu_img_check_alloc_rc": acheck.returncode if acheck else None}
    if args.json:
        print(json.dumps(out, indent=2))
        return 1 if stalled else 0
    print(f"qcow2 (cluster {args.cluster_size}) vs raw, {args.size} MiB, page cache, "
          f"{args.seconds:g} s x{args.rounds} per workload, sandbox on, {os.cpu_count()} CPUs, "
          f"load {load[0]:.2f} -> {load_after[0]:.2f}")
    print(f"{'workload':<24} {'raw (best)':>24} {'qcow2 (best)':>24} {'best':>7} {'median':>7} "
          f"{'max wait':>9} {'device CPU us/req raw, qcow2':>29}")
    for r in rows:
        med = r["qcow2_median_iops"] / r["raw_median_iops"] if r["raw_median_iops"] else 0
        cpu = (f"{r['raw_cpu_us']:8.0f} {r['qcow2_cpu_us']:8.0f} ({100 * r['raw_cpu_us'] / r['qcow2_cpu_us']:3.0f}%)"
               if r["raw_cpu_us"] and r["qcow2_cpu_us"] else "-")
        print(f"{r['workload']:<24} {r['raw_iops']:9.0f} IOPS {r['raw_mbps']:7.1f}MB/s "
              f"{r['qcow2_iops']:9.0f} IOPS {r['qcow2_mbps']:7.1f}MB/s {100 * r['ratio']:6.1f}% "
              f"{100 * med:6.1f}% {r['max_wait_s']:8.2f}s {cpu:>29}")
    for r in rows:
        print(f"  {r['workload']}: raw {r['raw_runs']} qcow2 {r['qcow2_runs']} IOPS")
    if check is not None:
        print(f"qemu-img check afterwards: allocated image exit {check.returncode}, "
              f"allocating image exit {acheck.returncode}")
    if stalled:
        print(f"STOPPED: {stalled} (the rows above are the workloads before it)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
