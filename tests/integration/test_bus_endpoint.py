"""bus.endpoint: VmmChannel (sync, vmmd side) against DeviceChannel (asyncio,
in a thread) and against a hand-driven fake device sending raw frames."""

import asyncio
import os
import shutil
import tempfile
import threading

import msgpack
import pytest
import zmq
import zmq.asyncio

from bus import protocol as p
from bus.endpoint import (
    DeviceChannel, DeviceControlError, DeviceGone, DeviceTimeout, HandshakeError, VmmChannel,
)
from bus.protocol import ProtocolError
from bus.types import PROTOCOL_VERSION, IoRange, IoSpace

PIO, MMIO = IoSpace.PIO, IoSpace.MMIO
SLOW_ADDR = 0xDEAD0   # the registers device answers reads here only after `release` is set
T = 10.0              # generous timeout for things that should succeed


@pytest.fixture
def rundir():
    d = tempfile.mkdtemp(prefix="bus", dir="/tmp")   # short: sun_path is 107 bytes
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def ctx():
    c = zmq.Context()
    yield c
    c.destroy(linger=0)


@pytest.fixture
def chan(ctx, rundir):
    ch = VmmChannel(ctx, rundir, "dev0", 1)
    yield ch
    ch.close()


class RegisterDevice:
    """A device process stand-in: DeviceChannel on its own asyncio loop in a thread."""

    def __init__(self, req, evt, version=PROTOCOL_VERSION):
        self.req, self.evt, self.version = req, evt, version
        self.regs = {}
        self.welcome = None
        self.error = None
        self.release = None
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._main, daemon=True)
        self.thread.start()

    def _main(self):
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self._serve())
        except BaseException as e:  # recorded for the test to see
            self.error = e
        finally:
            self.ready.set()

    async def _serve(self):
        self.release = asyncio.Event()
        self.task = asyncio.current_task()
        ctx = zmq.asyncio.Context()
        self.channel = ch = DeviceChannel(ctx, self.req, self.evt)
        try:
            hello = p.Hello(self.version, "regs", "dev0", (IoRange(MMIO, 0, 0x100000),), {"pid_in_ns": 1})
            ch_hello = ch.hello if self.version == PROTOCOL_VERSION else None
            if ch_hello is None:
                # a device from the future: send its HELLO by hand
                await ch._req.send(p.encode(hello))
                self.welcome = p.decode_from_vmm(await ch._req.recv())
                return
            self.welcome = await ch.hello("regs", "dev0", list(hello.ranges), hello.info, T)
            self.ready.set()
            while True:
                msg = await ch.recv()
                if type(msg) is p.Write:
                    self.regs[msg.addr] = msg.value
                    if msg.addr == 0x20:
                        ch.send_event(p.IrqLine(5, msg.value & 1))
                elif type(msg) is p.Read:
                    if msg.addr == SLOW_ADDR:
                        await self.release.wait()   # blocks the device, like a slow model
                    ch.send_read_reply(msg.seq, self.regs.get(msg.addr, 0))
                elif type(msg) is p.Control:
                    if msg.op == "stats":
                        ch.send_control_reply(msg.seq, True, {"regs": len(self.regs)})
                    elif msg.op == "restore":
                        if "regs" not in msg.args["state"]:
                            ch.send_control_reply(msg.seq, False, "ValueError: no regs")
                        else:
                            self.regs = {int(k): v for k, v in msg.args["state"]["regs"].items()}
                            ch.send_control_reply(msg.seq, True, None)
                    elif msg.op == "shutdown":
                        ch.send_control_reply(msg.seq, True, None)
                        return
                    else:
                        ch.send_control_reply(msg.seq, True, msg.op)
        finally:
            ch.close()
            ctx.term()

    def release_slow(self):
        self.loop.call_soon_threadsafe(self.release.set)

    def stop(self):
        if self.thread.is_alive():
            try:
                self.loop.call_soon_threadsafe(self.task.cancel)
            except RuntimeError:
                pass
        self.thread.join(T)


@pytest.fixture
def device(chan):
    dev = RegisterDevice(chan.req_endpoint, chan.evt_endpoint)
    hello = chan.handshake(T)
    assert dev.ready.wait(T) and dev.error is None
    dev.hello = hello
    yield dev
    dev.stop()


class FakeDevice:
    """Raw PAIR sockets connected to a VmmChannel: the test decides every frame."""

    def __init__(self, ctx, chan):
        self.req = ctx.socket(zmq.PAIR)
        self.evt = ctx.socket(zmq.PAIR)
        for s in (self.req, self.evt):
            s.setsockopt(zmq.LINGER, 0)
            s.setsockopt(zmq.RCVTIMEO, int(T * 1000))
        self.req.connect(chan.req_endpoint)
        self.evt.connect(chan.evt_endpoint)

    def hello(self, chan):
        self.req.send(p.encode(p.Hello(PROTOCOL_VERSION, "fake", "f0", (), {})))
        return chan.handshake(T), p.decode_from_vmm(self.req.recv())

    def answer_in_thread(self, fn):
        """Run fn(request) for the next frame from vmmd, concurrently with the caller."""
        def run():
            fn(p.decode_from_vmm(self.req.recv()))
        t = threading.Thread(target=run, daemon=True)
        t.start()
        return t

    def close(self):
        self.req.close(0)
        self.evt.close(0)


