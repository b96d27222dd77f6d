#!/usr/bin/env python3
"""Snapshot create and restore for 1 GiB guests, beside `cp --sparse=always`.

Two guests, each with -m 1G (sandbox on, one lpc device):
  * idle: the ticker guest (prints PING lines; touches a few pages);
  * half: the incrementer over 512 MiB (every page's first byte non-zero after
    its first pass; it keeps dirtying them).

For each: snapshot.create (client wall time, vmmd's paused and total time, and
its phases: capture = devices + vCPUs + VM state, ram = RAM written to the page
cache, commit = digest + fsync + manifest after the VM resumed), then a second
snapshot.create of the same guest with "sync": false (no fsync: the reply once
it is complete in the page cache; compare with plain `cp`),
size on disk (allocated blocks) and apparent size of the snapshot, then vmmd
is killed and `vmmd --restore` started; restore-to-first-guest-instruction is
taken from vmmd's log line "restore: vCPUs started at monotonic T" (the vCPU
threads enter KVM_RUN right after): spawn -> T, and main() -> T (without the
interpreter's start and imports), with the snapshot checks and the RAM load
reported separately. Then the same snapshot into a waiting vmmd (`vmmd
--restore-wait`, started and its spare device processes ready): from the
client sending snapshot.restore to the same log line ("... after the
snapshot.restore call"), vmmd's own figure from the call's arrival, and the
client's wall time to the reply. Baseline in the same run: `cp --sparse=always` of the
snapshot's ram.img to the snapshot's file system (once as is, once with an
fsync of the copy: the same durability create gives) and to /dev/shm
(tmpfs, as the memfd), i.e. copying the same bytes.

Where this machine is itself a VM whose kernel reports free pages to its
host, fresh page-cache pages may fault in the host first; the bench prints
the reporting state and a first-touch time of 512 MiB before and after, as
that is most of the spread between runs there. Measured here: sendfile of
512 MiB into a new file 1.02-1.06 s when the pages come back from the host,
0.28 s when they reuse pages freed a moment before. Each timed create and
cp therefore starts after SETTLE seconds of rest, from the same state;
--host-memory warm then also writes and deletes a scratch file, so that
the step reuses pages the host still backs, as on bare metal.

Restore-to-running is "first guest instruction with all state loaded and
verified": the log line comes after every check (manifest and section
SHA-256s, the RAM digest over what guest memory holds), the device processes'
restore and the KVM state, right before the vCPU threads start.

The project's bytecode is compiled first (`compileall`, as an installed vmmd
has it; an editable install under PYTHONDONTWRITEBYTECODE=1 would compile
every module from source in vmmd and in each device process at start);
--bytecode remove deletes it instead and measures that.

    python bench/snapshot.py [--runs 3] [--json] [--bytecode compile|remove] [--host-memory cold|warm]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from tests.guests.build import build_incrementer, build_ticker  # noqa: E402
from tests.vmmd_process import VmmdProcess  # noqa: E402

MiB = 1 << 20
GiB = 1 << 30


def _kill(vm: VmmdProcess) -> None:
    vm.crash()


def _allocated(path: str) -> int:
    total = 0
    for name in os.listdir(path):
        total += os.stat(os.path.join(path, name)).st_blocks * 512
    return total


def _apparent(path: str) -> int:
    return sum(os.path.getsize(os.path.join(path, n)) for n in os.listdir(path))


def _cp(src: str, dst: str, durable: bool = False) -> float:
    """ms to copy src to dst; durable: and to fsync the copy (what create's commit does)."""
    before_timed_step(os.path.dirname(dst))
    t = time.monotonic()
    subprocess.run(["cp", "--sparse=always", src, dst], check=True)
    if durable:
        fd = os.open(dst, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    dt = time.monotonic() - t
    os.unlink(dst)
    return dt * 1000


# Seconds of rest before each timed create or cp: memory just freed (a removed
# snapshot, a killed guest) is handed back to the host by then where this
# machine reports free pages, so each starts from the same state instead of
# the cp reusing pages the create before it warmed.
SETTLE = 5.0
WARM_MIB = 768
HOST_MEMORY = "cold"   # --host-memory


def before_timed_step(scratch_dir: str) -> None:
    """Bring the machine's free memory to the state --host-memory asks for.
    cold: SETTLE seconds of rest (free pages go back to the host, as they do
    between a VM's snapshots in life). warm: then write and delete a
    WARM_MIB scratch file, so the step's page cache reuses pages the host
    still backs: what a host that never takes free pages back (bare metal)
    gives every time."""
    time.sleep(SETTLE)
    if HOST_MEMORY != "warm":
        return
    path = os.path.join(scratch_dir, "warm.scratch")
    chunk = b"\1" * MiB
    fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)
    try:
        for _ in range(WARM_MIB):
            os.write(fd, chunk)
    finally:
        os.close(fd)
        os.unlink(path)   # its dirty pages are dropped, not written: free and host-backed
PAGE_REPORTING = "/sys/module/page_reporting/parameters"


def host_memory() -> dict:
    """What the host does with this machine's free memory. Where this machine is
    itself a VM that reports free pages to its host (virtio-balloon free page
    reporting), every page the kernel allocates afresh (the snapshot's page
    cache, cp's) may first fault in the host: that, not vmmd, is most of the
    run-to-run spread here. Reports the reporting knobs and reported KiB so
    far, and the time to first-touch 512 MiB of new anonymous memory now."""
    import mmap
    out: dict = {}
    try:
        for name in sorted(os.listdir(PAGE_REPORTING)):
            with open(os.path.join(PAGE_REPORTING, name)) as f:
                out[name] = f.read().strip()
    except OSError:
        pass
    m = mmap.mmap(-1, 512 * MiB)
    t = time.monotonic()
    for off in range(0, 512 * MiB, 4096):
        m[off] = 1
    out["first_touch_512mib_ms"] = round((time.monotonic() - t) * 1000, 1)
    m.close()
    return out


def one(kind: str, guest: str, work: str, ready: str) -> dict:
    a = os.path.join(work, "a")
    b = os.path.join(work, "b")
    snap = os.path.join(work, "snap")
    snap_nosync = os.path.join(work, "snap-nosync")
    os.makedirs(a)
    os.makedirs(b)
    from pathlib import Path
    vm = VmmdProcess(Path(a), ["-m", "1G", "-s", "31,lpc", "--raw", guest, "--raw-mode", "long-cpl3"])
    try:
        vm.wait_api(60)
        vm.wait_for(ready, 120)
        before_timed_step(work)
        t = time.monotonic()
        r = vm.rpc("snapshot.create", {"path": snap}, timeout=300)
        create_ms = (time.monotonic() - t) * 1000
        # The same guest again with sync=false (reply once the snapshot is in
        # the page cache); removed at once, so its writeback is mostly dropped
        # rather than left to slow what follows.
        before_timed_step(work)
        t = time.monotonic()
        r_nosync = vm.rpc("snapshot.create", {"path": snap_nosync, "sync": False}, timeout=300)
        nosync_ms = (time.monotonic() - t) * 1000
        shutil.rmtree(snap_nosync)
    finally:
        _kill(vm)
    out = {"guest": kind, "create_client_ms": create_ms, "create_vmmd_ms": r["total_ms"],
           "paused_ms": r["paused_ms"], "ram_bytes_written": r["ram_bytes_written"],
           "create_capture_ms": r["phases_ms"]["capture"], "create_ram_ms": r["phases_ms"]["ram"],
           "create_commit_ms": r["phases_ms"]["commit"],
           "nosync_create_client_ms": nosync_ms, "nosync_paused_ms": r_nosync["paused_ms"],
           "nosync_commit_ms": r_nosync["phases_ms"]["commit"],
           "size_on_disk": _allocated(snap), "apparent_size": _apparent(snap)}
    ram = os.path.join(snap, "ram.img")
    out["cp_same_fs_ms"] = _cp(ram, os.path.join(work, "ram.copy"))
    out["cp_fsync_same_fs_ms"] = _cp(ram, os.path.join(work, "ram.copy"), durable=True)
    shm = tempfile.mkdtemp(dir="/dev/shm")
    try:
        out["cp_to_shm_ms"] = _cp(ram, os.path.join(shm, "ram.copy"))
    finally:
        shutil.rmtree(shm, ignore_errors=True)
    t_spawn = time.monotonic()
    vm2 = VmmdProcess(Path(b), ["--restore", snap])
    try:
        deadline = time.monotonic() + 120
        m = None
        while time.monotonic() < deadline and m is None:
            m = re.search(r"restore: vCPUs started at monotonic ([\d.]+), ([\d.]+) ms after main\(\) "
                          r"\(snapshot checks ([\d.]+) ms, RAM ([\d.]+) ms, vmmd imports and set-up ([\d.-]+) ms, "
                          r"device processes started in ([\d.]+) ms, device states ([\d.]+) ms, "
                          r"KVM state ([\d.]+) ms\)", vm2.stderr())
            if vm2.proc.poll() is not None:
                break
            time.sleep(0.01)
        if m is None:
            raise RuntimeError(f"restore did not start: {vm2.stderr()[-2000:]}")
        vm2.wait_api(60)
        if kind == "idle":
            vm2.wait_for("PING", 60)
        else:
            vm2.wait_for("B", 60)
    finally:
        _kill(vm2)
    out.update(restore_wait(snap, os.path.join(work, "c"), kind))
    out.update(restore_from_spawn_ms=(float(m.group(1)) - t_spawn) * 1000,
               restore_from_main_ms=float(m.group(2)), restore_checks_ms=float(m.group(3)),
               restore_ram_ms=float(m.group(4)), restore_vmmd_setup_ms=float(m.group(5)),
               restore_spawn_devices_ms=float(m.group(6)),
               restore_device_states_ms=float(m.group(7)), restore_kvm_ms=float(m.group(8)))
    return out


WAIT_RE = (r"restore: vCPUs started at monotonic ([\d.]+), ([\d.]+) ms after the snapshot.restore call "
           r"\(snapshot checks ([\d.]+) ms, RAM ([\d.]+) ms, vmmd imports and set-up ([\d.-]+) ms, "
           r"device processes started in ([\d.]+) ms, device states ([\d.]+) ms, KVM state ([\d.]+) ms\)")


def restore_wait(snap: str, work: str, kind: str) -> dict:
    """`vmmd --restore-wait` started and ready (spares imported), then timed from
    the client sending snapshot.restore to vmmd's "restore: vCPUs started" line."""
    from pathlib import Path
    os.makedirs(work)
    t_spawn = time.monotonic()
    vm = VmmdProcess(Path(work), ["--restore-wait"], com1=None)
    try:
        vm.wait_api(60)
        spares = vm.rpc("vm.info")["spares"]
        while spares["starting"]:
            time.sleep(0.01)
            spares = vm.rpc("vm.info")["spares"]
        ready_ms = (time.monotonic() - t_spawn) * 1000
        time.sleep(0.5)  # let the start-up's last work (page cache, logging) settle
        t_call = time.monotonic()
        r = vm.rpc("snapshot.restore", {"path": snap, "consoles": {"com1": f"file,{vm.console}"}}, timeout=300)
        reply_ms = (time.monotonic() - t_call) * 1000
        m = re.search(WAIT_RE, vm.stderr())
        if m is None:
            raise RuntimeError(f"waiting restore did not log its start: {vm.stderr()[-2000:]}")
        vm.wait_for("PING" if kind == "idle" else "B", 60)
    finally:
        _kill(vm)
    return {"wait_ready_ms": ready_ms, "wait_call_to_vcpus_ms": (float(m.group(1)) - t_call) * 1000,
            "wait_vmmd_ms": float(m.group(2)), "wait_reply_ms": reply_ms, "wait_checks_ms": float(m.group(3)),
            "wait_ram_ms": float(m.group(4)), "wait_setup_ms": float(m.group(5)),
            "wait_devices_ms": float(m.group(6)), "wait_device_states_ms": float(m.group(7)),
            "wait_kvm_ms": float(m.group(8)), "wait_total_ms_reply": r["total_ms"]}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--bytecode", choices=("compile", "remove"), default="compile",
                    help="compile the project's bytecode first (default), or remove it")
    ap.add_argument("--host-memory", choices=("cold", "warm"), default="cold",
                    help="the state of free memory before each timed step (before_timed_step)")
    args = ap.parse_args()
    global HOST_MEMORY
    HOST_MEMORY = args.host_memory
    packages = [os.path.join(ROOT, p) for p in ("vmmd", "bus", "devices", "sandbox", "devopts")]
    if args.bytecode == "compile":
        subprocess.run([sys.executable, "-m", "compileall", "-q", *packages], check=True, stdout=subprocess.DEVNULL)
    else:
        for pkg in packages:
            for dirpath, dirnames, _ in os.walk(pkg):
                if "__pycache__" in dirnames:
                    shutil.rmtree(os.path.join(dirpath, "__pycache__"))
                    dirnames.remove("__pycache__")
    load_before = os.getloadavg()
    host_before = host_memory()
    guests = {"idle": (str(build_ticker()), "PING 1\n"),
              "half": (str(build_incrementer(start=0x400000, end=0x400000 + 512 * MiB, passes_per_mark=1)), "BB")}
    results = []
    for run in range(args.runs):
        for kind, (guest, ready) in guests.items():
            work = tempfile.mkdtemp(prefix="vmmd-bench-snap-", dir=os.environ.get("TMPDIR", "/var/tmp"))
            try:
                results.append(one(kind, guest, work, ready))
            finally:
                shutil.rmtree(work, ignore_errors=True)
    load = os.getloadavg()
    host_after = host_memory()
    bytecode = "bytecode compiled first" if args.bytecode == "compile" else "no bytecode: compiled from source at each start"
    bytecode += f"; host memory {args.host_memory} before each timed step"
    if args.json:
        print(json.dumps({"results": results, "loadavg": load, "loadavg_before": load_before,
                          "bytecode": bytecode, "host_memory_before": host_before,
                          "host_memory_after": host_after}, indent=1))
        return 0
    print(f"load average {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f} before, "
          f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f} after; {bytecode}; {args.runs} runs, medians (min-max)")
    for when, h in (("before", host_before), ("after", host_after)):
        print(f"host memory {when}: first touch of 512 MiB {h['first_touch_512mib_ms']} ms; free page "
              f"reporting: {', '.join(f'{k}={v}' for k, v in h.items() if k != 'first_touch_512mib_ms') or 'none'}")
    keys = ["create_client_ms", "create_vmmd_ms", "paused_ms", "create_capture_ms", "create_ram_ms",
            "create_commit_ms", "nosync_create_client_ms", "nosync_paused_ms", "nosync_commit_ms",
            "cp_same_fs_ms", "cp_fsync_same_fs_ms", "cp_to_shm_ms",
            "restore_from_spawn_ms", "restore_from_main_ms", "restore_checks_ms", "restore_ram_ms",
            "restore_vmmd_setup_ms", "restore_spawn_devices_ms", "restore_device_states_ms", "restore_kvm_ms",
            "wait_ready_ms", "wait_call_to_vcpus_ms", "wait_vmmd_ms", "wait_reply_ms", "wait_checks_ms",
            "wait_ram_ms", "wait_setup_ms", "wait_devices_ms", "wait_device_states_ms", "wait_kvm_ms",
            "size_on_disk", "apparent_size", "ram_bytes_written"]
    for kind in ("idle", "half"):
        rs = [r for r in results if r["guest"] == kind]
        print(f"\n{kind}:")
        for k in keys:
            vals = [r[k] for r in rs]
            if k in ("size_on_disk", "apparent_size", "ram_bytes_written"):
                print(f"  {k:24s} {statistics.median(vals) / MiB:9.1f} MiB")
            else:
                print(f"  {k:24s} {statistics.median(vals):9.1f} ms ({min(vals):.1f}-{max(vals):.1f})")
        # each create against the copy with the same durability, run by run
        for name, num, den in (("durable create / (cp + fsync)", "create_client_ms", "cp_fsync_same_fs_ms"),
                               ("create without fsync / cp", "nosync_create_client_ms", "cp_same_fs_ms")):
            ratios = [r[num] / r[den] for r in rs if r[den] > 0]
            if ratios:
                print(f"  ratio {name}: {statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
