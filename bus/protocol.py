"""The device bus protocol, sans-I/O: message objects <-> validated bytes.

Every frame is a msgpack array `[type, field, ...]` (docs/architecture.md,
"The bus"). Device processes are untrusted, so decoding is strict: exact
arity, exact types (a bool is not an int), value ranges, bounded sizes.
Anything else raises ProtocolError and nothing else: the decoders catch
every failure of the msgpack layer too, so a caller needs one except clause.

encode() runs the same checks on outgoing messages, so a buggy sender finds
out locally instead of making the peer drop its frames.
"""

from __future__ import annotations

import reprlib
from enum import IntEnum
from typing import Any, Callable, NamedTuple, Union

import msgpack

from bus.types import ACCESS_SIZES, CONTROL_OPS, IoRange, IoSpace, MsgType

__all__ = [
    "ProtocolError", "ErrorCode", "Message",
    "Hello", "Welcome", "Read", "ReadReply", "Write", "Control", "ControlReply",
    "IrqLine", "Msi", "Checkpoint", "Request", "Log", "Error", "Vector",
    "encode", "decode_from_device", "decode_from_vmm", "frame_type",
    "FROM_DEVICE", "FROM_VMM", "REQ_FROM_DEVICE", "EVT_FROM_DEVICE",
    "MAX_FRAME", "MAX_SMALL_FRAME", "MAX_NAME_LEN", "MAX_TEXT_LEN", "MAX_RANGES",
    "REQUESTS", "LOG_LEVEL_MAX", "MSI_ADDRESS_BASE", "MSI_ADDRESS_SIZE", "MAX_VECTORS",
]

# Only frames that carry device state may be large; everything else is tiny.
MAX_FRAME = 16 << 20
MAX_SMALL_FRAME = 64 << 10
# Caps on msgpack containers inside a large frame (bounds memory blow-up).
_MAX_CONTAINER_LEN = 1 << 18

MAX_NAME_LEN = 64     # kind, instance, device id, control op, request name
MAX_TEXT_LEN = 4096   # reasons, log lines, error texts
MAX_RANGES = 64
PIO_SPACE_END = 0x10000
GSI_COUNT = 1024
LOG_LEVEL_MAX = 50    # Python logging levels: 0 (NOTSET) .. 50 (CRITICAL)
REQUESTS = frozenset({"quit", "reset"})
# x86 MSIs are writes into the local APIC window; the high half of the
# address may carry extended destination bits.
MSI_ADDRESS_BASE = 0xFEE00000
MSI_ADDRESS_SIZE = 0x100000
MAX_VECTORS = 2048    # MSI-X table size limit


class ProtocolError(Exception):
    """A frame (incoming or outgoing) does not follow the bus protocol."""


class ErrorCode(IntEnum):
    """Codes of ERROR messages. Unknown codes (< 2**16) decode as plain ints."""
    MALFORMED = 1      # the peer sent a frame that failed to decode
    UNEXPECTED = 2     # a valid message at the wrong time or on the wrong channel
    VERSION = 3        # protocol version not supported
    DEVICE_FAULT = 4   # the device model raised while handling a request
    INTERNAL = 5       # any other failure on the sender's side


# --- messages ---------------------------------------------------------------
# NamedTuples: cheap to build and unpack on the hot path. TYPE is a class
# attribute, not a field.

class Hello(NamedTuple):
    version: int
    kind: str
    instance: str
    ranges: tuple[IoRange, ...]
    info: dict
    TYPE = MsgType.HELLO

    def _wire(self) -> list:
        ranges = self.ranges
        if isinstance(ranges, (list, tuple)):
            ranges = [[int(r.space), r.base, r.length] if isinstance(r, IoRange) else r for r in ranges]
        return [self.version, self.kind, self.instance, ranges, self.info]


class Welcome(NamedTuple):
    version: int
    device_id: str
    accepted: bool
    reason: str
    TYPE = MsgType.WELCOME


class Read(NamedTuple):
    seq: int
    space: IoSpace
    addr: int
    size: int
    TYPE = MsgType.READ


class ReadReply(NamedTuple):
    seq: int
    value: int
    TYPE = MsgType.READ_REPLY


class Write(NamedTuple):
    space: IoSpace
    addr: int
    size: int
    value: int
    TYPE = MsgType.WRITE


class Control(NamedTuple):
    seq: int
    op: str
    args: dict
    TYPE = MsgType.CONTROL


class ControlReply(NamedTuple):
    seq: int
    ok: bool
    result: Any    # any msgpack value when ok, else the error text (str)
    TYPE = MsgType.CONTROL_REPLY


class IrqLine(NamedTuple):
    gsi: int
    level: int     # 0 or 1
    TYPE = MsgType.IRQ_LINE


