"""What a jailed device process of each kind holds, seen from vmmd's side
(issue 9): capability sets over all its threads, ids, namespaces shared
with vmmd, its cgroup limits and RLIMIT_FSIZE.

    sudo .venv/bin/python bench/device_jail_status.py [--sandbox on|log|off]

Devices are spawned by vmmd's supervisor (tests/harness/starts.py), one of
each kind: lpc, virtio-blk (4 MiB image), virtio-net (socket backend),
virtio-balloon; 32 MiB of guest memory.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from contextlib import ExitStack

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, HERE)

CAPS = ("CapEff", "CapPrm", "CapInh", "CapBnd", "CapAmb")
NAMESPACES = ("user", "mnt", "pid", "net", "ipc", "uts", "cgroup", "time")


def _status(path: str) -> dict[str, str]:
    with open(f"/proc/{path}/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def _fsize(pid: int) -> str:
    with open(f"/proc/{pid}/limits") as f:
        for line in f:
            if line.startswith("Max file size"):
                return line[26:47].strip()
    return "?"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sandbox", default="on", choices=("on", "log", "off"))
    args = ap.parse_args()
    from tests.harness.starts import KINDS, RecordingHarness, device_of_kind

    with tempfile.TemporaryDirectory(prefix="vmmd-status-") as workdir, \
            RecordingHarness(sandbox=args.sandbox, mem_size=32 << 20) as h, ExitStack() as stack:
        for kind in KINDS:
            dev = stack.enter_context(device_of_kind(h, kind, workdir))
            pid = dev.current.pid
            tids = os.listdir(f"/proc/{pid}/task")
            caps = {c: 0 for c in CAPS}
            for tid in tids:
                st = _status(f"{pid}/task/{tid}")
                for c in CAPS:
                    caps[c] |= int(st[c], 16)
            st = _status(str(pid))
            shared = [ns for ns in NAMESPACES
                      if os.readlink(f"/proc/{pid}/ns/{ns}") == os.readlink(f"/proc/self/ns/{ns}")]
            cg = h.supervisor._jail.cgroup_of(pid)
            print(f"{kind:15s} pid {pid} threads {len(tids)}: "
                  + " ".join(f"{c} {v:016x}" for c, v in caps.items())
                  + f"; Uid {st['Uid'].split()[0]} Gid {st['Gid'].split()[0]} Groups [{st['Groups'].strip()}]"
                  + f"; namespaces shared with vmmd: {shared or 'none'}"
                  + f"; cgroup {cg.limits if cg else None}; RLIMIT_FSIZE {_fsize(pid)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
