"""BAR decoding: register values read back from a device -> address windows.

Pure logic. vmmd masks every value with the declared size itself (the
device is untrusted). A BAR is *not* mapped when its decoding is off in
COMMAND (bit 0 I/O, bit 1 memory), when it is zero (unassigned), when it
holds a sizing probe (the guest wrote all-ones: the address bits read back
all set), or when it would run past the end of its address space.
"""

from __future__ import annotations

from dataclasses import dataclass

from bus.pci_info import Bar
from bus.types import IoSpace

COMMAND = 0x04
STATUS = 0x06
BAR0 = 0x10
BAR_END = 0x28  # BAR0..BAR5
CMD_IO = 1 << 0
CMD_MEMORY = 1 << 1
IO_SPACE_END = 0x10000
U32 = 0xFFFFFFFF
U64 = (1 << 64) - 1


@dataclass(frozen=True)
class BarWindow:
    index: int
    kind: str
    base: int
    size: int

    @property
    def space(self) -> IoSpace:
        return IoSpace.PIO if self.kind == "io" else IoSpace.MMIO

    @property
    def end(self) -> int:
        return self.base + self.size


def bar_register(index: int) -> int:
    return BAR0 + 4 * index


def registers_of(bars) -> list[int]:
    """The BAR register indices (0..5) a declaration uses (64-bit BARs use two)."""
    out = []
    for b in bars:
        out.append(b.index)
        if b.is_64:
            out.append(b.index + 1)
    return sorted(out)


def decode_bar(bar: Bar, regs: dict[int, int], command: int) -> BarWindow | None:
    """The window BAR `bar` decodes now, or None."""
    lo = regs.get(bar.index, 0) & U32
    size = bar.size
    if bar.is_io:
        if not command & CMD_IO:
            return None
        base = lo & ~0x3 & ~(size - 1) & U32
        if base == 0 or base + size > IO_SPACE_END:
            return None  # unassigned, or all-ones probe (upper bits set)
        return BarWindow(bar.index, bar.kind, base, size)
    if not command & CMD_MEMORY:
        return None
    if bar.is_64:
        hi = regs.get(bar.index + 1, 0) & U32
        full = hi << 32 | lo
        base = full & ~0xF & ~(size - 1) & U64
        probe = (hi == U32 or (full | (size - 1) | 0xF) == U64
                 or (size < 1 << 32 and (lo | (size - 1) | 0xF) & U32 == U32))
        limit = 1 << 64
    else:
        base = lo & ~0xF & ~(size - 1) & U32
        probe = (lo | (size - 1) | 0xF) & U32 == U32
        limit = 1 << 32
    if base == 0 or probe or base + size > limit:
        return None
    return BarWindow(bar.index, bar.kind, base, size)


def decode_bars(bars, regs: dict[int, int], command: int) -> list[BarWindow]:
    out = []
    for bar in bars:
        w = decode_bar(bar, regs, command)
        if w is not None:
            out.append(w)
    return out


def touches(reg: int, size: int, start: int, end: int) -> bool:
    """Whether a config access [reg, reg+size) overlaps [start, end)."""
    return reg < end and start < reg + size
