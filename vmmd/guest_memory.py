"""Guest RAM: one memfd, mapped shared, addressed by guest-physical address.

vmmd creates it; device processes that need guest memory map the same memfd
(received as an fd) with the same layout. Every access is bounds-checked: an
address range that is not wholly inside one RAM region raises
GuestMemoryError, so a hostile descriptor can never reach outside guest RAM.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import struct
from dataclasses import dataclass

GiB = 1 << 30
PCI_HOLE_START = 3 * GiB  # RAM below the 32-bit PCI hole
HIGH_RAM_START = 4 * GiB  # RAM above it
PAGE_SIZE = 4096

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]


class GuestMemoryError(Exception):
    """An access outside guest RAM, or a malformed layout."""


@dataclass(frozen=True)
class MemoryRegion:
    gpa: int
    size: int
    offset: int  # offset into the memfd

    @property
    def end(self) -> int:
        return self.gpa + self.size


@dataclass(frozen=True)
class MemoryLayout:
    regions: tuple[MemoryRegion, ...]

    @classmethod
    def pc(cls, total_size: int) -> "MemoryLayout":
        if total_size <= 0 or total_size % PAGE_SIZE:
            raise GuestMemoryError(f"memory size {total_size} is not a positive multiple of 4 KiB")
        low = min(total_size, PCI_HOLE_START)
        regions = [MemoryRegion(0, low, 0)]
        if total_size > low:
            regions.append(MemoryRegion(HIGH_RAM_START, total_size - low, low))
        return cls(tuple(regions))

    @property
    def total_size(self) -> int:
        return sum(r.size for r in self.regions)

    @property
    def end(self) -> int:
        """One past the highest guest-physical RAM address."""
        return max(r.end for r in self.regions)

    def to_wire(self) -> list[list[int]]:
        return [[r.gpa, r.size, r.offset] for r in self.regions]

    @classmethod
    def from_wire(cls, obj) -> "MemoryLayout":
        """Validate a layout received from another process."""
        if not isinstance(obj, (list, tuple)) or not 1 <= len(obj) <= 16:
            raise GuestMemoryError("layout must be a list of 1..16 regions")
        regions = []
        for item in obj:
            if (not isinstance(item, (list, tuple)) or len(item) != 3
                    or not all(type(v) is int and 0 <= v < 1 << 52 for v in item)):
                raise GuestMemoryError(f"bad region {item!r}")
            gpa, size, offset = item
            if size <= 0 or gpa % PAGE_SIZE or size % PAGE_SIZE or offset % PAGE_SIZE:
                raise GuestMemoryError(f"region {item!r} not page aligned or empty")
            regions.append(MemoryRegion(gpa, size, offset))
        regions.sort(key=lambda r: r.gpa)
        for a, b in zip(regions, regions[1:]):
            if a.end > b.gpa:
                raise GuestMemoryError("regions overlap")
        return cls(tuple(regions))

    def region_for(self, gpa: int, length: int) -> MemoryRegion:
        for r in self.regions:
            if r.gpa <= gpa and gpa + length <= r.end:
                return r
        raise GuestMemoryError(f"guest range {gpa:#x}+{length:#x} is not inside guest RAM")

    def contains(self, gpa: int, length: int = 1) -> bool:
        return any(r.gpa <= gpa and gpa + length <= r.end for r in self.regions)


class GuestMemory:
    """The memfd-backed guest RAM with bounds-checked accessors."""

    def __init__(self, fd: int, layout: MemoryLayout, *, owns_fd: bool = True):
        self.fd = fd
        self.layout = layout
        self.size = layout.total_size
        if os.fstat(fd).st_size < self.size:
            raise GuestMemoryError("memfd is smaller than the layout")
        self._map = mmap.mmap(fd, self.size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self._view = memoryview(self._map)
        self._owns_fd = owns_fd
        self._base = ctypes.addressof(ctypes.c_char.from_buffer(self._map))

    @classmethod
    def create(cls, size: int, name: str = "vmmd-guest-ram") -> "GuestMemory":
        layout = MemoryLayout.pc(size)
        fd = os.memfd_create(name, os.MFD_CLOEXEC)
        os.ftruncate(fd, size)
        return cls(fd, layout)

    @classmethod
    def from_fd(cls, fd: int, layout: MemoryLayout) -> "GuestMemory":
        return cls(fd, layout)

    def _offset(self, gpa: int, length: int) -> int:
        if gpa < 0 or length < 0:
            raise GuestMemoryError(f"negative guest range {gpa:#x}+{length:#x}")
        r = self.layout.region_for(gpa, length)
        return r.offset + (gpa - r.gpa)

    def view(self, gpa: int, length: int) -> memoryview:
        off = self._offset(gpa, length)
        return self._view[off:off + length]

    def read(self, gpa: int, length: int) -> bytes:
        return bytes(self.view(gpa, length))

    def write(self, gpa: int, data) -> None:
        self.view(gpa, len(data))[:] = data

    def read_u8(self, gpa: int) -> int:
        return self._view[self._offset(gpa, 1)]

    def read_u16(self, gpa: int) -> int:
        return struct.unpack_from("<H", self._map, self._offset(gpa, 2))[0]

    def read_u32(self, gpa: int) -> int:
        return struct.unpack_from("<I", self._map, self._offset(gpa, 4))[0]

    def read_u64(self, gpa: int) -> int:
        return struct.unpack_from("<Q", self._map, self._offset(gpa, 8))[0]

    def write_u8(self, gpa: int, value: int) -> None:
        self._view[self._offset(gpa, 1)] = value

    def write_u16(self, gpa: int, value: int) -> None:
        struct.pack_into("<H", self._map, self._offset(gpa, 2), value)

    def write_u32(self, gpa: int, value: int) -> None:
        struct.pack_into("<I", self._map, self._offset(gpa, 4), value)

    def write_u64(self, gpa: int, value: int) -> None:
        struct.pack_into("<Q", self._map, self._offset(gpa, 8), value)

    def host_address(self, region: MemoryRegion) -> int:
        """Host virtual address of a region, for KVM_SET_USER_MEMORY_REGION."""
        return self._base + region.offset

    def punch_hole(self, gpa: int, length: int) -> None:
        """Give the backing pages of a guest range back to the host."""
        off = self._offset(gpa, length)
        if _libc.fallocate(self.fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, off, length) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))

    def clear(self) -> None:
        """Zero all of guest RAM (as on a cold reset) and free its pages."""
        if _libc.fallocate(self.fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, 0, self.size) != 0:
            self._view[:] = bytes(self.size)

    def allocated_bytes(self) -> int:
        return os.fstat(self.fd).st_blocks * 512

    def close(self) -> None:
        self._view.release()
        try:
            self._map.close()
        except BufferError:
            pass  # a live view elsewhere; the mapping goes with the process
        if self._owns_fd:
            os.close(self.fd)
