"""PCI configuration mechanism #1: ports 0xCF8-0xCFF.

0xCF8 (dword accesses only) is the address register: bit 31 enable, bits
23:16 bus, 15:11 device, 10:8 function, 7:2 dword register. 0xCFC-0xCFF
is the data window: an access of 1, 2 or 4 bytes at 0xCFC + k reaches
register (address & 0xFC) + k. A byte access to 0xCF9 is the reset control
register (vmmd.chipset.ResetControl), which shares these ports on
PIIX/ICH chipsets.

Sans-I/O: `target` has config_read(bus, device, function, reg, size) and
config_write(bus, device, function, reg, size, value) (vmmd.pci.bus.PciBus).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from bus.types import IoRange, IoSpace

ADDRESS_PORT = 0xCF8
DATA_PORT = 0xCFC
RESET_PORT = 0xCF9
ENABLE = 1 << 31


@dataclass(frozen=True)
class ConfigAddress:
    enabled: bool
    bus: int
    device: int
    function: int
    register: int  # dword aligned, 0..0xFC

    @classmethod
    def decode(cls, value: int) -> "ConfigAddress":
        return cls(bool(value & ENABLE), (value >> 16) & 0xFF, (value >> 11) & 0x1F,
                   (value >> 8) & 0x7, value & 0xFC)

    def encode(self) -> int:
        return ((ENABLE if self.enabled else 0) | self.bus << 16 | self.device << 11
                | self.function << 8 | (self.register & 0xFC))


class ConfigMechanism1:
    """The owner of PIO 0xCF8-0xCFF in vmmd's IoSpaceMap."""

    RANGES = [IoRange(IoSpace.PIO, ADDRESS_PORT, 8)]

    def __init__(self, target, reset_control=None):
        self.target = target
        self.reset_control = reset_control
        self.address = 0
        # The address register is shared by all vCPUs (as on hardware); the
        # lock keeps each data access paired with the address it was issued under.
        self._lock = threading.Lock()

    def io_read(self, space, port: int, size: int) -> int:
        ones = (1 << (8 * size)) - 1
        if port == RESET_PORT and size == 1:
            return self.reset_control.io_read(space, port, size) if self.reset_control else 0
        if port == ADDRESS_PORT and size == 4:
            return self.address
        if port >= DATA_PORT and (port - DATA_PORT) + size <= 4:
            with self._lock:
                a = ConfigAddress.decode(self.address)
                if not a.enabled:
                    return ones
                return self.target.config_read(a.bus, a.device, a.function,
                                               a.register + port - DATA_PORT, size) & ones
        return ones

    def io_write(self, space, port: int, size: int, value: int) -> None:
        if port == RESET_PORT and size == 1:
            if self.reset_control:
                self.reset_control.io_write(space, port, size, value)
            return
        if port == ADDRESS_PORT and size == 4:
            self.address = value & 0xFFFFFFFF & ~0x7F000003  # reserved bits read as zero
            return
        if port >= DATA_PORT and (port - DATA_PORT) + size <= 4:
            with self._lock:
                a = ConfigAddress.decode(self.address)
                if a.enabled:
                    self.target.config_write(a.bus, a.device, a.function,
                                             a.register + port - DATA_PORT, size, value)
