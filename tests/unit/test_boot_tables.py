"""Boot tables read back from guest memory: e820, MP table, boot_params, GDT,
page tables, initial CPU state."""

from __future__ import annotations

import struct

import pytest

from vmmd.boot import (BOOT_PARAMS_ADDR, CMDLINE_ADDR, GDT_ADDR, MPTABLE_ADDR, PML4_ADDR,
                       RAW_STACK_TOP, TSS_ADDR, BootError)
from vmmd.boot import e820, linux, mptable, raw, x86_state
from vmmd.guest_memory import GuestMemory, MemoryLayout

from test_elf_bzimage import fake_vmlinux, lz4_legacy, make_bzimage, make_elf64

MiB = 1 << 20
GiB = 1 << 30


@pytest.fixture
def mem():
    m = GuestMemory.create(64 * MiB)
    yield m
    m.close()


# ---- e820 ----

def test_e820_small_guest():
    entries = e820.build_e820(MemoryLayout.pc(64 * MiB))
    assert [(e.addr, e.end, e.type) for e in entries] == [
        (0, 0x9FC00, e820.E820_RAM),
        (0x9FC00, 0xA0000, e820.E820_RESERVED),
        (0xF0000, 0x100000, e820.E820_RESERVED),
        (0x100000, 64 * MiB, e820.E820_RAM),
    ]


def test_e820_high_ram_and_roundtrip():
    entries = e820.build_e820(MemoryLayout.pc(5 * GiB))
    assert entries[3].end == 3 * GiB
    assert (entries[4].addr, entries[4].size, entries[4].type) == (4 * GiB, 2 * GiB, 1)
    packed = e820.pack_e820(entries)
    assert len(packed) == 20 * len(entries)
    assert e820.unpack_e820(packed, len(entries)) == entries
    # the IOAPIC and LAPIC are outside every RAM entry
    for a in (0xFEC00000, 0xFEE00000):
        assert not any(e.addr <= a < e.end for e in entries)


def test_e820_too_small():
    with pytest.raises(BootError):
        e820.build_e820(MemoryLayout.pc(512 * 1024))


# ---- MP table ----

def parse_mptable(mem, addr):
    fp = mem.read(addr, 16)
    assert fp[:4] == b"_MP_"
    assert sum(fp) & 0xFF == 0
    sig, table, length, rev, _ck, feat1, _ = struct.unpack("<4sIBBBB4s", fp)
    assert (length, rev, feat1) == (1, 4, 0)
    hdr = mem.read(table, 44)
    (sig, tlen, rev, _ck, _oem, _prod, _optr, _osz, count, lapic, _xl, _xc, _r) = struct.unpack(
        "<4sHBB8s12sIHHIHBB", hdr)
    assert sig == b"PCMP" and rev == 4 and lapic == 0xFEE00000
    full = mem.read(table, tlen)
    assert sum(full) & 0xFF == 0
    pos, entries = 44, []
    sizes = {0: 20, 1: 8, 2: 8, 3: 8, 4: 8}
    for _ in range(count):
        kind = full[pos]
        entries.append((kind, full[pos:pos + sizes[kind]]))
        pos += sizes[kind]
    assert pos == tlen
    return entries


