"""The LPC bridge's PCI function (bhyve puts it at 0:31.0): an ISA bridge.

Its configuration space only identifies the bridge; it has no BARs, no
capabilities and no interrupt. The legacy ports it decodes (UARTs, RTC,
i8042...) are fixed and declared as HELLO ranges. Writable bits: the low
COMMAND bits (I/O, memory, bus master) are accepted and read back; every
other write is dropped, as on a bridge with read-only identification.
"""

from __future__ import annotations

import struct

VENDOR_INTEL = 0x8086
DEVICE_PIIX3_ISA = 0x7000   # the ISA bridge bhyve and QEMU's i440FX present
CLASS_ISA_BRIDGE = 0x060100
COMMAND_WRITABLE = 0x0007
CONFIG_SIZE = 256

# HELLO info["pci"] for a function with nothing but its configuration space.
PCI_DECLARATION = {"bars": [], "msix": None, "notify": None, "intx_pin": 0}


class IsaBridgeConfig:
    def __init__(self):
        self.space = bytearray(CONFIG_SIZE)
        struct.pack_into("<HH", self.space, 0x00, VENDOR_INTEL, DEVICE_PIIX3_ISA)
        struct.pack_into("<I", self.space, 0x08, CLASS_ISA_BRIDGE << 8)  # revision 0
        struct.pack_into("<HH", self.space, 0x2C, VENDOR_INTEL, DEVICE_PIIX3_ISA)  # subsystem
        self.reset()

    def reset(self) -> None:
        struct.pack_into("<H", self.space, 0x04, COMMAND_WRITABLE & 0x1)  # I/O decoding on
        struct.pack_into("<H", self.space, 0x06, 0x0200)  # status: medium DEVSEL

    def read(self, offset: int, size: int) -> int:
        if offset < 0 or offset + size > CONFIG_SIZE:
            return (1 << (8 * size)) - 1
        return int.from_bytes(self.space[offset:offset + size], "little")

    def write(self, offset: int, size: int, value: int) -> None:
        for i in range(size):
            if offset + i == 0x04:
                self.space[0x04] = (value >> (8 * i)) & COMMAND_WRITABLE
