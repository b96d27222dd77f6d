"""ELF executables for x86: parse the program headers, load PT_LOAD segments.

Sans-I/O parsing over bytes; loading goes through GuestMemory. Accepts ELF64
(x86_64) and ELF32 (i386 or x86_64) little-endian executables; segments are
loaded at their *physical* addresses (p_paddr), as a bootloader does.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from vmmd.boot import BootError

ELF_MAGIC = b"\x7fELF"
ELFCLASS32 = 1
ELFCLASS64 = 2
ELFDATA2LSB = 1
ET_EXEC = 2
ET_DYN = 3
EM_386 = 3
EM_X86_64 = 62
PT_LOAD = 1
PN_XNUM = 0xFFFF

# (header format, header size, phdr format, phdr size) per class
_EHDR64 = struct.Struct("<16sHHIQQQIHHHHHH")
_PHDR64 = struct.Struct("<IIQQQQQQ")
_EHDR32 = struct.Struct("<16sHHIIIIIHHHHHH")
_PHDR32 = struct.Struct("<IIIIIIII")


@dataclass(frozen=True)
class Segment:
    """One PT_LOAD program header."""
    offset: int
    vaddr: int
    paddr: int
    filesz: int
    memsz: int
    flags: int


@dataclass(frozen=True)
class ElfImage:
    elf_class: int  # ELFCLASS32 or ELFCLASS64
    machine: int
    entry: int  # e_entry as written (may be virtual)
    segments: tuple[Segment, ...]  # PT_LOAD only, in file order

    def entry_physical(self) -> int:
        """e_entry as a physical address: as is when a segment holds it
        physically (vmlinux's e_entry is already physical startup_64), else
        translated through the PT_LOAD that holds it virtually."""
        for s in self.segments:
            if s.paddr <= self.entry < s.paddr + s.memsz:
                return self.entry
        for s in self.segments:
            if s.vaddr <= self.entry < s.vaddr + s.memsz:
                return s.paddr + (self.entry - s.vaddr)
        return self.entry

    @property
    def phys_end(self) -> int:
        """One past the highest physical byte any segment occupies."""
        return max(s.paddr + s.memsz for s in self.segments)


def is_elf(data: bytes) -> bool:
    return data[:4] == ELF_MAGIC


def parse_elf(data: bytes) -> ElfImage:
    """Parse and validate an x86 ELF executable; BootError on anything bad."""
    data = memoryview(data)
    if len(data) < 16 or bytes(data[:4]) != ELF_MAGIC:
        raise BootError("not an ELF file (bad magic)")
    elf_class, encoding = data[4], data[5]
    if encoding != ELFDATA2LSB:
        raise BootError(f"ELF data encoding {encoding} is not little-endian")
    if elf_class == ELFCLASS64:
        ehdr, phdr = _EHDR64, _PHDR64
    elif elf_class == ELFCLASS32:
        ehdr, phdr = _EHDR32, _PHDR32
    else:
        raise BootError(f"bad ELF class {elf_class}")
    if len(data) < ehdr.size:
        raise BootError(f"ELF header truncated ({len(data)} bytes)")
    (_, e_type, machine, _version, entry, phoff, _shoff, _flags, _ehsize,
     phentsize, phnum, _shentsize, _shnum, _shstrndx) = ehdr.unpack_from(data, 0)
    if e_type not in (ET_EXEC, ET_DYN):
        raise BootError(f"ELF type {e_type} is not an executable")
    if machine not in (EM_X86_64, EM_386):
        raise BootError(f"ELF machine {machine} is not x86")
    if elf_class == ELFCLASS64 and machine != EM_X86_64:
        raise BootError("ELF64 file is not for x86_64")
    if phnum == 0:
        raise BootError("ELF file has no program headers")
    if phnum == PN_XNUM:
        raise BootError("ELF files with more than 65534 program headers are not supported")
    if phentsize < phdr.size:
        raise BootError(f"ELF program header size {phentsize} < {phdr.size}")
    if phoff + phnum * phentsize > len(data):
        raise BootError(f"ELF program headers ({phnum} at {phoff:#x}) run past the end of the file")
    segments = []
    for i in range(phnum):
        if elf_class == ELFCLASS64:
            p_type, flags, offset, vaddr, paddr, filesz, memsz, _align = phdr.unpack_from(
                data, phoff + i * phentsize)
        else:
            p_type, offset, vaddr, paddr, filesz, memsz, flags, _align = phdr.unpack_from(
                data, phoff + i * phentsize)
        if p_type != PT_LOAD:
            continue
        if filesz > memsz:
            raise BootError(f"ELF segment {i}: filesz {filesz:#x} > memsz {memsz:#x}")
        if offset + filesz > len(data):
            raise BootError(f"ELF segment {i}: file range {offset:#x}+{filesz:#x} "
                            f"runs past the end of the file ({len(data):#x})")
        segments.append(Segment(offset, vaddr, paddr, filesz, memsz, flags))
    if not segments:
        raise BootError("ELF file has no PT_LOAD segment")
    return ElfImage(elf_class, machine, entry, tuple(segments))


def check_fits(mem, image: ElfImage) -> None:
    """BootError unless every segment lies wholly inside guest RAM."""
    for s in image.segments:
        if s.memsz and not mem.layout.contains(s.paddr, s.memsz):
            raise BootError(f"ELF segment at {s.paddr:#x}+{s.memsz:#x} is not inside guest RAM")


def load_segments(mem, data: bytes, image: ElfImage) -> None:
    check_fits(mem, image)
    data = memoryview(data)
    for s in image.segments:
        mem.write(s.paddr, data[s.offset:s.offset + s.filesz])
        bss = s.memsz - s.filesz
        if bss:
            mem.write(s.paddr + s.filesz, bytes(bss))


def load_elf(mem, data: bytes) -> int:
    """Load the PT_LOAD segments at their physical addresses, zero-filling
    memsz beyond filesz. Returns the physical entry point."""
    image = parse_elf(data)
    load_segments(mem, data, image)
    return image.entry_physical()
