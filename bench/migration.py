#!/usr/bin/env python3
"""Live migration: downtime and total time, 1 GiB guests, beside raw socket throughput.

Guest: tests/guests/gapwatch.S (-m 1G, sandbox on, one lpc device). It reads
the TSC in a loop and keeps the largest gap between two iterations (the
guest-observed stall), and optionally dirties one page per iteration
round-robin over 512 MiB with SPIN `dec; jnz` between iterations (the dirty
rate follows SPIN; the figure reported is what vmmd measured).

Per case: source vmmd, destination `vmmd --incoming URI`, migration.start
with the defaults (downtime 300 ms, auto-converge) unless told; reported:
vmmd's downtime (source vCPUs stopped -> destination says running), total
time, passes, bytes sent, dirty rate and bandwidth vmmd measured, the
throttle it reached, and the guest's largest gap (read from its memory in a
snapshot of the destination taken after the migration; TSC cycles / tsc_khz).
Baseline in the same run: raw socket throughput on the same transport
(one sender thread, sendall of 4 MiB buffers; one receiver thread, recv_into).

    python bench/migration.py [--transports unix,tcp] [--rates 64,128,256] [--spins S,...]
                              [--downtime-ms MS] [--json]

Dirty rates are the guest's own (pages written per second x 4 KiB, read
from its loop counter in guest RAM via vmmd's memfd in /proc, before the
migration starts, unthrottled); --rates calibrates SPIN to them first.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import struct
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from tests.guests.build import build_guest  # noqa: E402
from tests.vmmd_process import VmmdProcess  # noqa: E402

MiB = 1 << 20
_OUT_DIRS: list[str] = []
REC = 0x3ff000
DSTART = 0x400000


def _kill(vm: VmmdProcess) -> None:
    vm.crash()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def raw_throughput(transport: str, total: int = 1 << 30) -> float:
    """MiB/s of sendall/recv_into over a unix socket or TCP loopback."""
    if transport == "unix":
        a, b = socket.socketpair()
    else:
        srv = socket.socket()
        srv.bind(("127.0.0.1", 0))
        srv.listen(1)
        a = socket.create_connection(srv.getsockname())
        b, _ = srv.accept()
        srv.close()
    for s in (a, b):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    got = [0]

    def rx():
        buf = bytearray(4 << 20)
        while got[0] < total:
            n = b.recv_into(buf)
            if not n:
                break
            got[0] += n
    t = threading.Thread(target=rx)
    t0 = time.monotonic()
    t.start()
    chunk = os.urandom(4 << 20)
    for _ in range(total // len(chunk)):
        a.sendall(chunk)
    t.join()
    dt = time.monotonic() - t0
    a.close()
    b.close()
    return total / dt / MiB


def _guest_loops(vm: VmmdProcess) -> int:
    """The guest's loop count (REC+8: one page dirtied per loop), read from
    vmmd's guest-RAM memfd through /proc (root; the VM is not disturbed)."""
    fd_dir = f"/proc/{vm.proc.pid}/fd"
    for name in os.listdir(fd_dir):
        try:
            target = os.readlink(f"{fd_dir}/{name}")
        except OSError:
            continue
        if target.startswith("/memfd:vmmd-guest-ram"):
            with open(f"{fd_dir}/{name}", "rb") as f:
                f.seek(REC + 8)  # low RAM: memfd offset == guest-physical address
                return struct.unpack("<Q", f.read(8))[0]
    raise RuntimeError("guest RAM memfd not found")


def guest_dirty_mibs(vm: VmmdProcess, seconds: float = 1.0) -> float:
    """The rate the guest dirties pages at, as it runs (MiB/s of pages written)."""
    n0, t0 = _guest_loops(vm), time.monotonic()
    time.sleep(seconds)
    n1, t1 = _guest_loops(vm), time.monotonic()
    return (n1 - n0) * 4096 / (t1 - t0) / MiB


SWEEP_PAGES = (512 << 20) // 4096


def wait_one_sweep(vm: VmmdProcess, timeout: float = 120) -> None:
    """Until the guest has written its whole 512 MiB range once: before that its
    rate is the first-touch (page fault) rate, not its steady dirtying rate."""
    deadline = time.monotonic() + timeout
    while _guest_loops(vm) < SWEEP_PAGES:
        if time.monotonic() > deadline:
            raise RuntimeError("the guest did not sweep its range")
        time.sleep(0.1)


