"""Guest time across a snapshot or migration (Documentation/virt/kvm/devices/vcpu.rst,
"KVM_VCPU_TSC_CTRL": the TSC offset migration procedure).

Save (vCPUs stopped): KVM_GET_CLOCK (kvmclock ns; host CLOCK_REALTIME and
host TSC when KVM reports them), every vCPU's KVM_VCPU_TSC_OFFSET, the TSC
frequency, and our own CLOCK_REALTIME next to it.

Restore: KVM_SET_CLOCK with the saved kvmclock -- with KVM_CLOCK_REALTIME
when both hosts report it (KVM advances the clock by the elapsed real
time), else advanced by our own CLOCK_REALTIME difference (``advance``) or
not at all (``freeze``) -- then KVM_GET_CLOCK again and

    ofs_dst = ofs_src - (guest_src - guest_dest) * freq + (tsc_src - tsc_dest)

written to every vCPU (the same delta for all, so TSCs stay synchronised).
Where KVM does not report the host TSC, it is derived as IA32_TSC - offset
of a vCPU (both read back to back). Without the offset attribute, IA32_TSC
itself is written (the same value on every vCPU, so KVM synchronises them;
see write_guest_tsc for the one trap in that).

The attribute is used only where the host's TSC is stable (the host kernel
still lists it as a clocksource). On a host whose TSC is
unstable KVM recomputes every vCPU's offset from its last guest TSC at each
vCPU load, silently replacing an offset written through the attribute; a
host-initiated IA32_TSC write also updates that last guest TSC, so it holds.
(The nested lab's L1, under TCG, is such a host: the attribute path lost
the restored TSC there.)
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from vmmd.kvm import abi
from vmmd.kvm.api import KvmError
from vmmd.snapshot.format import SnapshotError

log = logging.getLogger(__name__)

CLOCK_MODES = ("advance", "freeze")
MSR_IA32_TSC = 0x10


def has_tsc_offset_attr(vcpu) -> bool:
    try:
        return vcpu.has_attr(abi.KVM_VCPU_TSC_CTRL, abi.KVM_VCPU_TSC_OFFSET)
    except KvmError:
        return False


CLOCKSOURCES = "/sys/devices/system/clocksource/clocksource0/available_clocksource"


def host_tsc_stable(path: str = CLOCKSOURCES) -> bool:
    """The host kernel still offers its TSC as a clocksource, i.e. it has not
    marked it unstable (KVM's check_tsc_unstable(), under which KVM rewrites
    TSC offsets at every vCPU load). KVM_CLOCK_TSC_STABLE cannot tell this
    before the vCPUs first run."""
    try:
        with open(path) as f:
            return "tsc" in f.read().split()
    except OSError:
        return True   # no sysfs to ask: the common case


def offset_attr_usable(vcpus) -> bool:
    return host_tsc_stable() and all(has_tsc_offset_attr(v) for v in vcpus)


def restores_by_offset_attr(vm, vcpus, state: dict) -> bool:
    """Whether restore_clock will move the TSCs by the offset attribute (else by IA32_TSC)."""
    return state.get("tsc_offsets") is not None and state.get("host_tsc") is not None \
        and offset_attr_usable(vcpus)


def save_clock(vm, vcpus) -> dict:
    """The time section of the vm state (call with every vCPU stopped)."""
    use_attr = offset_attr_usable(vcpus)
    offsets = [v.get_attr_u64(abi.KVM_VCPU_TSC_CTRL, abi.KVM_VCPU_TSC_OFFSET) for v in vcpus] if use_attr else None
    tsc = vcpus[0].get_msrs([MSR_IA32_TSC])[MSR_IA32_TSC]
    clock = vm.get_clock()
    realtime = time.time_ns()
    try:
        khz = vcpus[0].get_tsc_khz()
    except KvmError:
        khz = 0
    host_tsc = clock.host_tsc if clock.flags & abi.KVM_CLOCK_HOST_TSC else (
        (tsc - offsets[0]) & ((1 << 64) - 1) if offsets else None)
    return {
        "kvmclock_ns": int(clock.clock),
        "kvm_flags": int(clock.flags),
        "kvm_realtime_ns": int(clock.realtime) if clock.flags & abi.KVM_CLOCK_REALTIME else None,
        "realtime_ns": realtime,
        "host_tsc": host_tsc,
        "guest_tsc": int(tsc),
        "tsc_khz": int(khz),
        "tsc_offsets": offsets,
    }


def check_clock(state: dict, ncpus: int) -> None:
    for key in ("kvmclock_ns", "kvm_flags", "realtime_ns", "guest_tsc", "tsc_khz"):
        if type(state.get(key)) is not int or state[key] < 0:
            raise SnapshotError(f"vm section: clock {key} missing or not a non-negative integer")
    offs = state.get("tsc_offsets")
    if offs is not None and (not isinstance(offs, list) or len(offs) != ncpus
                             or not all(type(o) is int and 0 <= o < 1 << 64 for o in offs)):
        raise SnapshotError("vm section: tsc_offsets must list one u64 per vCPU")


@dataclass
class TimePlan:
    """What restore_clock decided (reported in the log and tests)."""
    mode: str
    elapsed_ns: int
    method: str        # "tsc-offset-attr" or "ia32-tsc"
    clock: str         # "kvm-realtime" or "vmmd-realtime" or "frozen"
    tsc_controlled: bool = True  # False: KVM ignored the write (PVM: the guest TSC is the host's)


def elapsed_ns(state: dict, mode: str, now_ns: int | None = None) -> int:
    if mode == "freeze":
        return 0
    now = time.time_ns() if now_ns is None else now_ns
    return max(0, now - state["realtime_ns"])


def guest_tsc_after(state: dict, elapsed: int) -> int:
    """IA32_TSC to write without the offset attribute."""
    return (state["guest_tsc"] + elapsed * state["tsc_khz"] // 1_000_000) & ((1 << 64) - 1)


def offset_delta(state: dict, guest_dest_ns: int, host_tsc_dest: int) -> int:
    """ofs_dst - ofs_src from the documented formula (mod 2^64)."""
    freq_khz = state["tsc_khz"]
    elapsed_cycles = (guest_dest_ns - state["kvmclock_ns"]) * freq_khz // 1_000_000
    return (elapsed_cycles + (state["host_tsc"] - host_tsc_dest)) & ((1 << 64) - 1)


# Far from any TSC a guest could have: a write this far off never looks like a sync.
UNSYNC_STEP = 1 << 62


def write_guest_tsc(vcpus, value: int) -> None:
    """Set IA32_TSC on every vCPU to ``value``, exactly.

    KVM before 6.7 ("Here lies UAPI baggage", kvm_synchronize_tsc) takes a
    host write within one second of the TSC it expects from the last write,
    here the vCPU creations' write of 0, as a sync: it keeps the old offset
    (or, on an unstable host TSC, adds the time since). A guest saved less
    than a second after its own creation therefore came back with the TSC of
    the new VM's age, not its own: read back up to ~27M cycles low in the lab.
    One far write first starts a new sync generation; the real value then
    lands exactly on vCPU 0, and the other vCPUs, written with the same value
    just after, are matched to it, which is what the heuristic is for."""
    start_tsc_generation(vcpus[0], value)
    for v in vcpus:
        v.set_msrs({MSR_IA32_TSC: value & ((1 << 64) - 1)})


def start_tsc_generation(vcpu, value: int) -> None:
    """Make the next IA32_TSC write of ``value`` exact (see write_guest_tsc)."""
    vcpu.set_msrs({MSR_IA32_TSC: (value + UNSYNC_STEP) & ((1 << 64) - 1)})


def restore_clock(vm, vcpus, state: dict, mode: str) -> TimePlan:
    """Set kvmclock and the vCPUs' TSCs (vCPU registers already restored)."""
    if mode not in CLOCK_MODES:
        raise ValueError(f"clock mode {mode!r}")
    elapsed = elapsed_ns(state, mode)
    data = abi.kvm_clock_data(clock=state["kvmclock_ns"])
    how = "frozen"
    if mode == "advance":
        probe = vm.get_clock()
        if state.get("kvm_realtime_ns") is not None and probe.flags & abi.KVM_CLOCK_REALTIME:
            data.flags = abi.KVM_CLOCK_REALTIME
            data.realtime = state["kvm_realtime_ns"]
            how = "kvm-realtime"
        else:
            data.clock = state["kvmclock_ns"] + elapsed
            how = "vmmd-realtime"
    vm.set_clock(data)
    guest_dest = vm.get_clock().clock
    use_attr = restores_by_offset_attr(vm, vcpus, state)
    if use_attr:
        cur = vcpus[0].get_attr_u64(abi.KVM_VCPU_TSC_CTRL, abi.KVM_VCPU_TSC_OFFSET)
        tsc_now = vcpus[0].get_msrs([MSR_IA32_TSC])[MSR_IA32_TSC]
        host_tsc_dest = (tsc_now - cur) & ((1 << 64) - 1)
        delta = offset_delta(state, guest_dest, host_tsc_dest)
        for v, ofs in zip(vcpus, state["tsc_offsets"]):
            v.set_attr_u64(abi.KVM_VCPU_TSC_CTRL, abi.KVM_VCPU_TSC_OFFSET, (ofs + delta) & ((1 << 64) - 1))
        method = "tsc-offset-attr"
    else:
        write_guest_tsc(vcpus, guest_tsc_after(state, elapsed))
        method = "ia32-tsc"
    plan = TimePlan(mode, elapsed, method, how, tsc_applied(vcpus[0], state, guest_dest))
    log.info("guest time: %s, %.3f s elapsed, TSC by %s, kvmclock by %s", mode, elapsed / 1e9, method, how)
    if not plan.tsc_controlled:
        log.warning("this host's KVM ignores guest TSC writes (PVM runs guest rdtsc natively): "
                    "the guest TSC follows the host's; kvmclock is %s", how)
    return plan


def tsc_applied(vcpu, state: dict, guest_dest_ns: int) -> bool:
    """Whether the guest TSC now is what was asked (saved TSC plus the time kvmclock
    moved on), within 50 ms: some KVMs (PVM) accept the write and ignore it."""
    want = state["guest_tsc"] + (guest_dest_ns - state["kvmclock_ns"]) * state["tsc_khz"] // 1_000_000
    now = vcpu.get_msrs([MSR_IA32_TSC])[MSR_IA32_TSC]
    return abs(now - want) < 50 * state["tsc_khz"]


def kvmclock_ctrl_all(vcpus) -> None:
    """Tell the guest it was stopped by the host, not hung (EINVAL before it enables kvmclock)."""
    for v in vcpus:
        try:
            v.kvmclock_ctrl()
        except OSError:
            pass
