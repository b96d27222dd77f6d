"""LpcDevice: dispatch, IRQ lines, checkpoints, save/restore, backends."""

import asyncio
import copy
import os
import socket
import stat
from datetime import datetime, timezone

import msgpack
import pytest

from bus.types import IoRange, IoSpace
from devices.lpc import uart as u
from devices.lpc.backend import Backend, EscapeFilter, make_backend, parse_spec
from devices.lpc.model import LpcDevice
from devices.lpc.state import STATE_VERSION

PIO = IoSpace.PIO
COM1 = 0x3F8
COM2 = 0x2F8
TIMEOUT = 5.0


class FakeHost:
    memory = None

    def __init__(self):
        self.irqs = []
        self.checkpoints = 0
        self.requests = []

    def set_irq_line(self, gsi, level):
        self.irqs.append((gsi, level))

    def send_msi(self, address, data):
        raise AssertionError("the LPC device has no MSI")

    def checkpoint(self):
        self.checkpoints += 1

    def request(self, what, args=None):
        self.requests.append(what)


class FakeBackend(Backend):
    kind = "fake"
    has_input = True

    def __init__(self):
        super().__init__()
        self.out = bytearray()

    def write(self, data):
        self.out += data


def fixed_clock():
    return datetime(2024, 5, 6, 7, 8, 9, tzinfo=timezone.utc)


@pytest.fixture
def host():
    return FakeHost()


@pytest.fixture
def dev(host):
    d = LpcDevice(host, {"memory_low": 256 << 20}, now=fixed_clock)
    yield d
    d.close()


def outb(dev, port, value):
    dev.io_write(PIO, port, 1, value)


def inb(dev, port):
    return dev.io_read(PIO, port, 1)


def test_io_ranges(dev):
    ranges = dev.io_ranges()
    for base, length in ((COM1, 8), (COM2, 8), (0x70, 4)):
        assert IoRange(PIO, base, length) in ranges
    singles = {r.base for r in ranges if r.length == 1}
    assert {0x60, 0x61, 0x64, 0x92} <= singles
    assert 0x80 not in singles  # only with post_port
    assert not any(r.contains(0xCF8) or r.contains(0x3E8) or r.contains(0x378) for r in ranges)


def test_post_port_option(host):
    d = LpcDevice(host, {"post_port": True})
    assert IoRange(PIO, 0x80, 1) in d.io_ranges()
    outb(d, 0x80, 0x42)
    assert d.stats()["post_code"] == 0x42


def test_dispatch_by_address(dev):
    outb(dev, COM1 + u.SCR, 0x11)
    outb(dev, COM2 + u.SCR, 0x22)
    assert inb(dev, COM1 + u.SCR) == 0x11
    assert inb(dev, COM2 + u.SCR) == 0x22
    outb(dev, 0x70, 0x09)
    assert inb(dev, 0x71) == 0x24  # year, BCD
    assert dev.io_read(IoSpace.MMIO, COM1, 4) == 0xFFFFFFFF


def test_wide_access_is_split_into_bytes(dev):
    dev.io_write(PIO, COM1 + u.MSR, 2, 0x5A00)  # MSR ignores, SCR takes the high byte
    assert inb(dev, COM1 + u.SCR) == 0x5A
    assert dev.io_read(PIO, COM1 + u.MSR, 2) >> 8 == 0x5A
    assert dev.io_read(PIO, 0x92, 2) >> 8 == 0xFF  # 0x93 is not ours


def test_irq_reaches_host_only_on_change(dev, host):
    outb(dev, COM1 + u.MCR, u.MCR_OUT2)
    outb(dev, COM1 + u.IER_DLM, u.IER_ETBEI)
    outb(dev, COM1 + u.IER_DLM, u.IER_ETBEI | u.IER_ERBFI)
    outb(dev, COM1 + u.SCR, 1)
    assert host.irqs == [(4, True)]
    assert inb(dev, COM1 + u.IIR_FCR) == u.IIR_THRI
    assert host.irqs == [(4, True), (4, False)]
    outb(dev, COM2 + u.MCR, u.MCR_OUT2)
    outb(dev, COM2 + u.IER_DLM, u.IER_ETBEI)
    assert host.irqs[-1] == (3, True)