def dirtier(out_dir: str, spin: int):
    return build_guest("gapwatch", out_dir, {"DEND": DSTART + (512 << 20), "SPIN": spin},
                       name=f"gapwatch-dirty-s{spin}")


def calibrate(out_dir: str, target_mibs: float, tries: int = 5) -> tuple[int, float]:
    """A SPIN whose guest dirties about target_mibs (within 10 %), measured here and
    now. Time per loop is modelled as a + b * SPIN (fitted on the last two tries)."""
    spin, points = 6000, []
    best = None
    for _ in range(tries):
        with tempfile.TemporaryDirectory(prefix="bench-mig-cal-") as tmp:
            vm = VmmdProcess(__import__("pathlib").Path(tmp), ["-m", "1G", "-s", "31,lpc", "--raw",
                                                               str(dirtier(out_dir, spin)), "--raw-mode", "long-cpl3"])
            try:
                vm.wait_api(60)
                vm.wait_for("G", 60)
                wait_one_sweep(vm)
                rate = guest_dirty_mibs(vm, 1.5)
            finally:
                _kill(vm)
        if best is None or abs(rate - target_mibs) < abs(best[1] - target_mibs):
            best = (spin, rate)
        if abs(rate - target_mibs) <= 0.1 * target_mibs:
            break
        points.append((spin, 4096 / (rate * MiB)))  # seconds per loop
        want = 4096 / (target_mibs * MiB)
        if len(points) >= 2 and points[-1][0] != points[-2][0]:
            (s0, t0), (s1, t1) = points[-2:]
            b = (t1 - t0) / (s1 - s0)
            a = t1 - b * s1
            spin = int((want - a) / b) if b > 0 else spin * 2
        else:
            spin = int(spin * rate / target_mibs)
        spin = max(1, spin)
    return best


def guest_gap_ms(vm: VmmdProcess, tmp: str) -> float | None:
    snap = os.path.join(tmp, f"gap-{time.monotonic_ns()}")
    vm.rpc("snapshot.create", {"path": snap, "resume": False}, timeout=120)
    with open(os.path.join(snap, "ram.img"), "rb") as f:
        f.seek(REC)
        cycles = struct.unpack("<Q", f.read(8))[0]
    with open(os.path.join(snap, "vm-vm.json")) as f:
        khz = json.load(f)["state"]["clock"]["tsc_khz"]
    return cycles / khz if khz else None


