"""virtio-blk slot options: `-s N,virtio-blk,PATH[,ro][,nocache][,cache=M][,serial=S][,num_queues=N][,queue_size=N]`,
and the checks vmmd makes on the image before anything starts."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass

from devopts import Opt, OptionError, choice, int_range, parse_table, power_of_two, shorten

CACHE_MODES = ("writeback", "direct", "unsafe")
FORMATS = ("qcow2", "raw")         # format=; absent: probed (qcow2 magic, else raw)
QCOW2_MAGIC = b"QFI\xfb"
ID_BYTES = 20                      # VIRTIO_BLK_ID_BYTES: the serial's size
MAX_QUEUES = 64
DEFAULT_QUEUE_SIZE = 256
MIN_QUEUE_SIZE = 4
MAX_QUEUE_SIZE = 32768
SECTOR = 512


@dataclass(frozen=True)
class BlkOptions:
    path: str
    read_only: bool = False
    cache: str = "writeback"
    serial: bytes = b""
    num_queues: int = 1
    queue_size: int = DEFAULT_QUEUE_SIZE
    image_format: str | None = None    # None: probed by the device


def _serial(text: str) -> bytes:
    raw = text.encode("ascii", "replace")
    if len(raw) > ID_BYTES or not all(0x20 <= c < 0x7F for c in raw):
        raise ValueError(f"must be at most {ID_BYTES} printable ASCII characters")
    return raw


OPTIONS = (
    Opt("ro", "read_only", flag_value=True),
    Opt("nocache", "cache", flag_value="direct"),
    Opt("cache", "cache", choice(*CACHE_MODES)),
    Opt("serial", "serial", _serial, aliases=("ser",)),
    Opt("format", "image_format", choice(*FORMATS)),
    Opt("num_queues", "num_queues", int_range(1, MAX_QUEUES)),
    Opt("queue_size", "queue_size", power_of_two(MIN_QUEUE_SIZE, MAX_QUEUE_SIZE)),
)
_DEFAULTS = {"read_only": False, "cache": "writeback", "serial": b"", "num_queues": 1,
             "queue_size": DEFAULT_QUEUE_SIZE, "image_format": None}


def parse(args) -> BlkOptions:
    """The slot's arguments (PATH first) -> BlkOptions, or OptionError."""
    if not isinstance(args, (list, tuple)) or not args or any(type(a) is not str for a in args):
        raise OptionError("virtio-blk: needs a disk image path: -s SLOT,virtio-blk,PATH[,OPTIONS]")
    path, rest = args[0], args[1:]
    if not path or "=" in path and path.split("=", 1)[0] in {o.name for o in OPTIONS} | {"ser"}:
        raise OptionError(f"virtio-blk: the first argument must be the disk image path, not {shorten(path)}")
    return BlkOptions(path, **parse_table("virtio-blk", OPTIONS, rest, _DEFAULTS))


def check_image(path: str, read_only: bool, image_format: str | None = None) -> None:
    """What the device will need of its image, checked by vmmd up front (OptionError):
    a regular file or block device, openable as the device will open it, not empty,
    and a raw image a whole number of sectors (a qcow2 image's metadata is checked
    by the device's own qcow2 parser)."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise OptionError(f"virtio-blk: image {path}: {exc.strerror}") from None
    if stat.S_ISDIR(st.st_mode):
        raise OptionError(f"virtio-blk: image {path}: is a directory")
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
        raise OptionError(f"virtio-blk: image {path}: not a regular file or block device")
    try:
        fd = os.open(path, (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC)
    except OSError as exc:
        how = "read" if read_only else "read and write (add ,ro for a read-only disk)"
        raise OptionError(f"virtio-blk: image {path}: cannot open to {how}: {exc.strerror}") from None
    try:
        size = os.lseek(fd, 0, os.SEEK_END)
        magic = os.pread(fd, len(QCOW2_MAGIC), 0)
    finally:
        os.close(fd)
    if size == 0:
        raise OptionError(f"virtio-blk: image {path}: is empty")
    qcow2 = image_format == "qcow2" or image_format is None and magic == QCOW2_MAGIC
    if not qcow2 and size % SECTOR:
        raise OptionError(f"virtio-blk: image {path}: size {size} is not a multiple of {SECTOR} bytes")
