"""`vmmd --restore DIR`: check a snapshot whole, then rebuild the VM from it.

Everything that can be checked without starting a process is checked in
prepare() -- the manifest and every section's size and SHA-256, the RAM
image(s) loaded into fresh guest memory with their digests, the vCPU and VM
sections, the configuration against the restore command -- so a bad
snapshot is refused with one "vmmd: error:" line and exit status 2 before
any device process or vCPU exists. What only a device can judge (its own
state against its backend) is checked when the device restores it, still
before any vCPU runs; on failure everything started is torn down.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass

from vmmd.config import (LOG_LEVELS, SANDBOX_MODES, ConfigError, VmConfig,
                         _check_socket_path, _choice, _float, _readable_file, parse_console)
from vmmd.guest_memory import GuestMemory, GuestMemoryError, MemoryLayout
from vmmd.snapshot import clock, config_io, machine_state, store
from vmmd.snapshot import devices as devstate
from vmmd.snapshot import disks as diskio
from vmmd.snapshot.devices import RestoreError
from vmmd.snapshot import format as fmt
from vmmd.snapshot.format import SnapshotError

log = logging.getLogger(__name__)


@dataclass
class RestoreRequest:
    path: str
    clock: str = "advance"
    api_socket: str | None = None
    sandbox: str | None = None
    log_level: str | None = None
    device_timeout: float | None = None
    disks: dict | None = None
    nets: dict | None = None
    consoles: dict | None = None
    paused: bool = False


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise ConfigError(message)


def _slot_value(text: str, what: str) -> tuple[int, str]:
    slot, eq, value = text.partition("=")
    if not eq or not slot.isdigit() or not 0 < int(slot) < 32 or not value:
        raise ConfigError(f"{what} {text!r}: expected SLOT=VALUE")
    return int(slot), value


def parse_restore_args(argv: list[str]) -> RestoreRequest:
    """The restore command line: --restore DIR and host-side overrides only."""
    p = _Parser(prog="vmmd --restore", allow_abbrev=False)
    p.add_argument("--restore", required=True, metavar="DIR")
    p.add_argument("--clock", default="advance")
    p.add_argument("--api-socket")
    p.add_argument("--sandbox")
    p.add_argument("--log-level")
    p.add_argument("--device-timeout")
    p.add_argument("--disk", action="append", default=[], metavar="SLOT=PATH")
    p.add_argument("--net", action="append", default=[], metavar="SLOT=tap=NAME|socket=PATH")
    p.add_argument("-l", "--console", action="append", default=[], metavar="SPEC")
    p.add_argument("--paused", action="store_true", help="leave the vCPUs paused (vm.resume starts them)")
    ns = p.parse_args(argv)
    req = RestoreRequest(path=ns.restore, clock=_choice(ns.clock, "--clock", clock.CLOCK_MODES),
                         paused=ns.paused)
    if ns.api_socket is not None:
        _check_socket_path(ns.api_socket, "--api-socket")
        req.api_socket = ns.api_socket
    if ns.sandbox is not None:
        req.sandbox = _choice(ns.sandbox, "--sandbox", SANDBOX_MODES)
    if ns.log_level is not None:
        req.log_level = _choice(ns.log_level, "--log-level", LOG_LEVELS)
    if ns.device_timeout is not None:
        req.device_timeout = _float(ns.device_timeout, "--device-timeout")
    req.disks = {}
    for text in ns.disk:
        slot, path = _slot_value(text, "--disk")
        _readable_file(path, f"--disk {slot}")
        req.disks[slot] = path
    req.nets = {}
    for text in ns.net:
        slot, backend = _slot_value(text, "--net")
        if backend.split("=", 1)[0] not in ("tap", "socket") or not backend.partition("=")[2]:
            raise ConfigError(f"--net {text!r}: expected SLOT=tap=NAME or SLOT=socket=PATH")
        req.nets[slot] = backend
    req.consoles = {}
    for text in ns.console:
        port, spec = parse_console(text, "-l")
        req.consoles[port] = spec
    return req


@dataclass
class Prepared:
    cfg: VmConfig
    chain: list
    memory: GuestMemory
    clock_mode: str
    paused: bool = False
    timings: dict | None = None  # ms: "verify" (manifest and JSON sections), "ram" (load + digest)
    disks: list | None = None    # disks.RestoreDisk: the overlays made for this restore

    def discard_overlays(self) -> None:
        """The restore was refused before any vCPU ran: its new overlays go."""
        diskio.remove_overlays(self.disks or [])

    @property
    def tip(self):
        return self.chain[-1]


def prepare(req: RestoreRequest) -> Prepared:
    """Verify the snapshot (chain) and load its RAM; SnapshotError on anything wrong."""
    import time
    t0 = time.monotonic()
    chain = store.open_chain(req.path)
    tip = chain[-1]
    cfg = config_io.config_from_json(tip.manifest["config"])
    scalars = {k: v for k, v in (("sandbox", req.sandbox), ("log_level", req.log_level),
                                 ("device_timeout", req.device_timeout)) if v is not None}
    # The source's API socket is not inherited (that vmmd may still be serving it).
    scalars["api_socket"] = req.api_socket
    cfg = config_io.apply_overrides(cfg, disks=req.disks or {}, nets=req.nets or {},
                                    consoles=req.consoles or {}, scalars=scalars)
    # Disk checkpoints: each frozen image (or its --disk override) still the
    # one the snapshot recorded; the new overlays are made once all else checked.
    disk_plan = diskio.check_for_restore(tip.manifest.get("disks") or {}, req.disks or {}, cfg)
    check_sections(tip, cfg)
    mem_doc = tip.manifest["memory"]
    if mem_doc["size"] != cfg.memory:
        raise SnapshotError(f"manifest memory size {mem_doc['size']} does not match its config ({cfg.memory})")
    try:
        layout = MemoryLayout.from_wire(mem_doc["layout"])
    except GuestMemoryError as exc:
        raise SnapshotError(f"manifest memory layout: {exc}") from None
    memory = GuestMemory.create(cfg.memory)
    try:
        if layout != memory.layout:
            raise SnapshotError("manifest memory layout differs from this vmmd's layout for that size")
        t1 = time.monotonic()
        store.load_chain_ram(chain, memory._view, memory.size, memory.fd)
        diskio.create_restore_overlays(disk_plan, tip.id)
    except BaseException:
        memory.close()
        raise
    cfg = diskio.apply_to_config(cfg, disk_plan)
    timings = {"verify": (t1 - t0) * 1000, "ram": (time.monotonic() - t1) * 1000}
    return Prepared(cfg, chain, memory, req.clock, req.paused, timings, disk_plan)


def check_sections(snap, cfg: VmConfig) -> None:
    """The sections a VM of `cfg` needs, all present and valid, nothing else."""
    vm_state = snap.payload("vm", "vm")
    machine_state.check_irqchips(vm_state)
    clock.check_clock(vm_state.get("clock") or {}, cfg.cpus)
    if vm_state.get("ncpus") != cfg.cpus:
        raise SnapshotError(f"vm section has {vm_state.get('ncpus')!r} vCPUs, the configuration {cfg.cpus}")
    vcpus = [s for s in snap.sections if s.kind == "vcpu"]
    if sorted(s.instance for s in vcpus) != sorted(str(i) for i in range(cfg.cpus)):
        raise SnapshotError(f"snapshot has vCPU sections {[s.instance for s in vcpus]}, "
                            f"the configuration {cfg.cpus} vCPUs")
    for i in range(cfg.cpus):
        machine_state.check_vcpu(snap.payload("vcpu", str(i)), i)
    kinds = {"lpc": "lpc", "virtio-blk": "virtio_blk", "virtio-net": "virtio_net",
             "virtio-balloon": "virtio_balloon"}
    want = {f"{s.slot}.{s.function}": kinds[s.device] for s in cfg.slots if s.device in kinds}
    have = {s.instance: s.extra.get("device_kind") for s in snap.sections if s.kind == "device"}
    if want != have:
        raise SnapshotError(f"device sections {sorted(have.items())} do not match the configured "
                            f"devices {sorted(want.items())}")
    pci = vm_state.get("pci")
    if not isinstance(pci, dict):
        raise SnapshotError("vm section: pci must be an object")
    for inst, p in pci.items():
        if inst not in want or not isinstance(p, dict) or not isinstance(p.get("pending"), list):
            raise SnapshotError(f"vm section: bad PCI entry {inst!r}")
        fmt.unb64(p.get("msix_table"), f"MSI-X table of {inst}")


# -- inside the Machine ---------------------------------------------------------------------
async def restore_devices(machine, snap) -> None:
    """Every (freshly started) device process gets its saved state, then vmmd's
    MSI-X tables; before the VM exists."""
    states = {s.instance: snap.payload("device", s.instance) for s in snap.sections if s.kind == "device"}
    await devstate.restore_devices(list(machine.supervisor.devices.values()), states)
    devstate.restore_pci(machine.pci, snap.payload("vm", "vm")["pci"])


def restore_vm(machine, snap, clock_mode: str) -> None:
    """vCPUs, irqchips, PIT and guest time into the just-built VM."""
    try:
        _restore_vm(machine, snap, clock_mode)
    except OSError as exc:  # KVM refused a register set: a snapshot from an incompatible host
        raise RestoreError(f"KVM refused the saved machine state: {exc}") from None


def _restore_vm(machine, snap, clock_mode: str) -> None:
    vm_state = snap.payload("vm", "vm")
    use_attr = clock.restores_by_offset_attr(machine.vm, machine.vcpus, vm_state["clock"])
    tsc = None if use_attr else clock.guest_tsc_after(vm_state["clock"], clock.elapsed_ns(vm_state["clock"], clock_mode))
    if tsc is not None:
        clock.start_tsc_generation(machine.vcpus[0], tsc)  # else KVM may "sync" it to the VM's age
    for v in machine.vcpus:
        machine_state.restore_vcpu(v, snap.payload("vcpu", str(v.index)), tsc)
    machine_state.restore_irqchips(machine.vm, vm_state)
    machine.time_plan = clock.restore_clock(machine.vm, machine.vcpus, vm_state["clock"], clock_mode)
    if use_attr:
        # The offsets moved the guest TSC: arm each TSC-deadline timer again against it.
        for v in machine.vcpus:
            msrs = machine_state.msr_values(snap.payload("vcpu", str(v.index)))
            if machine_state.MSR_IA32_TSC_DEADLINE in msrs:
                v.set_msrs({machine_state.MSR_IA32_TSC_DEADLINE: msrs[machine_state.MSR_IA32_TSC_DEADLINE]})
    clock.kvmclock_ctrl_all(machine.vcpus)
