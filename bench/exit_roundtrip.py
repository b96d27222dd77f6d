#!/usr/bin/env python3
"""Exit round-trip benchmark: cost of one guest I/O exit, by who answers it.

Runs vmmd with the ``hammer`` test guest (tests/guests/README.md) and reads the
guest's own rdtsc counts per phase:

  p1  PIO read of port 0x510, answered inside vmmd (chipset.NullPorts): the baseline
  p2  PIO read of 0x3ff (COM1 scratch), a synchronous bus round trip to the lpc process
  p3  PIO write to 0x3ff, posted over the bus (no reply)
  p4  4-byte MMIO read at 0xd0000000, answered inside vmmd

Cycles are converted to microseconds with the vCPU TSC rate from KVM_GET_TSC_KHZ
(a throw-away VM + vCPU), or /proc/cpuinfo "cpu MHz" if /dev/kvm cannot be used.
Every figure and ratio comes from this run; nothing is compared with stored numbers.

    python bench/exit_roundtrip.py [--iterations N] [--runs N] [--sandbox on,off] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.guests.build import build_hammer  # noqa: E402
from tests.guests.checks import parse_hammer_output  # noqa: E402

PHASES = ("p1", "p2", "p3", "p4")
PHASE_LABELS = {
    "p1": "PIO read 0x510, in vmmd",
    "p2": "PIO read 0x3ff, bus round trip",
    "p3": "PIO write 0x3ff, posted on bus",
    "p4": "MMIO read 0xd0000000, in vmmd",
}
GUEST_CACHE = Path(tempfile.gettempdir()) / "vmmd-bench-guests"


def tsc_khz() -> tuple[float, str]:
    """(kHz, source). Prefer the vCPU's TSC rate as KVM reports it."""
    try:
        from vmmd.kvm.api import Kvm
        kvm = Kvm()
        try:
            vm = kvm.create_vm()
            try:
                vcpu = vm.create_vcpu(0)
                try:
                    return float(vcpu.get_tsc_khz()), "KVM_GET_TSC_KHZ (vCPU 0 of a scratch VM)"
                finally:
                    vcpu.close()
            finally:
                vm.close()
        finally:
            kvm.close()
    except Exception as exc:  # no /dev/kvm access, old kernel...
        why = f"{type(exc).__name__}: {exc}"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("cpu MHz"):
                return float(line.split(":")[1]) * 1000.0, f"/proc/cpuinfo cpu MHz (KVM failed: {why})"
    raise SystemExit("cannot determine the TSC frequency")


# -- component probes (same run): what a bus round trip is made of ------------------

_ECHO_CHILD = r"""
import sys, zmq
mode, addr, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
from bus import protocol
def answer(frame):
    msg = protocol.decode_from_vmm(frame)
    if isinstance(msg, protocol.Read):
        return protocol.encode(protocol.ReadReply(msg.seq, 0xff))
    return None
if mode == "sync":
    s = zmq.Context.instance().socket(zmq.PAIR); s.connect(addr)
    for _ in range(n):
        r = answer(s.recv())
        if r is not None:
            s.send(r)
else:
    import asyncio, uvloop, zmq.asyncio
    async def main():
        s = zmq.asyncio.Context.instance().socket(zmq.PAIR); s.connect(addr)
        for _ in range(n):
            r = answer(await s.recv())
            if r is not None:
                await s.send(r)
    uvloop.run(main())
"""


def probe_codec(n: int = 20000) -> dict:
    """In-process cost of the msgpack encode + validating decode of one READ/READ_REPLY pair and one WRITE."""
    from bus import protocol
    from bus.types import IoSpace
    t0 = time.perf_counter()
    for i in range(n):
        protocol.decode_from_vmm(protocol.encode(protocol.Read(i, IoSpace.PIO, 0x3FF, 1)))
        protocol.decode_from_device(protocol.encode(protocol.ReadReply(i, 0xFF)))
    t1 = time.perf_counter()
    for i in range(n):
        protocol.decode_from_vmm(protocol.encode(protocol.Write(IoSpace.PIO, 0x3FF, 1, i & 0xFF)))
    t2 = time.perf_counter()
    return {"read_pair_us": (t1 - t0) / n * 1e6, "write_us": (t2 - t1) / n * 1e6}


