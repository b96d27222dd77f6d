#!/usr/bin/env python3
"""virtio-blk throughput through the driver harness, against fio on the same file.

The guest is tests.harness (a Python virtio-pci driver in this process, with
vmmd's real PciBus and Supervisor, and FakeVm in place of KVM); the device is
a real sandboxed `devices.virtio_blk` process. The disk is a raw file in the
page cache (written, then read once before measuring). Workloads:

    4 KiB random read, queue depth 1 and 32
    128 KiB sequential read and write, queue depth 8

each for --seconds, in two modes: the fast path (kicks = ioeventfd, interrupts =
irqfd; vmmd not involved per request) and bus-only (kicks = MMIO WRITE messages
over the bus, interrupts = VECTOR events through vmmd's MSI-X emulation). The host
baseline is fio on the same file in the same run (--direct=0, time based):
ioengine=psync at QD1, libaio with iodepth=32 / 8 otherwise.

    python bench/virtio_blk.py [--seconds S] [--size MiB] [--sandbox on|log|off] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from tests.harness.blk import SECTOR, VirtioBlk, blk_spec  # noqa: E402
from tests.harness.driver import Harness  # noqa: E402

WORKLOADS = [
    # name, rw, block size, queue depth, sequential
    ("randread-4k-qd1", "read", 4096, 1, False),
    ("randread-4k-qd32", "read", 4096, 32, False),
    ("seqread-128k-qd8", "read", 128 << 10, 8, True),
    ("seqwrite-128k-qd8", "write", 128 << 10, 8, True),
]


STALL_WARN = 10.0     # seconds without a completion: say so on stderr, keep waiting ...
STALL_LIMIT = 120.0   # ... up to this (a loaded machine may starve the device that long)


def cpu_seconds(pid: int | None) -> float | None:
    """User + system CPU time a process has used (None without a pid / once it is gone)."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Stalled(RuntimeError):
    """No completion within STALL_LIMIT: the run is abandoned, with the load."""


def stall_probe(disk: VirtioBlk) -> str:
    """Which side lost the wake-up: completions already in the used ring (an
    interrupt lost), or the device moving on after a forced kick (a kick lost)."""
    if disk.drv.poll_used(0):
        return "completions were in the used ring: the interrupt was lost"
    disk.drv.kick(0, force=True)
    if disk.drv.wait_used(0, 5.0):
        return "a forced kick got completions: the kick was lost"
    return "a forced kick got nothing in 5 s: the device is stuck"


