"""Minimal ACPI tables (ACPI 6.5) for a hardware-reduced x86 PC: how a
Linux kernel built without CONFIG_X86_MPPARSE (Debian's cloud kernel) finds
its CPUs, its IOAPIC, poweroff and reset.

Sans-I/O ``build_acpi_tables`` returns one blob (RSDP first, every table
16-byte aligned after it) laid out for a given guest-physical base;
``write_acpi_tables`` puts it in guest RAM and returns the RSDP address,
which linux.py stores in boot_params.acpi_rsdp_addr (zero page 0x070). The
RSDP also sits 16-byte aligned inside 0xe0000-0xfffff, where Linux and other
OSes scan for "RSD PTR " when no boot loader passes its address.

Tables:
  RSDP  revision 2: XSDT address (no RSDT: RsdtAddress 0), both checksums
  XSDT  -> FACP, APIC
  FACP  (FADT) revision 6: HW_REDUCED_ACPI, so no PM1/PM timer/GPE blocks,
        no SCI, no FACS; RESET_REG = I/O port 0xcf9 (vmmd/chipset.py's
        ResetControl) with RESET_VALUE 0x06 and RESET_REG_SUP;
        SLEEP_CONTROL_REG = I/O port 0x3c0 and SLEEP_STATUS_REG = I/O port
        0x3c1, 8 bits each (vmmd/acpi_pm.py's AcpiSleepControl);
        IAPC_BOOT_ARCH = LEGACY_DEVICES | VGA_NOT_PRESENT. The 8042 flag is
        clear on purpose: vmmd's i8042 only answers controller commands (for
        reset), no keyboard is attached, and with the flag clear Linux skips
        the i8042 driver's probe entirely. The CMOS RTC is present (flag
        clear). X_DSDT (and the 32-bit DSDT) point to the DSDT.
  APIC  (MADT): local APIC at 0xfee00000, PCAT_COMPAT (the 8259 pair exists
        in KVM's irqchip); one enabled Processor Local APIC per vCPU (ACPI
        processor UID = APIC id = vCPU index, as vmmd/cpuid.py reports); one
        I/O APIC, id ncpus, at 0xfec00000, GSI base 0; one Local APIC NMI
        entry on LINT1 for all processors (UID 0xff). No Interrupt Source
        Override: KVM's default GSI routing wires GSI n to IOAPIC pin n for
        n < 24 (and to the 8259 for n < 16), so the PIT's GSI 0 reaches pin
        0 and ISA IRQ n == GSI n is the identity Linux assumes without an
        override. No SCI override either: Linux sets up no SCI on
        hardware-reduced platforms.
  DSDT  revision 2 (64-bit integers): Name(\\_S5, Package(){5, 0}) so Linux's
        ACPI poweroff writes SLP_TYP=5 | SLP_EN (0x34) to the sleep control
        register; and, unless pci=False, \\_SB.PCI0 (PNP0A03, bus 0, config
        through ports 0xcf8-0xcff) with a _CRS (bus 0-255, I/O
        0-0xcf7 and 0xd00-0xffff, 32-bit MMIO in the PCI hole) and a _PRT
        built from the same PCI INTx list the MP table gets: with ACPI,
        Linux finds PCI root buses only through the DSDT.
        With ``legacy`` (an LPC bridge is present): \\_SB.COM1/COM2
        (PNP0501, 0x3f8/IRQ 4, 0x2f8/IRQ 3) and \\_SB.RTC (PNP0B00,
        0x70/IRQ 8). A hardware-reduced platform has no legacy PIC, so Linux
        maps no ISA IRQ by itself ("preallocated irqs: 0") and the 8250
        driver's built-in COM1 at IRQ 4 cannot get its interrupt; described
        here, the PNP drivers (8250_pnp, rtc_cmos) map each IRQ as a GSI
        through the IOAPIC (identity, no override) and take the ports over.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from vmmd.boot import (ACPI_ADDR, ACPI_END, IOAPIC_ADDR, LAPIC_ADDR, BootError)
from vmmd.boot import aml
from vmmd.boot.mptable import MAX_CPUS, PciIrq, checksum
from vmmd.guest_memory import PCI_HOLE_START

OEM_ID = b"VMMD  "  # 6 bytes
OEM_REVISION = 1
CREATOR_ID = b"VMMD"
CREATOR_REVISION = 1

HEADER = struct.Struct("<4sIBB6s8sI4sI")  # 36 bytes, common to every SDT
HEADER_CHECKSUM_OFFSET = 9
RSDP = struct.Struct("<8sB6sBIIQB3s")  # 36 bytes
RSDP_V1_LENGTH = 20
RSDP_REVISION = 2
RSDP_SIGNATURE = b"RSD PTR "

XSDT_REVISION = 1
FADT_REVISION = 6
FADT_MINOR_REVISION = 5  # ACPI 6.5
FADT_LENGTH = 276
MADT_REVISION = 5
DSDT_REVISION = 2  # 2 and above: AML integers are 64 bits

# Generic Address Structure (ACPI 6.5 section 5.2.3.2)
GAS = struct.Struct("<BBBBQ")  # space id, bit width, bit offset, access size, address
GAS_SYSTEM_MEMORY = 0
GAS_SYSTEM_IO = 1
GAS_ACCESS_BYTE = 1

# FADT offsets (ACPI 6.5 table 5.9)
FADT_FIRMWARE_CTRL = 36
FADT_DSDT = 40
FADT_PREFERRED_PM_PROFILE = 45
FADT_SCI_INT = 46
FADT_SMI_CMD = 48
FADT_PM1A_EVT_BLK = 56
FADT_IAPC_BOOT_ARCH = 109
FADT_FLAGS = 112
FADT_RESET_REG = 116
FADT_RESET_VALUE = 128
FADT_ARM_BOOT_ARCH = 129
FADT_MINOR_VERSION = 131
FADT_X_FIRMWARE_CTRL = 132
FADT_X_DSDT = 140
FADT_X_PM1A_EVT_BLK = 148
FADT_SLEEP_CONTROL_REG = 244
FADT_SLEEP_STATUS_REG = 256
FADT_HYPERVISOR_VENDOR = 268

# FADT flags
FADT_PWR_BUTTON = 1 << 4   # set: no fixed-feature power button
FADT_SLP_BUTTON = 1 << 5   # set: no fixed-feature sleep button
FADT_RESET_REG_SUP = 1 << 10
FADT_HW_REDUCED_ACPI = 1 << 20
# IAPC_BOOT_ARCH flags
BOOT_ARCH_LEGACY_DEVICES = 1 << 0
BOOT_ARCH_8042 = 1 << 1
BOOT_ARCH_VGA_NOT_PRESENT = 1 << 2
BOOT_ARCH_MSI_NOT_SUPPORTED = 1 << 3
BOOT_ARCH_PCIE_ASPM_CONTROLS = 1 << 4
BOOT_ARCH_CMOS_RTC_NOT_PRESENT = 1 << 5
IAPC_BOOT_ARCH = BOOT_ARCH_LEGACY_DEVICES | BOOT_ARCH_VGA_NOT_PRESENT

RESET_PORT = 0xCF9     # vmmd.chipset.RESET_CONTROL_PORT
RESET_VALUE = 0x06     # SYS_RST | RST_CPU: a hard reset
SLEEP_CONTROL_PORT = 0x3C0
SLEEP_STATUS_PORT = 0x3C1
# sleep control register (ACPI 6.5 section 4.8.3.7): SLP_TYPx bits 4:2, SLP_EN bit 5
SLP_TYP_SHIFT = 2
SLP_TYP_MASK = 0x7 << SLP_TYP_SHIFT
SLP_EN = 1 << 5
# sleep status register (section 4.8.3.8): WAK_STS bit 7
WAK_STS = 1 << 7
S5_SLP_TYP = 5  # the value \_S5 gives; AcpiSleepControl powers off on it

# MADT (ACPI 6.5 section 5.2.12)
MADT_PCAT_COMPAT = 1 << 0
MADT_LOCAL_APIC = 0
MADT_IO_APIC = 1
MADT_INTERRUPT_OVERRIDE = 2
MADT_LOCAL_APIC_NMI = 4
LOCAL_APIC_ENTRY = struct.Struct("<BBBBI")  # type, length, processor UID, APIC id, flags
IO_APIC_ENTRY = struct.Struct("<BBBBII")    # type, length, id, reserved, address, GSI base
LOCAL_APIC_NMI_ENTRY = struct.Struct("<BBBHB")  # type, length, processor UID, flags, LINT#
LOCAL_APIC_ENABLED = 1 << 0
ALL_PROCESSORS = 0xFF
NMI_LINT = 1

PCI_MMIO_END = IOAPIC_ADDR  # the 32-bit window ends below the IOAPIC/LAPIC pages
ALIGN = 16


@dataclass
class AcpiTables:
    base: int                  # guest-physical address of blob[0]
    blob: bytes
    rsdp_addr: int
    tables: dict[str, int] = field(default_factory=dict)  # signature -> address


def sdt(signature: bytes, revision: int, body: bytes, oem_table_id: bytes | None = None) -> bytes:
    """A System Description Table: the 36-byte header (checksum filled in) + body."""
    if len(signature) != 4:
        raise ValueError("signature must be 4 bytes")
    table_id = oem_table_id if oem_table_id is not None else b"VMMD" + signature
    table = bytearray(HEADER.pack(signature, HEADER.size + len(body), revision, 0, OEM_ID,
                                  table_id.ljust(8, b" ")[:8], OEM_REVISION, CREATOR_ID,
                                  CREATOR_REVISION)) + body
    table[HEADER_CHECKSUM_OFFSET] = checksum(table)
    return bytes(table)


def generic_address(space: int, address: int, bit_width: int = 8,
                    access_size: int = GAS_ACCESS_BYTE) -> bytes:
    return GAS.pack(space, bit_width, 0, access_size, address)


def build_rsdp(xsdt_addr: int) -> bytes:
    rsdp = bytearray(RSDP.pack(RSDP_SIGNATURE, 0, OEM_ID, RSDP_REVISION, 0, RSDP.size,
                               xsdt_addr, 0, bytes(3)))
    rsdp[8] = checksum(rsdp[:RSDP_V1_LENGTH])
    rsdp[32] = checksum(rsdp)
    return bytes(rsdp)


def build_xsdt(table_addrs) -> bytes:
    return sdt(b"XSDT", XSDT_REVISION, b"".join(struct.pack("<Q", a) for a in table_addrs))


def build_fadt(dsdt_addr: int) -> bytes:
    body = bytearray(FADT_LENGTH - HEADER.size)

    def put(offset, fmt, *values):
        struct.pack_into(fmt, body, offset - HEADER.size, *values)

    def put_gas(offset, gas):
        body[offset - HEADER.size:offset - HEADER.size + GAS.size] = gas

    put(FADT_DSDT, "<I", dsdt_addr if dsdt_addr < 1 << 32 else 0)
    put(FADT_IAPC_BOOT_ARCH, "<H", IAPC_BOOT_ARCH)
    put(FADT_FLAGS, "<I", FADT_HW_REDUCED_ACPI | FADT_RESET_REG_SUP
        | FADT_PWR_BUTTON | FADT_SLP_BUTTON)
    put_gas(FADT_RESET_REG, generic_address(GAS_SYSTEM_IO, RESET_PORT))
    put(FADT_RESET_VALUE, "<B", RESET_VALUE)
    put(FADT_MINOR_VERSION, "<B", FADT_MINOR_REVISION)
    put(FADT_X_DSDT, "<Q", dsdt_addr)
    put_gas(FADT_SLEEP_CONTROL_REG, generic_address(GAS_SYSTEM_IO, SLEEP_CONTROL_PORT))
    put_gas(FADT_SLEEP_STATUS_REG, generic_address(GAS_SYSTEM_IO, SLEEP_STATUS_PORT))
    put(FADT_HYPERVISOR_VENDOR, "<8s", b"VMMD")
    return sdt(b"FACP", FADT_REVISION, bytes(body))


def build_madt(ncpus: int) -> bytes:
    if not 1 <= ncpus <= MAX_CPUS:
        raise BootError(f"the MADT supports 1..{MAX_CPUS} CPUs (xAPIC ids), not {ncpus}")
    entries = [struct.pack("<II", LAPIC_ADDR, MADT_PCAT_COMPAT)]
    for cpu in range(ncpus):
        entries.append(LOCAL_APIC_ENTRY.pack(MADT_LOCAL_APIC, LOCAL_APIC_ENTRY.size, cpu, cpu,
                                             LOCAL_APIC_ENABLED))
    entries.append(IO_APIC_ENTRY.pack(MADT_IO_APIC, IO_APIC_ENTRY.size, ncpus, 0, IOAPIC_ADDR, 0))
    entries.append(LOCAL_APIC_NMI_ENTRY.pack(MADT_LOCAL_APIC_NMI, LOCAL_APIC_NMI_ENTRY.size,
                                             ALL_PROCESSORS, 0, NMI_LINT))
    return sdt(b"APIC", MADT_REVISION, b"".join(entries))


def pci_host_bridge_aml(pci_irqs=(), mmio=(PCI_HOLE_START, PCI_MMIO_END)) -> bytes:
    """\\_SB.PCI0: a conventional PCI host bridge (bus 0) and its INTx routing."""
    prt = []
    for item in pci_irqs:
        p = item if isinstance(item, PciIrq) else PciIrq(*item)
        if p.bus != 0:
            raise BootError(f"PCI interrupt entry {p}: only bus 0 (no bridges) is described")
        if not (0 <= p.device < 32 and 0 <= p.pin < 4 and 0 <= p.ioapic_pin < 256):
            raise BootError(f"bad PCI interrupt entry {p}")
        # (device << 16 | 0xffff: any function, pin, source Zero = GSI, GSI)
        prt.append(aml.package((p.device << 16) | 0xFFFF, p.pin, 0, p.ioapic_pin))
    lo, hi = mmio
    if not (0 < lo < hi <= 1 << 32):
        raise BootError(f"bad PCI MMIO window {lo:#x}-{hi:#x}")
    crs = aml.resource_template(
        aml.word_bus_number(0x00, 0xFF),
        aml.io_port(0xCF8, 8),
        aml.word_io(0x0000, 0x0CF7),
        aml.word_io(0x0D00, 0xFFFF),
        aml.dword_memory(lo, hi - 1),
    )
    return aml.scope("\\_SB_", aml.device(
        "PCI0",
        aml.name("_HID", aml.eisa_id("PNP0A03")),
        aml.name("_SEG", 0),
        aml.name("_UID", 0),
        aml.name("_BBN", 0),
        aml.name("_CRS", crs),
        aml.name("_PRT", aml.package(*prt)),
    ))


# The LPC bridge's ISA devices: (name, _HID, _UID, I/O base, ports, ISA IRQ).
LEGACY_DEVICES = (
    ("COM1", "PNP0501", 1, 0x3F8, 8, 4),
    ("COM2", "PNP0501", 2, 0x2F8, 8, 3),
    ("RTC_", "PNP0B00", 0, 0x70, 2, 8),
)


def legacy_devices_aml() -> bytes:
    """\\_SB.COM1, COM2, RTC: where the ISA devices sit and which IRQ each raises."""
    return aml.scope("\\_SB_", *(
        aml.device(name,
                   aml.name("_HID", aml.eisa_id(hid)),
                   aml.name("_UID", uid),
                   aml.name("_CRS", aml.resource_template(aml.io_port(base, length),
                                                          aml.irq_no_flags(irq))))
        for name, hid, uid, base, length, irq in LEGACY_DEVICES))


def dsdt_aml(pci: bool = True, pci_irqs=(), legacy: bool = False, **pci_kwargs) -> bytes:
    """The DSDT's definition block (AML after the header)."""
    body = aml.name("_S5_", aml.package(S5_SLP_TYP, 0))
    if pci:
        body += pci_host_bridge_aml(pci_irqs, **pci_kwargs)
    if legacy:
        body += legacy_devices_aml()
    return body


