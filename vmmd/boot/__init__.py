"""Getting a guest ready to run: kernel loading, firmware tables, initial CPU state.

Everything here writes guest RAM through GuestMemory (bounds-checked) and
returns plain Python data (``x86_state.CpuState``) that vmmd/vcpu.py converts
to KVM structs; nothing here talks to KVM.

Modules:
  elf.py       ELF32/ELF64 x86 parser and PT_LOAD loader
  bzimage.py   bzImage setup header parser, vmlinux extraction from the payload
  e820.py      the e820 memory map for a MemoryLayout
  mptable.py   Intel MultiProcessor Specification 1.4 tables
  acpi.py      ACPI tables (RSDP, XSDT, FADT, MADT, DSDT), hardware-reduced
  aml.py       a tiny AML encoder for the DSDT
  x86_state.py GDT, TSS, identity page tables, initial register state
  linux.py     Linux 64-bit boot protocol (vmlinux or bzImage, initrd, cmdline)
  raw.py       test guests: an ELF entered in real, protected or long mode

Guest-physical layout used at boot (all below 1 MiB is e820 RAM except the
EBDA and the BIOS area, see e820.py):

  0x00000-0x003ff  real-mode IVT (left zero)
  0x00400-0x004ff  BIOS data area (linux.py sets the EBDA segment and base
                   memory size words that Linux reads)
  0x00500-0x0053f  GDT (8 descriptors, see x86_state.py)
  0x00560          IDT (empty: limit 0; test guests must not fault)
  0x00580-0x025e8  64-bit TSS (104 bytes) + I/O bitmap allowing all ports
  0x07000-0x07fff  boot_params ("zero page")
  0x09000          PML4
  0x0a000          PDPT (one: the map covers at most 512 GiB)
  0x0b000-0x1ffff  page directories, one per GiB mapped (at most 21 GiB with
                   2 MiB pages; Linux only needs its image, boot_params,
                   cmdline and initrd mapped, all below 4 GiB)
  0x20000-0x2ffff  kernel command line (at most 64 KiB including the NUL)
  0x80000          raw test guests: initial RSP (stack grows down below it)
  0x9fc00-0x9ffff  EBDA (reserved in e820)
  0xe0000-0xeffff  ACPI tables (acpi.py): RSDP at 0xe0000 (16-byte aligned,
                   found by boot_params.acpi_rsdp_addr or by scanning
                   0xe0000-0xfffff), then XSDT, FADT, MADT, DSDT; a few KiB
                   at most. Not RAM in e820 (the VGA/option-ROM hole).
  0xf0000-0xfffff  BIOS area (reserved in e820): MP floating pointer and
                   configuration table at 0xf0000
  0x100000         bzImage protected-mode kernel (or pref_address)
  0x1000000        vmlinux PT_LOAD segments (their physical addresses)
  top of low RAM   initrd, page aligned, below initrd_addr_max
"""

from __future__ import annotations


class BootError(Exception):
    """A kernel/ELF image is malformed or does not fit guest RAM."""


KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30

GDT_ADDR = 0x500
IDT_ADDR = 0x560
TSS_ADDR = 0x580
BDA_EBDA_SEGMENT = 0x40E  # u16: EBDA segment (address >> 4)
BDA_BASE_MEM_KIB = 0x413  # u16: conventional memory below the EBDA, in KiB
BOOT_PARAMS_ADDR = 0x7000
PML4_ADDR = 0x9000
PAGE_TABLES_END = 0x20000  # page tables live in [PML4_ADDR, PAGE_TABLES_END)
CMDLINE_ADDR = 0x20000
CMDLINE_MAX = 64 * KiB  # including the terminating NUL
RAW_STACK_TOP = 0x80000
EBDA_START = 0x9FC00
EBDA_END = 0xA0000
BIOS_START = 0xF0000
BIOS_END = 0x100000
MPTABLE_ADDR = BIOS_START
ACPI_ADDR = 0xE0000  # RSDP, then the other ACPI tables
ACPI_END = MPTABLE_ADDR  # the ACPI tables must end before the MP table
HIGH_MEMORY = 0x100000  # 1 MiB: where protected-mode kernels load
BZIMAGE_LOAD_ADDR = HIGH_MEMORY

IOAPIC_ADDR = 0xFEC00000
LAPIC_ADDR = 0xFEE00000
