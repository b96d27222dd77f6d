"""The guest's register accesses a device has not yet covered by a checkpoint.

A device checkpoints its registers after it applies a write, but writes are
posted: a device killed between applying a write (or receiving it) and
sending the checkpoint comes back, restored from that checkpoint, without
the write. For a UART that is an interrupt-enable write the guest believes
took effect, and its transmitter stops for good. So vmmd journals every
access it sends to the current incarnation; the device's CHECKPOINT says how
many accesses it had applied when it saved its state, which drops the
journal's covered prefix; and a successor is restored from the checkpoint
and then replays what remains, in order, before the guest touches it again
(the replayed reads' values are discarded: only their side effects count,
such as a FIFO pop).

A read is journaled once answered: one that never got its reply is retried
on the successor by the vCPU itself and must not run twice. Bounded: past
LIMIT unacknowledged accesses (a device that does not checkpoint) the
journal keeps counting but no longer replays until a checkpoint covers the
accesses it dropped; a successor then starts from the checkpoint alone.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import NamedTuple

from bus.types import IoSpace

LIMIT = 4096


class Access(NamedTuple):
    is_read: bool
    space: IoSpace
    addr: int
    size: int
    value: int   # a read: 0


class AccessJournal:
    """One device's journal, kept across its incarnations (thread-safe:
    vCPU threads record, vmmd's loop acknowledges)."""

    def __init__(self, limit: int = LIMIT):
        self.limit = limit
        self._lock = threading.Lock()
        self.generation = 0     # the incarnation whose accesses are counted
        self.sent = 0           # accesses sent to it (its CHECKPOINTs count the same way)
        self._acked = 0         # the most accesses a checkpoint of it covered
        self._entries: deque[tuple[int, Access]] = deque()
        self._lost_upto = 0     # accesses up to this index were dropped (over the limit)
        self._carried: list[Access] | None = []   # put back by a successor that failed

    # -- the channel's side (under its lock, in send order) ---------------------
    def count(self, generation: int) -> int | None:
        """One access sent by `generation`'s channel: its index (None: not
        the journal's incarnation, e.g. a vCPU still holding a dead one)."""
        with self._lock:
            if generation != self.generation:
                return None
            self.sent += 1
            return self.sent

    def uncount(self, index: int | None) -> None:
        """The access counted as `index` was never sent (the channel's lock is
        still held: it is the last one counted)."""
        with self._lock:
            if index is not None and index == self.sent:
                self.sent -= 1

    def record(self, index: int | None, is_read: bool, space: IoSpace, addr: int, size: int,
               value: int) -> None:
        """The access counted as `index` (by count()), once sent (a read: once
        answered): a checkpoint may already cover it, then it is not kept."""
        if index is None:
            return
        access = Access(is_read, space, addr, size, value)
        with self._lock:
            if index <= self._lost_upto or index <= self._acked:
                return
            self._entries.append((index, access))
            if len(self._entries) > self.limit:
                self._lost_upto = self._entries.popleft()[0]

    # -- vmmd's loop -------------------------------------------------------------
    def acknowledge(self, generation: int, applied: int) -> str:
        """A checkpoint from `generation` covering its first `applied` accesses.
        Returns why it is refused ("" if taken): a device cannot have applied
        more than it was sent."""
        with self._lock:
            if generation != self.generation:
                return ""   # a stale incarnation's event: nothing of it is journaled
            if applied > self.sent:
                return f"it claims {applied} accesses applied, vmmd sent {self.sent}"
            self._acked = max(self._acked, applied)
            entries = self._entries
            while entries and entries[0][0] <= applied:
                entries.popleft()
            if applied >= self._lost_upto:
                self._lost_upto = 0
            return ""

    def acknowledge_all(self, generation: int) -> None:
        """A state saved (CONTROL save) while nothing was being sent covers everything."""
        with self._lock:
            if generation == self.generation:
                self._acked = self.sent
                self._entries.clear()
                self._lost_upto = 0

    def begin(self, generation: int) -> list[Access] | None:
        """A new incarnation is about to be restored from the last checkpoint:
        return the accesses it must replay (None: some were dropped, replay
        is impossible) and start counting its own."""
        with self._lock:
            if self.generation < 0:
                pending = self._carried
            elif self._lost_upto:
                pending = None
            else:
                pending = [a for _, a in self._entries]
            self.generation = generation
            self.sent = self._acked = 0
            self._entries.clear()
            self._lost_upto = 0
            self._carried = []
            return pending

    def put_back(self, pending: list[Access] | None) -> None:
        """The successor failed before it was running: the next one replays
        the same accesses (its own, sent during a replay, are forgotten)."""
        with self._lock:
            self.generation = -1
            self.sent = self._acked = 0
            self._entries.clear()
            self._lost_upto = 0
            self._carried = pending

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)
