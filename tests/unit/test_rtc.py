"""MC146818 RTC / CMOS model with an injected clock."""

from datetime import datetime, timedelta, timezone

import pytest

from devices.lpc import rtc as r
from devices.lpc.rtc import Rtc

MIB = 1024 * 1024
GIB = 1024 * MIB


class Clock:
    def __init__(self, t: datetime):
        self.t = t

    def __call__(self) -> datetime:
        return self.t

    def advance(self, **kw):
        self.t += timedelta(**kw)


@pytest.fixture
def clock():
    # Saturday 2024-03-09 13:45:56.250 UTC
    return Clock(datetime(2024, 3, 9, 13, 45, 56, 250_000, tzinfo=timezone.utc))


@pytest.fixture
def rtc(clock):
    return Rtc(now=clock)


def rd(rtc, reg):
    rtc.io_write(0, reg)
    return rtc.io_read(1)


def wr(rtc, reg, value):
    rtc.io_write(0, reg)
    rtc.io_write(1, value)


def test_bcd_24h_time(rtc):
    assert rd(rtc, r.REG_SECONDS) == 0x56
    assert rd(rtc, r.REG_MINUTES) == 0x45
    assert rd(rtc, r.REG_HOURS) == 0x13
    assert rd(rtc, r.REG_DAY_OF_WEEK) == 7  # Saturday, Sunday = 1
    assert rd(rtc, r.REG_DAY_OF_MONTH) == 0x09
    assert rd(rtc, r.REG_MONTH) == 0x03
    assert rd(rtc, r.REG_YEAR) == 0x24
    assert rd(rtc, r.REG_CENTURY) == 0x20


def test_binary_mode(rtc):
    wr(rtc, r.REG_B, r.B_24H | r.B_DM_BINARY)
    assert rd(rtc, r.REG_SECONDS) == 56
    assert rd(rtc, r.REG_HOURS) == 13
    assert rd(rtc, r.REG_YEAR) == 24


def test_12_hour_mode(rtc, clock):
    wr(rtc, r.REG_B, 0)  # BCD, 12h
    assert rd(rtc, r.REG_HOURS) == 0x80 | 0x01  # 1 PM
    wr(rtc, r.REG_B, r.B_DM_BINARY)
    assert rd(rtc, r.REG_HOURS) == 0x80 | 1
    clock.t = clock.t.replace(hour=0)
    assert rd(rtc, r.REG_HOURS) == 12  # midnight is 12 AM
    clock.t = clock.t.replace(hour=12)
    assert rd(rtc, r.REG_HOURS) == 0x80 | 12


def test_set_bit_freezes_and_sets_time(rtc, clock):
    wr(rtc, r.REG_B, r.B_SET | r.B_24H)
    for reg, value in ((r.REG_SECONDS, 0x58), (r.REG_MINUTES, 0x59), (r.REG_HOURS, 0x23),
                       (r.REG_DAY_OF_MONTH, 0x31), (r.REG_MONTH, 0x12), (r.REG_YEAR, 0x99),
                       (r.REG_CENTURY, 0x19)):
        wr(rtc, reg, value)
    clock.advance(seconds=10)
    assert rd(rtc, r.REG_SECONDS) == 0x58  # frozen while SET
    assert rd(rtc, r.REG_A) & r.A_UIP == 0
    wr(rtc, r.REG_B, r.B_24H)
    assert rtc.guest_time() == datetime(1999, 12, 31, 23, 59, 58, 250_000)
    clock.advance(seconds=3)
    assert rd(rtc, r.REG_SECONDS) == 0x01
    assert rd(rtc, r.REG_YEAR) == 0x00
    assert rd(rtc, r.REG_CENTURY) == 0x20
    assert rd(rtc, r.REG_MONTH) == 0x01


def test_set_clears_uie(rtc):
    wr(rtc, r.REG_B, r.B_UIE | r.B_24H)
    wr(rtc, r.REG_B, r.B_SET | r.B_UIE | r.B_24H)
    assert rd(rtc, r.REG_B) & r.B_UIE == 0


def test_write_while_running_moves_the_clock(rtc, clock):
    wr(rtc, r.REG_MINUTES, 0x00)
    assert rd(rtc, r.REG_MINUTES) == 0x00
    clock.advance(minutes=2)
    assert rd(rtc, r.REG_MINUTES) == 0x02
    assert rd(rtc, r.REG_HOURS) == 0x13


def test_12h_write_decodes_pm(rtc):
    wr(rtc, r.REG_B, r.B_SET)  # 12h BCD
    wr(rtc, r.REG_HOURS, 0x80 | 0x11)  # 11 PM
    wr(rtc, r.REG_B, r.B_24H)
    assert rd(rtc, r.REG_HOURS) == 0x23


