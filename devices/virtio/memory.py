"""DeviceMemory: guest RAM as a device sees it.

Every access is bounds-checked by vmmd.guest_memory.GuestMemory (a range not
wholly inside one RAM region raises GuestMemoryError), and every write marks
its pages in the device dirty log (when the device has one) after the data is
in place. Zero-copy writers (preadv into writable_view()) must call
mark_dirty() themselves once the write has completed.
"""

from __future__ import annotations

from vmmd.guest_memory import GuestMemory, GuestMemoryError

from devices.virtio.dirty_log import DirtyLog

__all__ = ["DeviceMemory", "GuestMemoryError"]


class DeviceMemory:
    def __init__(self, guest: GuestMemory, dirty_log: DirtyLog | None = None):
        self.guest = guest
        self.dirty_log = dirty_log
        self._mark = dirty_log.mark if dirty_log is not None else None

    @property
    def layout(self):
        return self.guest.layout

    def contains(self, gpa: int, length: int) -> bool:
        return gpa >= 0 and length >= 0 and self.guest.layout.contains(gpa, length)

    # --- reads --------------------------------------------------------------------

    def read(self, gpa: int, length: int) -> bytes:
        return self.guest.read(gpa, length)

    def view(self, gpa: int, length: int) -> memoryview:
        """A read-only view of guest memory (the guest may change it under you)."""
        return self.guest.view(gpa, length).toreadonly()

    def read_u16(self, gpa: int) -> int:
        return self.guest.read_u16(gpa)

    def read_u32(self, gpa: int) -> int:
        return self.guest.read_u32(gpa)

    def read_u64(self, gpa: int) -> int:
        return self.guest.read_u64(gpa)

    # --- writes (logged) -------------------------------------------------------------

    def write(self, gpa: int, data) -> None:
        n = len(data) if not isinstance(data, memoryview) else data.nbytes
        self.guest.view(gpa, n)[:] = data
        if self._mark is not None:
            self._mark(gpa, n)

    def write_u16(self, gpa: int, value: int) -> None:
        self.guest.write_u16(gpa, value)
        if self._mark is not None:
            self._mark(gpa, 2)

    def write_u32(self, gpa: int, value: int) -> None:
        self.guest.write_u32(gpa, value)
        if self._mark is not None:
            self._mark(gpa, 4)

    def write_u64(self, gpa: int, value: int) -> None:
        self.guest.write_u64(gpa, value)
        if self._mark is not None:
            self._mark(gpa, 8)

    def writable_view(self, gpa: int, length: int) -> memoryview:
        """A writable view for zero-copy I/O; call mark_dirty(gpa, length)
        after the data has been written into it."""
        return self.guest.view(gpa, length)

    def mark_dirty(self, gpa: int, length: int) -> None:
        if self._mark is not None:
            self._mark(gpa, length)
