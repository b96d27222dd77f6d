"""A guest in Python: vmmd's real PCI bus and supervisor, a FakeVm for KVM,
and a virtio-pci driver that talks to a device process exactly the way a
guest under vmmd does.

    with Harness(sandbox="on") as h:                # bus_only=True for the comparison
        dev = h.add_device(spec)                    # vmmd.devlink.DeviceSpec, spawned by vmmd's Supervisor
        drv = VirtioPciDriver(h, slot=spec.slot)
        drv.probe(); drv.init(features=..., queues=1)
        head = drv.submit(0, readable=[(gpa, n)], writable=[(gpa, n)])
        drv.wait_heads(0, {head})

Paths, as under vmmd:
  * configuration: 0xCF8/0xCFC PIO through vmmd's IoSpaceMap ->
    ConfigMechanism1 -> PciBus -> the device's config space over the bus
    (vmmd snoops COMMAND, BARs and MSI-X control and re-derives its routing);
  * BAR registers: guest MMIO through the IoSpaceMap (the MSI-X table and
    PBA are vmmd's emulation, never the device);
  * kicks: a guest MMIO write of the queue index to the notify address;
    FakeVm signals the registered ioeventfd, like KVM (bus-only: forwarded
    as a bus WRITE);
  * interrupts: the device writes its irqfd; FakeVm delivers the MSI per the
    GSI route vmmd installed from the guest's MSI-X table entry (bus-only:
    the device's VECTOR event -> vmmd's MsixTable -> signal_msi).
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import struct
import tempfile
import threading
import time

from bus.types import IoRange, IoSpace
from vmmd.guest_memory import GuestMemory
from vmmd.iospace import IoSpaceMap
from vmmd.pci.bus import PciBus
from vmmd.pci.config_access import ConfigMechanism1
from vmmd.supervisor import Supervisor, become_subreaper

from tests.harness.fakevm import FakeVm
from tests.harness.rings import DriverQueue, GuestAllocator

log = logging.getLogger(__name__)

# virtio constants (spec 2.1, 4.1)
STATUS_ACKNOWLEDGE, STATUS_DRIVER, STATUS_DRIVER_OK = 0x01, 0x02, 0x04
STATUS_FEATURES_OK, STATUS_NEEDS_RESET, STATUS_FAILED = 0x08, 0x40, 0x80
F_RING_INDIRECT_DESC, F_RING_EVENT_IDX, F_VERSION_1 = 28, 29, 32
NO_VECTOR = 0xFFFF
VIRTIO_VENDOR = 0x1AF4
CAP_MSIX, CAP_VNDR = 0x11, 0x09
CFG_COMMON, CFG_NOTIFY, CFG_ISR, CFG_DEVICE, CFG_PCI = 1, 2, 3, 4, 5
# common config offsets
C_DFSELECT, C_DF, C_GFSELECT, C_GF, C_MSIX, C_NUMQ, C_STATUS, C_GEN = (
    0x00, 0x04, 0x08, 0x0C, 0x10, 0x12, 0x14, 0x15)
C_QSELECT, C_QSIZE, C_QMSIX, C_QENABLE, C_QNOFF = 0x16, 0x18, 0x1A, 0x1C, 0x1E
C_QDESC, C_QAVAIL, C_QUSED = 0x20, 0x28, 0x30
PCI_COMMAND, CMD_MEMORY, CMD_MASTER, CMD_INTX_DISABLE = 0x04, 0x2, 0x4, 0x400
MSIX_ENABLE, MSIX_FUNCTION_MASK = 0x8000, 0x4000
MSI_ADDRESS = 0xFEE00000

MMIO_BASE = 0xC000_0000      # where the harness's "firmware" places BARs
MMIO_END = 0xF000_0000
GUEST_ALLOC_BASE = 1 << 20   # guest RAM below this stays untouched


class HarnessError(RuntimeError):
    pass


class DeviceTimeoutError(HarnessError):
    pass


class Harness:
    """vmmd's device side, in-process: guest memory, IoSpaceMap, PciBus with
    ConfigMechanism1, Supervisor (its asyncio loop in a background thread),
    and a FakeVm attached to the bus in place of the KVM VM."""

    def __init__(self, *, mem_size: int = 64 << 20, sandbox: str = "on", bus_only: bool = False,
                 timeout: float = 5.0, rundir: str | None = None):
        self.bus_only = bus_only
        self.sandbox = sandbox
        self._own_rundir = rundir is None
        self.rundir = rundir or tempfile.mkdtemp(prefix="vmmd-harness-")
        self.memory = GuestMemory.create(mem_size)
        self.allocator = GuestAllocator(GUEST_ALLOC_BASE, mem_size)
        self.iospace = IoSpaceMap()
        self.pci = PciBus(self.iospace)
        self.config_access = ConfigMechanism1(self.pci)
        for r in ConfigMechanism1.RANGES:
            self.iospace.add(r, self.config_access, "ConfigMechanism1")
        self.vm = FakeVm(self.iospace)
        self.pci.attach_vm(self.vm)
        self._mmio_next = MMIO_BASE
        self._msi_data_next = 0x30
        self._lock = threading.Lock()
        self.requests: list[tuple[str, str, dict]] = []
        become_subreaper()  # sandboxed devices are grandchildren, as under vmmd
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run_loop, name="harness-loop", daemon=True)
        self._thread.start()
        self.supervisor = self.call(self._make_supervisor, timeout)
        self._closed = False

    def _run_loop(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def _make_supervisor(self, timeout: float) -> Supervisor:
        return Supervisor(loop=self.loop, rundir=self.rundir, memory=self.memory, iospace=self.iospace,
                          irq_line=self.vm.irq_line, on_request=self._on_request, sandbox=self.sandbox,
                          timeout=timeout, pci=self.pci, fast_path=not self.bus_only)

    def _on_request(self, dev, what: str, args: dict) -> None:
        self.requests.append((dev.spec.id, what, args))

    # -- running things on the supervisor's loop ---------------------------------------
    def run(self, coro, timeout: float = 30.0):
        """Run a coroutine on the loop thread and wait for its result."""
        fut = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return fut.result(timeout)
        except TimeoutError:
            fut.cancel()
            raise

    def call(self, fn, *args, timeout: float = 10.0):
        async def wrapper():
            return fn(*args)
        return self.run(wrapper(), timeout)

    # -- devices -----------------------------------------------------------------------
    def add_device(self, spec, timeout: float = 30.0):
        """Spawn a device through vmmd's supervisor; returns its ManagedDevice."""
        dev = self.call(self.supervisor.add, spec)
        self.run(self.supervisor.start(dev), timeout)
        return dev

    def wait_running(self, dev, min_generation: int, timeout: float = 30.0) -> None:
        """Wait until `dev` runs an incarnation >= min_generation (after a crash/kill)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if dev.generation >= min_generation and dev.state == "running":
                return
            time.sleep(0.02)
        raise DeviceTimeoutError(f"device {dev.spec.id} not running generation {min_generation} "
                                 f"(state {dev.state}, generation {dev.generation})")

    def restart(self, dev, timeout: float = 30.0) -> None:
        """vmmd's operator restart (save, kill, spawn, restore)."""
        self.run(self.supervisor.restart(dev), timeout)

    def alloc_mmio(self, size: int) -> int:
        with self._lock:
            base = (self._mmio_next + size - 1) & ~(size - 1)
            if base + size > MMIO_END:
                raise HarnessError("MMIO window exhausted")
            self._mmio_next = base + size
            return base

    def alloc_msi_data(self, n: int) -> int:
        """n distinct MSI data values (APIC vectors) for one function."""
        with self._lock:
            base = self._msi_data_next
            self._msi_data_next += n
            if self._msi_data_next > 0xFF:
                raise HarnessError("out of APIC vectors")
            return base

    # -- config mechanism #1 -----------------------------------------------------------
    def cfg_read(self, slot: int, func: int, reg: int, size: int) -> int:
        self.vm.guest_pio_write(0xCF8, 4, 0x8000_0000 | slot << 11 | func << 8 | (reg & 0xFC))
        return self.vm.guest_pio_read(0xCFC + (reg & 3), size)

    def cfg_write(self, slot: int, func: int, reg: int, size: int, value: int) -> None:
        self.vm.guest_pio_write(0xCF8, 4, 0x8000_0000 | slot << 11 | func << 8 | (reg & 0xFC))
        self.vm.guest_pio_write(0xCFC + (reg & 3), size, value)

    # -- teardown ------------------------------------------------------------------------
    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self.run(self.supervisor.stop_all(), 30.0)
        except Exception as exc:
            log.warning("stop_all failed: %s", exc)
            for dev in self.supervisor.devices.values():  # last resort: kill what we started
                inc = dev.current
                if inc is not None:
                    try:
                        os.kill(inc.pid, 9)
                    except ProcessLookupError:
                        pass
        try:
            self.call(self.pci.detach_vm)
        except Exception:
            pass
        self.supervisor.close()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        if not self._thread.is_alive():
            self.loop.close()
        self.vm.close()
        self.memory.close()
        if self._own_rundir:
            shutil.rmtree(self.rundir, ignore_errors=True)

    def __enter__(self) -> "Harness":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class VirtioCap:
    def __init__(self, cfg_type: int, bar: int, offset: int, length: int, cap: int, extra: int = 0):
        self.cfg_type, self.bar, self.offset, self.length, self.cap = cfg_type, bar, offset, length, cap
        self.extra = extra  # notify_off_multiplier for the notify cap


