"""The virtio-net device's own saved state (device_save()):

    {"version": 1, "backend": "tap"|"socket", "mac": bytes(6) (the current
     address; the driver may have changed it), "link_up": bool,
     "rx_filter": RxFilter.save(), "guest_offloads": int (GUEST_* bits in
     force, CTRL_GUEST_OFFLOADS), "counters": {name: int}}

Frames are handled synchronously (a tx chain is written to the backend
before the next bus message; an rx frame is either in the used ring or
still in the backend), so nothing is in flight at quiesce/save. A frame
read from the backend but not yet delivered (no rx buffers) is dropped at
save time and counted: the wire may lose frames.

check_state() validates all before anything is applied (ValueError).
"""

from __future__ import annotations

from typing import Any, Callable

from devices.state_version import upgrade
from devices.virtio_net.frames import RxFilter

STATE_VERSION = 1

MIGRATIONS: dict[int, Callable[[dict], dict]] = {}

KEYS = {"version", "backend", "mac", "link_up", "rx_filter", "guest_offloads", "counters"}


def make_state(backend: str, mac: bytes, link_up: bool, rx_filter: RxFilter, guest_offloads: int,
               counters: dict) -> dict:
    return {"version": STATE_VERSION, "backend": backend, "mac": bytes(mac), "link_up": link_up,
            "rx_filter": rx_filter.save(), "guest_offloads": guest_offloads,
            "counters": dict(counters)}


def check_state(state: Any) -> dict:
    """A clean, validated copy (rx_filter as an RxFilter) or ValueError."""
    state = upgrade(state, "virtio_net", STATE_VERSION, MIGRATIONS)
    missing, extra = KEYS - state.keys(), state.keys() - KEYS
    if missing or extra:
        raise ValueError(f"virtio_net state: missing {sorted(missing)}, "
                         f"unexpected {sorted(map(str, extra))}")
    if state["backend"] not in ("tap", "socket"):
        raise ValueError(f"virtio_net state backend: {state['backend']!r}")
    mac = state["mac"]
    if not isinstance(mac, (bytes, bytearray)) or len(mac) != 6 or mac[0] & 1:
        raise ValueError("virtio_net state mac: six bytes, unicast")
    if type(state["link_up"]) is not bool:
        raise ValueError("virtio_net state link_up: bool")
    offl = state["guest_offloads"]
    if type(offl) is not int or not 0 <= offl < 1 << 64:
        raise ValueError("virtio_net state guest_offloads: u64")
    counters = state["counters"]
    if not isinstance(counters, dict) or any(
            type(k) is not str or type(v) is not int or v < 0 for k, v in counters.items()):
        raise ValueError("virtio_net state counters: {str: non-negative int}")
    return {"version": STATE_VERSION, "backend": state["backend"], "mac": bytes(mac),
            "link_up": state["link_up"], "rx_filter": RxFilter.load(state["rx_filter"]),
            "guest_offloads": offl, "counters": dict(counters)}