def test_checkpoint_on_config_not_on_data(dev, host):
    outb(dev, COM1, ord("a"))
    inb(dev, COM1 + u.LSR)
    assert host.checkpoints == 0
    outb(dev, COM1 + u.IER_DLM, 1)
    outb(dev, COM1 + u.IIR_FCR, 1)
    outb(dev, 0x70, 0x0B)
    assert host.checkpoints == 2
    outb(dev, 0x71, 0x06)
    assert host.checkpoints == 3


def test_tx_goes_to_backend(dev):
    fake = FakeBackend()
    dev.ports["com1"].backend = fake
    for ch in b"hello":
        outb(dev, COM1, ch)
    assert fake.out == b"hello"
    assert dev.stats()["com1"]["tx_bytes"] == 5


def test_input_backpressure_loses_nothing(dev):
    port = dev.ports["com1"]
    fake = FakeBackend()
    port.backend = fake
    outb(dev, COM1 + u.IIR_FCR, u.FCR_ENABLE)
    text = bytes(range(40, 80))
    port.on_input(text)
    assert fake.reading_paused
    got = bytearray()
    while inb(dev, COM1 + u.LSR) & u.LSR_DR:
        got.append(inb(dev, COM1))
    assert bytes(got) == text
    assert not fake.reading_paused


def test_quiesce_holds_input_until_resume(dev):
    port = dev.ports["com2"]
    fake = FakeBackend()
    port.backend = fake
    dev.quiesce()
    assert fake.reading_paused
    port.on_input(b"k")
    assert not inb(dev, COM2 + u.LSR) & u.LSR_DR
    dev.resume()
    assert inb(dev, COM2) == ord("k")
    assert not fake.reading_paused


def test_i8042_and_reset_requests(dev, host):
    assert inb(dev, 0x64) & 0x01 == 0  # no data
    assert inb(dev, 0x60) == 0
    outb(dev, 0x64, 0xAA)
    assert inb(dev, 0x64) & 0x01
    assert inb(dev, 0x60) == 0x55
    outb(dev, 0x64, 0x20)
    ctr = inb(dev, 0x60)
    outb(dev, 0x64, 0x60)
    outb(dev, 0x60, ctr ^ 0x01)
    outb(dev, 0x64, 0x20)
    assert inb(dev, 0x60) == ctr ^ 0x01
    assert host.requests == []
    outb(dev, 0x64, 0xFE)
    assert host.requests == ["reset"]
    outb(dev, 0x92, 0x01)
    assert host.requests == ["reset", "reset"]
    assert inb(dev, 0x92) & 0x02  # A20 always on


def test_port_61_refresh_toggles_and_out2_follows_gate(dev):
    a, b = inb(dev, 0x61), inb(dev, 0x61)
    assert (a ^ b) & 0x10
    outb(dev, 0x61, 0x01)
    assert inb(dev, 0x61) & 0x20


def configure_com1(dev):
    outb(dev, COM1 + u.LCR, 0x83)
    outb(dev, COM1 + u.RBR_THR_DLL, 0x01)
    outb(dev, COM1 + u.LCR, 0x03)
    outb(dev, COM1 + u.IIR_FCR, 0xC7)
    outb(dev, COM1 + u.MCR, u.MCR_OUT2 | u.MCR_DTR | u.MCR_RTS)
    outb(dev, COM1 + u.IER_DLM, u.IER_ERBFI)
    outb(dev, COM1 + u.SCR, 0x99)
    dev.ports["com1"].on_input(b"abc")
    outb(dev, 0x70, 0x40)
    outb(dev, 0x71, 0x77)


