#!/usr/bin/env python3
"""virtio-balloon: time and rate to inflate and reclaim guest memory.

The guest is tests.harness (a Python driver playing Linux's virtio_balloon:
256 le32 PFNs per buffer, one buffer in flight, waiting for each to be used);
the device is a real sandboxed `devices.virtio_balloon` process punching the
guest memory memfd. Before the run the guest touches every page it will
give up, so the memfd's allocated blocks (st_blocks) really hold them.

Measured, for --mib of guest pages:
  * inflate: wall time from the first buffer to the last used element, pages/s
    and MiB/s, memfd allocated bytes before and after (the drop is the reclaim);
  * deflate of the same pages (no memory work: bookkeeping only);
  * free page reporting of the same amount in 4 MiB ranges (Linux reports
    order >= pageblock ranges, 32 per buffer);
  * baseline in the same run: a plain memfd of the same size, touched the same
    way, freed by Python with (a) one fallocate(PUNCH_HOLE) of the whole range,
    (b) one fallocate per 4 KiB page (the balloon's worst case: no two pages
    adjacent).

    python bench/balloon.py [--mib 256] [--sandbox on|log|off] [--json]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from tests.harness.balloon import PAGE, VirtioBalloon, balloon_spec  # noqa: E402
from tests.harness.driver import Harness  # noqa: E402

MiB = 1 << 20
_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
PUNCH = 0x02 | 0x01


def touch(mem, gpa: int, n: int) -> None:
    for i in range(n):
        mem.write(gpa + i * PAGE, b"\x5a")


def baseline(mib: int) -> dict:
    size = mib * MiB
    out = {}
    for name, per_page in (("punch_whole_range", False), ("punch_per_4k_page", True)):
        fd = os.memfd_create("bench-balloon", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, size)
            import mmap
            m = mmap.mmap(fd, size)
            for off in range(0, size, PAGE):
                m[off] = 0x5A
            before = os.fstat(fd).st_blocks * 512
            t0 = time.perf_counter()
            if per_page:
                for off in range(0, size, PAGE):
                    if _libc.fallocate(fd, PUNCH, off, PAGE):
                        raise OSError(ctypes.get_errno(), "fallocate")
            elif _libc.fallocate(fd, PUNCH, 0, size):
                raise OSError(ctypes.get_errno(), "fallocate")
            dt = time.perf_counter() - t0
            after = os.fstat(fd).st_blocks * 512
            m.close()
        finally:
            os.close(fd)
        out[name] = {"seconds": dt, "MiB_per_s": mib / dt, "pages_per_s": size // PAGE / dt,
                     "allocated_before": before, "allocated_after": after}
    return out


def run(mib: int, sandbox: str) -> dict:
    pages_n = mib * MiB // PAGE
    mem_size = (mib + 32) * MiB
    res: dict = {"mib": mib, "pages": pages_n, "sandbox": sandbox}
    with Harness(sandbox=sandbox, mem_size=mem_size) as h:
        dev = h.add_device(balloon_spec(3, ["stats_interval=0"]))
        b = VirtioBalloon(h, 3)
        pages = b.alloc_pages(pages_n, touch=False)
        gpa = pages[0] * PAGE
        touch(h.memory, gpa, pages_n)
        before = h.memory.allocated_bytes()
        t0 = time.perf_counter()
        b.inflate(pages)
        dt = time.perf_counter() - t0
        after = h.memory.allocated_bytes()
        info = dev.control("device", {"op": "info"})
        res["inflate"] = {"seconds": dt, "pages_per_s": pages_n / dt, "MiB_per_s": mib / dt,
                          "allocated_before": before, "allocated_after": after,
                          "reclaimed_on_memfd": before - after,
                          "device_reclaimed_bytes": info["reclaimed_bytes"],
                          "punch_calls": info["punch_calls"]}
        t0 = time.perf_counter()
        b.deflate(pages)
        dt = time.perf_counter() - t0
        res["deflate"] = {"seconds": dt, "pages_per_s": pages_n / dt, "MiB_per_s": mib / dt}
        # free page reporting: touch again, report in 4 MiB ranges, 32 per buffer
        touch(h.memory, gpa, pages_n)
        before = h.memory.allocated_bytes()
        step = 4 * MiB
        ranges = [(gpa + off, step) for off in range(0, mib * MiB, step)]
        t0 = time.perf_counter()
        for i in range(0, len(ranges), 32):
            b.report(ranges[i:i + 32])
        dt = time.perf_counter() - t0
        after = h.memory.allocated_bytes()
        res["report"] = {"seconds": dt, "MiB_per_s": mib / dt, "allocated_before": before,
                         "allocated_after": after, "reclaimed_on_memfd": before - after}
    res["baseline"] = baseline(mib)
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--sandbox", default="on", choices=("on", "log", "off"))
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    res = run(args.mib, args.sandbox)
    if args.json:
        print(json.dumps(res, indent=2))
        return 0
    i, d, r = res["inflate"], res["deflate"], res["report"]
    print(f"virtio-balloon, {args.mib} MiB ({res['pages']} pages), sandbox {args.sandbox}")
    print(f"  inflate  {i['seconds'] * 1e3:8.1f} ms  {i['pages_per_s']:10.0f} pages/s  "
          f"{i['MiB_per_s']:8.1f} MiB/s  memfd {i['allocated_before'] / MiB:.1f} -> "
          f"{i['allocated_after'] / MiB:.1f} MiB (reclaimed {i['reclaimed_on_memfd'] / MiB:.1f} MiB, "
          f"{i['punch_calls']} fallocate calls)")
    print(f"  deflate  {d['seconds'] * 1e3:8.1f} ms  {d['pages_per_s']:10.0f} pages/s  {d['MiB_per_s']:8.1f} MiB/s")
    print(f"  report   {r['seconds'] * 1e3:8.1f} ms  {r['MiB_per_s']:19.1f} MiB/s  memfd "
          f"{r['allocated_before'] / MiB:.1f} -> {r['allocated_after'] / MiB:.1f} MiB")
    for name, b in res["baseline"].items():
        print(f"  baseline {name:18s} {b['seconds'] * 1e3:8.1f} ms  {b['pages_per_s']:10.0f} pages/s  "
              f"{b['MiB_per_s']:8.1f} MiB/s  memfd {b['allocated_before'] / MiB:.1f} -> "
              f"{b['allocated_after'] / MiB:.1f} MiB")
    print(f"  inflate / whole-range punch: {i['seconds'] / res['baseline']['punch_whole_range']['seconds']:.1f}x "
          f"the time; / per-page punch: {i['seconds'] / res['baseline']['punch_per_4k_page']['seconds']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
