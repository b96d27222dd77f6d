"""The driver (guest) side of split virtqueues (virtio 1.x, 2.7), over guest memory.

Everything here is what a guest driver writes and reads in its own RAM:
descriptor table, driver area (avail ring + used_event), device area (used
ring + avail_event). No I/O: kicking and interrupts belong to the transport
(tests.harness.driver). The raw helpers (write_desc, publish_head) let tests
build malformed chains on purpose.
"""

from __future__ import annotations

import struct
import threading

from devices.virtio.queue import memory_barrier

VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTQ_DESC_F_INDIRECT = 4
VIRTQ_USED_F_NO_NOTIFY = 1
VIRTQ_AVAIL_F_NO_INTERRUPT = 1

DESC_SIZE = 16
_DESC = struct.Struct("<QIHH")
_U16 = struct.Struct("<H")
_USED_ELEM = struct.Struct("<II")

Segment = tuple[int, int]  # (guest-physical address, length)


def ring_sizes(size: int) -> tuple[int, int, int]:
    """Bytes of the descriptor table, avail area and used area (with event-idx trailers)."""
    return DESC_SIZE * size, 6 + 2 * size, 6 + 8 * size


def vring_need_event(event_idx: int, new_idx: int, old: int) -> bool:
    return ((new_idx - event_idx - 1) & 0xFFFF) < ((new_idx - old) & 0xFFFF)


class OutOfGuestMemory(MemoryError):
    pass


class GuestAllocator:
    """A bump allocator of guest-physical memory in [base, end) (what a guest's
    kernel would hand its driver). free_all() forgets every allocation."""

    def __init__(self, base: int, end: int):
        if not 0 <= base < end:
            raise ValueError("empty allocator range")
        self.base, self.end = base, end
        self._next = base
        self._lock = threading.Lock()

    def alloc(self, size: int, align: int = 16) -> int:
        if size <= 0 or align <= 0 or align & (align - 1):
            raise ValueError(f"bad allocation size {size} / alignment {align}")
        with self._lock:
            gpa = (self._next + align - 1) & ~(align - 1)
            if gpa + size > self.end:
                raise OutOfGuestMemory(f"no {size} bytes left in guest memory "
                                       f"{self.base:#x}-{self.end:#x}")
            self._next = gpa + size
            return gpa

    @property
    def used(self) -> int:
        return self._next - self.base

    def mark(self) -> int:
        return self._next

    def release_to(self, mark: int) -> None:
        """Free everything allocated after mark() returned `mark`."""
        with self._lock:
            if self.base <= mark <= self._next:
                self._next = mark

    def free_all(self) -> None:
        with self._lock:
            self._next = self.base


