"""The source side of a live migration: precopy, then the switchover.

Runs in a worker thread with a blocking socket (RAM moves at socket speed,
hashing and copying release the GIL); the asyncio loop keeps serving
migration.status and migration.cancel. The machine state at the switchover
is saved by the snapshot code (vmmd/snapshot: devices quiesced and saved
concurrently, vCPUs, irqchips, guest time) and sent as the same sections.

Until the destination has said mig-ready and been sent mig-go, any failure
(connection cut, destination gone, cancel, a device dying, timeout) resumes
the source VM where it was; a retry starts over with a full first pass, so
pages already sent or dirty bits consumed cannot be lost.
"""

from __future__ import annotations

import asyncio
import logging
import os
import select
import socket
import ssl
import threading
import time

import numpy as np

from vmmd.kvm import abi
from vmmd.migration import protocol as proto
from vmmd.migration import transport
from vmmd.snapshot import clock, config_io, machine_state
from vmmd.snapshot import create as snapcreate
from vmmd.snapshot import devices as devstate
from vmmd.snapshot import ram as ramio
from vmmd.snapshot import stream

log = logging.getLogger(__name__)
PAGE = ramio.PAGE
SCAN_CHUNK = 64 << 20
# Test hook, off unless set: VMMD_MIGRATION_HOLD=PHASE:PATH holds the switchover
# at PHASE while PATH exists (docs/migration.md, "Test hooks").
HOLD_ENV = "VMMD_MIGRATION_HOLD"
SWITCHOVER_RESERVE_MS = 60.0
HOLD_PHASES = ("paused", "devices_saved", "state_sent", "ready")


class MigrationFailed(Exception):
    pass


class Cancelled(MigrationFailed):
    pass


class Throttle:
    """Auto-converge: keep the vCPUs parked `pct` percent of every period."""

    PERIOD = 0.05

    def __init__(self, control):
        self.control = control
        self.pct = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def set(self, pct: int) -> None:
        self.pct = max(0, min(99, pct))
        if self.pct and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="mig-throttle", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            pct = self.pct
            self.control.pause(1.0)
            self._stop.wait(self.PERIOD * pct / 100)
            self.control.resume()
            self._stop.wait(self.PERIOD * (100 - pct) / 100)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None


