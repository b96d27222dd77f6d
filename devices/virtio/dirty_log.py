"""The device dirty log: which guest pages a device process wrote.

Format (docs/architecture.md, "Device dirty log"): a memfd holding

    offset 0   u32 magic (MAGIC, b"VDLG" little-endian)
           4   u32 version (1)
           8   u32 active buffer index (0 or 1)
          12   u32 page_shift (12)
          16   u64 pages
          24.. reserved, zero, up to HEADER_SIZE = 64
    then bitmap 0 and bitmap 1, each bitmap_bytes(pages) bytes:
    ceil(pages / 64) little-endian u64 words; page p is bit p % 64 of word
    p // 64 (= bit p % 8 of byte p // 8, the KVM dirty-log bit order).

Bit index = guest-physical page number (gpa >> 12), so with the PC memory
layout the log is sized by the highest guest-physical page, layout.end >> 12
(see DirtyLog.for_layout); the hole below 4 GiB just never gets bits.

Protocol: the device sets bits in the active buffer *after* each write to
guest memory has completed (DeviceMemory does this). vmmd harvests with

    old = log.flip()                 # new writes go to the other buffer
    CONTROL dirty_sync to the device # device: log.sync(), then reply
    pages = log.harvest(old)         # read and clear the old buffer

sync() is a barrier: a mark() that read the old index holds the mark lock
until its bits are set, so once sync() has taken and released the lock no
writer can still touch the old buffer. A mark is therefore either in the
harvested set or in the new active buffer, for the next harvest. (A device
serving the bus from one thread is already ordered; the lock makes threaded
writers, e.g. I/O worker threads, safe too. It is uncontended in the common
case.)
"""

from __future__ import annotations

import mmap
import os
import struct
import threading

import numpy as np

MAGIC = int.from_bytes(b"VDLG", "little")
VERSION = 1
HEADER_SIZE = 64
PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
MAX_PAGES = 1 << 40  # 4 EiB of guest-physical space: anything larger is garbage
_HEADER = struct.Struct("<IIIIQ")
_ACTIVE_WORD = 2  # index of the active-buffer u32 in the header


class DirtyLogError(ValueError):
    """The dirty-log memfd is malformed or too small."""


