"""snapshot.create: pause, quiesce and save every device process concurrently,
save vCPUs, VM and RAM, resume (or stay paused).

Diff snapshots need dirty tracking since their parent: after every snapshot
(and after a restore) vmmd turns KVM dirty logging on for the RAM memslots
and clears both KVM's and every device's dirty log while the VM is still
paused; the next diff is the OR of the two logs since then, plus every page
that is a hole now (ballooned or never touched: zero, costs no space).
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import os
import shutil
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import numpy as np  # kvm_dirty needs it too

import vmmd
from vmmd.kvm import abi
from vmmd.snapshot import clock, config_io, machine_state
from vmmd.snapshot import devices as devstate
from vmmd.snapshot import disks as diskio
from vmmd.snapshot import format as fmt
from vmmd.snapshot import ram as ramio
from vmmd.snapshot.kvm_dirty import KvmDirtyLog, KvmDirtyLogError
from vmmd.snapshot.format import SnapshotError
from vmmd.snapshot.store import SnapshotWriter, read_manifest

log = logging.getLogger(__name__)


# -- dirty tracking ---------------------------------------------------------------------
def start_tracking(machine, base_id: str, kvm_chunked: bool = False) -> None:
    """Dirty logging on (if not yet), both logs cleared: diffs from `base_id` from now on.
    Call with the vCPUs stopped. kvm_chunked: the caller clears KVM's log chunk by
    chunk as it reads all of RAM (a migration's first pass; manual mode only)."""
    vm, mem = machine.vm, machine.memory
    machine.snapshot_base = None
    kvm_log = getattr(machine, "kvm_dirty", None)
    try:
        if kvm_log is None:
            kvm_log = KvmDirtyLog(vm, mem)
            kvm_log.enable()
            machine.kvm_dirty = kvm_log
            log.info("KVM dirty log: %s mode%s", kvm_log.mode,
                     " (initially set)" if kvm_log.initially_set else "")
        if not (kvm_chunked and kvm_log.manual):
            kvm_log.reset()
    except (OSError, KvmDirtyLogError) as exc:
        log.warning("KVM dirty logging unavailable (%s): no diff snapshots from here", exc)
        return
    for dev in machine.supervisor.devices.values():
        if dev.dirty_log is not None and dev.ready:
            try:
                dev.harvest_dirty()
            except Exception as exc:
                log.warning("device %s: dirty log not cleared (%s): no diff from this snapshot", dev.spec.id, exc)
                machine.snapshot_base = None
                return
    machine.snapshot_base = base_id


def kvm_log_of(machine) -> KvmDirtyLog:
    """The machine's KVM dirty log (a classic reader when tracking never started)."""
    kvm_log = getattr(machine, "kvm_dirty", None)
    return kvm_log if kvm_log is not None else KvmDirtyLog(machine.vm, machine.memory, mode="classic")


def dirty_mask(machine, holes: bool = True) -> np.ndarray:
    """Pages (by memfd offset) written since tracking started: KVM | devices | holes
    (live migration asks without holes: they are sent once, as zero pages).
    In KVM's manual mode the KVM bits stay set until cleared (start_tracking,
    or the migration sender chunk by chunk)."""
    mem = machine.memory
    pages = mem.size // ramio.PAGE
    mask = kvm_log_of(machine).get()
    for dev in machine.supervisor.devices.values():
        if dev.dirty_log is None:
            continue
        gpa_pages = np.asarray(dev.harvest_dirty(), dtype=np.int64)  # raises if it cannot: no diff
        for region in mem.layout.regions:
            lo, hi = region.gpa // ramio.PAGE, region.end // ramio.PAGE
            sel = gpa_pages[(gpa_pages >= lo) & (gpa_pages < hi)]
            mask[sel - lo + region.offset // ramio.PAGE] = True
    if not holes:
        return mask
    hole = np.ones(pages, dtype=bool)
    for start, length in ramio.data_extents(mem.fd, mem.size):
        hole[start // ramio.PAGE:(start + length) // ramio.PAGE] = False
    return mask | hole


# -- the snapshot ------------------------------------------------------------------------
def save_vm_section(machine) -> dict:
    state = machine_state.save_irqchips(machine.vm)
    state["clock"] = clock.save_clock(machine.vm, machine.vcpus)
    state["pci"] = devstate.save_pci(machine.pci)
    state["ncpus"] = len(machine.vcpus)
    return state


async def create(machine, path: str, resume: bool = True, diff_from: str | None = None,
                 disks: str = "shared", sync: bool = True) -> dict:
    """The body of snapshot.create (the caller holds the machine's transition lock
    and has checked the state). Returns a summary. sync=False: the reply comes
    once the snapshot is complete in the page cache, not on disk (no fsync; the
    digests still make a torn snapshot refused at restore)."""
    loop = asyncio.get_running_loop()
    t0 = time.monotonic()
    if disks not in diskio.DISK_MODES:
        raise SnapshotError(f"disks must be one of {', '.join(diskio.DISK_MODES)}, not {disks!r}")
    snap_id = uuid.uuid4().hex
    progress = machine.snapshot_progress = {"phase": "checking", "path": path, "bytes_done": 0,
                                            "bytes_total": machine.memory.size}
    parent = None
    if diff_from is not None:
        pm, _ = await loop.run_in_executor(None, read_manifest, diff_from)
        if machine.snapshot_base is None or pm["id"] != machine.snapshot_base:
            raise SnapshotError(f"{diff_from}: this VM has no dirty tracking since that snapshot "
                                f"(only since {machine.snapshot_base or 'none'}); take a full snapshot")
        parent = {"id": pm["id"], "path": os.path.relpath(os.path.abspath(diff_from), os.path.abspath(path))}
    devices = list(machine.supervisor.devices.values())
    # disks=overlay: every disk checked (raw ones refused) before anything is paused or written
    disk_plans = (await loop.run_in_executor(None, diskio.plan, machine, devices)
                  if disks == "overlay" else None)
    writer = await loop.run_in_executor(None, SnapshotWriter, path)
    if disk_plans:
        try:  # the overlays are made (and durable) before the pause; only the switch is in it
            await loop.run_in_executor(None, diskio.prepare_overlays, disk_plans, f"snap-{snap_id[:8]}")
        except BaseException:
            shutil.rmtree(writer.path, ignore_errors=True)
            raise
    was_running = machine.state == "running"
    paused_at = None
    try:
        progress["phase"] = "pausing"
        if was_running:
            if not await loop.run_in_executor(None, machine.control.pause, 10.0):
                raise SnapshotError("vCPUs did not stop within 10 s")
            machine.state = "paused"
        paused_at = time.monotonic()
        progress["phase"] = "devices"

        states = await devstate.save_devices(devices)
        disk_entries = None
        if disk_plans is not None:
            # Devices quiesced, nothing in flight: the images are the disks as
            # the saved states and RAM see them; freeze them now.
            progress["phase"] = "disks"
            t_disks = time.monotonic()
            disk_entries = await loop.run_in_executor(None, diskio.freeze, machine, disk_plans)
            diskio.discard(disk_plans)  # (every one switched: closes vmmd's fds, removes nothing)
            disks_ms = (time.monotonic() - t_disks) * 1000
        progress["phase"] = "vcpus"
        kvm = machine.kvm
        msrs = kvm.msr_index_list()
        has_xsave = bool(kvm.check_extension(abi.KVM_CAP_XSAVE))
        has_xcrs = bool(kvm.check_extension(abi.KVM_CAP_XCRS))
        vcpu_states = [machine_state.save_vcpu(v, msrs, has_xsave, has_xcrs) for v in machine.vcpus]
        vm_state = save_vm_section(machine)

        progress["phase"] = "ram"
        t_capture = time.monotonic()
        include = dirty_mask(machine) if parent else None

        # Where the digest costs least: with sync, read back from the file
        # beside its fsync, after the resume (the disk is slower than
        # SHA-256); without, taken by the scanning thread during the copy,
        # beside the kernel's copy on the other core (it would otherwise be
        # all that is left after the resume).
        paused_digest = None if sync else ramio.RamDigest(machine.memory.size)

        def copy_ram():
            fd = writer.open("ram.img")
            try:
                mem = machine.memory
                return ramio.copy_ram(mem._view, mem.fd, mem.size, fd, include,
                                      progress=lambda done: progress.__setitem__("bytes_done", done),
                                      digest=paused_digest)
            finally:
                os.close(fd)

        ram_runs, written = await loop.run_in_executor(None, copy_ram)

        t_ram = time.monotonic()
        config = config_io.config_to_json(machine.cfg, machine)
        manifest = {
            # Format 1 has no disk checkpoints; only a snapshot that records
            # them needs a vmmd that knows them (an older one would open the
            # frozen images read-write).
            "format": fmt.FORMAT_NAME, "format_version": 2 if disk_entries is not None else 1,
            "vmmd_version": vmmd.__version__, "id": snap_id,
            "type": "diff" if parent else "full", "parent": parent,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "config": config if disk_entries is None else diskio.manifest_config(config, disk_entries),
            "memory": {"size": machine.memory.size, "page_size": ramio.PAGE,
                       "layout": machine.memory.layout.to_wire()},
        }
        if disk_entries is not None:
            manifest["disks"] = disk_entries

        def write_sections(digest: str):
            writer.add_ram(machine.memory.size, digest, bytes_written=written)
            if include is not None:
                writer.add_binary("ram-pages", np.packbits(include, bitorder="little").tobytes())
            writer.add_json("vm", "vm", vm_state)
            for st in vcpu_states:
                writer.add_json("vcpu", str(st["index"]), st)
            for dev, st in zip(devices, states):
                writer.add_json("device", devstate.instance_of(dev), st, device_kind=dev.spec.kind,
                                device_id=dev.spec.id)

        start_tracking(machine, snap_id)
    except BaseException:
        progress["phase"] = "failed"
        if disk_plans:
            diskio.discard(disk_plans)
            log.warning("snapshot failed; the disks now run on %s",
                        ", ".join(str(p.dev.spec.options.get("path")) for p in disk_plans))
        await _resume(machine, devices, was_running)
        shutil.rmtree(writer.path, ignore_errors=True)  # never leave a half-written snapshot
        raise
    # Everything the guest can change is captured (RAM is in the page cache):
    # the VM runs on while the files reach the disk; the snapshot exists once
    # its manifest digest is written (the commit point), after every fsync.
    progress["phase"] = "resuming"
    await _resume(machine, devices, resume)
    paused_ms = (time.monotonic() - paused_at) * 1000
    progress["phase"] = "writing"
    t_commit = time.monotonic()
    try:
        if paused_digest is not None:
            digest = paused_digest.hexdigest()
        else:
            digest = await loop.run_in_executor(None, _ram_digest, writer, machine.memory.size, ram_runs)
        digest_ms = (time.monotonic() - t_commit) * 1000
        await loop.run_in_executor(None, write_sections, digest)
        progress["phase"] = "committing"
        await loop.run_in_executor(None, writer.commit, manifest, sync)
    except BaseException:
        machine.snapshot_base = None
        shutil.rmtree(writer.path, ignore_errors=True)
        raise
    machine.snapshot_progress = None
    now = time.monotonic()
    out_disks = None
    if disk_entries is not None:
        out_disks = {inst: {"frozen": e["path"], "mode": e["mode"],
                            "now": next((os.path.abspath(d.dev.spec.options["path"]) for d in disk_plans
                                         if d.instance == inst), None)}
                     for inst, e in disk_entries.items()}
    return {"path": os.path.abspath(path), "id": snap_id, "type": "diff" if parent else "full",
            **({"disks": out_disks} if out_disks is not None else {}),
            "ram_bytes_written": written, "synced": sync, "paused_ms": round(paused_ms, 1),
            "total_ms": round((now - t0) * 1000, 1),
            "phases_ms": {"capture": round((t_capture - paused_at) * 1000, 1),
                          "ram": round((t_ram - t_capture) * 1000, 1),
                          "commit": round((now - t_commit) * 1000, 1),
                          "digest": round(digest_ms, 1),
                          **({"disks": round(disks_ms, 1)} if disk_entries is not None else {})},
            "state": machine.state}


def _ram_digest(writer, size: int, runs) -> str:
    """The RAM image's digest, read back from the file while its fsync runs
    (the commit's fsync of it then finds little left to do)."""
    fd = os.open(os.path.join(writer.path, "ram.img"), os.O_RDONLY | os.O_CLOEXEC)
    try:
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="ram-sync") as ex:
            synced = ex.submit(os.fsync, fd)
            try:
                return ramio.digest_runs(fd, size, runs)
            finally:
                synced.result()
    finally:
        os.close(fd)


async def _resume(machine, devices, vcpus: bool) -> None:
    await devstate.resume_devices(devices, log)
    if vcpus and machine.state == "paused":
        clock.kvmclock_ctrl_all(machine.vcpus)
        machine.control.resume()
        machine.state = "running"
