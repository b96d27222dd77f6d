"""The CPUID a vCPU sees: KVM's supported set, made per-vCPU.

KVM_GET_SUPPORTED_CPUID already holds the KVM paravirtual leaves
(0x40000000 signature, 0x40000001 features incl. kvm-clock); what vmmd adds
is the vCPU's identity (APIC IDs in leaves 1 and 0xB), the topology count,
and the hypervisor bit.
"""

from __future__ import annotations

LEAF_FEATURES = 0x1
LEAF_EXT_TOPOLOGY = 0xB
LEAF_KVM_SIGNATURE = 0x40000000
ECX_HYPERVISOR = 1 << 31
EBX_HTT = 1 << 28  # EDX bit: several logical processors


def vcpu_cpuid(supported, index: int, ncpus: int):
    """Return a per-vCPU copy of the supported CPUID entries (ctypes kvm_cpuid_entry2)."""
    entries = [type(e).from_buffer_copy(e) for e in supported]
    for e in entries:
        if e.function == LEAF_FEATURES:
            # EBX[31:24] initial APIC ID, EBX[23:16] logical processors per package.
            e.ebx = (e.ebx & 0x0000FFFF) | (index << 24) | (min(ncpus, 255) << 16)
            e.ecx |= ECX_HYPERVISOR
            if ncpus > 1:
                e.edx |= EBX_HTT
        elif e.function == LEAF_EXT_TOPOLOGY:
            e.edx = index  # x2APIC ID
            if e.index == 0:
                e.ebx = 1  # one thread per core
            elif e.index == 1:
                e.ebx = ncpus
    return entries
