"""The virtio-balloon device (virtio 1.2, 5.5) with host reclaim on the memfd.

Options: {"args": [OPTION, ...]} from the slot `-s N,virtio-balloon[,OPTIONS]`:

    stats_interval=S       seconds between stats requests (default 5; 0: only on request)
    deflate_on_oom=off     do not offer DEFLATE_ON_OOM
    reporting=off          do not offer FREE_PAGE_REPORTING
    must_tell_host=on      offer MUST_TELL_HOST
    queue_size=N           a power of 2 in 4..1024 (default 256)

Features offered: STATS_VQ, DEFLATE_ON_OOM, PAGE_POISON, PAGE_REPORTING
(and MUST_TELL_HOST on request). FREE_PAGE_HINT is not offered.

Queues. The device has four: inflateq 0, deflateq 1, then statsq if
STATS_VQ was negotiated, then reporting_vq if PAGE_REPORTING was: a queue
whose feature is not negotiated does not exist and the following ones move
down (that is how Linux's find_vqs numbers them: it skips absent queues
without consuming an index). role() maps an index to its queue once the
features are known.

  inflateq   device-readable arrays of le32 PFNs (4 KiB units). The pages go
             into the ballooned set; each host page that became wholly
             ballooned is punched out of the memfd (backend.Reclaimer).
  deflateq   the same arrays; the pages leave the set. Nothing to do to the
             memory: it refaults as zeroes. Accepted whether or not the host
             asked (DEFLATE_ON_OOM, or a driver going away).
  statsq     device-driven: the driver makes one buffer of 10-byte entries
             available; the device parses it and *keeps* it. To ask for
             fresh stats it returns it (push_used + interrupt), every
             stats_interval seconds or on the "request_stats" control op;
             the driver refills it and makes it available again.
  reporting  free page reporting: each chain lists free page ranges (Linux
             adds them device-writable; readable ones are taken too). Whole
             host pages inside them are punched, then the chain is returned.
             Not punched while the driver set a non-zero poison_val (the
             pages must then read back as the poison, not as zeroes).

Config (struct virtio_balloon_config, 16 bytes): num_pages (vmmd's target,
read-only to the driver), actual (driver-written), free_page_hint_cmd_id
(always 0), poison_val (driver-written, PAGE_POISON).

vmmd talks to the device with CONTROL "device" ops (device_control):
"set" {num_pages?, stats_interval?}, "info", "request_stats", "pages".
"""

from __future__ import annotations

import logging
import struct
import time

from devices.virtio.device import VirtioDevice
from devices.virtio.queue import ChainError
from devices.virtio_balloon import state as bstate
from devices.virtio_balloon.backend import Reclaimer, host_page_size
from devices.virtio_balloon.core import BALLOON_PAGE, BalloonCore, parse_stats

log = logging.getLogger("devices.virtio_balloon")

VIRTIO_ID_BALLOON = 5

# Feature bits (5.5.3)
F_MUST_TELL_HOST = 0
F_STATS_VQ = 1
F_DEFLATE_ON_OOM = 2
F_FREE_PAGE_HINT = 3
F_PAGE_POISON = 4
F_PAGE_REPORTING = 5

FEATURE_NAMES = {F_MUST_TELL_HOST: "MUST_TELL_HOST", F_STATS_VQ: "STATS_VQ",
                 F_DEFLATE_ON_OOM: "DEFLATE_ON_OOM", F_FREE_PAGE_HINT: "FREE_PAGE_HINT",
                 F_PAGE_POISON: "PAGE_POISON", F_PAGE_REPORTING: "PAGE_REPORTING"}

NUM_QUEUES = 4
INFLATE, DEFLATE, STATS, REPORTING = "inflate", "deflate", "stats", "reporting"

CONFIG = struct.Struct("<IIII")   # num_pages, actual, free_page_hint_cmd_id, poison_val
OFF_NUM_PAGES, OFF_ACTUAL, OFF_CMD_ID, OFF_POISON = 0, 4, 8, 12

from devopts import virtio_balloon as balloonopts  # noqa: E402
from devopts.virtio_balloon import DEFAULT_STATS_INTERVAL  # noqa: E402
DEFAULT_QUEUE_SIZE = 256
MAX_PFN_BYTES = 1 << 20      # per chain: 256 Ki page numbers (Linux sends at most 256)
MAX_STATS_BYTES = 4096