@pytest.fixture
def fake(ctx, chan):
    f = FakeDevice(ctx, chan)
    hello, welcome = f.hello(chan)
    assert welcome.accepted and welcome.device_id == "dev0" and hello.kind == "fake"
    yield f
    f.close()


# --- with a real DeviceChannel ----------------------------------------------------

def test_handshake(device, chan):
    assert device.hello.kind == "regs" and device.hello.instance == "dev0"
    assert device.hello.ranges == (IoRange(MMIO, 0, 0x100000),)
    assert device.welcome.accepted and device.welcome.device_id == "dev0"


def test_read_sees_all_earlier_posted_writes(device, chan):
    for i in range(500):
        chan.write(MMIO, 0x10 + 8 * (i % 16), 8, i)
    last = {i % 16: i for i in range(500)}
    assert [chan.read(MMIO, 0x10 + 8 * k, 8, T) for k in range(16)] == [last[k] for k in range(16)]
    chan.write(MMIO, 0x10, 1, 0xAB)
    assert chan.read(MMIO, 0x10, 1, T) == 0xAB


def test_late_reply_after_timeout_is_dropped(device, chan):
    chan.write(MMIO, 0x8, 4, 77)
    with pytest.raises(DeviceTimeout):
        chan.read(MMIO, SLOW_ADDR, 4, 0.2)
    device.release_slow()
    # The late reply (value 0, old seq) arrives first and must not be taken for this one.
    assert chan.read(MMIO, 0x8, 4, T) == 77
    assert chan.read(MMIO, 0x8, 4, T) == 77


def test_events_arrive_on_evt(device, chan):
    chan.write(MMIO, 0x20, 4, 1)
    chan.write(MMIO, 0x20, 4, 0)
    assert chan.read(MMIO, 0x20, 4, T) == 0
    poller = zmq.Poller()
    poller.register(chan.evt_socket, zmq.POLLIN)
    got = []
    while len(got) < 2 and poller.poll(T * 1000):
        got.append(chan.decode_event(chan.evt_socket.recv()))
    assert got == [p.IrqLine(5, 1), p.IrqLine(5, 0)]


def test_control_round_trip(device, chan):
    chan.write(MMIO, 0x0, 4, 1)
    assert chan.control("stats", {}, T) == {"regs": 1}
    assert chan.control("restore", {"state": {"regs": {"48": 9}}}, T) is None
    assert chan.read(MMIO, 48, 4, T) == 9
    with pytest.raises(DeviceControlError, match="no regs"):
        chan.control("restore", {"state": {}}, T)
    with pytest.raises(ProtocolError):
        chan.control("reboot", {}, T)    # not an op: refused before sending
    assert chan.control("quiesce", {}, T) == "quiesce"
    assert chan.control("shutdown", {}, T) is None
    device.thread.join(T)
    assert not device.thread.is_alive() and device.error is None


def test_version_mismatch_refused(chan):
    dev = RegisterDevice(chan.req_endpoint, chan.evt_endpoint, version=PROTOCOL_VERSION + 1)
    try:
        with pytest.raises(HandshakeError, match="version"):
            chan.handshake(T)
        dev.thread.join(T)
        assert dev.welcome.accepted is False and "version" in dev.welcome.reason
    finally:
        dev.stop()


def test_device_side_hello_rejected(ctx, rundir):
    vmm = ctx.socket(zmq.PAIR)
    vmm.setsockopt(zmq.LINGER, 0)
    vmm.bind(f"ipc://{rundir}/r")

    async def run():
        dctx = zmq.asyncio.Context()
        ch = DeviceChannel(dctx, f"ipc://{rundir}/r", f"ipc://{rundir}/e")
        try:
            task = asyncio.ensure_future(ch.hello("k", "i", [], {}, T))
            await asyncio.sleep(0)
            frame = await asyncio.get_running_loop().run_in_executor(None, vmm.recv)
            assert type(p.decode_from_device(frame)) is p.Hello
            vmm.send(p.encode(p.Welcome(PROTOCOL_VERSION, "d", False, "go away")))
            with pytest.raises(HandshakeError, match="go away"):
                await task
        finally:
            ch.close(0)
            dctx.term()
    try:
        asyncio.run(run())
    finally:
        vmm.close(0)


