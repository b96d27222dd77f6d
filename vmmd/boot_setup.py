"""Turning a VmConfig into a bootable VM: platform devices, guest image, vCPU state.

vmmd/boot/ produces plain data (memory contents, a CpuState); this module
applies it to KVM objects.
"""

from __future__ import annotations

import ctypes
import logging
from pathlib import Path

from vmmd import cpuid
from vmmd.boot import linux, raw
from vmmd.kvm import abi

log = logging.getLogger(__name__)

TSS_ADDR = 0xFFFBD000          # 3 pages KVM needs below 4 GiB, outside RAM
IDENTITY_MAP_ADDR = 0xFFFBC000
MSR_IA32_MISC_ENABLE = 0x1A0
MISC_ENABLE_FAST_STRING = 1
APIC_LVT_LINT0 = 0x350
APIC_LVT_LINT1 = 0x360
APIC_MODE_EXTINT = 0x7
APIC_MODE_NMI = 0x4

# Kernel options for hosts whose KVM emulates guest CPL0 code (PVM): features
# the emulator refuses (see ../shared/notes/platform-kvm.md), watchdogs that
# misfire because emulated kernel code is slow, and boot work that costs
# minutes at ~0.7 M emulated instructions/s. Each is justified, with the
# evidence, in docs/pvm-boot.md. None are added on hardware KVM.
PVM_KERNEL_OPTIONS = (
    "nokaslr noxsave "
    "clearcpuid=cx16,smap,fsgsbase,rdpid,rdrand,rdseed,invpcid,pcid,avx,avx2,avx512f,popcnt,"
    "sse4_2,sse4_1,ssse3,aes,pclmulqdq,bmi1,bmi2,abm,movbe,clflushopt,clwb,sha_ni,adx,fma,f16c,"
    "erms,fsrm "
    "tsc=reliable no_timer_check nosoftlockup nowatchdog "
    # Two subsys initcalls queue minutes of emulated work on an unbound
    # workqueue; with voluntary preemption the kworker never yields to init.
    "initcall_blacklist=ftrace_check_for_weak_functions,trace_eval_init "
    # No retpolines, return thunks (SRSO "safe RET") or RSB stuffing in
    # emulated code; no zeroing of every heap allocation.
    "mitigations=off init_on_alloc=0"
)


def create_platform(vm) -> None:
    """In-kernel interrupt controllers and PIT, as on a PC."""
    vm.set_tss_addr(TSS_ADDR)
    vm.set_identity_map_addr(IDENTITY_MAP_ADDR)
    vm.create_irqchip()
    vm.create_pit2(abi.KVM_PIT_SPEAKER_DUMMY)


def kernel_cmdline(user_cmdline: str, pvm: bool) -> str:
    return f"{user_cmdline} {PVM_KERNEL_OPTIONS}".strip() if pvm else user_cmdline


def load_guest(cfg, memory, vcpus, kvm, pvm: bool, pci_irqs=(), legacy: bool = False) -> None:
    """Write the guest image into memory and give every vCPU its start state.

    ``pci_irqs``: vmmd.boot.mptable.PciIrq entries for the MP table and _PRT;
    ``legacy``: an LPC bridge serves the COM ports and the RTC (ACPI describes them)."""
    if cfg.raw:
        state = raw.load_raw(memory, Path(cfg.raw).read_bytes(), cfg.raw_mode)
    else:
        kernel = Path(cfg.kernel).read_bytes()
        initrd = Path(cfg.initrd).read_bytes() if cfg.initrd else None
        info = linux.load_linux(memory, kernel, initrd, kernel_cmdline(cfg.cmdline, pvm), len(vcpus),
                                pci_irqs=pci_irqs, legacy=legacy)
        state = info.cpu_state
    supported = kvm.supported_cpuid()
    for v in vcpus:
        v.set_cpuid2(cpuid.vcpu_cpuid(supported, v.index, len(vcpus)))
        _init_lapic(v)
        _init_fpu(v)
        v.set_msrs({MSR_IA32_MISC_ENABLE: MISC_ENABLE_FAST_STRING})
    apply_cpu_state(vcpus[0], state)  # the BSP; APs wait for INIT/SIPI


def apply_cpu_state(vcpu, state) -> None:
    sregs = vcpu.get_sregs()
    for name, seg in state.segments.items():
        target = getattr(sregs, name)
        for field in ("base", "limit", "selector", "type", "present", "dpl", "db", "s", "l", "g"):
            setattr(target, field, getattr(seg, field))
        target.unusable = 0 if getattr(seg, "present", 1) or name in ("tr", "ldt") else 1
    sregs.gdt.base, sregs.gdt.limit = state.gdt
    sregs.idt.base, sregs.idt.limit = state.idt
    sregs.cr0, sregs.cr3, sregs.cr4, sregs.efer = state.cr0, state.cr3, state.cr4, state.efer
    vcpu.set_sregs(sregs)
    regs = vcpu.get_regs()
    for name, value in state.regs.items():
        setattr(regs, name, value)
    vcpu.set_regs(regs)


def _init_fpu(vcpu) -> None:
    fpu = vcpu.get_fpu()
    fpu.fcw = 0x37F
    fpu.mxcsr = 0x1F80
    vcpu.set_fpu(fpu)


def _init_lapic(vcpu) -> None:
    """LINT0 as ExtINT (the PIC), LINT1 as NMI, as firmware leaves them."""
    lapic = vcpu.get_lapic()
    view = memoryview(lapic.regs).cast("B")
    for off, mode in ((APIC_LVT_LINT0, APIC_MODE_EXTINT), (APIC_LVT_LINT1, APIC_MODE_NMI)):
        cur = int.from_bytes(view[off:off + 4], "little")
        new = (cur & ~0x700) | (mode << 8)
        view[off:off + 4] = new.to_bytes(4, "little")
    vcpu.set_lapic(lapic)
