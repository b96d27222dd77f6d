"""A tiny PCI function for the vmmd PCI tests (tests/*/test_pci_*.py).

Config space: vendor 0x1af4 device 0x10ff, header type 0, BAR0 a 64-bit
16 KiB memory BAR, BAR2 a 32-byte I/O BAR, an MSI-X capability at 0x40
(3 vectors, table at BAR0+0x1000, PBA at BAR0+0x2000), notify region at
BAR0+0x3000 (2 queues, multiplier 4), INTA. BARs follow the sizing rules
(writable address bits only). Interrupt Line (0x3C) reports options["intx_gsi"].

BAR0 registers (offset): 0x0 r/w scratch (u32); 0x8 r: the guest-physical
address of the last access as the device decoded it (base + offset);
0x10 w: fire MSI-X vector `value` (its irqfd, or a VECTOR event in bus-only
mode); 0x18 w: set INTx level (intx eventfd on 1). I/O BAR offset 0: r/w scratch byte.
"""

from __future__ import annotations

import os
import struct

from bus.types import IoSpace
from devices.model import DeviceModel

BAR0_SIZE = 0x4000
BAR2_SIZE = 0x20
MSIX_CAP = 0x40
VECTORS = 3
QUEUES = 2
PCI_INFO = {
    "bars": [[0, BAR0_SIZE, "mem64"], [2, BAR2_SIZE, "io"]],
    "msix": {"cap": MSIX_CAP, "vectors": VECTORS, "table": [0, 0x1000], "pba": [0, 0x2000]},
    "notify": {"bar": 0, "offset": 0x3000, "multiplier": 4, "queues": QUEUES},
    "intx_pin": 1,
}


class PciConfigSpace:
    """Standard type-0 header with BAR sizing and an MSI-X capability."""

    def __init__(self, intx_gsi: int = 0xFF):
        cs = bytearray(256)
        struct.pack_into("<HH", cs, 0, 0x1AF4, 0x10FF)
        struct.pack_into("<H", cs, 6, 0x0010)  # capabilities list
        cs[0x09:0x0C] = (0x018000).to_bytes(3, "little")
        cs[0x34] = MSIX_CAP
        cs[0x3C] = intx_gsi & 0xFF
        cs[0x3D] = 1  # INTA
        cs[MSIX_CAP] = 0x11
        struct.pack_into("<HII", cs, MSIX_CAP + 2, VECTORS - 1, 0x1000 | 0, 0x2000 | 0)
        self.cs = cs
        # BAR register index -> (writable mask, read-only low bits)
        self.bar_masks = {0: (~(BAR0_SIZE - 1) & 0xFFFFFFF0, 0x4), 1: (0xFFFFFFFF, None),
                          2: (~(BAR2_SIZE - 1) & 0xFFFFFFFC, 0x1)}
        for i, (_, low) in self.bar_masks.items():
            struct.pack_into("<I", cs, 0x10 + 4 * i, low or 0)

    def read(self, reg: int, size: int) -> int:
        return int.from_bytes(self.cs[reg:reg + size], "little")

    def write(self, reg: int, size: int, value: int) -> None:
        for i, byte in enumerate(value.to_bytes(size, "little")):
            self._write_byte(reg + i, byte)

    def _write_byte(self, off: int, byte: int) -> None:
        if off in (0x04, 0x05, 0x3C):
            self.cs[off] = byte
        elif 0x10 <= off < 0x28:
            i = (off - 0x10) // 4
            mask, low = self.bar_masks.get(i, (0, 0))
            shift = 8 * (off % 4)
            m = (mask >> shift) & 0xFF
            cur = self.cs[off]
            val = (cur & ~m | byte & m) & 0xFF
            if off % 4 == 0 and low is not None:
                val = val & ~0xF | (low & 0xF)
            self.cs[off] = val
        elif off == MSIX_CAP + 3:
            self.cs[off] = byte & 0xC0  # enable, function mask

    def bar(self, i: int) -> int:
        return struct.unpack_from("<I", self.cs, 0x10 + 4 * i)[0]

    @property
    def bar0(self) -> int:
        return (self.bar(1) << 32 | self.bar(0)) & ~0xF

    @property
    def bar2(self) -> int:
        return self.bar(2) & ~0x3

    def state(self) -> bytes:
        return bytes(self.cs)


class FakePciDevice(DeviceModel):
    KIND = "fakepci"
    STATE_VERSION = 1

    def __init__(self, host, options):
        super().__init__(host, options)
        self.config = PciConfigSpace(options.get("intx_gsi", 0xFF))
        self.scratch = 0
        self.io_scratch = 0
        self.last_addr = 0
        self.info = options.get("pci_info", PCI_INFO)

    def hello_info(self):
        return {"pci": self.info, "fds": sorted(getattr(self.host, "fds", {}))}

    def io_read(self, space, addr, size):
        if space == IoSpace.PCI_CFG:
            return self.config.read(addr, size)
        if space == IoSpace.PIO:
            return self.io_scratch if addr == self.config.bar2 else 0
        off = addr - self.config.bar0
        self.last_addr = addr
        if off == 0:
            return self.scratch & ((1 << (8 * size)) - 1)
        if off == 8:
            return self.last_addr & ((1 << (8 * size)) - 1)
        return 0

    def io_write(self, space, addr, size, value):
        if space == IoSpace.PCI_CFG:
            self.config.write(addr, size, value)
            self.host.checkpoint()
            return
        if space == IoSpace.PIO:
            if addr == self.config.bar2:
                self.io_scratch = value
            return
        off = addr - self.config.bar0
        self.last_addr = addr
        if off == 0:
            self.scratch = value
        elif off == 0x10:
            fd = self.host.fds.get(f"irqfd.{value}")
            if fd is not None:
                os.eventfd_write(fd, 1)
            else:
                self.host.fire_vector(value)
        elif off == 0x18:
            fd = self.host.fds.get("intx")
            if fd is not None and value:
                os.eventfd_write(fd, 1)
            elif fd is None:
                self.host.set_irq_line(self.options.get("intx_gsi", 0), bool(value))

    def save_state(self):
        return {"config": self.config.state(), "scratch": self.scratch}

    def restore_state(self, state):
        cfg = state.get("config")
        if type(cfg) is not bytes or len(cfg) != 256:
            raise ValueError("bad config")
        self.config.cs = bytearray(cfg)
        self.scratch = state.get("scratch", 0)

    def reset(self):
        self.config = PciConfigSpace(self.options.get("intx_gsi", 0xFF))
        self.scratch = 0
