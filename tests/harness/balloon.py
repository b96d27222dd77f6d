"""A virtio-balloon driver (virtio 1.2, 5.5) on top of tests.harness.driver,
behaving like Linux's virtio_balloon.

    spec = balloon_spec(slot=3, options=["stats_interval=0"])
    dev = harness.add_device(spec)
    b = VirtioBalloon(harness, slot=3)          # probe, negotiate, queues, stats buffer
    pages = b.alloc_pages(256)                  # guest pages the "kernel" gives the balloon
    b.inflate(pages); b.deflate(pages[:16])

What Linux does and this driver copies:
  * queues: inflateq, deflateq, then statsq / reporting_vq only when their
    feature was negotiated (absent queues take no index);
  * page numbers: le32 PFNs of 4 KiB pages, at most 256 per buffer, one
    device-readable buffer per request, and it waits for each to be used;
    then it writes config `actual`;
  * stats: one device-readable buffer of 10-byte entries, made available
    (and kicked) before DRIVER_OK; whenever the device uses it, the driver
    refills it with fresh values and makes it available again;
  * free page reporting: device-writable descriptors naming free ranges.
"""

from __future__ import annotations

import struct
from types import SimpleNamespace

from tests.harness.driver import (
    MSI_ADDRESS, STATUS_ACKNOWLEDGE, STATUS_DRIVER, STATUS_DRIVER_OK, STATUS_FAILED, DeviceTimeoutError,
    Harness, HarnessError, VirtioPciDriver)

PAGE = 4096
PFNS_MAX = 256     # VIRTIO_BALLOON_ARRAY_PFNS_MAX
F_MUST_TELL_HOST, F_STATS_VQ, F_DEFLATE_ON_OOM, F_FREE_PAGE_HINT, F_PAGE_POISON, F_PAGE_REPORTING = range(6)
WANTED = (1 << F_STATS_VQ) | (1 << F_DEFLATE_ON_OOM) | (1 << F_PAGE_REPORTING)
STAT = struct.Struct("<HQ")
# tags (5.5.6.3)
S_SWAP_IN, S_SWAP_OUT, S_MAJFLT, S_MINFLT, S_MEMFREE, S_MEMTOT, S_AVAIL, S_CACHES = range(8)
S_HTLB_PGALLOC, S_HTLB_PGFAIL = 8, 9
STATS_SLOTS = 10


def balloon_spec(slot: int = 3, options: list[str] | None = None, *, function: int = 0,
                 bus_only: bool = False):
    """The DeviceSpec vmmd builds for `-s SLOT,virtio-balloon[,OPTIONS]` (vmmd's own code)."""
    from vmmd.machine import Machine
    fake_machine = SimpleNamespace(cfg=SimpleNamespace(bus_mode="bus-only" if bus_only else "fast"))
    slot_cfg = SimpleNamespace(slot=slot, function=function, device="virtio-balloon",
                               args=list(options or []))
    return Machine._virtio_balloon_spec(fake_machine, slot_cfg)


