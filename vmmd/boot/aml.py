"""A tiny ACPI Machine Language (AML) encoder: just what vmmd's DSDT needs.

ACPI 6.5 chapter 20 ("ACPI Machine Language Specification") defines the byte
encoding. Every function here returns ``bytes``; callers concatenate them.
Supported terms:

  NameOp (0x08)      name(NameString, object)
  ScopeOp (0x10)     scope(NameString, *terms)
  DeviceOp (5B 82)   device(NameString, *terms)
  PackageOp (0x12)   package(*elements)   (elements: int, str, bytes = encoded)
  BufferOp (0x11)    buffer(data)
  integers           integer(v): ZeroOp, OneOp, OnesOp or Byte/Word/DWord/QWord prefix
  strings            string(s): StringPrefix 0x0D, ASCII, NUL
  EISA ids           eisa_id("PNP0A03") -> the DWord integer term
  PkgLength          pkg_length(n) for a body of n bytes
  resource templates resource_template(*descriptors) (a Buffer ending with an
                     End Tag) with io_port, word_bus_number, word_io,
                     dword_memory descriptors (ACPI 6.5 section 6.4)

Sans-I/O and pure; unit tests compare against byte sequences from the spec
and from compiled (iasl) tables.
"""

from __future__ import annotations

import struct

ZERO_OP = 0x00
ONE_OP = 0x01
NAME_OP = 0x08
BYTE_PREFIX = 0x0A
WORD_PREFIX = 0x0B
DWORD_PREFIX = 0x0C
STRING_PREFIX = 0x0D
QWORD_PREFIX = 0x0E
SCOPE_OP = 0x10
BUFFER_OP = 0x11
PACKAGE_OP = 0x12
EXT_OP_PREFIX = 0x5B
DEVICE_OP = 0x82  # after EXT_OP_PREFIX
ONES_OP = 0xFF
ROOT_CHAR = 0x5C  # '\'
PARENT_PREFIX = 0x5E  # '^'
DUAL_NAME_PREFIX = 0x2E
MULTI_NAME_PREFIX = 0x2F

PKG_LENGTH_MAX = (1 << 28) - 1


class AmlError(ValueError):
    """A value cannot be encoded in AML."""


def pkg_length(body_len: int) -> bytes:
    """PkgLength for a body of ``body_len`` bytes; the encoded length counts
    the PkgLength bytes themselves. One byte holds up to 63; otherwise bits
    7-6 of the lead byte give the number of following bytes (1-3), its bits
    3-0 the low nibble, and the following bytes the rest, least significant
    first."""
    if body_len < 0:
        raise AmlError("negative length")
    if body_len + 1 <= 0x3F:
        return bytes([body_len + 1])
    for extra in (1, 2, 3):
        total = body_len + 1 + extra
        if total < 1 << (4 + 8 * extra):
            out = [(extra << 6) | (total & 0x0F)]
            rest = total >> 4
            for _ in range(extra):
                out.append(rest & 0xFF)
                rest >>= 8
            return bytes(out)
    raise AmlError(f"package of {body_len} bytes is too long for a PkgLength")


def _name_seg(seg: str) -> bytes:
    """A 4-character NameSeg: a leading A-Z or '_', then A-Z, 0-9 or '_';
    shorter segments are padded with '_' as ASL does."""
    if not 1 <= len(seg) <= 4:
        raise AmlError(f"bad name segment {seg!r}")
    seg = seg.ljust(4, "_")
    if not (seg[0] == "_" or "A" <= seg[0] <= "Z"):
        raise AmlError(f"bad name segment {seg!r}")
    for c in seg[1:]:
        if not (c == "_" or "A" <= c <= "Z" or "0" <= c <= "9"):
            raise AmlError(f"bad name segment {seg!r}")
    return seg.encode("ascii")


