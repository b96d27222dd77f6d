"""A device's PCI declaration (HELLO info["pci"]), validated.

Device processes are untrusted: vmmd builds its routing (BAR windows, the
MSI-X table and PBA it emulates, ioeventfd addresses) from this declaration,
so every number is checked here and anything odd rejects the device at its
handshake (docs/architecture.md, "PCI and virtio").

    {"bars": [[index, size, kind], ...],     # kind "mem32" | "mem64" | "io"
     "msix": {"cap": off, "vectors": n, "table": [bar, off], "pba": [bar, off]} | null,
     "notify": {"bar": i, "offset": off, "multiplier": m, "queues": q} | null,
     "intx_pin": 0..4}
"""

from __future__ import annotations

from dataclasses import dataclass

BAR_KINDS = ("mem32", "mem64", "io")
NUM_BARS = 6
MAX_VECTORS = 2048
MAX_QUEUES = 1024
MIN_MEM_BAR = 16
MAX_MEM32_BAR = 1 << 31
MAX_MEM64_BAR = 1 << 40
MIN_IO_BAR = 4
MAX_IO_BAR = 256
CAP_MIN, CAP_MAX = 0x40, 0xF4  # a capability lives in the device-specific dwords
MSIX_ENTRY_SIZE = 16
NOTIFY_WIDTH = 4  # a notify write is 2 bytes (4 with notification data)
MAX_MULTIPLIER = 4096


class PciInfoError(ValueError):
    """The PCI declaration is malformed or unsafe."""


@dataclass(frozen=True)
class Bar:
    index: int
    size: int
    kind: str  # "mem32" | "mem64" | "io"

    @property
    def is_io(self) -> bool:
        return self.kind == "io"

    @property
    def is_64(self) -> bool:
        return self.kind == "mem64"


@dataclass(frozen=True)
class Msix:
    cap: int
    vectors: int
    table_bar: int
    table_offset: int
    pba_bar: int
    pba_offset: int

    @property
    def table_size(self) -> int:
        return self.vectors * MSIX_ENTRY_SIZE

    @property
    def pba_size(self) -> int:
        return (self.vectors + 63) // 64 * 8


@dataclass(frozen=True)
class Notify:
    bar: int
    offset: int
    multiplier: int
    queues: int

    def queue_offset(self, q: int) -> int:
        return self.offset + q * self.multiplier

    @property
    def span(self) -> int:
        return self.multiplier * (self.queues - 1) + NOTIFY_WIDTH


@dataclass(frozen=True)
class PciInfo:
    bars: tuple[Bar, ...]
    msix: Msix | None
    notify: Notify | None
    intx_pin: int

    def bar(self, index: int) -> Bar | None:
        for b in self.bars:
            if b.index == index:
                return b
        return None

    @property
    def vectors(self) -> int:
        return self.msix.vectors if self.msix else 0

    @property
    def queues(self) -> int:
        return self.notify.queues if self.notify else 0


def _int(v, what: str, lo: int, hi: int) -> int:
    if type(v) is not int or not lo <= v <= hi:
        raise PciInfoError(f"{what} must be an int in {lo}..{hi}, not {v!r}")
    return v


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _keys(obj, what: str, required: set[str]) -> dict:
    if type(obj) is not dict:
        raise PciInfoError(f"{what} must be a map, not {type(obj).__name__}")
    if set(obj) != required:
        raise PciInfoError(f"{what} must have exactly the keys {sorted(required)}, has {sorted(map(str, obj))}")
    return obj


def _bars(v) -> tuple[Bar, ...]:
    if type(v) is not list or len(v) > NUM_BARS:
        raise PciInfoError(f"bars must be a list of at most {NUM_BARS} [index, size, kind]")
    used: set[int] = set()
    out = []
    for item in v:
        if type(item) is not list or len(item) != 3:
            raise PciInfoError(f"a BAR must be [index, size, kind], not {item!r}")
        index = _int(item[0], "BAR index", 0, NUM_BARS - 1)
        kind = item[2]
        if kind not in BAR_KINDS:
            raise PciInfoError(f"BAR {index}: kind must be one of {BAR_KINDS}, not {kind!r}")
        if kind == "io":
            size = _int(item[1], f"BAR {index} size", MIN_IO_BAR, MAX_IO_BAR)
        elif kind == "mem32":
            size = _int(item[1], f"BAR {index} size", MIN_MEM_BAR, MAX_MEM32_BAR)
        else:
            size = _int(item[1], f"BAR {index} size", MIN_MEM_BAR, MAX_MEM64_BAR)
        if not _pow2(size):
            raise PciInfoError(f"BAR {index}: size {size:#x} is not a power of two")
        slots = {index, index + 1} if kind == "mem64" else {index}
        if kind == "mem64" and index == NUM_BARS - 1:
            raise PciInfoError(f"BAR {index}: a 64-bit BAR needs two slots")
        if slots & used:
            raise PciInfoError(f"BAR {index}: overlaps another BAR's slot")
        used |= slots
        out.append(Bar(index, size, kind))
    return tuple(sorted(out, key=lambda b: b.index))


