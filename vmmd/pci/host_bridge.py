"""The host bridge at 00:00.0, its configuration space emulated in vmmd.

Intel 440FX ids (what QEMU's i440FX shows, so guests know it), class 0x0600
(host bridge), header type 0, no BARs. Everything is read-only except the
COMMAND/STATUS words and the latency timer, which read back what was written
(guests write them; nothing depends on them).
"""

from __future__ import annotations

import struct

VENDOR_ID = 0x8086
DEVICE_ID = 0x1237
CLASS_HOST_BRIDGE = 0x060000
REVISION = 0x02


class HostBridge:
    def __init__(self):
        self.reset()

    def reset(self) -> None:
        cs = bytearray(256)
        struct.pack_into("<HH", cs, 0x00, VENDOR_ID, DEVICE_ID)
        struct.pack_into("<HH", cs, 0x04, 0x0006, 0x0000)  # memory + bus master, as firmware leaves it
        cs[0x08] = REVISION
        cs[0x09:0x0C] = CLASS_HOST_BRIDGE.to_bytes(3, "little")
        cs[0x0E] = 0x00  # header type 0, single function
        self.config = cs

    def config_read(self, reg: int, size: int) -> int:
        return int.from_bytes(self.config[reg:reg + size], "little")

    def config_write(self, reg: int, size: int, value: int) -> None:
        for i, byte in enumerate(value.to_bytes(size, "little")):
            off = reg + i
            if off in (0x04, 0x05, 0x0D):
                self.config[off] = byte