def build_dsdt(pci: bool = True, pci_irqs=(), legacy: bool = False, **pci_kwargs) -> bytes:
    return sdt(b"DSDT", DSDT_REVISION, dsdt_aml(pci, pci_irqs, legacy, **pci_kwargs))


def _align(n: int) -> int:
    return (n + ALIGN - 1) & ~(ALIGN - 1)


def build_acpi_tables(base: int, ncpus: int, *, pci: bool = True, pci_irqs=(),
                      legacy: bool = False, **pci_kwargs) -> AcpiTables:
    """Every table laid out from ``base`` (16-byte aligned): RSDP, XSDT,
    FADT, MADT, DSDT, each at a 16-byte boundary."""
    if base % ALIGN:
        raise BootError(f"ACPI base {base:#x} is not 16-byte aligned")
    dsdt = build_dsdt(pci, pci_irqs, legacy, **pci_kwargs)
    madt = build_madt(ncpus)
    xsdt_addr = _align(base + RSDP.size)
    xsdt_len = HEADER.size + 2 * 8
    fadt_addr = _align(xsdt_addr + xsdt_len)
    madt_addr = _align(fadt_addr + FADT_LENGTH)
    dsdt_addr = _align(madt_addr + len(madt))
    end = dsdt_addr + len(dsdt)
    parts = [(base, build_rsdp(xsdt_addr)), (xsdt_addr, build_xsdt([fadt_addr, madt_addr])),
             (fadt_addr, build_fadt(dsdt_addr)), (madt_addr, madt), (dsdt_addr, dsdt)]
    blob = bytearray(end - base)
    for addr, data in parts:
        blob[addr - base:addr - base + len(data)] = data
    return AcpiTables(base=base, blob=bytes(blob), rsdp_addr=base,
                      tables={"XSDT": xsdt_addr, "FACP": fadt_addr, "APIC": madt_addr,
                              "DSDT": dsdt_addr})


def write_acpi_tables(mem, ncpus: int, addr: int = ACPI_ADDR, *, limit: int = ACPI_END,
                      **kwargs) -> int:
    """Build the tables at ``addr`` and write them to guest RAM; returns the
    RSDP address. They must end at or below ``limit`` (the MP table's start)."""
    tables = build_acpi_tables(addr, ncpus, **kwargs)
    end = addr + len(tables.blob)
    if end > limit:
        raise BootError(f"ACPI tables {addr:#x}-{end:#x} overrun {limit:#x}")
    if not mem.layout.contains(addr, len(tables.blob)):
        raise BootError(f"ACPI tables at {addr:#x}+{len(tables.blob):#x} are not inside guest RAM")
    mem.write(addr, tables.blob)
    return tables.rsdp_addr
