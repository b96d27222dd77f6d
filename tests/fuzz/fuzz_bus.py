"""The bus decoder (bus/protocol.py): bytes from an untrusted device, or from vmmd.

Defined error: ProtocolError. Whatever decodes must re-encode (encode() runs the
same checks) and decode again to the same message.
"""

import atheris
import msgpack

from bus import protocol
from bus.protocol import ProtocolError

EXPECTED = (ProtocolError,)


def _value(fdp: atheris.FuzzedDataProvider, depth: int = 0):
    kind = fdp.ConsumeIntInRange(0, 8 if depth < 3 else 5)
    if kind == 0:
        return fdp.ConsumeIntInRange(0, 40)                # message types, small fields
    if kind == 1:
        return fdp.ConsumeInt(9) if fdp.ConsumeBool() else fdp.ConsumeIntInRange(0, (1 << 64) - 1)
    if kind == 2:
        return fdp.ConsumeUnicodeNoSurrogates(fdp.ConsumeIntInRange(0, 80))
    if kind == 3:
        return fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 80))
    if kind == 4:
        return fdp.ConsumeBool()
    if kind == 5:
        return None if fdp.ConsumeBool() else fdp.ConsumeFloat()
    if kind in (6, 7):
        return [_value(fdp, depth + 1) for _ in range(fdp.ConsumeIntInRange(0, 8))]
    return {fdp.ConsumeIntInRange(0, 9) if fdp.ConsumeBool() else fdp.ConsumeUnicodeNoSurrogates(8):
            _value(fdp, depth + 1) for _ in range(fdp.ConsumeIntInRange(0, 4))}


def _frame(data: bytes) -> bytes:
    """Half the inputs are raw bytes; half a msgpack array shaped like a bus frame."""
    if not data or data[0] & 1:
        return data[1:]
    fdp = atheris.FuzzedDataProvider(data[1:])
    fields = [fdp.ConsumeIntInRange(0, 20)] + [_value(fdp) for _ in range(fdp.ConsumeIntInRange(0, 8))]
    try:
        return msgpack.packb(fields, use_bin_type=True)
    except (TypeError, ValueError, OverflowError):
        return data[1:]


def one_input(data: bytes) -> None:
    frame = _frame(data)
    for decode in (protocol.decode_from_device, protocol.decode_from_vmm):
        try:
            msg = decode(frame)
        except ProtocolError:
            continue
        try:
            again = decode(protocol.encode(msg))
        except ProtocolError as exc:   # decoded, so it must encode and decode again
            raise AssertionError(f"{msg!r} decodes but does not round-trip: {exc}") from None
        assert again == msg, (msg, again)
