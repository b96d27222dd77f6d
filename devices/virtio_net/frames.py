"""virtio-net, sans-I/O: feature bits, struct virtio_net_hdr, validation of
offload headers, Ethernet receive filtering and control-queue commands
(virtio 1.2, 5.1).

Nothing here does I/O or touches guest memory: every function takes bytes
(or ints) and returns values or raises FrameError, so the whole of it is
fuzzed in tests/unit/test_virtio_net_frames.py. Everything that comes from
the guest (tx headers, control commands) or from the backend (rx headers
written by the host kernel, datagrams from other VMs) is hostile input.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from devopts.virtio_net import parse_mac  # noqa: F401  (re-exported: frames' users parse MACs here)

# --- feature bits (5.1.3) ----------------------------------------------------------
F_CSUM = 0
F_GUEST_CSUM = 1
F_CTRL_GUEST_OFFLOADS = 2
F_MTU = 3
F_MAC = 5
F_GUEST_TSO4 = 7
F_GUEST_TSO6 = 8
F_GUEST_ECN = 9
F_GUEST_UFO = 10
F_HOST_TSO4 = 11
F_HOST_TSO6 = 12
F_HOST_ECN = 13
F_HOST_UFO = 14
F_MRG_RXBUF = 15
F_STATUS = 16
F_CTRL_VQ = 17
F_CTRL_RX = 18
F_CTRL_VLAN = 19
F_GUEST_ANNOUNCE = 21
F_MQ = 22
F_CTRL_MAC_ADDR = 23

FEATURE_NAMES = {
    F_CSUM: "CSUM", F_GUEST_CSUM: "GUEST_CSUM", F_CTRL_GUEST_OFFLOADS: "CTRL_GUEST_OFFLOADS",
    F_MTU: "MTU", F_MAC: "MAC", F_GUEST_TSO4: "GUEST_TSO4", F_GUEST_TSO6: "GUEST_TSO6",
    F_GUEST_ECN: "GUEST_ECN", F_GUEST_UFO: "GUEST_UFO", F_HOST_TSO4: "HOST_TSO4",
    F_HOST_TSO6: "HOST_TSO6", F_HOST_ECN: "HOST_ECN", F_HOST_UFO: "HOST_UFO",
    F_MRG_RXBUF: "MRG_RXBUF", F_STATUS: "STATUS", F_CTRL_VQ: "CTRL_VQ", F_CTRL_RX: "CTRL_RX",
    F_CTRL_VLAN: "CTRL_VLAN", F_GUEST_ANNOUNCE: "GUEST_ANNOUNCE", F_MQ: "MQ",
    F_CTRL_MAC_ADDR: "CTRL_MAC_ADDR",
}

# Feature -> features it needs (5.1.3.1): refused at FEATURES_OK otherwise.
DEPENDS = {
    F_GUEST_TSO4: (F_GUEST_CSUM,), F_GUEST_TSO6: (F_GUEST_CSUM,),
    F_GUEST_ECN: (F_GUEST_TSO4, F_GUEST_TSO6), F_GUEST_UFO: (F_GUEST_CSUM,),
    F_HOST_TSO4: (F_CSUM,), F_HOST_TSO6: (F_CSUM,), F_HOST_ECN: (F_HOST_TSO4, F_HOST_TSO6),
    F_HOST_UFO: (F_CSUM,),
    F_CTRL_RX: (F_CTRL_VQ,), F_CTRL_VLAN: (F_CTRL_VQ,), F_GUEST_ANNOUNCE: (F_CTRL_VQ,),
    F_MQ: (F_CTRL_VQ,), F_CTRL_MAC_ADDR: (F_CTRL_VQ,),
}
# ECN needs at least one of its TSO bits (any), the others need all of theirs.
_ANY_OF = {F_GUEST_ECN, F_HOST_ECN}


def features_consistent(features: int) -> str | None:
    """None if the feature set respects 5.1.3.1, else why not."""
    for bit, needs in DEPENDS.items():
        if not features >> bit & 1:
            continue
        have = [features >> n & 1 for n in needs]
        ok = any(have) if bit in _ANY_OF else all(have)
        if not ok:
            return (f"{FEATURE_NAMES[bit]} needs "
                    f"{' or '.join(FEATURE_NAMES[n] for n in needs) if bit in _ANY_OF else ' and '.join(FEATURE_NAMES[n] for n in needs)}")
    return None


# --- struct virtio_net_hdr (5.1.6) ----------------------------------------------------
HDR = struct.Struct("<BBHHHHH")
HDR_SIZE = HDR.size   # 12: VERSION_1 always has num_buffers

HDR_F_NEEDS_CSUM = 1
HDR_F_DATA_VALID = 2
HDR_F_RSC_INFO = 4
HDR_FLAGS_KNOWN = HDR_F_NEEDS_CSUM | HDR_F_DATA_VALID | HDR_F_RSC_INFO

GSO_NONE = 0
GSO_TCPV4 = 1
GSO_UDP = 3
GSO_TCPV6 = 4
GSO_UDP_L4 = 5
GSO_ECN = 0x80
GSO_NAMES = {GSO_NONE: "none", GSO_TCPV4: "tcpv4", GSO_UDP: "udp", GSO_TCPV6: "tcpv6",
             GSO_UDP_L4: "udp_l4"}

ETH_HLEN = 14
ETH_ALEN = 6
MIN_FRAME = ETH_HLEN           # a frame must at least carry an Ethernet header
MAX_FRAME = 65535 + ETH_HLEN + 4  # a GSO super-frame: 64 KiB IP datagram + Ethernet + VLAN tag
MAX_PLAIN_FRAME = 9216 + ETH_HLEN + 4  # without GSO: jumbo frames at most


class FrameError(ValueError):
    """A header or frame is malformed; the frame is dropped and counted."""


@dataclass(frozen=True)
class NetHdr:
    flags: int = 0
    gso_type: int = GSO_NONE
    hdr_len: int = 0
    gso_size: int = 0
    csum_start: int = 0
    csum_offset: int = 0
    num_buffers: int = 0

    def pack(self) -> bytes:
        return HDR.pack(self.flags, self.gso_type, self.hdr_len, self.gso_size,
                        self.csum_start, self.csum_offset, self.num_buffers)

    @property
    def gso(self) -> int:
        return self.gso_type & ~GSO_ECN


EMPTY_HDR = NetHdr().pack()


def parse_hdr(data) -> NetHdr:
    if len(data) < HDR_SIZE:
        raise FrameError(f"virtio_net_hdr needs {HDR_SIZE} bytes, got {len(data)}")
    return NetHdr(*HDR.unpack_from(data, 0))


def with_num_buffers(hdr: bytes, n: int) -> bytes:
    return hdr[:10] + struct.pack("<H", n)


def _gso_allowed(gso: int, ecn: bool, tso4: bool, tso6: bool, ufo: bool, ecn_ok: bool) -> bool:
    if ecn and not ecn_ok:
        return False
    return (gso == GSO_TCPV4 and tso4) or (gso == GSO_TCPV6 and tso6) or (gso == GSO_UDP and ufo)


def validate(hdr: NetHdr, frame_len: int, *, csum: bool, tso4: bool, tso6: bool,
             ufo: bool = False, ecn: bool = False, data_valid_ok: bool = False) -> None:
    """Check one header against the frame length and the offloads in force;
    raise FrameError. csum/tso4/... are what the header's *receiver* accepts:
    for tx the negotiated CSUM/HOST_TSO*, for rx GUEST_CSUM/GUEST_TSO*."""
    if frame_len < MIN_FRAME:
        raise FrameError(f"frame of {frame_len} bytes is shorter than an Ethernet header")
    if hdr.flags & ~HDR_FLAGS_KNOWN:
        raise FrameError(f"unknown header flags {hdr.flags:#x}")
    if hdr.flags & HDR_F_RSC_INFO:
        raise FrameError("RSC_INFO without RSC_EXT")
    if hdr.flags & HDR_F_DATA_VALID and not data_valid_ok:
        raise FrameError("DATA_VALID is only meaningful on receive")
    if hdr.flags & HDR_F_NEEDS_CSUM:
        if not csum:
            raise FrameError("NEEDS_CSUM without checksum offload")
        if hdr.csum_start + hdr.csum_offset + 2 > frame_len:
            raise FrameError(f"checksum at {hdr.csum_start}+{hdr.csum_offset} outside the "
                             f"{frame_len}-byte frame")
        if hdr.csum_start < ETH_HLEN:
            raise FrameError(f"csum_start {hdr.csum_start} inside the Ethernet header")
    gso = hdr.gso
    if gso == GSO_NONE:
        if hdr.gso_type & GSO_ECN:
            raise FrameError("ECN bit without GSO")
        if frame_len > MAX_PLAIN_FRAME:
            raise FrameError(f"frame of {frame_len} bytes without GSO")
        return
    if gso not in GSO_NAMES or not _gso_allowed(gso, bool(hdr.gso_type & GSO_ECN), tso4, tso6,
                                                 ufo, ecn):
        raise FrameError(f"gso_type {hdr.gso_type:#x} not negotiated")
    if not hdr.flags & HDR_F_NEEDS_CSUM:
        raise FrameError("GSO without NEEDS_CSUM")
    if hdr.gso_size == 0:
        raise FrameError("GSO with gso_size 0")
    if frame_len > MAX_FRAME:
        raise FrameError(f"GSO frame of {frame_len} bytes")
    if hdr.hdr_len > frame_len:
        raise FrameError(f"hdr_len {hdr.hdr_len} beyond the {frame_len}-byte frame")


# --- Ethernet receive filter (5.1.6.5) --------------------------------------------------
BROADCAST = b"\xff" * 6


def format_mac(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


MAX_MAC_TABLE = 64   # entries per table we keep; more -> the table "overflows" to all


@dataclass
class RxFilter:
    """The control queue's receive mode (VIRTIO_NET_CTRL_RX) and MAC tables
    (VIRTIO_NET_CTRL_MAC). Power-on: promiscuous (as QEMU; a driver with
    CTRL_RX sets the real mode at once)."""
    promisc: bool = True
    allmulti: bool = False
    alluni: bool = False
    nomulti: bool = False
    nouni: bool = False
    nobcast: bool = False
    uni: list = field(default_factory=list)     # extra unicast MACs
    multi: list = field(default_factory=list)   # multicast MACs
    uni_overflow: bool = False
    multi_overflow: bool = False

    def accepts(self, frame, mac: bytes) -> bool:
        dst = bytes(frame[:6])
        if len(dst) < 6:   # not even a destination address (fuzzing found the IndexError)
            return False
        if self.promisc:
            return True
        if dst == BROADCAST:
            return not self.nobcast
        if dst[0] & 1:
            if self.nomulti:
                return False
            return self.allmulti or self.multi_overflow or dst in self.multi
        if self.nouni:
            return False
        return dst == mac or self.alluni or self.uni_overflow or dst in self.uni

    def save(self) -> dict:
        return {"promisc": self.promisc, "allmulti": self.allmulti, "alluni": self.alluni,
                "nomulti": self.nomulti, "nouni": self.nouni, "nobcast": self.nobcast,
                "uni": [bytes(m) for m in self.uni], "multi": [bytes(m) for m in self.multi],
                "uni_overflow": self.uni_overflow, "multi_overflow": self.multi_overflow}

    @classmethod
    def load(cls, d) -> "RxFilter":
        if not isinstance(d, dict) or set(d) != set(cls().save()):
            raise ValueError("rx filter state: wrong keys")
        for k, v in d.items():
            if k in ("uni", "multi"):
                if (not isinstance(v, list) or len(v) > MAX_MAC_TABLE
                        or any(not isinstance(m, (bytes, bytearray)) or len(m) != 6 for m in v)):
                    raise ValueError(f"rx filter state {k}: a list of 6-byte MACs")
            elif type(v) is not bool:
                raise ValueError(f"rx filter state {k}: expected bool")
        return cls(**{k: ([bytes(m) for m in v] if k in ("uni", "multi") else v)
                      for k, v in d.items()})


# --- control queue (5.1.6.5) ----------------------------------------------------------------
CTRL_HDR = struct.Struct("<BB")
OK, ERR = 0, 1

CLASS_RX = 0
RX_PROMISC, RX_ALLMULTI, RX_ALLUNI, RX_NOMULTI, RX_NOUNI, RX_NOBCAST = range(6)
_RX_FIELDS = ("promisc", "allmulti", "alluni", "nomulti", "nouni", "nobcast")
CLASS_MAC = 1
MAC_TABLE_SET, MAC_ADDR_SET = 0, 1
CLASS_VLAN = 2
CLASS_ANNOUNCE = 3
CLASS_MQ = 4
CLASS_GUEST_OFFLOADS = 5
GUEST_OFFLOADS_SET = 0
MAX_CTRL_DATA = 8 + 2 * 6 * 4096   # two MAC tables of a few thousand entries at most


@dataclass(frozen=True)
class CtrlResult:
    ack: int
    reason: str = ""
    mac: bytes | None = None       # MAC_ADDR_SET: the new address
    offloads: int | None = None    # GUEST_OFFLOADS_SET


def parse_mac_tables(data: bytes) -> tuple[list, bool, list, bool]:
    """MAC_TABLE_SET payload: two struct virtio_net_ctrl_mac {le32 entries; u8 macs[][6]}."""
    tables = []
    off = 0
    for _ in range(2):
        if off + 4 > len(data):
            raise FrameError("MAC table truncated")
        (n,) = struct.unpack_from("<I", data, off)
        off += 4
        if n > (len(data) - off) // 6:
            raise FrameError(f"MAC table of {n} entries longer than the command")
        macs = [bytes(data[off + 6 * i: off + 6 * i + 6]) for i in range(n)]
        off += 6 * n
        tables.append(macs)
    if off != len(data):
        raise FrameError(f"{len(data) - off} trailing bytes after the MAC tables")
    uni, multi = tables
    return (uni[:MAX_MAC_TABLE], len(uni) > MAX_MAC_TABLE,
            multi[:MAX_MAC_TABLE], len(multi) > MAX_MAC_TABLE)


def handle_ctrl(cmd: bytes, rx: RxFilter, features: int, *, offloadable: int = 0) -> CtrlResult:
    """Apply one control command (class, command, data) to `rx`. `offloadable`:
    the GUEST_* offload bits the driver may switch with GUEST_OFFLOADS_SET."""
    if len(cmd) < CTRL_HDR.size:
        return CtrlResult(ERR, "command shorter than its header")
    cls, op = CTRL_HDR.unpack_from(cmd, 0)
    data = bytes(cmd[CTRL_HDR.size:])
    if cls == CLASS_RX and features >> F_CTRL_RX & 1:
        if op >= len(_RX_FIELDS) or len(data) != 1:
            return CtrlResult(ERR, f"bad RX command {op} ({len(data)} bytes)")
        setattr(rx, _RX_FIELDS[op], bool(data[0]))
        return CtrlResult(OK)
    if cls == CLASS_MAC:
        if op == MAC_ADDR_SET and features >> F_CTRL_MAC_ADDR & 1:
            if len(data) != 6 or data[0] & 1:
                return CtrlResult(ERR, "MAC_ADDR_SET needs one unicast MAC")
            return CtrlResult(OK, mac=data)
        if op == MAC_TABLE_SET and features >> F_CTRL_RX & 1:
            try:
                uni, uo, multi, mo = parse_mac_tables(data)
            except FrameError as exc:
                return CtrlResult(ERR, str(exc))
            rx.uni, rx.uni_overflow, rx.multi, rx.multi_overflow = uni, uo, multi, mo
            return CtrlResult(OK)
        return CtrlResult(ERR, f"MAC command {op} not negotiated")
    if cls == CLASS_GUEST_OFFLOADS and features >> F_CTRL_GUEST_OFFLOADS & 1:
        if op != GUEST_OFFLOADS_SET or len(data) != 8:
            return CtrlResult(ERR, "GUEST_OFFLOADS_SET needs a le64")
        (want,) = struct.unpack("<Q", data)
        if want & ~offloadable:
            return CtrlResult(ERR, f"offloads {want:#x} beyond {offloadable:#x}")
        return CtrlResult(OK, offloads=want)
    return CtrlResult(ERR, f"class {cls} command {op} not supported")


# --- small builders (tests, the switch, the benchmark) -------------------------------------------

def eth_header(dst: bytes, src: bytes, ethertype: int) -> bytes:
    return dst + src + struct.pack("!H", ethertype)


def src_mac(frame) -> bytes:
    return bytes(frame[6:12])


def dst_mac(frame) -> bytes:
    return bytes(frame[0:6])