def run_harness(disk: VirtioBlk, rw: str, bs: int, qd: int, sequential: bool, seconds: float,
                start_block: int = 0, stop_at_end: bool = False, max_requests: int | None = None,
                stall_limit: float = STALL_LIMIT, device_pid: int | None = None) -> dict:
    """QD requests in flight for `seconds`. Sequential runs start at
    start_block and wrap at the end of the disk (or, with stop_at_end, stop
    there); the result says where the next run would start (next_block).
    max_requests: stop submitting after that many (and `seconds`, whichever first).
    device_pid: the device process, whose CPU time per request is reported
    (device_cpu_us: what the device spent, however busy the machine was).
    max_wait_s is the longest wait for a completion: on a starved machine it
    shows in the figures instead of killing the benchmark."""
    nsect = bs // SECTOR
    blocks = disk.config.capacity // nsect
    rng = random.Random(1)
    payload = os.urandom(bs)
    pos = [start_block % blocks]
    wrapped = [False]

    def next_sector() -> int:
        if sequential:
            b = pos[0]
            pos[0] = (b + 1) % blocks
            wrapped[0] |= pos[0] == 0
            return b * nsect
        return rng.randrange(blocks) * nsect

    def submit():
        if rw == "read":
            return disk.submit_read(next_sector(), nsect, kick=False)
        return disk.submit_write(next_sector(), payload, kick=False)

    budget = [max_requests if max_requests is not None else 1 << 62]

    def more() -> bool:
        return budget[0] > 0 and not (stop_at_end and wrapped[0])

    inflight = 0
    for _ in range(qd):
        if not more():
            break
        submit()
        budget[0] -= 1
        inflight += 1
    done = 0
    max_wait = 0.0
    cpu0 = cpu_seconds(device_pid)
    start = time.perf_counter()
    deadline = start + seconds
    disk.kick()
    while inflight:
        t0 = time.perf_counter()
        reqs = disk.wait_any(0, timeout=STALL_WARN)
        while not reqs:
            waited = time.perf_counter() - t0
            load = os.getloadavg()
            if waited >= stall_limit:
                raise Stalled(f"{rw} {bs} B QD{qd}: no completion within {waited:.0f} s "
                              f"({inflight} in flight, load {load[0]:.1f} on {os.cpu_count()} CPUs; "
                              f"{disk.drv.queue_state(0)}; {stall_probe(disk)})")
            print(f"bench: {rw} {bs} B QD{qd}: no completion for {waited:.0f} s "
                  f"(load {load[0]:.1f}), still waiting", file=sys.stderr, flush=True)
            reqs = disk.wait_any(0, timeout=min(STALL_WARN, stall_limit - waited))
        max_wait = max(max_wait, time.perf_counter() - t0)
        for r in reqs:
            if r.status != 0:
                what = "no status written" if r.status == 0xEE else f"status {r.status}"
                raise RuntimeError(f"{rw} {bs} B QD{qd}: a request completed with {what}")
        inflight -= len(reqs)
        done += len(reqs)
        if time.perf_counter() < deadline and more():
            for _ in reqs:
                if not more():
                    break
                submit()
                budget[0] -= 1
                inflight += 1
            disk.kick()
    elapsed = time.perf_counter() - start
    cpu1 = cpu_seconds(device_pid)
    cpu_us = 1e6 * (cpu1 - cpu0) / done if cpu0 is not None and cpu1 is not None and done else None
    return {"iops": done / elapsed, "mbps": done * bs / elapsed / 1e6, "requests": done,
            "max_wait_s": max_wait, "next_block": pos[0], "wrapped": wrapped[0],
            "device_cpu_us": cpu_us}


def run_fio(path: str, rw: str, bs: int, qd: int, sequential: bool, seconds: float,
            engine: str | None = None) -> dict | None:
    if shutil.which("fio") is None:
        return None
    mode = ("" if sequential else "rand") + rw
    cmd = ["fio", "--name=baseline", f"--filename={path}", f"--rw={mode}", f"--bs={bs}",
           "--direct=0", "--time_based", f"--runtime={seconds}", "--output-format=json",
           "--randrepeat=0", "--norandommap"]
    engine = engine or ("psync" if qd == 1 else "libaio")
    cmd += ["--ioengine=psync"] if engine == "psync" else ["--ioengine=libaio", f"--iodepth={qd}"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60)
    if out.returncode != 0:
        print(f"fio failed: {out.stderr.strip()}", file=sys.stderr)
        return None
    job = json.loads(out.stdout[out.stdout.index("{"):])["jobs"][0][rw]
    return {"iops": job["iops"], "mbps": job["bw_bytes"] / 1e6, "cmd": " ".join(cmd)}