def test_save_restore_round_trip_restores_behaviour_and_irq(dev, host):
    configure_com1(dev)
    assert host.irqs[-1] == (4, True)
    state = msgpack.unpackb(msgpack.packb(dev.save_state(), use_bin_type=True), raw=False)
    assert state["version"] == STATE_VERSION

    host2 = FakeHost()
    other = LpcDevice(host2, {}, now=fixed_clock)
    other.restore_state(state)
    assert (4, True) in host2.irqs
    assert other.save_state() == state
    assert inb(other, COM1 + u.SCR) == 0x99
    assert inb(other, COM1 + u.IIR_FCR) == 0xC0 | u.IIR_CTI
    assert bytes(inb(other, COM1) for _ in range(3)) == b"abc"
    assert host2.irqs[-1] == (4, False)
    outb(other, 0x70, 0x40)
    assert inb(other, 0x71) == 0x77
    other.close()


def bad_states(good):
    def mutate(fn):
        s = copy.deepcopy(good)
        fn(s)
        return s

    yield "not a map", [1, 2]
    yield "no version", mutate(lambda s: s.pop("version"))
    yield "future version", mutate(lambda s: s.update(version=STATE_VERSION + 1))
    yield "missing com2", mutate(lambda s: s.pop("com2"))
    yield "extra key", mutate(lambda s: s.update(bogus=1))
    yield "ier bits", mutate(lambda s: s["com1"].update(ier=0xF0))
    yield "bool as int", mutate(lambda s: s["com1"].update(lcr=True))
    yield "rx too long", mutate(lambda s: s["com1"].update(rx_fifo=b"x" * 17))
    yield "rx too long w/o fifo", mutate(lambda s: s["com2"].update(rx_fifo=b"xy"))
    yield "rx as str", mutate(lambda s: s["com1"].update(rx_fifo="abc"))
    yield "short cmos", mutate(lambda s: s["rtc"].update(cmos=b"\0" * 100))
    yield "set w/o frozen", mutate(lambda s: s["rtc"].update(
        cmos=s["rtc"]["cmos"][:0x0B] + b"\x82" + s["rtc"]["cmos"][0x0C:]))
    yield "huge offset", mutate(lambda s: s["rtc"].update(offset_us=10**30))
    yield "i8042 pending", mutate(lambda s: s["legacy"].update(i8042_pending=0x42))


def test_restore_rejects_bad_states_without_changing_anything(dev, host):
    configure_com1(dev)
    good = dev.save_state()
    before = copy.deepcopy(good)
    for why, bad in bad_states(good):
        with pytest.raises(ValueError):
            dev.restore_state(bad)
        assert dev.save_state() == before, why


def test_reset_returns_registers_to_power_on(dev, host):
    configure_com1(dev)
    outb(dev, 0x64, 0xAD)
    dev.reset()
    assert host.irqs[-1] == (4, False)
    assert inb(dev, COM1 + u.IER_DLM) == 0
    assert inb(dev, COM1 + u.LSR) == u.LSR_THRE | u.LSR_TEMT
    outb(dev, 0x70, 0x40)
    assert inb(dev, 0x71) == 0x77  # CMOS is battery-backed


def test_stats(dev):
    outb(dev, COM1, 0x41)
    dev.ports["com2"].on_input(b"z")
    s = dev.stats()
    assert s["com1"]["tx_bytes"] == 1
    assert s["com2"]["rx_bytes"] == 1
    assert s["com1"]["backend"] == "null"
    assert "irqs" in s["com1"]


@pytest.mark.parametrize("options", [
    {"com1": "tcp,1234"},
    {"com1": "file"},
    {"com1": "socket,"},
    {"com1": "stdio,x"},
    {"com1": 7},
    {"com1": "stdio", "com2": "stdio"},
    {"memory_low": -1},
    {"memory_low": "1G"},
    {"bogus": 1},
    {"console_fds": [0]},
])
def test_bad_options(host, options):
    with pytest.raises(ValueError):
        LpcDevice(host, options)


