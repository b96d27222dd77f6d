"""bus.protocol: round trips, every validation rule, and a seeded fuzz test."""

import random

import msgpack
import pytest

from bus import protocol as p
from bus.protocol import ProtocolError
from bus.types import PROTOCOL_VERSION, IoRange, IoSpace, MsgType

PIO, MMIO, CFG = IoSpace.PIO, IoSpace.MMIO, IoSpace.PCI_CFG

DEVICE_MSGS = [
    p.Hello(PROTOCOL_VERSION, "lpc", "lpc0", (IoRange(PIO, 0x3F8, 8), IoRange(MMIO, 0xFED00000, 0x1000)),
            {"pid_in_ns": 1, "nested": {"x": [1, 2.5, None, b"\x00"]}}),
    p.ReadReply(7, 0xFF),
    p.ReadReply(0xFFFFFFFF, 2**64 - 1),
    p.ControlReply(3, True, {"a": [1, 2]}),
    p.ControlReply(3, True, None),
    p.ControlReply(4, False, "bad state"),
    p.IrqLine(4, 1),
    p.IrqLine(1023, 0),
    p.Msi(0xFEE00000, 0x4041),
    p.Msi((5 << 32) | 0xFEE01000, 0xFFFFFFFF),
    p.Vector(0),
    p.Vector(2047),
    p.Checkpoint({"regs": [1, 2, 3], "blob": b"\xff" * 100}),
    p.Request("quit", {}),
    p.Request("reset", {"why": "guest"}),
    p.Log(20, "hello"),
    p.Error(p.ErrorCode.MALFORMED, "bad"),
]
VMM_MSGS = [
    p.Welcome(PROTOCOL_VERSION, "lpc0", True, ""),
    p.Welcome(PROTOCOL_VERSION, "lpc0", False, "no"),
    p.Read(1, PIO, 0xFFFF, 1),
    p.Read(2, MMIO, 2**64 - 8, 8),
    p.Read(3, CFG, 0x100, 4),
    p.Write(PIO, 0x3F8, 1, 0x41),
    p.Write(MMIO, 0xFEE00000, 8, 2**64 - 1),
    p.Control(9, "restore", {"state": {"a": 1}}),
    p.Control(10, "stats", {}),
    p.Error(p.ErrorCode.UNEXPECTED, "huh"),
]


@pytest.mark.parametrize("msg", DEVICE_MSGS, ids=lambda m: type(m).__name__)
def test_device_messages_round_trip(msg):
    decoded = p.decode_from_device(p.encode(msg))
    assert decoded == msg
    assert type(decoded) is type(msg)


@pytest.mark.parametrize("msg", VMM_MSGS, ids=lambda m: type(m).__name__)
def test_vmm_messages_round_trip(msg):
    decoded = p.decode_from_vmm(p.encode(msg))
    assert decoded == msg and type(decoded) is type(msg)


def test_direction_is_enforced():
    for msg in DEVICE_MSGS:
        if type(msg) is not p.Error:
            with pytest.raises(ProtocolError):
                p.decode_from_vmm(p.encode(msg))
    for msg in VMM_MSGS:
        if type(msg) is not p.Error:
            with pytest.raises(ProtocolError):
                p.decode_from_device(p.encode(msg))


def test_decoded_enums():
    assert p.decode_from_vmm(p.encode(p.Read(1, 1, 0, 4))).space is MMIO
    hello = p.decode_from_device(p.encode(DEVICE_MSGS[0]))
    assert hello.ranges[0] == IoRange(PIO, 0x3F8, 8) and hello.ranges[0].space is PIO
    assert p.decode_from_device(p.encode(p.Error(999, "x"))).code == 999   # unknown codes pass


def raw(*items) -> bytes:
    return msgpack.packb(list(items), use_bin_type=True)


