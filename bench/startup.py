#!/usr/bin/env python3
"""Startup benchmark: spawn-to-first-guest-byte time and resident memory of vmmd.

Each run spawns vmmd with the ``ticker`` test guest and COM1 on a Unix socket
backend (``-l com1,socket,PATH``), connects to that socket as soon as it exists
and blocks in recv() for the first byte. Why a socket rather than a file console
polled every millisecond: recv() wakes up within microseconds of the lpc
process's send(), so the first-byte timestamp has no polling quantum and the
benchmark does not burn a CPU re-reading a file next to the VM it measures
(the machine has 2 cores). The socket exists before the vCPU starts (the lpc
process opens its backends before its handshake), and bytes written before our
connect() is accepted are replayed on accept, so none is missed; the only
polling is for the socket path to appear (0.5 ms steps), which is not on the
measured path.

While the guest runs, it reads VmRSS (/proc/PID/status) and Pss
(/proc/PID/smaps_rollup) of vmmd and of every device process (pids from the
JSON-RPC ``device.list``). Guest RAM is a memfd mapped by vmmd: it counts in
vmmd's RSS only for the pages the guest (or vmmd's loader) touched.

Baselines measured in the same run: ``python -c pass`` start-to-exit time and
the RSS/PSS of an idle ``python -c "import time; time.sleep(5)"`` (same interpreter).

    python bench/startup.py [--runs N] [--sandbox on|log|off] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.guests.build import build_ticker  # noqa: E402

GUEST_CACHE = Path(tempfile.gettempdir()) / "vmmd-bench-guests"


# -- /proc ---------------------------------------------------------------------

def mem_kib(pid: int) -> dict:
    """{"rss_kib": VmRSS, "pss_kib": Pss or None} of one process."""
    out = {"rss_kib": None, "pss_kib": None}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                out["rss_kib"] = int(line.split()[1])
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    out["pss_kib"] = int(line.split()[1])
    except OSError:
        pass
    return out


def proc_cmd(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")[:120]
    except OSError:
        return "?"


# -- vmmd ----------------------------------------------------------------------

def rpc(path: str, method: str, params: dict | None = None, timeout: float = 10.0):
    req = {"jsonrpc": "2.0", "id": 1, "method": method}
    if params is not None:
        req["params"] = params
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        s.sendall(json.dumps(req).encode() + b"\n")
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
    reply = json.loads(buf)
    if "error" in reply:
        raise RuntimeError(f"{method}: {reply['error']}")
    return reply["result"]


def stop(proc: subprocess.Popen, api: str | None) -> str:
    """Stop vmmd: vm.shutdown over the API, then SIGTERM, then SIGKILL (process group)."""
    if proc.poll() is not None:
        return "already exited"
    if api and os.path.exists(api):
        try:
            rpc(api, "vm.shutdown", timeout=5)
            proc.wait(10)
            return "vm.shutdown"
        except Exception:
            pass
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return "gone"
        try:
            proc.wait(10)
            return sig.name
        except subprocess.TimeoutExpired:
            continue
    return "unkillable?"


def wait_path(path: str, proc: subprocess.Popen, deadline: float) -> float:
    while not os.path.exists(path):
        if proc.poll() is not None:
            raise RuntimeError(f"vmmd exited {proc.returncode} before {path} appeared")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{path} did not appear")
        time.sleep(0.0005)
    return time.monotonic()


def run_vmmd(guest: Path, sandbox: str, timeout: float, settle: float) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="vmmd-bench-start-"))
    con = str(tmp / "com1.sock")
    api = str(tmp / "api.sock")
    errlog = tmp / "vmmd.stderr"
    cmd = [sys.executable, "-m", "vmmd.cli", "-m", "64M", "-s", "31,lpc",
           "-l", f"com1,socket,{con}", "--raw", str(guest), "--raw-mode", "long-cpl3",
           "--sandbox", sandbox, "--api-socket", api]
    proc = None
    err = open(errlog, "wb")
    try:
        t0 = time.monotonic()
        proc = subprocess.Popen(cmd, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=err,
                                stderr=err, start_new_session=True)
        deadline = t0 + timeout
        t_sock = wait_path(con, proc, deadline)
        c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            for _ in range(2000):  # bound() before listen() is a tiny window
                try:
                    c.connect(con)
                    break
                except (ConnectionRefusedError, FileNotFoundError):
                    time.sleep(0.0005)
            c.settimeout(max(0.1, deadline - time.monotonic()))
            first = c.recv(1)
            t_first = time.monotonic()
            if not first:
                raise RuntimeError("console socket closed before the first byte")
            # keep draining so the UART never back-pressures while we measure memory
            c.setblocking(False)
            t_api = wait_path(api, proc, deadline)
            time.sleep(settle)  # let the guest print a few lines: steady state
            try:
                while c.recv(65536):
                    pass
            except BlockingIOError:
                pass
            devices = rpc(api, "device.list")
            mem = {"vmmd": {"pid": proc.pid, **mem_kib(proc.pid)}}
            for d in devices:
                if d.get("pid"):
                    mem[f"device {d['id']} ({d['type']})"] = {"pid": d["pid"], **mem_kib(d["pid"]),
                                                            "cmd": proc_cmd(d["pid"])}
        finally:
            c.close()
        return {"first_byte_s": t_first - t0, "console_socket_s": t_sock - t0,
                "api_socket_seen_s": t_api - t0, "first_byte": first.decode(errors="replace"),
                "mem": mem}
    except Exception as exc:
        raise RuntimeError(f"{exc}; vmmd stderr: {errlog.read_text(errors='replace')[-2000:]}") from exc
    finally:
        if proc is not None:
            how = stop(proc, api)
            if proc.poll() is None:
                print(f"warning: vmmd pid {proc.pid} still running after {how}", file=sys.stderr)
        err.close()
        shutil.rmtree(tmp, ignore_errors=True)


# -- baselines -------------------------------------------------------------------

def python_pass_s() -> float:
    t0 = time.monotonic()
    subprocess.run([sys.executable, "-c", "pass"], check=True)
    return time.monotonic() - t0


IMPORT_PROBES = {
    # what vmmd and the lpc device process import before they can do anything:
    # a same-run decomposition of the startup time (each in a fresh interpreter)
    "vmmd imports": "import vmmd.cli, vmmd.machine",
    "lpc device imports": "import devices.runtime, devices.lpc.model, devices.lpc.backend, devices.lpc.policy",
}


def import_s(stmt: str) -> float:
    t0 = time.monotonic()
    subprocess.run([sys.executable, "-c", stmt], cwd=ROOT, check=True)
    return time.monotonic() - t0


def python_idle_mem(settle: float) -> dict:
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(5)"])
    try:
        time.sleep(settle)
        return mem_kib(p.pid)
    finally:
        p.kill()
        p.wait()


# -- main --------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=5, help="vmmd starts (and baseline runs); medians reported (default 5)")
    ap.add_argument("--sandbox", default="on", choices=("on", "log", "off"), help="device sandbox mode (default on)")
    ap.add_argument("--settle", type=float, default=1.0,
                    help="seconds after the first byte before reading memory (default 1.0)")
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the first byte (default 60)")
    ap.add_argument("--json", action="store_true", help="print one JSON document instead of tables")
    args = ap.parse_args(argv)
    if args.runs < 1:
        ap.error("--runs must be >= 1")

    GUEST_CACHE.mkdir(exist_ok=True)
    guest = build_ticker(GUEST_CACHE)

    python_pass_s()  # warm the page cache for the interpreter and stdlib once
    runs, base_t, base_mem = [], [], []
    imp = {k: [] for k in IMPORT_PROBES}
    for i in range(args.runs):  # interleave baseline and vmmd so load drift hits both
        base_t.append(python_pass_s())
        base_mem.append(python_idle_mem(min(args.settle, 4.0)))
        for k, stmt in IMPORT_PROBES.items():
            imp[k].append(import_s(stmt))
        r = run_vmmd(guest, args.sandbox, args.timeout, args.settle)
        runs.append(r)
        if not args.json:
            print(f"# run {i + 1}/{args.runs}: first byte {r['first_byte_s'] * 1000:.0f} ms, "
                  f"console socket {r['console_socket_s'] * 1000:.0f} ms; python -c pass "
                  f"{base_t[-1] * 1000:.0f} ms", file=sys.stderr, flush=True)

    med = statistics.median
    first = med(r["first_byte_s"] for r in runs)
    sock = med(r["console_socket_s"] for r in runs)
    bt = med(base_t)
    imp_med = {k: med(v) for k, v in imp.items()}
    brss = med(m["rss_kib"] for m in base_mem)
    bpss = med(m["pss_kib"] for m in base_mem) if all(m["pss_kib"] is not None for m in base_mem) else None
    procs = {}
    for name in runs[0]["mem"]:
        vals = [r["mem"][name] for r in runs if name in r["mem"]]
        rss = med(v["rss_kib"] for v in vals)
        pss = med(v["pss_kib"] for v in vals) if all(v["pss_kib"] is not None for v in vals) else None
        procs[name] = {"rss_kib": rss, "pss_kib": pss,
                       "rss_ratio": rss / brss, "pss_ratio": (pss / bpss) if pss and bpss else None}
    total_rss = sum(p["rss_kib"] for p in procs.values())
    total_pss = sum(p["pss_kib"] for p in procs.values()) if all(p["pss_kib"] for p in procs.values()) else None

    doc = {
        "benchmark": "startup",
        "command": " ".join([sys.executable, "bench/startup.py", *(argv if argv is not None else sys.argv[1:])]),
        "runs": args.runs, "sandbox": args.sandbox, "guest": "ticker, -m 64M, -s 31,lpc, COM1 socket",
        "host": {"nproc": os.cpu_count(), "kernel": platform.release(),
                 "loadavg_at_end": os.getloadavg(), "python": platform.python_version()},
        "first_byte_ms": {"median": first * 1000, "min": min(r["first_byte_s"] for r in runs) * 1000,
                          "max": max(r["first_byte_s"] for r in runs) * 1000},
        "console_socket_ms_median": sock * 1000,
        "python_pass_ms": {"median": bt * 1000, "min": min(base_t) * 1000, "max": max(base_t) * 1000},
        "ratio_first_byte_vs_python_pass": first / bt,
        "import_ms_median": {k: v * 1000 for k, v in imp_med.items()},
        "ratio_first_byte_vs_imports": first / sum(imp_med.values()),
        "python_idle_kib": {"rss": brss, "pss": bpss},
        "processes": procs,
        "total_kib": {"rss": total_rss, "pss": total_pss,
                      "rss_ratio": total_rss / brss, "pss_ratio": (total_pss / bpss) if total_pss and bpss else None},
        "runs_detail": runs,
        "baseline_detail": {"python_pass_s": base_t, "python_idle_mem": base_mem, "import_s": imp},
    }
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0

    print(f"startup: ticker guest, -m 64M, lpc device, sandbox={args.sandbox}, median of {args.runs} run(s)")
    print(f"host: {os.cpu_count()} CPUs, kernel {platform.release()}, Python {platform.python_version()}, "
          "loadavg now " + " ".join(f"{x:.2f}" for x in os.getloadavg()))
    print()
    print(f"{'time from spawn':<44}{'median':>10}{'min':>10}{'max':>10}")
    print(f"{'  vmmd -> first COM1 byte (socket recv)':<44}{first * 1000:>8.0f}ms"
          f"{doc['first_byte_ms']['min']:>8.0f}ms{doc['first_byte_ms']['max']:>8.0f}ms")
    print(f"{'  vmmd -> COM1 socket exists (lpc up)':<44}{sock * 1000:>8.0f}ms"
          f"{min(r['console_socket_s'] for r in runs) * 1000:>8.0f}ms"
          f"{max(r['console_socket_s'] for r in runs) * 1000:>8.0f}ms")
    print(f"{'  baseline: python -c pass (start to exit)':<44}{bt * 1000:>8.0f}ms"
          f"{min(base_t) * 1000:>8.0f}ms{max(base_t) * 1000:>8.0f}ms")
    for k, v in imp_med.items():
        label = f"  probe: {k} (fresh python)"
        print(f"{label:<44}{v * 1000:>8.0f}ms{min(imp[k]) * 1000:>8.0f}ms{max(imp[k]) * 1000:>8.0f}ms")
    print(f"  ratio first byte / python -c pass: {first / bt:.1f}x")
    print(f"  ratio first byte / (vmmd imports + lpc device imports): {first / sum(imp_med.values()):.2f}x")
    print()
    print(f"{'resident memory (median, guest running)':<44}{'VmRSS':>10}{'Pss':>10}{'RSS ratio':>11}{'PSS ratio':>11}")
    fmt = lambda v: f"{v / 1024:>7.1f}MiB" if v is not None else f"{'n/a':>10}"  # noqa: E731
    fr = lambda v: f"{v:>10.1f}x" if v is not None else f"{'n/a':>11}"  # noqa: E731
    for name, p in procs.items():
        print(f"  {name:<42}{fmt(p['rss_kib'])}{fmt(p['pss_kib'])}{fr(p['rss_ratio'])}{fr(p['pss_ratio'])}")
    print(f"  {'total':<42}{fmt(total_rss)}{fmt(total_pss)}{fr(doc['total_kib']['rss_ratio'])}"
          f"{fr(doc['total_kib']['pss_ratio'])}")
    print(f"  {'baseline: idle python (time.sleep)':<42}{fmt(brss)}{fmt(bpss)}")
    print("  (guest RAM is a memfd: only pages touched so far count in vmmd's RSS)")
    return 0


def _sigterm(signum, frame):
    raise SystemExit(128 + signum)  # unwind, so every `finally` stops its vmmd


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _sigterm)
    sys.exit(main())
