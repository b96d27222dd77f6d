"""vmmd's handle on one device: the stable owner of its I/O ranges.

A ManagedDevice outlives the device's processes: the IoSpaceMap points at it,
and it forwards accesses to the current incarnation's channel. While the
device is being replaced (crashed, unresponsive, restarting) an access waits
for the new incarnation, at most --device-timeout, so a crash costs the guest
latency rather than bytes; once the device is failed for good (crash-loop
limit) or stopped, reads return all-ones and writes are dropped at once, and
the VM keeps running.

It also keeps vmmd's view of the device for operators: per-kind counts of
the messages vmmd refused from it (vmmd/authority.py), and the last stats
the supervisor's heartbeat collected, so that operator calls never touch the
channel the vCPUs use.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field

from bus import endpoint as bus_endpoint
from bus.protocol import ProtocolError
from bus.types import IoSpace
from vmmd.access_journal import AccessJournal
from vmmd.authority import RESET_PORTS, ResetPortWatch
from vmmd.pci.fastpath import PciExpect, close_fds
from vmmd.ratelimit import TokenBucket

log = logging.getLogger(__name__)


@dataclass
class DeviceSpec:
    """What vmmd knows about a device before any process exists."""
    id: str
    kind: str
    options: dict
    slot: int | None = None
    function: int = 0
    allowed_gsis: frozenset[int] = frozenset()
    needs_memory: bool = False
    stdio: bool = False  # the device talks to vmmd's terminal (stdio console)
    pci: PciExpect | None = None  # a PCI function: what it must declare at HELLO
    reset_ports: bool = False  # owns the reset ports (lpc): may request a VM reset the guest asked for
    max_state: int = 256 << 10  # largest CHECKPOINT frame accepted (bytes)


@dataclass
class Incarnation:
    """One process of a device."""
    generation: int
    pid: int
    pidfd: int
    channel: object  # bus.endpoint.VmmChannel
    lifeline: int = -1  # write end of the pipe whose EOF tells the device vmmd is gone
    started: float = field(default_factory=time.monotonic)


# States in which the device is being replaced: accesses wait for it.
REPLACING = frozenset({"starting", "unresponsive", "crashed", "restarting"})
OPERATOR_CALLS = 2  # API calls in flight per device; more are refused, not queued


class ManagedDevice:
    # unresponsive: missed a reply, being killed; failed: crash-loop limit hit,
    # no more restarts until device.restart.
    STATES = ("starting", "running", "unresponsive", "crashed", "restarting", "failed", "stopped")

    def __init__(self, spec: DeviceSpec, timeout: float, sandbox: str):
        self.spec = spec
        self.timeout = timeout
        self.sandbox = sandbox
        self._state = "starting"
        self._changed = threading.Condition(threading.Lock())
        self.refused: dict[str, int] = {}
        # One bucket per refusal kind (a fixed set in vmmd's code): a flood of
        # one kind cannot hide the first line of another.
        self._refusal_logs: dict[str, TokenBucket] = {}
        self._count_lock = threading.Lock()
        self.reset_watch = ResetPortWatch() if spec.reset_ports else None
        self.stats_cache: dict | None = None   # the device's last CONTROL stats (heartbeat)
        self.stats_at: float | None = None
        self.heartbeats = 0
        self.crash_times: list[float] = []     # monotonic times of recent crashes (crash-loop limit)
        self._operator_calls = threading.BoundedSemaphore(OPERATOR_CALLS)
        self.restarts = 0
        self.generation = 0
        self.current: Incarnation | None = None
        self.last_checkpoint: dict | None = None
        self.journal = AccessJournal()   # accesses since last_checkpoint, replayed into a successor
        self.ranges = []
        self.last_exit: str | None = None
        self.failures = 0
        self._lock = threading.Lock()
        self.on_failure = None  # set by the supervisor: called with (device, reason)
        # Kept across incarnations (the supervisor creates them before the first spawn):
        self.fds: dict[str, int] = {}    # fast-path eventfds by bootstrap name
        self.dirty_log = None            # devices.virtio.dirty_log.DirtyLog, vmmd's mapping
        self.pci_info = None             # bus.pci_info.PciInfo declared at the first HELLO
        self.pci_function = None         # vmmd.pci.function.PciFunction once on the bus

    @property
    def state(self) -> str:
        return self._state

    @state.setter
    def state(self, value: str) -> None:
        with self._changed:
            self._state = value
            self._changed.notify_all()

    def set_current(self, inc: "Incarnation | None", state: str) -> None:
        """Install (or drop) the incarnation and the state together; wakes waiting vCPUs."""
        with self._changed:
            self.current = inc
            self._state = state
            self._changed.notify_all()

    @property
    def ready(self) -> bool:
        """A running incarnation answers accesses (else reads are all-ones)."""
        return self.current is not None and self._state == "running"

    def _usable(self, deadline: float, stale: "Incarnation | None" = None) -> "Incarnation | None":
        """The running incarnation (not `stale`), waiting while the device is
        being replaced, until `deadline`; None if failed, stopped or too late."""
        inc, state = self.current, self._state
        if inc is not None and state == "running" and inc is not stale:
            return inc  # the fast path: no lock
        with self._changed:
            while True:
                inc, state = self.current, self._state
                if inc is not None and state == "running" and inc is not stale:
                    return inc
                if state not in REPLACING and not (state == "running" and inc is stale):
                    return None
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._changed.wait(left)

    # -- refusals ----------------------------------------------------------------
    def refuse(self, kind: str, fmt: str, *args) -> None:
        """Count a refused device message and log it at a bounded rate."""
        with self._count_lock:
            self.refused[kind] = self.refused.get(kind, 0) + 1
            bucket = self._refusal_logs.get(kind)
            if bucket is None:
                bucket = self._refusal_logs[kind] = TokenBucket(rate=1.0, burst=5)
        dropped = bucket.take()
        if dropped is None:
            return
        more = f" ({dropped} similar lines suppressed)" if dropped else ""
        log.warning("device %s: refused: " + fmt + "%s", self.spec.id, *args, more)

    def log_lines_suppressed(self) -> int:
        return sum(b.suppressed_total for b in list(self._refusal_logs.values()))

    def count_refusal(self) -> int:
        return sum(self.refused.values())

    def operator_control(self, op: str, args: dict | None = None, timeout: float | None = None):
        """A CONTROL call for the API: at most OPERATOR_CALLS in flight per
        device, each bounded by the timeout, so a hung device cannot soak up
        the threads others need."""
        if not self._operator_calls.acquire(timeout=0.05):
            raise bus_endpoint.DeviceTimeout(f"device {self.spec.id} is busy with other API calls")
        try:
            return self.control(op, args, timeout)
        finally:
            self._operator_calls.release()

    def harvest_dirty(self):
        """Guest pages the device wrote since the last harvest (sorted page numbers).

        Flip the active buffer, let the device finish every write that could
        have seen the old one (CONTROL dirty_sync), then read and clear the old
        buffer. If the device does not answer, nothing is cleared: the bits
        stay in the old buffer and the next harvest after that collects them."""
        if self.dirty_log is None:
            return []
        old = self.dirty_log.flip()
        self.control("dirty_sync")
        return self.dirty_log.harvest(old)

    def close_fds(self) -> None:
        close_fds(self.fds)
        if self.dirty_log is not None:
            self.dirty_log.close()
            self.dirty_log = None

    # -- I/O from vCPU threads -------------------------------------------------
    def io_read(self, space: IoSpace, addr: int, size: int) -> int:
        ones = (1 << (8 * size)) - 1
        deadline = time.monotonic() + self.timeout
        stale = None
        while True:
            inc = self._usable(deadline, stale)
            if inc is None:
                return ones
            try:
                # The wait for a successor is bounded by the deadline; the
                # access itself gets a full timeout, or a slow-starting
                # successor would be declared hung.
                return inc.channel.read(space, addr, size, self.timeout, inc.pidfd)
            except bus_endpoint.DeviceTimeout:
                self._failed(inc, f"no answer to a {space.name} read at {addr:#x} within {self.timeout}s")
                return ones
            except bus_endpoint.DeviceGone:
                stale = inc  # it died before answering: ask its successor
            except ProtocolError as exc:
                self._failed(inc, f"bad reply: {exc}")
                return ones

    def io_write(self, space: IoSpace, addr: int, size: int, value: int) -> None:
        if self.reset_watch is not None and space is IoSpace.PIO and addr in RESET_PORTS:
            self.reset_watch.observe_write(addr, value)
        deadline = time.monotonic() + self.timeout
        stale = None
        while True:
            inc = self._usable(deadline, stale)
            if inc is None:
                return
            try:
                inc.channel.write(space, addr, size, value, self.timeout, inc.pidfd)
                return
            except bus_endpoint.DeviceTimeout:
                self._failed(inc, f"write queue full at {space.name} {addr:#x}")
                return
            except bus_endpoint.DeviceGone:
                stale = inc

    def control(self, op: str, args: dict | None = None, timeout: float | None = None):
        inc = self.current
        if inc is None or self.state != "running":
            raise bus_endpoint.DeviceGone(f"device {self.spec.id} is {self.state}")
        limit = self.spec.max_state if op == "save" else None
        return inc.channel.control(op, args or {}, timeout or self.timeout, inc.pidfd, max_reply=limit)

    def _failed(self, inc: Incarnation, reason: str) -> None:
        """The incarnation stopped answering: it is killed and replaced."""
        with self._lock:
            if self.current is not inc or self.state != "running":
                return
            self.state = "unresponsive"
        log.error("device %s is unresponsive: %s", self.spec.id, reason)
        if self.on_failure:
            self.on_failure(self, reason)

    # -- reporting ---------------------------------------------------------------
    def describe(self) -> dict:
        inc = self.current
        return {
            "id": self.spec.id,
            "type": self.spec.kind,
            "pid": inc.pid if inc else None,
            "state": self.state,
            "restarts": self.restarts,
            "sandbox": self.sandbox,
            "slot": self.spec.slot,
            "generation": self.generation,
            "last_exit": self.last_exit,
            "ranges": [{"space": r.space.name, "base": r.base, "length": r.length} for r in self.ranges],
            "fast_path": any(k.startswith(("irqfd.", "ioeventfd.", "intx")) for k in self.fds),
            "refused": dict(self.refused),
            "refused_total": self.count_refusal(),
            "log_lines_suppressed": self.log_lines_suppressed(),
            "heartbeats": self.heartbeats,
        }

    def operator_stats(self) -> dict:
        """device.stats: the device's counters as of the last heartbeat plus
        vmmd's own; never a bus round trip (the vCPUs' channel stays free)."""
        out = dict(self.stats_cache or {})
        age = None if self.stats_at is None else round(time.monotonic() - self.stats_at, 3)
        out["vmmd"] = {"state": self.state, "restarts": self.restarts, "generation": self.generation,
                       "refused": dict(self.refused), "refused_total": self.count_refusal(),
                       "log_lines_suppressed": self.log_lines_suppressed(),
                       "heartbeats": self.heartbeats, "stats_age_s": age}
        return out


def close_incarnation(inc: Incarnation) -> None:
    try:
        inc.channel.close()
    finally:
        for fd in (inc.pidfd, inc.lifeline):
            try:
                if fd >= 0:
                    os.close(fd)
            except OSError:
                pass
