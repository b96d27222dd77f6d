#!/usr/bin/env python3
"""Boot times of the default guest on a hardware-style KVM, and of the lab.

On a host whose KVM cannot run a stock guest (PVM) this starts the nested
lab (scripts/lab) and measures, on the host's clock:
  lab start -> /dev/kvm usable inside (the inner command's first line);
then, inside (or directly on hardware KVM), for the default guest with and
without ``quiet`` on its command line:
  vmmd start -> first console byte, -> "Run /init" (kernel; only without
  quiet) or the init's first line, -> the shell ("vmmd-guest: ready" and
  the COM2 agent answering);
and which exits dominate the boot: vmmd's per-vCPU exit counters
(``debug.vcpus``) and KVM's own counters when the shell is up.

Baseline in the same run: ``python -c pass`` inside the same environment
(the interpreter start every vmmd and device process pays).

    python bench/lab_boot.py [--json]          # on the host (starts the lab on PVM)
    python bench/lab_boot.py --inner [--json]  # the guest part only, here
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.e2e.guest_agent import GuestAgent  # noqa: E402
from tests.vmmd_process import VmmdProcess  # noqa: E402

MARKERS = {"first_byte": None, "run_init": "Run /init", "init_started": "vmmd-guest: init started",
           "ready": "vmmd-guest: ready"}


def guest() -> dict:
    # Inside the lab there is no package registry: the host built the guest
    # (outer() does) and the lab only reads the cache, as tests/e2e does.
    verb = "path" if os.environ.get("VMMD_IN_LAB") else "build"
    out = subprocess.run([sys.executable, "-m", "vmmd.guest.build", verb, "--json"],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out)


FULL_LOG_TIMEOUT = 5400


def one_boot(g: dict, quiet: bool, timeout: float = 1200) -> dict:
    with tempfile.TemporaryDirectory(prefix="vmmd-bench-boot-") as tmp:
        tmp = Path(tmp)
        cmdline = g["cmdline"] + (" quiet" if quiet else "")
        t0 = time.monotonic()
        vm = VmmdProcess(tmp, ["-c", "1", "-m", "512M", "-s", "31,lpc",
                               "-l", f"com2,socket,{tmp / 'com2.sock'}",
                               "--kernel", g["kernel"], "--initrd", g["initrd"],
                               "--cmdline", cmdline])
        seen: dict[str, float] = {}
        try:
            while len(seen) < len(MARKERS) and time.monotonic() - t0 < timeout:
                out = vm.output()
                for name, text in MARKERS.items():
                    if name not in seen and ((text is None and out) or (text and text in out)):
                        seen[name] = time.monotonic() - t0
                if "ready" in seen:
                    break
                if vm.proc.poll() is not None:
                    raise RuntimeError(f"vmmd exited: {vm.stderr()[-2000:]}")
                time.sleep(0.05)
            agent = GuestAgent(str(tmp / "com2.sock"))
            agent.connect(30)
            agent.wait_ready(300)
            seen["shell"] = time.monotonic() - t0
            vcpus = vm.rpc("debug.vcpus")
            exits: dict[str, int] = {}
            kvm: dict[str, int] = {}
            for v in vcpus:
                for k, n in v["exits"].items():
                    exits[k] = exits.get(k, 0) + n
                for k, n in v.get("kvm_stats", {}).items():
                    if isinstance(n, int):
                        kvm[k] = kvm.get(k, 0) + n
            agent.close()
        finally:
            vm.stop()
    top_kvm = dict(sorted(((k, n) for k, n in kvm.items() if "exit" in k or "insn" in k
                           or "io" in k or "halt" in k or "irq" in k),
                          key=lambda kv: -kv[1])[:10])
    return {"quiet": quiet, "seconds": {k: round(v, 1) for k, v in seen.items()},
            "vmmd_exits": dict(sorted(exits.items(), key=lambda kv: -kv[1])), "kvm_stats": top_kvm}


def python_start() -> float:
    best = []
    for _ in range(3):
        t = time.monotonic()
        subprocess.run([sys.executable, "-c", "pass"], check=True)
        best.append(time.monotonic() - t)
    return round(min(best), 3)


def inner(as_json: bool) -> dict:
    g = guest()
    res = {"python_c_pass_s": python_start(), "loadavg": os.getloadavg(),
           "in_lab": bool(os.environ.get("VMMD_IN_LAB")),
           # The full log crawls through the lab's console (tens of bytes a second).
           "boots": [one_boot(g, quiet=True), one_boot(g, quiet=False, timeout=FULL_LOG_TIMEOUT)]}
    return res


def outer(as_json: bool) -> dict:
    from vmmd.assists import host_is_pvm
    if not host_is_pvm():
        return inner(as_json)
    subprocess.run([sys.executable, "-m", "vmmd.guest.build", "build"], check=True,
                   capture_output=True)
    t0 = time.monotonic()
    proc = subprocess.Popen([str(ROOT / "scripts" / "lab"), "run", "--timeout", str(FULL_LOG_TIMEOUT + 2400),
                             "--", sys.executable,
                             str(Path(__file__).resolve()), "--inner", "--json", "--ping"],
                            stdout=subprocess.PIPE, text=True)
    kvm_ready = None
    lines = []
    for line in proc.stdout:
        if kvm_ready is None:
            kvm_ready = round(time.monotonic() - t0, 1)
        lines.append(line)
    rc = proc.wait()
    if rc != 0:
        raise SystemExit(f"lab run failed ({rc}): {''.join(lines)[-2000:]}")
    res = json.loads(lines[-1])
    res["lab_start_to_kvm_s"] = kvm_ready
    res["host_loadavg"] = os.getloadavg()
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--inner", action="store_true")
    ap.add_argument("--ping", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.ping:
        print("kvm ready", flush=True)
    res = inner(args.json) if args.inner else outer(args.json)
    if args.json:
        print(json.dumps(res))
        return 0
    if "lab_start_to_kvm_s" in res:
        print(f"lab start -> /dev/kvm inside: {res['lab_start_to_kvm_s']} s "
              f"(host load {res['host_loadavg'][0]:.2f})")
    print(f"python -c pass (baseline): {res['python_c_pass_s']} s; load {res['loadavg'][0]:.2f}")
    for b in res["boots"]:
        s = b["seconds"]
        print(f"{'quiet' if b['quiet'] else 'full log'}: first byte {s.get('first_byte')} s, "
              f"Run /init {s.get('run_init', '-')} s, init started {s.get('init_started')} s, "
              f"ready {s.get('ready')} s, shell (agent) {s.get('shell')} s")
        print(f"  vmmd exits: {b['vmmd_exits']}")
        print(f"  KVM stats: {b['kvm_stats']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