def test_device_recv_skips_garbage_from_vmm(ctx, rundir):
    vmm = ctx.socket(zmq.PAIR)
    vmm.setsockopt(zmq.LINGER, 0)
    vmm.setsockopt(zmq.SNDTIMEO, int(T * 1000))
    vmm.bind(f"ipc://{rundir}/r")
    frames = [b"\xc1", msgpack.packb([3, 1, 0, 0x10000, 1]), p.encode(p.ReadReply(1, 1)),
              p.encode(p.Read(5, PIO, 0x60, 1))]

    def send_all():   # a bound PAIR blocks until its peer has connected
        for frame in frames:
            vmm.send(frame)

    async def run():
        dctx = zmq.asyncio.Context()
        ch = DeviceChannel(dctx, f"ipc://{rundir}/r", f"ipc://{rundir}/e")
        try:
            await asyncio.get_running_loop().run_in_executor(None, send_all)
            msg = await asyncio.wait_for(ch.recv(), T)
            return msg, ch.bad_frames
        finally:
            ch.close(0)
            dctx.term()
    try:
        assert asyncio.run(run()) == (p.Read(5, PIO, 0x60, 1), 3)
    finally:
        vmm.close(0)


def test_device_sends_never_raise(rundir):
    async def run():
        dctx = zmq.asyncio.Context()
        # nobody is listening: the queues fill up, then sends count drops
        ch = DeviceChannel(dctx, f"ipc://{rundir}/nobody.req", f"ipc://{rundir}/nobody.evt")
        try:
            results = [ch.send_event(p.IrqLine(4, i & 1)) for i in range(5000)]
            assert not all(results) and ch.dropped_events == results.count(False)
            assert ch.send_event(p.IrqLine(4000, 1)) is False          # invalid: dropped, no raise
            assert ch.send_event(p.ReadReply(1, 1)) is False           # not an event
            for i in range(5000):
                ch.send_read_reply(i, 1)
            assert ch.dropped_replies > 0
            assert ch.send_control_reply(1, True, {"x": object()}) in (True, False)
        finally:
            ch.close(0)
            dctx.term()
    asyncio.run(run())


# --- with a fake device sending raw frames ------------------------------------------

def test_stale_and_error_replies_are_dropped(fake, chan):
    def answer(req):
        assert type(req) is p.Read
        fake.req.send(p.encode(p.ReadReply(req.seq - 1, 1)))             # stale
        fake.req.send(p.encode(p.ControlReply(req.seq + 7, True, None)))  # stale, other type
        fake.req.send(p.encode(p.Error(p.ErrorCode.INTERNAL, "oops")))  # logged, dropped
        fake.req.send(p.encode(p.ReadReply(req.seq, 0x42)))
    t = fake.answer_in_thread(answer)
    assert chan.read(PIO, 0x60, 1, T) == 0x42
    t.join(T)


def test_timeout_then_recovery(fake, chan):
    with pytest.raises(DeviceTimeout):
        chan.read(PIO, 0x60, 1, 0.1)
    first = p.decode_from_vmm(fake.req.recv())   # the unanswered read
    t = fake.answer_in_thread(lambda req: fake.req.send(p.encode(p.ReadReply(req.seq, 7))))
    assert chan.read(PIO, 0x60, 1, T) == 7
    t.join(T)
    assert type(first) is p.Read


@pytest.mark.parametrize("kind", ["pipe", "eventfd"])
def test_abort_fd_raises_device_gone(fake, chan, kind):
    if kind == "pipe":
        r, w = os.pipe()
        os.write(w, b"x")
        fds = (r, w)
    else:
        r = os.eventfd(1)
        fds = (r,)
    try:
        with pytest.raises(DeviceGone):
            chan.read(PIO, 0x60, 1, T, abort_fd=r)
        with pytest.raises(DeviceGone):
            chan.control("stats", {}, T, r)
    finally:
        for fd in fds:
            os.close(fd)
    # Still usable afterwards. The two abandoned requests are queued ahead of
    # the next one; their (late) answers must be dropped.
    def answer_all():
        for _ in range(3):
            req = p.decode_from_vmm(fake.req.recv())
            reply = (p.ReadReply(req.seq, 3) if type(req) is p.Read
                     else p.ControlReply(req.seq, True, "late"))
            fake.req.send(p.encode(reply))
    t = threading.Thread(target=answer_all, daemon=True)
    t.start()
    r2, w2 = os.pipe()
    try:
        assert chan.read(PIO, 0x61, 1, T, abort_fd=r2) == 3
    finally:
        os.close(r2)
        os.close(w2)
    t.join(T)


