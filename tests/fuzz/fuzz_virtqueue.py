"""The split virtqueue parser (devices/virtio/queue.py) over guest memory the input fills.

Defined errors: QueueError (the ring is broken; ChainError, one bad chain, is
completed and parsing goes on, as the devices do). Every chain handed out must
lie in guest RAM, have no empty buffer, at most max_chain_len buffers, and
readable before writable.
"""

import os
import struct

from devices.virtio.memory import DeviceMemory
from devices.virtio.queue import ChainError, QueueError, SplitQueue, ring_sizes
from vmmd.guest_memory import GuestMemory, MemoryLayout, MemoryRegion

EXPECTED = (QueueError,)

KiB = 1 << 10
# Two RAM regions with a hole between them; the rings and tables sit in the first.
LAYOUT = MemoryLayout((MemoryRegion(0, 64 * KiB, 0), MemoryRegion(128 * KiB, 64 * KiB, 64 * KiB)))
_fd = os.memfd_create("fuzz-ram", os.MFD_CLOEXEC)
os.ftruncate(_fd, LAYOUT.total_size)
MEM = DeviceMemory(GuestMemory(_fd, LAYOUT))
ZERO = bytes(64 * KiB)
_dirty = 64 * KiB


def one_input(data: bytes) -> None:
    if len(data) < 4:
        return
    size = 1 << (data[0] % 9)                 # 1..256
    indirect, event_idx = bool(data[1] & 1), bool(data[1] & 2)
    max_chain_len = 1 + data[2] % (2 * size)
    start_idx = data[3]
    dsize, asize, usize = ring_sizes(size)
    desc, avail = 0, dsize
    used = (avail + asize + 3) & ~3
    global _dirty
    image = data[4:4 + 60 * KiB]               # descriptors, avail ring, indirect tables, buffers
    MEM.guest.write(0, ZERO[:max(_dirty, used + usize)])   # what the last input (and we) wrote
    MEM.guest.write(0, image)
    _dirty = max(len(image), used + usize)
    q = SplitQueue(MEM, size, desc, avail, used, event_idx=event_idx, indirect=indirect,
                   max_chain_len=max_chain_len)
    q.last_avail_idx = MEM.read_u16(avail + 2) - start_idx & 0xFFFF if start_idx else 0
    for _ in range(size + 2):
        try:
            chain = q.pop()
        except ChainError as err:
            assert 0 <= err.head < size
            q.push_used(err.head, 0)
            continue
        if chain is None:
            break
        assert 0 <= chain.head < size
        segs = chain.readable + chain.writable
        assert 1 <= len(segs) <= max_chain_len, (len(segs), max_chain_len)
        for gpa, n in segs:
            assert n > 0 and MEM.contains(gpa, n), (gpa, n)
        assert chain.readable_len == sum(n for _, n in chain.readable)
        assert chain.writable_len == sum(n for _, n in chain.writable)
        q.push_used(chain.head, chain.writable_len)
        q.needs_interrupt()
    struct.unpack_from("<H", MEM.read(used + 2, 2))