class VirtioPciDriver:
    """What Linux's virtio_pci (modern) does, step by step, for one function."""

    def __init__(self, harness: Harness, slot: int, function: int = 0, *, timeout: float = 10.0):
        self.h = harness
        self.vm = harness.vm
        self.mem = harness.memory
        self.slot, self.function = slot, function
        self.timeout = timeout
        self.bars: dict[int, tuple[int, int, str]] = {}   # index -> (base, size, kind)
        self.caps: dict[int, VirtioCap] = {}
        self.msix_cap = None
        self.msix_vectors = 0
        self.msix_table = self.msix_pba = None           # (bar, offset)
        self.msi_data_base = 0
        self.queues: list[DriverQueue | None] = []
        self.queue_vectors: list[int] = []
        self.notify_offs: list[int] = []
        self.features = 0
        self.device_features = 0
        self._next_token = 0
        self._tokens: list[dict[int, int]] = []   # per queue: head -> token in flight
        self.done: list[dict[int, int]] = []      # per queue: token -> written length
        self.bogus_used: list[list] = []          # used elements naming no head in flight

    # -- config space ----------------------------------------------------------------------
    def cfg_read(self, reg: int, size: int) -> int:
        return self.h.cfg_read(self.slot, self.function, reg, size)

    def cfg_write(self, reg: int, size: int, value: int) -> None:
        self.h.cfg_write(self.slot, self.function, reg, size, value)

    def probe(self) -> None:
        """Check the ids, size and place the BARs, find the capabilities, enable decoding."""
        ids = self.cfg_read(0, 4)
        if ids & 0xFFFF != VIRTIO_VENDOR:
            raise HarnessError(f"no virtio function at {self.slot}.{self.function} (ids {ids:#x})")
        self.device_id = ids >> 16
        self.cfg_write(PCI_COMMAND, 2, 0)  # decoding off while sizing, as firmware does
        self.size_bars()
        for index, (_, size, _) in list(self.bars.items()):
            self.program_bar(index, self.h.alloc_mmio(max(size, 4096)))
        self.find_caps()
        self.cfg_write(PCI_COMMAND, 2, CMD_MEMORY | CMD_MASTER)

    def size_bars(self) -> None:
        self.bars = {}
        i = 0
        while i < 6:
            reg = 0x10 + 4 * i
            orig = self.cfg_read(reg, 4)
            self.cfg_write(reg, 4, 0xFFFFFFFF)
            probe = self.cfg_read(reg, 4)
            self.cfg_write(reg, 4, orig)
            if probe == 0:
                i += 1
                continue
            if probe & 1:
                size = (~(probe & ~0x3) & 0xFFFF) + 1
                self.bars[i] = (0, size, "io")
                i += 1
                continue
            if (probe >> 1) & 3 == 2:  # 64-bit
                origh = self.cfg_read(reg + 4, 4)
                self.cfg_write(reg + 4, 4, 0xFFFFFFFF)
                hi = self.cfg_read(reg + 4, 4)
                self.cfg_write(reg + 4, 4, origh)
                mask = hi << 32 | (probe & ~0xF)
                size = ((~mask) & (2**64 - 1)) + 1
                self.bars[i] = (0, size, "mem64")
                i += 2
            else:
                size = ((~(probe & ~0xF)) & 0xFFFFFFFF) + 1
                self.bars[i] = (0, size, "mem32")
                i += 1

    def program_bar(self, index: int, base: int) -> None:
        _, size, kind = self.bars[index]
        reg = 0x10 + 4 * index
        self.cfg_write(reg, 4, base & 0xFFFFFFFF)
        if kind == "mem64":
            self.cfg_write(reg + 4, 4, base >> 32)
        self.bars[index] = (base, size, kind)

    def move_bar(self, index: int, base: int, *, toggle_decode: bool = True) -> int:
        """Reprogram a BAR (as a guest OS re-assigning resources); returns the old base."""
        old = self.bars[index][0]
        cmd = self.cfg_read(PCI_COMMAND, 2)
        if toggle_decode:
            self.cfg_write(PCI_COMMAND, 2, cmd & ~CMD_MEMORY)
        self.program_bar(index, base)
        if toggle_decode:
            self.cfg_write(PCI_COMMAND, 2, cmd)
        return old

    def find_caps(self) -> None:
        if not self.cfg_read(0x06, 2) & 0x10:
            raise HarnessError("no capability list")
        pos = self.cfg_read(0x34, 1) & 0xFC
        seen = 0
        while pos and seen < 48:
            seen += 1
            cap_id = self.cfg_read(pos, 1)
            nxt = self.cfg_read(pos + 1, 1) & 0xFC
            if cap_id == CAP_MSIX:
                self.msix_cap = pos
                self.msix_vectors = (self.cfg_read(pos + 2, 2) & 0x7FF) + 1
                t = self.cfg_read(pos + 4, 4)
                p = self.cfg_read(pos + 8, 4)
                self.msix_table = (t & 7, t & ~7)
                self.msix_pba = (p & 7, p & ~7)
            elif cap_id == CAP_VNDR:
                cfg_type = self.cfg_read(pos + 3, 1)
                bar = self.cfg_read(pos + 4, 1)
                offset = self.cfg_read(pos + 8, 4)
                length = self.cfg_read(pos + 12, 4)
                extra = self.cfg_read(pos + 16, 4) if cfg_type == CFG_NOTIFY else 0
                # Linux uses the first capability of each type whose BAR is valid
                if cfg_type not in self.caps and bar in self.bars:
                    self.caps[cfg_type] = VirtioCap(cfg_type, bar, offset, length, pos, extra)
            pos = nxt
        for need in (CFG_COMMON, CFG_NOTIFY, CFG_ISR):
            if need not in self.caps:
                raise HarnessError(f"virtio capability {need} missing")

    # -- BAR accesses (guest MMIO) ------------------------------------------------------------
    def cap_addr(self, cfg_type: int, offset: int = 0) -> int:
        c = self.caps[cfg_type]
        return self.bars[c.bar][0] + c.offset + offset

    def common_read(self, off: int, size: int) -> int:
        return self.vm.guest_mmio_read(self.cap_addr(CFG_COMMON, off), size)

    def common_write(self, off: int, size: int, value: int) -> None:
        self.vm.guest_mmio_write(self.cap_addr(CFG_COMMON, off), size, value)

    def common_write64(self, off: int, value: int) -> None:
        self.common_write(off, 4, value & 0xFFFFFFFF)
        self.common_write(off + 4, 4, value >> 32)

    def device_cfg_read(self, off: int, size: int) -> int:
        return self.vm.guest_mmio_read(self.cap_addr(CFG_DEVICE, off), size)

    def device_cfg_bytes(self, off: int, n: int) -> bytes:
        """Read device config like Linux: retry until config_generation is stable."""
        while True:
            gen = self.common_read(C_GEN, 1)
            data = bytes(self.device_cfg_read(off + i, 1) for i in range(n))
            if self.common_read(C_GEN, 1) == gen:
                return data

    def read_isr(self) -> int:
        return self.vm.guest_mmio_read(self.cap_addr(CFG_ISR), 1)

    @property
    def status(self) -> int:
        return self.common_read(C_STATUS, 1)

    def set_status(self, bits: int) -> None:
        self.common_write(C_STATUS, 1, self.status | bits)

    # -- MSI-X (vmmd's emulated table) ------------------------------------------------------------
    def msix_entry_addr(self, v: int) -> int:
        bar, off = self.msix_table
        return self.bars[bar][0] + off + 16 * v

    def msi_data(self, v: int) -> int:
        return self.msi_data_base + v

    def enable_msix(self) -> None:
        if self.msix_cap is None:
            raise HarnessError("no MSI-X capability")
        self.msi_data_base = self.h.alloc_msi_data(self.msix_vectors)
        ctrl = self.msix_cap + 2
        self.cfg_write(ctrl, 2, MSIX_ENABLE | MSIX_FUNCTION_MASK)
        for v in range(self.msix_vectors):
            a = self.msix_entry_addr(v)
            self.vm.guest_mmio_write(a, 4, MSI_ADDRESS)
            self.vm.guest_mmio_write(a + 4, 4, 0)
            self.vm.guest_mmio_write(a + 8, 4, self.msi_data(v))
            self.vm.guest_mmio_write(a + 12, 4, 0)  # unmasked
        self.cfg_write(ctrl, 2, MSIX_ENABLE)

    def mask_vector(self, v: int, masked: bool) -> None:
        self.vm.guest_mmio_write(self.msix_entry_addr(v) + 12, 4, 1 if masked else 0)

    def set_function_mask(self, masked: bool) -> None:
        self.cfg_write(self.msix_cap + 2, 2, MSIX_ENABLE | (MSIX_FUNCTION_MASK if masked else 0))

    def pba_pending(self, v: int) -> bool:
        bar, off = self.msix_pba
        word = self.vm.guest_mmio_read(self.bars[bar][0] + off + 8 * (v // 64), 8)
        return bool(word >> (v % 64) & 1)

    def msi_count(self, v: int) -> int:
        return self.vm.msi_count(MSI_ADDRESS, self.msi_data(v))

    # -- virtio initialisation ---------------------------------------------------------------------
    def reset(self, timeout: float | None = None) -> None:
        self.common_write(C_STATUS, 1, 0)
        deadline = time.monotonic() + (timeout or self.timeout)
        while self.status != 0:
            if time.monotonic() > deadline:
                raise DeviceTimeoutError("device status did not return to 0 after reset")
            time.sleep(0.001)
        for q in self.queues:
            if q is not None:
                q.reset_rings()
        self._tokens = [{} for _ in self.queues]
        self.done = [{} for _ in self.queues]

    def read_device_features(self) -> int:
        f = 0
        for sel in (0, 1):
            self.common_write(C_DFSELECT, 4, sel)
            f |= self.common_read(C_DF, 4) << (32 * sel)
        return f

    def write_driver_features(self, f: int) -> None:
        for sel in (0, 1):
            self.common_write(C_GFSELECT, 4, sel)
            self.common_write(C_GF, 4, (f >> (32 * sel)) & 0xFFFFFFFF)

    def init(self, *, features: int = 0, queues: int | None = None, queue_size: int | None = None,
             event_idx: bool = True, indirect: bool = True, msix: bool = True) -> int:
        """Reset, ACK, DRIVER, negotiate (returns the features), queues, DRIVER_OK."""
        if self.msix_cap is not None and msix and not self.msi_data_base:
            self.enable_msix()
        self.reset()
        self.set_status(STATUS_ACKNOWLEDGE)
        self.set_status(STATUS_DRIVER)
        self.negotiate(features, event_idx=event_idx, indirect=indirect)
        self.setup_queues(queues, queue_size)
        self.set_status(STATUS_DRIVER_OK)
        if self.status & STATUS_FAILED or not self.status & STATUS_DRIVER_OK:
            raise HarnessError(f"device refused DRIVER_OK (status {self.status:#x})")
        return self.features

    def negotiate(self, features: int, *, event_idx: bool = True, indirect: bool = True) -> int:
        self.device_features = offered = self.read_device_features()
        want = features | 1 << F_VERSION_1
        if event_idx:
            want |= 1 << F_RING_EVENT_IDX
        if indirect:
            want |= 1 << F_RING_INDIRECT_DESC
        self.features = want & offered
        if not self.features >> F_VERSION_1 & 1:
            raise HarnessError("device does not offer VERSION_1")
        self.write_driver_features(self.features)
        self.set_status(STATUS_FEATURES_OK)
        if not self.status & STATUS_FEATURES_OK:
            self.set_status(STATUS_FAILED)
            raise HarnessError(f"device rejected features {self.features:#x}")
        return self.features

    def has(self, bit: int) -> bool:
        return bool(self.features >> bit & 1)

    def setup_queues(self, count: int | None = None, size: int | None = None) -> None:
        if self.msix_vectors and self.msi_data_base:
            self.common_write(C_MSIX, 2, 0)  # config changes on vector 0
            if self.common_read(C_MSIX, 2) == NO_VECTOR:
                raise HarnessError("device refused the config MSI-X vector")
        nq = self.common_read(C_NUMQ, 2)
        count = nq if count is None else count
        if count > nq:
            raise HarnessError(f"device has {nq} queues, {count} wanted")
        old = self.queues
        self.queues, self.queue_vectors, self.notify_offs = [], [], []
        for q in range(count):
            self.common_write(C_QSELECT, 2, q)
            qmax = self.common_read(C_QSIZE, 2)
            qsize = min(size or qmax, qmax)
            if q < len(old) and old[q] is not None and old[q].size == qsize:
                dq = old[q]
                dq.reset_rings()
            else:
                dq = DriverQueue.allocate(self.mem, self.h.allocator, qsize,
                                          event_idx=self.has(F_RING_EVENT_IDX),
                                          indirect=self.has(F_RING_INDIRECT_DESC))
            dq.event_idx = self.has(F_RING_EVENT_IDX)
            dq.indirect = self.has(F_RING_INDIRECT_DESC)
            self.common_write(C_QSIZE, 2, qsize)
            self.common_write64(C_QDESC, dq.desc_gpa)
            self.common_write64(C_QAVAIL, dq.avail_gpa)
            self.common_write64(C_QUSED, dq.used_gpa)
            vec = NO_VECTOR
            if self.msix_vectors and self.msi_data_base:
                vec = min(q + 1, self.msix_vectors - 1)
                self.common_write(C_QMSIX, 2, vec)
                if self.common_read(C_QMSIX, 2) != vec:
                    raise HarnessError(f"device refused vector {vec} for queue {q}")
            self.notify_offs.append(self.common_read(C_QNOFF, 2))
            self.common_write(C_QENABLE, 2, 1)
            dq.enable_interrupts()
            self.queues.append(dq)
            self.queue_vectors.append(vec)
        self._tokens = [{} for _ in self.queues]
        self.done = [{} for _ in self.queues]
        self.bogus_used = [[] for _ in self.queues]

    # -- I/O -------------------------------------------------------------------------------------------
    def notify_addr(self, q: int) -> int:
        c = self.caps[CFG_NOTIFY]
        return self.bars[c.bar][0] + c.offset + self.notify_offs[q] * c.extra

    def kick(self, q: int, force: bool = False) -> bool:
        dq = self.queues[q]
        if dq.need_kick() or force:
            self.vm.guest_mmio_write(self.notify_addr(q), 2, q)
            return True
        return False

    def submit(self, q: int, readable, writable, *, kick: bool = True, indirect: bool = False) -> int:
        """Make a chain available on queue q (and kick if the device wants it); returns a token."""
        head = self.queues[q].submit(readable, writable, indirect=indirect)
        return self._track(q, head, kick)

    def _track(self, q: int, head: int, kick: bool) -> int:
        self._next_token += 1
        token = self._next_token
        self._tokens[q][head] = token
        if kick:
            self.kick(q)
        return token

    def submit_raw(self, q: int, head: int, *, kick: bool = True) -> int:
        """Publish a hand-written chain (DriverQueue.take_descriptors/write_desc); returns a token."""
        self.queues[q].publish_head(head)
        return self._track(q, head, kick)

    def _reap(self, q: int, used) -> int:
        tokens, done = self._tokens[q], self.done[q]
        for head, n in used:
            token = tokens.pop(head, None)
            if token is None:
                self.bogus_used[q].append((head, n))
            else:
                done[token] = n
        return len(used)

    def poll_used(self, q: int) -> int:
        """Collect queue q's used elements without waiting; returns how many."""
        return self._reap(q, self.queues[q].get_used())

    def wait_used(self, q: int, timeout: float | None = None) -> int:
        """Wait (interrupt-driven) for used elements on queue q; returns how many (0: timeout)."""
        dq = self.queues[q]
        vec = self.queue_vectors[q]
        deadline = time.monotonic() + (timeout if timeout is not None else self.timeout)
        data = self.msi_data(vec) if vec != NO_VECTOR and self.msi_data_base else None
        while True:
            seen = self.vm.msi_count(MSI_ADDRESS, data) if data is not None else 0
            dq.enable_interrupts()
            used = dq.get_used()
            if used:
                return self._reap(q, used)
            left = deadline - time.monotonic()
            if left <= 0:
                return 0
            if data is None:
                self.vm.poll(min(left, 0.002))  # no MSI-X vector: poll the ring
            else:
                self.vm.wait_msi(MSI_ADDRESS, data, seen, left)

    def wait(self, q: int, tokens, timeout: float | None = None) -> dict[int, int]:
        """Wait until every token completed; returns token -> bytes the device wrote."""
        want = [tokens] if isinstance(tokens, int) else list(tokens)
        done = self.done[q]
        deadline = time.monotonic() + (timeout if timeout is not None else self.timeout)
        while True:
            missing = [t for t in want if t not in done]
            if not missing:
                return {t: done.pop(t) for t in want}
            left = deadline - time.monotonic()
            if left <= 0:
                raise DeviceTimeoutError(f"queue {q}: {len(missing)} request(s) not completed "
                                         f"(status {self.status:#x})")
            self.wait_used(q, left)

    def queue_state(self, q: int) -> str:
        """Both sides' ring indices and notification fields, for a stall report."""
        dq = self.queues[q]
        vec = self.queue_vectors[q]
        msis = self.msi_count(vec) if vec != NO_VECTOR and self.msi_data_base else None
        return (f"queue {q}: avail idx {dq.avail_idx} (kicked at {dq.kicked_avail}), used idx "
                f"{dq.used_idx()} (reaped to {dq.last_used_idx}), used flags {dq.used_flags():#x}, "
                f"{dq.notification_fields()}, MSIs {msis}, status {self.status:#x}")

    def outstanding(self, q: int) -> int:
        return len(self._tokens[q])

    def config_interrupts(self) -> int:
        return self.msi_count(0) if self.msi_data_base else 0
