"""The hardware-reduced ACPI sleep registers vmmd answers itself.

The FADT (vmmd/boot/acpi.py) names two 8-bit I/O registers:
  SLEEP_CONTROL_REG at port 0x3c0: SLP_TYPx in bits 4:2, SLP_EN in bit 5
  SLEEP_STATUS_REG  at port 0x3c1: WAK_STS in bit 7 (write 1 to clear)
Linux's ACPI poweroff writes WAK_STS to the status register, then
SLP_TYP=5 (the DSDT's \\_S5) | SLP_EN = 0x34 to the control register; that
write calls ``on_shutdown(reason)``. Other sleep types (S1-S4) are not
offered by the DSDT and are ignored. Same shape as vmmd.chipset.ResetControl.
"""

from __future__ import annotations

from typing import Callable

from bus.types import IoRange, IoSpace
from vmmd.boot.acpi import (S5_SLP_TYP, SLEEP_CONTROL_PORT, SLEEP_STATUS_PORT, SLP_EN,
                            SLP_TYP_MASK, SLP_TYP_SHIFT, WAK_STS)


class AcpiSleepControl:
    RANGES = [IoRange(IoSpace.PIO, SLEEP_CONTROL_PORT, 1), IoRange(IoSpace.PIO, SLEEP_STATUS_PORT, 1)]

    def __init__(self, on_shutdown: Callable[[str], None]):
        self.on_shutdown = on_shutdown
        self.control = 0  # last SLP_TYP written (SLP_EN is write-only, reads 0)
        self.status = 0   # WAK_STS; never set: vmmd does not resume from sleep

    def reset(self) -> None:
        self.control = 0
        self.status = 0

    def io_read(self, space, addr, size):
        if addr == SLEEP_CONTROL_PORT:
            return self.control
        if addr == SLEEP_STATUS_PORT:
            return self.status
        return 0xFF

    def io_write(self, space, addr, size, value):
        value &= 0xFF
        if addr == SLEEP_STATUS_PORT:
            if value & WAK_STS:
                self.status &= ~WAK_STS
            return
        if addr != SLEEP_CONTROL_PORT:
            return
        self.control = value & SLP_TYP_MASK
        slp_typ = (value & SLP_TYP_MASK) >> SLP_TYP_SHIFT
        if value & SLP_EN and slp_typ == S5_SLP_TYP:
            self.on_shutdown(f"ACPI S5 (sleep control port {SLEEP_CONTROL_PORT:#x} <- {value:#x})")
