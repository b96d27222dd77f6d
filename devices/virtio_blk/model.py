"""The virtio-blk device (virtio 1.2, 5.2) over the shared virtio-pci machinery.

Options: {"args": [PATH, OPTION, ...]} from the slot `-s N,virtio-blk,PATH,...`:

    ro                     read-only disk (VIRTIO_BLK_F_RO; writes fail with IOERR)
    cache=writeback        page cache, FLUSH = fdatasync (default)
    cache=direct           O_DIRECT where the filesystem allows (alias: nocache)
    cache=unsafe           page cache, FLUSH ignored
    serial=TEXT            GET_ID answer, up to 20 printable ASCII bytes (alias: ser=)
    num_queues=N           request queues, 1..64 (default 1; > 1 offers MQ)
    queue_size=N           queue size, a power of 2 in 4..32768 (default 256)
    format=qcow2|raw       image format; without it the magic is probed (a qcow2
                           image is opened with a warning, a raw one refuses guest
                           writes of a qcow2 header to sector 0); see qcow2_backend.py

A bad option raises ValueError (the runtime exits 1 and vmmd reports it).

Requests are completed synchronously on the event loop (see backend.py), in
the order they are popped; so at quiesce, save or reset nothing is in
flight, and the saved state is the transport's (features, queue addresses
and indices) and nothing else.

The request handling (BlkCore) needs only a DeviceMemory, a backend and
SplitQueues; VirtioBlkDevice wires it to the transport's hooks.
"""

from __future__ import annotations

import logging
import os
import socket
import stat
import struct

from devices.virtio.device import VirtioDevice
from devices.virtio.queue import ChainError
from devices.virtio_blk import request as rq
from devices.virtio_blk import state as blkstate
from devices.virtio_blk.backend import CACHE_MODES, BlockBackend
from devices.virtio_blk.qcow2_backend import FORMATS, open_backend  # noqa: F401
from devopts import virtio_blk as blkopts
from devopts.virtio_blk import BlkOptions

log = logging.getLogger("devices.virtio_blk")

VIRTIO_ID_BLOCK = 2

# Feature bits (5.2.3)
F_SIZE_MAX = 1
F_SEG_MAX = 2
F_GEOMETRY = 4
F_RO = 5
F_BLK_SIZE = 6
F_FLUSH = 9
F_TOPOLOGY = 10
F_CONFIG_WCE = 11
F_MQ = 12
F_DISCARD = 13
F_WRITE_ZEROES = 14

from devopts.virtio_blk import (  # noqa: E402  (the option limits live with the parser)
    DEFAULT_QUEUE_SIZE, MAX_QUEUE_SIZE, MAX_QUEUES, MIN_QUEUE_SIZE)
SIZE_MAX = 1 << 20              # bytes per data segment we accept and advertise
MAX_SEG_MAX = 1024 - 2          # IOV_MAX minus header and status
MAX_DISCARD_SECTORS = 1 << 22   # 2 GiB per range
MAX_DISCARD_SEG = 32
MAX_WRITE_ZEROES_SECTORS = 1 << 22
MAX_WRITE_ZEROES_SEG = 32

# struct virtio_blk_config up to write_zeroes_may_unmap + unused1[3] (5.2.4)
CONFIG = struct.Struct("<QII HBB I BBHI BBH IIIIIB3x")
CONFIG_SIZE = CONFIG.size  # 60


def parse_options(options: dict) -> BlkOptions:
    """options["args"] (the slot's arguments) -> BlkOptions, or ValueError (devopts.virtio_blk,
    the same parser vmmd checks the command line with)."""
    if not isinstance(options, dict):
        raise ValueError(f"virtio-blk: options must be a map, got {type(options).__name__}")
    return blkopts.parse(options.get("args"))


def seg_max_for(queue_size: int) -> int:
    return max(1, min(queue_size - 2, MAX_SEG_MAX))


def device_features(opts: BlkOptions) -> int:
    f = ((1 << F_SIZE_MAX) | (1 << F_SEG_MAX) | (1 << F_BLK_SIZE) | (1 << F_FLUSH)
         | (1 << F_TOPOLOGY))
    if opts.num_queues > 1:
        f |= 1 << F_MQ
    if opts.read_only:
        f |= 1 << F_RO
    else:
        f |= (1 << F_DISCARD) | (1 << F_WRITE_ZEROES)
    return f