def test_mptable_structure(mem):
    size = mptable.write_mptable(mem, MPTABLE_ADDR, 3,
                                 pci_irqs=[mptable.PciIrq(0, 3, 0, 16), (0, 4, 1, 17)])
    entries = parse_mptable(mem, MPTABLE_ADDR)
    assert size == 16 + 44 + sum(len(e) for _, e in entries)
    cpus = [e for k, e in entries if k == 0]
    assert [c[1] for c in cpus] == [0, 1, 2]  # APIC ids
    assert [c[3] for c in cpus] == [3, 1, 1]  # enabled, BSP on cpu 0
    buses = {e[1]: e[2:8] for k, e in entries if k == 1}
    assert buses == {0: b"PCI   ", 1: b"ISA   "}
    (ioapic,) = [e for k, e in entries if k == 2]
    _, ioid, ver, flags, addr = struct.unpack("<BBBBI", ioapic)
    assert (ioid, ver, flags, addr) == (3, 0x11, 1, 0xFEC00000)
    intr = [struct.unpack("<BBHBBBB", e) for k, e in entries if k == 3]
    isa = {irq: pin for _, it, _, bus, irq, dst, pin in intr if bus == 1 and it == 0}
    assert isa[0] == 2 and 2 not in isa
    assert all(isa[i] == i for i in range(1, 16) if i != 2)
    pci = [(irq, pin, flags) for _, _, flags, bus, irq, _, pin in intr if bus == 0]
    assert pci == [((3 << 2) | 0, 16, 0xF), ((4 << 2) | 1, 17, 0xF)]
    lint = [struct.unpack("<BBHBBBB", e) for k, e in entries if k == 4]
    assert [(it, dst, lin) for _, it, _, _, _, dst, lin in lint] == [(3, 0xFF, 0), (1, 0xFF, 1)]


def test_mptable_identity_irq0_and_limits():
    blob = mptable.build_mptable(0xF0000, 1, irq0_pin=0)
    assert sum(blob[:16]) & 0xFF == 0 and sum(blob[16:]) & 0xFF == 0
    with pytest.raises(BootError):
        mptable.build_mptable(0xF0000, 0)
    with pytest.raises(BootError):
        mptable.build_mptable(0xF0000, 255)
    with pytest.raises(BootError):
        mptable.build_mptable(0xF0000, 1, pci_irqs=[(0, 32, 0, 16)])


# ---- GDT and page tables ----

def translate(mem, cr3, va, user=False):
    """Walk 4-level tables; returns the physical address or None."""
    table = cr3 & ~0xFFF
    for level, shift in enumerate((39, 30, 21, 12)):
        e = mem.read_u64(table + ((va >> shift) & 0x1FF) * 8)
        if not e & 1:
            return None
        if user and not e & 4:
            return None
        if level == 2 and e & 0x80:  # 2 MiB page
            return (e & 0x000FFFFFFFE00000) | (va & 0x1FFFFF)
        table = e & 0x000FFFFFFFFFF000
    return table | (va & 0xFFF)


@pytest.mark.parametrize("user", [False, True])
def test_identity_page_tables_walk(mem, user):
    cr3 = x86_state.write_identity_page_tables(mem, PML4_ADDR, 5 * GiB + 1, user=user)
    assert cr3 == PML4_ADDR
    for va in (0, 0x1234, 0x1000000 + 0x5678, 0xFEC00000, 0xFEE00FFF, 4 * GiB + 0x200123,
               6 * GiB - 1):
        assert translate(mem, cr3, va) == va
        assert (translate(mem, cr3, va, user=True) == va) == user
    assert translate(mem, cr3, 6 * GiB) is None
    assert translate(mem, cr3, 1 << 39) is None


def test_page_tables_must_fit(mem):
    with pytest.raises(BootError):
        x86_state.write_identity_page_tables(mem, PML4_ADDR, 30 * GiB)


def test_gdt_descriptors(mem):
    base, limit = x86_state.write_gdt(mem)
    assert (base, limit) == (GDT_ADDR, 63)
    raw_gdt = struct.unpack("<8Q", mem.read(GDT_ADDR, 64))
    assert raw_gdt[0] == 0
    assert raw_gdt[2] == 0x00AF9B000000FFFF  # 64-bit code
    assert raw_gdt[3] == 0x00CF93000000FFFF  # flat data
    assert raw_gdt[5] == 0x00AFFB000000FFFF  # 64-bit user code, DPL3
    tss = raw_gdt[6]
    assert ((tss >> 16) & 0xFFFFFF) | ((tss >> 32) & 0xFF000000) == TSS_ADDR
    assert tss & 0xFFFF == 104 + 8192 and (tss >> 40) & 0xFF == 0x8B
    # I/O bitmap right after the 104-byte TSS, every port allowed, then 0xff
    assert struct.unpack_from("<H", mem.read(TSS_ADDR + 102, 2))[0] == 104
    assert mem.read(TSS_ADDR + 104, 8192) == bytes(8192)
    assert mem.read_u8(TSS_ADDR + 104 + 8192) == 0xFF