BAD_FROM_DEVICE = {
    "not msgpack": b"\xc1",
    "truncated": raw(4, 1, 2)[:-1],
    "trailing bytes": raw(4, 1, 2) + b"\x00",
    "not an array": msgpack.packb({"t": 4}),
    "empty array": raw(),
    "unknown type": raw(99, 1),
    "type is bool": raw(True, 1),
    "type is str": raw("4", 1, 2),
    "vmm-only type": raw(MsgType.READ, 1, 0, 0x60, 1),
    "too few fields": raw(4, 1),
    "too many fields": raw(4, 1, 2, 3),
    "seq bool": raw(4, True, 1),
    "seq negative": raw(4, -1, 1),
    "seq too big": raw(4, 2**32, 1),
    "value float": raw(4, 1, 1.0),
    "value negative": raw(4, 1, -1),
    "gsi too big": raw(8, 1024, 1),
    "level 2": raw(8, 4, 2),
    "level bool": raw(8, 4, True),
    "msi address outside apic window": raw(9, 0xFED00000, 1),
    "msi data too big": raw(9, 0xFEE00000, 2**32),
    "checkpoint not a map": raw(10, [1]),
    "checkpoint int keys": raw(10, {1: 2}),
    "checkpoint nested int keys": raw(10, {"a": {1: 2}}),
    "ext type": raw(10, {"a": msgpack.ExtType(1, b"x")}),
    "timestamp": raw(10, {"a": msgpack.Timestamp(1, 0)}),
    "unknown request": raw(11, "reboot", {}),
    "request args not a map": raw(11, "quit", []),
    "log level too big": raw(12, 51, "x"),
    "log level negative": raw(12, -1, "x"),
    "log text bytes": raw(12, 20, b"x"),
    "log text too long": raw(12, 20, "x" * (p.MAX_TEXT_LEN + 1)),
    "bad utf-8": b"\x93\x0c\x14\xa1\xff",
    "control reply ok int": raw(7, 1, 1, None),
    "control reply error not str": raw(7, 1, False, {"x": 1}),
    "hello kind empty": raw(1, 1, "", "i", [], {}),
    "hello kind too long": raw(1, 1, "k" * 65, "i", [], {}),
    "hello version str": raw(1, "1", "k", "i", [], {}),
    "hello info int keys": raw(1, 1, "k", "i", [], {1: 1}),
    "hello ranges not list": raw(1, 1, "k", "i", {}, {}),
    "hello range short": raw(1, 1, "k", "i", [[0, 0x60]], {}),
    "hello range bad space": raw(1, 1, "k", "i", [[3, 0x60, 1]], {}),
    "hello range empty": raw(1, 1, "k", "i", [[0, 0x60, 0]], {}),
    "hello range pio overflow": raw(1, 1, "k", "i", [[0, 0xFFFF, 2]], {}),
    "hello range mmio overflow": raw(1, 1, "k", "i", [[1, 2**64 - 1, 2]], {}),
    "hello ranges overlap": raw(1, 1, "k", "i", [[0, 0x60, 8], [0, 0x64, 1]], {}),
    "hello too many ranges": raw(1, 1, "k", "i", [[1, i * 16, 16] for i in range(65)], {}),
    "error code too big": raw(13, 2**16, "x"),
    "huge small frame": raw(12, 20, "x" * 70000),
    "huge frame": raw(10, {"a": b"x" * (p.MAX_FRAME + 1)}),
}

BAD_FROM_VMM = {
    "read pio past 64k": raw(3, 1, 0, 0xFFFF, 2),
    "read size 3": raw(3, 1, 1, 0, 3),
    "read size bool": raw(3, 1, 1, 0, True),
    "read addr too big": raw(3, 1, 1, 2**64 - 4, 8),
    "read space 3": raw(3, 1, 3, 0, 1),
    "write value too wide": raw(5, 0, 0x60, 1, 0x100),
    "write value negative": raw(5, 0, 0x60, 1, -1),
    "control unknown op": raw(6, 1, "reboot", {}),
    "control op bytes": raw(6, 1, b"stats", {}),
    "restore without state": raw(6, 1, "restore", {}),
    "restore state not map": raw(6, 1, "restore", {"state": [1]}),
    "device without op": raw(6, 1, "device", {}),
    "device op not str": raw(6, 1, "device", {"op": 1}),
    "device op empty": raw(6, 1, "device", {"op": ""}),
    "device op too long": raw(6, 1, "device", {"op": "x" * 65}),
    "device op args not map": raw(6, 1, "device", {"op": "set", "args": [1]}),
    "welcome accepted int": raw(2, 1, "d", 1, ""),
    "welcome empty id": raw(2, 1, "", True, ""),
}