def test_parse_spec():
    assert parse_spec("null") == ("null", None)
    assert parse_spec("file,/a,b") == ("file", "/a,b")
    assert parse_spec("socket,/run/x.sock") == ("socket", "/run/x.sock")
    with pytest.raises(ValueError, match="unknown console backend"):
        parse_spec("pty")


def test_escape_filter():
    f = EscapeFilter()
    assert f.feed(b"ab\x01") == (b"ab", False)
    assert f.feed(b"\x01c") == (b"\x01c", False)
    assert f.feed(b"\x01q") == (b"\x01q", False)
    assert f.feed(b"\x01x") == (b"", True)


# --- backends with a real event loop -------------------------------------------


async def wait_until(cond):
    async def poll():
        while not cond():
            await asyncio.sleep(0.005)
    await asyncio.wait_for(poll(), TIMEOUT)


def drain_rx(dev, base):
    got = bytearray()
    while inb(dev, base + u.LSR) & u.LSR_DR:
        got.append(inb(dev, base))
    return bytes(got)


def test_socket_backend(host, tmp_path):
    path = str(tmp_path / "com1.sock")
    # A stale socket file from an earlier run is replaced.
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(path)
    stale.close()
    dev = LpcDevice(host, {"com1": f"socket,{path}"})

    async def scenario():
        await dev.start()
        for ch in b"boot:":  # no client yet: kept for replay
            outb(dev, COM1, ch)
        reader, writer = await asyncio.open_unix_connection(path)
        assert await asyncio.wait_for(reader.readexactly(5), TIMEOUT) == b"boot:"
        outb(dev, COM1, ord("!"))
        assert await asyncio.wait_for(reader.readexactly(1), TIMEOUT) == b"!"

        # A second client is turned away while the first is connected.
        r2, w2 = await asyncio.open_unix_connection(path)
        assert await asyncio.wait_for(r2.read(10), TIMEOUT) == b""
        w2.close()

        received = bytearray()
        writer.write(b"hello guest")
        await writer.drain()
        await wait_until(lambda: received.extend(drain_rx(dev, COM1)) or bytes(received) == b"hello guest")

        writer.close()
        await wait_until(lambda: dev.ports["com1"].backend.client is None)
        outb(dev, COM1, ord("?"))  # no client: must not raise
        dev.close()

    asyncio.run(scenario())
    assert not os.path.exists(path)


def test_socket_backend_refuses_non_socket_path(host, tmp_path):
    path = tmp_path / "regular"
    path.write_text("keep me")
    with pytest.raises(ValueError, match="not a socket"):
        LpcDevice(host, {"com1": f"socket,{path}"})
    assert path.read_text() == "keep me"


def test_file_backend_appends(host, tmp_path):
    path = tmp_path / "console.log"
    path.write_bytes(b"old\n")
    dev = LpcDevice(host, {"com2": f"file,{path}"})
    for ch in b"new":
        outb(dev, COM2, ch)
    dev.close()
    assert path.read_bytes() == b"old\nnew"


def test_file_backend_bad_path(host, tmp_path):
    with pytest.raises(ValueError, match="console file"):
        LpcDevice(host, {"com1": f"file,{tmp_path}/missing/dir/log"})


def test_stdio_backend_with_pipes_and_escape(host):
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    dev = LpcDevice(host, {"com1": "stdio", "console_fds": [in_r, out_w]})

    async def scenario():
        await dev.start()
        outb(dev, COM1, ord("$"))
        os.write(in_w, b"ls\x01\x01\x01x")
        received = bytearray()
        await wait_until(lambda: received.extend(drain_rx(dev, COM1)) or len(received) >= 3)
        await wait_until(lambda: host.requests == ["quit"])
        assert bytes(received) == b"ls\x01"
        dev.close()

    try:
        asyncio.run(scenario())
        assert os.read(out_r, 10) == b"$"
        assert os.get_blocking(in_r)  # flags restored on close
    finally:
        for fd in (in_r, in_w, out_r, out_w):
            os.close(fd)


