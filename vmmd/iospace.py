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
    key: object = None  # who placed it (replace() swaps all entries of one key)


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

    @staticmethod
    def _conflict(entries: list[_Entry], rng: IoRange, name: str) -> IoConflict | None:
        for e in entries:
            if rng.base < e.end and e.base < rng.end:
                return IoConflict(
                    f"{name} claims {rng.space.name} {rng.base:#x}-{rng.end - 1:#x}, "
                    f"already owned by {e.name}")
        return None

    def _publish(self) -> None:
        # One assignment: a reader sees the old tables or the new ones, never a mix.
        self._tables = {s: _Table(entries) for s, entries in self._entries.items()}

    def add(self, rng: IoRange, owner, name: str, key=None) -> None:
        with self._lock:
            entries = self._entries[rng.space]
            err = self._conflict(entries, rng, name)
            if err:
                raise err
            entries.append(_Entry(rng.base, rng.end, owner, name, owner if key is None else key))
            self._publish()

    def remove_owner(self, owner) -> None:
        """Drop every range of `owner` (or placed under key `owner`)."""
        with self._lock:
            for entries in self._entries.values():
                entries[:] = [e for e in entries if e.owner is not owner and e.key is not owner]
            self._publish()

    def replace(self, key, items) -> list[tuple[IoRange, str, IoConflict]]:
        """Atomically replace every range placed under `key` with `items`
        ([(IoRange, owner, name), ...]). An item that overlaps someone else's
        range is left out; the left-out items are returned with the reason."""
        rejected = []
        with self._lock:
            new = {s: [e for e in entries if e.key is not key] for s, entries in self._entries.items()}
            for rng, owner, name in items:
                err = self._conflict(new[rng.space], rng, name)
                if err:
                    rejected.append((rng, name, err))
                    continue
                new[rng.space].append(_Entry(rng.base, rng.end, owner, name, key))
            self._entries = new
            self._publish()
        return rejected

    def ranges_of(self, key) -> list[tuple[IoRange, str]]:
        with self._lock:
            return [(IoRange(s, e.base, e.end - e.base), e.name)
                    for s, entries in self._entries.items() for e in entries if e.key is key]

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