def probe_zmq(child_mode: str, n: int = 5000) -> float:
    """µs per READ/READ_REPLY round trip over a zmq ipc PAIR to a child Python process
    (sync zmq on our side like vmmd's vCPU thread; the child is sync zmq, or zmq.asyncio
    on uvloop like the device runtime). No KVM, no device model."""
    import zmq
    from bus import protocol
    from bus.types import IoSpace
    tmp = tempfile.mkdtemp(prefix="vmmd-bench-zmq-")
    addr = f"ipc://{tmp}/p"
    sock = zmq.Context.instance().socket(zmq.PAIR)
    sock.bind(addr)
    child = subprocess.Popen([sys.executable, "-c", _ECHO_CHILD, child_mode, addr, str(n + 200)], cwd=ROOT)
    try:
        def rt(i):
            sock.send(protocol.encode(protocol.Read(i, IoSpace.PIO, 0x3FF, 1)))
            protocol.decode_from_device(sock.recv())
        for i in range(200):  # connect + warm up
            rt(i)
        t0 = time.perf_counter()
        for i in range(n):
            rt(i)
        return (time.perf_counter() - t0) / n * 1e6
    finally:
        child.wait(10) if child.poll() is None else None
        if child.poll() is None:
            child.kill()
            child.wait()
        sock.close(linger=0)
        shutil.rmtree(tmp, ignore_errors=True)


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM the vmmd process group, SIGKILL if it lingers."""
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run_once(guest: Path, sandbox: str, iterations: int, timeout: float) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="vmmd-bench-exit-"))
    console = tmp / "com1.out"
    errlog = tmp / "vmmd.stderr"
    cmd = [sys.executable, "-m", "vmmd.cli", "-m", "64M", "-s", "31,lpc",
           "-l", f"com1,file,{console}", "--raw", str(guest), "--raw-mode", "long-cpl3",
           "--no-reboot", "--sandbox", sandbox, "--api-socket", str(tmp / "api.sock")]
    proc = None
    try:
        with open(errlog, "wb") as err:
            t0 = time.monotonic()
            proc = subprocess.Popen(cmd, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=err,
                                    stderr=err, start_new_session=True)
            try:
                rc = proc.wait(timeout)
            except subprocess.TimeoutExpired:
                raise RuntimeError(f"vmmd still running after {timeout:.0f}s: "
                                   f"{errlog.read_text(errors='replace')[-2000:]}") from None
            wall = time.monotonic() - t0
        out = console.read_text(errors="replace") if console.exists() else ""
        if rc != 0 or "HAMMER END" not in out:
            raise RuntimeError(f"vmmd exit {rc}; console {out[-500:]!r}; stderr "
                               f"{errlog.read_text(errors='replace')[-2000:]}")
        cycles = parse_hammer_output(out)
        return {"cycles": {p: int(cycles[p]) for p in PHASES}, "wall_s": wall}
    finally:
        if proc is not None:
            stop(proc)
        shutil.rmtree(tmp, ignore_errors=True)


def summarise(runs: list[dict], iterations: int, khz: float) -> dict:
    us = {p: [r["cycles"][p] / iterations / khz * 1000.0 for r in runs] for p in PHASES}
    med = {p: statistics.median(v) for p, v in us.items()}
    ratios = {
        "p2/p1": med["p2"] / med["p1"],
        "p3/p1": med["p3"] / med["p1"],
        "p2/p3": med["p2"] / med["p3"],
        "p4/p1": med["p4"] / med["p1"],
    }
    guest_s = [sum(r["cycles"].values()) / khz / 1000.0 for r in runs]
    return {
        "us_per_exit_median": med,
        "us_per_exit_min": {p: min(v) for p, v in us.items()},
        "us_per_exit_max": {p: max(v) for p, v in us.items()},
        "us_per_exit_runs": us,
        "ratios": ratios,
        "wall_s_runs": [r["wall_s"] for r in runs],
        "phases_s_runs": guest_s,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--iterations", type=int, default=20000, help="exits per phase (default 20000)")
    ap.add_argument("--runs", type=int, default=3, help="vmmd runs per sandbox mode; medians reported (default 3)")
    ap.add_argument("--sandbox", default="on,off",
                    help="comma-separated device sandbox modes to measure, first = main row (default on,off)")
    ap.add_argument("--timeout", type=float, default=None, help="seconds per vmmd run (default scales with --iterations)")
    ap.add_argument("--no-probes", action="store_true",
                    help="skip the component probes (msgpack codec, bare zmq round trips)")
    ap.add_argument("--json", action="store_true", help="print one JSON document instead of tables")
    args = ap.parse_args(argv)
    if args.iterations < 1 or args.runs < 1:
        ap.error("--iterations and --runs must be >= 1")
    modes = [m.strip() for m in args.sandbox.split(",") if m.strip()]
    if not modes or any(m not in ("on", "log", "off") for m in modes):
        ap.error("--sandbox: comma-separated list of on|log|off")
    timeout = args.timeout or (60.0 + args.iterations * 4 * 2e-3)  # 2 ms/exit is very slow

    GUEST_CACHE.mkdir(exist_ok=True)
    guest = build_hammer(GUEST_CACHE, iterations=args.iterations)
    khz, khz_source = tsc_khz()

    results = {}
    for mode in modes:
        runs = []
        for i in range(args.runs):
            r = run_once(guest, mode, args.iterations, timeout)
            runs.append(r)
            if not args.json:
                c = r["cycles"]
                print(f"# sandbox={mode} run {i + 1}/{args.runs}: wall {r['wall_s']:.1f}s, "
                      + " ".join(f"{p}={c[p] / args.iterations / khz * 1000:.1f}us" for p in PHASES),
                      file=sys.stderr, flush=True)
        results[mode] = {"runs": runs, **summarise(runs, args.iterations, khz)}

    probes = None
    if not args.no_probes:
        probes = {"codec": probe_codec(), "zmq_rt_sync_child_us": probe_zmq("sync"),
                  "zmq_rt_asyncio_child_us": probe_zmq("asyncio")}

    doc = {
        "benchmark": "exit_roundtrip",
        "command": " ".join([sys.executable, "bench/exit_roundtrip.py", *(argv if argv is not None else sys.argv[1:])]),
        "iterations": args.iterations,
        "runs": args.runs,
        "tsc_khz": khz,
        "tsc_source": khz_source,
        "host": {"nproc": os.cpu_count(), "kernel": platform.release(),
                 "loadavg_at_end": os.getloadavg(), "python": platform.python_version()},
        "sandbox": results,
        "probes": probes,
    }
    if len(modes) > 1:
        base = results[modes[0]]["us_per_exit_median"]
        doc["sandbox_ratios"] = {
            f"{m}/{modes[0]}": {p: results[m]["us_per_exit_median"][p] / base[p] for p in PHASES}
            for m in modes[1:]
        }
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0

    print(f"exit round trip: hammer guest, {args.iterations} exits/phase, median of {args.runs} run(s)")
    print(f"TSC {khz / 1000:.3f} MHz from {khz_source}")
    print(f"host: {os.cpu_count()} CPUs, kernel {platform.release()}, loadavg now "
          + " ".join(f"{x:.2f}" for x in os.getloadavg()))
    print()
    m0 = modes[0]
    print(f"{'phase':<4} {'what':<32} " + " ".join(f"{'sandbox=' + m:>14}" for m in modes)
          + f"   {'min..max (' + m0 + ')':>18}")
    for p in PHASES:
        row = f"{p:<4} {PHASE_LABELS[p]:<32} "
        row += " ".join(f"{results[m]['us_per_exit_median'][p]:>11.1f} us" for m in modes)
        row += f"   {results[m0]['us_per_exit_min'][p]:>8.1f}..{results[m0]['us_per_exit_max'][p]:.1f} us"
        print(row)
    print()
    print("ratios (medians):" + "".join(f"{'sandbox=' + m:>14}" for m in modes))
    for name, what in (("p2/p1", "bus read / in-vmmd PIO"), ("p3/p1", "posted write / in-vmmd PIO"),
                       ("p2/p3", "bus read / posted write"), ("p4/p1", "in-vmmd MMIO / in-vmmd PIO")):
        print(f"  {name} {what:<28}" + "".join(f"{results[m]['ratios'][name]:>13.2f}x" for m in modes))
    if len(modes) > 1:
        print()
        for key, r in doc["sandbox_ratios"].items():
            print(f"sandbox {key} (per phase): " + "  ".join(f"{p} {r[p]:.2f}x" for p in PHASES))
    if probes:
        m0med = results[m0]["us_per_exit_median"]
        print()
        print("component probes (same run, no KVM): one READ round trip over the bus, piece by piece")
        print(f"  msgpack encode+validating decode, READ + READ_REPLY   {probes['codec']['read_pair_us']:>7.1f} us"
              f"   (WRITE alone {probes['codec']['write_us']:.1f} us)")
        print(f"  zmq ipc PAIR round trip, sync child                   {probes['zmq_rt_sync_child_us']:>7.1f} us")
        print(f"  zmq ipc PAIR round trip, zmq.asyncio+uvloop child     {probes['zmq_rt_asyncio_child_us']:>7.1f} us")
        print(f"  hammer p2 - p1 (bus part of a device read, sandbox={m0})  {m0med['p2'] - m0med['p1']:>7.1f} us"
              f"  = {(m0med['p2'] - m0med['p1']) / probes['zmq_rt_asyncio_child_us']:.2f}x the asyncio-child probe")
        print(f"  hammer p3 - p1 (bus part of a posted write)            {m0med['p3'] - m0med['p1']:>7.1f} us")
    print()
    for m in modes:
        res = results[m]
        print(f"sandbox={m}: vmmd wall per run " + ", ".join(f"{w:.1f}s" for w in res["wall_s_runs"])
              + "; of which the 4 timed phases " + ", ".join(f"{w:.1f}s" for w in res["phases_s_runs"]))
    return 0


def _sigterm(signum, frame):
    raise SystemExit(128 + signum)  # unwind, so every `finally` stops its vmmd


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _sigterm)
    sys.exit(main())