class VirtioBalloon:
    def __init__(self, harness: Harness, slot: int, function: int = 0, *, features: int = WANTED,
                 stats: dict[int, int] | None = None, timeout: float = 10.0, probe: bool = True):
        self.h = harness
        self.mem = harness.memory
        self.drv = VirtioPciDriver(harness, slot, function, timeout=timeout)
        self.timeout = timeout
        self.want = features
        self.stats_values = dict(stats or {S_MEMTOT: 64 << 20, S_MEMFREE: 32 << 20})
        self.ballooned: list[int] = []      # PFNs in the balloon, as the driver sees them
        self._buf = None
        self._stats_buf = None
        if probe:
            self.drv.probe()
            self.init()

    # -- initialisation (what virtballoon_probe does) ------------------------------------------
    def init(self) -> None:
        d = self.drv
        if d.msix_cap is not None and not d.msi_data_base:
            d.enable_msix()
        d.reset()
        d.set_status(STATUS_ACKNOWLEDGE)
        d.set_status(STATUS_DRIVER)
        d.negotiate(self.want)
        self.q = {"inflate": 0, "deflate": 1}
        n = 2
        if d.has(F_STATS_VQ):
            self.q["stats"] = n
            n += 1
        if d.has(F_PAGE_REPORTING):
            self.q["reporting"] = n
            n += 1
        d.setup_queues(n)
        if self._buf is None:
            self._buf = self.h.allocator.alloc(PFNS_MAX * 4, 64)
            self._stats_buf = self.h.allocator.alloc(STAT.size * STATS_SLOTS, 64)
        self.stats_token = None
        if "stats" in self.q:   # Linux adds the first stats buffer before DRIVER_OK
            self._give_stats()
        d.set_status(STATUS_DRIVER_OK)
        if d.status & STATUS_FAILED or not d.status & STATUS_DRIVER_OK:
            raise HarnessError(f"device refused DRIVER_OK (status {d.status:#x})")
        self.ballooned = []

    # -- config -------------------------------------------------------------------------------------
    def config(self) -> tuple[int, int]:
        """(num_pages, actual)."""
        raw = self.drv.device_cfg_bytes(0, 8)
        return struct.unpack("<II", raw)

    @property
    def target(self) -> int:
        return self.config()[0]

    @property
    def actual(self) -> int:
        return self.config()[1]

    def write_actual(self, n: int) -> None:
        self.drv.vm.guest_mmio_write(self.drv.cap_addr(4, 4), 4, n)

    def write_poison(self, v: int) -> None:
        """Config poison_val (Linux writes it at probe). Read back: a posted bus
        write is not ordered against a later ioeventfd kick."""
        self.drv.vm.guest_mmio_write(self.drv.cap_addr(4, 12), 4, v)
        self.drv.device_cfg_read(12, 4)

    # -- pages --------------------------------------------------------------------------------------
    def alloc_pages(self, n: int, touch: bool = True) -> list[int]:
        """n guest pages (PFNs) nobody else uses; touched (written) like used memory."""
        gpa = self.h.allocator.alloc(n * PAGE, PAGE)
        if touch:
            for i in range(n):
                self.mem.write(gpa + i * PAGE, b"\xA5" * 64)
        return [(gpa >> 12) + i for i in range(n)]

    def _send_pfns(self, queue: str, pfns: list[int]) -> None:
        q = self.q[queue]
        for i in range(0, len(pfns), PFNS_MAX):
            chunk = pfns[i:i + PFNS_MAX]
            self.mem.write(self._buf, struct.pack(f"<{len(chunk)}I", *chunk))
            token = self.drv.submit(q, [(self._buf, 4 * len(chunk))], [])
            self.drv.wait(q, token, self.timeout)

    def send_raw(self, queue: str, payload: bytes) -> None:
        """Any bytes as one inflate/deflate buffer (hostile tests)."""
        q = self.q[queue]
        gpa = self._buf if len(payload) <= PFNS_MAX * 4 else self.h.allocator.alloc(len(payload), 64)
        self.mem.write(gpa, payload)
        self.drv.wait(q, self.drv.submit(q, [(gpa, len(payload))], []), self.timeout)

    def inflate(self, pfns: list[int], *, tell_actual: bool = True) -> None:
        self._send_pfns("inflate", pfns)
        self.ballooned += pfns
        if tell_actual:
            self.write_actual(len(self.ballooned))

    def deflate(self, pfns: list[int], *, tell_actual: bool = True) -> None:
        self._send_pfns("deflate", pfns)
        gone = set(pfns)
        self.ballooned = [p for p in self.ballooned if p not in gone]
        if tell_actual:
            self.write_actual(len(self.ballooned))

    def follow_target(self, pool: list[int]) -> None:
        """What the balloon worker does after a config change: move toward num_pages."""
        diff = self.target - len(self.ballooned)
        if diff > 0:
            free = [p for p in pool if p not in set(self.ballooned)]
            self.inflate(free[:diff])
        elif diff < 0:
            self.deflate(self.ballooned[diff:])

    # -- stats --------------------------------------------------------------------------------------
    def _give_stats(self) -> None:
        payload = b"".join(STAT.pack(t, v) for t, v in self.stats_values.items())
        self.mem.write(self._stats_buf, payload)
        self.stats_token = self.drv.submit(self.q["stats"], [(self._stats_buf, len(payload))], [])

    def stats_requested(self) -> bool:
        """Has the device used our stats buffer (asking for fresh stats)?"""
        q = self.q["stats"]
        self.drv.poll_used(q)
        return self.stats_token in self.drv.done[q]

    def serve_stats(self, values: dict[int, int] | None = None, timeout: float | None = None) -> None:
        """Wait for the device to ask, then answer with `values` (stats_request in Linux)."""
        q = self.q["stats"]
        self.drv.wait(q, self.stats_token, timeout or self.timeout)
        if values is not None:
            self.stats_values = dict(values)
        self._give_stats()

    # -- free page reporting --------------------------------------------------------------------------
    def report(self, ranges: list[tuple[int, int]]) -> int:
        """Report free (gpa, length) ranges; returns the bytes the device says it wrote (0)."""
        q = self.q["reporting"]
        token = self.drv.submit(q, [], list(ranges))
        return self.drv.wait(q, token, self.timeout)[token]

    def wait_config_change(self, seen: int, timeout: float | None = None) -> int:
        """Wait for a config interrupt after `seen` (config_interrupts() before)."""
        d = self.drv
        if not d.vm.wait_msi(MSI_ADDRESS, d.msi_data(0), seen, timeout or self.timeout):
            raise DeviceTimeoutError("no config interrupt")
        return d.config_interrupts()
