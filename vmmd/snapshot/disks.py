"""Disk checkpoints: the disk images a snapshot's RAM and device states belong to.

`snapshot.create {"disks": "shared"}` (the default) leaves the disks alone:
the manifest's configuration names the live images and the operator keeps
them as they were (docs/snapshot.md).

`{"disks": "overlay"}`: at the snapshot point (vCPUs stopped, devices
quiesced, so nothing is in flight) every writable qcow2 disk switches to a
fresh external overlay whose backing file is the image as it was; that image
is *frozen* from then on (the source VM only reads it) and is what the
snapshot records, per slot, with its identity. A read-only disk is recorded
as it is (nobody writes it). A writable raw disk is refused before anything
is paused: there is no overlay a raw disk could switch to without turning it
into a qcow2 disk under the guest (see docs/snapshot.md).

Restoring creates a new overlay on each frozen image (or on the image
`--disk SLOT=PATH` names instead), so the source VM and the restored one
never share a writable file and the frozen image is never written.

Identity of a frozen image: its file size, mtime (ns) and the SHA-256 of its
first 64 KiB (the qcow2 header with its extensions and backing name, and
whatever tables follow in that range); a changed file is refused on restore. A copy given with --disk has its own
mtime: only size and header are compared.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
from dataclasses import dataclass

from devopts import virtio_blk as blkopts
from vmmd.snapshot.format import SnapshotError

log = logging.getLogger(__name__)

DISK_MODES = ("shared", "overlay")
HEADER_BYTES = 65536            # hashed for the identity (the header cluster at the default cluster size)
ENTRY_MODES = ("overlay", "read-only")


# -- identity --------------------------------------------------------------------------
def identity(path: str) -> dict:
    """What must not change about a frozen image (OSError if unreadable)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        head = os.pread(fd, HEADER_BYTES, 0)
    finally:
        os.close(fd)
    return {"file_size": st.st_size, "mtime_ns": st.st_mtime_ns,
            "header_sha256": hashlib.sha256(head).hexdigest()}


def identity_problem(entry: dict, now: dict, *, check_mtime: bool) -> str | None:
    """Why `now` (identity()) is not the image `entry` recorded, or None."""
    if now["file_size"] != entry["file_size"]:
        return f"its size is {now['file_size']} bytes, the snapshot recorded {entry['file_size']}"
    if now["header_sha256"] != entry["header_sha256"]:
        return "its header differs from the one the snapshot recorded"
    if check_mtime and now["mtime_ns"] != entry["mtime_ns"]:
        return "it was modified after the snapshot (mtime differs)"
    return None


# -- the manifest entry (sans-I/O: the manifest is input) ------------------------------
def check_entries(disks) -> dict:
    """manifest["disks"]: {"S.F": {"mode", "path", "format", "file_size", "mtime_ns",
    "header_sha256"}}; SnapshotError if malformed."""
    if not isinstance(disks, dict) or len(disks) > 256:
        raise SnapshotError("manifest: disks must be an object")
    for inst, e in disks.items():
        w = f"manifest: disks[{inst!r}]"
        slot, dot, fn = inst.partition(".")
        if not (dot and slot.isascii() and fn.isascii() and slot.isdigit() and fn.isdigit()
                and f"{int(slot)}.{int(fn)}" == inst and 0 < int(slot) < 32 and int(fn) < 8):
            raise SnapshotError(f"{w}: the key must be a PCI slot.function")
        if not isinstance(e, dict):
            raise SnapshotError(f"{w}: not an object")
        if e.get("mode") not in ENTRY_MODES:
            raise SnapshotError(f"{w}: mode must be one of {', '.join(ENTRY_MODES)}")
        if not isinstance(e.get("path"), str) or not os.path.isabs(e["path"]) or "\0" in e["path"]:
            raise SnapshotError(f"{w}: path must be an absolute path")
        if e.get("format") not in blkopts.FORMATS:
            raise SnapshotError(f"{w}: format must be one of {', '.join(blkopts.FORMATS)}")
        if e["mode"] == "overlay" and e["format"] != "qcow2":
            raise SnapshotError(f"{w}: an overlay checkpoint needs a qcow2 image")
        for k in ("file_size", "mtime_ns"):
            if type(e.get(k)) is not int or e[k] < 0:
                raise SnapshotError(f"{w}: {k} missing or not a non-negative integer")
        h = e.get("header_sha256")
        if not isinstance(h, str) or len(h) != 64 or not set(h) <= set("0123456789abcdef"):
            raise SnapshotError(f"{w}: bad header_sha256")
    return disks


# -- snapshot.create -------------------------------------------------------------------
@dataclass
class DiskPlan:
    dev: object          # the virtio-blk ManagedDevice
    instance: str        # "S.F"
    path: str            # the disk's current image (absolute)
    mode: str            # "overlay" | "read-only"
    fmt: str             # "qcow2" | "raw"
    overlay: str | None = None   # made by prepare_overlays(), before the pause
    fd: int | None = None
    switched: bool = False
    maybe_open: bool = False     # the switch failed in a way that may have opened it


