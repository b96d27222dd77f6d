"""A userspace stand-in for vmmd.kvm.api.Vm: what KVM does for vmmd's PCI layer.

vmmd's PCI code only calls irqfd, ioeventfd, set_gsi_routing, irq_line and
signal_msi on its `vm`. FakeVm implements them the way KVM behaves, so the
harness (tests.harness.driver) runs vmmd's real PciBus/Supervisor/devices:

  * guest_mmio_write / guest_pio_write: a write matching a registered
    ioeventfd (address, length 0 = any or equal, datamatch) signals the
    eventfd and goes no further (as KVM: no exit); anything else is
    forwarded through the IoSpaceMap (as a vCPU exit would be).
  * irqfds: each assigned irqfd is polled (epoll). When it fires, its count
    is consumed and the interrupt delivered per the *current* GSI routing:
    an MSI route records "MSI (address, data) delivered"; an irqchip route
    records the GSI. A deassigned irqfd is not polled, so its eventfd keeps
    counting (masking); assigning it again with a non-zero count delivers
    at once (as KVM's irqfd assign does: that is the MSI-X pending bit).
  * signal_msi (bus-only interrupts from vmmd) records a delivery and wakes
    pollers.

Delivery happens in whichever thread calls poll()/wait_msi() (the "vCPU"),
and in irqfd() when a pending irqfd is assigned.
"""

from __future__ import annotations

import errno
import os
import select
import threading
import time
from collections import Counter
from dataclasses import dataclass

from bus.types import IoSpace


@dataclass(frozen=True)
class IoEventFd:
    fd: int
    addr: int
    length: int
    pio: bool
    datamatch: int | None