def build_config(opts: BlkOptions, backend: BlockBackend) -> bytes:
    """The device configuration space (struct virtio_blk_config)."""
    logical = backend.logical_block_size
    physical = backend.physical_block_size
    exp = max(0, (physical // logical).bit_length() - 1)
    discard_align = max(1, physical >> rq.SECTOR_SHIFT)
    rw = not opts.read_only
    return CONFIG.pack(
        backend.capacity,                     # capacity (512-byte sectors)
        SIZE_MAX,                             # size_max
        seg_max_for(opts.queue_size),         # seg_max
        0, 0, 0,                              # geometry (not offered)
        logical,                              # blk_size
        exp, 0, 1, 0,                         # topology: physical_block_exp, alignment_offset,
                                              #   min_io_size (blocks), opt_io_size
        0, 0,                                 # writeback (CONFIG_WCE not offered), unused0
        opts.num_queues,                      # num_queues
        MAX_DISCARD_SECTORS if rw else 0,     # max_discard_sectors
        MAX_DISCARD_SEG if rw else 0,         # max_discard_seg
        discard_align if rw else 0,           # discard_sector_alignment
        MAX_WRITE_ZEROES_SECTORS if rw else 0,
        MAX_WRITE_ZEROES_SEG if rw else 0,
        1 if rw else 0,                       # write_zeroes_may_unmap
    )


def limits_for(opts: BlkOptions, backend: BlockBackend) -> rq.Limits:
    rw = not opts.read_only
    return rq.Limits(
        capacity=backend.capacity, read_only=opts.read_only,
        seg_max=seg_max_for(opts.queue_size), size_max=SIZE_MAX,
        discard=rw, max_discard_sectors=MAX_DISCARD_SECTORS, max_discard_seg=MAX_DISCARD_SEG,
        write_zeroes=rw, max_write_zeroes_sectors=MAX_WRITE_ZEROES_SECTORS,
        max_write_zeroes_seg=MAX_WRITE_ZEROES_SEG)


# --- request processing ---------------------------------------------------------

STAT_KEYS = ("requests", "reads", "writes", "read_bytes", "write_bytes", "flushes", "discards",
             "write_zeroes", "get_ids", "ioerr", "unsupp", "bad_chains")

_STATUS_BYTES = tuple(bytes([s]) for s in range(3))


class BlkCore:
    """Serves virtio-blk requests from SplitQueues: parse, do the I/O, write
    the status byte, publish the used element. Everything guest-controlled
    ends in a status; nothing raises out of process_queue() except
    QueueError (the ring is broken: the caller sets NEEDS_RESET)."""

    def __init__(self, backend: BlockBackend, limits: rq.Limits, num_queues: int):
        self.backend = backend
        self.limits = limits
        self.memory = None              # DeviceMemory, set by the device
        self.writethrough = False       # fdatasync after every write (FLUSH not negotiated)
        self.stats = [dict.fromkeys(STAT_KEYS, 0) for _ in range(num_queues)]
        self._faults = 0

    def process_queue(self, q: int, queue) -> int:
        """Drain queue q; returns the number of used elements pushed."""
        pushed = 0
        handle = self.handle

        def bad_chain(exc: ChainError) -> None:
            nonlocal pushed
            self.stats[q]["bad_chains"] += 1
            self._fault(f"queue {q}: {exc}", None)
            pushed += 1

        for chain in queue.drain(bad_chain):
            queue.push_used(chain.head, handle(q, chain))
            pushed += 1
        return pushed

    def handle(self, q: int, chain) -> int:
        """Serve one request; returns the bytes written into the chain."""
        st = self.stats[q]
        st["requests"] += 1
        mem = self.memory
        try:
            req = rq.parse_request(chain.readable, chain.writable, self.limits, mem.read)
        except Exception as exc:   # guest memory vanished under a validated chain
            self._fault(f"queue {q}: cannot read request {chain.head}", exc)
            st["ioerr"] += 1
            return 0
        written = 0
        op = req.op
        t = type(op)
        try:
            if t is rq.Read:
                status, written = self._read(op)
                st["reads"] += 1
                st["read_bytes"] += op.nbytes
            elif t is rq.Write:
                status = self._write(op)
                st["writes"] += 1
                st["write_bytes"] += op.nbytes
            elif t is rq.Flush:
                status = self.backend.flush()
                st["flushes"] += 1
            elif t is rq.GetId:
                if op.nbytes:
                    data = rq.encode_id(self.backend.serial, op.nbytes)
                    off = 0
                    for gpa, n in op.segments:
                        mem.write(gpa, data[off:off + n])
                        off += n
                written = op.nbytes
                status = rq.S_OK
                st["get_ids"] += 1
            elif t is rq.Discard:
                status = self.backend.discard(op.ranges)
                st["discards"] += 1
            elif t is rq.WriteZeroes:
                status = self._write_zeroes(op)
                st["write_zeroes"] += 1
            else:
                status = op.status
                log.debug("queue %d: request %d failed: %s", q, chain.head, op.reason)
        except Exception as exc:
            self._fault(f"queue {q}: request {chain.head} ({rq.TYPE_NAMES.get(req.type, req.type)})", exc)
            status, written = rq.S_IOERR, 0
        if status == rq.S_IOERR:
            st["ioerr"] += 1
        elif status == rq.S_UNSUPP:
            st["unsupp"] += 1
        if req.status_gpa is None:
            return 0
        try:
            mem.write(req.status_gpa, _STATUS_BYTES[status])
        except Exception as exc:
            self._fault(f"queue {q}: status of request {chain.head}", exc)
            return 0
        return written + 1

    def _read(self, op: rq.Read) -> tuple[int, int]:
        mem = self.memory
        views = [mem.writable_view(g, n) for g, n in op.segments]
        align = self.backend.dio_align
        try:
            status = self.backend.read(op.sector, views, op.nbytes,
                                       bool(align) and rq.aligned(op.segments, align))
        finally:
            # Even a failed read may have changed guest memory.
            for g, n in op.segments:
                mem.mark_dirty(g, n)
        return status, (op.nbytes if status == rq.S_OK else 0)

    def _write(self, op: rq.Write) -> int:
        mem = self.memory
        views = [mem.view(g, n) for g, n in op.segments]
        align = self.backend.dio_align
        status = self.backend.write(op.sector, views, op.nbytes,
                                    bool(align) and rq.aligned(op.segments, align))
        if status == rq.S_OK and self.writethrough:
            status = self.backend.flush()
        return status

    def _write_zeroes(self, op: rq.WriteZeroes) -> int:
        status = self.backend.write_zeroes(op.ranges, op.unmap)
        if status == rq.S_OK and self.writethrough:
            status = self.backend.flush()
        return status

    def _fault(self, what: str, exc: BaseException | None) -> None:
        self._faults += 1
        if self._faults <= 20 or self._faults % 1000 == 0:
            if exc is None:
                log.warning("%s", what)
            else:
                log.error("%s: %s: %s", what, type(exc).__name__, exc)

    def totals(self) -> dict:
        return {k: sum(s[k] for s in self.stats) for k in STAT_KEYS}


# --- the device ------------------------------------------------------------------------


def _fds_of(anc) -> list[int]:
    fds = []
    for level, kind, data in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.extend(struct.unpack(f"{len(data) // 4}i", data[:len(data) - len(data) % 4]))
    return fds


def receive_fd(sock_fd: int | None) -> int:
    """The fd vmmd sent last on the fdpass socket (never blocks). Older
    messages (an fd sent for a switch that was refused before it read it)
    are dropped, so a stale overlay is never taken for the new one."""
    if sock_fd is None:
        raise ValueError("switch_overlay: this device has no fdpass socket")
    sock = socket.socket(fileno=sock_fd)
    fds: list[int] | None = None
    try:
        for _ in range(64):
            try:
                # (socket.recv_fds ignores its flags before Python 3.12: recvmsg itself)
                _, anc, _, _ = sock.recvmsg(16, socket.CMSG_SPACE(2 * 4), socket.MSG_DONTWAIT)
            except BlockingIOError:
                break
            for fd in fds or ():
                os.close(fd)
            fds = _fds_of(anc)
    finally:
        sock.detach()
    if fds is None:
        raise ValueError("switch_overlay: no overlay fd was sent")
    if len(fds) != 1:
        for fd in fds:
            os.close(fd)
        raise ValueError(f"switch_overlay: expected one fd, got {len(fds)}")
    fd = fds[0]
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ValueError("switch_overlay: the overlay is not a regular file")
    return fd



class VirtioBlkDevice(VirtioDevice):
    KIND = "virtio_blk"
    VIRTIO_ID = VIRTIO_ID_BLOCK

    def __init__(self, host, options: dict, *, backend: BlockBackend | None = None):
        opts = parse_options(options)
        self.opts = opts
        self.backend = backend if backend is not None else open_backend(
            opts.path, image_format=opts.image_format, read_only=opts.read_only,
            cache=opts.cache, serial=opts.serial)
        try:
            if self.backend.capacity == 0:
                log.warning("%s: the disk image is empty (capacity 0)", opts.path)
            self._config = build_config(opts, self.backend)
            self.core = BlkCore(self.backend, limits_for(opts, self.backend), opts.num_queues)
            super().__init__(host, options)
        except Exception:
            self.backend.close()
            raise
        self.core.memory = self.memory

    # --- VirtioDevice hooks ----------------------------------------------------------

    def device_features(self) -> int:
        return device_features(self.opts)

    def num_queues(self) -> int:
        return self.opts.num_queues

    def queue_max_size(self, q: int) -> int:
        return self.opts.queue_size

    def config_bytes(self) -> bytes:
        return self._config

    def config_read(self, offset: int, size: int) -> int:
        return int.from_bytes(self._config[offset:offset + size], "little")

    def config_write(self, offset: int, size: int, value: int) -> None:
        pass  # writeback is only writable with CONFIG_WCE, which is not offered

    def on_driver_ok(self) -> None:
        self._apply_features()

    def _apply_features(self) -> None:
        # Without FLUSH negotiated the driver cannot ask for durability, so
        # every write is made durable before it completes (5.2.6.2).
        self.core.writethrough = (not self.has_feature(F_FLUSH)
                                  and self.opts.cache != "unsafe" and not self.opts.read_only)

    def on_queue_notify(self, q: int, queue) -> None:
        try:
            self.core.process_queue(q, queue)
        finally:
            self.notify_used(q)

    def device_reset(self) -> None:
        # Requests complete synchronously: nothing is in flight to drop.
        self.core.writethrough = False

    def device_quiesce(self) -> None:
        pass  # nothing in flight (see backend.py)

    def device_save(self) -> dict:
        return blkstate.make_state(self.backend.capacity, self.opts.read_only,
                                   self.opts.num_queues, self.opts.queue_size)

    def device_restore(self, state: dict) -> None:
        saved = blkstate.check_state(state)
        resized = blkstate.check_compatible(saved, self.device_save())
        self._apply_features()
        if resized:
            log.warning("%s: capacity changed from %d to %d sectors since the state was saved",
                        self.opts.path, saved["capacity"], self.backend.capacity)
            if self.transport.driver_ok:
                self.config_changed()

    # --- DeviceModel ---------------------------------------------------------------------

    def device_control(self, op: str, args: dict):
        """CONTROL "device" ops: "switch_overlay" {"path": P} (disk checkpoints).

        vmmd first sends the overlay's fd (one SCM_RIGHTS message) on the
        "fdpass" socket it gave this device at bootstrap; the overlay is an
        empty qcow2 image whose backing file is this disk's current image.
        From then on writes go to the overlay and the old image is read-only:
        it holds the disk exactly as it was at the switch (vmmd quiesces the
        device around the op, and requests complete synchronously, so there
        is nothing in flight)."""
        if op == "switch_overlay":
            return self._switch_overlay(args if isinstance(args, dict) else {})
        return super().device_control(op, args)

    def _switch_overlay(self, args: dict) -> dict:
        path = args.get("path", "")
        if type(path) is not str:
            raise ValueError("switch_overlay: path must be a string")
        switch = getattr(self.backend, "switch_to_overlay", None)
        if switch is None:
            raise ValueError("switch_overlay: the disk is not a qcow2 image (format=qcow2)")
        fd = receive_fd((getattr(self.host, "fds", None) or {}).get("fdpass"))
        try:
            old = self.backend.path
            switch(fd, path)
        except Exception:
            os.close(fd)
            raise
        log.info("%s: writes now go to the overlay %s", old, path or f"fd {fd}")
        return {"path": path, "backing": old, "capacity": self.backend.capacity}

    def stats(self) -> dict:
        out = super().stats()
        out["blk"] = {"capacity": self.backend.capacity, "read_only": self.opts.read_only,
                      "cache": self.opts.cache, "direct": self.backend.dfd is not None,
                      "format": getattr(self.backend, "image_format", "raw"),
                      **({"qcow2": self.backend.qcow2_stats()}
                         if hasattr(self.backend, "qcow2_stats") else {}),
                      "writethrough": self.core.writethrough,
                      "backend_errors": self.backend.errors,
                      "total": self.core.totals(), "per_queue": [dict(s) for s in self.core.stats]}
        return out

    def file_size_limit(self) -> int | None:
        """RLIMIT_FSIZE in the jail: every request is checked against the
        capacity and fallocate keeps the size, so a raw image is never
        extended; anything past its end is refused (EFBIG). A qcow2 image
        (and a checkpoint overlay switched to later) grows as clusters are
        allocated, by an amount its format does not bound tightly: None keeps
        the policy's limit. A backend may say with its own file_size_limit().
        Block devices are not subject to the limit."""
        own = getattr(self.backend, "file_size_limit", None)
        if callable(own):
            return own()
        if getattr(self.backend, "image_format", "raw") != "raw":
            return None
        return self.backend.size

    def close(self) -> None:
        try:
            super().close()
        finally:
            self.backend.close()


DEVICE_MODEL = VirtioBlkDevice
