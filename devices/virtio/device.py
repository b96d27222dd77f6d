"""VirtioDevice: the base of every virtio device process model.

It owns the virtio-pci function (pci_transport.VirtioPciTransport), the split
queues, the guest memory view with the dirty log, and the fast path:

  kicks       "ioeventfd.<q>" fds (KVM ioeventfds registered by vmmd at the
              queue's notify address) are read on the event loop; in bus-only
              mode kicks arrive as MMIO WRITEs to the notify region. Both end
              in on_queue_notify(q, queue).
  interrupts  MSI-X enabled: vector v -> write "irqfd.<v>" (vmmd binds it to
              a GSI route, or deassigns it while masked), or in bus-only mode
              host.fire_vector(v) (a VECTOR event; vmmd applies its table and
              masks). MSI-X disabled: INTx - the ISR bit is set and the line
              asserted through the "intx" irqfd (level, with "intx_resample":
              at the guest's EOI KVM deasserts and signals it, and the line is
              asserted again while ISR is still non-zero), or in bus-only mode
              IRQ_LINE(options["intx_gsi"], 1) until the guest reads ISR.

A subclass sets up whatever the hooks below need, *then* calls
super().__init__(host, options), and implements:

    VIRTIO_ID: int                  PCI_CLASS (optional, else by VIRTIO_ID)
    device_features() -> int        device-specific feature bits
    num_queues() -> int             queue_max_size(q) -> int (power of 2)
    config_bytes() -> bytes         device config (or override config_read)
    config_read(offset, size) -> int / config_write(offset, size, value)
    features_ok(features) -> bool   veto a feature combination at FEATURES_OK
    on_driver_ok()                  queues are live (self.queues, self.features)
    on_queue_notify(q, queue)       pop chains, process, push_used, then
                                    self.notify_used(q); catch ChainError to
                                    complete a malformed chain (err.head) with
                                    an error; a QueueError reaching the base
                                    sets NEEDS_RESET
    device_reset()                  status := 0 or a function reset: drop
                                    in-flight work (nothing may touch guest
                                    memory for the old rings afterwards)
    device_quiesce()                finish (or record) in-flight requests
                                    synchronously before returning; after it
                                    returns nothing writes guest memory
    device_resume()
    device_save() -> dict / device_restore(state)   (ValueError on bad state)

Quiesce: readers of the ioeventfds are removed and MMIO kicks are only
remembered, so no new work starts; on resume every live queue is polled once
(eventfd counters kept counting meanwhile, so no kick is lost).

State (save_state) = transport registers (incl. the config space: BARs,
command, MSI-X control) + per-queue indices + device_save(). On restore the
queues are rebuilt from the registers; a queue whose saved used idx differs
from the used idx in guest memory comes from a stale checkpoint (a crash, not
a quiesced save) and is resynchronised from the ring (SplitQueue.sync_from_ring).
"""

from __future__ import annotations

import asyncio
import logging
import os

from vmmd.guest_memory import GuestMemoryError

from bus.types import IoSpace
from devices.model import DeviceHost, DeviceModel
from devices.virtio import features as vf
from devices.virtio.dirty_log import DirtyLog
from devices.virtio.memory import DeviceMemory
from devices.virtio.pci_transport import MSIX_BAR, VirtioPciTransport
from devices.virtio.queue import QueueError, SplitQueue

log = logging.getLogger("devices.virtio")

VIRTIO_STATE_VERSION = 1


