#!/usr/bin/env python3
"""Issue 9's attacks on the device trust boundary, repeated: counts and times.

Each scenario runs a real vmmd (KVM, sandboxed device processes) with the
`ticker` test guest (COM1 to a file) and prints what happened. The figures
are for the report of issue 9 and BENCHMARKS.md; nothing here asserts.

  hostile   a compromised virtio-balloon, then a compromised lpc (tests/hostile/),
            flooding forbidden messages for --flood seconds: frames sent,
            refused, VM resets, vmmd alive, guest still printing
  hung      SIGSTOP of virtio-blk, then of virtio-balloon (only the fast path
            and the heartbeat touch them): seconds until replaced
  api       kill -9 of the lpc: restart time alone, then while 8 balloon.info
            calls wait on a SIGSTOPped balloon (ratio)
  stats     ticker lines/s alone, then while 8 clients poll device.stats (ratio)
  kills     20 kill -9 of the lpc while the guest prints: lines, lost lines
  backoff   kill -9 of the lpc as soon as it is back, 7 times: restart delays,
            final state

    python bench/device_trust.py [scenario ...] [--flood S] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.guests.build import build_ticker  # noqa: E402
from tests.vmmd_process import RpcError, VmmdProcess  # noqa: E402

WAIT = 120.0


def pings(text):
    return [int(x) for x in re.findall(r"PING (\d+)\n", text)]


def lost_lines(text):
    lines = text.split("\n")[:-1]
    good = [int(m.group(1)) for m in (re.fullmatch(r"PING (\d+)", ln) for ln in lines) if m]
    if not good:
        return len(lines)
    gaps = good[-1] - good[0] + 1 - len(set(good))
    return max(gaps, sum(1 for ln in lines if not re.fullmatch(r"PING \d+", ln)))


TREE = None  # --tree: run vmmd from another source tree (a baseline), plain vmmd.cli


class Vm:
    def __init__(self, guest, *args, hostile=(), flood=3.0):
        self.tmp = Path(tempfile.mkdtemp(prefix="vmmd-trust-"))
        env = {"VMMD_HOSTILE_KINDS": ",".join(hostile), "VMMD_HOSTILE_FLOOD": str(flood),
               "PYTHONPATH": str(TREE or ROOT)}
        if TREE and "--device-crash-limit" in args:  # the baseline has no such option
            i = args.index("--device-crash-limit")
            args = args[:i] + args[i + 2:]
        self.p = VmmdProcess(self.tmp, ["-m", "64M", "-s", "31,lpc", "--raw", str(guest),
                                        "--raw-mode", "long-cpl3", *args],
                             extra_env=env, entry="vmmd.cli" if TREE else "tests.hostile.vmmd_hostile")
        self.p.wait_api(60)
        self.p.wait_for("PING 1\n", WAIT)

    def dev(self, dev_id):
        return next(d for d in self.p.rpc("device.list") if d["id"] == dev_id)

    def until(self, pred, what, timeout=WAIT):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = pred()
            if got:
                return got
            time.sleep(0.02)
        raise RuntimeError(f"timed out: {what}")

    def running_again(self, dev_id, restarts):
        return self.until(lambda: (lambda d: d if d["restarts"] >= restarts and d["state"] == "running"
                                   else None)(self.dev(dev_id)), f"{dev_id} restart #{restarts}")

    def lines_in(self, seconds):
        a = len(pings(self.p.output()))
        time.sleep(seconds)
        return (len(pings(self.p.output())) - a) / seconds

    def close(self):
        self.p.stop()


def image(tmp):
    path = Path(tmp) / "disk.img"
    with open(path, "wb") as f:
        f.truncate(1 << 20)
    return str(path)


def scen_hostile(guest, flood):
    out = {}
    for kind, dev_id, args in (("virtio_balloon", "virtio-balloon4", ["-s", "4,virtio-balloon"]),
                               ("lpc", "lpc", [])):
        vm = Vm(guest, *args, hostile=(kind,), flood=flood)
        try:
            stats = vm.until(lambda: (lambda s: s if (s.get("hostile") or {}).get("done") else None)(
                vm.p.rpc("device.stats", {"id": dev_id})), "attack done", timeout=flood + WAIT)
            n = pings(vm.p.output())[-1]
            vm.p.wait_for(f"PING {n + 3}\n", WAIT)
            d = vm.dev(dev_id)
            info = vm.p.rpc("vm.info")
            out[kind] = {"sent": stats["hostile"]["sent"], "frames_sent": sum(stats["hostile"]["sent"].values()),
                         "refused": d["refused"], "refused_total": d["refused_total"],
                         "log_lines_suppressed": d["log_lines_suppressed"],
                         "vmmd_log_bytes": os.path.getsize(vm.p.stderr_path),
                         "vm_state": info["state"], "vm_resets": info["resets"],
                         "vmmd_alive": vm.p.proc.poll() is None, "device_restarts": d["restarts"],
                         "device_last_exit": d["last_exit"],
                         "guest_lines": len(pings(vm.p.output())), "guest_lost_lines": lost_lines(vm.p.output())}
        finally:
            vm.close()
    return out


def scen_hung(guest, _):
    out = {}
    vm = Vm(guest, "-s", f"2,virtio-blk,{image(tempfile.mkdtemp())}", "-s", "4,virtio-balloon")
    try:
        for dev_id in ("virtio-blk2", "virtio-balloon4"):
            d = vm.dev(dev_id)
            t0 = time.monotonic()
            os.kill(d["pid"], signal.SIGSTOP)
            try:
                vm.until(lambda: vm.dev(dev_id)["state"] != "running", f"{dev_id} noticed", timeout=30)
            except RuntimeError:
                out[dev_id] = {"noticed_after_s": "not within 30 s"}
                os.kill(d["pid"], signal.SIGCONT)
                continue
            noticed = time.monotonic() - t0
            vm.running_again(dev_id, d["restarts"] + 1)
            out[dev_id] = {"noticed_after_s": round(noticed, 2),
                           "replaced_after_s": round(time.monotonic() - t0, 2), "device_timeout_s": 2.0}
    finally:
        vm.close()
    return out


def kill_lpc_and_time(vm):
    d = vm.dev("lpc")
    t0 = time.monotonic()
    os.kill(d["pid"], signal.SIGKILL)
    vm.running_again("lpc", d["restarts"] + 1)
    return time.monotonic() - t0


def scen_api(guest, _):
    vm = Vm(guest, "-s", "4,virtio-balloon", "--device-timeout", "5")
    try:
        alone = kill_lpc_and_time(vm)
        time.sleep(1)
        os.kill(vm.dev("virtio-balloon4")["pid"], signal.SIGSTOP)
        answers = []

        def call():
            try:
                vm.p.rpc("balloon.info", timeout=WAIT)
                answers.append("ok")
            except RpcError as exc:
                answers.append(exc.code)
        threads = [threading.Thread(target=call) for _ in range(8)]
        for t in threads:
            t.start()
        time.sleep(0.2)
        loaded = kill_lpc_and_time(vm)
        for t in threads:
            t.join(WAIT)
        return {"lpc_restart_alone_s": round(alone, 2), "lpc_restart_with_8_calls_to_hung_balloon_s": round(loaded, 2),
                "ratio": round(loaded / alone, 2), "balloon_call_answers": answers}
    finally:
        vm.close()


def scen_stats(guest, _):
    vm = Vm(guest)
    try:
        time.sleep(2)
        alone = vm.lines_in(10)
        stop = threading.Event()
        polls = [0]

        def poll():
            while not stop.is_set():
                vm.p.rpc("device.stats", {"id": "lpc"})
                polls[0] += 1
        threads = [threading.Thread(target=poll) for _ in range(8)]
        for t in threads:
            t.start()
        loaded = vm.lines_in(10)
        stop.set()
        for t in threads:
            t.join()
        return {"lines_per_s_alone": round(alone, 1), "lines_per_s_with_8_pollers": round(loaded, 1),
                "ratio": round(loaded / alone, 3), "device_stats_calls_per_s": round(polls[0] / 10, 1)}
    finally:
        vm.close()


def scen_kills(guest, _, kills=20):
    vm = Vm(guest, "--device-crash-limit", "100/60")
    try:
        restarts = []
        for _ in range(kills):
            time.sleep(1.0)   # the guest prints meanwhile
            restarts.append(kill_lpc_and_time(vm))
        time.sleep(1.0)
        out = vm.p.output()
        return {"kills": kills, "lines": len(pings(out)), "lost_or_damaged_lines": lost_lines(out),
                "restart_s_median": round(sorted(restarts)[len(restarts) // 2], 2),
                "restart_s_max": round(max(restarts), 2), "vm_resets": vm.p.rpc("vm.info")["resets"]}
    finally:
        vm.close()


def scen_backoff(guest, _):
    vm = Vm(guest)
    try:
        delays = []
        for _ in range(5):
            delays.append(round(kill_lpc_and_time(vm), 2))
        d = vm.dev("lpc")
        os.kill(d["pid"], signal.SIGKILL)   # the 6th crash within 60 s
        failed = vm.until(lambda: (lambda x: x if x["state"] == "failed" else None)(vm.dev("lpc")), "failed")
        time.sleep(3)
        still = vm.dev("lpc")["state"]
        t0 = time.monotonic()
        vm.p.rpc("device.restart", {"id": "lpc"})
        revive = time.monotonic() - t0
        n = len(vm.p.output())
        vm.p.wait_for("PING", WAIT, start=n)
        return {"restart_delays_s": delays, "after_6th_crash": failed["state"], "3_s_later": still,
                "vm_state": vm.p.rpc("vm.info")["state"], "device_restart_revived_in_s": round(revive, 2),
                "state_after_revival": vm.dev("lpc")["state"]}
    finally:
        vm.close()


SCENARIOS = {"hostile": scen_hostile, "hung": scen_hung, "api": scen_api, "stats": scen_stats,
             "kills": scen_kills, "backoff": scen_backoff}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("scenarios", nargs="*", default=list(SCENARIOS))
    ap.add_argument("--flood", type=float, default=20.0, help="seconds of flooding in 'hostile'")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--tree", help="run vmmd from this source tree (e.g. an unpacked older commit: "
                                   "the baseline); not for 'hostile'")
    args = ap.parse_args()
    global TREE
    TREE = args.tree
    if TREE:
        os.chdir(TREE)  # python -m puts the working directory first on sys.path
    guest = build_ticker(Path(tempfile.gettempdir()) / "vmmd-bench-guests")
    results = {"loadavg_before": os.getloadavg()}
    for name in args.scenarios:
        results[name] = SCENARIOS[name](guest, args.flood)
        if not args.json:
            print(name, json.dumps(results[name], indent=1), flush=True)
    results["loadavg_after"] = os.getloadavg()
    if args.json:
        print(json.dumps(results, indent=1))
    else:
        print("loadavg before/after:", results["loadavg_before"], results["loadavg_after"])


if __name__ == "__main__":
    main()