class Msi(NamedTuple):
    address: int
    data: int
    TYPE = MsgType.MSI


class Checkpoint(NamedTuple):
    state: dict
    applied: int = 0   # READs and WRITEs the device had handled when it saved `state`
    TYPE = MsgType.CHECKPOINT


class Request(NamedTuple):
    what: str
    args: dict
    TYPE = MsgType.REQUEST


class Log(NamedTuple):
    level: int
    text: str
    TYPE = MsgType.LOG


class Error(NamedTuple):
    code: int
    text: str
    TYPE = MsgType.ERROR


class Vector(NamedTuple):
    """Bus-only mode: MSI-X vector `vector` fired (vmmd applies the table and masks)."""
    vector: int
    TYPE = MsgType.VECTOR


Message = Union[Hello, Welcome, Read, ReadReply, Write, Control, ControlReply,
                IrqLine, Msi, Checkpoint, Request, Log, Error, Vector]

FROM_DEVICE = frozenset({MsgType.HELLO, MsgType.READ_REPLY, MsgType.CONTROL_REPLY, MsgType.IRQ_LINE,
                         MsgType.MSI, MsgType.CHECKPOINT, MsgType.REQUEST, MsgType.LOG, MsgType.ERROR,
                         MsgType.VECTOR})
FROM_VMM = frozenset({MsgType.WELCOME, MsgType.READ, MsgType.WRITE, MsgType.CONTROL, MsgType.ERROR})
# Which device messages belong on which socket (endpoint.py enforces it).
REQ_FROM_DEVICE = frozenset({MsgType.HELLO, MsgType.READ_REPLY, MsgType.CONTROL_REPLY, MsgType.ERROR})
EVT_FROM_DEVICE = frozenset({MsgType.IRQ_LINE, MsgType.MSI, MsgType.CHECKPOINT, MsgType.REQUEST,
                             MsgType.LOG, MsgType.ERROR, MsgType.VECTOR})
_ALL_TYPES = FROM_DEVICE | FROM_VMM
_LARGE_TYPES = frozenset({MsgType.CONTROL, MsgType.CONTROL_REPLY, MsgType.CHECKPOINT})


# --- field checks -------------------------------------------------------------

_repr = reprlib.Repr()
_repr.maxstring = 80
_repr.maxother = 40
_repr.maxlong = 40


def _fail(what: str, value: Any) -> ProtocolError:
    return ProtocolError(f"{what}: bad value {_repr.repr(value)}")


def _uint(v: Any, bits: int, what: str) -> int:
    if type(v) is not int or not 0 <= v < (1 << bits):
        raise _fail(f"{what} must be an unsigned {bits}-bit int", v)
    return v


def _str(v: Any, max_len: int, what: str, *, empty_ok: bool = True) -> str:
    if type(v) is not str or len(v) > max_len or (not empty_ok and not v):
        raise _fail(f"{what} must be a str of {'0' if empty_ok else '1'}..{max_len} chars", v)
    return v


def _bool(v: Any, what: str) -> bool:
    if type(v) is not bool:
        raise _fail(f"{what} must be a bool", v)
    return v


def _map(v: Any, what: str) -> dict:
    # Values are any msgpack value; the unpacker already rejected ext types.
    if type(v) is not dict or any(type(k) is not str for k in v):
        raise _fail(f"{what} must be a map with str keys", v)
    return v


_SPACES = {int(s): s for s in IoSpace}


def _space(v: Any) -> IoSpace:
    if type(v) is not int or v not in _SPACES:
        raise _fail("space must be one of " + ", ".join(f"{int(s)} ({s.name})" for s in IoSpace), v)
    return _SPACES[v]


def _access(space_v: Any, addr_v: Any, size_v: Any) -> tuple[IoSpace, int, int]:
    space = _space(space_v)
    addr = _uint(addr_v, 64, "addr")
    if type(size_v) is not int or size_v not in ACCESS_SIZES:
        raise _fail("size must be 1, 2, 4 or 8", size_v)
    end = addr + size_v
    if end > 1 << 64 or (space is IoSpace.PIO and end > PIO_SPACE_END):
        raise ProtocolError(f"access {space.name} {addr:#x}+{size_v} is outside the address space")
    return space, addr, size_v


