"""Split virtqueues (virtio 1.x, 2.7), parsed and validated over DeviceMemory.

Everything the guest wrote is hostile input. pop() either returns a fully
validated DescriptorChain, or raises

  ChainError(head)  one chain is malformed; the ring itself is fine. The
                    device completes it (push_used(err.head, 0), with an
                    error status where it can) and carries on.
  QueueError        the ring is broken (avail idx ran more than `size` ahead,
                    a head index >= size, rings outside guest RAM): nothing
                    can be completed reliably; the device sets NEEDS_RESET.

No access ever leaves guest RAM: the rings are checked when the queue is
created, every buffer before it is handed out, and the chain helpers go
through DeviceMemory (GuestMemoryError is the last line of defence).

Validation rules of a chain (each violation is a ChainError):
  * every descriptor's next < table size; more than `size` descriptors in the
    direct table (or more than n in an indirect table of n) = loop;
  * the number of buffer descriptors (indirect pointers not counted) is at
    most max_chain_len (default: the queue size);
  * zero-length buffer descriptors are rejected (they are never needed, and
    the issue lists them as malformed);
  * every buffer [addr, addr+len) lies wholly inside one guest RAM region;
  * device-readable descriptors come before device-writable ones;
  * VIRTQ_DESC_F_INDIRECT: only if RING_INDIRECT_DESC was negotiated, never
    together with NEXT, never inside an indirect table, table length a
    non-zero multiple of 16 with at most max_chain_len entries, table inside
    guest RAM. An indirect descriptor may end a direct chain (normally it is
    the head); its WRITE flag is ignored, as the spec says.
The guest may change the descriptor table while we parse it: each descriptor
(and an indirect table as a whole) is read exactly once, so what is validated
is what is used.
"""

from __future__ import annotations

import struct
import threading
from typing import Callable, Iterator

from vmmd.guest_memory import GuestMemoryError

from devices.virtio.features import (
    MAX_QUEUE_SIZE, VIRTQ_AVAIL_F_NO_INTERRUPT, VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE, VIRTQ_USED_F_NO_NOTIFY)
from devices.virtio.memory import DeviceMemory

__all__ = ["QueueError", "ChainError", "DescriptorChain", "SplitQueue", "vring_need_event",
           "ring_sizes"]

DESC_SIZE = 16
_DESC = struct.Struct("<QIHH")
_U16 = struct.Struct("<H")
_USED_ELEM = struct.Struct("<II")

# A full memory barrier (lock cmpxchg) between publishing the used index and
# reading the driver's used_event / flags, and between publishing avail_event
# and re-reading the avail index: x86 may otherwise let the load pass the store.
_barrier_lock = threading.Lock()
_barrier_acquire, _barrier_release = _barrier_lock.acquire, _barrier_lock.release


def memory_barrier() -> None:
    _barrier_acquire()
    _barrier_release()


class QueueError(Exception):
    """The ring is broken: the device must set NEEDS_RESET."""


class ChainError(QueueError):
    """One descriptor chain is malformed; complete `head` with an error and go on."""

    def __init__(self, head: int, reason: str):
        super().__init__(f"chain {head}: {reason}")
        self.head = head
        self.reason = reason


def vring_need_event(event_idx: int, new_idx: int, old: int) -> bool:
    """The spec's vring_need_event(): did new_idx step past event_idx since old?"""
    return ((new_idx - event_idx - 1) & 0xFFFF) < ((new_idx - old) & 0xFFFF)


def ring_sizes(size: int) -> tuple[int, int, int]:
    """Bytes of the descriptor table, driver (avail) and device (used) areas,
    including the event-idx trailers."""
    return DESC_SIZE * size, 6 + 2 * size, 6 + 8 * size


