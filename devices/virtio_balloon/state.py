"""The virtio-balloon device's own saved state: version, schema, validation.

device_save() (the transport and queue indices are the virtio base's):

    {"version": STATE_VERSION,
     "num_pages": u32,          target set by vmmd (config num_pages)
     "actual": u32,             what the driver last wrote to config actual
     "poison_val": u32,         config poison_val (PAGE_POISON)
     "stats_interval": number,  seconds between stats requests (0: none)
     "stats_head": int | null,  the stats buffer the device holds (popped, not used yet)
     "pages": int,              4 KiB pages of guest RAM the bitmap covers
     "host_page_size": int,
     "ballooned": bytes,        zlib(np.packbits(ballooned set by memfd page))
     "counters": {name: int}}

The ballooned set is in the state because vmmd must know which pages are
ballooned (live migration skips them), and a restarted device must go on
accounting for them. Host pages that are wholly ballooned were punched when
they became so; on restore they count as punched again without a new punch.

check_state() validates everything first (ValueError, nothing applied);
older versions are upgraded through MIGRATIONS (devices/state_version.py).
"""

from __future__ import annotations

from typing import Any, Callable

from devices.state_version import upgrade

STATE_VERSION = 1

MIGRATIONS: dict[int, Callable[[dict], dict]] = {}

KEYS = {"version", "num_pages", "actual", "poison_val", "stats_interval", "stats_head", "pages",
        "host_page_size", "ballooned", "counters"}
U32 = (1 << 32) - 1
MAX_INTERVAL = 86400.0


def _int(d: dict, key: str, lo: int, hi: int) -> int:
    v = d[key]
    if type(v) is not int or not lo <= v <= hi:
        raise ValueError(f"virtio_balloon state {key}: expected int in [{lo}, {hi}], got {v!r}")
    return v


def check_interval(v: Any) -> float:
    if type(v) not in (int, float) or not 0 <= v <= MAX_INTERVAL or v != v:
        raise ValueError(f"stats interval must be 0..{MAX_INTERVAL:g} seconds, not {v!r}")
    return float(v)


def check_state(state: Any) -> dict:
    """Validate (and migrate) a saved state; return a clean copy or raise ValueError."""
    state = upgrade(state, "virtio_balloon", STATE_VERSION, MIGRATIONS)
    missing, extra = KEYS - state.keys(), state.keys() - KEYS
    if missing or extra:
        raise ValueError(f"virtio_balloon state: missing {sorted(missing)}, "
                         f"unexpected {sorted(map(str, extra))}")
    out = {"version": STATE_VERSION}
    for key in ("num_pages", "actual", "poison_val"):
        out[key] = _int(state, key, 0, U32)
    out["pages"] = _int(state, "pages", 1, 1 << 40)
    hps = _int(state, "host_page_size", 4096, 1 << 30)
    if hps & (hps - 1):
        raise ValueError(f"virtio_balloon state host_page_size {hps} is not a power of 2")
    out["host_page_size"] = hps
    try:
        out["stats_interval"] = check_interval(state["stats_interval"])
    except ValueError as exc:
        raise ValueError(f"virtio_balloon state: {exc}") from None
    head = state["stats_head"]
    if head is not None and (type(head) is not int or not 0 <= head < 32768):
        raise ValueError(f"virtio_balloon state stats_head: {head!r}")
    out["stats_head"] = head
    if type(state["ballooned"]) is not bytes:
        raise ValueError("virtio_balloon state ballooned: expected bytes")
    out["ballooned"] = state["ballooned"]
    counters = state["counters"]
    if type(counters) is not dict or any(type(k) is not str or type(v) is not int or v < 0
                                         for k, v in counters.items()):
        raise ValueError("virtio_balloon state counters: expected {name: non-negative int}")
    out["counters"] = dict(counters)
    return out


def check_compatible(saved: dict, pages: int, host_page_size: int) -> None:
    if saved["pages"] != pages:
        raise ValueError(f"virtio_balloon state covers {saved['pages']} pages, guest RAM has {pages}")
    if saved["host_page_size"] != host_page_size:
        raise ValueError(f"virtio_balloon state host page size {saved['host_page_size']} "
                         f"!= {host_page_size}")
