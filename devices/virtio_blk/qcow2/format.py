"""qcow2 on-disk format, sans-I/O: parse and validate, encode, never read a file.

The contract is QEMU's docs/interop/qcow2.rst. Everything here takes bytes
(and the file size, so offsets can be bounded) and returns values or raises
Qcow2Error with a message naming the bad field; no other exception escapes
for any input (see fuzz_parse, the fuzzing entry point).

Supported: versions 2 (read) and 3 (read/write); cluster sizes 512 B-2 MiB;
refcount order 0-6 read, 4 write; deflate and zstd compressed clusters
(read); zero clusters; lazy refcounts; header extensions (backing format,
feature names kept; unknown ones preserved). Refused clearly: encryption,
external data files, extended L2 entries, unknown incompatible features.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, field, replace

try:    # imported now: a device process cannot load modules once jailed
    import zstandard
except ImportError:   # pragma: no cover - a declared dependency
    zstandard = None

MAGIC = b"QFI\xfb"
V2_HEADER = struct.Struct(">4sIQIIQIIQQIIQ")           # 72 bytes
V3_FIELDS = struct.Struct(">QQQII")                     # bytes 72..103
V3_HEADER_LENGTH = 112                                   # with compression_type + padding

MIN_CLUSTER_BITS = 9
MAX_CLUSTER_BITS = 21
MAX_L1_BYTES = 32 << 20          # QEMU's limit on the L1 table
MAX_REFTABLE_BYTES = 8 << 20     # QEMU's limit on the refcount table
MAX_VIRTUAL_SIZE = 1 << 61
MAX_HOST_OFFSET = 1 << 56
MAX_BACKING_NAME = 1023
MAX_SNAPSHOTS = 65536
MAX_EXTENSIONS = 64

# incompatible features
INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
INCOMPAT_KNOWN = INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_COMPRESSION
INCOMPAT_NAMES = {0: "dirty bit", 1: "corrupt bit", 2: "external data file",
                  3: "compression type", 4: "extended L2 entries"}
# compatible features
COMPAT_LAZY_REFCOUNTS = 1 << 0
# autoclear features
AUTOCLEAR_BITMAPS = 1 << 0
AUTOCLEAR_DATA_FILE_RAW = 1 << 1

COMPRESSION_DEFLATE = 0
COMPRESSION_ZSTD = 1
COMPRESSION_NAMES = {COMPRESSION_DEFLATE: "zlib", COMPRESSION_ZSTD: "zstd"}

# header extensions
EXT_END = 0
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857
EXT_BITMAPS = 0x23852875
EXT_CRYPTO = 0x0537BE77
EXT_DATA_FILE = 0x44415441

# L1/L2 entries
OFLAG_COPIED = 1 << 63
OFLAG_COMPRESSED = 1 << 62
OFLAG_ZERO = 1
L1E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L2E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L1E_RESERVED = 0x7F000000000001FF
L2E_STD_RESERVED = 0x3F000000000001FE
REFT_OFFSET_MASK = 0xFFFFFFFFFFFFFE00


class Qcow2Error(Exception):
    """The image is not a valid (or not a supported) qcow2 image; or a
    request cannot be served because of its metadata. Messages say why."""


@dataclass
class Header:
    version: int = 3
    backing_file_offset: int = 0
    backing_file_size: int = 0
    cluster_bits: int = 16
    size: int = 0
    crypt_method: int = 0
    l1_size: int = 0
    l1_table_offset: int = 0
    refcount_table_offset: int = 0
    refcount_table_clusters: int = 0
    nb_snapshots: int = 0
    snapshots_offset: int = 0
    incompatible: int = 0
    compatible: int = 0
    autoclear: int = 0
    refcount_order: int = 4
    header_length: int = V3_HEADER_LENGTH
    compression_type: int = COMPRESSION_DEFLATE
    backing_file: str | None = None
    backing_format: str | None = None
    # unknown extensions, kept verbatim: [(type, data)]
    extensions: list = field(default_factory=list)
    feature_names: dict = field(default_factory=dict)   # (kind, bit) -> name

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def l2_entries(self) -> int:
        return 1 << (self.cluster_bits - 3)

    @property
    def refcount_bits(self) -> int:
        return 1 << self.refcount_order

    @property
    def refblock_entries(self) -> int:
        return 1 << (self.cluster_bits + 3 - self.refcount_order)

    @property
    def dirty(self) -> bool:
        return bool(self.incompatible & INCOMPAT_DIRTY)

    @property
    def corrupt(self) -> bool:
        return bool(self.incompatible & INCOMPAT_CORRUPT)

    @property
    def lazy_refcounts(self) -> bool:
        return bool(self.compatible & COMPAT_LAZY_REFCOUNTS)


def l1_entries_for(size: int, cluster_bits: int) -> int:
    """L1 entries needed to map a virtual disk of `size` bytes."""
    per_l2 = 1 << (2 * cluster_bits - 3)
    return -(-size // per_l2)


def _feature_name(h: Header, kind: int, bit: int) -> str:
    name = h.feature_names.get((kind, bit))
    if name:
        return name
    if kind == 0 and bit in INCOMPAT_NAMES:
        return INCOMPAT_NAMES[bit]
    return f"bit {bit}"


def _check_range(what: str, offset: int, length: int, file_size: int, cluster_size: int) -> None:
    if offset % cluster_size:
        raise Qcow2Error(f"{what} offset {offset:#x} is not aligned to a cluster")
    if offset <= 0 or offset + length > file_size or offset >= MAX_HOST_OFFSET:
        raise Qcow2Error(f"{what} ({offset:#x}, {length} bytes) lies outside the image file "
                         f"({file_size} bytes) or over the header")


def parse_header(buf: bytes, file_size: int) -> Header:
    """The header (and its extensions) of an image whose first bytes are buf
    (at least the first cluster, or the whole file if shorter)."""
    buf = bytes(buf)
    if len(buf) < V2_HEADER.size or buf[:4] != MAGIC:
        raise Qcow2Error("not a qcow2 image (bad magic or truncated header)")
    (_, version, bfo, bfs, cluster_bits, size, crypt, l1_size, l1_off, rt_off, rt_clusters,
     nb_snap, snap_off) = V2_HEADER.unpack_from(buf)
    if version not in (2, 3):
        raise Qcow2Error(f"unsupported qcow2 version {version} (2 and 3 are supported)")
    if not MIN_CLUSTER_BITS <= cluster_bits <= MAX_CLUSTER_BITS:
        raise Qcow2Error(f"cluster size 2^{cluster_bits} is outside 512 B-2 MiB")
    h = Header(version=version, backing_file_offset=bfo, backing_file_size=bfs,
               cluster_bits=cluster_bits, size=size, crypt_method=crypt, l1_size=l1_size,
               l1_table_offset=l1_off, refcount_table_offset=rt_off,
               refcount_table_clusters=rt_clusters, nb_snapshots=nb_snap, snapshots_offset=snap_off)
    cs = h.cluster_size
    if len(buf) > cs:
        buf = buf[:cs]
    if version == 2:
        h.header_length = V2_HEADER.size
        h.refcount_order = 4
    else:
        if len(buf) < V2_HEADER.size + V3_FIELDS.size:
            raise Qcow2Error("truncated version 3 header")
        (h.incompatible, h.compatible, h.autoclear, h.refcount_order,
         h.header_length) = V3_FIELDS.unpack_from(buf, V2_HEADER.size)
        if h.header_length < 104 or h.header_length % 8 or h.header_length > min(cs, len(buf)):
            raise Qcow2Error(f"invalid header length {h.header_length}")
        if h.header_length > 104:
            h.compression_type = buf[104]
    _parse_extensions(h, buf)
    # Features: refuse what we do not implement, naming it.
    unknown = h.incompatible & ~INCOMPAT_KNOWN
    if unknown:
        names = [_feature_name(h, 0, b) for b in range(64) if unknown >> b & 1]
        raise Qcow2Error(f"unsupported incompatible qcow2 feature(s): {', '.join(names)}")
    if h.incompatible & INCOMPAT_COMPRESSION:
        if h.compression_type == COMPRESSION_DEFLATE:
            raise Qcow2Error("compression type bit set but compression_type is 0")
    elif h.compression_type != COMPRESSION_DEFLATE:
        raise Qcow2Error("compression_type set without the compression type feature bit")
    if h.compression_type not in COMPRESSION_NAMES:
        raise Qcow2Error(f"unknown compression type {h.compression_type}")
    if crypt:
        raise Qcow2Error("encrypted qcow2 images are not supported")
    if h.refcount_order > 6:
        raise Qcow2Error(f"refcount order {h.refcount_order} is larger than 6")
    if size > MAX_VIRTUAL_SIZE:
        raise Qcow2Error(f"virtual size {size} is too large")
    # Tables: inside the file, aligned, within QEMU's size limits.
    if l1_size > MAX_L1_BYTES // 8:
        raise Qcow2Error(f"L1 table of {l1_size} entries is too large")
    if l1_size < l1_entries_for(size, cluster_bits):
        raise Qcow2Error(f"L1 table of {l1_size} entries is too small for {size} bytes")
    if l1_size:
        _check_range("L1 table", l1_off, l1_size * 8, file_size, cs)
    if rt_clusters == 0 or rt_clusters > MAX_REFTABLE_BYTES >> cluster_bits:
        raise Qcow2Error(f"refcount table of {rt_clusters} clusters is empty or too large")
    _check_range("refcount table", rt_off, rt_clusters * cs, file_size, cs)
    if l1_size and _overlap(l1_off, l1_size * 8, rt_off, rt_clusters * cs):
        raise Qcow2Error("L1 table and refcount table overlap")
    if nb_snap:
        if nb_snap > MAX_SNAPSHOTS:
            raise Qcow2Error(f"{nb_snap} snapshots is too many")
        _check_range("snapshot table", snap_off, 40 * nb_snap, file_size, cs)
    if bfo:
        if bfs == 0 or bfs > MAX_BACKING_NAME or bfo + bfs > min(cs, len(buf)):
            raise Qcow2Error("invalid backing file name location or length")
        if bfo < h.header_length:
            raise Qcow2Error("backing file name overlaps the header")
        try:
            h.backing_file = buf[bfo:bfo + bfs].decode("utf-8")
        except UnicodeDecodeError:
            raise Qcow2Error("backing file name is not UTF-8") from None
        if "\0" in h.backing_file:
            raise Qcow2Error("backing file name contains a NUL byte")
    return h


def _overlap(a: int, alen: int, b: int, blen: int) -> bool:
    return a < b + blen and b < a + alen


def _parse_extensions(h: Header, buf: bytes) -> None:
    off = h.header_length
    end = h.backing_file_offset if h.backing_file_offset else len(buf)
    end = min(end, len(buf))
    seen: set[int] = set()
    for _ in range(MAX_EXTENSIONS):
        if off + 8 > end:
            if h.version == 2 and off + 8 > len(buf):
                return  # v2 images may end without an end marker
            raise Qcow2Error("header extensions run past the header area")
        etype, elen = struct.unpack_from(">II", buf, off)
        off += 8
        if etype == EXT_END:
            return
        if elen > end - off:
            raise Qcow2Error(f"header extension {etype:#x} is longer than the header area")
        data = buf[off:off + elen]
        off += (elen + 7) & ~7
        if etype in seen and etype != EXT_FEATURE_TABLE:
            raise Qcow2Error(f"header extension {etype:#x} appears twice")
        seen.add(etype)
        if etype == EXT_BACKING_FORMAT:
            try:
                h.backing_format = data.decode("ascii")
            except UnicodeDecodeError:
                raise Qcow2Error("backing format name is not ASCII") from None
        elif etype == EXT_FEATURE_TABLE:
            for i in range(0, len(data) - 47, 48):
                kind, bit = data[i], data[i + 1]
                name = data[i + 2:i + 48].split(b"\0", 1)[0].decode("ascii", "replace")
                h.feature_names[(kind, bit)] = name
        elif etype in (EXT_CRYPTO, EXT_DATA_FILE):
            raise Qcow2Error(f"header extension {etype:#x} (encryption / external data "
                             "file) is not supported")
        else:
            h.extensions.append((etype, data))
    raise Qcow2Error("too many header extensions")


FEATURE_TABLE = [(0, 0, "dirty bit"), (0, 1, "corrupt bit"), (0, 2, "external data file"),
                 (0, 3, "compression type"), (0, 4, "extended L2 entries"),
                 (1, 0, "lazy refcounts"), (2, 0, "bitmaps"), (2, 1, "raw external data")]


def encode_header(h: Header) -> bytes:
    """The header cluster's used bytes: header, extensions, backing file name.
    Sets backing_file_offset/size to where the name lands."""
    if h.version != 3:
        raise Qcow2Error("only version 3 headers are written")
    ext = bytearray()

    def add(etype: int, data: bytes) -> None:
        ext.extend(struct.pack(">II", etype, len(data)))
        ext.extend(data)
        ext.extend(bytes(-len(data) % 8))

    if h.backing_format:
        add(EXT_BACKING_FORMAT, h.backing_format.encode("ascii"))
    table = b"".join(struct.pack(">BB46s", k, b, n.encode()) for k, b, n in FEATURE_TABLE)
    add(EXT_FEATURE_TABLE, table)
    for etype, data in h.extensions:
        add(etype, bytes(data))
    ext.extend(bytes(8))
    name = h.backing_file.encode("utf-8") if h.backing_file else b""
    hdr_len = max(h.header_length, V3_HEADER_LENGTH)
    bfo = hdr_len + len(ext) if name else 0
    h.backing_file_offset, h.backing_file_size, h.header_length = bfo, len(name), hdr_len
    out = bytearray(V2_HEADER.pack(
        MAGIC, 3, bfo, len(name), h.cluster_bits, h.size, h.crypt_method, h.l1_size,
        h.l1_table_offset, h.refcount_table_offset, h.refcount_table_clusters, h.nb_snapshots,
        h.snapshots_offset))
    out += V3_FIELDS.pack(h.incompatible, h.compatible, h.autoclear, h.refcount_order, hdr_len)
    out += bytes([h.compression_type]) + bytes(hdr_len - 105)
    out += ext + name
    if len(out) > h.cluster_size:
        raise Qcow2Error("header, extensions and backing file name do not fit in one cluster")
    return bytes(out)


# --- L1 / L2 entries ------------------------------------------------------------------

UNALLOCATED, ZERO, NORMAL, COMPRESSED = range(4)
KIND_NAMES = ("unallocated", "zero", "normal", "compressed")


def l1_entry_offset(entry: int, h: Header, file_size: int) -> int:
    """The L2 table offset an L1 entry points at (0: none)."""
    if entry & L1E_RESERVED:
        raise Qcow2Error(f"L1 entry {entry:#x} has reserved bits set")
    off = entry & L1E_OFFSET_MASK
    if off:
        _check_range("L2 table", off, h.cluster_size, file_size, h.cluster_size)
    return off


def decode_l2_entry(entry: int, h: Header) -> tuple[int, int, int]:
    """L2 entry -> (kind, host offset, compressed byte count). For NORMAL the
    offset is cluster aligned; ZERO may carry a preallocated host offset."""
    if entry & OFLAG_COMPRESSED:
        if h.version >= 3 and entry & OFLAG_COPIED:
            raise Qcow2Error(f"compressed L2 entry {entry:#x} has the copied flag set")
        x = 62 - (h.cluster_bits - 8)
        off = entry & ((1 << x) - 1)
        if off >= MAX_HOST_OFFSET:
            raise Qcow2Error(f"compressed L2 entry {entry:#x} has an offset beyond 2^56")
        sectors = (entry >> x) & ((1 << (62 - x)) - 1)
        nbytes = (sectors + 1) * 512 - (off & 511)
        return COMPRESSED, off, nbytes
    if entry & L2E_STD_RESERVED:
        raise Qcow2Error(f"L2 entry {entry:#x} has reserved bits set")
    off = entry & L2E_OFFSET_MASK
    if off % h.cluster_size:
        raise Qcow2Error(f"L2 entry {entry:#x} points at an unaligned cluster")
    if entry & OFLAG_ZERO:
        if h.version < 3:
            raise Qcow2Error("zero cluster flag in a version 2 image")
        return ZERO, off, 0
    if off == 0:
        if entry & OFLAG_COPIED:
            raise Qcow2Error(f"L2 entry {entry:#x} has the copied flag but no offset")
        return UNALLOCATED, 0, 0
    return NORMAL, off, 0


def encode_compressed(host: int, nbytes: int, h: Header) -> int:
    x = 62 - (h.cluster_bits - 8)
    sectors = ((host & 511) + nbytes + 511) // 512 - 1
    if host >= 1 << x or sectors >= 1 << (62 - x):
        raise Qcow2Error("compressed cluster does not fit an L2 descriptor")
    return OFLAG_COMPRESSED | (sectors << x) | host


# --- refcounts -----------------------------------------------------------------------

def refcount_get(block, index: int, order: int) -> int:
    """Entry `index` of a refcount block (bytes) of the given order."""
    if order == 4:
        return block[2 * index] << 8 | block[2 * index + 1]
    bits = 1 << order
    if bits >= 8:
        n = bits // 8
        return int.from_bytes(block[index * n:(index + 1) * n], "big")
    per = 8 // bits
    byte = block[index // per]
    return (byte >> ((index % per) * bits)) & ((1 << bits) - 1)


def refcount_set(block: bytearray, index: int, order: int, value: int) -> None:
    bits = 1 << order
    if value < 0 or value >= 1 << bits:
        raise Qcow2Error(f"refcount {value} overflows a {bits}-bit refcount")
    if bits >= 8:
        n = bits // 8
        block[index * n:(index + 1) * n] = value.to_bytes(n, "big")
        return
    per = 8 // bits
    shift = (index % per) * bits
    mask = ((1 << bits) - 1) << shift
    block[index // per] = (block[index // per] & ~mask) | (value << shift)


def reftable_entry_offset(entry: int, h: Header, file_size: int) -> int:
    if entry & 0x1FF:
        raise Qcow2Error(f"refcount table entry {entry:#x} has reserved bits set")
    off = entry & REFT_OFFSET_MASK
    if off:
        _check_range("refcount block", off, h.cluster_size, file_size, h.cluster_size)
    return off


# --- compressed clusters ----------------------------------------------------------------

def decompress(data: bytes, compression_type: int, cluster_size: int) -> bytes:
    """One compressed cluster -> exactly cluster_size bytes. Output is bounded
    to one cluster (a decompression bomb stops there)."""
    try:
        if compression_type == COMPRESSION_DEFLATE:
            d = zlib.decompressobj(-15)
            out = d.decompress(data, cluster_size)
        elif compression_type == COMPRESSION_ZSTD:
            if zstandard is None:
                raise Qcow2Error("zstd compressed clusters need the zstandard package")
            out = _zstd_bounded(zstandard, data, cluster_size)
        else:
            raise Qcow2Error(f"unknown compression type {compression_type}")
    except Qcow2Error:
        raise
    except Exception as exc:
        raise Qcow2Error(f"compressed cluster does not decompress: {exc}") from None
    if len(out) != cluster_size:
        raise Qcow2Error(f"compressed cluster decompresses to {len(out)} bytes, "
                         f"not {cluster_size}")
    return out


def _zstd_bounded(zstandard, data: bytes, limit: int) -> bytes:
    # QEMU writes each cluster as zstd frames; stream-decode and stop at limit.
    dobj = zstandard.ZstdDecompressor().decompressobj()
    out = bytearray()
    pos = 0
    while pos < len(data) and len(out) < limit:
        chunk = data[pos:pos + 4096]
        pos += len(chunk)
        out += dobj.decompress(chunk)
        if len(out) > limit:
            del out[limit:]
        if dobj.eof:
            rest = dobj.unused_data
            if not rest or len(out) >= limit:
                break
            dobj = zstandard.ZstdDecompressor().decompressobj()
            data, pos = rest + data[pos:], 0
    return bytes(out)


def compress(data: bytes, compression_type: int) -> bytes:
    if compression_type == COMPRESSION_ZSTD:
        return zstandard.ZstdCompressor().compress(data)
    c = zlib.compressobj(6, zlib.DEFLATED, -15)
    return c.compress(data) + c.flush()


# --- a fresh image --------------------------------------------------------------------

def new_image(size: int, cluster_bits: int = 16, *, backing_file: str | None = None,
              backing_format: str | None = None, lazy_refcounts: bool = False,
              compression_type: int = COMPRESSION_DEFLATE) -> tuple[Header, bytes]:
    """(header, bytes of the metadata clusters) of an empty version 3 image:
    header, refcount table, one refcount block, L1 table, in that order."""
    if not MIN_CLUSTER_BITS <= cluster_bits <= MAX_CLUSTER_BITS:
        raise Qcow2Error("cluster size must be a power of two in 512 B-2 MiB")
    if size < 0 or size > MAX_VIRTUAL_SIZE:
        raise Qcow2Error(f"image size {size} is out of range")
    if backing_file is not None and len(backing_file.encode()) > MAX_BACKING_NAME:
        raise Qcow2Error("backing file name is longer than 1023 bytes")
    cs = 1 << cluster_bits
    l1_size = l1_entries_for(size, cluster_bits)
    if l1_size * 8 > MAX_L1_BYTES:
        raise Qcow2Error(f"image size {size} needs a larger cluster size")
    l1_clusters = max(1, -(-l1_size * 8 // cs))
    h = Header(cluster_bits=cluster_bits, size=size, l1_size=l1_size,
               refcount_table_offset=cs, refcount_table_clusters=1,
               l1_table_offset=3 * cs, backing_file=backing_file,
               backing_format=backing_format,
               compatible=COMPAT_LAZY_REFCOUNTS if lazy_refcounts else 0,
               compression_type=compression_type,
               incompatible=INCOMPAT_COMPRESSION if compression_type else 0)
    used = 3 + l1_clusters
    if used > h.refblock_entries:
        raise Qcow2Error("the L1 table is too large for this cluster size")
    header = encode_header(h)
    out = bytearray((3 + l1_clusters) * cs)
    out[:len(header)] = header
    struct.pack_into(">Q", out, cs, 2 * cs)                # reftable[0] -> refblock
    block = memoryview(out)[2 * cs:3 * cs]
    for i in range(used):
        struct.pack_into(">H", block, 2 * i, 1)
    return h, bytes(out)


def with_header(h: Header, **changes) -> Header:
    return replace(h, **changes)


# --- fuzzing entry point -------------------------------------------------------------------

def fuzz_parse(data: bytes) -> None:
    """Parse everything parseable from an image held in `data`: header, L1,
    every L2 table and every refcount block. Raises only Qcow2Error."""
    size = len(data)
    h = parse_header(data[:2 << 20], size)
    cs = h.cluster_size
    seen: set = set()     # each table / compressed cluster once: work stays O(len(data))
    for i in range(h.l1_size):
        e, = struct.unpack_from(">Q", data, h.l1_table_offset + 8 * i)
        l2 = l1_entry_offset(e, h, size)
        if not l2 or l2 in seen:
            continue
        seen.add(l2)
        for j in range(h.l2_entries):
            kind, off, n = decode_l2_entry(struct.unpack_from(">Q", data, l2 + 8 * j)[0], h)
            if kind == COMPRESSED and (off, n) not in seen:
                seen.add((off, n))
                if off + n > size:
                    raise Qcow2Error("compressed cluster lies outside the file")
                if len(seen) > 64:
                    continue   # bounded fuzzing cost: a few decompressions per input
                decompress(data[off:off + n], h.compression_type, cs)
    for i in range(h.refcount_table_clusters * cs // 8):
        e, = struct.unpack_from(">Q", data, h.refcount_table_offset + 8 * i)
        rb = reftable_entry_offset(e, h, size)
        if rb:
            block = data[rb:rb + cs]
            for k in range(0, h.refblock_entries, 97):
                refcount_get(block, k, h.refcount_order)
