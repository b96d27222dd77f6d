"""Device processes: spawn, watch, restart.

vmmd is a child subreaper: a device launcher unshares its namespaces, forks
the real device (pid 1 of a new pid namespace), reports the device's pid on
a status pipe and exits, so vmmd adopts the device and watches it through a
pidfd. An exit is noticed at once (the pidfd becomes readable in the event
loop); the device is restarted with a back-off capped at 2 s, and its last
register checkpoint is restored into the new process. More than
`crash_limit` crashes within its window (default 5 in 60 s) mark the device
failed: no more restarts (its accesses read all-ones at once) until an
operator's device.restart.

A hang is noticed by a heartbeat: every timeout/4 the supervisor sends each
running device CONTROL stats (answered by its serve loop, so a stopped or
wedged device cannot answer) and expects the reply within the rest of the
timeout; the reply is cached for device.stats. Spawns, kills, restores and
heartbeats run on the supervisor's own worker threads, never on the pool
the API's device calls use, so a hung device cannot delay another's restart.

Every event a device sends is authorised (vmmd/authority.py) before it has
any effect; refusals are counted per device and logged at a bounded rate.

Spawning (sandbox on/log): each incarnation gets a cgroup with memory and
pids limits (sandbox.cgroups; the launcher joins it through an fd before it
unshares its cgroup namespace) and the unprivileged host ids it drops to
(sandbox.namespaces). Its stdout and stderr are a pipe vmmd reads
(vmmd.device_log): attributed, cleaned, rate-limited; a device never holds
vmmd's own stderr (a stdio console keeps vmmd's stdout as its console).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import zmq

from bus import endpoint as bus_endpoint
from bus import protocol
from bus.pci_info import PciInfoError, parse_pci_info
from sandbox.cgroups import CgroupLimits
from vmmd.devlink import DeviceSpec, Incarnation, ManagedDevice, close_incarnation
from bus.types import MsgType
from vmmd.pci import fastpath
from vmmd.pci.function import intx_gsi
from vmmd.spawn_jail import JailSetup

log = logging.getLogger(__name__)

_PR_SET_CHILD_SUBREAPER = 36
BACKOFF_DELAYS = (0.1, 0.25, 0.5, 1.0, 2.0)  # capped: a crash costs the guest latency
STABLE_AFTER = 30.0  # a device that ran this long resets its backoff
# A launch that hangs is caught by this; one that fails ends at once (EOF,
# pidfd). Generous: Python's start-up alone takes tens of seconds on slow
# (emulated, nested, loaded) hosts, and the nested lab is one.
SPAWN_TIMEOUT = 120.0
CRASH_LIMIT = (5, 60.0)  # this many crashes within this many seconds: failed, no more restarts
EVENT_BATCH = 256  # events handled per device per loop iteration (a flood cannot starve the loop)
SUPERVISION_WORKERS = 16
SHUTDOWN_TIMEOUT = 10.0  # for a device to sync and close its files before it is killed


def become_subreaper() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")


class SpawnError(RuntimeError):
    pass


class Supervisor:
    def __init__(self, *, loop: asyncio.AbstractEventLoop, rundir: str, memory,
                 iospace, irq_line, on_request, sandbox: str, timeout: float,
                 pci=None, fast_path: bool = True, crash_limit: tuple[int, float] = CRASH_LIMIT,
                 cgroup_limits: dict[str, CgroupLimits] | None = None,
                 device_ids: tuple[int, int] | None = None, spares=None):
        self.loop = loop
        # vmmd.spare_pool.SparePool (vmmd --restore-wait): pre-started processes
        # a spawn takes instead of exec'ing one, while any are left.
        self.spares = spares
        self.rundir = rundir
        self.memory = memory
        self.iospace = iospace
        self.irq_line = irq_line  # callable(gsi, level) on the main loop
        self.on_request = on_request  # callable(device, what, args)
        self.sandbox = sandbox
        self.timeout = timeout
        self.ctx = zmq.Context.instance()
        self.devices: dict[str, ManagedDevice] = {}
        self._restart_tasks: dict[str, asyncio.Task] = {}
        self._stopping = False
        self.pci = pci  # vmmd.pci.bus.PciBus: where PCI functions are registered
        self.fast_path = fast_path  # False: --bus-mode bus-only (no irqfds/ioeventfds)
        self._jail = JailSetup(sandbox, cgroup_limits or {}, device_ids)
        self.crash_limit = crash_limit
        # Supervision's own threads: API calls to a hung device (default
        # executor) cannot hold up a spawn, kill, restore or heartbeat.
        self.workers = ThreadPoolExecutor(SUPERVISION_WORKERS, thread_name_prefix="supervise")
        self._heartbeats: dict[str, asyncio.Task] = {}

    def _work(self, fn, *args):
        return self.loop.run_in_executor(self.workers, fn, *args)

    # -- spawning ----------------------------------------------------------------
    def add(self, spec: DeviceSpec) -> ManagedDevice:
        dev = ManagedDevice(spec, self.timeout, self.sandbox)
        dev.on_failure = lambda d, why: self.loop.call_soon_threadsafe(self._on_failure, d, why)
        if spec.pci is not None:
            # Created once, handed to every incarnation: KVM registrations stay valid.
            if self.fast_path:
                dev.fds = fastpath.create_eventfds(spec.pci)
            if spec.needs_memory:
                try:
                    dev.dirty_log = fastpath.create_dirty_log(self.memory.layout)
                except ImportError as exc:
                    log.warning("device %s: no dirty log (%s)", spec.id, exc)
        self.devices[spec.id] = dev
        return dev

    async def start(self, dev: ManagedDevice) -> None:
        await self.start_all([dev])

    async def start_all(self, devs: list[ManagedDevice]) -> None:
        """Start devices together: their processes boot in parallel (each is a
        Python interpreter and its imports, the slow part of starting a VM),
        then they are attached one at a time, in order. When one fails, the
        others are still attached (stopping the VM stops them) and the first
        failure is raised."""
        spawned = await asyncio.gather(*(self._work(self._spawn_blocking, dev) for dev in devs),
                                       return_exceptions=True)
        failure = None
        for dev, result in zip(devs, spawned):
            if isinstance(result, BaseException):
                failure = failure or result
                continue
            try:
                self._attach(dev, *result)
                if dev.spec.pci is not None and self.pci is not None:
                    await self._work(self._attach_pci, dev)
                if dev.spec.id not in self._heartbeats:
                    self._heartbeats[dev.spec.id] = self.loop.create_task(self._heartbeat(dev))
            except Exception as exc:
                failure = failure or exc
        if failure is not None:
            raise failure

    def _attach_pci(self, dev: ManagedDevice) -> None:
        """First incarnation: put the function on the bus. Later ones: their
        restored registers (BARs, COMMAND, MSI-X control) re-derive the routing."""
        f = getattr(dev, "pci_function", None)
        if f is None:
            info = dev.pci_info
            gsi = intx_gsi(dev.spec.slot, info.intx_pin) if info.intx_pin else None
            dev.pci_function = self.pci.add(dev.spec.slot, dev.spec.function, dev, info, fds=dev.fds,
                                            intx_gsi=gsi, name=dev.spec.id)
        self.pci.refresh(dev)

    def validate_hello(self, dev: ManagedDevice, hello) -> str:
        """Why a HELLO is refused ("" to accept); parses and keeps info["pci"]."""
        expect = dev.spec.pci
        if expect is None:
            return ""
        if hello.ranges and not expect.fixed_ranges:
            return "a PCI device declares no fixed ranges (its BARs place it)"
        try:
            info = parse_pci_info(hello.info.get("pci"))
        except PciInfoError as exc:
            return f"bad PCI declaration: {exc}"
        if info.vectors != expect.vectors or info.queues != expect.queues:
            return (f"PCI declaration has {info.vectors} MSI-X vectors and {info.queues} queues, "
                    f"vmmd expects {expect.vectors} and {expect.queues}")
        if bool(info.intx_pin) != expect.intx:
            return f"PCI declaration has intx_pin {info.intx_pin}, vmmd expects {'one' if expect.intx else 'none'}"
        want_gsi = dev.spec.options.get("intx_gsi")
        if info.intx_pin and want_gsi is not None and intx_gsi(dev.spec.slot, info.intx_pin) != want_gsi:
            return f"INTx pin {info.intx_pin} does not route to GSI {want_gsi} in slot {dev.spec.slot}"
        if dev.pci_info is not None and info != dev.pci_info:
            return "PCI declaration differs from the device's first incarnation"
        dev.pci_info = info
        return ""

    def _bootstrap(self, dev: ManagedDevice, gen: int, channel, pass_fds: list[int]) -> dict:
        spec = dev.spec
        mem = self.memory if spec.needs_memory else None
        return {
            "id": spec.id, "kind": spec.kind,
            "req": channel.req_endpoint, "evt": channel.evt_endpoint,
            "mem_fd": mem.fd if mem else None,
            "layout": mem.layout.to_wire() if mem else None,
            "sandbox": self.sandbox, "options": spec.options,
            "generation": gen,
        }

    def command(self, spec: DeviceSpec, boot: dict) -> list[str]:
        """The device program's argv (tests override it to run a fake model)."""
        return [sys.executable, "-m", f"devices.{spec.kind}", "--bootstrap", json.dumps(boot)]

    def _spawn_blocking(self, dev: ManagedDevice):
        """Start one incarnation and complete its handshake (runs in a worker thread)."""
        spec = dev.spec
        gen = dev.generation + 1
        channel = bus_endpoint.VmmChannel(self.ctx, self.rundir, spec.id, gen)
        status_r, status_w = os.pipe()
        life_r, life_w = os.pipe2(os.O_CLOEXEC)  # vmmd keeps the write end open until it exits
        pass_fds = [status_w, life_r]
        if spec.needs_memory:
            pass_fds.append(self.memory.fd)
        boot = self._bootstrap(dev, gen, channel, pass_fds)
        boot["status_fd"] = status_w
        boot["fds"] = {"lifeline": life_r, **dev.fds}
        pass_fds.extend(dev.fds.values())
        if dev.dirty_log is not None:
            boot["fds"]["dirty_log"] = dev.dirty_log.fd
            pass_fds.append(dev.dirty_log.fd)
        guest_memory = self.memory.size if spec.needs_memory and self.memory else 0
        spare = self._take_spare(spec)
        base_boot, base_fds = boot, pass_fds
        while True:
            adopt = None
            if spare is not None and spare.cgroup is not None:
                adopt = (spare.take_cgroup(), spare.cgroups)
            jail = self._jail.prepare(spec, gen, guest_memory, adopt=adopt)
            boot = {**base_boot, **jail.bootstrap}
            pass_fds = base_fds + jail.pass_fds
            try:
                if spare is not None:
                    proc = self._hand_over(spare, spec, boot, pass_fds, jail.log_w)
                else:
                    proc = subprocess.Popen(
                        self.command(spec, boot), pass_fds=pass_fds,
                        stdin=None if spec.stdio else subprocess.DEVNULL,
                        stdout=None if spec.stdio else jail.log_w,
                        stderr=jail.log_w,
                        close_fds=True)
                break
            except OSError as exc:
                jail.spawned()
                if spare is not None:  # it died waiting: the next spare, or a cold start
                    log.warning("device %s: spare process pid %d gone (%s)", spec.id, spare.proc.pid, exc)
                    spare.discard()
                    jail.release()
                    spare = self._take_spare(spec)
                    continue
                for fd in (status_r, status_w, life_r, life_w):
                    os.close(fd)
                jail.release()
                channel.close()
                raise SpawnError(f"cannot start device {spec.id}: {exc}") from exc
        os.close(status_w)
        os.close(life_r)
        jail.spawned()  # our copies of what only the launcher needs

        try:
            pid = self._read_pid(status_r, proc)
        except SpawnError:
            jail.release()
            raise
        finally:
            os.close(status_r)
        if pid != proc.pid:
            proc.wait()  # the launcher exits once it reported the device's pid
        else:
            proc.returncode = 0  # no launcher (sandbox off): we reap it via its pidfd
        try:
            jail.finish_adopt()  # a spare's cgroup: limits and name, while the device sets up
        except (OSError, ValueError) as exc:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            self._reap(pid)
            jail.release()
            channel.close()
            os.close(life_w)
            raise SpawnError(f"device {spec.id}: cannot give it its cgroup limits: {exc}") from exc
        pidfd = os.pidfd_open(pid)
        inc = Incarnation(gen, pid, pidfd, channel, lifeline=life_w)
        self._jail.track(inc, jail)
        channel.on_refusal = dev.refuse
        try:
            hello = channel.handshake(SPAWN_TIMEOUT, pidfd, validate=lambda h: self.validate_hello(dev, h))
        except Exception as exc:
            self._kill_and_reap(inc)
            close_incarnation(inc)
            log.error("device %s rejected at its handshake: %s", spec.id, exc)
            raise SpawnError(f"device {spec.id} did not complete its handshake: {exc}") from exc
        pending = dev.journal.begin(gen)
        channel.journal = dev.journal
        restored = True
        if dev.last_checkpoint is not None:
            # The state travels over the bus (msgpack), not in the JSON bootstrap.
            try:
                channel.control("restore", {"state": dev.last_checkpoint}, self.timeout, pidfd)
            except Exception as exc:
                restored = False
                log.error("device %s: restoring its last state failed (%s); it starts fresh", spec.id, exc)
        if restored:
            try:
                self._replay(dev, inc, pending)
            except Exception as exc:
                dev.journal.put_back(pending)
                self._kill_and_reap(inc)
                close_incarnation(inc)
                raise SpawnError(f"device {spec.id} failed while its accesses were replayed: {exc}") from exc
        return inc, hello

    def _take_spare(self, spec: DeviceSpec):
        """A pre-started process (devices/spare.py) for this device, or None (start it cold)."""
        from devices.spare import KINDS
        if self.spares is None or spec.kind not in KINDS:
            return None
        # A spare already in its namespaces was isolated for a sandbox, with the default ids.
        return self.spares.take(isolated_ok=self.sandbox in ("on", "log") and self._jail.device_ids is None)

    @staticmethod
    def _hand_over(spare, spec: DeviceSpec, boot: dict, pass_fds: list[int], log_w: int):
        """The spare gets this incarnation's bootstrap and exactly the fds the cold
        Popen would pass, with the same stdio; OSError if it is gone."""
        devnull = None
        try:
            if spec.stdio:
                stdio = (0, 1, log_w)
            else:
                devnull = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
                stdio = (devnull, log_w, log_w)
            return spare.hand_over(spec.kind, json.dumps(boot), pass_fds, stdio)
        finally:
            if devnull is not None:
                os.close(devnull)

    def _replay(self, dev: ManagedDevice, inc: Incarnation, pending) -> None:
        """Into a successor restored from the last checkpoint: the guest's
        accesses sent after it (vmmd/access_journal.py), before the guest
        touches the device again; read values are discarded."""
        if pending is None:
            log.warning("device %s: more accesses since its last checkpoint than the journal keeps; "
                        "restored from the checkpoint alone", dev.spec.id)
            return
        channel = inc.channel
        for a in pending:
            if a.is_read:
                channel.read(a.space, a.addr, a.size, self.timeout, inc.pidfd)
            else:
                channel.write(a.space, a.addr, a.size, a.value, self.timeout, inc.pidfd)
        if pending:
            log.info("device %s: replayed %d accesses made after its last checkpoint", dev.spec.id, len(pending))

    @staticmethod
    def _read_pid(fd: int, proc: subprocess.Popen) -> int:
        buf = b""
        deadline = time.monotonic() + SPAWN_TIMEOUT
        import select
        while b"\n" not in buf:
            left = deadline - time.monotonic()
            if left <= 0:
                proc.kill()
                raise SpawnError("device launcher did not report a pid")
            r, _, _ = select.select([fd], [], [], left)
            if not r:
                continue
            chunk = os.read(fd, 64)
            if not chunk:
                proc.wait()
                raise SpawnError(f"device launcher exited with status {proc.returncode} before reporting a pid")
            buf += chunk
        line = buf.split(b"\n", 1)[0].decode(errors="replace")
        if not line.startswith("PID ") or not line[4:].isdigit():
            raise SpawnError(f"device launcher said {line!r}")
        return int(line[4:])

    def _attach(self, dev: ManagedDevice, inc: Incarnation, hello) -> None:
        """Install a new incarnation: ranges, event reader, exit watch."""
        ranges = list(hello.ranges)
        if ranges != dev.ranges:
            self.iospace.remove_owner(dev)
            for r in ranges:
                self.iospace.add(r, dev, dev.spec.id)
            dev.ranges = ranges
        dev.generation = inc.generation
        dev.set_current(inc, "running")
        self._jail.read_logs(self.loop, dev, inc)
        sock = inc.channel.evt_socket
        self.loop.add_reader(sock.getsockopt(zmq.FD), self._drain_events, dev, inc)
        self.loop.add_reader(inc.pidfd, self._on_exit, dev, inc)
        log.info("device %s (%s) running as pid %d, generation %d", dev.spec.id, dev.spec.kind,
                 inc.pid, inc.generation)
        self._drain_events(dev, inc)  # events queued before the reader existed

    # -- events from devices ---------------------------------------------------
    def _drain_events(self, dev: ManagedDevice, inc: Incarnation) -> None:
        sock = inc.channel.evt_socket
        if dev.current is not inc:
            return  # a call_soon that outlived its incarnation
        # The zmq FD is edge-triggered: read until EVENTS says nothing is left.
        for _ in range(EVENT_BATCH):
            try:
                if not sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                    return
                frame = sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            except zmq.ZMQError:
                return  # socket closed under us by a restart
            if len(frame) > dev.spec.max_state and protocol.frame_type(frame) == MsgType.CHECKPOINT:
                dev.refuse("state_size", "a checkpoint of %d bytes (limit %d)", len(frame), dev.spec.max_state)
                continue
            try:
                msg = inc.channel.decode_event(frame)
            except protocol.ProtocolError as exc:
                dev.refuse("malformed", "a bad event: %s", exc)
                continue
            self._handle_event(dev, msg)
        # Still more: come back on the next loop iteration instead of starving it.
        self.loop.call_soon(self._drain_events, dev, inc)

    def _handle_event(self, dev: ManagedDevice, msg) -> None:
        """Authorise one event against what `dev` owns (vmmd/authority.py), then act."""
        t = type(msg)
        if t is protocol.Vector:
            f = dev.pci_function
            if f is None or f.msix is None or not 0 <= msg.vector < f.msix.vectors:
                dev.refuse("vector", "vector %d is not one of its MSI-X vectors (%d)", msg.vector,
                           0 if f is None or f.msix is None else f.msix.vectors)
                return
            f.fire_vector(msg.vector)
        elif t is protocol.IrqLine:
            if msg.gsi not in dev.spec.allowed_gsis:
                dev.refuse("irq_line", "GSI %d is not its interrupt line", msg.gsi)
                return
            self.irq_line(msg.gsi, msg.level)
        elif t is protocol.Msi:
            # vmmd builds every MSI from its own MSI-X table (VECTOR); a raw
            # address/data pair could carry INIT, SMI or NMI, or hit any vCPU.
            dev.refuse("msi", "a raw MSI %#x/%#x (devices fire their MSI-X vectors by index)",
                       msg.address, msg.data)
        elif t is protocol.Checkpoint:
            # Events are read only from the current incarnation (_drain_events).
            why = dev.journal.acknowledge(dev.generation, msg.applied)
            if why:
                dev.refuse("checkpoint", "a checkpoint: %s", why)
                return
            dev.last_checkpoint = msg.state
        elif t is protocol.Request:
            why = self._request_refusal(dev, msg.what)
            if why:
                dev.refuse("request", "%s request: %s", msg.what, why)
                return
            self.on_request(dev, msg.what, msg.args)
        elif t is protocol.Log:
            level = msg.level if msg.level in (10, 20, 30, 40, 50) else logging.INFO
            self._jail.limiter(dev.spec.id).emit(level, msg.text)
        elif t is protocol.Error:
            self._jail.limiter(dev.spec.id).emit(logging.ERROR, f"error {msg.code}: {msg.text}")
        else:
            dev.refuse("unexpected", "%s on its event channel", t.__name__)

    @staticmethod
    def _request_refusal(dev: ManagedDevice, what: str) -> str:
        """Why a VM-level request from `dev` is refused ("" to honour it)."""
        if what == "reset":
            if dev.reset_watch is None:
                return f"a {dev.spec.kind} device owns no reset port"
            if not dev.reset_watch.take_permit():
                return "the guest wrote no reset command to a reset port"
            return ""
        if what == "quit":
            if not dev.spec.stdio:
                return "no console of this device is attached to vmmd's stdio"
            return ""
        return "unknown request"

    # -- exits and restarts --------------------------------------------------
    def _detach(self, inc: Incarnation) -> None:
        try:
            self.loop.remove_reader(inc.channel.evt_socket.getsockopt(zmq.FD))
        except (zmq.ZMQError, ValueError, OSError):
            pass
        try:
            self.loop.remove_reader(inc.pidfd)
        except (ValueError, OSError):
            pass

    def _on_exit(self, dev: ManagedDevice, inc: Incarnation) -> None:
        self._detach(inc)
        status = self._reap(inc.pid)
        self._jail.release(inc)
        if dev.current is inc:
            dev.last_exit = status
            if self._stopping or dev.state == "stopped":
                dev.set_current(None, "stopped")
            else:
                dev.set_current(None, "crashed")
                log.error("device %s (pid %d) exited: %s", dev.spec.id, inc.pid, status)
                self._schedule_restart(dev, time.monotonic() - inc.started)
        close_incarnation(inc)

    @staticmethod
    def _reap(pid: int) -> str:
        try:
            _, status = os.waitpid(pid, 0)
        except ChildProcessError:
            return "exited (status unknown)"
        if os.WIFSIGNALED(status):
            sig = os.WTERMSIG(status)
            try:
                name = signal.Signals(sig).name
            except ValueError:
                name = str(sig)
            return f"killed by {name}"
        return f"exit status {os.WEXITSTATUS(status)}"

    def _on_failure(self, dev: ManagedDevice, why: str) -> None:
        # A hung or misbehaving device is killed; its exit triggers the restart.
        inc = dev.current
        if inc is not None:
            try:
                os.kill(inc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def _schedule_restart(self, dev: ManagedDevice, ran_for: float) -> None:
        now = time.monotonic()
        limit, window = self.crash_limit
        dev.crash_times = [t for t in dev.crash_times if now - t < window] + [now]
        if len(dev.crash_times) > limit:
            dev.state = "failed"
            log.error("device %s crashed %d times within %gs: marked failed, not restarted "
                      "(its accesses read all-ones; device.restart revives it)",
                      dev.spec.id, len(dev.crash_times), window)
            return
        if ran_for > STABLE_AFTER:
            dev.failures = 0
        delay = BACKOFF_DELAYS[min(dev.failures, len(BACKOFF_DELAYS) - 1)]
        dev.failures += 1
        task = self.loop.create_task(self._restart_after(dev, delay))
        self._restart_tasks[dev.spec.id] = task

    async def _restart_after(self, dev: ManagedDevice, delay: float) -> None:
        await asyncio.sleep(delay)
        if self._stopping or dev.state != "crashed":
            return
        dev.state = "restarting"
        try:
            await self.start(dev)
        except SpawnError as exc:
            log.error("%s", exc)
            dev.state = "crashed"
            self._schedule_restart(dev, 0.0)
            return
        dev.restarts += 1
        log.info("device %s restarted (restart #%d)", dev.spec.id, dev.restarts)

    # -- liveness ------------------------------------------------------------------
    async def _heartbeat(self, dev: ManagedDevice) -> None:
        """Every timeout/4, a CONTROL stats the device's serve loop must answer
        within the rest of the timeout: a hang is noticed within --device-timeout
        even on a device only the fast path (ioeventfd/irqfd) uses."""
        period = self.timeout / 4
        while not self._stopping:
            await asyncio.sleep(period)
            inc = dev.current
            if inc is None or dev.state != "running":
                continue
            try:
                stats = await self._work(self._ping, dev, inc, self.timeout - period)
            except Exception as exc:  # never let the loop die
                log.error("device %s: heartbeat failed: %s", dev.spec.id, exc)
                continue
            if stats is not None and dev.current is inc:
                dev.stats_cache, dev.stats_at = stats, time.monotonic()
                dev.heartbeats += 1

    @staticmethod
    def _ping(dev: ManagedDevice, inc: Incarnation, timeout: float):
        try:
            result = inc.channel.control("stats", {}, timeout, inc.pidfd)
        except bus_endpoint.DeviceTimeout:
            dev._failed(inc, f"no heartbeat reply within {timeout:.2f}s")
            return None
        except bus_endpoint.DeviceControlError as exc:
            return {"error": str(exc)}  # alive, but its stats failed
        except protocol.ProtocolError as exc:
            dev._failed(inc, f"bad reply: {exc}")  # as a vCPU's read would
            return None
        except bus_endpoint.ChannelError:
            return None  # gone: the exit is handled by the pidfd watch
        return result if type(result) is dict else {"stats": result}

    async def restart(self, dev: ManagedDevice) -> None:
        """Operator restart: save the device's state, replace its process, restore.

        The caller pauses the vCPUs around this, so no guest access is lost.
        """
        task = self._restart_tasks.pop(dev.spec.id, None)
        if task:
            task.cancel()
        dev.crash_times = []  # an operator's restart revives a failed device
        dev.failures = 0
        inc = dev.current
        if inc is not None and dev.state == "running":
            try:
                dev.last_checkpoint = await self._work(dev.control, "save")
                dev.journal.acknowledge_all(inc.generation)   # the vCPUs are paused: it covers all
            except Exception as exc:
                log.warning("device %s: no state saved before restart (%s); using its last checkpoint",
                            dev.spec.id, exc)
        if inc is not None:
            dev.set_current(None, "restarting")
            self._detach(inc)
            await self._work(self._kill_and_reap, inc)
            close_incarnation(inc)
        else:
            dev.state = "restarting"
        try:
            await self.start(dev)
        except SpawnError:
            dev.state = "crashed"
            self._schedule_restart(dev, 0.0)
            raise
        dev.restarts += 1

    def _kill_and_reap(self, inc: Incarnation) -> None:
        try:
            os.kill(inc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self._reap(inc.pid)
        self._jail.release(inc)

    def log_stats(self, device_id: str) -> dict:
        """Lines relayed and dropped from a device's stdout/stderr and LOG events."""
        return self._jail.limiter(device_id).stats()

    async def stop_all(self) -> None:
        self._stopping = True
        for task in [*self._restart_tasks.values(), *self._heartbeats.values()]:
            task.cancel()
        await asyncio.gather(*(self._stop(dev) for dev in self.devices.values()))

    async def _stop(self, dev) -> None:
        """Ask a device to close its files, then kill it: a clean close first
        (a disk's image synced and whole), bounded so a stuck or hostile device
        only delays the end, all devices at once."""
        inc = dev.current
        dev.state = "stopped"
        if inc is None:
            return
        try:
            await self._work(inc.channel.control, "shutdown", {}, SHUTDOWN_TIMEOUT, inc.pidfd)
        except Exception:
            pass
        self._detach(inc)
        await self._work(self._kill_and_reap, inc)
        dev.set_current(None, "stopped")
        close_incarnation(inc)

    def close(self) -> None:
        """Release what the devices kept across incarnations (after stop_all)."""
        for dev in self.devices.values():
            dev.close_fds()
        self._jail.close()
        self.workers.shutdown(wait=False, cancel_futures=True)
