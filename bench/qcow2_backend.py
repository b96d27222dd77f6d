#!/usr/bin/env python3
"""The qcow2 and raw backends in-process, without the harness: what one request costs.

128 KiB sequential requests from one buffer, straight into the backends'
read()/write() (no device process, no virtqueue), CPU time and wall time per
request, median over --reps runs, raw and qcow2 alternating:

    read / write   a raw file of random data and its vmmd-img convert (every
                   cluster allocated), in the page cache
    alloc-write    a new sparse raw file and a new qcow2 image: every write
                   lands on clusters never written (pool, L2 entries,
                   durable refcounts); both files are fsynced after each run

    python bench/qcow2_backend.py [--size MiB] [--reps N]
"""

from __future__ import annotations

import argparse
import mmap
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from devices.virtio_blk.backend import BlockBackend  # noqa: E402
from devices.virtio_blk.qcow2.image import create_qcow2  # noqa: E402
from devices.virtio_blk.qcow2_backend import Qcow2Backend  # noqa: E402

BS = 128 << 10


def _run(backend, op: str, n: int, segs: list) -> tuple[float, float]:
    f = backend.read if op == "read" else backend.write
    c0, t0 = time.process_time(), time.perf_counter()
    for i in range(n):
        f(i * (BS >> 9), segs, BS)
    return (1e6 * (time.process_time() - c0) / n, 1e6 * (time.perf_counter() - t0) / n)


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=256, help="disk size in MiB (default 256)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--dir", default=None)
    args = ap.parse_args()
    size = args.size << 20
    n = size // BS
    tmp = tempfile.mkdtemp(prefix="vmmd-bench-qcow2b-", dir=args.dir)
    raw, q = os.path.join(tmp, "r.raw"), os.path.join(tmp, "q.qcow2")
    araw, aq = os.path.join(tmp, "a.raw"), os.path.join(tmp, "a.qcow2")
    res: dict = {}
    try:
        with open(raw, "wb") as f:
            chunk = os.urandom(1 << 20)
            for _ in range(args.size):
                f.write(chunk)
        subprocess.run([sys.executable, "-m", "vmmd.img", "convert", "-O", "qcow2", raw, q],
                       check=True, cwd=ROOT)
        buf = mmap.mmap(-1, BS)
        buf.write(os.urandom(BS))
        segs = [memoryview(buf)]
        load = os.getloadavg()
        for _ in range(args.reps):
            for kind, make in (("raw", lambda: BlockBackend(raw)), ("qcow2", lambda: Qcow2Backend(q))):
                b = make()
                for op in ("read", "write"):
                    res.setdefault((op, kind), []).append(_run(b, op, n, segs))
                b.close()
            with open(araw, "wb") as f:
                f.truncate(size)
            create_qcow2(aq, size)
            for kind, make, path in (("raw", lambda: BlockBackend(araw), araw),
                                     ("qcow2", lambda: Qcow2Backend(aq), aq)):
                b = make()
                res.setdefault(("alloc-write", kind), []).append(_run(b, "write", n, segs))
                b.close()
                _fsync(path)
            os.unlink(araw)
            os.unlink(aq)
        load_after = os.getloadavg()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"backends in-process, 128 KiB sequential, {args.size} MiB, median of {args.reps}, "
          f"load {load[0]:.2f} -> {load_after[0]:.2f} on {os.cpu_count()} CPUs")
    print(f"{'':12} {'CPU us/request raw':>19} {'qcow2':>7} {'raw/qcow2':>9}   "
          f"{'wall us/request raw':>20} {'qcow2':>7} {'raw/qcow2':>9}")
    for op in ("read", "write", "alloc-write"):
        rc = statistics.median(x[0] for x in res[op, "raw"])
        qc = statistics.median(x[0] for x in res[op, "qcow2"])
        rw = statistics.median(x[1] for x in res[op, "raw"])
        qw = statistics.median(x[1] for x in res[op, "qcow2"])
        print(f"{op:12} {rc:19.1f} {qc:7.1f} {100 * rc / qc:8.0f}%   {rw:20.1f} {qw:7.1f} {100 * rw / qw:8.0f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
