"""The virtio-blk backend: a raw image file or a block device.

Opened in the model's __init__ (before the sandbox); after the jail only
syscalls on the already-open fds remain: preadv/pwritev (data, straight
from/into guest-memory views: zero copy), fdatasync (FLUSH), fallocate
(DISCARD / WRITE_ZEROES on files, WRITE_ZEROES on block devices) and the
BLKDISCARD ioctl (DISCARD on block devices); see policy.py.

I/O is synchronous on the device's event loop. With a raw file in the page
cache a request is a memcpy in the kernel, so an io thread pool or
io_uring (forbidden by the sandbox) would add latency rather than remove it;
an uncached read blocks the loop for one disk access, which only delays this
disk's other queues (every disk is its own process). It also means no
request is ever in flight between two bus messages: quiesce has nothing to
drain and save has nothing to record.

Cache modes:
  writeback (default)  page cache; FLUSH = fdatasync, so an acknowledged
                       write followed by a completed FLUSH is on stable storage
  direct               O_DIRECT where the filesystem allows it (else a warning
                       and writeback); requests whose buffers or offset are
                       not aligned to the direct-I/O alignment go through a
                       second, buffered fd (the kernel keeps both coherent);
                       FLUSH = fdatasync (the disk's own cache)
  unsafe               page cache, FLUSH does nothing (scratch disks, tests)

Every method returns a virtio-blk status; OSError never escapes (it is
counted, logged at a bounded rate, and becomes VIRTIO_BLK_S_IOERR).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import mmap
import os
import stat
import struct
from typing import Sequence

from devices.virtio_blk.request import S_IOERR, S_OK, SECTOR_SHIFT, SECTOR_SIZE

log = logging.getLogger("devices.virtio_blk")

from devopts.virtio_blk import CACHE_MODES  # noqa: E402  (one list, shared with vmmd's check)

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

# <linux/fs.h>
BLKSSZGET = 0x1268            # _IO(0x12, 104): logical block size (int)
BLKDISCARD = 0x1277           # _IO(0x12, 119): u64[2] {start, length}
BLKPBSZGET = 0x127B           # _IO(0x12, 123): physical block size (unsigned int)

IOV_MAX = 1024
ZERO_CHUNK = 1 << 20
ERROR_LOG_BURST = 20

_libc = ctypes.CDLL(None, use_errno=True)
_fallocate = _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_fallocate.restype = ctypes.c_int

# The operation is not supported by this file system / device at all ...
_NOT_SUPPORTED = (errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.ENOTTY)
# ... or not for this range (e.g. not aligned to a 4 KiB-sector device).
_NOT_FOR_THIS_RANGE = (errno.EINVAL,)


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _ioctl_uint(fd: int, request: int) -> int | None:
    try:
        return struct.unpack("I", fcntl.ioctl(fd, request, b"\0" * 4))[0]
    except OSError:
        return None


QCOW2_MAGIC = b"QFI\xfb"


def _starts_with_qcow2_magic(buffers: Sequence) -> bool:
    head = b""
    for b in buffers:
        head += bytes(memoryview(b).cast("B")[:4 - len(head)])
        if len(head) >= 4:
            break
    return head == QCOW2_MAGIC


def _advance(buffers: list, done: int) -> list:
    """The buffers left after `done` bytes of them were transferred."""
    out = []
    for i, b in enumerate(buffers):
        n = len(b)
        if done < n:
            out.append(memoryview(b)[done:] if done else b)
            out.extend(buffers[i + 1:])
            return out
        done -= n
    return out


class BlockBackend:
    """One disk image. capacity is in 512-byte sectors (a trailing partial
    sector of a file is not exposed)."""

    def __init__(self, path: str, *, read_only: bool = False, cache: str = "writeback",
                 serial: str | bytes = b""):
        if cache not in CACHE_MODES:
            raise ValueError(f"cache mode must be one of {', '.join(CACHE_MODES)}, not {cache!r}")
        self.path = path
        self.read_only = read_only
        self.cache = cache
        self.serial = serial.encode() if isinstance(serial, str) else bytes(serial)
        self.errors = 0
        # Raw by probing (no format=): refuse to let the guest write a qcow2
        # header to sector 0, or the next probe would trust guest metadata.
        self.guard_qcow2_magic = False
        self.dfd: int | None = None
        self._zeros: bytes | None = None
        flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC
        try:
            self.fd = os.open(path, flags)
        except OSError as exc:
            raise ValueError(f"cannot open disk image {path!r}: {exc.strerror}") from None
        try:
            self._probe(flags)
        except Exception:
            self.close()
            raise

    def _probe(self, flags: int) -> None:
        st = os.fstat(self.fd)
        self.is_block = stat.S_ISBLK(st.st_mode)
        if not (self.is_block or stat.S_ISREG(st.st_mode)):
            raise ValueError(f"disk image {self.path!r} is neither a regular file nor a block device")
        if self.is_block:
            size = os.lseek(self.fd, 0, os.SEEK_END)
            self.logical_block_size = _ioctl_uint(self.fd, BLKSSZGET) or SECTOR_SIZE
            physical = _ioctl_uint(self.fd, BLKPBSZGET) or self.logical_block_size
        else:
            size = st.st_size
            self.logical_block_size = SECTOR_SIZE
            physical = st.st_blksize if 0 < st.st_blksize <= 65536 else 4096
        self.size = size
        self.capacity = size >> SECTOR_SHIFT
        self.dio_align = 0
        if self.cache == "direct":
            self._open_direct(flags)
        if self.dio_align > self.logical_block_size:
            self.logical_block_size = self.dio_align
        self.physical_block_size = max(physical, self.logical_block_size)
        self.discard_supported = True
        self.zero_range_supported = True

    def _open_direct(self, flags: int) -> None:
        try:
            dfd = os.open(self.path, flags | os.O_DIRECT)
        except OSError as exc:
            log.warning("%s: O_DIRECT not available (%s); using the page cache",
                        self.path, exc.strerror)
            return
        if os.fstat(dfd).st_ino != os.fstat(self.fd).st_ino:
            os.close(dfd)
            raise ValueError(f"disk image {self.path!r} changed while being opened")
        align = self.logical_block_size if self.is_block else self._probe_dio_align(dfd)
        if align is None:
            log.warning("%s: O_DIRECT reads fail; using the page cache", self.path)
            os.close(dfd)
            return
        self.dfd = dfd
        self.dio_align = align

    def _probe_dio_align(self, dfd: int) -> int | None:
        buf = mmap.mmap(-1, 8192)
        try:
            for align in (512, 1024, 2048, 4096):
                try:
                    os.preadv(dfd, [memoryview(buf)[:align]], align)
                    return align
                except OSError as exc:
                    if exc.errno != errno.EINVAL:
                        return None
            return None
        finally:
            buf.close()

    # --- data --------------------------------------------------------------------

    def _fd_for(self, offset: int, nbytes: int, aligned: bool) -> int:
        if self.dfd is not None and aligned:
            mask = self.dio_align - 1
            if not (offset & mask or nbytes & mask):
                return self.dfd
        return self.fd

    def read(self, sector: int, buffers: Sequence, nbytes: int, aligned: bool = False) -> int:
        """Fill buffers (nbytes in all) from the disk at sector.

        aligned: the buffers' guest addresses and lengths are multiples of
        dio_align (the caller knows the guest addresses; we only see views)."""
        offset = sector << SECTOR_SHIFT
        fd = self._fd_for(offset, nbytes, aligned)
        bufs = list(buffers)
        try:
            while bufs:
                n = os.preadv(fd, bufs[:IOV_MAX], offset)
                if n <= 0:
                    raise OSError(errno.EIO, "unexpected end of the disk image")
                offset += n
                bufs = _advance(bufs, n)
        except OSError as exc:
            return self._error("read", sector, exc)
        return S_OK

    def write(self, sector: int, buffers: Sequence, nbytes: int, aligned: bool = False) -> int:
        if self.read_only:
            return S_IOERR
        if sector == 0 and self.guard_qcow2_magic and _starts_with_qcow2_magic(buffers):
            self.errors += 1
            log.error("%s: refused a guest write of a qcow2 header to sector 0 of an image "
                      "probed as raw (say format=raw to allow it)", self.path)
            return S_IOERR
        offset = sector << SECTOR_SHIFT
        fd = self._fd_for(offset, nbytes, aligned)
        bufs = list(buffers)
        try:
            while bufs:
                n = os.pwritev(fd, bufs[:IOV_MAX], offset)
                if n <= 0:
                    raise OSError(errno.EIO, "short write")
                offset += n
                bufs = _advance(bufs, n)
        except OSError as exc:
            return self._error("write", sector, exc)
        return S_OK

    def flush(self) -> int:
        if self.cache == "unsafe" or self.read_only:
            return S_OK
        try:
            os.fdatasync(self.fd)
        except OSError as exc:
            return self._error("flush", 0, exc)
        return S_OK

    # --- discard and write zeroes ----------------------------------------------

    def discard(self, ranges: Sequence[tuple[int, int]]) -> int:
        """Deallocate (advisory: a backend that cannot still answers OK)."""
        if self.read_only:
            return S_IOERR
        for sector, num in ranges:
            if num == 0 or not self.discard_supported:
                continue
            offset, length = sector << SECTOR_SHIFT, num << SECTOR_SHIFT
            try:
                if self.is_block:
                    fcntl.ioctl(self.fd, BLKDISCARD, struct.pack("=QQ", offset, length))
                else:
                    fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
            except OSError as exc:
                if exc.errno in _NOT_SUPPORTED:
                    log.info("%s: discard not supported (%s); ignoring discards",
                             self.path, exc.strerror)
                    self.discard_supported = False
                elif exc.errno not in _NOT_FOR_THIS_RANGE:
                    return self._error("discard", sector, exc)
        return S_OK

    def write_zeroes(self, ranges: Sequence[tuple[int, int]], unmap: Sequence[bool]) -> int:
        """Zero the ranges; with unmap, by deallocating where possible."""
        if self.read_only:
            return S_IOERR
        for (sector, num), may_unmap in zip(ranges, unmap):
            if num == 0:
                continue
            offset, length = sector << SECTOR_SHIFT, num << SECTOR_SHIFT
            try:
                self._zero(offset, length, may_unmap)
            except OSError as exc:
                return self._error("write_zeroes", sector, exc)
        return S_OK

    def _zero(self, offset: int, length: int, unmap: bool) -> None:
        if unmap and self.discard_supported:
            try:
                # On a file: a hole reads as zeroes. On a block device the
                # kernel turns this into a WRITE_ZEROES that may unmap.
                fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
                return
            except OSError as exc:
                if exc.errno not in _NOT_SUPPORTED + _NOT_FOR_THIS_RANGE:
                    raise
        if self.zero_range_supported:
            try:
                fallocate(self.fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, length)
                return
            except OSError as exc:
                if exc.errno in _NOT_SUPPORTED:
                    self.zero_range_supported = False
                elif exc.errno not in _NOT_FOR_THIS_RANGE:
                    raise
        if self._zeros is None:
            self._zeros = bytes(ZERO_CHUNK)
        end = offset + length
        while offset < end:
            n = os.pwrite(self.fd, memoryview(self._zeros)[:min(ZERO_CHUNK, end - offset)], offset)
            if n <= 0:
                raise OSError(errno.EIO, "short write")
            offset += n

    # --- misc ------------------------------------------------------------------------

    def _error(self, what: str, sector: int, exc: OSError) -> int:
        self.errors += 1
        if self.errors <= ERROR_LOG_BURST or self.errors % 1000 == 0:
            log.error("%s: %s at sector %d failed: %s (error #%d)", self.path, what, sector,
                      exc.strerror or exc, self.errors)
        return S_IOERR

    def close(self) -> None:
        for name in ("dfd", "fd"):
            fd = getattr(self, name, None)
            if fd is not None:
                setattr(self, name, None)
                try:
                    os.close(fd)
                except OSError:
                    pass
