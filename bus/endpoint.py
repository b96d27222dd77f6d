"""ZeroMQ plumbing around bus.protocol: one channel object per end.

VmmChannel is vmmd's side of one device incarnation. It binds the two PAIR
sockets (docs/architecture.md, "The bus") and is synchronous: vCPU threads
and the API call read/write/control, a lock serialises them on the req
socket. The evt socket belongs to vmmd's main loop, which reads it and
hands frames to decode_event().

DeviceChannel is the device process's side, on zmq.asyncio. Its sends never
block and never raise into the device model: a full queue counts a drop.

Anything a device sends is untrusted: frames go through
protocol.decode_from_device, and a bad frame raises ProtocolError (after a
log line) but never anything else.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import threading
import time
from typing import Any

import zmq
import zmq.asyncio

from bus import protocol
from bus.protocol import (
    Control, ControlReply, Error, ErrorCode, Hello, Message, ProtocolError, Read, ReadReply,
    Welcome, Write,
)
from bus.types import PROTOCOL_VERSION, IoRange, IoSpace, MsgType

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 2.0   # seconds; crosvm uses the same for its proxied devices
QUEUE_DEPTH = 1024      # zmq high-water marks, in messages
DEVICE_LINGER_MS = 1000  # a device's last replies/logs still leave when it exits
_SUN_PATH_MAX = 107     # sockaddr_un.sun_path minus the NUL


class ChannelError(Exception):
    """Base of the errors a channel raises besides ProtocolError."""


class DeviceTimeout(ChannelError):
    """The device did not answer (or accept a posted write) in time."""


class DeviceGone(ChannelError):
    """The abort fd (the device's pidfd) became readable: the process exited."""


class DeviceControlError(ChannelError):
    """The device answered a CONTROL request with ok=false; str() is its text."""


class HandshakeError(ChannelError):
    """The handshake failed: version mismatch, or vmmd did not accept the device."""


def _set_common_options(sock: zmq.Socket, linger_ms: int) -> None:
    sock.setsockopt(zmq.LINGER, linger_ms)
    sock.setsockopt(zmq.SNDHWM, QUEUE_DEPTH)
    sock.setsockopt(zmq.RCVHWM, QUEUE_DEPTH)
    # zmq drops the connection on a bigger frame before we ever buffer it.
    sock.setsockopt(zmq.MAXMSGSIZE, protocol.MAX_FRAME)


class VmmChannel:
    """vmmd's end of one device incarnation's bus (synchronous, thread-safe)."""

    def __init__(self, ctx: zmq.Context, rundir: str, device_id: str, generation: int):
        if not device_id or "/" in device_id or device_id.startswith("."):
            raise ValueError(f"device id {device_id!r} cannot name a socket file")
        self.device_id = device_id
        self.generation = generation
        base = os.path.join(rundir, f"{device_id}.{generation}")
        self.req_path, self.evt_path = base + ".req", base + ".evt"
        if len(os.fsencode(self.req_path)) > _SUN_PATH_MAX:
            raise ValueError(f"socket path {self.req_path!r} is too long for a Unix socket")
        self.req_endpoint = "ipc://" + self.req_path
        self.evt_endpoint = "ipc://" + self.evt_path
        self._lock = threading.Lock()
        self._seq = 0
        self._pollers: dict[tuple[int, int | None], zmq.Poller] = {}
        self._req: zmq.Socket | None = None
        self.evt_socket: zmq.Socket | None = None
        # callable(kind, fmt, *args): counts and rate-limits what the device
        # got wrong (vmmd's ManagedDevice.refuse); plain logging without it.
        self.on_refusal = None
        # vmmd's AccessJournal (vmmd/access_journal.py): every read and write
        # counted in send order, for a successor's replay; None: not kept.
        self.journal = None
        try:
            self._req = self._bind(ctx, self.req_endpoint)
            self.evt_socket = self._bind(ctx, self.evt_endpoint)
        except Exception:
            self.close()
            raise

    @staticmethod
    def _bind(ctx: zmq.Context, endpoint: str) -> zmq.Socket:
        sock = ctx.socket(zmq.PAIR)
        _set_common_options(sock, 0)
        try:
            sock.bind(endpoint)
        except Exception:
            sock.close(0)
            raise
        return sock

    # -- waiting -----------------------------------------------------------------
    def _poller(self, event: int, abort_fd: int | None) -> zmq.Poller:
        key = (event, abort_fd)
        poller = self._pollers.get(key)
        if poller is None:
            poller = self._pollers[key] = zmq.Poller()
            poller.register(self._req, event)
            if abort_fd is not None:
                poller.register(abort_fd, zmq.POLLIN)
        return poller

    def _wait(self, event: int, deadline: float, abort_fd: int | None, what: str) -> None:
        """Return once the req socket is ready for `event`; else raise."""
        poller = self._poller(event, abort_fd)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise DeviceTimeout(f"device {self.device_id}: no {what} within the timeout")
            ready = dict(poller.poll(math.ceil(left * 1000)))
            if ready.get(self._req, 0) & event:
                return  # a reply that made it out before an exit still counts
            if abort_fd is not None and abort_fd in ready:
                raise DeviceGone(f"device {self.device_id} exited during {what}")

    def _send(self, frame: bytes, deadline: float, abort_fd: int | None, what: str) -> None:
        while True:
            try:
                self._req.send(frame, zmq.DONTWAIT, copy=False)
                return
            except zmq.Again:
                self._wait(zmq.POLLOUT, deadline, abort_fd, f"room to send {what}")

    def _send_counted(self, frame: bytes, deadline: float, abort_fd: int | None, what: str) -> int | None:
        """_send a READ or WRITE, counted in the journal first: the device may
        handle it and checkpoint before this thread runs again, and a checkpoint
        never covers more than vmmd counted. Uncounted if it never left."""
        journal = self.journal
        index = journal.count(self.generation) if journal is not None else None
        try:
            self._send(frame, deadline, abort_fd, what)
        except BaseException:
            if journal is not None:
                journal.uncount(index)
            raise
        return index

    def _recv(self, deadline: float, abort_fd: int | None, what: str,
              limit: int = protocol.MAX_FRAME) -> Message:
        """The next valid message on req; ProtocolError (logged) for garbage
        and for frames over `limit` bytes (not even decoded)."""
        while True:
            self._wait(zmq.POLLIN, deadline, abort_fd, what)
            try:
                frame = self._req.recv(zmq.DONTWAIT)
            except zmq.Again:
                continue
            if len(frame) > limit:
                text = f"{what}: frame of {len(frame)} bytes exceeds {limit}"
                self._refuse("oversized", "%s", text)
                self._complain(ErrorCode.MALFORMED, text)
                raise ProtocolError(text)
            try:
                msg = protocol.decode_from_device(frame)
                if msg.TYPE not in protocol.REQ_FROM_DEVICE:
                    raise ProtocolError(f"{msg.TYPE.name} does not belong on the request channel")
            except ProtocolError as exc:
                self._refuse("malformed", "bad frame on req: %s", exc)
                self._complain(ErrorCode.MALFORMED, str(exc))
                raise
            return msg

    def _complain(self, code: ErrorCode, text: str) -> None:
        """Best effort: tell the device what was wrong with its frame."""
        try:
            self._req.send(protocol.encode(Error(code, text[:protocol.MAX_TEXT_LEN])), zmq.DONTWAIT)
        except (zmq.ZMQError, ProtocolError):
            pass

    def _await_reply(self, seq: int, reply_type: type, deadline: float, abort_fd: int | None,
                     what: str, limit: int = protocol.MAX_SMALL_FRAME) -> Message:
        while True:
            msg = self._recv(deadline, abort_fd, what, limit)
            if type(msg) is reply_type and msg.seq == seq:
                return msg
            if type(msg) is Error:
                self._refuse("error_reports", "reported error %s: %s", msg.code, msg.text)
            elif type(msg) in (ReadReply, ControlReply):
                self._refuse("stale_replies", "dropped a stale reply seq %d", msg.seq)
            else:
                self._refuse("unexpected", "dropped an unexpected %s", msg.TYPE.name)

    def _refuse(self, kind: str, fmt: str, *args) -> None:
        if self.on_refusal is not None:
            self.on_refusal(kind, fmt, *args)
        else:
            log.warning("device %s: " + fmt, self.device_id, *args)

    def _locked(self, deadline: float, what: str):
        """The req socket's lock, waited for at most until `deadline`: a call
        stuck behind a hung device gives up in time instead of queueing."""
        if not self._lock.acquire(timeout=max(deadline - time.monotonic(), 0.0)):
            raise DeviceTimeout(f"device {self.device_id}: channel busy, no {what} within the timeout")
        return _Held(self._lock)

    def _next_seq(self) -> int:
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        return self._seq

    # -- the API -----------------------------------------------------------------
    def handshake(self, timeout: float, abort_fd: int | None = None, expect_kind: str | None = None,
                  validate=None) -> Hello:
        """Wait for the device's HELLO, answer WELCOME; return the HELLO.

        `validate(hello)` may return a reason (non-empty str) to refuse the device."""
        deadline = time.monotonic() + timeout
        with self._locked(deadline, "HELLO"):
            msg = self._recv(deadline, abort_fd, "HELLO")
            if type(msg) is not Hello:
                self._complain(ErrorCode.UNEXPECTED, f"expected HELLO, got {msg.TYPE.name}")
                raise ProtocolError(f"device {self.device_id} sent {msg.TYPE.name} before HELLO")
            reason = ""
            if msg.version != PROTOCOL_VERSION:
                reason = f"protocol version {msg.version} is not supported (vmmd speaks {PROTOCOL_VERSION})"
            elif expect_kind is not None and msg.kind != expect_kind:
                reason = f"expected a {expect_kind} device, not {msg.kind}"
            elif validate is not None:
                reason = validate(msg) or ""
            welcome = Welcome(PROTOCOL_VERSION, self.device_id, not reason, reason)
            self._send(protocol.encode(welcome), deadline, abort_fd, "WELCOME")
            if reason:
                raise HandshakeError(f"device {self.device_id}: {reason}")
            return msg

    def read(self, space: IoSpace, addr: int, size: int, timeout: float = DEFAULT_TIMEOUT,
             abort_fd: int | None = None) -> int:
        """A synchronous register read; sees the effect of all earlier writes."""
        deadline = time.monotonic() + timeout
        with self._locked(deadline, "READ"):
            seq = self._next_seq()
            journal = self.journal
            index = self._send_counted(protocol.encode(Read(seq, space, addr, size)), deadline, abort_fd,
                                       "READ")
            reply = self._await_reply(seq, ReadReply, deadline, abort_fd, f"reply to READ {addr:#x}")
            if reply.value >> (8 * size):
                text = f"value {reply.value:#x} does not fit a {size}-byte read"
                self._refuse("malformed", "%s", text)
                self._complain(ErrorCode.MALFORMED, text)
                raise ProtocolError(text)
            if journal is not None:
                journal.record(index, True, space, addr, size, 0)
        return reply.value

    def write(self, space: IoSpace, addr: int, size: int, value: int, timeout: float = DEFAULT_TIMEOUT,
              abort_fd: int | None = None) -> None:
        """A posted write: returns once queued; blocks only while the queue is full."""
        frame = protocol.encode(Write(space, addr, size, value))
        deadline = time.monotonic() + timeout
        with self._locked(deadline, "WRITE"):
            journal = self.journal
            index = self._send_counted(frame, deadline, abort_fd, "WRITE")
            if journal is not None:
                journal.record(index, False, space, addr, size, value)

    def control(self, op: str, args: dict, timeout: float = DEFAULT_TIMEOUT,
                abort_fd: int | None = None, max_reply: int | None = None) -> Any:
        """Run a CONTROL op; its result, or DeviceControlError with the device's text.

        A reply frame over `max_reply` bytes (default: MAX_FRAME for save,
        MAX_SMALL_FRAME otherwise) raises ProtocolError without being decoded."""
        if max_reply is None:
            max_reply = protocol.MAX_FRAME if op == "save" else protocol.MAX_SMALL_FRAME
        deadline = time.monotonic() + timeout
        with self._locked(deadline, f"CONTROL {op}"):
            seq = self._next_seq()
            self._send(protocol.encode(Control(seq, op, args)), deadline, abort_fd, f"CONTROL {op}")
            reply = self._await_reply(seq, ControlReply, deadline, abort_fd, f"reply to CONTROL {op}",
                                      max_reply)
        if not reply.ok:
            raise DeviceControlError(reply.result)
        return reply.result

    def decode_event(self, frame: bytes) -> Message:
        """Decode one frame read from evt_socket; ProtocolError unless it is an event."""
        msg = protocol.decode_from_device(frame)
        if msg.TYPE not in protocol.EVT_FROM_DEVICE:
            raise ProtocolError(f"{msg.TYPE.name} does not belong on the event channel")
        return msg

    def close(self) -> None:
        """Close both sockets and remove their files (idempotent)."""
        if self.evt_socket is not None:
            self.evt_socket.close(0)
        with self._lock:
            if self._req is not None:
                self._req.close(0)
            self._pollers.clear()
        for path in (self.req_path, self.evt_path):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass


class _Held:
    """Releases an already-acquired lock on leaving a with block."""
    __slots__ = ("_lock",)

    def __init__(self, lock):
        self._lock = lock

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self._lock.release()


class DeviceChannel:
    """A device process's end of the bus (asyncio; sends never block or raise)."""

    def __init__(self, ctx: zmq.Context, req_endpoint: str, evt_endpoint: str):
        if not isinstance(ctx, zmq.asyncio.Context):
            ctx = zmq.asyncio.Context.shadow(ctx.underlying)
        self._req = ctx.socket(zmq.PAIR)
        self._evt = ctx.socket(zmq.PAIR)
        for sock, endpoint in ((self._req, req_endpoint), (self._evt, evt_endpoint)):
            _set_common_options(sock, DEVICE_LINGER_MS)
            sock.connect(endpoint)
        self.device_id: str | None = None   # from WELCOME
        self._req_sync: zmq.Socket | None = None
        self._readable: asyncio.Event | None = None
        self.dropped_events = 0
        self.dropped_replies = 0
        self.bad_frames = 0

    async def hello(self, kind: str, instance: str, ranges: list[IoRange], info: dict,
                    timeout: float) -> Welcome:
        """Introduce the device; return vmmd's WELCOME or raise HandshakeError/DeviceTimeout."""
        frame = protocol.encode(Hello(PROTOCOL_VERSION, kind, instance, tuple(ranges), info))
        try:
            async with asyncio.timeout(timeout):
                await self._req.send(frame)   # may wait for the connection
                msg = protocol.decode_from_vmm(await self._req.recv())
        except TimeoutError:
            raise DeviceTimeout(f"no WELCOME from vmmd within {timeout}s") from None
        if type(msg) is Error:
            raise HandshakeError(f"vmmd refused the HELLO: {msg.text}")
        if type(msg) is not Welcome:
            raise ProtocolError(f"expected WELCOME, got {msg.TYPE.name}")
        if not msg.accepted:
            raise HandshakeError(f"vmmd did not accept the device: {msg.reason}")
        if msg.version != PROTOCOL_VERSION:
            raise HandshakeError(f"vmmd speaks protocol version {msg.version}, not {PROTOCOL_VERSION}")
        self.device_id = msg.device_id
        return msg

    async def recv(self) -> Message:
        """The next valid message from vmmd; bad frames are logged and skipped."""
        while True:
            msg = self.recv_nowait()
            if msg is not None:
                return msg
            await self.wait_readable()

    def recv_nowait(self) -> Message | None:
        """The next valid message already queued, or None.

        Serving straight from the socket, without zmq.asyncio's futures, halves
        the device's per-message cost (see BENCHMARKS.md, exit round trip)."""
        sock = self._sync_req()
        while True:
            try:
                frame = sock.recv(zmq.DONTWAIT)
            except zmq.Again:
                return None
            try:
                return protocol.decode_from_vmm(frame)
            except ProtocolError as exc:
                self.bad_frames += 1
                log.warning("bad frame from vmmd dropped: %s", exc)

    async def wait_readable(self) -> None:
        """Return once a frame is queued on req (level-checked: the zmq FD is edge-triggered)."""
        sock = self._sync_req()
        while not sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            if self._readable is None:
                loop = asyncio.get_running_loop()
                self._readable = asyncio.Event()
                loop.add_reader(sock.getsockopt(zmq.FD), self._readable.set)
            self._readable.clear()
            if sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                return
            await self._readable.wait()

    def _sync_req(self) -> zmq.Socket:
        # A plain socket over the same zmq socket: used only once the
        # handshake (the one zmq.asyncio exchange) is over.
        if self._req_sync is None:
            self._req_sync = zmq.Socket.shadow(self._req.underlying)
        return self._req_sync

    def _post(self, sock: zmq.asyncio.Socket, msg: Message) -> bool:
        try:
            frame = protocol.encode(msg)
        except ProtocolError as exc:
            log.error("cannot send %s: %s", type(msg).__name__, exc)
            return False
        try:
            # A plain non-blocking send: no future to create and resolve. Always
            # copying: pyzmq sends large zero-copy frames through a garbage
            # collector thread it starts lazily, and a thread started inside
            # the jail dies on seccomp (sched_setscheduler from libzmq).
            zmq.Socket.send(sock, frame, flags=zmq.DONTWAIT, copy=True)
        except zmq.Again:
            return False
        except zmq.ZMQError as exc:   # socket closed
            log.debug("send failed: %s", exc)
            return False
        return True

    def send_read_reply(self, seq: int, value: int) -> bool:
        ok = self._post(self._req, ReadReply(seq, value))
        self.dropped_replies += not ok
        return ok

    def send_control_reply(self, seq: int, ok: bool, result: Any) -> bool:
        if not ok:
            result = str(result)[:protocol.MAX_TEXT_LEN]
        sent = self._post(self._req, ControlReply(seq, ok, result))
        if not sent and ok:
            # Most likely the result cannot be encoded; vmmd still gets an answer.
            sent = self._post(self._req, ControlReply(seq, False, "control result could not be sent"))
        self.dropped_replies += not sent
        return sent

    def send_error(self, code: ErrorCode, text: str) -> bool:
        """An ERROR on the request channel (e.g. about a request vmmd sent)."""
        return self._post(self._req, Error(code, text[:protocol.MAX_TEXT_LEN]))

    def send_event(self, msg: Message) -> bool:
        """Queue an event (IRQ_LINE, MSI, CHECKPOINT, REQUEST, LOG, ERROR) on evt."""
        if getattr(msg, "TYPE", None) not in protocol.EVT_FROM_DEVICE:
            log.error("not an event: %r", type(msg).__name__)
            ok = False
        else:
            ok = self._post(self._evt, msg)
        self.dropped_events += not ok
        return ok

    def close(self, linger_ms: int = DEVICE_LINGER_MS) -> None:
        if self._readable is not None:
            try:
                asyncio.get_running_loop().remove_reader(self._req.getsockopt(zmq.FD))
            except (RuntimeError, zmq.ZMQError, ValueError, OSError):
                pass
        self._req.close(linger_ms)
        self._evt.close(linger_ms)


__all__ = [
    "VmmChannel", "DeviceChannel", "ChannelError", "DeviceTimeout", "DeviceGone",
    "DeviceControlError", "HandshakeError", "ProtocolError", "DEFAULT_TIMEOUT", "QUEUE_DEPTH",
    "MsgType",
]
