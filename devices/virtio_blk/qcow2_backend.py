"""The virtio-blk backend for qcow2 images, and the choice between qcow2 and raw.

Qcow2Backend has BlockBackend's interface (read/write/flush/discard/
write_zeroes on sectors, statuses out, OSError never escapes) over a
qcow2.image.Qcow2Image. The image and its whole backing chain are opened in
the model's __init__, before the sandbox; afterwards only pread/pwrite,
fdatasync and fallocate on those fds are used (see policy.py). A request
that hits bad metadata (Qcow2Error) fails with VIRTIO_BLK_S_IOERR; the rest
of the disk keeps working.

open_backend() picks the format: format=qcow2|raw, or (without format=) a
probe of the magic: a qcow2 image found that way is opened as qcow2 with a
warning to make the format explicit, and a raw image found that way refuses
guest writes that would put a qcow2 header at sector 0 (otherwise the next
probe would read guest-written metadata: QEMU's lesson, CVE-2008-2004).
"""

from __future__ import annotations

import logging
import os
from typing import Sequence

from devices.virtio_blk.backend import BlockBackend
from devices.virtio_blk.qcow2 import format as fmt
from devices.virtio_blk.qcow2.format import Qcow2Error
from devices.virtio_blk.qcow2.image import Qcow2Image, open_image
from devices.virtio_blk.request import S_IOERR, S_OK, SECTOR_SHIFT, SECTOR_SIZE

log = logging.getLogger("devices.virtio_blk")

FORMATS = ("qcow2", "raw")
ERROR_LOG_BURST = 20


def probe_format(path: str) -> str:
    try:
        with open(path, "rb") as f:
            return "qcow2" if f.read(4) == fmt.MAGIC else "raw"
    except OSError as exc:
        raise ValueError(f"cannot open disk image {path!r}: {exc.strerror}") from None


def open_backend(path: str, *, image_format: str | None, read_only: bool, cache: str,
                 serial: bytes):
    """The backend for a disk: (Qcow2Backend | BlockBackend); ValueError if it
    cannot be opened (the message says why)."""
    fmt_name = image_format
    if fmt_name is None:
        fmt_name = probe_format(path)
        if fmt_name == "qcow2":
            log.warning("%s: detected a qcow2 image; say format=qcow2 to make it explicit "
                        "(probing is unsafe for images a guest can write)", path)
    if fmt_name == "qcow2":
        return Qcow2Backend(path, read_only=read_only, cache=cache, serial=serial)
    if fmt_name != "raw":
        raise ValueError(f"unknown image format {fmt_name!r} (qcow2 or raw)")
    backend = BlockBackend(path, read_only=read_only, cache=cache, serial=serial)
    backend.guard_qcow2_magic = image_format is None
    return backend


def _as_list(buffers) -> list:
    return buffers if type(buffers) is list else list(buffers)