@pytest.mark.parametrize("frame", BAD_FROM_DEVICE.values(), ids=BAD_FROM_DEVICE.keys())
def test_bad_device_frames(frame):
    with pytest.raises(ProtocolError):
        p.decode_from_device(frame)


@pytest.mark.parametrize("frame", BAD_FROM_VMM.values(), ids=BAD_FROM_VMM.keys())
def test_bad_vmm_frames(frame):
    with pytest.raises(ProtocolError):
        p.decode_from_vmm(frame)


def test_non_bytes_input():
    for thing in (None, "text", 5, [4, 1, 2]):
        with pytest.raises(ProtocolError):
            p.decode_from_device(thing)
    assert p.decode_from_device(bytearray(raw(4, 1, 2))) == p.ReadReply(1, 2)
    assert p.decode_from_device(memoryview(raw(4, 1, 2))) == p.ReadReply(1, 2)


def test_large_state_frames_allowed_up_to_limit():
    state = {"blob": b"x" * (1 << 20)}
    assert p.decode_from_device(p.encode(p.Checkpoint(state))) == p.Checkpoint(state)
    assert p.decode_from_device(p.encode(p.ControlReply(1, True, state))).result == state
    assert p.decode_from_vmm(p.encode(p.Control(1, "restore", {"state": state}))).args == {"state": state}


def test_encode_validates():
    bad = [
        p.Read(True, PIO, 0, 1),          # bool seq
        p.Read(1, PIO, 0xFFFF, 2),        # past the PIO space
        p.Read(1, PIO, 0, 3),             # size
        p.Write(PIO, 0, 1, 256),          # value width
        p.IrqLine(4, True),               # level must be 0/1, not bool
        p.Checkpoint({"a": {1: 2}}),      # peer would reject int keys
        p.Checkpoint({"a": object()}),    # not serialisable
        p.Log(20, "x" * (p.MAX_TEXT_LEN + 1)),
        p.Log(20, "x" * 70000),
        (4, 1, 2),                        # not a message object
        "READ",
    ]
    for msg in bad:
        with pytest.raises(ProtocolError):
            p.encode(msg)


def test_encode_accepts_enum_and_tuples():
    assert p.decode_from_vmm(p.encode(p.Read(1, IoSpace.MMIO, 0, 4))).space is MMIO
    # tuples inside states travel as arrays
    assert p.decode_from_device(p.encode(p.Checkpoint({"t": (1, 2)}))).state == {"t": [1, 2]}


# --- fuzz ------------------------------------------------------------------------

def _random_value(rng: random.Random, depth: int = 0):
    kinds = ["int", "bigint", "neg", "bool", "none", "float", "str", "bytes"]
    if depth < 3:
        kinds += ["list", "map", "map"]
    k = rng.choice(kinds)
    if k == "int":
        return rng.choice([0, 1, 2, 3, 4, 8, 13, 0x3F8, 0xFFFF, 0x10000, 1023, 1024, 0xFEE00000])
    if k == "bigint":
        return rng.choice([2**32 - 1, 2**32, 2**63, 2**64 - 1, rng.getrandbits(64)])
    if k == "neg":
        return -rng.getrandbits(rng.randint(1, 63))
    if k == "bool":
        return rng.random() < 0.5
    if k == "none":
        return None
    if k == "float":
        return rng.choice([0.0, 1.0, float("nan"), float("inf"), -1.5])
    if k == "str":
        return rng.choice(["", "stats", "restore", "quit", "lpc", "x" * rng.randint(0, 5000), "\u00e9"])
    if k == "bytes":
        return rng.randbytes(rng.randint(0, 20))
    if k == "list":
        return [_random_value(rng, depth + 1) for _ in range(rng.randint(0, 5))]
    return {rng.choice(["state", "a", "b", "x" * 3]): _random_value(rng, depth + 1)
            for _ in range(rng.randint(0, 4))}