def test_long_mode_state_cpl3():
    st = x86_state.long_mode_state(0x100000, 0x80000, cpl=3)
    assert st.regs["rip"] == 0x100000 and st.regs["rsp"] == 0x80000
    assert st.regs["rflags"] == 0x3002  # IOPL 3, IF 0
    cs, ss = st.segments["cs"], st.segments["ss"]
    assert (cs.selector, cs.dpl, cs.l, cs.db, cs.type, cs.s) == (0x2B, 3, 1, 0, 0xB, 1)
    assert (ss.selector, ss.dpl, ss.type) == (0x23, 3, 0x3)
    assert st.segments["tr"].type == 11 and st.segments["tr"].base == TSS_ADDR
    assert st.segments["tr"].limit == 104 + 8192
    assert st.efer & 0x500 == 0x500 and st.cr0 & 0x80000001 == 0x80000001
    assert st.cr4 & (1 << 5) and st.cr4 & (1 << 9) and st.cr4 & (1 << 10)
    st0 = x86_state.long_mode_state(0x100000, cpl=0)
    assert st0.segments["cs"].selector == 0x10 and st0.segments["ds"].selector == 0x18
    assert st0.regs["rflags"] == 2


# ---- raw test guests ----

def guest_elf(addr=0x100000):
    return make_elf64([(addr, addr, b"\xf4" * 16, 0x2000)], entry=addr)


@pytest.mark.parametrize("mode", raw.MODES)
def test_load_raw_modes(mem, mode):
    st = raw.load_raw(mem, guest_elf(), mode)
    assert mem.read_u8(0x100000) == 0xF4
    if mode == "real":
        assert st.segments["cs"].base + st.regs["rip"] == 0x100000
        assert st.cr0 & 1 == 0
        return
    assert st.regs["rip"] == 0x100000 and st.regs["rsp"] == RAW_STACK_TOP
    if mode == "protected":
        assert st.segments["cs"].selector == 0x08 and st.segments["cs"].db == 1
        assert st.cr0 & (1 << 31) == 0
    else:
        user = mode == "long-cpl3"
        assert st.segments["cs"].dpl == (3 if user else 0)
        # RAM and the MMIO hole are mapped, user-accessible only for CPL3
        for va in (0x100000, 0xD0000000, 0xFEE00000):
            assert translate(mem, st.cr3, va, user=user) == va


def test_load_raw_rejects_overlap_and_bad_mode(mem):
    with pytest.raises(BootError, match="overlaps"):
        raw.load_raw(mem, guest_elf(0x9000), "long")
    with pytest.raises(BootError, match="mode"):
        raw.load_raw(mem, guest_elf(), "virtual8086")


# ---- Linux boot_params ----

def bp_field(mem, off, fmt):
    return struct.unpack_from("<" + fmt, mem.read(BOOT_PARAMS_ADDR + off, 8))[0]


