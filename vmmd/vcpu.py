"""One thread per vCPU: the KVM_RUN loop and exit dispatch.

Exits that need the rest of the VM (reset, shutdown, fatal errors) are
reported through the `events` callbacks, which hand them to the main loop;
the vCPU thread itself only parks or stops.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from bus.types import IoSpace
from vmmd import assists
from vmmd.kvm import abi
from vmmd.runcontrol import KICK_SIGNAL, RunControl

log = logging.getLogger(__name__)


@dataclass
class VcpuEvents:
    """What a vCPU thread reports to the machine (called from the vCPU thread)."""
    reset: Callable[[str], None]
    shutdown: Callable[[str], None]
    failed: Callable[[int, str], None]


@dataclass
class VcpuStats:
    by_reason: dict[int, int] = field(default_factory=dict)  # KVM exit reason -> count (hot path: ints)
    assists: dict[str, int] = field(default_factory=dict)

    @property
    def exits(self) -> dict[str, int]:
        return {_EXIT_NAMES.get(r, str(r)): n for r, n in sorted(self.by_reason.items())}


_EXIT_NAMES = {v: k[len("KVM_EXIT_"):].lower() for k, v in vars(abi).items()
               if k.startswith("KVM_EXIT_") and isinstance(v, int)
               and k not in ("KVM_EXIT_IO_IN", "KVM_EXIT_IO_OUT")}


class VcpuThread:
    def __init__(self, vcpu, io, control: RunControl, events: VcpuEvents,
                 assist_set: assists.AssistSet):
        self.vcpu = vcpu
        self.index = vcpu.index
        self.io = io
        self.control = control
        self.events = events
        self.assists = assist_set
        self.stats = VcpuStats()
        self._thread = threading.Thread(target=self._main, name=f"vcpu{self.index}", daemon=True)
        self._native_id: int | None = None
        self._started = threading.Event()

    def start(self) -> None:
        self.control.register(self.index, self)
        self._thread.start()
        self._started.wait()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def kick(self) -> None:
        """Get this vCPU out of KVM_RUN (see runcontrol for why in this order)."""
        self.vcpu.immediate_exit = 1
        ident = self._thread.ident
        if ident is not None and self._thread.is_alive():
            try:
                signal.pthread_kill(ident, KICK_SIGNAL)
            except ProcessLookupError:
                pass

    # -- the loop -------------------------------------------------------------
    def _main(self) -> None:
        # The kick signal must be deliverable to this thread.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, [KICK_SIGNAL])
        self._started.set()
        try:
            self._loop()
        except Exception as exc:  # never let a vCPU thread die silently
            log.exception("vcpu%d crashed", self.index)
            self.events.failed(self.index, f"vcpu thread crashed: {exc}")
        finally:
            self.control.unregister(self.index)

    def _loop(self) -> None:
        vcpu, control = self.vcpu, self.control
        handlers = {
            abi.KVM_EXIT_IO: self._on_io,
            abi.KVM_EXIT_MMIO: self._on_mmio,
            abi.KVM_EXIT_INTR: self._on_intr,
            abi.KVM_EXIT_HLT: self._on_hlt,
            abi.KVM_EXIT_SHUTDOWN: self._on_shutdown,
            abi.KVM_EXIT_SYSTEM_EVENT: self._on_system_event,
            abi.KVM_EXIT_INTERNAL_ERROR: self._on_internal_error,
        }
        counts = self.stats.by_reason
        while True:
            if not control.checkpoint(self.index):
                return
            vcpu.immediate_exit = 0
            # Re-check after clearing: a pause/stop may have raced the clear.
            if control.stopping:
                return
            reason = vcpu.run()
            counts[reason] = counts.get(reason, 0) + 1
            handler = handlers.get(reason)
            if handler is None:
                self._fail(f"unexpected exit reason {_EXIT_NAMES.get(reason, reason)}")
                return
            if handler() is False:
                return

    def _fail(self, why: str) -> None:
        try:
            regs = self.vcpu.get_regs()
            why = f"{why} (rip={regs.rip:#x})"
        except OSError:
            pass
        log.error("vcpu%d: %s", self.index, why)
        self.events.failed(self.index, why)

    def _on_io(self):
        io = self.vcpu.run_struct.exit.io
        size, port, count = io.size, io.port, io.count
        data = self.vcpu.io_data()
        mask = (1 << (8 * size)) - 1
        if io.direction == abi.KVM_EXIT_IO_OUT:
            for i in range(count):
                off = i * size
                self.io.write(IoSpace.PIO, port, size, int.from_bytes(data[off:off + size], "little"))
        else:
            for i in range(count):
                off = i * size
                value = self.io.read(IoSpace.PIO, port, size) & mask
                data[off:off + size] = value.to_bytes(size, "little")
        return None

    def _on_mmio(self):
        mmio = self.vcpu.run_struct.exit.mmio
        size = mmio.len
        if size not in (1, 2, 4, 8):
            self._fail(f"MMIO access of {size} bytes at {mmio.phys_addr:#x}")
            return False
        if mmio.is_write:
            value = int.from_bytes(bytes(mmio.data[:size]), "little")
            self.io.write(IoSpace.MMIO, mmio.phys_addr, size, value)
        else:
            value = self.io.read(IoSpace.MMIO, mmio.phys_addr, size) & ((1 << (8 * size)) - 1)
            mmio.data[:size] = list(value.to_bytes(size, "little"))
        return None

    def _on_intr(self):
        return None  # a kick: the loop's checkpoint parks or stops us

    def _on_hlt(self):
        # Only without an in-kernel irqchip; avoid a busy loop.
        time.sleep(0.001)
        return None

    def _on_shutdown(self):
        # Triple fault: on a PC this resets the machine.
        self.events.reset("triple fault")
        return False

    def _on_system_event(self):
        ev = self.vcpu.run_struct.exit.system_event
        if ev.type == abi.KVM_SYSTEM_EVENT_RESET:
            self.events.reset("system event reset")
        else:
            self.events.shutdown(f"system event {ev.type}")
        return False

    def _on_internal_error(self):
        internal = self.vcpu.run_struct.exit.internal
        if internal.suberror == abi.KVM_INTERNAL_ERROR_EMULATION:
            name = self.assists.handle_emulation_failure(self.vcpu, internal)
            if name:
                self.stats.assists[name] = self.stats.assists.get(name, 0) + 1
                return None
            insn = assists.instruction_bytes(internal)
            self._fail(f"emulation failure, instruction bytes {insn.hex(' ') or '?'}")
        else:
            self._fail(f"internal error suberror {internal.suberror}")
        return False
