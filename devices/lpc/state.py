"""The LPC device's saved-state format: version, schema, validation.

A state is a msgpack-able dict:
    {"version": STATE_VERSION, "com1": UART, "com2": UART, "rtc": RTC,
     "legacy": LEGACY}
with the component dicts produced by Uart16550.save(), Rtc.save() and
LegacyPorts.save(). check_state() checks everything before anything is
applied, so a bad state is rejected whole (ValueError) and never leaves a
half-restored device. Older versions are upgraded through MIGRATIONS.
"""

from __future__ import annotations

from typing import Any, Callable

from devices.lpc import rtc as rtcdef
from devices.lpc import uart as uartdef
from devices.state_version import upgrade

STATE_VERSION = 1

# version -> function turning a state of that version into version + 1.
MIGRATIONS: dict[int, Callable[[dict], dict]] = {}

# RTC offset bound: any guest-settable year (1..9999) from any host year.
MAX_RTC_OFFSET_US = 10000 * 366 * 86400 * 1_000_000


def _int(d: dict, key: str, lo: int, hi: int, where: str) -> int:
    v = d[key]
    if type(v) is not int or not lo <= v <= hi:
        raise ValueError(f"{where}.{key}: expected int in [{lo:#x}, {hi:#x}], got {v!r}")
    return v


def _masked(d: dict, key: str, mask: int, where: str) -> int:
    v = _int(d, key, 0, 0xFF, where)
    if v & ~mask:
        raise ValueError(f"{where}.{key}: bits {v & ~mask:#x} outside mask {mask:#x}")
    return v


def _bool(d: dict, key: str, where: str) -> bool:
    v = d[key]
    if type(v) is not bool:
        raise ValueError(f"{where}.{key}: expected bool, got {v!r}")
    return v


def _bytes(d: dict, key: str, max_len: int, where: str, exact: bool = False) -> bytes:
    v = d[key]
    if not isinstance(v, (bytes, bytearray)):
        raise ValueError(f"{where}.{key}: expected bytes, got {type(v).__name__}")
    if len(v) > max_len or (exact and len(v) != max_len):
        need = f"exactly {max_len}" if exact else f"at most {max_len}"
        raise ValueError(f"{where}.{key}: {need} bytes, got {len(v)}")
    return bytes(v)


def _optional_byte(d: dict, key: str, allowed: set[int] | None, where: str) -> int | None:
    v = d[key]
    if v is None:
        return None
    if type(v) is not int or not 0 <= v <= 0xFF or (allowed is not None and v not in allowed):
        raise ValueError(f"{where}.{key}: unexpected value {v!r}")
    return v


def _fields(obj: Any, keys: set[str], where: str) -> dict:
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a map, got {type(obj).__name__}")
    missing = keys - obj.keys()
    extra = obj.keys() - keys
    if missing or extra:
        raise ValueError(f"{where}: missing {sorted(missing)}, unexpected {sorted(map(str, extra))}")
    return obj


UART_KEYS = {"ier", "lcr", "mcr", "scr", "dll", "dlm", "fifo_enabled", "fcr_bits",
             "lsr_errors", "msr", "thre_pending", "rx_fifo", "tx_fifo"}


def check_uart(obj: Any, where: str) -> dict:
    d = _fields(obj, UART_KEYS, where)
    out = {
        "ier": _masked(d, "ier", uartdef.IER_MASK, where),
        "lcr": _int(d, "lcr", 0, 0xFF, where),
        "mcr": _masked(d, "mcr", uartdef.MCR_MASK, where),
        "scr": _int(d, "scr", 0, 0xFF, where),
        "dll": _int(d, "dll", 0, 0xFF, where),
        "dlm": _int(d, "dlm", 0, 0xFF, where),
        "fifo_enabled": _bool(d, "fifo_enabled", where),
        "fcr_bits": _masked(d, "fcr_bits", uartdef.FCR_TRIGGER_MASK | uartdef.FCR_DMA, where),
        "lsr_errors": _masked(d, "lsr_errors", uartdef.LSR_ERRORS, where),
        "msr": _int(d, "msr", 0, 0xFF, where),
        "thre_pending": _bool(d, "thre_pending", where),
    }
    capacity = uartdef.FIFO_SIZE if out["fifo_enabled"] else 1
    out["rx_fifo"] = _bytes(d, "rx_fifo", capacity, where)
    out["tx_fifo"] = _bytes(d, "tx_fifo", capacity, where)
    return out


RTC_KEYS = {"cmos", "index", "ext_index", "nmi_masked", "offset_us", "frozen"}


def check_rtc(obj: Any, where: str = "rtc") -> dict:
    d = _fields(obj, RTC_KEYS, where)
    out = {
        "cmos": _bytes(d, "cmos", rtcdef.CMOS_SIZE, where, exact=True),
        "index": _int(d, "index", 0, 0x7F, where),
        "ext_index": _int(d, "ext_index", 0, 0x7F, where),
        "nmi_masked": _bool(d, "nmi_masked", where),
        "offset_us": _int(d, "offset_us", -MAX_RTC_OFFSET_US, MAX_RTC_OFFSET_US, where),
    }
    frozen = d["frozen"]
    if frozen is not None:
        if (not isinstance(frozen, (list, tuple)) or len(frozen) != 6
                or any(type(v) is not int or not 0 <= v <= 9999 for v in frozen)):
            raise ValueError(f"{where}.frozen: expected null or 6 ints in [0, 9999], got {frozen!r}")
        frozen = list(frozen)
    set_bit = bool(out["cmos"][rtcdef.REG_B] & rtcdef.B_SET)
    if set_bit != (frozen is not None):
        raise ValueError(f"{where}: register B SET bit and frozen time disagree")
    out["frozen"] = frozen
    return out


LEGACY_KEYS = {"port_a", "port_b", "post", "dma_page0", "i8042_ctr", "i8042_output",
               "i8042_pending"}


def check_legacy(obj: Any, where: str = "legacy") -> dict:
    d = _fields(obj, LEGACY_KEYS, where)
    return {
        "port_a": _int(d, "port_a", 0, 0xFF, where),
        "port_b": _int(d, "port_b", 0, 0x0F, where),
        "post": _int(d, "post", 0, 0xFF, where),
        "dma_page0": _int(d, "dma_page0", 0, 0xFF, where),
        "i8042_ctr": _int(d, "i8042_ctr", 0, 0xFF, where),
        "i8042_output": _optional_byte(d, "i8042_output", None, where),
        "i8042_pending": _optional_byte(d, "i8042_pending", {0x60, 0xD1}, where),
    }


def check_state(state: Any) -> dict:
    """Validate (and migrate) a saved state; return a clean copy or raise ValueError."""
    state = upgrade(state, "lpc", STATE_VERSION, MIGRATIONS)
    d = _fields(state, {"version", "com1", "com2", "rtc", "legacy"}, "lpc state")
    return {
        "version": STATE_VERSION,
        "com1": check_uart(d["com1"], "com1"),
        "com2": check_uart(d["com2"], "com2"),
        "rtc": check_rtc(d["rtc"]),
        "legacy": check_legacy(d["legacy"]),
    }
