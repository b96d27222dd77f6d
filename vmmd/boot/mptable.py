"""Intel MultiProcessor Specification 1.4 tables: how a guest without ACPI
finds its CPUs, its IOAPIC and how ISA (and later PCI) interrupts reach it.

Sans-I/O ``build_mptable`` returns the bytes of the floating pointer structure
immediately followed by the configuration table; ``write_mptable`` puts them
in guest RAM. Linux scans 0xf0000-0xfffff (and the EBDA) for "_MP_".

Kernels built without CONFIG_X86_MPPARSE ignore these tables: Debian's
cloud kernel is one (checked: no "MPTABLE" lines, "Boot CPU (id 0) not listed
by BIOS"); such kernels see more than one CPU and the IOAPIC only through
ACPI (MADT), else they run on one CPU with the 8259 PIC.

Bus ids: PCI bus 0 is MP bus 0 (Linux matches PCI interrupt entries by
comparing the MP bus id with the PCI bus number), ISA is MP bus 1.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from vmmd.boot import IOAPIC_ADDR, LAPIC_ADDR, BootError

SPEC_REV = 4  # MP spec 1.4
LAPIC_VERSION = 0x14  # KVM's local APIC
IOAPIC_VERSION = 0x11  # KVM's IOAPIC
PCI_BUS_ID = 0
ISA_BUS_ID = 1
ISA_IRQS = 16

# entry types
MP_PROCESSOR = 0
MP_BUS = 1
MP_IOAPIC = 2
MP_IOINTR = 3
MP_LINTR = 4
# interrupt types
MP_INT = 0
MP_NMI = 1
MP_SMI = 2
MP_EXTINT = 3
# processor flags
CPU_ENABLED = 0x01
CPU_BSP = 0x02
# IOAPIC flags
IOAPIC_ENABLED = 0x01
# interrupt flags: polarity bits 0-1, trigger mode bits 2-3 (0 = bus default)
IRQ_ACTIVE_LOW = 0x3
IRQ_LEVEL = 0x3 << 2

FLOATING = struct.Struct("<4sIBBBB4s")  # 16 bytes
CONFIG_HEADER = struct.Struct("<4sHBB8s12sIHHIHBB")  # 44 bytes
PROCESSOR = struct.Struct("<BBBBII8s")  # 20 bytes
BUS = struct.Struct("<BB6s")  # 8 bytes
IOAPIC = struct.Struct("<BBBBI")  # 8 bytes
INTR = struct.Struct("<BBHBBBB")  # 8 bytes, I/O and local interrupt entries

# CPUID.1 signature (family 6) and feature flags (FPU, APIC) put in the
# processor entries; Linux takes the real values from CPUID.
DEFAULT_CPU_SIGNATURE = 0x600
DEFAULT_CPU_FEATURES = (1 << 0) | (1 << 9)
MAX_CPUS = 254  # APIC ids are u8 and the IOAPIC takes id ncpus


@dataclass(frozen=True)
class PciIrq:
    """PCI INTx routing: device's pin (0 = INTA .. 3 = INTD) -> IOAPIC pin."""
    bus: int
    device: int
    pin: int
    ioapic_pin: int


def checksum(data: bytes) -> int:
    """The byte that makes the sum of ``data`` plus itself 0 mod 256."""
    return (-sum(data)) & 0xFF


def _with_checksum(blob: bytearray, at: int) -> bytearray:
    blob[at] = 0
    blob[at] = checksum(blob)
    return blob


def build_mptable(addr: int, ncpus: int, pci_irqs=(), *, irq0_pin: int = 2,
                  cpu_signature: int = DEFAULT_CPU_SIGNATURE,
                  cpu_features: int = DEFAULT_CPU_FEATURES) -> bytes:
    """Floating pointer at ``addr``, configuration table right after it.

    ``irq0_pin``: the IOAPIC pin ISA IRQ 0 (PIT) is wired to; 2 as on PCs
    (the VMM's GSI routing must agree), ISA IRQ 2 is then omitted as it is the
    cascade. ``pci_irqs``: PciIrq (or (bus, device, pin, ioapic_pin)) tuples.
    """
    if not 1 <= ncpus <= MAX_CPUS:
        raise BootError(f"MP table supports 1..{MAX_CPUS} CPUs, not {ncpus}")
    ioapic_id = ncpus
    entries = []
    for cpu in range(ncpus):
        flags = CPU_ENABLED | (CPU_BSP if cpu == 0 else 0)
        entries.append(PROCESSOR.pack(MP_PROCESSOR, cpu, LAPIC_VERSION, flags,
                                      cpu_signature, cpu_features, bytes(8)))
    entries.append(BUS.pack(MP_BUS, PCI_BUS_ID, b"PCI   "))
    entries.append(BUS.pack(MP_BUS, ISA_BUS_ID, b"ISA   "))
    entries.append(IOAPIC.pack(MP_IOAPIC, ioapic_id, IOAPIC_VERSION, IOAPIC_ENABLED, IOAPIC_ADDR))
    for irq in range(ISA_IRQS):
        if irq0_pin == 2 and irq == 2:
            continue  # pin 2 carries IRQ 0
        pin = irq0_pin if irq == 0 else irq
        entries.append(INTR.pack(MP_IOINTR, MP_INT, 0, ISA_BUS_ID, irq, ioapic_id, pin))
    for item in pci_irqs:
        p = item if isinstance(item, PciIrq) else PciIrq(*item)
        if not (0 <= p.bus < 256 and 0 <= p.device < 32 and 0 <= p.pin < 4
                and 0 <= p.ioapic_pin < 256):
            raise BootError(f"bad PCI interrupt entry {p}")
        entries.append(INTR.pack(MP_IOINTR, MP_INT, IRQ_ACTIVE_LOW | IRQ_LEVEL, p.bus,
                                 (p.device << 2) | p.pin, ioapic_id, p.ioapic_pin))
    # Local interrupts of every CPU (destination 0xff): the 8259 on LINT0, NMI on LINT1
    entries.append(INTR.pack(MP_LINTR, MP_EXTINT, 0, ISA_BUS_ID, 0, 0xFF, 0))
    entries.append(INTR.pack(MP_LINTR, MP_NMI, 0, ISA_BUS_ID, 0, 0xFF, 1))

    body = b"".join(entries)
    table_addr = addr + FLOATING.size
    length = CONFIG_HEADER.size + len(body)
    if length > 0xFFFF:
        raise BootError("MP configuration table too large")
    config = bytearray(CONFIG_HEADER.pack(
        b"PCMP", length, SPEC_REV, 0, b"VMMD    ", b"vmmd        ",
        0, 0,  # no OEM table
        len(entries), LAPIC_ADDR, 0, 0, 0)) + body
    _with_checksum(config, 7)
    floating = bytearray(FLOATING.pack(
        b"_MP_", table_addr, 1, SPEC_REV, 0,
        0,  # feature byte 1: 0 = a configuration table is present
        bytes(4)))  # feature byte 2 bit 7 (IMCR) clear: virtual wire mode
    _with_checksum(floating, 10)
    return bytes(floating + config)


def write_mptable(mem, addr: int, ncpus: int, pci_irqs=(), **kwargs) -> int:
    """Write the MP tables at ``addr``; returns their size in bytes."""
    blob = build_mptable(addr, ncpus, pci_irqs, **kwargs)
    if not mem.layout.contains(addr, len(blob)):
        raise BootError(f"MP table at {addr:#x}+{len(blob):#x} is not inside guest RAM")
    mem.write(addr, blob)
    return len(blob)
