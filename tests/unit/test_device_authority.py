"""Authorisation of device-originated messages (vmmd/authority.py, the
supervisor's event handling), the refusal log's rate limit, waiting for a
restarting device, the crash-loop limit, bounded channel waits."""

from __future__ import annotations

import asyncio
import logging
import threading
import time

import pytest

from bus import endpoint as bus_endpoint
from bus import protocol as p
from bus.types import IoSpace
from vmmd.authority import ResetPortWatch, msi_delivery_ok
from vmmd.config import parse_args
from vmmd.devlink import DeviceSpec, Incarnation, ManagedDevice
from vmmd.pci.gsi import GsiRouter
from vmmd.pci.msix import CTRL_ENABLE, MsixTable
from vmmd.ratelimit import TokenBucket
from vmmd.supervisor import BACKOFF_DELAYS, Supervisor


# -- the token bucket -------------------------------------------------------------------

def test_token_bucket_allows_a_burst_then_a_rate_and_counts_what_it_suppressed():
    now = [0.0]
    b = TokenBucket(rate=2.0, burst=3, clock=lambda: now[0])
    assert [b.take() for _ in range(5)] == [0, 0, 0, None, None]
    now[0] += 0.5                     # one token back
    assert b.take() == 2              # ...and it reports the two lines dropped meanwhile
    assert b.take() is None
    now[0] += 100                     # refills to the burst, no more
    assert [b.take() for _ in range(4)] == [1, 0, 0, None]
    assert b.suppressed_total == 4


# -- MSI delivery modes -----------------------------------------------------------------

@pytest.mark.parametrize("mode,ok", [(0, True), (1, True), (2, False), (4, False), (5, False), (7, False),
                                     (3, False), (6, False)])
def test_only_fixed_and_lowest_priority_msis_are_interrupts(mode, ok):
    assert msi_delivery_ok(0x41 | mode << 8 | 0x8000) is ok


class FakeVm:
    def __init__(self):
        self.msis = []

    def set_gsi_routing(self, routes):
        pass

    def signal_msi(self, addr, data):
        self.msis.append((addr, data))


def test_a_msix_entry_asking_for_init_nmi_or_smi_is_never_live():
    router, vm = GsiRouter(), FakeVm()
    t = MsixTable(2, [24, 25], router)
    t.attach(vm)
    router.attach(vm)
    t.set_control(True, False)
    for v, data in ((0, 0x41), (1, 0x500)):           # vector 1: INIT
        t.write_table(v * 16, 4, 0xFEE00000)
        t.write_table(v * 16 + 8, 4, data)
        t.write_table(v * 16 + 12, 4, 0)              # unmask
    assert t.live(0) and not t.live(1)
    t.fire(0)
    t.fire(1)
    assert vm.msis == [(0xFEE00000, 0x41)]           # the INIT one stays pending, never sent
    assert t.pending(1)
    assert router.routes()[-1].gsi == 24              # no route for the INIT entry


# -- the reset ports ----------------------------------------------------------------------

def test_reset_permit_follows_the_guests_reset_commands_only():
    w = ResetPortWatch()
    assert not w.take_permit()
    for port, value in ((0x64, 0x20), (0x64, 0xAA), (0x64, 0xFF), (0x60, 0x00), (0x92, 0x02), (0x61, 0x01)):
        w.observe_write(port, value)
        assert not w.take_permit(), (port, value)
    w.observe_write(0x64, 0xFE)                       # pulse RESET
    assert w.take_permit() and not w.take_permit()    # one shot
    w.observe_write(0x64, 0xD1)
    w.observe_write(0x60, 0x00)                       # output port with RESET low
    assert w.take_permit()
    w.observe_write(0x64, 0xD1)
    w.observe_write(0x60, 0x01)                       # RESET high: no reset
    assert not w.take_permit()
    w.observe_write(0x92, 0x01)                       # port A bit 0
    assert w.take_permit()


# -- the supervisor's event handling ------------------------------------------------------

class FakeFunction:
    def __init__(self, vectors):
        self.msix = type("M", (), {"vectors": vectors})()
        self.fired = []

    def fire_vector(self, v):
        self.fired.append(v)