class DriverQueue:
    """One split virtqueue as the driver sees it.

    `mem` is a vmmd.guest_memory.GuestMemory (anything with view(gpa, n)).
    Chains are added with add() (descriptors written, nothing visible to the
    device), made available with publish(), and reclaimed from the used ring
    by get_used().
    """

    def __init__(self, mem, size: int, desc_gpa: int, avail_gpa: int, used_gpa: int, *,
                 event_idx: bool = False, indirect: bool = False, allocator: GuestAllocator | None = None):
        if not 1 <= size <= 32768 or size & (size - 1):
            raise ValueError(f"queue size {size} is not a power of 2")
        self.mem = mem
        self.size = size
        self.desc_gpa, self.avail_gpa, self.used_gpa = desc_gpa, avail_gpa, used_gpa
        self.event_idx = event_idx
        self.indirect = indirect
        self.allocator = allocator
        dsize, asize, usize = ring_sizes(size)
        self._desc = mem.view(desc_gpa, dsize)
        self._avail = mem.view(avail_gpa, asize)
        self._used = mem.view(used_gpa, usize)
        self.reset_rings()

    @classmethod
    def allocate(cls, mem, allocator: GuestAllocator, size: int, **kw) -> "DriverQueue":
        """Rings from `allocator` with the spec's alignments (16 / 2 / 4; we use 4096 / 64 / 64)."""
        dsize, asize, usize = ring_sizes(size)
        desc = allocator.alloc(dsize, 4096)
        avail = allocator.alloc(asize, 64)
        used = allocator.alloc(usize, 64)
        return cls(mem, size, desc, avail, used, allocator=allocator, **kw)

    def reset_rings(self) -> None:
        """Zero the rings and forget every chain (after a device reset)."""
        self._desc[:] = bytes(len(self._desc))
        self._avail[:] = bytes(len(self._avail))
        self._used[:] = bytes(len(self._used))
        self._free = list(range(self.size))
        self._chains: dict[int, list[int]] = {}   # head -> descriptor indices
        self.avail_idx = 0          # our next avail idx (free-running u16)
        self.last_used_idx = 0      # next used entry we will read
        self.kicked_avail = 0       # avail idx at the last need_kick()

    # --- adding buffers ----------------------------------------------------------------

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def in_flight(self) -> int:
        return len(self._chains)

    def add(self, readable: list[Segment], writable: list[Segment], *, indirect: bool = False) -> int:
        """Write a chain (readable segments first); returns its head. Not yet published."""
        segs = [(a, n, 0) for a, n in readable] + [(a, n, VIRTQ_DESC_F_WRITE) for a, n in writable]
        if not segs:
            raise ValueError("a chain needs at least one buffer")
        if indirect:
            if self.allocator is None:
                raise ValueError("indirect chains need an allocator")
            table = self.allocator.alloc(DESC_SIZE * len(segs), 16)
            view = self.mem.view(table, DESC_SIZE * len(segs))
            for i, (a, n, f) in enumerate(segs):
                last = i == len(segs) - 1
                _DESC.pack_into(view, i * DESC_SIZE, a, n, f | (0 if last else VIRTQ_DESC_F_NEXT),
                                0 if last else i + 1)
            segs = [(table, DESC_SIZE * len(segs), VIRTQ_DESC_F_INDIRECT)]
        if len(segs) > len(self._free):
            raise RuntimeError(f"queue full: {len(segs)} descriptors wanted, {len(self._free)} free")
        idxs = [self._free.pop() for _ in segs]
        desc = self._desc
        for i, (a, n, f) in enumerate(segs):
            if i + 1 < len(segs):
                _DESC.pack_into(desc, idxs[i] * DESC_SIZE, a, n, f | VIRTQ_DESC_F_NEXT, idxs[i + 1])
            else:
                _DESC.pack_into(desc, idxs[i] * DESC_SIZE, a, n, f, 0)
        self._chains[idxs[0]] = idxs
        return idxs[0]

    def publish(self, head: int) -> None:
        """Make chain `head` available (ring entry first, then the index)."""
        _U16.pack_into(self._avail, 4 + 2 * (self.avail_idx % self.size), head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        _U16.pack_into(self._avail, 2, self.avail_idx)

    def submit(self, readable: list[Segment], writable: list[Segment], *, indirect: bool = False) -> int:
        head = self.add(readable, writable, indirect=indirect)
        self.publish(head)
        return head

    # --- raw access for malformed chains -----------------------------------------------------

    def take_descriptors(self, n: int) -> list[int]:
        """Reserve n descriptor slots for hand-written chains (tracked under their first)."""
        if n > len(self._free):
            raise RuntimeError("queue full")
        idxs = [self._free.pop() for _ in range(n)]
        self._chains[idxs[0]] = idxs
        return idxs

    def write_desc(self, i: int, addr: int, length: int, flags: int, next_: int) -> None:
        _DESC.pack_into(self._desc, i * DESC_SIZE, addr & (2**64 - 1), length & 0xFFFFFFFF,
                        flags & 0xFFFF, next_ & 0xFFFF)

    def read_desc(self, i: int) -> tuple[int, int, int, int]:
        return _DESC.unpack_from(self._desc, i * DESC_SIZE)

    def publish_head(self, head: int) -> None:
        """Publish any u16 as an avail entry (it need not be a valid head)."""
        self.publish(head & 0xFFFF)

    def set_avail_idx(self, idx: int) -> None:
        """Write avail->idx directly (e.g. run it more than `size` ahead)."""
        self.avail_idx = idx & 0xFFFF
        _U16.pack_into(self._avail, 2, self.avail_idx)

    # --- notifications -----------------------------------------------------------------------

    def need_kick(self) -> bool:
        """Whether the device wants a notification for what was published since
        the previous call (avail_event with EVENT_IDX, else VIRTQ_USED_F_NO_NOTIFY)."""
        new, old = self.avail_idx, self.kicked_avail
        self.kicked_avail = new
        if new == old:
            return False
        memory_barrier()   # the avail idx store before the avail_event load (virtio_mb)
        if self.event_idx:
            avail_event = _U16.unpack_from(self._used, 4 + 8 * self.size)[0]
            return vring_need_event(avail_event, new, old)
        return not _U16.unpack_from(self._used, 0)[0] & VIRTQ_USED_F_NO_NOTIFY

    def notification_fields(self) -> str:
        return (f"avail_event {_U16.unpack_from(self._used, 4 + 8 * self.size)[0]}, used_event "
                f"{_U16.unpack_from(self._avail, 4 + 2 * self.size)[0]}, avail flags "
                f"{_U16.unpack_from(self._avail, 0)[0]:#x}")

    def enable_interrupts(self) -> None:
        """Ask for an interrupt at the next used entry."""
        if self.event_idx:
            _U16.pack_into(self._avail, 4 + 2 * self.size, self.last_used_idx)
        else:
            _U16.pack_into(self._avail, 0, 0)
        memory_barrier()   # before the caller reads the used idx again

    def disable_interrupts(self) -> None:
        if not self.event_idx:
            _U16.pack_into(self._avail, 0, VIRTQ_AVAIL_F_NO_INTERRUPT)
        # with EVENT_IDX the driver just leaves used_event behind

    # --- completions --------------------------------------------------------------------------

    def used_idx(self) -> int:
        return _U16.unpack_from(self._used, 2)[0]

    def used_flags(self) -> int:
        return _U16.unpack_from(self._used, 0)[0]

    def has_used(self) -> bool:
        return _U16.unpack_from(self._used, 2)[0] != self.last_used_idx

    def get_used(self) -> list[tuple[int, int]]:
        """New used elements (head, written length); their descriptors are freed.

        A used element naming a head we never published is returned as is
        (and frees nothing): the caller decides what that means."""
        out = []
        idx = _U16.unpack_from(self._used, 2)[0]
        last = self.last_used_idx
        used, size = self._used, self.size
        while last != idx:
            head, length = _USED_ELEM.unpack_from(used, 4 + 8 * (last % size))
            last = (last + 1) & 0xFFFF
            chain = self._chains.pop(head, None)
            if chain is not None:
                self._free.extend(chain)
            out.append((head, length))
        self.last_used_idx = last
        return out

    def heads_in_flight(self) -> list[int]:
        return list(self._chains)