class VirtioDevice(DeviceModel):
    KIND = "virtio"
    NEEDS_GUEST_MEMORY = True
    STATE_VERSION = VIRTIO_STATE_VERSION
    VIRTIO_ID = 0
    PCI_CLASS: int | None = None

    # --- subclass hooks (defaults) -------------------------------------------------------

    def device_features(self) -> int:
        return 0

    def num_queues(self) -> int:
        return 1

    def queue_max_size(self, q: int) -> int:
        return 256

    def msix_vectors(self) -> int:
        """One vector per queue plus one for config changes."""
        return self.num_queues() + 1

    def config_bytes(self) -> bytes:
        return b""

    def config_size(self) -> int:
        return len(self.config_bytes())

    def config_read(self, offset: int, size: int) -> int:
        return int.from_bytes(self.config_bytes()[offset:offset + size], "little")

    def config_write(self, offset: int, size: int, value: int) -> None:
        pass

    def features_ok(self, features: int) -> bool:
        return True

    def on_driver_ok(self) -> None:
        pass

    def on_queue_notify(self, q: int, queue: SplitQueue) -> None:
        pass

    def device_reset(self) -> None:
        pass

    def device_quiesce(self) -> None:
        pass

    def device_resume(self) -> None:
        pass

    def device_save(self) -> dict:
        return {}

    def device_restore(self, state: dict) -> None:
        pass

    # --- construction ------------------------------------------------------------------------

    def __init__(self, host: DeviceHost, options: dict):
        super().__init__(host, options)
        if getattr(host, "memory", None) is None:
            raise ValueError(f"{self.KIND}: a virtio device needs guest memory")
        fds = dict(getattr(host, "fds", None) or {})
        self.fds = fds
        dirty = DirtyLog.from_fd(fds["dirty_log"], owns_fd=False) if "dirty_log" in fds else None
        self.memory = DeviceMemory(host.memory, dirty)
        nq = self.num_queues()
        self.transport = VirtioPciTransport(
            self, virtio_id=self.VIRTIO_ID, device_features=self.device_features(),
            queue_max_sizes=[self.queue_max_size(q) for q in range(nq)],
            msix_vectors=self.msix_vectors(), config_size=self.config_size(),
            pci_class=self.PCI_CLASS)
        self.queues: list[SplitQueue | None] = [None] * nq
        intx_gsi = options.get("intx_gsi", 0) if isinstance(options, dict) else 0
        self.intx_gsi = intx_gsi if type(intx_gsi) is int and intx_gsi >= 0 else 0
        self._ioeventfds = {q: fds[f"ioeventfd.{q}"] for q in range(nq) if f"ioeventfd.{q}" in fds}
        self._irqfds = {v: fds[f"irqfd.{v}"] for v in range(self.transport.msix_vectors)
                        if f"irqfd.{v}" in fds}
        self._intx_fd = fds.get("intx")
        self._resample_fd = fds.get("intx_resample")
        for fd in [*self._ioeventfds.values(), self._resample_fd]:
            if fd is not None:
                os.set_blocking(fd, False)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._readers: list[int] = []
        self._quiesced = False
        self._kicked_while_quiesced: set[int] = set()
        self._poll_on_start = False
        self.needs_reset_reason: str | None = None
        self.counters = {"kicks": 0, "interrupts": 0, "chain_errors": 0, "needs_reset": 0}

    def hello_info(self) -> dict:
        return {"pci": self.transport.pci_declaration()}

    @property
    def features(self) -> int:
        """The negotiated feature bits (0 before FEATURES_OK)."""
        return self.transport.negotiated

    def has_feature(self, bit: int) -> bool:
        return bool(self.transport.negotiated >> bit & 1)

    # --- the bus -----------------------------------------------------------------------------

    def io_read(self, space: IoSpace, addr: int, size: int) -> int:
        t = self.transport
        if space == IoSpace.PCI_CFG:
            return t.cfg_read(addr, size)
        if space == IoSpace.MMIO:
            hit = t.decode(addr, size)
            if hit is not None and hit[0] != MSIX_BAR:
                return t.bar_read(hit[0], hit[1], size)
        return (1 << (8 * size)) - 1

    def io_write(self, space: IoSpace, addr: int, size: int, value: int) -> None:
        t = self.transport
        if space == IoSpace.PCI_CFG:
            t.cfg_write(addr, size, value)
        elif space == IoSpace.MMIO:
            hit = t.decode(addr, size)
            if hit is not None and hit[0] != MSIX_BAR:
                t.bar_write(hit[0], hit[1], size, value)

    # --- TransportHooks --------------------------------------------------------------------------

    def transport_reset(self) -> None:
        self._virtio_reset()

    def transport_features_ok(self, features: int) -> bool:
        try:
            return bool(self.features_ok(features))
        except Exception:
            log.exception("features_ok failed")
            return False

    def transport_driver_ok(self) -> None:
        for q, qc in enumerate(self.transport.queues):
            if qc.enabled and not self._activate(q):
                return
        self.on_driver_ok()

    def transport_queue_enabled(self, q: int) -> None:
        if self.transport.driver_ok and self._activate(q):
            self._kick(q)

    def transport_notify(self, q: int) -> None:
        self._kick(q)

    def transport_config_read(self, offset: int, size: int) -> int:
        return self.config_read(offset, size)

    def transport_config_write(self, offset: int, size: int, value: int) -> None:
        self.config_write(offset, size, value)

    def transport_isr_cleared(self) -> None:
        t = self.transport
        if t.intx_asserted:
            t.intx_asserted = False
            if self._intx_fd is None:
                self.host.set_irq_line(self.intx_gsi, False)
            # with the irqfd KVM deasserts at the EOI (and resamples)

    def transport_changed(self) -> None:
        self.host.checkpoint()

    # --- queues ----------------------------------------------------------------------------------

    def _activate(self, q: int) -> bool:
        """Build queue q from its registers; NEEDS_RESET (False) if they are bad."""
        qc = self.transport.queues[q]
        try:
            if not qc.valid_size():
                raise QueueError(f"queue {q}: size {qc.size} invalid (max {qc.max_size})")
            self.queues[q] = SplitQueue(
                self.memory, qc.size, qc.desc, qc.driver, qc.device,
                event_idx=self.has_feature(vf.F_RING_EVENT_IDX),
                indirect=self.has_feature(vf.F_RING_INDIRECT_DESC))
        except QueueError as exc:
            self.queues[q] = None
            self.set_needs_reset(f"queue {q}: {exc}")
            return False
        return True

    def _kick(self, q: int) -> None:
        self.counters["kicks"] += 1
        if self._quiesced:
            self._kicked_while_quiesced.add(q)
            return
        queue = self.queues[q] if q < len(self.queues) else None
        if queue is None or not self.transport.driver_ok:
            return
        try:
            self.on_queue_notify(q, queue)
        except (QueueError, GuestMemoryError) as exc:
            self.set_needs_reset(f"queue {q}: {exc}")
        except Exception as exc:  # a device bug: stop this device, not the process
            log.exception("queue %d: processing failed", q)
            self.set_needs_reset(f"queue {q}: {type(exc).__name__}: {exc}")

    def _poll_all(self) -> None:
        for q, queue in enumerate(self.queues):
            if queue is not None:
                self._kick(q)

    def notify_used(self, q: int) -> None:
        """Interrupt the driver for queue q if the ring's suppression rules want it."""
        queue = self.queues[q]
        if queue is not None and queue.needs_interrupt():
            self._interrupt(self.transport.queues[q].msix_vector, vf.ISR_QUEUE)

    def config_changed(self) -> None:
        """Call after the device config changed: config_generation++ and a config interrupt."""
        self.transport.config_changed()
        self._interrupt(self.transport.config_msix_vector, vf.ISR_CONFIG)
        self.host.checkpoint()

    def set_needs_reset(self, reason: str) -> None:
        """The device cannot go on (broken ring, device error): DEVICE_NEEDS_RESET
        and a config interrupt; queues are not processed until the driver resets."""
        if self.transport.set_needs_reset():
            self.needs_reset_reason = reason
            self.counters["needs_reset"] += 1
            log.warning("%s: NEEDS_RESET: %s", self.KIND, reason)
            self._interrupt(self.transport.config_msix_vector, vf.ISR_CONFIG)
            self.host.checkpoint()

    # --- interrupts --------------------------------------------------------------------------------

    def _interrupt(self, vector: int, isr_bit: int) -> None:
        t = self.transport
        t.isr |= isr_bit
        self.counters["interrupts"] += 1
        if t.msix_enabled:
            if vector == vf.NO_VECTOR or vector >= t.msix_vectors:
                return
            fd = self._irqfds.get(vector)
            if fd is not None:
                os.eventfd_write(fd, 1)
            else:
                fire = getattr(self.host, "fire_vector", None)
                if fire is not None:
                    fire(vector)
            return
        self._assert_intx()

    def _assert_intx(self) -> None:
        t = self.transport
        if t.intx_disabled or not t.intx_pin:
            return
        was = t.intx_asserted
        t.intx_asserted = True
        if self._intx_fd is not None:
            os.eventfd_write(self._intx_fd, 1)
        elif not was:
            self.host.set_irq_line(self.intx_gsi, True)

    def _on_resample(self) -> None:
        try:
            os.eventfd_read(self._resample_fd)
        except BlockingIOError:
            return
        t = self.transport
        if t.isr and not t.msix_enabled and not t.intx_disabled:
            os.eventfd_write(self._intx_fd, 1)
            t.intx_asserted = True
        else:
            t.intx_asserted = False

    def _on_ioeventfd(self, q: int, fd: int) -> None:
        try:
            os.eventfd_read(fd)
        except BlockingIOError:
            return
        self._kick(q)

    # --- lifecycle -----------------------------------------------------------------------------------

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        if self._resample_fd is not None and self._intx_fd is not None:
            self._loop.add_reader(self._resample_fd, self._on_resample)
        if not self._quiesced:
            self._add_readers()
        if self._poll_on_start:
            self._poll_on_start = False
            self._loop.call_soon(self._poll_all)

    def _add_readers(self) -> None:
        if self._loop is None or self._readers:
            return
        for q, fd in self._ioeventfds.items():
            self._loop.add_reader(fd, self._on_ioeventfd, q, fd)
            self._readers.append(fd)

    def _remove_readers(self) -> None:
        if self._loop is not None:
            for fd in self._readers:
                self._loop.remove_reader(fd)
        self._readers = []

    def quiesce(self) -> None:
        self._quiesced = True
        self._remove_readers()
        self.device_quiesce()

    def resume(self) -> None:
        if not self._quiesced:
            return
        self._quiesced = False
        self._kicked_while_quiesced.clear()
        self.device_resume()
        self._add_readers()
        if self._loop is not None:
            self._loop.call_soon(self._poll_all)
        else:
            self._poll_on_start = True

    def _virtio_reset(self) -> None:
        self.queues = [None] * len(self.queues)
        self.needs_reset_reason = None
        self.device_reset()
        t = self.transport
        if t.intx_asserted:
            t.intx_asserted = False
            if self._intx_fd is None:
                self.host.set_irq_line(self.intx_gsi, False)

    def reset(self) -> None:
        """Function reset (machine reset): config space to power-on and a virtio reset."""
        self.transport.power_on_reset()
        self._virtio_reset()

    def dirty_sync(self) -> None:
        """CONTROL dirty_sync: no write that saw the old active buffer is still running."""
        if self.memory.dirty_log is not None:
            self.memory.dirty_log.sync()

    def stats(self) -> dict:
        t = self.transport
        return {"status": t.status, "features": t.negotiated, "isr": t.isr,
                "needs_reset_reason": self.needs_reset_reason, **self.counters,
                "queues": [None if q is None else {"size": q.size, "last_avail": q.last_avail_idx,
                                                   "used": q.used_idx} for q in self.queues]}

    def close(self) -> None:
        self._remove_readers()
        if self.memory.dirty_log is not None:
            self.memory.dirty_log.close()

    # --- state ---------------------------------------------------------------------------------------

    def save_state(self) -> dict:
        return {"virtio": VIRTIO_STATE_VERSION,
                "transport": self.transport.save(),
                "queues": [None if q is None else q.save() for q in self.queues],
                "device": self.device_save()}

    def restore_state(self, state: dict) -> None:
        if not isinstance(state, dict) or state.get("virtio") != VIRTIO_STATE_VERSION:
            raise ValueError("not a virtio device state of version 1")
        qstates = state.get("queues")
        if not isinstance(qstates, list) or len(qstates) != len(self.queues):
            raise ValueError(f"virtio state must have {len(self.queues)} queue entries")
        dstate = state.get("device")
        if not isinstance(dstate, dict):
            raise ValueError("virtio state device must be a map")
        old = self.transport.save()
        self.transport.restore(state.get("transport"))  # validates before changing anything
        try:
            queues: list[SplitQueue | None] = [None] * len(self.queues)
            broken = None
            if self.transport.driver_ok:
                for q, qc in enumerate(self.transport.queues):
                    if not qc.enabled:
                        continue
                    try:
                        if not qc.valid_size():
                            raise QueueError(f"size {qc.size}")
                        queue = SplitQueue(self.memory, qc.size, qc.desc, qc.driver, qc.device,
                                           event_idx=self.has_feature(vf.F_RING_EVENT_IDX),
                                           indirect=self.has_feature(vf.F_RING_INDIRECT_DESC))
                    except QueueError as exc:
                        broken = f"queue {q} on restore: {exc}"
                        continue
                    if qstates[q] is None:
                        queue.sync_from_ring()
                    else:
                        queue.restore(qstates[q])
                        if queue.used_idx != queue.ring_used_idx():
                            queue.sync_from_ring()  # a stale (crash) checkpoint
                    queues[q] = queue
            self.device_restore(dstate)
        except Exception:
            self.transport.restore(old)
            raise
        self.queues = queues
        self._kicked_while_quiesced.clear()
        if broken:
            self.set_needs_reset(broken)
        if self.transport.driver_ok:
            if self._loop is not None and not self._quiesced:
                self._loop.call_soon(self._poll_all)
            else:
                self._poll_on_start = True