@pytest.fixture
def sup():
    loop = asyncio.new_event_loop()
    calls = {"irq": [], "req": []}
    s = Supervisor(loop=loop, rundir="/tmp", memory=None, iospace=None,
                   irq_line=lambda g, lvl: calls["irq"].append((g, lvl)),
                   on_request=lambda d, what, args: calls["req"].append((d.spec.id, what)),
                   sandbox="off", timeout=1.0)
    s.calls = calls
    yield s
    s.workers.shutdown(wait=False)
    loop.close()


def managed(kind="virtio_balloon", **spec):
    return ManagedDevice(DeviceSpec(id=kind, kind=kind, options={}, **spec), 1.0, "on")


def test_events_are_authorised_against_what_the_device_owns(sup, caplog):
    dev = managed(allowed_gsis=frozenset({17}))
    dev.pci_function = FakeFunction(5)
    events = [p.Vector(4), p.Vector(5), p.Vector(2047), p.IrqLine(17, 1), p.IrqLine(4, 1), p.IrqLine(0, 1),
              p.Msi(0xFEE00000, 0x41), p.Msi(0xFEE00000, 0x500), p.Request("reset", {}), p.Request("quit", {}),
              p.Checkpoint({"ok": 1}), p.Log(20, "hello\nvmmd ERROR forged")]
    with caplog.at_level(logging.INFO):
        for msg in events:
            sup._handle_event(dev, msg)
    assert dev.pci_function.fired == [4]
    assert sup.calls == {"irq": [(17, 1)], "req": []}
    assert dev.last_checkpoint == {"ok": 1}
    assert dev.refused == {"vector": 2, "irq_line": 2, "msi": 2, "request": 2}
    assert dev.describe()["refused_total"] == 8
    assert dev.operator_stats()["vmmd"]["refused"] == dev.refused
    # The relayed log line stays one line of vmmd's log.
    relayed = [r.getMessage() for r in caplog.records if "[virtio_balloon]" in r.getMessage()]
    assert relayed and all("\n" not in m for m in relayed)


def test_a_device_without_msix_fires_no_vector(sup):
    dev = managed("lpc")
    sup._handle_event(dev, p.Vector(0))
    assert dev.refused == {"vector": 1}


def test_reset_only_from_the_reset_port_owner_after_the_guest_asked(sup):
    lpc = managed("lpc", reset_ports=True, allowed_gsis=frozenset({3, 4, 8}))
    sup._handle_event(lpc, p.Request("reset", {}))
    assert sup.calls["req"] == [] and lpc.refused == {"request": 1}
    lpc.reset_watch.observe_write(0x64, 0xFE)          # what io_write does for a guest write
    sup._handle_event(lpc, p.Request("reset", {}))
    sup._handle_event(lpc, p.Request("reset", {}))      # the permit was used up
    assert sup.calls["req"] == [("lpc", "reset")] and lpc.refused == {"request": 2}


def test_quit_only_from_a_console_on_stdio(sup):
    lpc = managed("lpc", reset_ports=True)
    sup._handle_event(lpc, p.Request("quit", {}))
    assert sup.calls["req"] == []
    on_stdio = managed("lpc", reset_ports=True, stdio=True)
    sup._handle_event(on_stdio, p.Request("quit", {}))
    assert sup.calls["req"] == [("lpc", "quit")]


def test_refusal_logging_is_rate_limited_per_kind(sup, caplog):
    dev = managed()
    dev.pci_function = FakeFunction(1)
    with caplog.at_level(logging.WARNING):
        for _ in range(10000):
            sup._handle_event(dev, p.Vector(9))
        sup._handle_event(dev, p.Msi(0xFEE00000, 0x500))   # another kind still gets its line
    lines = [r.getMessage() for r in caplog.records]
    assert dev.refused == {"vector": 10000, "msi": 1}
    assert len(lines) < 20 and any("raw MSI" in m for m in lines)
    assert dev.log_lines_suppressed() > 9900


def test_an_oversized_checkpoint_frame_is_recognised_before_decoding():
    frame = p.encode(p.Checkpoint({"blob": "x" * 300_000}))
    assert p.frame_type(frame) == p.MsgType.CHECKPOINT
    assert p.frame_type(p.encode(p.Vector(1))) == p.MsgType.VECTOR
    assert p.frame_type(b"") is None and p.frame_type(b"\xc1") is None


# -- waiting for a restarting device ---------------------------------------------------------

