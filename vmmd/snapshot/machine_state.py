"""Reading and writing the KVM state of a VM and its vCPUs as JSON-ready dicts.

Kernel structures whose layout is the KVM ABI (sregs, FPU/XSAVE, LAPIC,
events, debug registers, XCRs, irqchips, PIT) are kept as base64 of the
exact structure; general registers and MSRs as named integers. The order of
the restore follows what KVM needs (Documentation/virt/kvm/api.rst):
CPUID before anything that depends on it, LAPIC before the MSRs (a
TSC-deadline value written while the LVT timer is not in TSC-deadline mode
is dropped), IA32_TSC before IA32_TSC_DEADLINE, vCPU events last.
"""

from __future__ import annotations

import ctypes
import logging

from vmmd.kvm import abi
from vmmd.kvm.api import KvmError
from vmmd.snapshot.format import SnapshotError, b64, unb64

log = logging.getLogger(__name__)

MSR_IA32_TSC = 0x10
MSR_IA32_TSC_DEADLINE = 0x6E0
MSR_IA32_TSC_ADJUST = 0x3B

REG_NAMES = [name for name, _ in abi.kvm_regs._fields_]


def _blob(struct) -> str:
    return b64(bytes(struct))


def _unblob(text, cls, what: str):
    return cls.from_buffer_copy(unb64(text, what, ctypes.sizeof(cls)))


def readable_msrs(vcpu, indices: list[int]) -> dict[int, int]:
    """Every MSR of `indices` KVM lets us read (one by one where a batch fails)."""
    try:
        return vcpu.get_msrs(indices)
    except KvmError:
        pass
    out = {}
    for i in indices:
        try:
            out.update(vcpu.get_msrs([i]))
        except KvmError:
            log.debug("MSR %#x not readable; left out of the snapshot", i)
    return out


def save_vcpu(vcpu, msr_indices: list[int], has_xsave: bool, has_xcrs: bool) -> dict:
    regs = vcpu.get_regs()
    state = {
        "index": vcpu.index,
        "regs": {n: int(getattr(regs, n)) for n in REG_NAMES},
        "sregs": _blob(vcpu.get_sregs()),
        "fpu": _blob(vcpu.get_fpu()),
        "lapic": _blob(vcpu.get_lapic()),
        "events": _blob(vcpu.get_vcpu_events()),
        "debugregs": _blob(vcpu.get_debugregs()),
        "mp_state": int(vcpu.get_mp_state()),
        "cpuid": [_blob(e) for e in vcpu.get_cpuid2()],
        "msrs": {f"{k:#x}": int(v) for k, v in sorted(readable_msrs(vcpu, msr_indices).items())},
        "xsave": _blob(vcpu.get_xsave()) if has_xsave else None,
        "xcrs": _blob(vcpu.get_xcrs()) if has_xcrs else None,
    }
    return state


def check_vcpu(state: dict, index: int) -> dict:
    """Validate a vCPU section before touching KVM (SnapshotError)."""
    w = f"vcpu {index}"
    if state.get("index") != index:
        raise SnapshotError(f"{w}: section holds vCPU {state.get('index')!r}")
    regs = state.get("regs")
    if not isinstance(regs, dict) or set(regs) != set(REG_NAMES) or \
            not all(type(v) is int and 0 <= v < 1 << 64 for v in regs.values()):
        raise SnapshotError(f"{w}: bad regs")
    for key, cls in (("sregs", abi.kvm_sregs), ("fpu", abi.kvm_fpu), ("lapic", abi.kvm_lapic_state),
                     ("events", abi.kvm_vcpu_events), ("debugregs", abi.kvm_debugregs)):
        _unblob(state.get(key), cls, f"{w} {key}")
    for key, cls in (("xsave", abi.kvm_xsave), ("xcrs", abi.kvm_xcrs)):
        if state.get(key) is not None:
            _unblob(state[key], cls, f"{w} {key}")
    if type(state.get("mp_state")) is not int or not 0 <= state["mp_state"] <= 10:
        raise SnapshotError(f"{w}: bad mp_state")
    cpuid = state.get("cpuid")
    if not isinstance(cpuid, list) or not 1 <= len(cpuid) <= 256:
        raise SnapshotError(f"{w}: bad cpuid")
    for i, e in enumerate(cpuid):
        _unblob(e, abi.kvm_cpuid_entry2, f"{w} cpuid[{i}]")
    msrs = state.get("msrs")
    if not isinstance(msrs, dict):
        raise SnapshotError(f"{w}: bad msrs")
    for k, v in msrs.items():
        try:
            idx = int(k, 16)
        except ValueError:
            raise SnapshotError(f"{w}: bad MSR index {k!r}") from None
        if not 0 <= idx < 1 << 32 or type(v) is not int or not 0 <= v < 1 << 64:
            raise SnapshotError(f"{w}: bad MSR {k}")
    return state