def _region(bars: tuple[Bar, ...], bar_index, offset, length: int, what: str) -> tuple[int, int]:
    bar_index = _int(bar_index, f"{what} BAR", 0, NUM_BARS - 1)
    bar = next((b for b in bars if b.index == bar_index), None)
    if bar is None or bar.is_io:
        raise PciInfoError(f"{what}: BAR {bar_index} is not a declared memory BAR")
    offset = _int(offset, f"{what} offset", 0, bar.size)
    if offset + length > bar.size:
        raise PciInfoError(f"{what}: [{offset:#x}, +{length:#x}) does not fit BAR {bar_index} "
                           f"of {bar.size:#x} bytes")
    return bar_index, offset


def _msix(v, bars) -> Msix | None:
    if v is None:
        return None
    v = _keys(v, "msix", {"cap", "vectors", "table", "pba"})
    cap = _int(v["cap"], "msix cap", CAP_MIN, CAP_MAX)
    if cap % 4:
        raise PciInfoError(f"msix cap {cap:#x} is not dword aligned")
    vectors = _int(v["vectors"], "msix vectors", 1, MAX_VECTORS)
    for key in ("table", "pba"):
        if type(v[key]) is not list or len(v[key]) != 2:
            raise PciInfoError(f"msix {key} must be [bar, offset]")
    m = Msix(cap, vectors, 0, 0, 0, 0)
    tbar, toff = _region(bars, *v["table"], m.table_size, "msix table")
    pbar, poff = _region(bars, *v["pba"], m.pba_size, "msix pba")
    if toff % 8 or poff % 8:
        raise PciInfoError("msix table and pba offsets must be 8-byte aligned")
    if tbar == pbar and toff < poff + m.pba_size and poff < toff + m.table_size:
        raise PciInfoError("msix table and pba overlap")
    return Msix(cap, vectors, tbar, toff, pbar, poff)


def _notify(v, bars) -> Notify | None:
    if v is None:
        return None
    v = _keys(v, "notify", {"bar", "offset", "multiplier", "queues"})
    queues = _int(v["queues"], "notify queues", 1, MAX_QUEUES)
    mult = _int(v["multiplier"], "notify multiplier", 0, MAX_MULTIPLIER)
    if mult and (mult < 2 or not _pow2(mult)):
        raise PciInfoError(f"notify multiplier {mult} must be 0 or a power of two >= 2")
    if type(v["offset"]) is int and v["offset"] % 2:
        raise PciInfoError("notify offset must be 2-byte aligned")
    span = mult * (queues - 1) + NOTIFY_WIDTH
    bar, off = _region(bars, v["bar"], v["offset"], span, "notify region")
    return Notify(bar, off, mult, queues)


def _overlap(bar_a: int, off_a: int, len_a: int, bar_b: int, off_b: int, len_b: int) -> bool:
    return bar_a == bar_b and off_a < off_b + len_b and off_b < off_a + len_a


def parse_pci_info(obj) -> PciInfo:
    """HELLO info["pci"] -> PciInfo; PciInfoError says what is wrong."""
    obj = _keys(obj, "pci", {"bars", "msix", "notify", "intx_pin"})
    bars = _bars(obj["bars"])
    msix = _msix(obj["msix"], bars)
    notify = _notify(obj["notify"], bars)
    intx_pin = _int(obj["intx_pin"], "intx_pin", 0, 4)
    if msix and notify:
        for what, b, off, length in (("table", msix.table_bar, msix.table_offset, msix.table_size),
                                     ("pba", msix.pba_bar, msix.pba_offset, msix.pba_size)):
            if _overlap(b, off, length, notify.bar, notify.offset, notify.span):
                raise PciInfoError(f"msix {what} overlaps the notify region")
    return PciInfo(bars, msix, notify, intx_pin)


def to_wire(info: PciInfo) -> dict:
    """The inverse of parse_pci_info (for devices and tests)."""
    return {
        "bars": [[b.index, b.size, b.kind] for b in info.bars],
        "msix": None if info.msix is None else {
            "cap": info.msix.cap, "vectors": info.msix.vectors,
            "table": [info.msix.table_bar, info.msix.table_offset],
            "pba": [info.msix.pba_bar, info.msix.pba_offset]},
        "notify": None if info.notify is None else {
            "bar": info.notify.bar, "offset": info.notify.offset,
            "multiplier": info.notify.multiplier, "queues": info.notify.queues},
        "intx_pin": info.intx_pin,
    }