def bitmap_bytes(pages: int) -> int:
    return ((pages + 63) // 64) * 8


def file_size(pages: int) -> int:
    return HEADER_SIZE + 2 * bitmap_bytes(pages)


class DirtyLog:
    """One mapping of a dirty-log memfd (vmmd creates it, the device maps it)."""

    def __init__(self, fd: int, *, owns_fd: bool = True):
        try:
            st_size = os.fstat(fd).st_size
        except OSError as exc:
            raise DirtyLogError(f"dirty log fd {fd}: {exc}") from None
        if st_size < HEADER_SIZE:
            raise DirtyLogError(f"dirty log is {st_size} bytes, smaller than its header")
        with mmap.mmap(fd, HEADER_SIZE, mmap.MAP_SHARED, mmap.PROT_READ) as hm:
            magic, version, active, shift, pages = _HEADER.unpack_from(hm, 0)
        if magic != MAGIC:
            raise DirtyLogError(f"bad dirty log magic {magic:#x}")
        if version != VERSION:
            raise DirtyLogError(f"unsupported dirty log version {version}")
        if shift != PAGE_SHIFT:
            raise DirtyLogError(f"unsupported dirty log page_shift {shift}")
        if not 0 < pages <= MAX_PAGES:
            raise DirtyLogError(f"bad dirty log page count {pages}")
        if active not in (0, 1):
            raise DirtyLogError(f"bad active buffer index {active}")
        size = file_size(pages)
        if st_size < size:
            raise DirtyLogError(f"dirty log is {st_size} bytes, needs {size} for {pages} pages")
        self.fd = fd
        self.pages = pages
        self._owns_fd = owns_fd
        self._map = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self._mv = memoryview(self._map)
        self._hdr = self._mv[:HEADER_SIZE].cast("I")
        nbytes = bitmap_bytes(pages)
        self._offsets = (HEADER_SIZE, HEADER_SIZE + nbytes)
        self._bytes = tuple(np.frombuffer(self._map, dtype=np.uint8, count=nbytes, offset=o)
                            for o in self._offsets)
        self._words = tuple(b.view("<u8") for b in self._bytes)
        self._lock = threading.Lock()
        self._acquire, self._release = self._lock.acquire, self._lock.release

    # --- construction ----------------------------------------------------------

    @classmethod
    def create(cls, pages: int, name: str = "vmmd-dirty-log") -> "DirtyLog":
        """vmmd side: a fresh memfd for `pages` pages, buffer 0 active."""
        if type(pages) is not int or not 0 < pages <= MAX_PAGES:
            raise DirtyLogError(f"bad page count {pages!r}")
        fd = os.memfd_create(name, os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, file_size(pages))
            os.pwrite(fd, _HEADER.pack(MAGIC, VERSION, 0, PAGE_SHIFT, pages), 0)
            return cls(fd)
        except BaseException:
            os.close(fd)
            raise

    @classmethod
    def for_layout(cls, layout) -> "DirtyLog":
        """A log covering every guest-physical page of a MemoryLayout."""
        return cls.create(-(-layout.end >> PAGE_SHIFT))

    @classmethod
    def from_fd(cls, fd: int, *, owns_fd: bool = True) -> "DirtyLog":
        """Device side: map and validate a memfd received from vmmd."""
        return cls(fd, owns_fd=owns_fd)

    # --- device side --------------------------------------------------------------

    @property
    def active(self) -> int:
        return self._hdr[_ACTIVE_WORD] & 1

    def mark(self, gpa: int, length: int) -> None:
        """Set the bits of every page in [gpa, gpa+length) in the active buffer.

        Call it after the write to guest memory has completed."""
        if length <= 0 or gpa < 0:
            return
        first = gpa >> PAGE_SHIFT
        last = (gpa + length - 1) >> PAGE_SHIFT
        if last >= self.pages:
            last = self.pages - 1
            if first > last:
                return
        self._acquire()
        try:
            base = self._offsets[self._hdr[_ACTIVE_WORD] & 1]
            if first == last:
                i = base + (first >> 3)
                self._mv[i] |= 1 << (first & 7)
            else:
                self._set_range(base, first, last)
        finally:
            self._release()

    def _set_range(self, base: int, first: int, last: int) -> None:
        a, b = first >> 3, last >> 3
        mv = self._mv
        lo_mask = (0xFF << (first & 7)) & 0xFF
        hi_mask = 0xFF >> (7 - (last & 7))
        if a == b:
            mv[base + a] |= lo_mask & hi_mask
            return
        mv[base + a] |= lo_mask
        mv[base + b] |= hi_mask
        if b - a > 1:
            buf = self._bytes[0 if base == self._offsets[0] else 1]
            buf[a + 1:b] = 0xFF

    def sync(self) -> None:
        """Barrier for CONTROL dirty_sync: returns once no mark() that could
        have read the previous active index is still setting bits."""
        self._acquire()
        self._release()

    # --- vmmd side ------------------------------------------------------------------

    def flip(self) -> int:
        """Make the other buffer active; returns the now-inactive index."""
        old = self._hdr[_ACTIVE_WORD] & 1
        self._hdr[_ACTIVE_WORD] = old ^ 1
        return old

    def bitmap(self, index: int) -> np.ndarray:
        """The live bitmap `index` as a uint8 array (a view, not a copy)."""
        return self._bytes[self._check_index(index)]

    def harvest_bitmap(self, index: int) -> np.ndarray:
        """A copy of bitmap `index` (uint8, KVM bit order), which is then cleared."""
        buf = self._bytes[self._check_index(index)]
        out = buf.copy()
        buf[:] = 0
        return out

    def harvest(self, index: int) -> np.ndarray:
        """Sorted dirty page numbers (uint64) of buffer `index`, which is cleared.

        Only call it for the inactive buffer, after the device's sync()."""
        words = self._words[self._check_index(index)]
        nz = np.flatnonzero(words)
        if nz.size == 0:
            return np.empty(0, dtype=np.uint64)
        chunk = words[nz].copy()
        words[nz] = 0
        bits = np.unpackbits(chunk.view(np.uint8), bitorder="little").reshape(-1, 64)
        rows, cols = np.nonzero(bits)
        pages = nz[rows].astype(np.uint64) * np.uint64(64) + cols.astype(np.uint64)
        return pages[pages < self.pages]

    def dirty_count(self, index: int) -> int:
        return int(np.unpackbits(self._bytes[self._check_index(index)]).sum())

    @staticmethod
    def _check_index(index: int) -> int:
        if index not in (0, 1):
            raise DirtyLogError(f"buffer index must be 0 or 1, not {index!r}")
        return index

    def close(self) -> None:
        self._words = self._bytes = ()
        self._hdr.release()
        self._mv.release()
        try:
            self._map.close()
        except BufferError:
            pass  # someone still holds a harvested view
        if self._owns_fd:
            os.close(self.fd)
            self._owns_fd = False