def test_reply_wins_over_abort(fake, chan):
    """A reply sent before the device died still completes the access."""
    r, w = os.pipe()
    try:
        def answer(req):
            fake.req.send(p.encode(p.ReadReply(req.seq, 9)))
            os.write(w, b"x")
        t = fake.answer_in_thread(answer)
        try:
            value = chan.read(PIO, 0x60, 1, T, abort_fd=r)
        except DeviceGone:
            value = None   # abort won the race to the poll: also a defined outcome
        t.join(T)
        assert value in (9, None)
    finally:
        os.close(r)
        os.close(w)


@pytest.mark.parametrize("garbage", [
    b"\xc1", b"", msgpack.packb([4]), msgpack.packb([4, 1, 2**63]), p.encode(p.IrqLine(4, 1)),
    p.encode(p.Log(20, "wrong channel")), msgpack.packb({"x": 1}),
])
def test_garbage_on_req_raises_protocol_error_then_recovers(fake, chan, garbage):
    def answer(req):
        fake.req.send(garbage)
    t = fake.answer_in_thread(answer)
    with pytest.raises(ProtocolError):
        chan.read(PIO, 0x60, 1, T)
    t.join(T)
    complaint = p.decode_from_vmm(fake.req.recv())    # vmmd told the device what was wrong
    assert type(complaint) is p.Error and complaint.code == p.ErrorCode.MALFORMED
    t = fake.answer_in_thread(lambda req: fake.req.send(p.encode(p.ReadReply(req.seq, 5))))
    assert chan.read(PIO, 0x60, 1, T) == 5
    t.join(T)


def test_read_value_wider_than_access_is_protocol_error(fake, chan):
    t = fake.answer_in_thread(lambda req: fake.req.send(p.encode(p.ReadReply(req.seq, 0x100))))
    with pytest.raises(ProtocolError):
        chan.read(PIO, 0x60, 1, T)
    t.join(T)


def test_garbage_on_evt_is_rejected(fake, chan):
    frames = [b"\xc1", p.encode(p.ReadReply(1, 1)), p.encode(p.Hello(1, "x", "y", (), {})),
              msgpack.packb([8, 4, 2]), p.encode(p.IrqLine(4, 1)), p.encode(p.Log(30, "hi"))]
    for f in frames:
        fake.evt.send(f)
    poller = zmq.Poller()
    poller.register(chan.evt_socket, zmq.POLLIN)
    good, bad = [], 0
    for _ in frames:
        assert poller.poll(T * 1000)
        try:
            good.append(chan.decode_event(chan.evt_socket.recv()))
        except ProtocolError:
            bad += 1
    assert bad == 4 and good == [p.IrqLine(4, 1), p.Log(30, "hi")]


def test_handshake_garbage_and_wrong_first_message(ctx, rundir):
    for gen, first in enumerate([b"\xc1", p.encode(p.IrqLine(4, 1)), p.encode(p.ReadReply(1, 1))]):
        ch = VmmChannel(ctx, rundir, "dev1", gen)
        f = FakeDevice(ctx, ch)
        try:
            f.req.send(first)
            with pytest.raises(ProtocolError):
                ch.handshake(T)
        finally:
            f.close()
            ch.close()


def test_handshake_timeout_and_abort(ctx, rundir):
    ch = VmmChannel(ctx, rundir, "dev2", 1)
    try:
        with pytest.raises(DeviceTimeout):
            ch.handshake(0.1)
        r = os.eventfd(1)
        try:
            with pytest.raises(DeviceGone):
                ch.handshake(T, r)
        finally:
            os.close(r)
    finally:
        ch.close()


def test_write_to_absent_device_times_out(chan):
    # Nobody connected: a PAIR socket has nowhere to queue.
    with pytest.raises(DeviceTimeout):
        chan.write(PIO, 0x60, 1, 1, timeout=0.1)
    with pytest.raises(ProtocolError):
        chan.write(PIO, 0x60, 1, 0x100)


def test_close_removes_socket_files(ctx, rundir):
    ch = VmmChannel(ctx, rundir, "dev3", 4)
    assert os.path.exists(ch.req_path) and os.path.exists(ch.evt_path)
    assert ch.req_endpoint == f"ipc://{rundir}/dev3.4.req"
    ch.close()
    ch.close()
    assert not os.path.exists(ch.req_path) and not os.path.exists(ch.evt_path)


def test_bad_device_ids(ctx, rundir):
    for bad in ("", "a/b", ".x", "x" * 200):
        with pytest.raises(ValueError):
            VmmChannel(ctx, rundir, bad, 1)


def test_concurrent_readers_are_serialised(device, chan):
    """vCPU threads share the channel: every read gets its own answer."""
    for k in range(8):
        chan.write(MMIO, 0x1000 + 8 * k, 8, k * 1000)
    errors = []

    def worker(k):
        try:
            for _ in range(50):
                assert chan.read(MMIO, 0x1000 + 8 * k, 8, T) == k * 1000
        except Exception as e:
            errors.append(e)
    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(T * 5)
    assert not errors
