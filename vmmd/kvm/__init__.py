"""KVM bindings: `abi` (kernel structures and numbers) and thin ioctl wrappers."""

from vmmd.kvm.api import IrqchipRoute, Kvm, KvmError, MsiRoute, Vcpu, Vm

__all__ = ["Kvm", "Vm", "Vcpu", "KvmError", "IrqchipRoute", "MsiRoute"]