def name_string(path: str) -> bytes:
    r"""NameString: optional root ('\') or parent ('^') prefixes, then one
    segment, a DualNamePath (2) or a MultiNamePath (3+), dot-separated."""
    prefix = b""
    i = 0
    while i < len(path) and path[i] in "\\^":
        prefix += path[i].encode()
        i += 1
    if prefix.count(b"\\") > 1 or (b"\\" in prefix and b"^" in prefix):
        raise AmlError(f"bad name {path!r}")
    rest = path[i:]
    segs = [_name_seg(s) for s in rest.split(".")] if rest else []
    if not segs:
        return prefix + b"\x00"  # NullName
    if len(segs) == 1:
        return prefix + segs[0]
    if len(segs) == 2:
        return prefix + bytes([DUAL_NAME_PREFIX]) + b"".join(segs)
    if len(segs) > 255:
        raise AmlError("name path too long")
    return prefix + bytes([MULTI_NAME_PREFIX, len(segs)]) + b"".join(segs)


def integer(value: int) -> bytes:
    """The shortest integer term: ZeroOp, OneOp, OnesOp (all ones, 64-bit) or
    a Byte/Word/DWord/QWord constant."""
    if not 0 <= value < 1 << 64:
        raise AmlError(f"integer {value} out of range")
    if value == 0:
        return bytes([ZERO_OP])
    if value == 1:
        return bytes([ONE_OP])
    if value == (1 << 64) - 1:
        return bytes([ONES_OP])
    if value <= 0xFF:
        return bytes([BYTE_PREFIX, value])
    if value <= 0xFFFF:
        return bytes([WORD_PREFIX]) + struct.pack("<H", value)
    if value <= 0xFFFFFFFF:
        return bytes([DWORD_PREFIX]) + struct.pack("<I", value)
    return bytes([QWORD_PREFIX]) + struct.pack("<Q", value)


def string(text: str) -> bytes:
    """String: 0x0D, ASCII characters 0x01-0x7F, NUL."""
    raw = text.encode("ascii")
    if b"\x00" in raw:
        raise AmlError("AML strings cannot hold NUL")
    return bytes([STRING_PREFIX]) + raw + b"\x00"


def _term(obj) -> bytes:
    """An already-encoded term (bytes), an int or a str."""
    if isinstance(obj, bool):
        raise AmlError("use 0/1, not bool")
    if isinstance(obj, int):
        return integer(obj)
    if isinstance(obj, str):
        return string(obj)
    if isinstance(obj, (bytes, bytearray)):
        return bytes(obj)
    raise AmlError(f"cannot encode {type(obj).__name__} as an AML term")


def name(path: str, obj) -> bytes:
    """DefName := NameOp NameString DataRefObject."""
    return bytes([NAME_OP]) + name_string(path) + _term(obj)


def package(*elements) -> bytes:
    """DefPackage := PackageOp PkgLength NumElements(byte) PackageElementList."""
    if len(elements) > 255:
        raise AmlError("a Package holds at most 255 elements (VarPackage not supported)")
    body = bytes([len(elements)]) + b"".join(_term(e) for e in elements)
    return bytes([PACKAGE_OP]) + pkg_length(len(body)) + body


def buffer(data: bytes) -> bytes:
    """DefBuffer := BufferOp PkgLength BufferSize(integer term) ByteList."""
    body = integer(len(data)) + bytes(data)
    return bytes([BUFFER_OP]) + pkg_length(len(body)) + body


def scope(path: str, *terms: bytes) -> bytes:
    """DefScope := ScopeOp PkgLength NameString TermList."""
    body = name_string(path) + b"".join(terms)
    return bytes([SCOPE_OP]) + pkg_length(len(body)) + body


def device(path: str, *terms: bytes) -> bytes:
    """DefDevice := ExtOpPrefix DeviceOp PkgLength NameString TermList."""
    body = name_string(path) + b"".join(terms)
    return bytes([EXT_OP_PREFIX, DEVICE_OP]) + pkg_length(len(body)) + body