def parse_options(options: dict) -> dict:
    """options["args"] -> {stats_interval, deflate_on_oom, reporting, must_tell_host,
    queue_size}, or ValueError (devopts.virtio_balloon, shared with vmmd's check)."""
    if not isinstance(options, dict):
        raise ValueError("virtio-balloon: options must be a map")
    return balloonopts.parse(options.get("args") or [])


def queue_roles(features: int) -> dict[int, str]:
    """Queue index -> role for the negotiated features (absent queues shift down)."""
    roles = [INFLATE, DEFLATE]
    if features >> F_STATS_VQ & 1:
        roles.append(STATS)
    if features >> F_FREE_PAGE_HINT & 1:
        roles.append("free_page")   # never offered; keeps the numbering right
    if features >> F_PAGE_REPORTING & 1:
        roles.append(REPORTING)
    return dict(enumerate(roles))


class VirtioBalloonDevice(VirtioDevice):
    KIND = "virtio_balloon"
    VIRTIO_ID = VIRTIO_ID_BALLOON

    def __init__(self, host, options: dict, *, page_size: int | None = None):
        self.opts = parse_options(options)
        memory = getattr(host, "memory", None)
        if memory is None:
            raise ValueError("virtio-balloon needs guest memory")
        hps = page_size or host_page_size(memory.fd)
        self.core = BalloonCore(memory.layout, hps)
        self.reclaimer = Reclaimer(memory.fd, memory.size)
        self.num_pages = 0
        self.actual = 0
        self.poison_val = 0
        self.stats_interval = self.opts["stats_interval"]
        self.last_stats: dict[str, int] = {}
        self.last_stats_at: float | None = None
        self.stats_head: int | None = None     # the stats buffer we hold
        self._stats_timer = None
        self._roles: dict[int, str] = {}
        self.bcounters = {"bad_chains": 0, "config_writes_ignored": 0, "stats_updates": 0,
                          "stats_requests": 0, "stats_unknown_tags": 0, "stats_trailing_bytes": 0,
                          "reports_skipped_poison": 0, "unrequested_deflates": 0}
        super().__init__(host, options)

    # --- VirtioDevice hooks ------------------------------------------------------------

    def device_features(self) -> int:
        f = (1 << F_STATS_VQ) | (1 << F_PAGE_POISON)
        if self.opts["deflate_on_oom"]:
            f |= 1 << F_DEFLATE_ON_OOM
        if self.opts["reporting"]:
            f |= 1 << F_PAGE_REPORTING
        if self.opts["must_tell_host"]:
            f |= 1 << F_MUST_TELL_HOST
        return f

    def num_queues(self) -> int:
        return NUM_QUEUES

    def queue_max_size(self, q: int) -> int:
        return self.opts["queue_size"]

    def config_size(self) -> int:
        return CONFIG.size

    def config_bytes(self) -> bytes:
        return CONFIG.pack(self.num_pages, self.actual, 0, self.poison_val)

    def config_write(self, offset: int, size: int, value: int) -> None:
        if offset >= OFF_ACTUAL and offset + size <= OFF_ACTUAL + 4:
            field = OFF_ACTUAL
        elif offset >= OFF_POISON and offset + size <= OFF_POISON + 4:
            field = OFF_POISON
        else:   # num_pages and the hint command id are the device's
            self.bcounters["config_writes_ignored"] += 1
            return
        raw = bytearray(self.config_bytes()[field:field + 4])
        shift = offset - field
        raw[shift:shift + size] = value.to_bytes(size, "little")
        v = int.from_bytes(raw, "little")
        if field == OFF_ACTUAL:
            if v != self.actual:
                self.actual = v
                self.host.checkpoint()
        elif v != self.poison_val:
            self.poison_val = v
            self.host.checkpoint()

    def on_driver_ok(self) -> None:
        self._roles = queue_roles(self.features)
        # Linux makes the first stats buffer available (and kicks) before
        # DRIVER_OK, when kicks are not served yet: look at every queue once.
        for q, queue in enumerate(self.queues):
            if queue is not None and q in self._roles and queue.pending():
                self._kick(q)

    def role(self, q: int) -> str | None:
        return self._roles.get(q) if self.transport.driver_ok else None

    def queue_of(self, role: str) -> int | None:
        for q, r in self._roles.items():
            if r == role:
                return q
        return None

    def on_queue_notify(self, q: int, queue) -> None:
        role = self.role(q)
        try:
            if role == INFLATE or role == DEFLATE:
                self._drain(q, queue, self._inflate if role == INFLATE else self._deflate,
                            MAX_PFN_BYTES)
            elif role == STATS:
                self._stats_arrived(q, queue)
            elif role == REPORTING:
                self._drain_reports(q, queue)
        finally:
            self.notify_used(q)

    def _bad_chain(self, exc: ChainError) -> None:
        self.bcounters["bad_chains"] += 1

    def _drain(self, q: int, queue, handle, limit: int) -> None:
        for chain in queue.drain(self._bad_chain):
            if chain.readable_len:
                handle(chain.read_all(self.memory, limit))
            queue.push_used(chain.head, 0)

    def _inflate(self, data: bytes) -> None:
        for offset, length in self.core.inflate(data):
            if self.reclaimer.punch(offset, length):
                self.core.counters["punched_bytes"] += length

    def _deflate(self, data: bytes) -> None:
        n = self.core.deflate(data)
        if n and self.core.count < self.num_pages:
            self.bcounters["unrequested_deflates"] += 1   # DEFLATE_ON_OOM (or a leaving driver)

    def _drain_reports(self, q: int, queue) -> None:
        for chain in queue.drain(self._bad_chain):
            poisoned = self.poison_val != 0 and self.has_feature(F_PAGE_POISON)
            for gpa, n in (*chain.readable, *chain.writable):
                r = self.core.report(gpa, n)
                if r is None:
                    continue
                if poisoned:
                    self.bcounters["reports_skipped_poison"] += 1
                elif self.reclaimer.punch(*r):
                    self.core.counters["punched_bytes"] += r[1]
            queue.push_used(chain.head, 0)

    # --- stats ---------------------------------------------------------------------------

    def _stats_arrived(self, q: int, queue) -> None:
        got = False
        # The device keeps the newest stats buffer (it returns it to ask for fresh stats).
        for chain in queue.drain(self._bad_chain):
            if self.stats_head is not None:   # a second buffer: give the older one back
                queue.push_used(self.stats_head, 0)
            self.stats_head = chain.head
            got = True
            stats, unknown, trailing = parse_stats(chain.read_all(self.memory, MAX_STATS_BYTES))
            self.bcounters["stats_unknown_tags"] += unknown
            self.bcounters["stats_trailing_bytes"] += trailing
            self.last_stats = stats
            self.last_stats_at = time.monotonic()
            self.bcounters["stats_updates"] += 1
        if got:
            self.host.checkpoint()   # stats_head is part of the state

    def request_stats(self) -> bool:
        """Return the held stats buffer so the driver refills it; False if we hold none."""
        q = self.queue_of(STATS)
        if (q is None or self.stats_head is None or self._quiesced or not self.transport.driver_ok
                or self.queues[q] is None):
            return False
        head, self.stats_head = self.stats_head, None
        self.queues[q].push_used(head, 0)
        self.bcounters["stats_requests"] += 1
        self.notify_used(q)
        self.host.checkpoint()
        return True

    def _schedule_stats(self) -> None:
        if self._stats_timer is not None:
            self._stats_timer.cancel()
            self._stats_timer = None
        if self._loop is not None and self.stats_interval > 0 and not self._quiesced:
            self._stats_timer = self._loop.call_later(self.stats_interval, self._stats_tick)

    def _stats_tick(self) -> None:
        self._stats_timer = None
        try:
            self.request_stats()
        except Exception:
            log.exception("stats request failed")
        self._schedule_stats()

    async def start(self) -> None:
        await super().start()
        self._schedule_stats()

    # --- lifecycle -------------------------------------------------------------------------

    def device_reset(self) -> None:
        # The driver is gone: nothing is in the balloon any more, no buffer held.
        self.core.clear()
        self.actual = 0
        self.poison_val = 0
        self.stats_head = None
        self._roles = {}

    def device_quiesce(self) -> None:
        if self._stats_timer is not None:
            self._stats_timer.cancel()
            self._stats_timer = None

    def device_resume(self) -> None:
        self._schedule_stats()

    def device_save(self) -> dict:
        return {"version": bstate.STATE_VERSION, "num_pages": self.num_pages, "actual": self.actual,
                "poison_val": self.poison_val, "stats_interval": self.stats_interval,
                "stats_head": self.stats_head, "pages": self.core.pages,
                "host_page_size": self.core.host_page_size, "ballooned": self.core.packed(),
                "counters": {**self.core.counters, **self.bcounters}}

    def device_restore(self, state: dict) -> None:
        saved = bstate.check_state(state)
        bstate.check_compatible(saved, self.core.pages, self.core.host_page_size)
        self.core.load_packed(saved["ballooned"])   # validates the blob before anything else changes
        self.num_pages, self.actual = saved["num_pages"], saved["actual"]
        self.poison_val = saved["poison_val"]
        self.stats_interval = saved["stats_interval"]
        self.stats_head = saved["stats_head"]
        for k, v in saved["counters"].items():
            if k in self.core.counters:
                self.core.counters[k] = v
            elif k in self.bcounters:
                self.bcounters[k] = v
        self._roles = queue_roles(self.transport.negotiated) if self.transport.driver_ok else {}

    def restore_state(self, state: dict) -> None:
        super().restore_state(state)
        # Keep the held stats buffer only if the restored stats queue really has
        # one chain popped and not used; after a stale checkpoint the base
        # resynchronised the queue from the ring and the buffer will be popped again.
        q = self.queue_of(STATS)
        queue = self.queues[q] if q is not None else None
        if self.stats_head is not None and (
                queue is None or (queue.last_avail_idx - queue.used_idx) & 0xFFFF != 1
                or self.stats_head >= queue.size):
            self.stats_head = None
        self._schedule_stats()

    # --- vmmd's control ops (CONTROL "device") ------------------------------------------------

    def device_control(self, op: str, args: dict):
        if op == "set":
            return self._set(args)
        if op == "info":
            return self.info()
        if op == "request_stats":
            return {"requested": self.request_stats()}
        if op == "pages":
            return {"page_size": BALLOON_PAGE, "ranges": self.core.ballooned_ranges()}
        raise ValueError(f"virtio_balloon: unknown device op {op!r} (set, info, request_stats, pages)")

    def _set(self, args: dict) -> dict:
        if not isinstance(args, dict) or set(args) - {"num_pages", "stats_interval"}:
            raise ValueError("set takes {num_pages?: int, stats_interval?: seconds}")
        num_pages = args.get("num_pages")
        if num_pages is not None and (type(num_pages) is not int or not 0 <= num_pages <= self.core.pages):
            raise ValueError(f"num_pages must be 0..{self.core.pages} (guest RAM), not {num_pages!r}")
        interval = args.get("stats_interval")
        if interval is not None:
            interval = bstate.check_interval(interval)
        if interval is not None and interval != self.stats_interval:
            self.stats_interval = interval
            self._schedule_stats()
            self.host.checkpoint()
        if num_pages is not None and num_pages != self.num_pages:
            self.num_pages = num_pages
            if self.transport.driver_ok:
                self.config_changed()      # generation++, config interrupt, checkpoint
            else:
                self.host.checkpoint()     # the driver reads num_pages when it gets there
        return self.info()

    def info(self) -> dict:
        now = time.monotonic()
        return {
            "target_pages": self.num_pages, "actual_pages": self.actual,
            "ballooned_pages": self.core.count, "page_size": BALLOON_PAGE,
            "host_page_size": self.core.host_page_size,
            "stats": dict(self.last_stats),
            "stats_age_s": None if self.last_stats_at is None else round(now - self.last_stats_at, 3),
            "stats_interval_s": self.stats_interval,
            "reclaimed_bytes": self.core.counters["punched_bytes"],
            "balloon_reclaimed_bytes": self.core.punched_bytes_now,
            "features": [FEATURE_NAMES.get(b, f"bit{b}") for b in FEATURE_NAMES
                         if self.features >> b & 1],
            "driver_ok": self.transport.driver_ok,
            "punch_calls": self.reclaimer.calls, "punch_errors": self.reclaimer.errors,
            **self.core.counters, **self.bcounters,
        }

    # --- DeviceModel ---------------------------------------------------------------------------

    def stats(self) -> dict:
        out = super().stats()
        out["balloon"] = self.info()
        return out

    def close(self) -> None:
        if self._stats_timer is not None:
            self._stats_timer.cancel()
            self._stats_timer = None
        super().close()


DEVICE_MODEL = VirtioBalloonDevice