class Qcow2Backend:
    image_format = "qcow2"

    def __init__(self, path: str, *, read_only: bool = False, cache: str = "writeback",
                 serial: bytes = b""):
        self.path = path
        self.read_only = read_only
        if cache == "direct":
            log.warning("%s: cache=direct is not available for qcow2 images; using the page cache",
                        path)
            cache = "writeback"
        self.cache = cache
        self.serial = bytes(serial)
        self.errors = 0
        self.dfd = None
        self.dio_align = 0
        self.is_block = False
        self.discard_supported = True
        try:
            self.image = open_image(path, fmt_name="qcow2", read_only=read_only,
                                    sync=cache != "unsafe")
        except Qcow2Error as exc:
            raise ValueError(f"disk image {path!r}: {exc}") from None
        except OSError as exc:
            raise ValueError(f"disk image {path!r}: {exc.strerror or exc}") from None
        self.size = self.image.size
        self.capacity = self.size >> SECTOR_SHIFT
        self.logical_block_size = SECTOR_SIZE
        self.physical_block_size = min(4096, self.image.cs) if self.image.cs >= 4096 else SECTOR_SIZE
        self.cluster_size = self.image.cs

    @property
    def fd(self) -> int:
        return self.image.fd

    def read(self, sector: int, buffers: Sequence, nbytes: int, aligned: bool = False) -> int:
        try:
            self.image.read_into(sector << SECTOR_SHIFT, _as_list(buffers))
        except (Qcow2Error, OSError) as exc:
            return self._error("read", sector, exc)
        return S_OK

    def write(self, sector: int, buffers: Sequence, nbytes: int, aligned: bool = False) -> int:
        if self.read_only:
            return S_IOERR
        try:
            self.image.write_from(sector << SECTOR_SHIFT, _as_list(buffers))
        except (Qcow2Error, OSError) as exc:
            return self._error("write", sector, exc)
        return S_OK

    def flush(self) -> int:
        if self.read_only:
            return S_OK
        try:
            self.image.flush()
        except (Qcow2Error, OSError) as exc:
            return self._error("flush", 0, exc)
        return S_OK

    def discard(self, ranges: Sequence[tuple[int, int]]) -> int:
        if self.read_only:
            return S_IOERR
        try:
            for sector, num in ranges:
                if num:
                    self.image.discard(sector << SECTOR_SHIFT, num << SECTOR_SHIFT)
        except (Qcow2Error, OSError) as exc:
            return self._error("discard", 0, exc)
        return S_OK

    def write_zeroes(self, ranges: Sequence[tuple[int, int]], unmap: Sequence[bool]) -> int:
        if self.read_only:
            return S_IOERR
        try:
            for (sector, num), may_unmap in zip(ranges, unmap):
                if num:
                    self.image.write_zeroes(sector << SECTOR_SHIFT, num << SECTOR_SHIFT, may_unmap)
        except (Qcow2Error, OSError) as exc:
            return self._error("write_zeroes", 0, exc)
        return S_OK

    def qcow2_stats(self) -> dict:
        img = self.image
        chain = []
        b = img.backing
        while b is not None and len(chain) < 32:
            chain.append({"path": b.path, "format": b.format})
            b = getattr(b, "backing", None)
        return {"path": self.path, "cluster_size": img.cs, "file_size": img.file_size,
                "l2_cache_tables": len(img.l2_cache), "pending_frees": len(img.pending_free),
                "lazy_refcounts": img.lazy, "backing_chain": chain}

    # --- disk checkpoints ----------------------------------------------------------------

    def switch_to_overlay(self, fd: int, path: str = "") -> None:
        """Make `fd` (an empty qcow2 overlay whose backing is this image,
        created by vmmd) the active image; the current image becomes its
        read-only backing. Everything written before is flushed first, so
        the old image is exactly the disk at the switch point."""
        if self.read_only:
            raise ValueError("a read-only disk has no overlay to switch to")
        old = self.image
        try:
            overlay = Qcow2Image(os.dup(fd), path, read_only=False, backing=None, sync=old.sync)
        except (Qcow2Error, OSError) as exc:
            raise ValueError(f"overlay {path!r}: {exc}") from None
        why = None
        if overlay.size != old.size:
            why = f"its size {overlay.size} differs from the disk's {old.size}"
        elif not overlay.h.backing_file:
            why = "it has no backing file"
        elif any(overlay.l1):
            why = "it is not empty"
        if why:
            overlay.close()
            raise ValueError(f"overlay {path!r}: {why}")
        # Everything acknowledged so far lands in the old image, which from now
        # on is a read-only backing file: the disk as it was at the switch.
        old.close_for_backing()
        overlay.backing = old
        self.image = overlay
        os.close(fd)
        self.path = path or self.path

    def _error(self, what: str, sector: int, exc: Exception) -> int:
        self.errors += 1
        if self.errors <= ERROR_LOG_BURST or self.errors % 1000 == 0:
            text = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            log.error("%s: %s at sector %d failed: %s (error #%d)", self.path, what, sector,
                      text, self.errors)
        return S_IOERR

    def close(self) -> None:
        image, self.image = self.image, None
        if image is not None:
            try:
                image.close()
            except OSError:
                pass

