"""Start every device kind many times under CPU load and count how each
incarnation ended (issue 9: libzmq threads that first run after the seccomp
filter killed devices with SIGSYS at start).

    sudo .venv/bin/python bench/device_starts.py [--starts 200] [--kinds lpc,...]
                                                 [--load N] [--tree PATH]

Each start is a real device process spawned by vmmd's supervisor with the
full sandbox (tests/harness/starts.py: operator restart, then a STATS round
trip). --load N runs N busy-looping processes meanwhile (default: one per
core). --tree runs the same loop against another checkout (e.g. an export of
an older commit, for the before/after comparison); the loop itself always
comes from this tree. Prints one line per kind and the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KINDS = ("lpc", "virtio_blk", "virtio_net", "virtio_balloon")

# Runs in a child with the tree under test first on sys.path; the start
# loop is loaded from this tree's tests/harness/starts.py by path.
RUNNER = """
import importlib.util, json, logging, sys
logging.basicConfig(level=logging.ERROR)
spec = importlib.util.spec_from_file_location("vmmd_bench_starts", sys.argv[1])
starts = importlib.util.module_from_spec(spec)
spec.loader.exec_module(starts)
print(json.dumps(starts.start_loop(sys.argv[2], int(sys.argv[3]))))
"""


def run_kind(tree: str, kind: str, starts: int) -> dict:
    env = dict(os.environ, PYTHONPATH=tree, PYTHONDONTWRITEBYTECODE="1")
    res = subprocess.run([sys.executable, "-c", RUNNER, os.path.join(HERE, "tests", "harness", "starts.py"),
                          kind, str(starts)], cwd=tree, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        return {"kind": kind, "error": res.stderr.strip().splitlines()[-1:] or [f"exit {res.returncode}"]}
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--starts", type=int, default=200)
    ap.add_argument("--kinds", default=",".join(KINDS))
    ap.add_argument("--load", type=int, default=os.cpu_count() or 1, help="busy-loop processes (0: none)")
    ap.add_argument("--tree", default=HERE, help="checkout whose vmmd/devices/sandbox to run")
    args = ap.parse_args()
    sys.path.insert(0, HERE)
    from tests.harness.starts import cpu_load

    kinds = [k for k in args.kinds.split(",") if k]
    tree = os.path.abspath(args.tree)
    print(f"tree {tree}; {args.starts} starts per kind; {args.load} busy loops; "
          f"loadavg before {os.getloadavg()[0]:.2f}", flush=True)
    total_sigsys = 0
    with cpu_load(args.load):
        time.sleep(1.0)
        for kind in kinds:
            r = run_kind(tree, kind, args.starts)
            if "error" in r:
                print(f"{kind:15s} ERROR {r['error']}", flush=True)
                total_sigsys = -1 if total_sigsys == 0 else total_sigsys
                continue
            total_sigsys += r["sigsys"]
            per = r["seconds"] / max(1, r["starts"])
            print(f"{kind:15s} starts {r['starts']:4d}  SIGSYS {r['sigsys']:3d}  other crashes "
                  f"{r['crashes'] - r['sigsys']:3d}  {per:.2f} s/start  ended {r['ended']}  "
                  f"loadavg {os.getloadavg()[0]:.2f}", flush=True)
    print(f"total SIGSYS {total_sigsys}")
    return 0 if total_sigsys == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
