"""Sans-I/O model of the MC146818 RTC and the PC's CMOS RAM.

Ports (offsets from 0x70): 0 index (bit 7 = NMI mask), 1 data,
2 extended-bank index, 3 extended-bank data (CMOS bytes 0x80-0xff).

Time is not ticked: the guest's clock is the host clock (``now()``) plus an
offset that the guest changes by setting the time. Consequences:

- UIP (register A bit 7) reads 1 during the last UIP_WINDOW_US of every
  guest second. The chip guarantees 244 us of warning; ours is wider
  because each guest register read is a round trip to this process, and a
  guest that reads the time within the warning window must not see a
  second boundary in the middle.
- No interrupts (IRQ 8 is not driven): register C flags stay clear, the
  PIE/AIE/UIE bits are stored but have no effect, alarm registers are RAM.
- The divider bits of register A are stored; the clock runs regardless.
- Day of week is derived from the date; writes to it are ignored.
"""

from __future__ import annotations

import calendar
from datetime import datetime, timedelta, timezone
from typing import Callable

REG_SECONDS = 0x00
REG_SECONDS_ALARM = 0x01
REG_MINUTES = 0x02
REG_MINUTES_ALARM = 0x03
REG_HOURS = 0x04
REG_HOURS_ALARM = 0x05
REG_DAY_OF_WEEK = 0x06
REG_DAY_OF_MONTH = 0x07
REG_MONTH = 0x08
REG_YEAR = 0x09
REG_A = 0x0A
REG_B = 0x0B
REG_C = 0x0C
REG_D = 0x0D
REG_CENTURY = 0x32

A_UIP = 0x80
B_SET = 0x80
B_PIE = 0x40
B_AIE = 0x20
B_UIE = 0x10
B_SQWE = 0x08
B_DM_BINARY = 0x04
B_24H = 0x02
B_DSE = 0x01
D_VRT = 0x80
HOURS_PM = 0x80

NMI_MASK = 0x80
CMOS_SIZE = 256  # two banks of 128

REG_A_POWER_ON = 0x26  # 32.768 kHz time base, 1024 Hz periodic rate
REG_B_POWER_ON = B_24H  # 24-hour, BCD: what PC firmware programs

UIP_WINDOW_US = 2000

# Memory-size bytes, laid out as SeaBIOS and QEMU expect them.
CMOS_BASE_MEM = 0x15  # KiB below 1 MiB (2 bytes)
CMOS_EXT_MEM = 0x17  # KiB above 1 MiB, max 0xFFFF (2 bytes)
CMOS_EXT_MEM2 = 0x30  # same value again (2 bytes)
CMOS_MEM_ABOVE_16M = 0x34  # 64 KiB units above 16 MiB, max 0xFFFF (2 bytes)
CMOS_MEM_ABOVE_4G = 0x5B  # 64 KiB units above 4 GiB (3 bytes)
CMOS_CHECKSUM = 0x2E  # big-endian sum of bytes 0x10..0x2d
CHECKSUM_RANGE = range(0x10, 0x2E)

_TIME_REGS = {
    REG_SECONDS: "second",
    REG_MINUTES: "minute",
    REG_HOURS: "hour",
    REG_DAY_OF_MONTH: "day",
    REG_MONTH: "month",
    REG_YEAR: "year",
    REG_CENTURY: "year",
}
_FIELDS = ("year", "month", "day", "hour", "minute", "second")

KIB = 1024
MIB = 1024 * KIB


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


def _naive_utc(t: datetime) -> datetime:
    if t.tzinfo is not None:
        t = t.astimezone(timezone.utc).replace(tzinfo=None)
    return t