class Migration:
    def __init__(self, machine, uri: transport.Uri, *, downtime_ms: float = 300, max_bandwidth_mibs=None,
                 auto_converge: bool = True, timeout_s: float | None = None, tls=None):
        self.m = machine
        self.uri = uri
        self.downtime_ms = float(downtime_ms)
        self.max_bw = max_bandwidth_mibs * (1 << 20) if max_bandwidth_mibs else None
        self.auto_converge = auto_converge
        self.timeout_s = timeout_s if timeout_s is not None else 600.0
        self.tls = tls
        self.loop = machine.loop
        self.sock: socket.socket | None = None
        self.cancel_requested = False
        self.committed = False  # mig-go sent: the destination owns the guest now
        self.status = {"state": "setup", "uri": str(uri), "iteration": 0, "bytes_sent": 0,
                       "ram_bytes_sent": 0, "remaining_dirty_bytes": None, "dirty_rate_mibs": None,
                       "bandwidth_mibs": None, "expected_downtime_ms": None, "downtime_ms": None,
                       "throttle_pct": 0, "total_ms": None, "error": None,
                       "downtime_limit_ms": self.downtime_ms, "kvm_dirty_log": None, "held_at": None}
        self._t0 = time.monotonic()
        self._pass_start_bytes = 0
        self._last_pass_bytes = 0
        self._send_time = 0.0  # seconds spent in sendall: bandwidth = bytes / this
        self._replies = proto.SourceReplies()
        self._rbuf: list[str] = []
        self.throttle = Throttle(machine.control)
        # The part of the downtime that is not RAM (devices saved, vCPU/VM state sent,
        # the destination rebuilding the VM: 35-130 ms measured for 1 GiB guests here),
        # budgeted before the last pass's RAM; never more than half the limit.
        self.reserve_ms = min(SWITCHOVER_RESERVE_MS, self.downtime_ms / 2)
        self.kvm_log = snapcreate.kvm_log_of(machine)  # the tracking one once run() started it
        self._runs = stream.RamRunWriter(proto.MAX_RUN_PAGES)

    # -- I/O ------------------------------------------------------------------------
    def _send(self, data: bytes) -> None:
        if self.cancel_requested and not self.committed:
            raise Cancelled("cancelled")
        t = time.monotonic()
        try:
            self.sock.sendall(data)
            self._send_time += time.monotonic() - t
        except OSError as exc:
            raise MigrationFailed(self._peer_reason(f"connection to the destination lost: {exc}")) from None
        self.status["bytes_sent"] += len(data)
        if self.max_bw:
            ahead = self.status["bytes_sent"] / self.max_bw - (time.monotonic() - self._t0)
            if ahead > 0:
                time.sleep(ahead)

    def _peer_reason(self, default: str) -> str:
        """The destination's mig-error, if it sent one before closing."""
        try:
            self.sock.settimeout(0.5)
            data = self.sock.recv(1 << 16)
            if data:
                self._replies.feed(data)
        except proto.MigrationRefused as exc:
            return str(exc)
        except (OSError, proto.MigrationProtocolError):
            pass
        return default

    def _expect(self, kind: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while kind not in self._rbuf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise MigrationFailed(f"the destination did not send {kind} within {timeout:.0f} s")
            if self.cancel_requested and not self.committed:
                raise Cancelled("cancelled")
            self.sock.settimeout(min(left, 0.2))
            try:
                data = self.sock.recv(1 << 16)
            except socket.timeout:
                continue
            except OSError as exc:
                raise MigrationFailed(f"connection to the destination lost: {exc}") from None
            if not data:
                raise MigrationFailed(f"the destination closed the connection (waiting for {kind})")
            try:
                self._rbuf += self._replies.feed(data)
            except proto.MigrationProtocolError as exc:
                raise MigrationFailed(str(exc)) from None
        self.sock.settimeout(None)

    def _poll(self, kind: str) -> bool:
        """Has the destination sent `kind`? (reads what is there, never waits)"""
        if kind in self._rbuf:
            return True
        self.sock.setblocking(False)
        try:
            data = self.sock.recv(1 << 16)
            if data == b"":
                raise MigrationFailed("the destination closed the connection")
            self._rbuf += self._replies.feed(data)
        except (BlockingIOError, InterruptedError, ssl.SSLWantReadError):
            pass
        except proto.MigrationProtocolError as exc:
            raise MigrationFailed(str(exc)) from None
        except OSError as exc:
            raise MigrationFailed(f"connection to the destination lost: {exc}") from None
        finally:
            self.sock.setblocking(True)
        return kind in self._rbuf

    def _destination_alive(self) -> None:
        """Raise MigrationFailed if the destination closed or broke the connection
        (reads whatever it sent, never waits)."""
        self._poll("")

    def _hold(self, phase: str) -> None:
        """The VMMD_MIGRATION_HOLD test hook: wait at `phase` while its file exists,
        ending early on migration.cancel or when the destination goes away."""
        spec = os.environ.get(HOLD_ENV)
        if not spec:
            return
        at, _, path = spec.partition(":")
        if at not in HOLD_PHASES or not path:
            raise MigrationFailed(f"{HOLD_ENV}={spec!r}: expected PHASE:PATH, PHASE one of {', '.join(HOLD_PHASES)}")
        if at != phase or not os.path.exists(path):
            return
        self.status["held_at"] = phase
        log.warning("migration: switchover held at %s while %s exists (%s)", phase, path, HOLD_ENV)
        try:
            while os.path.exists(path):
                if self.cancel_requested:
                    raise Cancelled("cancelled")
                readable, _, _ = select.select([self.sock], [], [], 0.1)
                if readable:
                    self._destination_alive()
        finally:
            self.status["held_at"] = None

    def _on_loop(self, coro_or_fn, *args):
        if asyncio.iscoroutine(coro_or_fn):
            return asyncio.run_coroutine_threadsafe(coro_or_fn, self.loop).result()
        return coro_or_fn(*args)

    # -- RAM --------------------------------------------------------------------------
    def _send_runs(self, view, base_page: int, mask: np.ndarray, zero_too: bool) -> int:
        """Send the pages of `view` (starting at page base_page) selected by mask:
        non-zero ones as ram-run records, zero ones as ram-zero if zero_too."""
        sent = 0
        nz = ramio.nonzero_pages(view)
        for first, n in ramio.page_runs(mask & nz):
            for f in range(first, first + n, proto.MAX_RUN_PAGES):
                k = min(proto.MAX_RUN_PAGES, first + n - f)
                self._send(self._runs.encode(base_page + f, view[f * PAGE:(f + k) * PAGE]))
                sent += k * PAGE
        if zero_too:
            for first, n in ramio.page_runs(mask & ~nz):
                self._send(proto.ram_zero(base_page + first, n))
        self.status["ram_bytes_sent"] += sent
        return sent

    def _first_pass(self) -> None:
        """Every non-zero page, window by window. In KVM's manual mode each window's
        dirty bits are cleared (its pages write-protected) right before the window's
        data extents are looked up and read: a later write is logged for the next pass."""
        mem = self.m.memory
        npages = mem.size // PAGE
        window = SCAN_CHUNK // PAGE
        everything = np.ones(npages, dtype=bool)
        for w in range(0, npages, window):
            k = min(window, npages - w)
            self.kvm_log.clear(everything, w, k)
            for start, length in ramio.data_extents(mem.fd, (w + k) * PAGE, w * PAGE):  # holes: never touched or ballooned
                self._send_runs(mem._view[start:start + length], start // PAGE,
                                np.ones(length // PAGE, dtype=bool), False)

    def _dirty_pass(self, mask: np.ndarray) -> None:
        """The pages in mask, window by window; in KVM's manual mode the window's
        bits are cleared right before its pages are read (clearing only what is
        about to be sent re-arms write protection chunk by chunk, as QEMU does)."""
        mem = self.m.memory
        window = SCAN_CHUNK // PAGE
        for w in range(0, len(mask), window):
            sub = mask[w:w + window]
            if not sub.any():
                continue
            self.kvm_log.clear(mask, w, len(sub))
            for first, n in ramio.page_runs(sub):
                f = w + first
                self._send_runs(mem._view[f * PAGE:(f + n) * PAGE], f, np.ones(n, dtype=bool), True)

    def _harvest(self) -> np.ndarray:
        try:
            return snapcreate.dirty_mask(self.m, holes=False)
        except Exception as exc:  # a device that cannot sync its dirty log: pages could be missed
            raise MigrationFailed(f"dirty log harvest failed: {exc}") from None

    # -- the whole migration ----------------------------------------------------------
    def run(self) -> None:
        paused = False
        try:
            self.sock = transport.connect(self.uri, self.tls)
            self.sock.settimeout(None)
            self._send(self._replies.hello())
            self._expect("mig-hello", 30)
            m = self.m
            self._send(proto.control("mig-config", {
                "config": config_io.config_to_json(m.cfg, m),
                "memory": {"size": m.memory.size, "page_size": PAGE, "layout": m.memory.layout.to_wire()}}))
            self._expect("mig-accept", 60)
            self.status["state"] = "active"
            # Dirty tracking on and cleared (vCPUs briefly stopped), then the full pass.
            if not m.control.pause(10.0):
                m.control.resume()
                raise MigrationFailed("vCPUs did not stop within 10 s")
            try:
                snapcreate.start_tracking(m, "migration", kvm_chunked=True)
            finally:
                m.control.resume()
            if m.snapshot_base != "migration":
                raise MigrationFailed("dirty logging is unavailable (KVM or a device)")
            self.kvm_log = snapcreate.kvm_log_of(m)
            self.status["kvm_dirty_log"] = self.kvm_log.mode
            m.snapshot_base = None  # no diff snapshot from a migration's logs
            it_start = time.monotonic()
            self._first_pass()
            self._iteration_done(it_start)
            while True:
                t = time.monotonic()
                mask = self._harvest()
                remaining = int(mask.sum()) * PAGE
                elapsed = t - it_start
                bw = (self.status["bandwidth_mibs"] or (self.max_bw or 100 << 20) / (1 << 20)) * (1 << 20)
                rate = remaining / elapsed if elapsed > 0 else 0
                expected_ms = remaining / bw * 1000 + self.reserve_ms
                self.status.update(remaining_dirty_bytes=remaining, dirty_rate_mibs=round(rate / (1 << 20), 2),
                                   expected_downtime_ms=round(expected_ms, 1))
                converged = expected_ms <= self.downtime_ms
                if converged:
                    # Switch over once the destination's device processes run (its
                    # start-up would otherwise count as downtime); until then, pass on.
                    if self._poll("mig-prepared"):
                        break
                    time.sleep(0.01)
                if time.monotonic() - self._t0 > self.timeout_s:
                    raise MigrationFailed(f"did not converge within {self.timeout_s:g} s "
                                          f"({remaining} dirty bytes, expected downtime "
                                          f"{self.status['expected_downtime_ms']} ms > {self.downtime_ms:g} ms)")
                # Not converging: the pass found at least half as many dirty bytes
                # as the previous pass sent (QEMU's criterion) -> throttle harder.
                if (self.auto_converge and not converged and self.status["iteration"] >= 2
                        and remaining >= 0.5 * self._last_pass_bytes):
                    self.throttle.set(self._next_throttle(rate, bw))
                    self.status["throttle_pct"] = self.throttle.pct
                it_start = t
                self._dirty_pass(mask)
                self._iteration_done(it_start)
            # -- switchover -------------------------------------------------------------
            self.status["state"] = "switchover"
            self.throttle.stop()
            t_pause = time.monotonic()
            if not m.control.pause(10.0):
                m.control.resume()
                raise MigrationFailed("vCPUs did not stop within 10 s")
            paused = True
            m.state = "paused"
            marks = [("paused", time.monotonic())]
            self._hold("paused")
            devices = list(m.supervisor.devices.values())
            try:
                states = self._on_loop(devstate.save_devices(devices))
            except Exception as exc:
                raise MigrationFailed(str(exc)) from None
            marks.append(("devices_saved", time.monotonic()))
            self._hold("devices_saved")
            self._dirty_pass(mask | self._harvest())
            marks.append(("last_pass", time.monotonic()))  # the pages found before the pause too
            self._send(proto.control("mig-iter", {"iteration": self.status["iteration"] + 1}))
            kvm = m.kvm
            msrs = kvm.msr_index_list()
            has_xsave = bool(kvm.check_extension(abi.KVM_CAP_XSAVE))
            has_xcrs = bool(kvm.check_extension(abi.KVM_CAP_XCRS))
            vcpu_states = [machine_state.save_vcpu(v, msrs, has_xsave, has_xcrs) for v in m.vcpus]
            self._send(proto.section("vm", "vm", snapcreate.save_vm_section(m)))
            for st in vcpu_states:
                self._send(proto.section("vcpu", str(st["index"]), st))
            for dev, st in zip(devices, states):
                self._send(proto.section("device", devstate.instance_of(dev), st))
            self._send(proto.control("mig-end", {"vcpus": len(vcpu_states)}))
            marks.append(("state_sent", time.monotonic()))
            self._hold("state_sent")
            self._expect("mig-ready", 120)
            marks.append(("ready", time.monotonic()))
            self._hold("ready")
            # The last moment the source can still take the guest back: a destination
            # that died while rebuilding (or after mig-ready) is seen here, not after mig-go.
            self._destination_alive()
            if self.cancel_requested:
                raise Cancelled("cancelled")
            self._send(proto.control("mig-go"))
            self.committed = True
            self._expect("mig-running", 30)
            marks.append(("running", time.monotonic()))
            self.status["switchover_ms"] = {k: round((t - t_pause) * 1000, 1) for k, t in marks}
            downtime = (time.monotonic() - t_pause) * 1000
            self.status.update(state="completed", downtime_ms=round(downtime, 1),
                               total_ms=round((time.monotonic() - self._t0) * 1000, 1))
            log.info("migration to %s completed: downtime %.1f ms, %d iterations, %d bytes",
                     self.uri, downtime, self.status["iteration"], self.status["bytes_sent"])
        except BaseException as exc:
            self.throttle.stop()
            if isinstance(exc, (MigrationFailed, transport.TransportError, proto.MigrationProtocolError)):
                why = str(exc)
            else:
                log.error("migration failed", exc_info=True)
                why = f"{type(exc).__name__}: {exc}"
            self._abort(paused, why)
        finally:
            if self.sock is not None:
                self.sock.close()

    def _next_throttle(self, rate: float, bw: float) -> int:
        """QEMU's ramp (20 %, then +10 % per pass that does not converge), or at once
        what should bring the guest's dirtying under half the bandwidth, if more.
        `rate` (dirty bytes found / pass time) was measured under the current
        throttle and is a lower bound (a working set rewritten within one pass
        counts once), so this never throttles harder than the guest needs."""
        pct = self.throttle.pct
        step = pct + 10 if pct else 20
        unthrottled = rate / max(0.01, 1 - pct / 100)
        need = int(100 * (1 - 0.5 * bw / unthrottled)) + 1 if unthrottled > 0.5 * bw else 0
        return max(step, need)

    def _iteration_done(self, started: float) -> None:
        self._last_pass_bytes = self.status["bytes_sent"] - self._pass_start_bytes
        self._pass_start_bytes = self.status["bytes_sent"]
        # Bandwidth: what a pass achieved end to end (scanning, hashing, sending:
        # what the last pass will take), from passes that moved enough to tell.
        dt = time.monotonic() - started
        if self._last_pass_bytes > (4 << 20) and dt > 0:
            bw = self._last_pass_bytes / dt
            if self.max_bw:
                bw = min(bw, self.max_bw)
            self.status["bandwidth_mibs"] = round(bw / (1 << 20), 2)
        self.status["iteration"] += 1
        self._send(proto.control("mig-iter", {"iteration": self.status["iteration"]}))

    def _abort(self, paused: bool, why: str) -> None:
        cancelled = self.cancel_requested and not self.committed
        if self.committed:
            # mig-go went out but no mig-running came back: the destination may run
            # the guest; running it here too could split it. Stay paused, say so.
            self.status.update(state="failed", error=f"after the switchover: {why}; the source stays "
                                                     f"paused (the destination may be running the guest)")
            log.error("migration: %s", self.status["error"])
            return
        m = self.m
        if paused:  # first: mig-go was never sent, the guest is nowhere else
            self._on_loop(devstate.resume_devices(list(m.supervisor.devices.values()), log))
            clock.kvmclock_ctrl_all(m.vcpus)
            m.control.resume()
            m.state = "running"
        if self.sock is not None:  # records are whole here unless the connection broke anyway
            # Tell the destination why (best effort: it may be slow to read a full
            # socket buffer on a busy host; it gives up either way, with this reason or not).
            try:
                self.sock.settimeout(2.0)
                self.sock.sendall(proto.control("mig-cancel", {"reason": "migration.cancel" if cancelled
                                                               else why[:200]}))
            except OSError:
                pass
        m.snapshot_base = None
        self.status.update(state="cancelled" if cancelled else "failed",
                           error=None if cancelled else why,
                           total_ms=round((time.monotonic() - self._t0) * 1000, 1))
        log.warning("migration to %s %s: %s; the VM runs on here", self.uri,
                    "cancelled" if cancelled else "failed", why)
