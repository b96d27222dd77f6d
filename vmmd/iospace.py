"""Routing of guest PIO/MMIO accesses to their owners.

An owner is anything with `io_read(space, addr, size) -> int` and
`io_write(space, addr, size, value)`: a handler inside vmmd or the DeviceLink
of a device process. Lookups happen on every exit, so ranges are kept sorted
and searched with bisect; changes (a BAR moved, a device restarted) replace
the whole table at once so a vCPU never sees a half-updated map.
"""

from __future__ import annotations

import bisect
import logging
import threading
from dataclasses import dataclass

from bus.types import IoRange, IoSpace

log = logging.getLogger(__name__)


class IoConflict(ValueError):
    """Two owners claimed overlapping ranges."""


@dataclass(frozen=True)
class _Entry:
    base: int
    end: int
    owner: object
    name: str


class _Table:
    def __init__(self, entries: list[_Entry]):
        self.entries = sorted(entries, key=lambda e: e.base)
        self.bases = [e.base for e in self.entries]

    def find(self, addr: int, size: int) -> _Entry | None:
        i = bisect.bisect_right(self.bases, addr) - 1
        if i >= 0:
            e = self.entries[i]
            if addr + size <= e.end:
                return e
        return None


class IoSpaceMap:
    """The owners of PIO and MMIO address ranges."""

    def __init__(self):
        self._lock = threading.Lock()  # serialises writers; readers use the snapshot
        self._entries: dict[IoSpace, list[_Entry]] = {IoSpace.PIO: [], IoSpace.MMIO: []}
        self._tables = {s: _Table([]) for s in self._entries}
        self.unhandled = {IoSpace.PIO: 0, IoSpace.MMIO: 0}

    def add(self, rng: IoRange, owner, name: str) -> None:
        with self._lock:
            entries = self._entries[rng.space]
            for e in entries:
                if rng.base < e.end and e.base < rng.end:
                    raise IoConflict(
                        f"{name} claims {rng.space.name} {rng.base:#x}-{rng.end - 1:#x}, "
                        f"already owned by {e.name}")
            entries.append(_Entry(rng.base, rng.end, owner, name))
            self._tables[rng.space] = _Table(entries)

    def remove_owner(self, owner) -> None:
        with self._lock:
            for space, entries in self._entries.items():
                entries[:] = [e for e in entries if e.owner is not owner]
                self._tables[space] = _Table(entries)

    def owner_of(self, space: IoSpace, addr: int, size: int = 1):
        e = self._tables[space].find(addr, size)
        return e.owner if e else None

    def read(self, space: IoSpace, addr: int, size: int) -> int:
        e = self._tables[space].find(addr, size)
        if e is None:
            # Unclaimed addresses float high, as on a real bus.
            self.unhandled[space] += 1
            return (1 << (8 * size)) - 1
        return e.owner.io_read(space, addr, size)

    def write(self, space: IoSpace, addr: int, size: int, value: int) -> None:
        e = self._tables[space].find(addr, size)
        if e is None:
            self.unhandled[space] += 1
            return
        e.owner.io_write(space, addr, size, value)

    def describe(self) -> list[dict]:
        return [{"space": s.name, "base": e.base, "end": e.end, "owner": e.name}
                for s, entries in self._entries.items() for e in entries]