def test_uip_only_near_second_boundary(rtc, clock):
    assert rd(rtc, r.REG_A) == r.REG_A_POWER_ON
    clock.t = clock.t.replace(microsecond=999_900)
    assert rd(rtc, r.REG_A) == r.REG_A_POWER_ON | r.A_UIP
    clock.t = clock.t.replace(microsecond=0)
    assert rd(rtc, r.REG_A) & r.A_UIP == 0


def test_register_a_uip_not_writable(rtc):
    wr(rtc, r.REG_A, 0xA6)
    assert rd(rtc, r.REG_A) == 0x26


def test_register_c_read_clears_and_d_reports_valid_ram(rtc):
    rtc.cmos[r.REG_C] = 0x90
    assert rd(rtc, r.REG_C) == 0x90
    assert rd(rtc, r.REG_C) == 0
    assert rd(rtc, r.REG_D) == r.D_VRT
    wr(rtc, r.REG_D, 0)
    assert rd(rtc, r.REG_D) == r.D_VRT


def test_nmi_mask_bit_kept_and_reported(rtc):
    rtc.io_write(0, 0x80 | 0x0F)
    assert rtc.nmi_masked
    assert rtc.io_read(0) == 0x8F
    rtc.io_write(1, 0x5A)
    assert rtc.cmos[0x0F] == 0x5A  # index is the low 7 bits
    rtc.io_write(0, 0x0F)
    assert not rtc.nmi_masked


def test_cmos_ram_and_extended_bank(rtc):
    wr(rtc, 0x40, 0xAB)
    assert rd(rtc, 0x40) == 0xAB
    low_0x10 = rd(rtc, 0x10)
    rtc.io_write(2, 0x10)
    rtc.io_write(3, 0xCD)
    assert rtc.io_read(3) == 0xCD
    assert rtc.cmos[0x90] == 0xCD
    assert rtc.io_read(2) == 0x10
    assert rd(rtc, 0x10) == low_0x10  # the banks are separate


def memory_rtc(low, high):
    return Rtc(now=Clock(datetime(2024, 1, 1)), memory_low=low, memory_high=high)


def word(rtc, reg):
    return rd(rtc, reg) | rd(rtc, reg + 1) << 8


def test_memory_size_bytes_large():
    rtc = memory_rtc(3 * GIB, 2 * GIB)
    assert word(rtc, 0x15) == 640
    assert word(rtc, 0x17) == 0xFFFF
    assert word(rtc, 0x30) == 0xFFFF
    assert word(rtc, 0x34) == (3 * GIB - 16 * MIB) >> 16
    assert rd(rtc, 0x5B) | rd(rtc, 0x5C) << 8 | rd(rtc, 0x5D) << 16 == (2 * GIB) >> 16


def test_memory_size_bytes_small():
    rtc = memory_rtc(8 * MIB, 0)
    assert word(rtc, 0x17) == 7 * 1024
    assert word(rtc, 0x30) == 7 * 1024
    assert word(rtc, 0x34) == 0
    assert rd(rtc, 0x5B) == rd(rtc, 0x5C) == rd(rtc, 0x5D) == 0


def test_checksum_covers_0x10_to_0x2d():
    rtc = memory_rtc(512 * MIB, 0)
    total = sum(rd(rtc, i) for i in range(0x10, 0x2E))
    assert total > 0
    assert (rd(rtc, 0x2E) << 8 | rd(rtc, 0x2F)) == total


def test_reset_keeps_time_and_ram(rtc):
    wr(rtc, r.REG_B, r.B_24H | r.B_PIE | r.B_UIE)
    wr(rtc, 0x40, 0x12)
    wr(rtc, r.REG_MINUTES, 0x10)
    rtc.reset()
    assert rd(rtc, r.REG_B) == r.B_24H
    assert rd(rtc, 0x40) == 0x12
    assert rd(rtc, r.REG_MINUTES) == 0x10


def test_config_callback_on_data_writes_only():
    calls = []
    rtc = Rtc(now=Clock(datetime(2024, 1, 1)), on_config=lambda: calls.append(1))
    rtc.io_write(0, 0x0B)
    assert calls == []
    rtc.io_write(1, 0x06)
    rtc.io_write(3, 1)
    assert len(calls) == 2


def test_save_restore(rtc, clock):
    wr(rtc, r.REG_YEAR, 0x30)
    wr(rtc, 0x41, 0x99)
    rtc.io_write(0, 0x80)
    state = rtc.save()
    other = Rtc(now=clock)
    other.restore(state)
    assert other.save() == state
    assert rd(other, r.REG_YEAR) == 0x30
    assert rd(other, 0x41) == 0x99


def test_garbage_time_write_is_clamped(rtc):
    wr(rtc, r.REG_B, r.B_SET | r.B_24H)
    wr(rtc, r.REG_MONTH, 0x02)
    wr(rtc, r.REG_DAY_OF_MONTH, 0x31)
    wr(rtc, r.REG_MINUTES, 0xFF)
    wr(rtc, r.REG_B, r.B_24H)
    t = rtc.guest_time()
    assert (t.month, t.day, t.minute) == (2, 29, 59)