def _to_bcd(v: int) -> int:
    return ((v // 10) << 4) | (v % 10)


def _from_bcd(v: int) -> int:
    return (v >> 4) * 10 + (v & 0x0F)


def _clamp(v: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, v))


def fields_to_datetime(f: dict) -> datetime:
    """Build a datetime from guest-written fields, clamping nonsense."""
    year = _clamp(f["year"], 1, 9999)
    month = _clamp(f["month"], 1, 12)
    day = _clamp(f["day"], 1, calendar.monthrange(year, month)[1])
    return datetime(
        year, month, day, _clamp(f["hour"], 0, 23), _clamp(f["minute"], 0, 59),
        _clamp(f["second"], 0, 59),
    )


def memory_size_bytes(memory_low: int, memory_high: int) -> dict[int, int]:
    """CMOS offset -> byte for the memory-size fields."""
    out: dict[int, int] = {}

    def put(offset: int, value: int, width: int) -> None:
        for i in range(width):
            out[offset + i] = (value >> (8 * i)) & 0xFF

    ext_kib = min(max(memory_low - MIB, 0) // KIB, 0xFFFF)
    above_16m = min(max(memory_low - 16 * MIB, 0) >> 16, 0xFFFF)
    above_4g = min(memory_high >> 16, 0xFFFFFF)
    put(CMOS_BASE_MEM, 640, 2)
    put(CMOS_EXT_MEM, ext_kib, 2)
    put(CMOS_EXT_MEM2, ext_kib, 2)
    put(CMOS_MEM_ABOVE_16M, above_16m, 2)
    put(CMOS_MEM_ABOVE_4G, above_4g, 3)
    return out


def _nop() -> None:
    pass


class Rtc:
    def __init__(
        self,
        now: Callable[[], datetime] = utc_now,
        memory_low: int = 0,
        memory_high: int = 0,
        on_config: Callable[[], None] = _nop,
    ):
        self.now = now
        self.on_config = on_config
        self.cmos = bytearray(CMOS_SIZE)
        for offset, byte in memory_size_bytes(memory_low, memory_high).items():
            self.cmos[offset] = byte
        self.update_checksum()
        self.cmos[REG_A] = REG_A_POWER_ON
        self.cmos[REG_B] = REG_B_POWER_ON
        self.index = 0
        self.ext_index = 0
        self.nmi_masked = False
        self.offset_us = 0  # guest time minus host time
        self.frozen: dict | None = None  # time fields while SET is 1

    def update_checksum(self) -> None:
        total = sum(self.cmos[i] for i in CHECKSUM_RANGE) & 0xFFFF
        self.cmos[CMOS_CHECKSUM] = total >> 8
        self.cmos[CMOS_CHECKSUM + 1] = total & 0xFF

    def reset(self) -> None:
        """The chip's RESET pin: interrupt enables and flags clear; the
        time, the mode bits and CMOS RAM are battery-backed and survive."""
        self.cmos[REG_B] &= ~(B_PIE | B_AIE | B_UIE | B_SQWE)
        self.cmos[REG_C] = 0

    # --- time ---------------------------------------------------------------

    def guest_time(self) -> datetime:
        if self.frozen is not None:
            return fields_to_datetime(self.frozen)
        try:
            return _naive_utc(self.now()) + timedelta(microseconds=self.offset_us)
        except OverflowError:  # an offset set on a host with a very different clock
            return datetime.min if self.offset_us < 0 else datetime.max.replace(microsecond=0)

    def _set_guest_time(self, t: datetime) -> None:
        host = _naive_utc(self.now()).replace(microsecond=0)
        self.offset_us = (t - host) // timedelta(microseconds=1)

    def _current_fields(self) -> dict:
        t = self.guest_time()
        return {name: getattr(t, name) for name in _FIELDS}

    def _encode(self, v: int) -> int:
        return v if self.cmos[REG_B] & B_DM_BINARY else _to_bcd(v)

    def _decode(self, v: int) -> int:
        return v if self.cmos[REG_B] & B_DM_BINARY else _from_bcd(v)

    def _read_time_reg(self, reg: int) -> int:
        t = self.guest_time()
        if reg == REG_SECONDS:
            return self._encode(t.second)
        if reg == REG_MINUTES:
            return self._encode(t.minute)
        if reg == REG_HOURS:
            if self.cmos[REG_B] & B_24H:
                return self._encode(t.hour)
            h12 = t.hour % 12 or 12
            return self._encode(h12) | (HOURS_PM if t.hour >= 12 else 0)
        if reg == REG_DAY_OF_WEEK:
            return self._encode(t.isoweekday() % 7 + 1)  # Sunday = 1
        if reg == REG_DAY_OF_MONTH:
            return self._encode(t.day)
        if reg == REG_MONTH:
            return self._encode(t.month)
        if reg == REG_YEAR:
            return self._encode(t.year % 100)
        return self._encode(t.year // 100)  # REG_CENTURY

    def _write_time_reg(self, reg: int, value: int) -> None:
        fields = self.frozen if self.frozen is not None else self._current_fields()
        if reg == REG_HOURS and not self.cmos[REG_B] & B_24H:
            pm = bool(value & HOURS_PM)
            fields["hour"] = self._decode(value & ~HOURS_PM & 0xFF) % 12 + (12 if pm else 0)
        elif reg == REG_YEAR:
            fields["year"] = fields["year"] // 100 * 100 + self._decode(value) % 100
        elif reg == REG_CENTURY:
            fields["year"] = self._decode(value) * 100 + fields["year"] % 100
        else:
            fields[_TIME_REGS[reg]] = self._decode(value)
        if self.frozen is None:
            self._set_guest_time(fields_to_datetime(fields))

    def _uip(self) -> bool:
        if self.frozen is not None:
            return False  # SET stops updates
        return self.guest_time().microsecond >= 1_000_000 - UIP_WINDOW_US

    def _write_reg_b(self, value: int) -> None:
        old = self.cmos[REG_B]
        if value & B_SET:
            value &= ~B_UIE  # the chip clears UIE when SET is written
            if not old & B_SET:
                self.frozen = self._current_fields()
        elif old & B_SET and self.frozen is not None:
            self._set_guest_time(fields_to_datetime(self.frozen))
            self.frozen = None
        self.cmos[REG_B] = value

    # --- registers ------------------------------------------------------------

    def read_register(self, reg: int) -> int:
        if reg in _TIME_REGS or reg == REG_DAY_OF_WEEK:
            return self._read_time_reg(reg)
        if reg == REG_A:
            return (self.cmos[REG_A] & ~A_UIP) | (A_UIP if self._uip() else 0)
        if reg == REG_C:
            value = self.cmos[REG_C]
            self.cmos[REG_C] = 0  # reading C clears the flags
            return value
        if reg == REG_D:
            return D_VRT  # the battery is always good
        return self.cmos[reg]

    def write_register(self, reg: int, value: int) -> None:
        value &= 0xFF
        if reg == REG_DAY_OF_WEEK or reg in (REG_C, REG_D):
            return  # derived from the date / read-only
        if reg in _TIME_REGS:
            self._write_time_reg(reg, value)
        elif reg == REG_A:
            self.cmos[REG_A] = value & ~A_UIP
        elif reg == REG_B:
            self._write_reg_b(value)
        else:
            self.cmos[reg] = value
        self.on_config()

    # --- ports ----------------------------------------------------------------

    def io_read(self, offset: int) -> int:
        if offset == 0:
            # Write-only on real chipsets; we report what was written so the
            # NMI mask state is visible.
            return self.index | (NMI_MASK if self.nmi_masked else 0)
        if offset == 1:
            return self.read_register(self.index)
        if offset == 2:
            return self.ext_index
        if offset == 3:
            return self.cmos[0x80 | self.ext_index]
        raise ValueError(f"RTC offset {offset} out of range 0..3")

    def io_write(self, offset: int, value: int) -> None:
        value &= 0xFF
        if offset == 0:
            # NMI masking is a chipset gate in front of the CPU; KVM owns
            # NMIs, so the bit is kept and reported but gates nothing.
            self.index = value & 0x7F
            self.nmi_masked = bool(value & NMI_MASK)
        elif offset == 1:
            self.write_register(self.index, value)
        elif offset == 2:
            self.ext_index = value & 0x7F
        elif offset == 3:
            self.cmos[0x80 | self.ext_index] = value
            self.on_config()
        else:
            raise ValueError(f"RTC offset {offset} out of range 0..3")

    # --- save / restore (shape validated by devices/lpc/state.py) ------------

    def save(self) -> dict:
        return {
            "cmos": bytes(self.cmos),
            "index": self.index,
            "ext_index": self.ext_index,
            "nmi_masked": self.nmi_masked,
            "offset_us": self.offset_us,
            "frozen": None if self.frozen is None else [self.frozen[f] for f in _FIELDS],
        }

    def restore(self, state: dict) -> None:
        self.cmos = bytearray(state["cmos"])
        self.index = state["index"]
        self.ext_index = state["ext_index"]
        self.nmi_masked = state["nmi_masked"]
        self.offset_us = state["offset_us"]
        frozen = state["frozen"]
        self.frozen = None if frozen is None else dict(zip(_FIELDS, frozen))