class DescriptorChain:
    """A validated chain: device-readable then device-writable (gpa, len) segments."""

    __slots__ = ("head", "readable", "writable", "readable_len", "writable_len")

    def __init__(self, head: int, readable: list[tuple[int, int]],
                 writable: list[tuple[int, int]], readable_len: int | None = None,
                 writable_len: int | None = None):
        self.head = head
        self.readable = readable
        self.writable = writable
        self.readable_len = sum(n for _, n in readable) if readable_len is None else readable_len
        self.writable_len = sum(n for _, n in writable) if writable_len is None else writable_len

    def __repr__(self) -> str:
        return (f"DescriptorChain(head={self.head}, readable={self.readable}, "
                f"writable={self.writable})")

    @staticmethod
    def _slices(segments, offset: int, length: int):
        """(gpa, n) pieces covering [offset, offset+length) of the segments."""
        for gpa, n in segments:
            if length <= 0:
                return
            if offset >= n:
                offset -= n
                continue
            take = min(n - offset, length)
            yield gpa + offset, take
            length -= take
            offset = 0

    def read_all(self, mem: DeviceMemory, limit: int | None = None) -> bytes:
        """The device-readable bytes (at most `limit`), concatenated."""
        limit = self.readable_len if limit is None else min(limit, self.readable_len)
        if len(self.readable) == 1:
            return mem.read(self.readable[0][0], limit)
        return b"".join(mem.read(g, n) for g, n in self._slices(self.readable, 0, limit))

    def read_into(self, mem: DeviceMemory, dest, offset: int = 0) -> int:
        """Copy readable bytes from `offset` into the writable buffer `dest`; returns the count."""
        out = memoryview(dest).cast("B")
        done = 0
        for g, n in self._slices(self.readable, offset, len(out)):
            out[done:done + n] = mem.view(g, n)
            done += n
        return done

    def readable_views(self, mem: DeviceMemory, offset: int = 0,
                       length: int | None = None) -> list[memoryview]:
        """Read-only views of the readable bytes [offset, offset+length), for pwritev."""
        if length is None:
            length = self.readable_len - offset
        return [mem.view(g, n) for g, n in self._slices(self.readable, offset, length)]

    def writable_views(self, mem: DeviceMemory, offset: int = 0,
                       length: int | None = None) -> list[memoryview]:
        """Writable views of [offset, offset+length) of the writable bytes, for
        preadv. Call mark_writable(mem, offset, length) once they were filled."""
        if length is None:
            length = self.writable_len - offset
        return [mem.writable_view(g, n) for g, n in self._slices(self.writable, offset, length)]

    def mark_writable(self, mem: DeviceMemory, offset: int, length: int) -> None:
        for g, n in self._slices(self.writable, offset, length):
            mem.mark_dirty(g, n)

    def write_at(self, mem: DeviceMemory, offset: int, data) -> int:
        """Scatter `data` over the writable segments from `offset`; returns the
        bytes written (fewer if the buffers end first)."""
        src = memoryview(data).cast("B")
        done = 0
        for g, n in self._slices(self.writable, offset, len(src)):
            mem.write(g, src[done:done + n])
            done += n
        return done