class FakeChannel:
    def __init__(self, value=0x60):
        self.value = value
        self.writes = []

    def read(self, space, addr, size, timeout, abort_fd):
        return self.value

    def write(self, space, addr, size, value, timeout, abort_fd):
        self.writes.append(value)


def test_an_access_waits_for_the_restarting_device_and_reaches_its_successor():
    dev = managed("lpc")
    dev.timeout = 30.0
    dev.set_current(None, "restarting")
    new = Incarnation(2, 123, -1, FakeChannel(0x60))
    threading.Timer(0.2, dev.set_current, (new, "running")).start()
    assert dev.io_read(IoSpace.PIO, 0x3FD, 1) == 0x60      # not all-ones: it waited
    dev.io_write(IoSpace.PIO, 0x3F8, 1, 0x41)
    assert new.channel.writes == [0x41]


def test_a_failed_or_stopped_device_reads_all_ones_at_once():
    for state in ("failed", "stopped"):
        dev = managed("lpc")
        dev.timeout = 3600.0                                  # would hang the test if it waited
        dev.set_current(None, state)
        assert dev.io_read(IoSpace.PIO, 0x3FD, 1) == 0xFF
        dev.io_write(IoSpace.PIO, 0x3F8, 1, 0x41)


def test_a_restart_that_takes_too_long_costs_all_ones_after_the_timeout():
    dev = managed("lpc")
    dev.timeout = 0.2
    dev.set_current(None, "crashed")
    assert dev.io_read(IoSpace.PIO, 0x3FD, 2) == 0xFFFF


# -- crash-loop limit and back-off --------------------------------------------------------

def test_backoff_is_capped_at_two_seconds():
    assert max(BACKOFF_DELAYS) == 2.0


def test_the_crash_loop_limit_marks_the_device_failed(sup, monkeypatch):
    monkeypatch.setattr("vmmd.supervisor.BACKOFF_DELAYS", (0.01, 0.02))
    sup.crash_limit = (3, 60.0)
    dev = managed("lpc")
    started = []

    async def fake_start(d):
        started.append(d.spec.id)
    sup.start = fake_start

    async def crash_n(n):
        for _ in range(n):
            dev.set_current(None, "crashed")
            sup._schedule_restart(dev, 0.1)
            await asyncio.sleep(0.1)
    sup.loop.run_until_complete(crash_n(4))
    assert dev.state == "failed" and len(started) == 3
    assert len(dev.crash_times) == 4


# -- bounded channel waits ----------------------------------------------------------------

def test_a_call_behind_a_busy_channel_gives_up_in_time(tmp_path):
    import zmq
    ctx = zmq.Context()
    ch = bus_endpoint.VmmChannel(ctx, str(tmp_path), "dev", 1)
    try:
        ch._lock.acquire()   # a call stuck on a hung device holds the lock
        try:
            with pytest.raises(bus_endpoint.DeviceTimeout, match="busy"):
                ch.control("stats", {}, 0.1)
            with pytest.raises(bus_endpoint.DeviceTimeout, match="busy"):
                ch.read(IoSpace.PIO, 0x60, 1, 0.1)
        finally:
            ch._lock.release()
    finally:
        ch.close()
        ctx.destroy(0)


def test_operator_calls_per_device_are_bounded():
    dev = managed()
    gate = threading.Event()
    dev.control = lambda op, args=None, timeout=None: gate.wait(10)
    threads = [threading.Thread(target=dev.operator_control, args=("stats",)) for _ in range(2)]
    for t in threads:
        t.start()
    time.sleep(0.1)
    with pytest.raises(bus_endpoint.DeviceTimeout, match="busy"):
        dev.operator_control("stats")
    gate.set()
    for t in threads:
        t.join()


# -- configuration ---------------------------------------------------------------------------

def test_crash_limit_option(tmp_path, capsys):
    elf = tmp_path / "g.elf"
    elf.write_bytes(b"\0" * 512)
    assert parse_args(["--raw", str(elf)]).device_crash_limit == (5, 60.0)
    assert parse_args(["--raw", str(elf), "--device-crash-limit", "3/10"]).device_crash_limit == (3, 10.0)
    from vmmd.config import parse_or_exit
    for bad in ("3", "0/10", "3/0", "x/y", "3/-1"):
        with pytest.raises(SystemExit) as exc:
            parse_or_exit(["--raw", str(elf), "--device-crash-limit", bad])
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("vmmd: error:") and err.count("\n") == 1, err