def _mutate(rng: random.Random, data: bytes) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(5)
        if op == 0 and buf:
            buf[rng.randrange(len(buf))] = rng.randrange(256)
        elif op == 1 and buf:
            del buf[rng.randrange(len(buf))]
        elif op == 2:
            buf.insert(rng.randint(0, len(buf)), rng.randrange(256))
        elif op == 3 and buf:
            del buf[rng.randint(0, len(buf) - 1):]
        else:
            i = rng.randint(0, len(buf))
            buf[i:i] = rng.randbytes(rng.randint(1, 8))
    return bytes(buf)


def _mutate_fields(rng: random.Random, msg) -> bytes:
    fields = [int(msg.TYPE)] + [list(f) if isinstance(f, tuple) else f for f in
                                (msg._wire() if type(msg) is p.Hello else msg)]
    i = rng.randrange(len(fields))
    choice = rng.randrange(4)
    if choice == 0:
        fields[i] = _random_value(rng)
    elif choice == 1:
        fields.insert(i, _random_value(rng))
    elif choice == 2:
        del fields[i]
    else:
        fields[0] = rng.randint(0, 15)
    return msgpack.packb(fields, use_bin_type=True)


def _check(data: bytes) -> int:
    """Decode both ways; only ProtocolError may escape. Returns the number accepted."""
    accepted = 0
    for decode in (p.decode_from_device, p.decode_from_vmm):
        try:
            msg = decode(data)
        except ProtocolError:
            continue
        accepted += 1
        # Whatever is accepted re-encodes, stably (bytes compare: nan != nan).
        again = p.encode(msg)
        assert p.encode(decode(again)) == again
    return accepted


def test_fuzz_only_protocol_errors():
    rng = random.Random(0xB05)
    valid = [p.encode(m) for m in DEVICE_MSGS + VMM_MSGS]
    accepted = 0
    for i in range(6000):
        kind = i % 4
        if kind == 0:
            data = rng.randbytes(rng.randint(0, 64))
        elif kind == 1:
            data = msgpack.packb(_random_value(rng), use_bin_type=True)
        elif kind == 2:
            data = _mutate(rng, rng.choice(valid))
        else:
            data = _mutate_fields(rng, rng.choice(DEVICE_MSGS + VMM_MSGS))
        accepted += _check(data)
    # The fuzzer reaches past the msgpack layer into the validators.
    assert accepted > 0


def test_fuzz_random_arrays_of_valid_shape():
    """Right type and arity, random field values: exercises each field check."""
    rng = random.Random(7)
    arity = {MsgType.HELLO: 5, MsgType.WELCOME: 4, MsgType.READ: 4, MsgType.READ_REPLY: 2,
             MsgType.WRITE: 4, MsgType.CONTROL: 3, MsgType.CONTROL_REPLY: 3, MsgType.IRQ_LINE: 2,
             MsgType.MSI: 2, MsgType.CHECKPOINT: 1, MsgType.REQUEST: 2, MsgType.LOG: 2,
             MsgType.ERROR: 2, MsgType.VECTOR: 1}
    for _ in range(4000):
        t = rng.choice(list(arity))
        fields = [_random_value(rng) for _ in range(arity[t])]
        _check(msgpack.packb([int(t), *fields], use_bin_type=True))


def test_vector_event():
    """VECTOR (bus-only MSI-X): an event, vector < 2048, exact types."""
    assert p.decode_from_device(p.encode(p.Vector(5))) == p.Vector(5)
    assert MsgType.VECTOR in p.EVT_FROM_DEVICE and MsgType.VECTOR not in p.REQ_FROM_DEVICE
    for bad in (2048, -1, True, 1.0, "1"):
        with pytest.raises(ProtocolError):
            p.decode_from_device(msgpack.packb([int(MsgType.VECTOR), bad]))
    with pytest.raises(ProtocolError):
        p.decode_from_vmm(msgpack.packb([int(MsgType.VECTOR), 1]))


def test_dirty_sync_is_a_control_op():
    assert p.decode_from_vmm(p.encode(p.Control(1, "dirty_sync", {}))).op == "dirty_sync"


def test_device_control_op():
    msg = p.decode_from_vmm(p.encode(p.Control(7, "device", {"op": "set", "args": {"num_pages": 256}})))
    assert (msg.op, msg.args) == ("device", {"op": "set", "args": {"num_pages": 256}})
    assert p.decode_from_vmm(p.encode(p.Control(8, "device", {"op": "info"}))).args == {"op": "info"}