def _ranges(v: Any) -> tuple[IoRange, ...]:
    if type(v) is not list or len(v) > MAX_RANGES:
        raise _fail(f"ranges must be a list of at most {MAX_RANGES} ranges", v)
    out = []
    for item in v:
        if type(item) is not list or len(item) != 3:
            raise _fail("a range must be [space, base, length]", item)
        space = _space(item[0])
        base = _uint(item[1], 64, "range base")
        length = _uint(item[2], 64, "range length")
        limit = PIO_SPACE_END if space is IoSpace.PIO else 1 << 64
        if length == 0 or base + length > limit:
            raise _fail(f"range must be non-empty and inside {space.name} space", item)
        out.append(IoRange(space, base, length))
    ordered = sorted(out, key=lambda r: (r.space, r.base))
    for a, b in zip(ordered, ordered[1:]):
        if a.space == b.space and a.end > b.base:
            raise ProtocolError(f"ranges overlap: {a} and {b}")
    return tuple(out)


# --- per-type parsers: list of fields (after the type) -> message ---------------

def _p_hello(f: list) -> Hello:
    return Hello(_uint(f[0], 16, "version"), _str(f[1], MAX_NAME_LEN, "kind", empty_ok=False),
                 _str(f[2], MAX_NAME_LEN, "instance"), _ranges(f[3]), _map(f[4], "info"))


def _p_welcome(f: list) -> Welcome:
    return Welcome(_uint(f[0], 16, "version"), _str(f[1], MAX_NAME_LEN, "device_id", empty_ok=False),
                   _bool(f[2], "accepted"), _str(f[3], MAX_TEXT_LEN, "reason"))


def _p_read(f: list) -> Read:
    return Read(_uint(f[0], 32, "seq"), *_access(f[1], f[2], f[3]))


def _p_read_reply(f: list) -> ReadReply:
    # The width is checked against the request by whoever matched the seq.
    return ReadReply(_uint(f[0], 32, "seq"), _uint(f[1], 64, "value"))


def _p_write(f: list) -> Write:
    space, addr, size = _access(f[0], f[1], f[2])
    return Write(space, addr, size, _uint(f[3], 8 * size, f"value of a {size}-byte write"))


def _p_control(f: list) -> Control:
    seq = _uint(f[0], 32, "seq")
    op = f[1]
    if type(op) is not str or op not in CONTROL_OPS:
        raise _fail("unknown control op", op)
    args = _map(f[2], "control args")
    if op == "restore" and type(args.get("state")) is not dict:
        raise ProtocolError("restore needs args {'state': map}")
    if op == "device":  # a device-specific op: {"op": name, "args": map (optional)}
        name = args.get("op")
        if type(name) is not str or not 0 < len(name) <= MAX_NAME_LEN:
            raise ProtocolError("device needs args {'op': name}")
        if type(args.get("args", {})) is not dict:
            raise ProtocolError("device op args must be a map")
    return Control(seq, op, args)


def _p_control_reply(f: list) -> ControlReply:
    seq, ok = _uint(f[0], 32, "seq"), _bool(f[1], "ok")
    result = f[2] if ok else _str(f[2], MAX_TEXT_LEN, "control error text")
    return ControlReply(seq, ok, result)


def _p_irq_line(f: list) -> IrqLine:
    gsi = _uint(f[0], 16, "gsi")
    if gsi >= GSI_COUNT:
        raise _fail(f"gsi must be < {GSI_COUNT}", gsi)
    level = f[1]
    if type(level) is not int or level not in (0, 1):
        raise _fail("level must be 0 or 1", level)
    return IrqLine(gsi, level)


def _p_msi(f: list) -> Msi:
    address = _uint(f[0], 64, "msi address")
    if not MSI_ADDRESS_BASE <= (address & 0xFFFFFFFF) < MSI_ADDRESS_BASE + MSI_ADDRESS_SIZE:
        raise _fail("msi address is outside the APIC window 0xfee00000..0xfeefffff", address)
    return Msi(address, _uint(f[1], 32, "msi data"))


def _p_vector(f: list) -> Vector:
    v = _uint(f[0], 16, "vector")
    if v >= MAX_VECTORS:
        raise _fail(f"vector must be < {MAX_VECTORS}", v)
    return Vector(v)


def _p_checkpoint(f: list) -> Checkpoint:
    return Checkpoint(_map(f[0], "state"), _uint(f[1], 64, "applied"))


def _p_request(f: list) -> Request:
    what = f[0]
    if type(what) is not str or what not in REQUESTS:
        raise _fail("unknown request", what)
    return Request(what, _map(f[1], "request args"))


def _p_log(f: list) -> Log:
    level = f[0]
    if type(level) is not int or not 0 <= level <= LOG_LEVEL_MAX:
        raise _fail(f"log level must be an int 0..{LOG_LEVEL_MAX}", level)
    return Log(level, _str(f[1], MAX_TEXT_LEN, "log text"))


def _p_error(f: list) -> Error:
    code = _uint(f[0], 16, "error code")
    try:
        code = ErrorCode(code)
    except ValueError:
        pass
    return Error(code, _str(f[1], MAX_TEXT_LEN, "error text"))


