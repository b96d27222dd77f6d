"""Test guests: an ELF loaded at its physical addresses and entered directly.

Modes and the entry state each gets:
  real        CS:IP = entry (CS = entry's 64 KiB segment; entries in
              [1 MiB, 1 MiB + 0xffef] use CS 0xffff with the A20 wrap),
              DS = ES = FS = GS = SS = 0x7000, SP = 0xfff0 (linear 0x7fff0)
  protected   flat 32-bit, CS 0x08, data 0x18, paging off, ESP = RAW_STACK_TOP
  long        64-bit CPL0, CS 0x10, data 0x18, identity map of
              [0, max(4 GiB, end of RAM)) with 2 MiB pages, RSP = RAW_STACK_TOP
  long-cpl3   as long, but CPL3 (CS 0x2b, data 0x23), user-accessible page
              tables (so RAM and the 3-4 GiB MMIO hole are reachable), IOPL 3
All modes: RFLAGS.IF = 0, empty IDT (a fault is a triple fault/shutdown).
RAW_STACK_TOP is 0x80000; the ELF must not overlap the boot structures in
[0x500, 0x20000) (GDT, TSS, page tables) nor the stack page below 0x80000.
"""

from __future__ import annotations

from vmmd.boot import GDT_ADDR, GiB, HIGH_MEMORY, PAGE_TABLES_END, PML4_ADDR, RAW_STACK_TOP, BootError
from vmmd.boot.elf import load_segments, parse_elf
from vmmd.boot.x86_state import (CpuState, long_mode_state, protected_mode_state,
                                 real_mode_state, write_gdt, write_identity_page_tables)

MODES = ("real", "protected", "long", "long-cpl3")
REAL_MODE_SS = 0x7000
REAL_MODE_SP = 0xFFF0


def _check_no_overlap(image, ranges) -> None:
    for s in image.segments:
        for lo, hi, what in ranges:
            if s.memsz and s.paddr < hi and lo < s.paddr + s.memsz:
                raise BootError(f"ELF segment {s.paddr:#x}+{s.memsz:#x} overlaps the {what} "
                                f"at [{lo:#x}, {hi:#x})")


def _real_mode_entry(entry: int) -> tuple[int, int]:
    if entry < HIGH_MEMORY:
        return (entry & 0xF0000) >> 4, entry & 0xFFFF
    if entry <= HIGH_MEMORY + 0xFFEF:
        return 0xFFFF, entry - 0xFFFF0
    raise BootError(f"real-mode entry {entry:#x} is above 1 MiB + 64 KiB")


def load_raw(mem, elf_bytes: bytes, mode: str) -> CpuState:
    """Load a test-guest ELF and return the vCPU state for ``mode``."""
    if mode not in MODES:
        raise BootError(f"unknown raw boot mode {mode!r} (one of {', '.join(MODES)})")
    image = parse_elf(elf_bytes)
    entry = image.entry_physical()
    if mode == "real":
        stack = REAL_MODE_SS * 16 + REAL_MODE_SP
        _check_no_overlap(image, [(stack - 0x1000, stack, "real-mode stack")])
        cs, ip = _real_mode_entry(entry)
        load_segments(mem, elf_bytes, image)
        return real_mode_state(cs, ip, REAL_MODE_SS, REAL_MODE_SP)

    _check_no_overlap(image, [(GDT_ADDR, PAGE_TABLES_END, "boot structures"),
                              (RAW_STACK_TOP - 0x1000, RAW_STACK_TOP, "stack")])
    if mode == "protected":
        if entry >= 4 * GiB:
            raise BootError(f"protected-mode entry {entry:#x} is above 4 GiB")
        load_segments(mem, elf_bytes, image)
        gdt = write_gdt(mem)
        return protected_mode_state(entry, RAW_STACK_TOP, gdt=gdt)

    load_segments(mem, elf_bytes, image)
    gdt = write_gdt(mem)
    user = mode == "long-cpl3"
    # all of RAM plus the 32-bit hole below 4 GiB, where MMIO lives
    cr3 = write_identity_page_tables(mem, PML4_ADDR, max(4 * GiB, mem.layout.end), user=user)
    return long_mode_state(entry, RAW_STACK_TOP, cpl=3 if user else 0, cr3=cr3, gdt=gdt)
