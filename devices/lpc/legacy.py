"""Sans-I/O models of the other legacy PC ports a Linux guest touches.

Which ports are answered here, and why (ports not listed are left to
vmmd, which answers unclaimed ports with all-ones = a floating ISA bus):

- 0x61 system control port B. KVM's in-kernel PIT also claims 0x61 (its
  speaker port), so this only answers when vmmd runs without one. Bit 4
  (refresh) toggles on every read; bit 5 (PIT channel 2 output) follows
  the channel 2 gate (bit 0): without a PIT the "count" ends at once, so
  a guest polling bit 5 for calibration finishes instead of hanging.
- 0x80 POST code / 0x87 DMA page registers: read/write latches, as the
  page registers are on real chipsets. 0x80 is claimed only when asked
  (option "post_port"): Linux may use it as an I/O delay port, where a
  process round trip per write is wasted; vmmd can sink it in-core.
- 0x92 system control port A: bit 0 rising requests a reset; bit 1 (A20)
  always reads 1 because KVM cannot mask A20.
- 0x60/0x64 i8042: controller commands only (self test, CTR access,
  output port, reset pulse). No keyboard or mouse is attached: bytes for
  the devices are dropped and no IRQ 1/12 is ever raised, so guests should
  boot with "i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd" (as
  Firecracker guests do) to skip device probing timeouts.
- COM3/COM4 (0x3e8, 0x2e8), LPT (0x378, 0x278): not claimed; the all-ones
  vmmd returns is what an empty ISA slot reads, and Linux's probes then
  find nothing.
- 0xcf8-0xcff: PCI configuration belongs to vmmd.
"""

from __future__ import annotations

from typing import Callable

PORT_B = 0x61
POST = 0x80
DMA_PAGE0 = 0x87
PORT_A = 0x92
I8042_DATA = 0x60
I8042_CMD = 0x64

PORT_B_GATE2 = 0x01
PORT_B_SPEAKER = 0x02
PORT_B_WRITABLE = 0x0F
PORT_B_REFRESH = 0x10
PORT_B_OUT2 = 0x20

PORT_A_RESET = 0x01
PORT_A_A20 = 0x02

# i8042 status register bits
STS_OBF = 0x01
STS_SYS = 0x04
STS_CMD = 0x08  # last write was to the command port
STS_UNLOCKED = 0x10  # keyboard inhibit switch off

# i8042 controller configuration byte (CTR) bits
CTR_KBDINT = 0x01
CTR_SYS = 0x04
CTR_KBDDIS = 0x10
CTR_AUXDIS = 0x20
CTR_XLATE = 0x40
CTR_POWER_ON = CTR_KBDINT | CTR_SYS | CTR_AUXDIS | CTR_XLATE

OUTPORT_RESET = 0x01  # active low: writing 0 resets the CPU
OUTPORT_A20 = 0x02


def _nop_reset() -> None:
    pass


