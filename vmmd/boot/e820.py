"""The e820 memory map (BIOS INT 15h/E820) for a MemoryLayout. Sans-I/O.

Low RAM is split around the EBDA and the BIOS area like a PC's:
  [0, 0x9fc00) RAM, [0x9fc00, 0xa0000) reserved, [0xf0000, 0x100000) reserved,
  [0x100000, end of low RAM) RAM, then every other region (above 4 GiB) RAM.
The VGA hole [0xa0000, 0xf0000) and the PCI hole (IOAPIC, LAPIC) are simply
absent.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from vmmd.boot import BIOS_END, BIOS_START, EBDA_END, EBDA_START, BootError

E820_RAM = 1
E820_RESERVED = 2
E820_ACPI = 3
E820_NVS = 4
E820_MAX_ENTRIES = 128  # slots in boot_params.e820_table
ENTRY = struct.Struct("<QQI")  # addr, size, type: 20 bytes, packed


@dataclass(frozen=True)
class E820Entry:
    addr: int
    size: int
    type: int

    @property
    def end(self) -> int:
        return self.addr + self.size


def build_e820(layout) -> list[E820Entry]:
    """The map for a MemoryLayout whose first region starts at 0."""
    regions = sorted(layout.regions, key=lambda r: r.gpa)
    low = regions[0]
    if low.gpa != 0 or low.size < BIOS_END:
        raise BootError("guest RAM must start at 0 and cover at least the first 1 MiB")
    entries = [
        E820Entry(0, EBDA_START, E820_RAM),
        E820Entry(EBDA_START, EBDA_END - EBDA_START, E820_RESERVED),
        E820Entry(BIOS_START, BIOS_END - BIOS_START, E820_RESERVED),
    ]
    if low.end > BIOS_END:
        entries.append(E820Entry(BIOS_END, low.end - BIOS_END, E820_RAM))
    for r in regions[1:]:
        entries.append(E820Entry(r.gpa, r.size, E820_RAM))
    if len(entries) > E820_MAX_ENTRIES:
        raise BootError(f"{len(entries)} e820 entries do not fit boot_params")
    return entries


def pack_e820(entries) -> bytes:
    return b"".join(ENTRY.pack(e.addr, e.size, e.type) for e in entries)


def unpack_e820(data: bytes, count: int) -> list[E820Entry]:
    return [E820Entry(*ENTRY.unpack_from(data, i * ENTRY.size)) for i in range(count)]
