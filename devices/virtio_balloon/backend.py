"""Host reclaim: give guest pages back to the host by punching the memfd.

Guest RAM is a shared memfd (vmmd/guest_memory.py), so MADV_DONTNEED would
only drop this process's mapping and free nothing; fallocate(PUNCH_HOLE |
KEEP_SIZE) frees the pages in the file itself, for vmmd, KVM and every
device that maps it. The pages read back as zeroes on the next touch.

The fd is the guest memory fd the device received from vmmd; the ranges
come from core.BalloonCore, already whole host pages inside the memfd.
"""

from __future__ import annotations

import ctypes
import logging
import os

log = logging.getLogger("devices.virtio_balloon")

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02

_libc = ctypes.CDLL(None, use_errno=True)
_fallocate = _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
_fallocate.restype = ctypes.c_int


def host_page_size(fd: int) -> int:
    """The page size backing the memfd: st_blksize is the huge page size on
    hugetlbfs and the base page size on shmem."""
    try:
        blk = os.fstat(fd).st_blksize
    except OSError:
        blk = 0
    page = os.sysconf("SC_PAGE_SIZE")
    return blk if blk >= page and blk & (blk - 1) == 0 else page


class Reclaimer:
    def __init__(self, fd: int, size: int):
        self.fd = fd
        self.size = size
        self.punched_bytes = 0
        self.calls = 0
        self.errors = 0

    def punch(self, offset: int, length: int) -> bool:
        """Free [offset, offset+length) of the memfd; False (counted) on failure."""
        if offset < 0 or length <= 0 or offset + length > self.size:
            self.errors += 1
            log.error("refusing to punch %#x+%#x outside the %#x-byte memfd", offset, length, self.size)
            return False
        self.calls += 1
        if _fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) != 0:
            err = ctypes.get_errno()
            self.errors += 1
            if self.errors <= 20 or self.errors % 1000 == 0:
                log.error("fallocate(PUNCH_HOLE) %#x+%#x: %s", offset, length, os.strerror(err))
            return False
        self.punched_bytes += length
        return True