def test_stdio_output_dropped_when_consumer_gone(host):
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    os.close(out_r)  # nobody reads the console
    backend = make_backend("stdio", stdin_fd=in_r, stdout_fd=out_w)
    backend.write(b"lost")
    backend.write(b"too")
    assert backend.stats["tx_dropped"] == 7
    backend.close()
    for fd in (in_r, in_w, out_w):
        os.close(fd)


def test_stdio_output_buffers_when_consumer_is_slow(host):
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    backend = make_backend("stdio", stdin_fd=in_r, stdout_fd=out_w)
    chunk = b"x" * 4096
    total = 0

    async def scenario():
        nonlocal total
        backend.start(asyncio.get_running_loop(), lambda data: None)
        for _ in range(64):  # far more than a pipe holds: never blocks
            backend.write(chunk)
        got = bytearray()

        async def read_all():
            while len(got) < backend.stats["tx_bytes"] or backend.out.buf:
                try:
                    got.extend(os.read(out_r, 65536))
                except BlockingIOError:
                    pass
                await asyncio.sleep(0.001)
        os.set_blocking(out_r, False)
        await asyncio.wait_for(read_all(), TIMEOUT)
        total = len(got)

    asyncio.run(scenario())
    assert total == backend.stats["tx_bytes"]
    assert total + backend.stats["tx_dropped"] == 64 * 4096
    backend.close()
    for fd in (in_r, in_w, out_r, out_w):
        os.close(fd)


def test_stdio_backend_with_unpollable_stdin(host, tmp_path):
    null_in = os.open(os.devnull, os.O_RDONLY)
    out_r, out_w = os.pipe()
    dev = LpcDevice(host, {"com1": "stdio", "console_fds": [null_in, out_w]})

    async def scenario():
        await dev.start()  # /dev/null cannot be polled: simply no input
        outb(dev, COM1, ord("k"))
        dev.close()

    try:
        asyncio.run(scenario())
        assert os.read(out_r, 10) == b"k"
    finally:
        for fd in (null_in, out_r, out_w):
            os.close(fd)


def test_lpc_presents_an_isa_bridge_function():
    from bus.pci_info import parse_pci_info
    from bus.types import IoSpace
    from devices.lpc.model import LpcDevice

    class Host:
        memory = None
        def set_irq_line(self, gsi, level): pass
        def send_msi(self, a, d): pass
        def checkpoint(self): pass
        def request(self, what, args=None): pass

    dev = LpcDevice(Host(), {"com1": "null", "com2": "null"})
    info = parse_pci_info(dev.hello_info()["pci"])
    assert info.bars == () and info.msix is None and info.intx_pin == 0
    assert dev.io_read(IoSpace.PCI_CFG, 0x00, 4) == 0x7000_8086
    assert dev.io_read(IoSpace.PCI_CFG, 0x0A, 2) == 0x0601  # ISA bridge
    assert dev.io_read(IoSpace.PCI_CFG, 0x10, 4) == 0      # no BARs
    dev.io_write(IoSpace.PCI_CFG, 0x00, 4, 0x12345678)      # identification is read-only
    assert dev.io_read(IoSpace.PCI_CFG, 0x00, 4) == 0x7000_8086
    dev.io_write(IoSpace.PCI_CFG, 0x04, 2, 0xFFFF)
    assert dev.io_read(IoSpace.PCI_CFG, 0x04, 2) == 0x0007
    assert dev.io_read(IoSpace.PCI_CFG, 0xFE, 4) == 0xFFFFFFFF  # past the end
    dev.close()


def test_console_file_is_created_private(tmp_path):
    """Guest console output may hold secrets: the file is created 0600 whatever the umask."""
    from devices.lpc.backend import FileBackend
    old = os.umask(0)
    try:
        b = FileBackend(str(tmp_path / "com1.out"))
    finally:
        os.umask(old)
    b.write(b"hello")
    b.close()
    assert stat.S_IMODE(os.stat(tmp_path / "com1.out").st_mode) == 0o600
