"""virtio-blk requests, sans-I/O: parse and validate one descriptor chain.

A request (virtio 1.2, 5.2.6) is, as a byte stream over the chain:

    readable:  struct virtio_blk_outhdr { le32 type; le32 reserved; le64 sector; }
               then the payload: OUT data, or DISCARD / WRITE_ZEROES segments
               (struct virtio_blk_discard_write_zeroes { le64 sector;
               le32 num_sectors; le32 flags; }, flags bit 0 = UNMAP)
    writable:  IN data or the 20-byte GET_ID string, then one status byte
               (the last writable byte of the chain).

VERSION_1 implies ANY_LAYOUT, so nothing here assumes descriptor boundaries:
the header may share a descriptor with data, the status byte may share one
with IN data. Segments are lists of (gpa, length); this module slices them,
never touches memory itself except through the `read(gpa, n) -> bytes`
callable it is given for the (small, bounded) header and range payloads.

Everything a hostile guest can put in a chain ends as a Fail(status) op:
nothing here raises for guest input (a `read` that raises, e.g. on guest
memory outside RAM, propagates: the caller maps that to IOERR). Sector ranges
are checked against the capacity with Python ints, so no u64 wrap-around.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Callable, Sequence

SECTOR_SIZE = 512
SECTOR_SHIFT = 9

# Request types
T_IN = 0
T_OUT = 1
T_FLUSH = 4
T_GET_ID = 8
T_GET_LIFETIME = 10
T_DISCARD = 11
T_WRITE_ZEROES = 13
T_SECURE_ERASE = 14

TYPE_NAMES = {T_IN: "in", T_OUT: "out", T_FLUSH: "flush", T_GET_ID: "get_id",
              T_GET_LIFETIME: "get_lifetime", T_DISCARD: "discard",
              T_WRITE_ZEROES: "write_zeroes", T_SECURE_ERASE: "secure_erase"}

# Status values
S_OK = 0
S_IOERR = 1
S_UNSUPP = 2

# DISCARD / WRITE_ZEROES segment flags
FLAG_UNMAP = 1

ID_BYTES = 20

OUTHDR = struct.Struct("<IIQ")
RANGE = struct.Struct("<QII")
HEADER_SIZE = OUTHDR.size   # 16
RANGE_SIZE = RANGE.size     # 16

Segment = tuple[int, int]   # (guest-physical address, length)
Reader = Callable[[int, int], bytes]


@dataclass(frozen=True, slots=True)
class Limits:
    """What the device offers, as the parser needs it."""

    capacity: int                      # in 512-byte sectors
    read_only: bool = False
    seg_max: int = 254                 # data segments per IN/OUT request
    size_max: int = 1 << 32            # bytes per data segment
    discard: bool = False
    max_discard_sectors: int = 0
    max_discard_seg: int = 0
    write_zeroes: bool = False
    max_write_zeroes_sectors: int = 0
    max_write_zeroes_seg: int = 0


# --- operations ----------------------------------------------------------------

@dataclass(slots=True)
class Read:
    """Device -> guest: read nbytes at sector into segments (writable)."""
    sector: int
    segments: tuple[Segment, ...]
    nbytes: int


@dataclass(slots=True)
class Write:
    """Guest -> device: write nbytes from segments (readable) at sector."""
    sector: int
    segments: tuple[Segment, ...]
    nbytes: int


@dataclass(frozen=True, slots=True)
class Flush:
    pass


@dataclass(frozen=True, slots=True)
class GetId:
    """Write the serial, padded to nbytes (<= 20), into segments."""
    segments: tuple[Segment, ...]
    nbytes: int


@dataclass(frozen=True, slots=True)
class Discard:
    ranges: tuple[tuple[int, int], ...]   # (sector, num_sectors)


@dataclass(slots=True)
class WriteZeroes:
    ranges: tuple[tuple[int, int], ...]
    unmap: tuple[bool, ...]               # per range


@dataclass(frozen=True, slots=True)
class Fail:
    status: int
    reason: str


Op = Read | Write | Flush | GetId | Discard | WriteZeroes | Fail

FLUSH = Flush()


@dataclass(slots=True)
class Request:
    type: int | None          # None when the header could not be read
    op: Op
    status_gpa: int | None    # where the status byte goes; None: nowhere (no writable byte)


# --- segment arithmetic ------------------------------------------------------------

def total_len(segments: Sequence[Segment]) -> int:
    return sum(n for _, n in segments)


def split_at(segments: Sequence[Segment], n: int) -> tuple[tuple[Segment, ...], tuple[Segment, ...]]:
    """(the first n bytes, the rest) of a segment list; zero-length segments
    are dropped. If there are fewer than n bytes, the first part has them all."""
    head: list[Segment] = []
    rest: list[Segment] = []
    need = n
    for gpa, length in segments:
        if length <= 0:
            continue
        if need <= 0:
            rest.append((gpa, length))
        elif length <= need:
            head.append((gpa, length))
            need -= length
        else:
            head.append((gpa, need))
            rest.append((gpa + need, length - need))
            need = 0
    return tuple(head), tuple(rest)


def split_last_byte(segments: Sequence[Segment]) -> tuple[tuple[Segment, ...], int | None]:
    """(all but the last byte, gpa of the last byte); (.., None) if empty."""
    segs = [(g, n) for g, n in segments if n > 0]
    if not segs:
        return (), None
    gpa, n = segs[-1]
    if n == 1:
        segs.pop()
    else:
        segs[-1] = (gpa, n - 1)
    return tuple(segs), gpa + n - 1


def gather(read: Reader, segments: Sequence[Segment]) -> bytes:
    if len(segments) == 1:
        return read(*segments[0])
    return b"".join(read(g, n) for g, n in segments)


def aligned(segments: Sequence[Segment], align: int) -> bool:
    """Every segment starts and ends on an `align` boundary (O_DIRECT)."""
    mask = align - 1
    for gpa, n in segments:
        if gpa & mask or n & mask:
            return False
    return True


def in_capacity(sector: int, nsectors: int, capacity: int) -> bool:
    return 0 <= sector <= capacity and 0 <= nsectors <= capacity - sector


# --- parsing ------------------------------------------------------------------------

def parse_request(readable: Sequence[Segment], writable: Sequence[Segment],
                  limits: Limits, read: Reader) -> Request:
    """Classify and validate one chain. Never raises for guest input."""
    # Fast path, the layout Linux uses: the header alone in the first
    # readable descriptor, IN data (if any) then the status byte last.
    if readable and writable and readable[0][1] == HEADER_SIZE and writable[-1][1] > 0:
        gpa, n = writable[-1]
        status_gpa = gpa + n - 1
        if n == 1:
            data_out = tuple(writable[:-1])
        else:
            data_out = (*writable[:-1], (gpa, n - 1))
        rtype, _reserved, sector = OUTHDR.unpack(read(readable[0][0], HEADER_SIZE))
        if rtype == T_IN:
            if len(data_out) == 1 and data_out[0][1] > 0:
                nbytes = data_out[0][1]
                if (nbytes <= limits.size_max and not nbytes & (SECTOR_SIZE - 1)
                        and sector + (nbytes >> SECTOR_SHIFT) <= limits.capacity):
                    return Request(rtype, Read(sector, data_out, nbytes), status_gpa)
            return Request(rtype, _data_op(Read, sector, _nonempty(data_out), limits), status_gpa)
        return Request(rtype, _classify(rtype, sector, _nonempty(readable[1:]), _nonempty(data_out),
                                        limits, read), status_gpa)
    return parse_general(readable, writable, limits, read)


def parse_general(readable: Sequence[Segment], writable: Sequence[Segment],
                  limits: Limits, read: Reader) -> Request:
    """parse_request() for any layout (parse_request's fast path must agree)."""
    data_out, status_gpa = split_last_byte(writable)
    if status_gpa is None:
        return Request(None, Fail(S_IOERR, "no writable status byte"), None)
    hdr_segs, payload = split_at(readable, HEADER_SIZE)
    if total_len(hdr_segs) < HEADER_SIZE:
        return Request(None, Fail(S_IOERR, f"header shorter than {HEADER_SIZE} bytes"), status_gpa)
    rtype, _reserved, sector = OUTHDR.unpack(gather(read, hdr_segs))
    return Request(rtype, _classify(rtype, sector, payload, data_out, limits, read), status_gpa)


def _nonempty(segments: Sequence[Segment]) -> tuple[Segment, ...]:
    for _, n in segments:
        if n <= 0:
            return tuple(s for s in segments if s[1] > 0)
    return tuple(segments)


def _classify(rtype: int, sector: int, payload: tuple[Segment, ...], data_out: tuple[Segment, ...],
              limits: Limits, read: Reader) -> Op:
    if rtype == T_IN:
        return _data_op(Read, sector, data_out, limits)
    if rtype == T_OUT:
        if limits.read_only:
            return Fail(S_IOERR, "write to a read-only disk")
        return _data_op(Write, sector, payload, limits)
    if rtype == T_FLUSH:
        return FLUSH
    if rtype == T_GET_ID:
        n = min(ID_BYTES, total_len(data_out))
        segs, _ = split_at(data_out, n)
        return GetId(segs, n)
    if rtype == T_DISCARD:
        if not limits.discard:
            return Fail(S_UNSUPP, "discard not offered")
        if limits.read_only:
            return Fail(S_IOERR, "discard on a read-only disk")
        return _range_op(rtype, payload, limits.max_discard_seg, limits.max_discard_sectors,
                         limits.capacity, read)
    if rtype == T_WRITE_ZEROES:
        if not limits.write_zeroes:
            return Fail(S_UNSUPP, "write zeroes not offered")
        if limits.read_only:
            return Fail(S_IOERR, "write zeroes on a read-only disk")
        return _range_op(rtype, payload, limits.max_write_zeroes_seg,
                         limits.max_write_zeroes_sectors, limits.capacity, read)
    return Fail(S_UNSUPP, f"request type {rtype} not supported")


def _data_op(cls, sector: int, segments: tuple[Segment, ...], limits: Limits):
    if len(segments) > limits.seg_max:
        return Fail(S_IOERR, f"{len(segments)} data segments > seg_max {limits.seg_max}")
    nbytes = 0
    for _, n in segments:
        if n > limits.size_max:
            return Fail(S_IOERR, f"data segment of {n} bytes > size_max {limits.size_max}")
        nbytes += n
    if nbytes & (SECTOR_SIZE - 1):
        return Fail(S_IOERR, f"data length {nbytes} not a multiple of {SECTOR_SIZE}")
    if not in_capacity(sector, nbytes >> SECTOR_SHIFT, limits.capacity):
        return Fail(S_IOERR, f"sectors {sector}+{nbytes >> SECTOR_SHIFT} beyond capacity {limits.capacity}")
    return cls(sector, segments, nbytes)


def _range_op(rtype: int, payload: tuple[Segment, ...], max_seg: int, max_sectors: int,
              capacity: int, read: Reader) -> Op:
    size = total_len(payload)
    if size == 0 or size % RANGE_SIZE:
        return Fail(S_IOERR, f"range payload of {size} bytes is not n * {RANGE_SIZE}")
    count = size // RANGE_SIZE
    if count > max_seg:
        return Fail(S_IOERR, f"{count} ranges > max {max_seg}")
    return parse_ranges(rtype, gather(read, payload), max_sectors, capacity)


def parse_ranges(rtype: int, data: bytes, max_sectors: int, capacity: int) -> Op:
    """Validate DISCARD / WRITE_ZEROES segments (data is n * 16 bytes)."""
    ranges = []
    unmaps = []
    for sector, num, flags in RANGE.iter_unpack(data):
        if flags & ~FLAG_UNMAP:
            return Fail(S_UNSUPP, f"unknown range flags {flags:#x}")
        if rtype == T_DISCARD and flags & FLAG_UNMAP:
            return Fail(S_UNSUPP, "UNMAP flag on a discard")
        if num > max_sectors:
            return Fail(S_IOERR, f"range of {num} sectors > max {max_sectors}")
        if not in_capacity(sector, num, capacity):
            return Fail(S_IOERR, f"range {sector}+{num} beyond capacity {capacity}")
        ranges.append((sector, num))
        unmaps.append(bool(flags & FLAG_UNMAP))
    if rtype == T_DISCARD:
        return Discard(tuple(ranges))
    return WriteZeroes(tuple(ranges), tuple(unmaps))


def encode_id(serial: bytes, nbytes: int) -> bytes:
    """The GET_ID answer: the serial, NUL-padded (not terminated if 20 bytes)."""
    return serial[:nbytes].ljust(nbytes, b"\0")