def eisa_id(text: str) -> bytes:
    """EISAID("PNP0A03"): three letters (5 bits each, 'A' = 1) and four hex
    digits packed big-endian into a DWord, stored little-endian."""
    if len(text) != 7 or not text[:3].isalpha() or not text[:3].isupper():
        raise AmlError(f"bad EISA id {text!r}")
    try:
        product = int(text[3:], 16)
    except ValueError:
        raise AmlError(f"bad EISA id {text!r}") from None
    c = [ord(ch) - 0x40 for ch in text[:3]]
    vendor = (c[0] << 10) | (c[1] << 5) | c[2]
    value = ((vendor & 0xFF) << 8 | vendor >> 8) | ((product & 0xFF) << 24 | (product >> 8) << 16)
    return bytes([DWORD_PREFIX]) + struct.pack("<I", value)


# ---- resource descriptors (ACPI 6.5 section 6.4) ----

END_TAG = 0x79
IRQ_TAG = 0x22      # IRQ descriptor, 2-byte form: edge-triggered, active high
IO_PORT_TAG = 0x47
WORD_ADDRESS_TAG = 0x88
DWORD_ADDRESS_TAG = 0x87
RES_MEMORY = 0
RES_IO = 1
RES_BUS = 2
# general flags: bit 0 consumer, bit 1 subtractive decode, bit 2 min fixed, bit 3 max fixed
GEN_PRODUCER_FIXED = 0x0C
IO_ENTIRE_RANGE = 0x03
MEM_READ_WRITE = 0x01
MEM_CACHEABLE = 0x02


def io_port(base: int, length: int, align: int = 1) -> bytes:
    """IO(Decode16, base, base, align, length): small descriptor 0x47."""
    return struct.pack("<BBHHBB", IO_PORT_TAG, 0x01, base, base, align, length)


def irq_no_flags(*irqs: int) -> bytes:
    """IRQNoFlags(){irqs}: ISA IRQs, edge-triggered, active high (small descriptor 0x22)."""
    mask = 0
    for irq in irqs:
        if not 0 <= irq < 16:
            raise ValueError(f"ISA IRQ {irq} out of range")
        mask |= 1 << irq
    return struct.pack("<BH", IRQ_TAG, mask)


def _word_address(rtype: int, type_flags: int, lo: int, hi: int) -> bytes:
    return struct.pack("<BHBBBHHHHH", WORD_ADDRESS_TAG, 0x0D, rtype, GEN_PRODUCER_FIXED,
                       type_flags, 0, lo, hi, 0, hi - lo + 1)


def word_bus_number(lo: int, hi: int) -> bytes:
    """WordBusNumber(ResourceProducer, MinFixed, MaxFixed, PosDecode, 0, lo, hi, 0, n)."""
    return _word_address(RES_BUS, 0, lo, hi)


def word_io(lo: int, hi: int) -> bytes:
    """WordIO(ResourceProducer, MinFixed, MaxFixed, PosDecode, EntireRange, 0, lo, hi, 0, n)."""
    return _word_address(RES_IO, IO_ENTIRE_RANGE, lo, hi)


def dword_memory(lo: int, hi: int, cacheable: bool = False) -> bytes:
    """DWordMemory(ResourceProducer, PosDecode, MinFixed, MaxFixed,
    NonCacheable|Cacheable, ReadWrite, 0, lo, hi, 0, n)."""
    flags = MEM_READ_WRITE | (MEM_CACHEABLE if cacheable else 0)
    return struct.pack("<BHBBBIIIII", DWORD_ADDRESS_TAG, 0x17, RES_MEMORY, GEN_PRODUCER_FIXED,
                       flags, 0, lo, hi, 0, hi - lo + 1)


def resource_template(*descriptors: bytes) -> bytes:
    """ResourceTemplate(){...}: a Buffer of descriptors closed by an End Tag
    (checksum 0 = "treat as valid", as iasl emits)."""
    return buffer(b"".join(descriptors) + bytes([END_TAG, 0x00]))
