"""Linux x86 64-bit boot protocol (Documentation/arch/x86/boot.rst, "64-bit
BOOT PROTOCOL"): load the kernel, build boot_params, enter in long mode.

Two kernel forms:
  * an ELF vmlinux (e.g. extracted from a bzImage with
    bzimage.extract_vmlinux): PT_LOAD segments at their physical addresses,
    entered at the physical startup_64. This skips the bzImage decompressor,
    which is very slow where kernel code is emulated (see the platform notes).
    boot_params then gets a setup header either copied from a bzImage
    (``setup_header_from=``) or synthesized here.
  * a bzImage with XLF_KERNEL_64: the protected-mode part loaded at its
    pref_address (relocatable kernels, when it fits) or 1 MiB and entered
    at load address + 0x200.

The kernel starts with RSI = boot_params, CS 0x10, DS/ES/SS 0x18, paging on
with an identity map of (at least) the first 4 GiB, interrupts off.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from vmmd.boot import (BDA_BASE_MEM_KIB, BDA_EBDA_SEGMENT, BOOT_PARAMS_ADDR,
                       BZIMAGE_LOAD_ADDR, CMDLINE_ADDR, CMDLINE_MAX, EBDA_START, GiB,
                       HIGH_MEMORY, MPTABLE_ADDR, PAGE_TABLES_END, PML4_ADDR, BootError)
from vmmd.boot import bzimage
from vmmd.boot.acpi import write_acpi_tables
from vmmd.boot.e820 import E820Entry, build_e820, pack_e820
from vmmd.boot.elf import is_elf, load_segments, parse_elf
from vmmd.boot.mptable import write_mptable
from vmmd.boot.x86_state import CpuState, long_mode_state, write_gdt, write_identity_page_tables

BOOT_PARAMS_SIZE = 4096
LINUX_STACK_TOP = 0x8FF0  # between boot_params and the PML4; startup_64 sets its own
PAGE = 4096

# boot_params ("zero page", Documentation/arch/x86/zero-page.rst) offsets
BP_ACPI_RSDP_ADDR = 0x070  # u64, read by the kernel itself (protocol 2.14+ loaders set it)
BP_EXT_RAMDISK_IMAGE = 0x0C0
BP_EXT_RAMDISK_SIZE = 0x0C4
BP_EXT_CMD_LINE_PTR = 0x0C8
BP_E820_ENTRIES = 0x1E8
BP_SENTINEL = 0x1EF
BP_E820_TABLE = 0x2D0
BP_E820_TABLE_END = 0x2D0 + 128 * 20

TYPE_OF_LOADER_UNDEFINED = 0xFF
SYNTH_PROTOCOL_VERSION = 0x020F
SYNTH_HEADER_END = 0x268  # through kernel_info_offset's predecessor fields
DEFAULT_INITRD_ADDR_MAX = 0x7FFFFFFF


@dataclass
class BootInfo:
    entry: int
    boot_params: int
    cpu_state: CpuState
    kernel_start: int
    kernel_end: int  # one past the memory the kernel may use while starting
    cmdline_addr: int
    initrd_addr: int = 0
    initrd_size: int = 0
    mptable_addr: int = MPTABLE_ADDR
    acpi_rsdp_addr: int = 0  # 0: no ACPI tables
    e820: list[E820Entry] = field(default_factory=list)
    kind: str = "vmlinux"  # or "bzImage"


def _put(bp: bytearray, name: str, value: int) -> None:
    off, fmt = bzimage.FIELDS[name]
    struct.pack_into("<" + fmt, bp, off, value)


def _get(bp: bytes, name: str) -> int:
    off, fmt = bzimage.FIELDS[name]
    return struct.unpack_from("<" + fmt, bp, off)[0]


def synthesize_setup_header(bp: bytearray) -> None:
    """A setup header for a kernel loaded without its bzImage: the fields the
    kernel reads once it runs (it takes the rest from boot_params proper)."""
    struct.pack_into("<BB", bp, 0x200, 0xEB, SYNTH_HEADER_END - 0x202)  # jmp over the header
    _put(bp, "boot_flag", bzimage.BOOT_FLAG)
    _put(bp, "header", bzimage.HDRS_MAGIC)
    _put(bp, "version", SYNTH_PROTOCOL_VERSION)
    _put(bp, "loadflags", bzimage.LOADED_HIGH)
    _put(bp, "initrd_addr_max", DEFAULT_INITRD_ADDR_MAX)
    _put(bp, "kernel_alignment", 0x200000)
    _put(bp, "relocatable_kernel", 1)
    _put(bp, "xloadflags", bzimage.XLF_KERNEL_64 | bzimage.XLF_CAN_BE_LOADED_ABOVE_4G)
    _put(bp, "cmdline_size", CMDLINE_MAX - 1)


def low_ram_end(layout) -> int:
    for r in layout.regions:
        if r.gpa == 0:
            return r.end
    raise BootError("no RAM at guest-physical 0")


def place_initrd(size: int, low_end: int, initrd_addr_max: int, kernel_end: int) -> int:
    """Highest page-aligned address for the initrd below the kernel's limit and
    the end of low RAM, above the kernel."""
    top = min(initrd_addr_max + 1, low_end)
    addr = (top - size) & ~(PAGE - 1)
    if size <= 0 or addr < kernel_end:
        raise BootError(f"initrd of {size} bytes does not fit between the kernel "
                        f"(ends {kernel_end:#x}) and {top:#x}")
    return addr


def _load_bzimage(mem, data: bytes, low_end: int) -> tuple[int, int, int, bytes]:
    hdr = bzimage.parse_setup_header(data)
    if not hdr.kernel_64:
        raise BootError("bzImage lacks XLF_KERNEL_64: no 64-bit entry point")
    if not hdr.loadflags & bzimage.LOADED_HIGH:
        raise BootError("zImage (not loaded high) kernels are not supported")
    pm = memoryview(data)[hdr.setup_size:]
    need = max(len(pm), hdr.init_size)
    load = BZIMAGE_LOAD_ADDR
    if hdr.relocatable_kernel and hdr.pref_address and hdr.pref_address + need <= low_end:
        load = hdr.pref_address
    if load < HIGH_MEMORY or load + need > low_end:
        raise BootError(f"bzImage needs {need:#x} bytes at {load:#x}; low RAM ends {low_end:#x}")
    mem.write(load, pm)
    return load + 0x200, load, load + need, bzimage.setup_header_bytes(data)


def _load_vmlinux(mem, data: bytes, low_end: int) -> tuple[int, int, int]:
    image = parse_elf(data)
    for s in image.segments:
        if s.memsz and s.paddr < HIGH_MEMORY:
            raise BootError(f"vmlinux segment at {s.paddr:#x} is below 1 MiB")
    load_segments(mem, data, image)
    start = min(s.paddr for s in image.segments)
    return image.entry_physical(), start, image.phys_end


def load_linux(mem, kernel_bytes: bytes, initrd_bytes: bytes | None, cmdline: str,
               ncpus: int, *, setup_header_from: bytes | None = None, pci_irqs=(),
               irq0_pin: int = 2, acpi: bool = True, legacy: bool = False) -> BootInfo:
    """Load a vmlinux ELF or a bzImage plus initrd and command line; write
    boot_params, e820, MP table, ACPI tables (unless ``acpi`` is false), GDT,
    page tables. Returns the entry state."""
    layout = mem.layout
    low_end = low_ram_end(layout)
    e820 = build_e820(layout)
    if low_end < PAGE_TABLES_END + CMDLINE_MAX:
        raise BootError("guest RAM is too small")

    bp = bytearray(BOOT_PARAMS_SIZE)
    if is_elf(kernel_bytes):
        kind = "vmlinux"
        entry, kstart, kend = _load_vmlinux(mem, kernel_bytes, low_end)
        if setup_header_from is not None:
            hdr = bzimage.setup_header_bytes(setup_header_from)
            bp[0x1F1:0x1F1 + len(hdr)] = hdr
        else:
            synthesize_setup_header(bp)
    elif bzimage.is_bzimage(kernel_bytes):
        kind = "bzImage"
        entry, kstart, kend, hdr = _load_bzimage(mem, kernel_bytes, low_end)
        bp[0x1F1:0x1F1 + len(hdr)] = hdr
    else:
        raise BootError("kernel is neither an ELF vmlinux nor a bzImage")

    # command line
    raw_cmdline = cmdline.encode()
    limit = CMDLINE_MAX - 1
    if _get(bp, "version") >= 0x0206 and _get(bp, "cmdline_size"):
        limit = min(limit, _get(bp, "cmdline_size"))
    if b"\0" in raw_cmdline or len(raw_cmdline) > limit:
        raise BootError(f"command line of {len(raw_cmdline)} bytes is too long (max {limit}) "
                        "or holds a NUL")
    mem.write(CMDLINE_ADDR, raw_cmdline.ljust(CMDLINE_MAX, b"\0"))
    _put(bp, "cmd_line_ptr", CMDLINE_ADDR)
    struct.pack_into("<I", bp, BP_EXT_CMD_LINE_PTR, CMDLINE_ADDR >> 32)

    _put(bp, "type_of_loader", TYPE_OF_LOADER_UNDEFINED)
    _put(bp, "loadflags", _get(bp, "loadflags") | bzimage.LOADED_HIGH)

    # initrd
    initrd_addr = initrd_size = 0
    if initrd_bytes:
        initrd_size = len(initrd_bytes)
        addr_max = _get(bp, "initrd_addr_max") or DEFAULT_INITRD_ADDR_MAX
        initrd_addr = place_initrd(initrd_size, low_end, addr_max, kend)
        mem.write(initrd_addr, initrd_bytes)
        _put(bp, "ramdisk_image", initrd_addr & 0xFFFFFFFF)
        _put(bp, "ramdisk_size", initrd_size & 0xFFFFFFFF)
        struct.pack_into("<II", bp, BP_EXT_RAMDISK_IMAGE, initrd_addr >> 32, initrd_size >> 32)

    # ACPI (kernels without CONFIG_X86_MPPARSE see CPUs and the IOAPIC only here)
    rsdp = write_acpi_tables(mem, ncpus, pci_irqs=pci_irqs, legacy=legacy) if acpi else 0
    struct.pack_into("<Q", bp, BP_ACPI_RSDP_ADDR, rsdp)

    # e820
    bp[BP_E820_ENTRIES] = len(e820)
    table = pack_e820(e820)
    bp[BP_E820_TABLE:BP_E820_TABLE + len(table)] = table
    mem.write(BOOT_PARAMS_ADDR, bp)

    # BIOS data area words Linux reads to find the EBDA and base memory
    mem.write_u16(BDA_EBDA_SEGMENT, EBDA_START >> 4)
    mem.write_u16(BDA_BASE_MEM_KIB, EBDA_START >> 10)
    mem.write(EBDA_START, bytes(0x400))
    write_mptable(mem, MPTABLE_ADDR, ncpus, pci_irqs, irq0_pin=irq0_pin)

    gdt = write_gdt(mem)
    # Map the first 4 GiB and as much RAM above as the table area holds; the
    # kernel builds its own tables early and only needs what we loaded mapped.
    max_gib = (PAGE_TABLES_END - PML4_ADDR) // PAGE - 2
    map_bytes = min(max(4 * GiB, layout.end), max_gib * GiB)
    cr3 = write_identity_page_tables(mem, PML4_ADDR, map_bytes, user=False)
    cpu = long_mode_state(entry, LINUX_STACK_TOP, cpl=0, cr3=cr3, gdt=gdt,
                          regs={"rsi": BOOT_PARAMS_ADDR})
    cpu.notes["mode"] = f"linux-{kind}"
    return BootInfo(entry=entry, boot_params=BOOT_PARAMS_ADDR, cpu_state=cpu, kernel_start=kstart,
                    kernel_end=kend, cmdline_addr=CMDLINE_ADDR, initrd_addr=initrd_addr,
                    initrd_size=initrd_size, mptable_addr=MPTABLE_ADDR, acpi_rsdp_addr=rsdp,
                    e820=e820, kind=kind)
