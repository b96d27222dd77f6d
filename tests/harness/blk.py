"""A virtio-blk driver (virtio 1.2, 5.2) on top of tests.harness.driver.

    spec = blk_spec(path, slot=2, options=["serial=abc"])
    dev = harness.add_device(spec)
    disk = VirtioBlk(harness, slot=2, queues=2)
    disk.write(0, data); assert disk.read(0, len(data) // 512) == data

Every request is laid out as Linux lays it out: header descriptor
(device-readable), data descriptor(s), status byte (device-writable).
Asynchronous use: submit_*() return a BlkRequest (the queue may hold up to
its size at once), complete() waits for them.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from types import SimpleNamespace

from tests.harness.driver import Harness, VirtioPciDriver

SECTOR = 512
T_IN, T_OUT, T_FLUSH, T_GET_ID, T_DISCARD, T_WRITE_ZEROES = 0, 1, 4, 8, 11, 13
S_OK, S_IOERR, S_UNSUPP = 0, 1, 2
STATUS_NAMES = {S_OK: "OK", S_IOERR: "IOERR", S_UNSUPP: "UNSUPP"}
F_SIZE_MAX, F_SEG_MAX, F_RO, F_BLK_SIZE, F_FLUSH, F_TOPOLOGY, F_MQ = 1, 2, 5, 6, 9, 10, 12
F_DISCARD, F_WRITE_ZEROES = 13, 14
WANTED_FEATURES = sum(1 << b for b in (F_SIZE_MAX, F_SEG_MAX, F_RO, F_BLK_SIZE, F_FLUSH, F_TOPOLOGY,
                                       F_MQ, F_DISCARD, F_WRITE_ZEROES))
OUTHDR = struct.Struct("<IIQ")
RANGE = struct.Struct("<QII")
UNMAP = 1
UNFILLED = 0xEE  # status byte before the device answers
SLOT_EXTRA = 16 + 16 + 16 * 64  # header, status (padded), up to 64 ranges


def blk_spec(path: str, slot: int = 2, options: list[str] | None = None, *, function: int = 0,
             bus_only: bool = False):
    """The DeviceSpec vmmd builds for `-s SLOT[:FUNC],virtio-blk,PATH[,OPTIONS]` (vmmd's own code)."""
    from vmmd.machine import Machine
    fake_machine = SimpleNamespace(cfg=SimpleNamespace(bus_mode="bus-only" if bus_only else "fast"))
    slot_cfg = SimpleNamespace(slot=slot, function=function, device="virtio-blk",
                               args=[path, *(options or [])])
    return Machine._virtio_blk_spec(fake_machine, slot_cfg)


class BlkError(IOError):
    def __init__(self, status: int, what: str):
        super().__init__(f"{what}: status {STATUS_NAMES.get(status, status)}")
        self.status = status


@dataclass
class _Slot:
    base: int           # header at base, status at base+16, ranges at base+32
    data: int = 0       # data buffer
    data_size: int = 0


@dataclass
class BlkRequest:
    q: int
    kind: int
    token: int
    slot: _Slot
    nbytes: int = 0     # IN/OUT/GET_ID data bytes
    done: bool = False
    status: int | None = None
    written: int | None = None
    data: bytes | None = field(default=None, repr=False)


@dataclass(frozen=True)
class BlkConfig:
    capacity: int
    size_max: int
    seg_max: int
    blk_size: int
    num_queues: int
    max_discard_sectors: int
    max_discard_seg: int
    max_write_zeroes_sectors: int
    max_write_zeroes_seg: int
    write_zeroes_may_unmap: int


class VirtioBlk:
    def __init__(self, harness: Harness, slot: int, function: int = 0, *, queues: int | None = None,
                 queue_size: int | None = None, features: int = WANTED_FEATURES, event_idx: bool = True,
                 indirect: bool = True, timeout: float = 10.0, probe: bool = True):
        self.h = harness
        self.mem = harness.memory
        self.drv = VirtioPciDriver(harness, slot, function, timeout=timeout)
        self.timeout = timeout
        self.copy_data = True  # False: completed reads leave their data in guest memory (benchmarks)
        self._init_args = dict(features=features, queues=queues, queue_size=queue_size,
                               event_idx=event_idx, indirect=indirect)
        if probe:
            self.drv.probe()
            self.init()

    def init(self, **overrides) -> None:
        """(Re)initialise the device: reset, negotiate, queues, DRIVER_OK."""
        args = {**self._init_args, **overrides}
        if args["queues"] is None:
            args["queues"] = 1
        self.drv.init(**args)
        self.config = self.read_config()
        self._free: list[list[_Slot]] = [[] for _ in self.drv.queues]
        self.inflight: list[dict[int, BlkRequest]] = [{} for _ in self.drv.queues]

    @property
    def read_only(self) -> bool:
        return self.drv.has(F_RO)

    @property
    def num_queues(self) -> int:
        return len(self.drv.queues)

    def read_config(self) -> BlkConfig:
        raw = self.drv.device_cfg_bytes(0, 60)
        capacity, size_max, seg_max = struct.unpack_from("<QII", raw, 0)
        blk_size = struct.unpack_from("<I", raw, 20)[0]
        num_queues = struct.unpack_from("<H", raw, 34)[0]
        mds, mdseg, _align, mwz, mwzseg = struct.unpack_from("<IIIII", raw, 36)
        return BlkConfig(capacity, size_max, seg_max, blk_size, num_queues, mds, mdseg, mwz, mwzseg, raw[56])

    # -- request slots ---------------------------------------------------------------------
    def _slot(self, q: int, data_size: int) -> _Slot:
        free = self._free[q]
        s = free.pop() if free else _Slot(self.h.allocator.alloc(SLOT_EXTRA, 64))
        if data_size > s.data_size:
            s.data = self.h.allocator.alloc(max(data_size, 4096), 4096)
            s.data_size = max(data_size, 4096)
        return s

    @staticmethod
    def _split(gpa: int, n: int, segments: int) -> list[tuple[int, int]]:
        if segments <= 1 or n == 0:
            return [(gpa, n)] if n else []
        base, extra = divmod(n, segments)
        out, pos = [], gpa
        for i in range(segments):
            k = base + (1 if i < extra else 0)
            if k:
                out.append((pos, k))
                pos += k
        return out

    def _submit(self, q: int, kind: int, sector: int, *, nbytes: int = 0, data: bytes | None = None,
                ranges: list | None = None, writable_data: bool = False, segments: int = 1,
                kick: bool = True, indirect: bool = False, reserved: int = 0) -> BlkRequest:
        s = self._slot(q, nbytes)
        mem = self.mem
        mem.write(s.base, OUTHDR.pack(kind, reserved, sector))
        mem.write(s.base + 16, bytes([UNFILLED]))
        readable = [(s.base, 16)]
        writable = []
        if data is not None:
            mem.write(s.data, data)
            readable += self._split(s.data, nbytes, segments)
        elif ranges is not None:
            payload = b"".join(RANGE.pack(sec, num, flags) for sec, num, flags in ranges)
            mem.write(s.base + 32, payload)
            readable.append((s.base + 32, len(payload)))
        elif writable_data:
            writable += self._split(s.data, nbytes, segments)
        writable.append((s.base + 16, 1))
        token = self.drv.submit(q, readable, writable, kick=kick, indirect=indirect)
        req = BlkRequest(q, kind, token, s, nbytes)
        self.inflight[q][token] = req
        return req

    # -- asynchronous requests -----------------------------------------------------------------
    def submit_read(self, sector: int, nsectors: int, q: int = 0, **kw) -> BlkRequest:
        return self._submit(q, T_IN, sector, nbytes=nsectors * SECTOR, writable_data=True, **kw)

    def submit_write(self, sector: int, data: bytes, q: int = 0, **kw) -> BlkRequest:
        return self._submit(q, T_OUT, sector, nbytes=len(data), data=data, **kw)

    def submit_flush(self, q: int = 0, **kw) -> BlkRequest:
        return self._submit(q, T_FLUSH, 0, **kw)

    def submit_get_id(self, q: int = 0, **kw) -> BlkRequest:
        return self._submit(q, T_GET_ID, 0, nbytes=20, writable_data=True, **kw)

    def submit_discard(self, ranges: list[tuple[int, int]], q: int = 0, **kw) -> BlkRequest:
        return self._submit(q, T_DISCARD, 0, ranges=[(s, n, 0) for s, n in ranges], **kw)

    def submit_write_zeroes(self, ranges: list[tuple[int, int]], unmap: bool = False, q: int = 0,
                            **kw) -> BlkRequest:
        flags = UNMAP if unmap else 0
        return self._submit(q, T_WRITE_ZEROES, 0, ranges=[(s, n, flags) for s, n in ranges], **kw)

    def submit_type(self, kind: int, q: int = 0, nbytes: int = 0, **kw) -> BlkRequest:
        """A request of any type (e.g. an unknown one), with a writable buffer of nbytes."""
        return self._submit(q, kind, 0, nbytes=nbytes, writable_data=bool(nbytes), **kw)

    def kick(self, q: int = 0) -> None:
        self.drv.kick(q)

    def complete(self, reqs, timeout: float | None = None) -> list[BlkRequest]:
        """Wait for the requests (one or a list, any queues); fills status/written/data."""
        reqs = [reqs] if isinstance(reqs, BlkRequest) else list(reqs)
        by_q: dict[int, list[BlkRequest]] = {}
        for r in reqs:
            if not r.done:
                by_q.setdefault(r.q, []).append(r)
        for q, rs in by_q.items():
            written = self.drv.wait(q, [r.token for r in rs], timeout or self.timeout)
            for r in rs:
                self._finish(r, written[r.token])
        return reqs

    def _finish(self, r: BlkRequest, written: int) -> None:
        s = r.slot
        r.written = written
        r.status = self.mem.read(s.base + 16, 1)[0]
        if r.kind in (T_IN, T_GET_ID) and r.status == S_OK and self.copy_data:
            r.data = self.mem.read(s.data, r.nbytes)
        r.done = True
        self.inflight[r.q].pop(r.token, None)
        self._free[r.q].append(s)

    def reap(self, q: int = 0) -> list[BlkRequest]:
        """Requests of queue q that completed (no waiting)."""
        self.drv.poll_used(q)
        return self._collect(q)

    def wait_any(self, q: int = 0, timeout: float | None = None) -> list[BlkRequest]:
        """Wait for at least one completion on queue q; returns the completed requests."""
        if not self.drv.done[q]:
            self.drv.wait_used(q, timeout or self.timeout)
        return self._collect(q)

    def _collect(self, q: int) -> list[BlkRequest]:
        done = self.drv.done[q]
        out = []
        for token in list(done):
            r = self.inflight[q].get(token)
            if r is not None:
                self._finish(r, done.pop(token))
                out.append(r)
        return out

    # -- synchronous helpers ------------------------------------------------------------------------
    def _check(self, r: BlkRequest, what: str) -> BlkRequest:
        self.complete(r)
        if r.status != S_OK:
            raise BlkError(r.status, what)
        return r

    def read(self, sector: int, nsectors: int, q: int = 0, **kw) -> bytes:
        return self._check(self.submit_read(sector, nsectors, q, **kw), f"read {sector}+{nsectors}").data

    def write(self, sector: int, data: bytes, q: int = 0, **kw) -> None:
        self._check(self.submit_write(sector, data, q, **kw), f"write {sector}+{len(data) // SECTOR}")

    def flush(self, q: int = 0) -> None:
        self._check(self.submit_flush(q), "flush")

    def get_id(self, q: int = 0) -> bytes:
        return self._check(self.submit_get_id(q), "get_id").data.rstrip(b"\0")

    def discard(self, ranges, q: int = 0) -> None:
        self._check(self.submit_discard(ranges, q), "discard")

    def write_zeroes(self, ranges, unmap: bool = False, q: int = 0) -> None:
        self._check(self.submit_write_zeroes(ranges, unmap, q), "write_zeroes")

    def status_of(self, r: BlkRequest) -> int:
        self.complete(r)
        return r.status
