"""The virtio-blk device's own saved state: version, schema, validation.

The transport state (status, features, queue addresses and indices) is the
virtio base class's; this is the device-specific part, device_save():

    {"version": STATE_VERSION, "capacity": int (sectors), "read_only": bool,
     "num_queues": int, "queue_size": int}

There are no in-flight requests to record: every request is completed
synchronously before the device serves its next bus message (backend.py),
so at quiesce/save the used rings are already up to date. The fields are
the disk's identity as the guest saw it: restoring onto a device with a
different shape (queues, read-only) is refused; a capacity that changed
(the image was resized between save and restore) is accepted and reported
so the device can raise a configuration-change interrupt.

check_state() validates everything first, so a bad state is rejected whole
(ValueError) and never half applied. Older versions are upgraded through
MIGRATIONS, as in devices/lpc/state.py.
"""

from __future__ import annotations

from typing import Any, Callable
from devices.state_version import upgrade

STATE_VERSION = 1

MIGRATIONS: dict[int, Callable[[dict], dict]] = {}

KEYS = {"version", "capacity", "read_only", "num_queues", "queue_size"}


def make_state(capacity: int, read_only: bool, num_queues: int, queue_size: int) -> dict:
    return {"version": STATE_VERSION, "capacity": capacity, "read_only": read_only,
            "num_queues": num_queues, "queue_size": queue_size}


def _int(d: dict, key: str, lo: int, hi: int) -> int:
    v = d[key]
    if type(v) is not int or not lo <= v <= hi:
        raise ValueError(f"virtio_blk state {key}: expected int in [{lo}, {hi}], got {v!r}")
    return v


def check_state(state: Any) -> dict:
    """Validate (and migrate) a saved state; return a clean copy or raise ValueError."""
    state = upgrade(state, "virtio_blk", STATE_VERSION, MIGRATIONS)
    missing, extra = KEYS - state.keys(), state.keys() - KEYS
    if missing or extra:
        raise ValueError(f"virtio_blk state: missing {sorted(missing)}, "
                         f"unexpected {sorted(map(str, extra))}")
    if type(state["read_only"]) is not bool:
        raise ValueError(f"virtio_blk state read_only: expected bool, got {state['read_only']!r}")
    qs = _int(state, "queue_size", 1, 32768)
    if qs & (qs - 1):
        raise ValueError(f"virtio_blk state queue_size: {qs} is not a power of 2")
    return make_state(_int(state, "capacity", 0, (1 << 64) - 1), state["read_only"],
                      _int(state, "num_queues", 1, 1024), qs)


def check_compatible(saved: dict, current: dict) -> bool:
    """ValueError if `saved` (checked) cannot be restored onto a device whose
    own state is `current`; True if the capacity changed."""
    for key in ("read_only", "num_queues", "queue_size"):
        if saved[key] != current[key]:
            raise ValueError(f"virtio_blk state: saved {key}={saved[key]!r} but this disk has "
                             f"{current[key]!r}")
    return saved["capacity"] != current["capacity"]
