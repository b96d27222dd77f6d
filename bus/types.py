"""Names shared by both ends of the device bus (see bus/protocol.py)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

PROTOCOL_VERSION = 2


class IoSpace(IntEnum):
    PIO = 0
    MMIO = 1
    PCI_CFG = 2


class MsgType(IntEnum):
    HELLO = 1
    WELCOME = 2
    READ = 3
    READ_REPLY = 4
    WRITE = 5
    CONTROL = 6
    CONTROL_REPLY = 7
    IRQ_LINE = 8
    MSI = 9
    CHECKPOINT = 10
    REQUEST = 11
    LOG = 12
    ERROR = 13
    VECTOR = 14


CONTROL_OPS = frozenset({"quiesce", "resume", "save", "restore", "reset", "stats", "shutdown",
                         "dirty_sync", "device"})
ACCESS_SIZES = frozenset({1, 2, 4, 8})


@dataclass(frozen=True)
class IoRange:
    space: IoSpace
    base: int
    length: int

    @property
    def end(self) -> int:
        return self.base + self.length

    def contains(self, addr: int, size: int = 1) -> bool:
        return self.base <= addr and addr + size <= self.end
