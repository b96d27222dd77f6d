"""virtio-blk request parsing (devices/virtio_blk/request.py): a chain's segments,
the device's limits and the guest memory behind them all come from the input.

Defined error: ReadFault, the reader's own exception (guest memory outside RAM);
request.py itself never raises for guest input. Oracles: parse_request's fast
path agrees with parse_general, and every op respects the limits it was given.
"""

import atheris

from devices.virtio_blk import request as rq

RAM = 64 << 10


class ReadFault(Exception):
    """The fake guest memory's 'outside RAM'."""


EXPECTED = (ReadFault,)


def _segments(fdp, n_max):
    segs = []
    for _ in range(fdp.ConsumeIntInRange(0, n_max)):
        gpa = fdp.ConsumeIntInRange(0, RAM + 4096)
        length = fdp.PickValueInList([0, 1, 16, 17, 511, 512, 1024, 4096, 8192]) \
            if fdp.ConsumeBool() else fdp.ConsumeIntInRange(0, 1 << 20)
        segs.append((gpa, length))
    return segs


def _same(a: rq.Request, b: rq.Request) -> bool:
    if type(a.op) is not type(b.op) or a.status_gpa != b.status_gpa or a.type != b.type:
        return False
    if isinstance(a.op, rq.Fail):
        return a.op.status == b.op.status
    return a.op == b.op


def one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    limits = rq.Limits(
        capacity=fdp.ConsumeIntInRange(0, 1 << 40), read_only=fdp.ConsumeBool(),
        seg_max=fdp.ConsumeIntInRange(1, 256), size_max=fdp.ConsumeIntInRange(512, 1 << 32),
        discard=fdp.ConsumeBool(), max_discard_sectors=fdp.ConsumeIntInRange(0, 1 << 32),
        max_discard_seg=fdp.ConsumeIntInRange(0, 64), write_zeroes=fdp.ConsumeBool(),
        max_write_zeroes_sectors=fdp.ConsumeIntInRange(0, 1 << 32),
        max_write_zeroes_seg=fdp.ConsumeIntInRange(0, 64))
    readable, writable = _segments(fdp, 6), _segments(fdp, 6)
    if readable and fdp.ConsumeBool():
        readable[0] = (readable[0][0], rq.HEADER_SIZE)   # the layout Linux uses: the fast path
    ram = fdp.ConsumeBytes(RAM).ljust(RAM, b"\0")

    def read(gpa: int, n: int) -> bytes:
        if gpa < 0 or n < 0 or gpa + n > RAM:
            raise ReadFault(gpa, n)
        return ram[gpa:gpa + n]

    req = rq.parse_request(readable, writable, limits, read)
    general = rq.parse_general(readable, writable, limits, read)
    assert _same(req, general), (req, general)

    nonempty = [s for s in writable if s[1] > 0]
    if req.status_gpa is not None:
        assert nonempty and req.status_gpa == nonempty[-1][0] + nonempty[-1][1] - 1
    else:
        assert not nonempty and isinstance(req.op, rq.Fail)
    op = req.op
    if isinstance(op, (rq.Read, rq.Write)):
        assert op.nbytes == rq.total_len(op.segments) and op.nbytes % rq.SECTOR_SIZE == 0
        assert len(op.segments) <= limits.seg_max
        assert all(0 < n <= limits.size_max for _, n in op.segments)
        assert rq.in_capacity(op.sector, op.nbytes // rq.SECTOR_SIZE, limits.capacity)
        assert not (isinstance(op, rq.Write) and limits.read_only)
    elif isinstance(op, (rq.Discard, rq.WriteZeroes)):
        assert not limits.read_only
        assert all(rq.in_capacity(s, n, limits.capacity) for s, n in op.ranges)
    elif isinstance(op, rq.GetId):
        assert op.nbytes <= rq.ID_BYTES
    elif isinstance(op, rq.Fail):
        assert op.status in (rq.S_IOERR, rq.S_UNSUPP)
