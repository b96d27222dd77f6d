"""Initial x86 vCPU state as plain data, and the memory structures it points at
(GDT, TSS, identity-mapped page tables).

vmmd/vcpu.py turns a CpuState into kvm_regs / kvm_sregs. Segment fields match
kvm_segment (type is the 4-bit descriptor type, s = code/data, l = 64-bit).

GDT (at GDT_ADDR, limit 0x3f):
  0x00 null
  0x08 flat 32-bit code, DPL 0        (protected mode)
  0x10 64-bit code, DPL 0             (Linux __BOOT_CS)
  0x18 flat data, DPL 0               (Linux __BOOT_DS)
  0x20 flat data, DPL 3               (selector 0x23)
  0x28 64-bit code, DPL 3             (selector 0x2b)
  0x30 64-bit TSS (16 bytes) at TSS_ADDR: 104 bytes + an I/O permission
       bitmap allowing every port (see write_tss)
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from vmmd.boot import (GDT_ADDR, GiB, IDT_ADDR, MiB, PAGE_TABLES_END, PML4_ADDR,
                       TSS_ADDR, BootError)

# selectors
SEL_CODE32 = 0x08
SEL_CODE64 = 0x10
SEL_DATA = 0x18
SEL_USER_DATA = 0x23
SEL_USER_CODE64 = 0x2B
SEL_TSS = 0x30
GDT_LIMIT = 8 * 8 - 1
TSS_SIZE = 104
IO_BITMAP_SIZE = 65536 // 8
# the bitmap plus the 0xff byte the CPU may read past its end
TSS_LIMIT = TSS_SIZE + IO_BITMAP_SIZE

# control registers and EFER bits
CR0_PE = 1 << 0
CR0_MP = 1 << 1
CR0_ET = 1 << 4
CR0_NE = 1 << 5
CR0_PG = 1 << 31
CR4_PAE = 1 << 5
CR4_OSFXSR = 1 << 9
CR4_OSXMMEXCPT = 1 << 10
EFER_LME = 1 << 8
EFER_LMA = 1 << 10
RFLAGS_FIXED = 1 << 1  # bit 1 always reads 1
RFLAGS_IOPL3 = 3 << 12

# page table entry bits
PTE_P = 1 << 0
PTE_RW = 1 << 1
PTE_US = 1 << 2
PTE_PS = 1 << 7  # 2 MiB page in a PD entry
PAGE = 4096
HUGE_PAGE = 2 * MiB

GPR_NAMES = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
             "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")
SEGMENT_NAMES = ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")

# descriptor "flags": access byte in bits 0-7, G/DB/L/AVL in bits 12-15
_CODE32 = 0xC09B
_CODE64 = 0xA09B
_DATA = 0xC093
_USER_DATA = 0xC0F3
_USER_CODE64 = 0xA0FB
_TSS64_BUSY = 0x008B


@dataclass(frozen=True)
class Segment:
    base: int
    limit: int  # in bytes - 1 (already scaled by G)
    selector: int
    type: int
    present: int
    dpl: int
    db: int
    s: int
    l: int  # noqa: E741 - the descriptor bit's name
    g: int
    avl: int = 0
    unusable: int = 0


@dataclass
class CpuState:
    regs: dict[str, int]  # GPR_NAMES + rip, rflags
    segments: dict[str, Segment]  # SEGMENT_NAMES
    gdt: tuple[int, int]  # (base, limit)
    idt: tuple[int, int]
    cr0: int
    cr3: int
    cr4: int
    efer: int
    cr2: int = 0
    notes: dict = field(default_factory=dict)  # e.g. the mode, for logs


def descriptor(flags: int, base: int, limit: int) -> int:
    """An 8-byte GDT descriptor. ``limit`` is the raw 20-bit field."""
    return (((base & 0xFF000000) << 32) | ((flags & 0xF0FF) << 40)
            | ((limit & 0xF0000) << 32) | ((base & 0x00FFFFFF) << 16) | (limit & 0xFFFF))


def segment_from_descriptor(selector: int, flags: int, base: int = 0,
                            limit: int = 0xFFFFF) -> Segment:
    g = (flags >> 15) & 1
    return Segment(base=base, limit=(limit << 12) | 0xFFF if g else limit,
                   selector=selector, type=flags & 0xF, present=(flags >> 7) & 1,
                   dpl=(flags >> 5) & 3, db=(flags >> 14) & 1, s=(flags >> 4) & 1,
                   l=(flags >> 13) & 1, g=g, avl=(flags >> 12) & 1)


def gdt_bytes(tss_addr: int = TSS_ADDR) -> bytes:
    entries = [0,
               descriptor(_CODE32, 0, 0xFFFFF),
               descriptor(_CODE64, 0, 0xFFFFF),
               descriptor(_DATA, 0, 0xFFFFF),
               descriptor(_USER_DATA, 0, 0xFFFFF),
               descriptor(_USER_CODE64, 0, 0xFFFFF),
               descriptor(_TSS64_BUSY, tss_addr, TSS_LIMIT),
               tss_addr >> 32]  # upper half of the 16-byte TSS descriptor
    return struct.pack("<8Q", *entries)


def write_gdt(mem, addr: int = GDT_ADDR, tss_addr: int = TSS_ADDR) -> tuple[int, int]:
    """Write the GDT and its TSS; returns (base, limit) for the GDTR."""
    mem.write(addr, gdt_bytes(tss_addr))
    write_tss(mem, tss_addr)
    return addr, GDT_LIMIT


def write_tss(mem, addr: int = TSS_ADDR) -> None:
    """A 64-bit TSS with no stacks and an all-zero I/O permission bitmap, so
    CPL3 code may use every port. IOPL 3 alone is not enough everywhere: on
    PVM hosts CPL3 in/out fault unless the bitmap allows the port."""
    tss = bytearray(TSS_LIMIT + 1)
    struct.pack_into("<H", tss, 102, TSS_SIZE)  # bitmap right after the TSS
    tss[TSS_LIMIT] = 0xFF  # terminator byte after the bitmap
    mem.write(addr, tss)


def page_table_bytes_needed(map_bytes: int) -> int:
    return (2 + _gib_count(map_bytes)) * PAGE


def _gib_count(map_bytes: int) -> int:
    if map_bytes <= 0:
        raise BootError("nothing to map")
    n = -(-map_bytes // GiB)
    if n > 512:
        raise BootError(f"identity map of {map_bytes:#x} bytes needs more than one PDPT")
    return n


def write_identity_page_tables(mem, base_addr: int = PML4_ADDR, map_bytes: int = 4 * GiB,
                               user: bool = False, limit: int = PAGE_TABLES_END) -> int:
    """Identity-map [0, map_bytes rounded up to 1 GiB) with 2 MiB pages:
    PML4 at base_addr, PDPT after it, then one PD per GiB. ``user`` sets U/S
    at every level (for CPL3 guests). The tables must end by ``limit``.
    Returns the CR3 value."""
    n = _gib_count(map_bytes)
    if base_addr % PAGE or base_addr + (2 + n) * PAGE > limit:
        raise BootError(f"page tables for {n} GiB do not fit [{base_addr:#x}, {limit:#x})")
    flags = PTE_P | PTE_RW | (PTE_US if user else 0)
    pdpt = base_addr + PAGE
    pd0 = base_addr + 2 * PAGE
    pml4 = [0] * 512
    pml4[0] = pdpt | flags
    mem.write(base_addr, struct.pack("<512Q", *pml4))
    pdpt_entries = [0] * 512
    for i in range(n):
        pdpt_entries[i] = (pd0 + i * PAGE) | flags
    mem.write(pdpt, struct.pack("<512Q", *pdpt_entries))
    for i in range(n):
        first = i * GiB
        mem.write(pd0 + i * PAGE, struct.pack(
            "<512Q", *((first + j * HUGE_PAGE) | flags | PTE_PS for j in range(512))))
    return base_addr


def _regs(rip: int, rsp: int, rflags: int, extra: dict | None) -> dict[str, int]:
    regs = dict.fromkeys(GPR_NAMES, 0)
    regs.update(rip=rip, rsp=rsp, rflags=rflags)
    for k, v in (extra or {}).items():
        if k not in regs:
            raise ValueError(f"unknown register {k!r}")
        regs[k] = v
    return regs


def _tr_64(tss_addr: int) -> Segment:
    # busy 64-bit TSS: what VM entry requires of TR in long mode
    return Segment(base=tss_addr, limit=TSS_LIMIT, selector=SEL_TSS, type=11,
                   present=1, dpl=0, db=0, s=0, l=0, g=0)


def _ldt_none() -> Segment:
    return Segment(base=0, limit=0xFFFF, selector=0, type=2, present=1, dpl=0,
                   db=0, s=0, l=0, g=0)


def long_mode_state(entry: int, rsp: int = 0, cpl: int = 0, *, cr3: int = PML4_ADDR,
                    gdt: tuple[int, int] = (GDT_ADDR, GDT_LIMIT),
                    idt: tuple[int, int] = (IDT_ADDR, 0), tss_addr: int = TSS_ADDR,
                    regs: dict | None = None) -> CpuState:
    """64-bit mode, paging on, interrupts off. CPL 0: CS 0x10 / data 0x18.
    CPL 3: CS 0x2b / data 0x23 and IOPL 3 so in/out work without exits to
    a handler."""
    if cpl == 0:
        cs = segment_from_descriptor(SEL_CODE64, _CODE64)
        data = segment_from_descriptor(SEL_DATA, _DATA)
        rflags = RFLAGS_FIXED
    elif cpl == 3:
        cs = segment_from_descriptor(SEL_USER_CODE64, _USER_CODE64)
        data = segment_from_descriptor(SEL_USER_DATA, _USER_DATA)
        rflags = RFLAGS_FIXED | RFLAGS_IOPL3
    else:
        raise ValueError(f"cpl must be 0 or 3, not {cpl}")
    segs = {n: data for n in ("ds", "es", "fs", "gs", "ss")}
    segs.update(cs=cs, tr=_tr_64(tss_addr), ldt=_ldt_none())
    return CpuState(regs=_regs(entry, rsp, rflags, regs), segments=segs, gdt=gdt, idt=idt,
                    cr0=CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_PG, cr3=cr3,
                    cr4=CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT,
                    efer=EFER_LME | EFER_LMA, notes={"mode": f"long-cpl{cpl}"})


def protected_mode_state(entry: int, esp: int = 0, *,
                         gdt: tuple[int, int] = (GDT_ADDR, GDT_LIMIT),
                         idt: tuple[int, int] = (IDT_ADDR, 0), tss_addr: int = TSS_ADDR,
                         regs: dict | None = None) -> CpuState:
    """Flat 32-bit protected mode, paging off, CPL 0 (CS 0x08, data 0x18)."""
    cs = segment_from_descriptor(SEL_CODE32, _CODE32)
    data = segment_from_descriptor(SEL_DATA, _DATA)
    segs = {n: data for n in ("ds", "es", "fs", "gs", "ss")}
    # 32-bit busy TSS for TR (the 64-bit TSS descriptor type reads as that)
    tr = Segment(base=tss_addr, limit=TSS_LIMIT, selector=SEL_TSS, type=11, present=1,
                 dpl=0, db=0, s=0, l=0, g=0)
    segs.update(cs=cs, tr=tr, ldt=_ldt_none())
    return CpuState(regs=_regs(entry, esp, RFLAGS_FIXED, regs), segments=segs, gdt=gdt,
                    idt=idt, cr0=CR0_PE | CR0_MP | CR0_ET | CR0_NE, cr3=0,
                    cr4=CR4_OSFXSR | CR4_OSXMMEXCPT, efer=0, notes={"mode": "protected"})


def real_mode_segment(selector: int, code: bool = False) -> Segment:
    return Segment(base=selector << 4, limit=0xFFFF, selector=selector,
                   type=0xB if code else 0x3, present=1, dpl=0, db=0, s=1, l=0, g=0)


def real_mode_state(cs: int, ip: int, ss: int = 0, sp: int = 0,
                    regs: dict | None = None) -> CpuState:
    """Real mode at cs:ip with all data segments = ss (power-on style
    TR/LDTR/IDTR)."""
    if not (0 <= cs <= 0xFFFF and 0 <= ip <= 0xFFFF and 0 <= ss <= 0xFFFF and 0 <= sp <= 0xFFFF):
        raise BootError(f"real-mode cs:ip {cs:#x}:{ip:#x} / ss:sp {ss:#x}:{sp:#x} out of range")
    data = real_mode_segment(ss)
    segs = {n: data for n in ("ds", "es", "fs", "gs", "ss")}
    segs["cs"] = real_mode_segment(cs, code=True)
    segs["tr"] = Segment(base=0, limit=0xFFFF, selector=0, type=11, present=1,
                         dpl=0, db=0, s=0, l=0, g=0)
    segs["ldt"] = _ldt_none()
    return CpuState(regs=_regs(ip, sp, RFLAGS_FIXED, regs), segments=segs, gdt=(0, 0xFFFF),
                    idt=(0, 0x3FF), cr0=CR0_ET, cr3=0, cr4=0, efer=0,
                    notes={"mode": "real"})