def measure_mode(path: str, bus_only: bool, seconds: float, sandbox: str) -> dict:
    results = {}
    with Harness(sandbox=sandbox, bus_only=bus_only, mem_size=256 << 20, timeout=60.0) as h:
        h.add_device(blk_spec(path, 2, ["cache=writeback"], bus_only=bus_only))
        disk = VirtioBlk(h, 2)
        disk.copy_data = False
        run_harness(disk, "read", 4096, 1, False, min(0.3, seconds))  # warm up
        for name, rw, bs, qd, seq in WORKLOADS:
            results[name] = run_harness(disk, rw, bs, qd, seq, seconds)
    return results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=3.0, help="per workload and mode (default 3)")
    ap.add_argument("--size", type=int, default=256, help="disk size in MiB (default 256)")
    ap.add_argument("--sandbox", default="on", choices=("on", "log", "off"))
    ap.add_argument("--dir", default=None, help="where the disk file goes (default: a temp dir)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    tmp = tempfile.mkdtemp(prefix="vmmd-bench-blk-", dir=args.dir)
    path = os.path.join(tmp, "disk.raw")
    try:
        with open(path, "wb") as f:
            chunk = os.urandom(1 << 20)
            for _ in range(args.size):
                f.write(chunk)
        with open(path, "rb") as f:  # into the page cache
            while f.read(1 << 24):
                pass
        fast = measure_mode(path, False, args.seconds, args.sandbox)
        bus = measure_mode(path, True, args.seconds, args.sandbox)
        host, host_sync = {}, {}
        for name, rw, bs, qd, seq in WORKLOADS:  # reads first, the write last (as listed)
            host[name] = run_fio(path, rw, bs, qd, seq, args.seconds)
            # Buffered libaio (--direct=0) completes inside io_submit, so at depth > 1 it is
            # no faster than one synchronous thread; psync is the host's one-thread ceiling.
            host_sync[name] = run_fio(path, rw, bs, 1, seq, args.seconds) if qd > 1 else host[name]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    rows = []
    for name, rw, bs, qd, seq in WORKLOADS:
        f, b, hst, hsync = fast[name], bus[name], host[name], host_sync[name]
        rows.append({
            "workload": name, "fast_iops": f["iops"], "fast_mbps": f["mbps"],
            "bus_iops": b["iops"], "bus_mbps": b["mbps"],
            "fio_iops": hst["iops"] if hst else None, "fio_mbps": hst["mbps"] if hst else None,
            "fio_psync_iops": hsync["iops"] if hsync else None,
            "fio_psync_mbps": hsync["mbps"] if hsync else None,
            "fast_vs_fio": f["iops"] / hst["iops"] if hst and hst["iops"] else None,
            "fast_vs_fio_psync": f["iops"] / hsync["iops"] if hsync and hsync["iops"] else None,
            "fast_vs_bus": f["iops"] / b["iops"] if b["iops"] else None,
            "fio_cmd": hst["cmd"] if hst else None,
        })
    if args.json:
        print(json.dumps({"seconds": args.seconds, "size_mib": args.size, "sandbox": args.sandbox,
                          "rows": rows}, indent=2))
        return 0
    print(f"virtio-blk through the harness, {args.size} MiB raw file in the page cache, "
          f"{args.seconds:g} s per run, sandbox {args.sandbox}, {os.cpu_count()} CPUs")
    print(f"{'workload':<20} {'fast path':>20} {'bus-only':>20} {'fio (host)':>20} "
          f"{'fio psync QD1':>20} {'fast/fio':>9} {'fast/psync':>10} {'fast/bus':>9}")

    def cell(iops, mbps):
        return "-" if iops is None else f"{iops:8.0f} IOPS {mbps:6.1f}MB/s"

    for r in rows:
        ff = "-" if r["fast_vs_fio"] is None else f"{100 * r['fast_vs_fio']:.1f}%"
        fs = "-" if r["fast_vs_fio_psync"] is None else f"{100 * r['fast_vs_fio_psync']:.1f}%"
        fb = "-" if r["fast_vs_bus"] is None else f"{r['fast_vs_bus']:.2f}x"
        print(f"{r['workload']:<20} {cell(r['fast_iops'], r['fast_mbps']):>20} "
              f"{cell(r['bus_iops'], r['bus_mbps']):>20} {cell(r['fio_iops'], r['fio_mbps']):>20} "
              f"{cell(r['fio_psync_iops'], r['fio_psync_mbps']):>20} {ff:>9} {fs:>10} {fb:>9}")
    print("fio:", *(r["fio_cmd"] for r in rows if r["fio_cmd"]), sep="\n  ")
    return 0


if __name__ == "__main__":
    sys.exit(main())