class I8042:
    """The keyboard controller, without keyboard or mouse."""

    def __init__(self, on_reset: Callable[[], None] = _nop_reset):
        self.on_reset = on_reset
        self.reset()

    def reset(self) -> None:
        self.ctr = CTR_POWER_ON
        self.output: int | None = None  # the one-byte output buffer
        self.pending_cmd: int | None = None  # command waiting for its data byte
        self.last_was_cmd = False

    def _put(self, byte: int) -> None:
        self.output = byte & 0xFF

    def read_status(self) -> int:
        status = STS_UNLOCKED
        if self.output is not None:
            status |= STS_OBF
        if self.ctr & CTR_SYS:
            status |= STS_SYS
        if self.last_was_cmd:
            status |= STS_CMD
        return status

    def read_data(self) -> int:
        byte, self.output = self.output, None
        return 0 if byte is None else byte

    def write_command(self, cmd: int) -> None:
        self.last_was_cmd = True
        self.pending_cmd = None
        if cmd == 0x20:
            self._put(self.ctr)
        elif cmd in (0x60, 0xD1):
            self.pending_cmd = cmd  # data byte follows on port 0x60
        elif cmd == 0xA7:
            self.ctr |= CTR_AUXDIS
        elif cmd == 0xA8:
            self.ctr &= ~CTR_AUXDIS
        elif cmd == 0xAA:
            self.ctr |= CTR_SYS
            self._put(0x55)  # self test passed
        elif cmd == 0xAB:
            self._put(0x00)  # keyboard interface test passed
        elif cmd == 0xAD:
            self.ctr |= CTR_KBDDIS
        elif cmd == 0xAE:
            self.ctr &= ~CTR_KBDDIS
        elif cmd == 0xD0:
            self._put(OUTPORT_RESET | OUTPORT_A20)
        elif 0xF0 <= cmd <= 0xFF and not cmd & 0x01:
            self.on_reset()  # pulse output lines; bit 0 low pulses RESET
        # Anything else (aux loop/test, password, ...) gets no answer, as
        # from a controller without those features.

    def write_data(self, byte: int) -> None:
        self.last_was_cmd = False
        cmd, self.pending_cmd = self.pending_cmd, None
        if cmd == 0x60:
            self.ctr = byte & 0xFF
        elif cmd == 0xD1 and not byte & OUTPORT_RESET:
            self.on_reset()
        # Otherwise the byte is for the keyboard, which is not there.


class LegacyPorts:
    """0x60/0x64 (via I8042), 0x61, 0x80, 0x87, 0x92."""

    def __init__(self, on_reset: Callable[[], None] = _nop_reset, post_port: bool = False):
        self.on_reset = on_reset
        self.i8042 = I8042(on_reset)
        self.ports = [I8042_DATA, PORT_B, I8042_CMD, DMA_PAGE0, PORT_A]
        if post_port:
            self.ports.insert(3, POST)
        self.reset()

    def reset(self) -> None:
        self.i8042.reset()
        self.port_b = 0
        self.refresh = False
        self.port_a = 0
        self.latches = {POST: 0, DMA_PAGE0: 0}

    def io_read(self, port: int) -> int:
        if port == I8042_DATA:
            return self.i8042.read_data()
        if port == I8042_CMD:
            return self.i8042.read_status()
        if port == PORT_B:
            self.refresh = not self.refresh
            value = self.port_b
            if self.refresh:
                value |= PORT_B_REFRESH
            if self.port_b & PORT_B_GATE2:
                value |= PORT_B_OUT2
            return value
        if port == PORT_A:
            return self.port_a | PORT_A_A20
        if port in self.latches:
            return self.latches[port]
        raise ValueError(f"legacy port {port:#x} not handled")

    def io_write(self, port: int, value: int) -> None:
        value &= 0xFF
        if port == I8042_DATA:
            self.i8042.write_data(value)
        elif port == I8042_CMD:
            self.i8042.write_command(value)
        elif port == PORT_B:
            self.port_b = value & PORT_B_WRITABLE
        elif port == PORT_A:
            rising = value & PORT_A_RESET and not self.port_a & PORT_A_RESET
            self.port_a = value
            if rising:
                self.on_reset()
        elif port in self.latches:
            self.latches[port] = value
        else:
            raise ValueError(f"legacy port {port:#x} not handled")

    def save(self) -> dict:
        i = self.i8042
        return {
            "port_a": self.port_a,
            "port_b": self.port_b,
            "post": self.latches[POST],
            "dma_page0": self.latches[DMA_PAGE0],
            "i8042_ctr": i.ctr,
            "i8042_output": i.output,
            "i8042_pending": i.pending_cmd,
        }

    def restore(self, state: dict) -> None:
        self.port_a = state["port_a"]
        self.port_b = state["port_b"]
        self.latches = {POST: state["post"], DMA_PAGE0: state["dma_page0"]}
        self.i8042.ctr = state["i8042_ctr"]
        self.i8042.output = state["i8042_output"]
        self.i8042.pending_cmd = state["i8042_pending"]