def msr_values(state: dict) -> dict[int, int]:
    return {int(k, 16): v for k, v in state["msrs"].items()}


def restore_vcpu(vcpu, state: dict, tsc_value: int | None) -> None:
    """Put a checked vCPU section into a fresh vCPU. tsc_value: the IA32_TSC to
    write (the fallback when the TSC offset attribute is not available), or
    None when the caller sets the offset itself (then IA32_TSC is not written)."""
    vcpu.set_cpuid2([_unblob(e, abi.kvm_cpuid_entry2, "cpuid") for e in state["cpuid"]])
    vcpu.set_sregs(_unblob(state["sregs"], abi.kvm_sregs, "sregs"))
    regs = abi.kvm_regs()
    for n, v in state["regs"].items():
        setattr(regs, n, v)
    vcpu.set_regs(regs)
    if state.get("xsave") is not None:
        vcpu.set_xsave(_unblob(state["xsave"], abi.kvm_xsave, "xsave"))
    else:
        vcpu.set_fpu(_unblob(state["fpu"], abi.kvm_fpu, "fpu"))
    if state.get("xcrs") is not None:
        vcpu.set_xcrs(_unblob(state["xcrs"], abi.kvm_xcrs, "xcrs"))
    vcpu.set_lapic(_unblob(state["lapic"], abi.kvm_lapic_state, "lapic"))
    msrs = msr_values(state)
    ordered: dict[int, int] = {}
    if tsc_value is not None:
        ordered[MSR_IA32_TSC] = tsc_value  # before TSC_DEADLINE, which is relative to it
    for k, v in msrs.items():
        if k not in (MSR_IA32_TSC, MSR_IA32_TSC_DEADLINE):
            ordered[k] = v
    if MSR_IA32_TSC_DEADLINE in msrs:
        ordered[MSR_IA32_TSC_DEADLINE] = msrs[MSR_IA32_TSC_DEADLINE]
    try:
        vcpu.set_msrs(ordered)
    except KvmError:
        # Write one by one so a single MSR this host refuses is named, not fatal for the rest.
        for k, v in ordered.items():
            try:
                vcpu.set_msrs({k: v})
            except KvmError as exc:
                log.warning("vcpu%d: MSR %#x not restored: %s", vcpu.index, k, exc)
    vcpu.set_debugregs(_unblob(state["debugregs"], abi.kvm_debugregs, "debugregs"))
    vcpu.set_mp_state(state["mp_state"])
    vcpu.set_vcpu_events(_unblob(state["events"], abi.kvm_vcpu_events, "events"))


# -- VM-wide ----------------------------------------------------------------------------
CHIPS = {"pic_master": abi.KVM_IRQCHIP_PIC_MASTER, "pic_slave": abi.KVM_IRQCHIP_PIC_SLAVE,
         "ioapic": abi.KVM_IRQCHIP_IOAPIC}


def save_irqchips(vm) -> dict:
    return {"irqchips": {name: _blob(vm.get_irqchip(cid)) for name, cid in CHIPS.items()},
            "pit2": _blob(vm.get_pit2())}


def check_irqchips(state: dict) -> None:
    chips = state.get("irqchips")
    if not isinstance(chips, dict) or set(chips) != set(CHIPS):
        raise SnapshotError("vm section: irqchips must hold pic_master, pic_slave and ioapic")
    for name, cid in CHIPS.items():
        chip = _unblob(chips[name], abi.kvm_irqchip, f"irqchip {name}")
        if chip.chip_id != cid:
            raise SnapshotError(f"irqchip {name}: chip_id {chip.chip_id}")
    _unblob(state.get("pit2"), abi.kvm_pit_state2, "pit2")


def restore_irqchips(vm, state: dict) -> None:
    for name in CHIPS:
        vm.set_irqchip(_unblob(state["irqchips"][name], abi.kvm_irqchip, name))
    vm.set_pit2(_unblob(state["pit2"], abi.kvm_pit_state2, "pit2"))