def probe_format(path: str) -> str:
    try:
        with open(path, "rb") as f:
            return "qcow2" if f.read(4) == blkopts.QCOW2_MAGIC else "raw"
    except OSError as exc:
        raise SnapshotError(f"disk image {path}: {exc.strerror}") from None


def plan(machine, devices) -> list[DiskPlan]:
    """Every virtio-blk's part in a disks=overlay snapshot, checked before
    anything is paused (SnapshotError names the disk that cannot take part)."""
    plans = []
    for dev in devices:
        if dev.spec.kind != "virtio_blk":
            continue
        inst = f"{dev.spec.slot}.{dev.spec.function}"
        opts = blkopts.parse(list(dev.spec.options["args"]))
        path = os.path.abspath(opts.path)
        fmt_name = opts.image_format or probe_format(path)
        if opts.read_only:
            plans.append(DiskPlan(dev, inst, path, "read-only", fmt_name))
            continue
        if fmt_name != "qcow2":
            raise SnapshotError(
                f"disks=overlay: the disk in slot {inst} ({opts.path}) is a raw image; only qcow2 "
                "disks can switch to an overlay (convert it with vmmd-img convert, make it ro, "
                "or take the snapshot with disks=shared)")
        if machine.fdpass.get(dev.spec.id) is None:
            raise SnapshotError(f"disks=overlay: the disk in slot {inst} has no fd channel")
        plans.append(DiskPlan(dev, inst, path, "overlay", fmt_name))
    return plans