_PARSERS: dict[int, tuple[int, Callable[[list], Message]]] = {
    MsgType.HELLO: (5, _p_hello),
    MsgType.WELCOME: (4, _p_welcome),
    MsgType.READ: (4, _p_read),
    MsgType.READ_REPLY: (2, _p_read_reply),
    MsgType.WRITE: (4, _p_write),
    MsgType.CONTROL: (3, _p_control),
    MsgType.CONTROL_REPLY: (3, _p_control_reply),
    MsgType.IRQ_LINE: (2, _p_irq_line),
    MsgType.MSI: (2, _p_msi),
    MsgType.CHECKPOINT: (2, _p_checkpoint),
    MsgType.REQUEST: (2, _p_request),
    MsgType.LOG: (2, _p_log),
    MsgType.ERROR: (2, _p_error),
    MsgType.VECTOR: (1, _p_vector),
}


def _parse(t: Any, fields: list, allowed: frozenset) -> Message:
    if type(t) is not int or t not in allowed:
        raise _fail("unexpected message type", t)
    arity, parser = _PARSERS[t]
    if len(fields) != arity:
        raise ProtocolError(f"{MsgType(t).name} needs {arity} fields, got {len(fields)}")
    return parser(fields)


# --- bytes <-> messages ------------------------------------------------------

def _reject_ext(code: int, data: bytes) -> Any:
    raise ValueError("msgpack ext types are not allowed")


def _peek_type(data: bytes) -> int | None:
    """The message type of a frame without unpacking it (None if unclear)."""
    head = data[0]
    idx = 1 if 0x90 <= head <= 0x9F else 3 if head == 0xDC else 5 if head == 0xDD else None
    if idx is None or len(data) <= idx or data[idx] > 0x7F:
        return None
    return data[idx]


def frame_type(data: bytes) -> int | None:
    """The message type of a frame without decoding it (None if unclear):
    lets a receiver apply a per-type size limit before paying for a decode."""
    if not data:
        return None
    return _peek_type(bytes(data[:6]))


def _decode(data: Any, allowed: frozenset) -> Message:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ProtocolError(f"frame must be bytes, not {type(data).__name__}")
    n = len(data)
    if n == 0:
        raise ProtocolError("empty frame")
    if n > MAX_FRAME:
        raise ProtocolError(f"frame of {n} bytes exceeds {MAX_FRAME}")
    if n > MAX_SMALL_FRAME and _peek_type(bytes(data[:6])) not in _LARGE_TYPES:
        raise ProtocolError(f"frame of {n} bytes exceeds {MAX_SMALL_FRAME} for its type")
    try:
        obj = msgpack.unpackb(
            data, raw=False, use_list=True, strict_map_key=True, ext_hook=_reject_ext,
            max_str_len=n, max_bin_len=n, max_ext_len=0,
            max_array_len=min(n, _MAX_CONTAINER_LEN), max_map_len=min(n // 2, _MAX_CONTAINER_LEN))
    except Exception as e:  # msgpack raises many kinds (ValueError, TypeError, StackError, ...)
        raise ProtocolError(f"not a msgpack frame: {type(e).__name__}: {_repr.repr(str(e))}") from None
    if type(obj) is not list or not obj:
        raise _fail("frame must be a non-empty msgpack array", obj)
    return _parse(obj[0], obj[1:], allowed)


def decode_from_device(data: bytes) -> Message:
    """Decode a frame received from a device process (untrusted)."""
    return _decode(data, FROM_DEVICE)


def decode_from_vmm(data: bytes) -> Message:
    """Decode a frame received from vmmd."""
    return _decode(data, FROM_VMM)


def encode(msg: Message) -> bytes:
    """Serialise a message; ProtocolError unless the peer's decoder would accept it.

    The check decodes the packed frame: that catches exact-type slips (True
    for 1, 1.0 for 1) and non-str map keys deep inside states alike.
    """
    t = getattr(msg, "TYPE", None)
    if t not in _PARSERS or not isinstance(msg, tuple):
        raise ProtocolError(f"not a bus message: {_repr.repr(msg)}")
    fields = msg._wire() if t == MsgType.HELLO else list(msg)
    try:
        data = msgpack.packb([int(t), *fields], use_bin_type=True)
    except Exception as e:
        raise ProtocolError(f"cannot encode {t.name}: {type(e).__name__}: {e}") from None
    limit = MAX_FRAME if t in _LARGE_TYPES else MAX_SMALL_FRAME
    if len(data) > limit:
        raise ProtocolError(f"{t.name} frame of {len(data)} bytes exceeds {limit}")
    _decode(data, _ALL_TYPES)
    return data