def test_load_linux_vmlinux(mem):
    vmlinux = make_elf64([(0x1000000, 0xFFFFFFFF81000000, b"\xf4" * 4096, 0x200000)],
                         entry=0x1000000)
    initrd = b"INITRD" * 1000
    info = linux.load_linux(mem, vmlinux, initrd, "console=ttyS0 panic=-1", ncpus=2)
    assert info.entry == 0x1000000 and info.kind == "vmlinux"
    assert info.cpu_state.regs["rsi"] == BOOT_PARAMS_ADDR and info.cpu_state.regs["rip"] == 0x1000000
    assert info.cpu_state.segments["cs"].selector == 0x10 and info.cpu_state.segments["ss"].selector == 0x18
    assert info.cpu_state.regs["rflags"] == 2
    # setup header
    assert bp_field(mem, 0x1FE, "H") == 0xAA55
    assert bp_field(mem, 0x202, "I") == 0x53726448
    assert bp_field(mem, 0x206, "H") >= 0x0206
    assert bp_field(mem, 0x210, "B") == 0xFF  # type_of_loader
    assert bp_field(mem, 0x211, "B") & 1  # LOADED_HIGH
    assert bp_field(mem, 0x1EF, "B") == 0  # sentinel
    # command line
    assert bp_field(mem, 0x228, "I") == CMDLINE_ADDR and bp_field(mem, 0x0C8, "I") == 0
    assert mem.read(CMDLINE_ADDR, 23) == b"console=ttyS0 panic=-1\0"
    # initrd: page aligned, at the top of RAM, above the kernel
    image, size = bp_field(mem, 0x218, "I"), bp_field(mem, 0x21C, "I")
    assert (image, size) == (info.initrd_addr, len(initrd))
    assert image % 4096 == 0 and image + size <= 64 * MiB and image + size > 64 * MiB - 4096
    assert image >= info.kernel_end
    assert mem.read(image, size) == initrd
    # e820
    n = bp_field(mem, 0x1E8, "B")
    entries = e820.unpack_e820(mem.read(BOOT_PARAMS_ADDR + 0x2D0, 20 * n), n)
    assert entries == e820.build_e820(mem.layout)
    # MP table with two CPUs
    assert len([k for k, _ in parse_mptable(mem, MPTABLE_ADDR) if k == 0]) == 2
    # BIOS data area points at the EBDA
    assert mem.read_u16(0x40E) == 0x9FC0
    # the kernel, boot_params and cmdline are identity mapped
    for va in (0x1000000, BOOT_PARAMS_ADDR, CMDLINE_ADDR, image):
        assert translate(mem, info.cpu_state.cr3, va) == va


def test_load_linux_header_from_bzimage_and_bzimage_entry(mem):
    vmlinux = fake_vmlinux(100000)
    bz = make_bzimage(lz4_legacy(vmlinux), setup_sects=7, init_size=0x200000)
    info = linux.load_linux(mem, vmlinux, None, "x", 1, setup_header_from=bz)
    assert bp_field(mem, 0x1F1, "B") == 7  # copied from the bzImage
    assert bp_field(mem, 0x260, "I") == 0x200000
    assert bp_field(mem, 0x210, "B") == 0xFF and bp_field(mem, 0x218, "I") == 0
    assert info.initrd_size == 0

    info = linux.load_linux(mem, bz, b"rd", "y", 1)
    assert info.kind == "bzImage"
    assert info.entry == 0x1000000 + 0x200  # pref_address + 0x200
    assert mem.read(0x1000000, 0x300) == b"\xf4" * 0x300
    assert info.initrd_addr >= 0x1000000 + 0x200000


def test_load_linux_errors(mem):
    vmlinux = make_elf64([(0x1000000, 0x1000000, b"\xf4", 16)], entry=0x1000000)
    with pytest.raises(BootError, match="too long"):
        linux.load_linux(mem, vmlinux, None, "a" * 70000, 1)
    with pytest.raises(BootError, match="does not fit"):
        linux.load_linux(mem, vmlinux, bytes(80 * MiB), "", 1)
    with pytest.raises(BootError, match="neither"):
        linux.load_linux(mem, b"garbage" * 200, None, "", 1)
    bz = make_bzimage(b"\x1f\x8b" + bytes(40), xloadflags=0)
    with pytest.raises(BootError, match="XLF_KERNEL_64"):
        linux.load_linux(mem, bz, None, "", 1)
    low = make_elf64([(0x8000, 0x8000, b"\xf4", 16)], entry=0x8000)
    with pytest.raises(BootError, match="below 1 MiB"):
        linux.load_linux(mem, low, None, "", 1)