def _fsync_dir(path: str) -> None:
    fd = os.open(os.path.dirname(os.path.abspath(path)) or ".", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _use_image(machine, dev, path: str) -> None:
    """From now on the disk's image is `path` (a qcow2 overlay): what a restarted
    incarnation opens, and what the VM's configuration says."""
    import dataclasses
    args = [path, *(a for a in dev.spec.options["args"][1:] if not a.startswith("format="))]
    args.append("format=qcow2")
    dev.spec.options["args"] = args
    dev.spec.options["path"] = path
    slots = tuple(dataclasses.replace(s, args=tuple(args))
                  if (s.slot, s.function) == (dev.spec.slot, dev.spec.function) else s
                  for s in machine.cfg.slots)
    machine.cfg = dataclasses.replace(machine.cfg, slots=slots)


def prepare_overlays(plans: list[DiskPlan], tag: str) -> None:
    """Create each qcow2 disk's empty overlay (and make it durable) before the
    VM is paused: only the switch itself happens in the pause. SnapshotError
    (with every overlay made so far removed) if one cannot be made."""
    from devices.virtio_blk.qcow2.format import Qcow2Error
    from vmmd import disk_overlay
    try:
        for p in plans:
            if p.mode != "overlay":
                continue
            path = disk_overlay.overlay_path_for(p.path, tag)
            try:
                p.fd = disk_overlay.create_overlay(p.path, path)
                p.overlay = path
                _fsync_dir(path)
            except (Qcow2Error, OSError) as exc:
                raise SnapshotError(f"disk in slot {p.instance}: cannot create the overlay {path}: {exc}") from None
    except BaseException:
        discard(plans)
        raise


def switch_one(machine, p: DiskPlan) -> None:
    """Hand the prepared overlay's fd to the device and switch (devices
    quiesced; blocking: run it in an executor). SnapshotError with the disk
    on its old image."""
    from bus.endpoint import DeviceControlError
    from vmmd import disk_overlay
    try:
        disk_overlay.send_fd(machine.fdpass[p.dev.spec.id], p.fd)
        p.dev.control("device", {"op": "switch_overlay", "args": {"path": p.overlay}})
    except Exception as exc:
        # A refusal (DeviceControlError) means the device never took the
        # overlay. Anything else (timeout, device gone) may have come after
        # the incarnation switched: keep the file (the supervisor restarts
        # the device on its configured, old, image).
        p.maybe_open = not isinstance(exc, (DeviceControlError, OSError))
        raise SnapshotError(f"disk in slot {p.instance}: the switch to an overlay failed: {exc}") from None
    p.switched = True
    _use_image(machine, p.dev, p.overlay)
    log.info("disk in slot %s: %s is frozen for the snapshot, writes go to %s", p.instance, p.path, p.overlay)


def discard(plans: list[DiskPlan]) -> None:
    """Close the overlays' fds; remove the ones no device switched to."""
    for p in plans or ():
        if p.fd is not None:
            os.close(p.fd)
            p.fd = None
        if p.overlay and not p.switched and not p.maybe_open:
            try:
                os.unlink(p.overlay)
            except OSError:
                pass
            p.overlay = None


def freeze(machine, plans: list[DiskPlan]) -> dict:
    """Switch every planned disk to its prepared overlay (devices quiesced);
    returns the manifest's "disks". A failure midway leaves the disks switched
    so far on their (empty, consistent) overlays and the rest on their images
    (the caller's discard() removes their overlays)."""
    entries = {}
    for p in plans:
        if p.mode == "overlay":
            try:
                switch_one(machine, p)
            except SnapshotError as exc:
                done = [q.overlay for q in plans if q.switched]
                more = f" (already switched, and staying on their overlays: {', '.join(done)})" if done else ""
                raise SnapshotError(f"{exc}{more}") from None
        try:
            ident = identity(p.path)
        except OSError as exc:
            raise SnapshotError(f"disk in slot {p.instance}: {p.path}: {exc.strerror}") from None
        entries[p.instance] = {"mode": p.mode, "path": p.path, "format": p.fmt, **ident}
    return entries


def manifest_config(config: dict, disks: dict) -> dict:
    """The manifest's configuration names each recorded disk's frozen image."""
    out = dict(config)
    slots = []
    for s in config["slots"]:
        e = disks.get(f"{s['slot']}.{s['function']}")
        if e is not None and s["device"] == "virtio-blk":
            rest = [a for a in s["args"][1:] if not a.startswith("format=")]
            s = dict(s, args=[e["path"], *rest, f"format={e['format']}"])
        slots.append(s)
    out["slots"] = slots
    return out


# -- restore ---------------------------------------------------------------------------
@dataclass
class RestoreDisk:
    slot: int
    instance: str
    base: str            # the frozen image (or the --disk override)
    mode: str
    overlay: str | None = None


def check_for_restore(disks: dict, overrides: dict[int, str], cfg=None) -> list[RestoreDisk]:
    """Each recorded disk's image (or its --disk override) is still the image
    the snapshot recorded; SnapshotError otherwise. Creates nothing."""
    if cfg is not None:
        blk = {f"{s.slot}.{s.function}" for s in cfg.slots if s.device == "virtio-blk"}
        stray = sorted(set(disks) - blk)
        if stray:
            raise SnapshotError(f"manifest: disks {stray} name no virtio-blk of the configuration")
    out = []
    for inst, e in sorted(disks.items()):
        slot = int(inst.split(".")[0])
        given = overrides.get(slot) if inst.endswith(".0") else None
        base = os.path.abspath(given) if given else e["path"]
        try:
            now = identity(base)
        except OSError as exc:
            raise SnapshotError(f"disk in slot {inst}: the snapshot's image {base}: {exc.strerror}") from None
        why = identity_problem(e, now, check_mtime=given is None)
        if why:
            raise SnapshotError(f"disk in slot {inst}: the snapshot's image {base} changed: {why}; "
                                "refusing to restore on a different disk")
        out.append(RestoreDisk(slot, inst, base, e["mode"]))
    return out


def create_restore_overlays(plan: list[RestoreDisk], snap_id: str) -> None:
    """A fresh overlay on each frozen image (the restored VM writes only
    there); on failure the overlays made so far are removed."""
    from devices.virtio_blk.qcow2.format import Qcow2Error
    from vmmd import disk_overlay
    tag = f"restore-{snap_id[:8]}-{secrets.token_hex(3)}"
    try:
        for d in plan:
            if d.mode != "overlay":
                continue
            path = disk_overlay.overlay_path_for(d.base, tag)
            try:
                os.close(disk_overlay.create_overlay(d.base, path))
                _fsync_dir(path)
            except (Qcow2Error, OSError) as exc:
                raise SnapshotError(f"disk in slot {d.instance}: cannot create an overlay on {d.base}: {exc}") from None
            d.overlay = path
            log.info("disk in slot %s: restored on a new overlay %s over %s", d.instance, path, d.base)
    except BaseException:
        remove_overlays(plan)
        raise


def remove_overlays(plan: list[RestoreDisk]) -> None:
    for d in plan:
        if d.overlay:
            try:
                os.unlink(d.overlay)
            except OSError:
                pass
            d.overlay = None


def apply_to_config(cfg, plan: list[RestoreDisk]):
    """The restored VM's disks: the new overlays (read-only disks: their image)."""
    import dataclasses
    by_inst = {d.instance: d for d in plan}
    slots = []
    for s in cfg.slots:
        d = by_inst.get(f"{s.slot}.{s.function}")
        if d is not None and s.device == "virtio-blk":
            rest = [a for a in s.args[1:] if not (d.overlay and a.startswith("format="))]
            if d.overlay:
                rest.append("format=qcow2")
            s = dataclasses.replace(s, args=(d.overlay or d.base, *rest))
        slots.append(s)
    return dataclasses.replace(cfg, slots=tuple(slots))