class SplitQueue:
    """One split virtqueue; the device side of 2.7."""

    def __init__(self, mem: DeviceMemory, size: int, desc_gpa: int, avail_gpa: int,
                 used_gpa: int, *, event_idx: bool = False, indirect: bool = False,
                 max_chain_len: int | None = None):
        if type(size) is not int or not 1 <= size <= MAX_QUEUE_SIZE or size & (size - 1):
            raise QueueError(f"queue size {size!r} is not a power of 2 in 1..{MAX_QUEUE_SIZE}")
        if desc_gpa % 16 or avail_gpa % 2 or used_gpa % 4:
            raise QueueError(f"misaligned rings desc={desc_gpa:#x} avail={avail_gpa:#x} "
                             f"used={used_gpa:#x}")
        dsize, asize, usize = ring_sizes(size)
        try:
            self._desc = mem.view(desc_gpa, dsize)
            self._avail = mem.view(avail_gpa, asize)
            self._used = mem.writable_view(used_gpa, usize)
        except GuestMemoryError as exc:
            raise QueueError(f"ring outside guest RAM: {exc}") from None
        self.mem = mem
        self.size = size
        self.desc_gpa, self.avail_gpa, self.used_gpa = desc_gpa, avail_gpa, used_gpa
        self.event_idx = bool(event_idx)
        self.indirect = bool(indirect)
        self.max_chain_len = size if max_chain_len is None else max_chain_len
        if self.max_chain_len < 1:
            raise QueueError("max_chain_len must be at least 1")
        self.last_avail_idx = 0      # next avail ring slot we will consume (free-running u16)
        self.used_idx = 0            # our copy of used->idx
        self.signalled_used = 0      # used idx when needs_interrupt() last ran
        self.signalled_valid = False
        self._used_event_off = 4 + 2 * size    # in the avail area
        self._avail_event_off = 4 + 8 * size   # in the used area
        self._mark = mem.dirty_log.mark if mem.dirty_log is not None else None
        self._used_size = usize
        self._ram = tuple((r.gpa, r.end) for r in mem.guest.layout.regions)

    # --- reading the driver's side -------------------------------------------------

    def avail_idx(self) -> int:
        return _U16.unpack_from(self._avail, 2)[0]

    def pending(self) -> bool:
        """Has the driver made buffers available that we have not popped?"""
        return _U16.unpack_from(self._avail, 2)[0] != self.last_avail_idx

    def pop(self) -> DescriptorChain | None:
        """The next available chain, validated; None when the ring is empty."""
        avail_idx = _U16.unpack_from(self._avail, 2)[0]
        last = self.last_avail_idx
        if avail_idx == last:
            return None
        if (avail_idx - last) & 0xFFFF > self.size:
            raise QueueError(f"avail idx {avail_idx} is more than {self.size} ahead of {last}")
        head = _U16.unpack_from(self._avail, 4 + 2 * (last % self.size))[0]
        if head >= self.size:
            raise QueueError(f"avail ring entry {last % self.size} names head {head} "
                             f">= queue size {self.size}")
        self.last_avail_idx = (last + 1) & 0xFFFF
        return self._walk(head)

    def _walk(self, head: int) -> DescriptorChain:
        mem, ram = self.mem, self._ram
        rlen = wlen = 0
        readable: list[tuple[int, int]] = []
        writable: list[tuple[int, int]] = []
        table, table_size = self._desc, self.size
        in_indirect = False
        visited = 0
        buffers = 0
        limit = self.max_chain_len
        idx = head
        while True:
            if idx >= table_size:
                raise ChainError(head, f"next {idx} out of range ({table_size} descriptors)")
            visited += 1
            if visited > table_size:
                raise ChainError(head, "descriptor loop")
            addr, length, flags, nxt = _DESC.unpack_from(table, idx * DESC_SIZE)
            if flags & VIRTQ_DESC_F_INDIRECT:
                if not self.indirect:
                    raise ChainError(head, "indirect descriptor without RING_INDIRECT_DESC")
                if in_indirect:
                    raise ChainError(head, "nested indirect descriptor")
                if flags & VIRTQ_DESC_F_NEXT:
                    raise ChainError(head, "indirect descriptor with NEXT")
                if length == 0 or length % DESC_SIZE:
                    raise ChainError(head, f"indirect table length {length} is not a "
                                           f"non-zero multiple of {DESC_SIZE}")
                n = length // DESC_SIZE
                if n > limit:
                    raise ChainError(head, f"indirect table of {n} descriptors exceeds {limit}")
                try:
                    table = mem.read(addr, length)  # one snapshot: no double fetch
                except GuestMemoryError:
                    raise ChainError(head, f"indirect table {addr:#x}+{length:#x} outside "
                                           f"guest RAM") from None
                table_size, in_indirect, visited, idx = n, True, 0, 0
                continue
            if length == 0:
                raise ChainError(head, f"zero-length descriptor {idx}")
            buffers += 1
            if buffers > limit:
                raise ChainError(head, f"chain longer than {limit} descriptors")
            end = addr + length
            for lo, hi in ram:
                if lo <= addr and end <= hi:
                    break
            else:
                raise ChainError(head, f"buffer {addr:#x}+{length:#x} outside guest RAM")
            if flags & VIRTQ_DESC_F_WRITE:
                writable.append((addr, length))
                wlen += length
            elif writable:
                raise ChainError(head, "device-readable descriptor after a device-writable one")
            else:
                readable.append((addr, length))
                rlen += length
            if not flags & VIRTQ_DESC_F_NEXT:
                return DescriptorChain(head, readable, writable, rlen, wlen)
            idx = nxt

    # --- completing ---------------------------------------------------------------------

    def push_used(self, head: int, written_len: int) -> None:
        """Publish one used element (head, bytes written into the chain)."""
        if not 0 <= head < self.size:
            raise QueueError(f"push_used of head {head} outside the queue")
        slot = 4 + 8 * (self.used_idx % self.size)
        _USED_ELEM.pack_into(self._used, slot, head, written_len & 0xFFFFFFFF)
        self.used_idx = (self.used_idx + 1) & 0xFFFF
        _U16.pack_into(self._used, 2, self.used_idx)  # element before index (x86 TSO)
        if self._mark is not None:
            # one call for the element and the index: the used ring spans
            # at most a few pages, all of them written over time anyway
            self._mark(self.used_gpa, self._used_size)

    def needs_interrupt(self) -> bool:
        """Should the device interrupt the driver for the used entries so far?

        With RING_EVENT_IDX: vring_need_event(used_event, used_idx, the used
        idx at the previous call); otherwise unless VIRTQ_AVAIL_F_NO_INTERRUPT.
        Never when nothing was pushed since the previous call."""
        new, old = self.used_idx, self.signalled_used
        valid = self.signalled_valid
        self.signalled_used, self.signalled_valid = new, True
        if valid and new == old:
            return False
        memory_barrier()
        if self.event_idx:
            if not valid:
                return True
            used_event = _U16.unpack_from(self._avail, self._used_event_off)[0]
            return vring_need_event(used_event, new, old)
        return not _U16.unpack_from(self._avail, 0)[0] & VIRTQ_AVAIL_F_NO_INTERRUPT

    def set_avail_event(self, value: int | None = None) -> None:
        """With RING_EVENT_IDX: ask for a kick once avail idx passes `value`
        (default: the next buffer we have not seen)."""
        if not self.event_idx:
            return
        v = self.last_avail_idx if value is None else value & 0xFFFF
        _U16.pack_into(self._used, self._avail_event_off, v)
        if self._mark is not None:
            self._mark(self.used_gpa + self._avail_event_off, 2)

    def enable_notification(self) -> bool:
        """Re-arm driver kicks after draining; True if buffers arrived meanwhile
        (then pop again). Typical loop:

            while True:
                while (chain := q.pop()) is not None: ...
                if not q.enable_notification(): break
        """
        if self.event_idx:
            self.set_avail_event()
        else:
            self._set_used_flags(0)
        memory_barrier()
        return self.pending()

    def drain(self, on_bad_chain: Callable[[ChainError], None]) -> Iterator[DescriptorChain]:
        """Every available chain, until the ring is empty with notifications
        re-enabled (the race-free loop every device needs).

        A malformed chain is completed with 0 bytes written and reported to
        `on_bad_chain`; the caller completes each chain it is given. A broken
        ring raises QueueError (the device sets NEEDS_RESET).
        """
        while True:
            self.disable_notification()
            while True:
                try:
                    chain = self.pop()
                except ChainError as exc:
                    on_bad_chain(exc)
                    self.push_used(exc.head, 0)
                    continue
                if chain is None:
                    break
                yield chain
            if not self.enable_notification():
                return

    def disable_notification(self) -> None:
        """Hint that kicks are not needed (non-event-idx: VIRTQ_USED_F_NO_NOTIFY)."""
        if not self.event_idx:
            self._set_used_flags(VIRTQ_USED_F_NO_NOTIFY)

    def _set_used_flags(self, flags: int) -> None:
        if _U16.unpack_from(self._used, 0)[0] != flags:
            _U16.pack_into(self._used, 0, flags)
            if self._mark is not None:
                self._mark(self.used_gpa, 2)

    # --- state ------------------------------------------------------------------------------

    def ring_used_idx(self) -> int:
        """used->idx as it is in guest memory (we are its only writer)."""
        return _U16.unpack_from(self._used, 2)[0]

    def save(self) -> dict:
        return {"last_avail_idx": self.last_avail_idx, "used_idx": self.used_idx,
                "signalled_used": self.signalled_used, "signalled_valid": self.signalled_valid}

    def restore(self, state: dict) -> None:
        """ValueError on a malformed state (nothing changed then)."""
        if not isinstance(state, dict):
            raise ValueError("queue state must be a map")
        vals = {}
        for key in ("last_avail_idx", "used_idx", "signalled_used"):
            v = state.get(key)
            if type(v) is not int or not 0 <= v <= 0xFFFF:
                raise ValueError(f"queue state {key} must be a u16, not {v!r}")
            vals[key] = v
        valid = state.get("signalled_valid", False)
        if type(valid) is not bool:
            raise ValueError("queue state signalled_valid must be a bool")
        if (vals["last_avail_idx"] - vals["used_idx"]) & 0xFFFF > self.size:
            raise ValueError("queue state has more than size chains in flight")
        self.last_avail_idx = vals["last_avail_idx"]
        self.used_idx = vals["used_idx"]
        self.signalled_used = vals["signalled_used"]
        self.signalled_valid = valid

    def sync_from_ring(self) -> None:
        """Resume from guest memory alone (a stale checkpoint after a crash):
        used idx from the ring, every chain not yet used is taken as not yet
        popped (so it is processed again), and the next interrupt is not held back."""
        self.used_idx = self.ring_used_idx()
        self.last_avail_idx = self.used_idx
        self.signalled_valid = False
