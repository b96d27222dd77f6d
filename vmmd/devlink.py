"""vmmd's handle on one device: the stable owner of its I/O ranges.

A ManagedDevice outlives the device's processes: the IoSpaceMap points at it,
and it forwards accesses to the current incarnation's channel. While the
device is down, failed or restarting, reads return all-ones and writes are
dropped, so a vCPU never waits on a dead process and the VM keeps running.
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
from vmmd.pci.fastpath import PciExpect, close_fds

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


@dataclass
class Incarnation:
    """One process of a device."""
    generation: int
    pid: int
    pidfd: int
    channel: object  # bus.endpoint.VmmChannel
    lifeline: int = -1  # write end of the pipe whose EOF tells the device vmmd is gone
    started: float = field(default_factory=time.monotonic)


class ManagedDevice:
    STATES = ("starting", "running", "failed", "crashed", "restarting", "stopped")

    def __init__(self, spec: DeviceSpec, timeout: float, sandbox: str):
        self.spec = spec
        self.timeout = timeout
        self.sandbox = sandbox
        self.state = "starting"
        self.restarts = 0
        self.generation = 0
        self.current: Incarnation | None = None
        self.last_checkpoint: dict | None = None
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
    def ready(self) -> bool:
        """A running incarnation answers accesses (else reads are all-ones)."""
        return self.current is not None and self.state == "running"

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
        inc = self.current
        if inc is None or self.state != "running":
            return ones
        try:
            return inc.channel.read(space, addr, size, self.timeout, inc.pidfd)
        except bus_endpoint.DeviceTimeout:
            self._failed(inc, f"no answer to a {space.name} read at {addr:#x} within {self.timeout}s")
        except bus_endpoint.DeviceGone:
            pass  # the supervisor reports the exit
        except ProtocolError as exc:
            self._failed(inc, f"bad reply: {exc}")
        return ones

    def io_write(self, space: IoSpace, addr: int, size: int, value: int) -> None:
        inc = self.current
        if inc is None or self.state != "running":
            return
        try:
            inc.channel.write(space, addr, size, value)
        except bus_endpoint.DeviceTimeout:
            self._failed(inc, f"write queue full at {space.name} {addr:#x}")
        except bus_endpoint.DeviceGone:
            pass

    def control(self, op: str, args: dict | None = None, timeout: float | None = None):
        inc = self.current
        if inc is None or self.state != "running":
            raise bus_endpoint.DeviceGone(f"device {self.spec.id} is {self.state}")
        return inc.channel.control(op, args or {}, timeout or self.timeout, inc.pidfd)

    def _failed(self, inc: Incarnation, reason: str) -> None:
        with self._lock:
            if self.current is not inc or self.state != "running":
                return
            self.state = "failed"
            self.failures += 1
        log.error("device %s failed: %s", self.spec.id, reason)
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
            "fast_path": bool(self.fds),
        }


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
