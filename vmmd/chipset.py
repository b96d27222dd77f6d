"""The few I/O ports vmmd answers itself (no device process involved)."""

from __future__ import annotations

from typing import Callable

from bus.types import IoRange, IoSpace

RESET_CONTROL_PORT = 0xCF9  # PIIX/ICH reset control register
DEBUG_PORT = 0x510          # vmmd's no-op port: the in-vmmd exit benchmark reads it
POST_PORT = 0x80            # POST codes; Linux also writes it as an I/O delay


class ResetControl:
    """Port 0xCF9: writing bit 2 (SYS_RST) with bit 1 or 3 resets the machine."""

    RANGES = [IoRange(IoSpace.PIO, RESET_CONTROL_PORT, 1)]

    def __init__(self, on_reset: Callable[[str], None]):
        self.value = 0
        self.on_reset = on_reset

    def io_read(self, space, addr, size):
        return self.value

    def io_write(self, space, addr, size, value):
        value &= 0xFF
        if value & 0x04:
            self.on_reset(f"reset control port {RESET_CONTROL_PORT:#x} <- {value:#x}")
            self.value = value & ~0x04
        else:
            self.value = value


class NullPorts:
    """Ports whose writes vmmd drops and whose reads return a fixed value."""

    RANGES = [IoRange(IoSpace.PIO, DEBUG_PORT, 1), IoRange(IoSpace.PIO, POST_PORT, 1)]

    def __init__(self):
        self.writes = 0

    def io_read(self, space, addr, size):
        return 0

    def io_write(self, space, addr, size, value):
        self.writes += 1
