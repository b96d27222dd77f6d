"""The VM configuration in a snapshot manifest, and restore-time overrides.

The manifest holds the VmConfig as JSON, with what vmmd chose at start made
explicit (a virtio-net's generated MAC), so the restored devices are the
same. Host-side resources can be replaced when restoring: a disk image per
slot, a NIC's tap or switch socket, console backends, the API socket.
"""

from __future__ import annotations

import dataclasses

from vmmd.api.limits import ApiLimits
from vmmd.config import SlotConfig, VmConfig
from vmmd.snapshot.format import SnapshotError

# Fields that describe how the guest was first loaded: not needed to restore.
_BOOT_ONLY = ("kernel", "initrd", "cmdline", "raw", "raw_mode")


def config_to_json(cfg: VmConfig, machine=None) -> dict:
    d = dataclasses.asdict(cfg)
    slots = []
    for s in cfg.slots:
        args = list(s.args)
        if s.device == "virtio-net" and machine is not None and not any(a.startswith("mac=") for a in args):
            dev = next((x for x in machine.supervisor.devices.values()
                        if x.spec.slot == s.slot and x.spec.function == s.function), None)
            if dev is not None:
                args.append(f"mac={dev.spec.options['mac']}")
        slots.append({"slot": s.slot, "function": s.function, "device": s.device, "args": args})
    d["slots"] = slots
    d["consoles"] = dict(cfg.consoles)
    return d


def config_from_json(d: dict) -> VmConfig:
    """A VmConfig from a manifest (types checked: the manifest is input)."""
    names = {f.name: f for f in dataclasses.fields(VmConfig)}
    if not isinstance(d, dict) or not set(d) <= set(names):
        raise SnapshotError("manifest config: unknown keys "
                            f"{sorted(set(d) - set(names)) if isinstance(d, dict) else d!r}")
    kw = {}
    for k, v in d.items():
        if k == "slots":
            if not isinstance(v, list):
                raise SnapshotError("manifest config: slots must be a list")
            slots = []
            for s in v:
                if (not isinstance(s, dict) or type(s.get("slot")) is not int or type(s.get("function")) is not int
                        or not isinstance(s.get("device"), str) or not isinstance(s.get("args"), list)
                        or not all(isinstance(a, str) for a in s["args"])):
                    raise SnapshotError(f"manifest config: bad slot {s!r}")
                slots.append(SlotConfig(s["slot"], s["function"], s["device"], tuple(s["args"])))
            kw[k] = tuple(slots)
        elif k == "api_limits":   # a nested dataclass: asdict() wrote it as an object
            fields = {f.name: f.type for f in dataclasses.fields(ApiLimits)}
            if (not isinstance(v, dict) or set(v) != set(fields)
                    or any(type(x) not in (int, float) for x in v.values())):
                raise SnapshotError(f"manifest config: bad api_limits {v!r}")
            kw[k] = ApiLimits(**v)
        elif k == "consoles":
            if not isinstance(v, dict) or not all(isinstance(x, str) for x in v.values()):
                raise SnapshotError("manifest config: bad consoles")
            kw[k] = dict(v)
        else:
            kw[k] = v
    try:
        cfg = VmConfig(**kw)
    except TypeError as exc:
        raise SnapshotError(f"manifest config: {exc}") from None
    if type(cfg.cpus) is not int or not 1 <= cfg.cpus <= 255:
        raise SnapshotError(f"manifest config: bad cpus {cfg.cpus!r}")
    if type(cfg.memory) is not int or cfg.memory <= 0 or cfg.memory % 4096:
        raise SnapshotError(f"manifest config: bad memory {cfg.memory!r}")
    return cfg


def _replace_arg(args: tuple[str, ...], keys: tuple[str, ...], new: str | None, first: str | None = None):
    out = [a for a in args if a.split("=", 1)[0] not in keys]
    if new is not None:
        out.append(new)
    return tuple(out)


def apply_overrides(cfg: VmConfig, *, disks: dict[int, str], nets: dict[int, str],
                    consoles: dict[str, str], scalars: dict) -> VmConfig:
    """Host-side resources replaced on restore; anything that names a slot the
    snapshot does not have, or of another kind, is refused (SnapshotError)."""
    by_slot = {s.slot: s for s in cfg.slots if s.function == 0}
    slots = {(s.slot, s.function): s for s in cfg.slots}
    for slot, path in disks.items():
        s = by_slot.get(slot)
        if s is None or s.device != "virtio-blk":
            raise SnapshotError(f"--disk {slot}=...: the snapshot has no virtio-blk in slot {slot}")
        slots[(slot, 0)] = dataclasses.replace(s, args=(path, *s.args[1:]))
    for slot, backend in nets.items():
        s = by_slot.get(slot)
        if s is None or s.device != "virtio-net":
            raise SnapshotError(f"--net {slot}=...: the snapshot has no virtio-net in slot {slot}")
        slots[(slot, 0)] = dataclasses.replace(s, args=_replace_arg(s.args, ("tap", "socket"), backend))
    cons = dict(cfg.consoles)
    for port, spec in consoles.items():
        if port not in cons and not any(s.device == "lpc" for s in cfg.slots):
            raise SnapshotError(f"-l {port}: the snapshot has no LPC bridge")
        cons[port] = spec
    return dataclasses.replace(cfg, slots=tuple(slots[k] for k in sorted(slots)), consoles=cons, **scalars)
