"""Versioned device state: the prologue every devices/<kind>/state.py shares.

A saved state is a map with an integer "version". Older versions are
upgraded one step at a time through the device's MIGRATIONS table; anything
else (not a map, no version, a version from the future) is refused whole.
"""

from __future__ import annotations

from typing import Any, Callable

Migrations = dict[int, Callable[[dict], dict]]


def upgrade(state: Any, kind: str, current: int, migrations: Migrations) -> dict:
    """Return `state` migrated to version `current`, or raise ValueError."""
    if not isinstance(state, dict):
        raise ValueError(f"{kind} state: expected a map, got {type(state).__name__}")
    version = state.get("version")
    if type(version) is not int:
        raise ValueError(f"{kind} state: missing or non-integer version {version!r}")
    while version < current and version in migrations:
        state = migrations[version](state)
        version += 1
    if version != current:
        raise ValueError(f"{kind} state: version {version} not supported (want {current})")
    return state