class FakeVm:
    def __init__(self, iospace):
        self.iospace = iospace
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self.routes: dict[int, list] = {}                 # gsi -> [route, ...]
        self.irqfds: dict[int, tuple[int, int | None]] = {}  # fd -> (gsi, resample_fd)
        self.ioeventfds: dict[tuple[bool, int], list[IoEventFd]] = {}  # (pio, addr) -> regs
        self.msis: Counter = Counter()                    # (address, data) -> deliveries
        self.msi_log: list[tuple[int, int]] = []          # in delivery order (bounded)
        self.irqchip: Counter = Counter()                 # gsi -> irqfd deliveries via irqchip routes
        self.asserted: set[int] = set()                   # level-triggered GSIs (irqfd with resample) held high
        self.irq_lines: list[tuple[int, int]] = []        # irq_line() calls
        self.history: list[tuple] = []                    # registrations, for assertions
        self.kicks = 0                                    # writes absorbed by an ioeventfd
        self.forwarded_mmio_writes = 0
        self.routing_installs = 0
        self.closed = False
        self._epoll = select.epoll()
        self._wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._epoll.register(self._wake, select.EPOLLIN)

    # -- vmmd.kvm.api.Vm methods ---------------------------------------------------
    def set_gsi_routing(self, entries) -> None:
        table: dict[int, list] = {}
        for e in entries:
            table.setdefault(e.gsi, []).append(e)
        with self._lock:
            self.routes = table
            self.routing_installs += 1

    def irqfd(self, fd: int, gsi: int, resample_fd: int | None = None, deassign: bool = False) -> None:
        with self._lock:
            if deassign:
                cur = self.irqfds.get(fd)
                if cur is None or cur[0] != gsi:
                    return  # KVM ignores a deassign of something not assigned
                del self.irqfds[fd]
                self._epoll.unregister(fd)
                self.history.append(("irqfd-deassign", fd, gsi))
                return
            if fd in self.irqfds:
                raise OSError(errno.EBUSY, f"irqfd {fd} is already assigned")
            self.irqfds[fd] = (gsi, resample_fd)
            self._epoll.register(fd, select.EPOLLIN)
            self.history.append(("irqfd-assign", fd, gsi))
            self._fire(fd)  # KVM: a count already there is injected at assign time

    def ioeventfd(self, fd: int, addr: int, length: int, pio: bool = False,
                  datamatch: int | None = None, deassign: bool = False) -> None:
        if length not in (0, 1, 2, 4, 8):
            raise ValueError(f"ioeventfd length must be 0, 1, 2, 4 or 8, got {length!r}")
        reg = IoEventFd(fd, addr, length, pio, datamatch)
        with self._lock:
            regs = self.ioeventfds.setdefault((pio, addr), [])
            if deassign:
                if reg not in regs:
                    raise OSError(errno.ENOENT, f"no ioeventfd {fd} at {addr:#x}")
                regs.remove(reg)
                if not regs:
                    del self.ioeventfds[(pio, addr)]
                self.history.append(("ioeventfd-deassign", fd, addr))
                return
            for r in regs:
                if r.length == length and r.datamatch == datamatch:
                    raise OSError(errno.EEXIST, f"ioeventfd at {addr:#x} exists")
            regs.append(reg)
            self.history.append(("ioeventfd-assign", fd, addr))

    def irq_line(self, gsi: int, level) -> None:
        with self._cond:
            self.irq_lines.append((gsi, 1 if level else 0))
            self._cond.notify_all()

    def signal_msi(self, address: int, data: int, devid: int | None = None) -> int:
        with self._cond:
            self._deliver_msi(address, data)
        os.eventfd_write(self._wake, 1)
        return 1

    # -- the guest's accesses --------------------------------------------------------
    def _ioevent(self, pio: bool, addr: int, size: int, value: int) -> bool:
        regs = self.ioeventfds.get((pio, addr))
        if not regs:
            return False
        for r in list(regs):
            if (r.length == 0 or r.length == size) and (r.datamatch is None or r.datamatch == value):
                os.eventfd_write(r.fd, 1)
                self.kicks += 1
                return True
        return False

    def guest_mmio_write(self, addr: int, size: int, value: int) -> None:
        if self._ioevent(False, addr, size, value):
            return
        self.forwarded_mmio_writes += 1
        self.iospace.write(IoSpace.MMIO, addr, size, value)

    def guest_mmio_read(self, addr: int, size: int) -> int:
        return self.iospace.read(IoSpace.MMIO, addr, size)

    def guest_pio_write(self, port: int, size: int, value: int) -> None:
        if self._ioevent(True, port, size, value):
            return
        self.iospace.write(IoSpace.PIO, port, size, value)

    def guest_pio_read(self, port: int, size: int) -> int:
        return self.iospace.read(IoSpace.PIO, port, size)

    # -- interrupt delivery ------------------------------------------------------------
    def _deliver_msi(self, address: int, data: int) -> None:
        key = (address, data)
        self.msis[key] += 1
        self.msi_log.append(key)
        if len(self.msi_log) > 100000:
            del self.msi_log[:50000]
        self._cond.notify_all()

    def _fire(self, fd: int) -> bool:
        """Consume irqfd `fd`'s count and deliver it per the routing (lock held)."""
        try:
            os.eventfd_read(fd)
        except BlockingIOError:
            return False
        gsi, resample_fd = self.irqfds[fd]
        for route in self.routes.get(gsi, ()):
            if hasattr(route, "address"):
                self._deliver_msi(route.address, route.data)
            else:
                if resample_fd is not None:
                    if gsi in self.asserted:
                        break  # a level already high: no new edge for the guest
                    self.asserted.add(gsi)
                self.irqchip[gsi] += 1
                self._cond.notify_all()
                break  # one delivery per GSI even with PIC + IOAPIC routes
        return True

    def eoi(self, gsi: int) -> None:
        """The guest's EOI of a level-triggered GSI: KVM lowers the line and
        signals the irqfd's resample fd, so the device re-asserts if it still
        has a reason to."""
        with self._lock:
            if gsi not in self.asserted:
                return
            self.asserted.discard(gsi)
            for _fd, (g, resample_fd) in self.irqfds.items():
                if g == gsi and resample_fd is not None:
                    os.eventfd_write(resample_fd, 1)

    def poll(self, timeout: float = 0.0) -> int:
        """Deliver whatever irqfds fired (waiting up to `timeout` seconds for one).
        Returns the number of irqfd deliveries."""
        try:
            events = self._epoll.poll(timeout)
        except (OSError, ValueError):
            return 0  # closed
        n = 0
        for fd, _ in events:
            if fd == self._wake:
                try:
                    os.eventfd_read(self._wake)
                except BlockingIOError:
                    pass
                continue
            with self._lock:
                if fd in self.irqfds and self._fire(fd):
                    n += 1
        return n

    def msi_count(self, address: int, data: int) -> int:
        return self.msis[(address, data)]

    def wait_msi(self, address: int, data: int, after: int, timeout: float, slice_s: float = 0.05) -> bool:
        """Run delivery until (address, data) was delivered more than `after` times."""
        deadline = time.monotonic() + timeout
        key = (address, data)
        while self.msis[key] <= after:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self.poll(min(left, slice_s))
        return True

    def assigned_gsi(self, fd: int) -> int | None:
        cur = self.irqfds.get(fd)
        return None if cur is None else cur[0]

    def ioeventfd_addresses(self, fd: int) -> list[int]:
        with self._lock:
            return sorted(addr for (pio, addr), regs in self.ioeventfds.items()
                          for r in regs if r.fd == fd)

    def close(self) -> None:
        with self._lock:
            if self.closed:
                return
            self.closed = True
            self._epoll.close()
            os.close(self._wake)
