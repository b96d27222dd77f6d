"""Emulation assists: instructions some KVM hosts' emulators refuse.

On PVM hosts (kvm_pvm: no VMX/SVM, guest CPL0 runs in KVM's instruction
emulator) KVM_RUN returns KVM_EXIT_INTERNAL_ERROR / EMULATION for a few
instructions a stock Linux kernel executes. Each assist here completes one
such instruction the way the CPU would have. On hardware KVM these exits do
not happen, so the assists are inert there; `--pvm-assists off` disables them.

Assists (each with a micro-guest test in tests/integration/test_assists.py):
- int3 (0xCC): a trap to vector 3 with RIP after the instruction. Linux uses
  int3 for its self-test and for live text patching (static keys, ftrace).
- fwait (0x9B): only raises pending unmasked x87 exceptions; the kernel runs
  with none pending, so completing it is skipping it.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from vmmd.kvm import abi

log = logging.getLogger(__name__)

_FLAG_INSTRUCTION_BYTES = 1  # KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES


def instruction_bytes(internal) -> bytes:
    """The failing instruction's bytes from kvm_run.internal, if KVM gave them.

    Layout (struct emulation_failure): u32 suberror, u32 ndata, u64 flags,
    u8 insn_size, u8 insn_bytes[15] -- i.e. data[0] = flags, then the bytes.
    """
    if internal.ndata < 2:
        return b""
    raw = b"".join(int(internal.data[i]).to_bytes(8, "little") for i in range(min(internal.ndata, 4)))
    flags = int.from_bytes(raw[0:8], "little")
    if not flags & _FLAG_INSTRUCTION_BYTES:
        return b""
    size = min(raw[8], 15)
    return raw[9:9 + size]


def host_is_pvm() -> bool:
    """True on a PVM host: kvm_pvm loaded, or /dev/kvm without VMX/SVM."""
    if Path("/sys/module/kvm_pvm").exists():
        return True
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return os.path.exists("/dev/kvm") and " vmx" not in flags and " svm" not in flags


class AssistSet:
    """The assists enabled for one VM, and how often each fired."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.counts: dict[str, int] = {}

    def handle_emulation_failure(self, vcpu, internal) -> str | None:
        """Complete the failed instruction; return the assist's name, or None."""
        if not self.enabled:
            return None
        insn = instruction_bytes(internal)
        if not insn:
            return None
        if insn[0] == 0xCC:
            name = "int3"
            self._advance_rip(vcpu, 1)
            self._inject_exception(vcpu, 3)
        elif insn[0] == 0x9B:
            name = "fwait"
            self._advance_rip(vcpu, 1)
        else:
            return None
        self.counts[name] = self.counts.get(name, 0) + 1
        return name

    @staticmethod
    def _advance_rip(vcpu, n: int) -> None:
        regs = vcpu.get_regs()
        regs.rip += n
        vcpu.set_regs(regs)

    @staticmethod
    def _inject_exception(vcpu, vector: int) -> None:
        events = vcpu.get_vcpu_events()
        events.exception.injected = 1
        events.exception.nr = vector
        events.exception.has_error_code = 0
        events.exception.error_code = 0
        # Only the exception part changes; leave NMI/SIPI/SMM state alone.
        events.flags = 0
        vcpu.set_vcpu_events(events)