def one(transport: str, guest, tmp: str, params: dict, dirties: bool) -> dict:
    uri = f"unix:{tmp}/mig.sock" if transport == "unix" else f"tcp:127.0.0.1:{_free_port()}"
    a_dir, b_dir = os.path.join(tmp, "a"), os.path.join(tmp, "b")
    os.makedirs(a_dir)
    os.makedirs(b_dir)
    src = VmmdProcess(__import__("pathlib").Path(a_dir), ["-m", "1G", "-s", "31,lpc", "--raw", str(guest),
                                                          "--raw-mode", "long-cpl3"])
    dst = None
    try:
        src.wait_api(60)
        src.wait_for("G", 60)
        guest_rate = 0.0
        if dirties:
            wait_one_sweep(src)
            guest_rate = guest_dirty_mibs(src)  # unthrottled, before the migration
        else:
            time.sleep(1.0)
        dst = VmmdProcess(__import__("pathlib").Path(b_dir), ["--incoming", uri])
        while "waiting for an incoming" not in dst.stderr():
            if dst.proc.poll() is not None:
                raise RuntimeError(dst.stderr())
            time.sleep(0.05)
        t0 = time.monotonic()
        src.rpc("migration.start", {"uri": uri, **params})
        peak_rate = 0.0
        st = None
        while True:
            try:
                st = src.rpc("migration.status", timeout=5)
            except (OSError, ValueError):
                break
            peak_rate = max(peak_rate, st.get("dirty_rate_mibs") or 0)
            if st["state"] in ("completed", "failed", "cancelled"):
                break
            time.sleep(0.05)
        wall = time.monotonic() - t0
        out = {"transport": transport, "state": st["state"], "error": st.get("error"),
               "guest_dirty_mibs": round(guest_rate, 1), "kvm_dirty_log": st.get("kvm_dirty_log"),
               "downtime_ms": st.get("downtime_ms"), "total_ms": st.get("total_ms"), "wall_s": round(wall, 2),
               "passes": st.get("iteration"), "bytes_sent": st.get("bytes_sent"),
               "dirty_rate_mibs_peak": peak_rate, "bandwidth_mibs": st.get("bandwidth_mibs"),
               "throttle_pct": st.get("throttle_pct"), "switchover_ms": st.get("switchover_ms")}
        if st["state"] == "completed":
            dst.wait_api(60)
            time.sleep(0.5)
            out["guest_gap_ms"] = round(guest_gap_ms(dst, tmp), 1)
        return out
    finally:
        _kill(src)
        if dst is not None:
            _kill(dst)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--transports", default="unix,tcp")
    ap.add_argument("--spins", default="",
                    help="SPIN values of extra dirtying cases (smaller = faster dirtying)")
    ap.add_argument("--rates", default="64,128,256",
                    help="dirtying cases at these guest dirty rates (MiB/s), SPIN calibrated here first")
    ap.add_argument("--downtime-ms", type=float, default=None, help="migration.start downtime_ms (default 300)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    out_dir = tempfile.mkdtemp(prefix="bench-mig-guests-")
    _OUT_DIRS.append(out_dir)  # removed at exit
    idle = build_guest("gapwatch", out_dir, {"DEND": DSTART, "SPIN": 1000}, name="gapwatch-idle")
    results = {"loadavg_before": os.getloadavg(), "baseline_mibs": {}, "cases": []}
    for tr in args.transports.split(","):
        results["baseline_mibs"][tr] = round(raw_throughput(tr), 1)
    cases = [("idle", idle, tr, {}) for tr in args.transports.split(",")]
    extra = {"timeout_s": 120}
    if args.downtime_ms is not None:
        extra["downtime_ms"] = args.downtime_ms
    for target in (float(r) for r in args.rates.split(",") if r):
        spin, rate = calibrate(out_dir, target)
        results.setdefault("calibration", []).append({"target_mibs": target, "spin": spin, "measured_mibs": round(rate, 1)})
        cases.append((f"dirty ~{target:g} MiB/s", dirtier(out_dir, spin), "unix", extra))
    for spin in (int(s) for s in args.spins.split(",") if s):
        cases.append((f"dirty spin={spin}", dirtier(out_dir, spin), "unix", extra))
    for name, guest, tr, params in cases:
        with tempfile.TemporaryDirectory(prefix="bench-mig-") as tmp:
            r = one(tr, guest, tmp, params, name != "idle")
        r["case"] = name
        results["cases"].append(r)
        if not args.json:
            print(f"{name:22} {tr:4}: guest dirtying {r['guest_dirty_mibs']} MiB/s, {r['state']:9} downtime {r['downtime_ms']} ms (guest gap "
                  f"{r.get('guest_gap_ms')} ms), total {r['total_ms']} ms, {r['passes']} passes, "
                  f"{(r['bytes_sent'] or 0) / MiB:.0f} MiB sent at {r['bandwidth_mibs']} MiB/s, "
                  f"dirty peak {r['dirty_rate_mibs_peak']} MiB/s, throttle {r['throttle_pct']}%"
                  + f" phases {r.get('switchover_ms')}"
                  + (f" error: {r['error']}" if r.get("error") else ""), flush=True)
    results["loadavg_after"] = os.getloadavg()
    if args.json:
        print(json.dumps(results, indent=1))
    else:
        print("baseline raw socket MiB/s:", results["baseline_mibs"])
        print("calibration (target MiB/s -> SPIN, measured):", results.get("calibration"))
        print("loadavg before/after:", results["loadavg_before"], results["loadavg_after"])
    return 0


if __name__ == "__main__":
    import shutil
    try:
        sys.exit(main())
    finally:
        for d in _OUT_DIRS:
            shutil.rmtree(d, ignore_errors=True)
