"""A virtual machine: KVM objects, guest memory, vCPUs and device processes.

The Machine runs on vmmd's main asyncio loop. vCPU threads and device events
reach it through thread-safe callbacks; everything that changes the VM as a
whole (reset, shutdown, pause) happens here, on the loop.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import tempfile
import time

from bus.types import PROTOCOL_VERSION
from devopts import virtio_blk as blkopts
from devopts import virtio_net as netopts
from vmmd import assists, boot_setup
from vmmd.api.methods import NoSuchDevice, VmStateError
from vmmd.acpi_pm import AcpiSleepControl
from vmmd.authority import DEFAULT_STATE_LIMIT, STATE_LIMITS
from vmmd.chipset import NullPorts, ResetControl
from vmmd.config import ConfigError
from vmmd.devlink import DeviceSpec
from vmmd.pci.bus import PciBus
from vmmd.pci.config_access import ConfigMechanism1
from vmmd.pci.fastpath import PciExpect
from vmmd.pci.function import intx_gsi
from vmmd.guest_memory import GuestMemory
from vmmd.iospace import IoSpaceMap
from vmmd.kvm import Kvm
from vmmd.runcontrol import RunControl, install_kick_handler
from vmmd.supervisor import Supervisor, become_subreaper
from vmmd.vcpu import VcpuEvents, VcpuThread

log = logging.getLogger(__name__)

# ISA interrupt lines the LPC bridge's devices may drive: COM2, COM1, RTC.
LPC_GSIS = frozenset({3, 4, 8})
MAX_BLK_QUEUES = blkopts.MAX_QUEUES


def virtio_blk_queues(args, where: str) -> int:
    """num_queues=N among a virtio-blk slot's arguments (default 1); the device's own
    parser (vmmd.config checked the arguments with it already)."""
    try:
        return blkopts.parse(list(args)).num_queues
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None


class Machine:
    def __init__(self, cfg, memory: GuestMemory | None = None, restore=None, kvm: Kvm | None = None,
                 spares=None):
        self.cfg = cfg
        self.spares = spares  # vmmd.spare_pool.SparePool: pre-started device processes (--restore-wait)
        self.restore_report: dict | None = None  # figures of the restore, once its vCPUs run
        # --restore: a vmmd.snapshot.restore.Prepared (its RAM already loaded into `memory`)
        self.restore_from = restore
        self.snapshot_progress: dict | None = None  # snapshot.create in progress (vm.info)
        self.snapshot_base: str | None = None  # id of the snapshot diffs can be taken from
        self.kvm_dirty = None  # vmmd.snapshot.kvm_dirty.KvmDirtyLog once tracking started
        # vmmd's end of each virtio-blk's fd channel (disk checkpoints: vmmd/disk_overlay.py)
        self.fdpass: dict = {}
        self._restored = False
        self.time_plan = None
        self.state = "created"
        self.exit_code = 0
        self.started_at = time.monotonic()
        self.loop: asyncio.AbstractEventLoop | None = None
        self._done: asyncio.Future | None = None
        self._transition = asyncio.Lock()
        self.kvm = kvm if kvm is not None else Kvm()
        self.memory = memory if memory is not None else GuestMemory.create(cfg.memory)
        self.iospace = IoSpaceMap()
        self.assists = assists.AssistSet(self._assists_enabled())
        self.reset_control = ResetControl(self._vcpu_reset)
        self.acpi_sleep = AcpiSleepControl(self._vcpu_shutdown)  # ACPI S5: guest poweroff
        self.null_ports = NullPorts()
        self.pci = PciBus(self.iospace)
        # 0xCF8-0xCFF: PCI configuration mechanism #1, with reset control at 0xCF9
        self.config_access = ConfigMechanism1(self.pci, self.reset_control)
        for owner in (self.config_access, self.acpi_sleep, self.null_ports):
            for r in owner.RANGES:
                self.iospace.add(r, owner, type(owner).__name__)
        self.vm = None
        self.vcpus = []
        self.threads: list[VcpuThread] = []
        self.control = RunControl()
        self.rundir = tempfile.mkdtemp(prefix="vmmd-")
        self.supervisor: Supervisor | None = None
        self.resets = 0
        from vmmd.migration.control import MigrationControl
        self.migration = MigrationControl(self)  # migration.start/status/cancel

    def _assists_enabled(self) -> bool:
        mode = self.cfg.pvm_assists
        return mode == "on" or (mode == "auto" and assists.host_is_pvm())

    # -- life cycle ------------------------------------------------------------
    async def run(self) -> int:
        """Boot the VM and serve until it ends; returns vmmd's exit code."""
        try:
            await self.start()
            return await self.wait()
        finally:
            await self._teardown()

    async def wait(self) -> int:
        """After start(): until the VM ends; vmmd's exit code. The caller tears down."""
        return await self._done

    async def start(self) -> None:
        """Boot (or restore) the VM up to its vCPUs running. On an exception the
        caller tears down (_teardown) what was started."""
        self.loop = asyncio.get_running_loop()
        self._done = self.loop.create_future()
        install_kick_handler()
        become_subreaper()
        self.supervisor = Supervisor(
            loop=self.loop, rundir=self.rundir, memory=self.memory, iospace=self.iospace,
            irq_line=self._irq_line, on_request=self._device_request,
            sandbox=self.cfg.sandbox, timeout=self.cfg.device_timeout,
            pci=self.pci, fast_path=self.cfg.bus_mode == "fast",
            crash_limit=self.cfg.device_crash_limit, spares=self.spares)
        specs = self._device_specs()
        # Host resources first (a tap that cannot be opened is a usage error,
        # reported before any device process has started).
        host_fds = {spec.id: self._open_net_backend(spec) for spec in specs
                    if spec.kind == "virtio_net"}
        t_dev = time.monotonic()
        devices = []
        for spec in specs:
            spec.max_state = STATE_LIMITS.get(spec.kind, DEFAULT_STATE_LIMIT)
            dev = self.supervisor.add(spec)
            dev.fds.update(host_fds.get(spec.id, {}))
            if spec.kind == "virtio_blk":
                self._add_fdpass(dev)
            devices.append(dev)
        preload = None
        if self.restore_from is not None:
            # start_tracking() (numpy, for KVM's dirty log) runs right before the
            # vCPUs start: import it while the device processes boot instead.
            preload = self.loop.run_in_executor(None, __import__, "vmmd.snapshot.create")
        await self.supervisor.start_all(devices)  # their processes start in parallel
        t_restore = time.monotonic()
        incoming = getattr(self.restore_from, "incoming", None)  # vmmd --incoming
        if incoming is not None:
            await incoming.receive(self)  # RAM and state: overlaps the device start-up above
            t_restore = time.monotonic()
        if self.restore_from is not None:
            from vmmd.snapshot import restore as snaprestore
            await snaprestore.restore_devices(self, self.restore_from.tip)
        t_vm = time.monotonic()
        self._build_vm()
        if self.restore_from is not None:
            await preload
            from vmmd.snapshot import create as snapcreate
            snapcreate.start_tracking(self, self.restore_from.tip.id)
        paused = self.restore_from is not None and (self.restore_from.paused or incoming is not None)
        if paused:
            self.control.pause(0)  # the vCPU threads park before their first KVM_RUN
        self._start_vcpus(keep_control=paused)
        self.state = "paused" if paused else "running"
        if incoming is not None:
            log.info("incoming: device states %.1f ms, KVM state %.1f ms",
                     (t_vm - t_restore) * 1000, (time.monotonic() - t_vm) * 1000)
            await incoming.finish(self)  # mig-ready, wait for mig-go, resume, mig-running
        if self.restore_from is not None:
            t = self.restore_from.timings or {}
            now = time.monotonic()
            main_at = t.get("main_at", now)
            startup = (t_dev - main_at) * 1000 - t.get("verify", 0) - t.get("ram", 0)
            self.restore_report = {
                "total_ms": (now - main_at) * 1000, "checks_ms": t.get("verify", 0),
                "ram_ms": t.get("ram", 0), "setup_ms": startup,
                "devices_started_ms": (t_restore - t_dev) * 1000,
                "device_states_ms": (t_vm - t_restore) * 1000, "kvm_ms": (now - t_vm) * 1000}
            since = t.get("since", "main()")
            log.info("restore: vCPUs started at monotonic %.6f, %.1f ms after %s "
                     "(snapshot checks %.1f ms, RAM %.1f ms, vmmd imports and set-up %.1f ms, "
                     "device processes started in %.1f ms, device states %.1f ms, KVM state %.1f ms)", now,
                     (now - main_at) * 1000, since, t.get("verify", 0), t.get("ram", 0), startup,
                     (t_restore - t_dev) * 1000, (t_vm - t_restore) * 1000, (now - t_vm) * 1000)
        if self.cfg.api_socket:
            # Import the snapshot code off the critical path, so the first
            # snapshot.create does not pay for it with the VM paused (numpy
            # scans its RAM; a restore of a mostly empty guest did without).
            for module in ("vmmd.snapshot.create", "numpy"):
                self.loop.run_in_executor(None, __import__, module)
        self.started_at = time.monotonic()

    def _device_specs(self) -> list[DeviceSpec]:
        specs = []
        for slot in self.cfg.slots:
            if slot.device == "lpc":
                consoles = dict(self.cfg.consoles)
                specs.append(DeviceSpec(
                    id="lpc", kind="lpc", slot=slot.slot, function=slot.function,
                    options={"com1": consoles.get("com1"), "com2": consoles.get("com2"),
                             "memory_low": self.memory.layout.regions[0].size,
                             "memory_high": sum(r.size for r in self.memory.layout.regions[1:])},
                    allowed_gsis=LPC_GSIS,
                    # quit (Ctrl-A x) only from a console the operator attached to stdio
                    stdio="stdio" in consoles.values(),
                    reset_ports=True,
                    # Its ISA bridge function sits at the slot (0:31.0 as in bhyve).
                    pci=PciExpect(vectors=0, queues=0, intx=False, fixed_ranges=True)))
            elif slot.device == "hostbridge":
                continue
            elif slot.device == "virtio-blk":
                specs.append(self._virtio_blk_spec(slot))
            elif slot.device == "virtio-balloon":
                specs.append(self._virtio_balloon_spec(slot))
            elif slot.device == "virtio-net":
                specs.append(self._virtio_net_spec(slot))
            else:
                raise ConfigError(f"device {slot.device!r} is not available yet")
        return specs

    def _virtio_blk_spec(self, slot) -> DeviceSpec:
        where = f"-s {slot.slot}:{slot.function},virtio-blk"
        queues = virtio_blk_queues(slot.args, where)
        gsi = intx_gsi(slot.slot, 1)  # INTA
        suffix = f"-{slot.function}" if slot.function else ""
        return DeviceSpec(
            id=f"virtio-blk{slot.slot}{suffix}", kind="virtio_blk", slot=slot.slot, function=slot.function,
            # The device parses its own arguments and opens the image itself, before its sandbox.
            options={"args": list(slot.args), "path": slot.args[0], "num_queues": queues,
                     "intx_gsi": gsi, "bus_mode": self.cfg.bus_mode,
                     "pci": {"vectors": queues + 1, "queues": queues, "intx_pin": 1}},
            allowed_gsis=frozenset({gsi}), needs_memory=True,
            pci=PciExpect(vectors=queues + 1, queues=queues, intx=True))

    def _add_fdpass(self, dev) -> None:
        """A socket pair per virtio-blk, made before its first incarnation: the
        device keeps its end (bootstrap fd "fdpass"), vmmd sends overlay fds on
        the other (snapshot.create with disks=overlay)."""
        from vmmd.disk_overlay import fdpass_pair
        vmm_end, dev_end = fdpass_pair()
        dev.fds["fdpass"] = dev_end
        self.fdpass[dev.spec.id] = vmm_end

    def _virtio_net_spec(self, slot) -> DeviceSpec:
        """`-s N,virtio-net,tap=NAME|socket=PATH[,mac=..][,...]`: the device parses its
        options; vmmd opens the backend (_open_net_backend) in its own network namespace."""
        import os
        where = f"-s {slot.slot}:{slot.function},virtio-net"
        try:
            opts = netopts.parse(list(slot.args))
        except ValueError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        backends = [[opts.backend, opts.backend_target]]
        macs = [a.split("=", 1)[1] for a in slot.args if a.startswith("mac=")]
        mac = macs[-1] if macs else "52:54:00:" + ":".join(f"{b:02x}" for b in os.urandom(3))
        gsi = intx_gsi(slot.slot, 1)  # INTA
        suffix = f"-{slot.function}" if slot.function else ""
        queues = 3  # receiveq1, transmitq1, controlq
        return DeviceSpec(
            id=f"virtio-net{slot.slot}{suffix}", kind="virtio_net", slot=slot.slot, function=slot.function,
            options={"args": list(slot.args), "mac": mac, "backend": backends[0],
                     "intx_gsi": gsi, "bus_mode": self.cfg.bus_mode},
            allowed_gsis=frozenset({gsi}), needs_memory=True,
            pci=PciExpect(vectors=queues + 1, queues=queues, intx=True))

    @staticmethod
    def _open_net_backend(spec: DeviceSpec) -> dict:
        """The tap (needs CAP_NET_ADMIN) or switch socket, opened in vmmd's network
        namespace and handed to every incarnation as bootstrap fd "tap"/"socket"."""
        from devices.virtio_net.backend import open_host_fds
        try:
            return open_host_fds(spec.options["backend"])
        except (OSError, ValueError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            raise ConfigError(f"{spec.id}: cannot open {'='.join(spec.options['backend'])}: {reason}") from None

    def _virtio_balloon_spec(self, slot) -> DeviceSpec:
        gsi = intx_gsi(slot.slot, 1)  # INTA
        suffix = f"-{slot.function}" if slot.function else ""
        queues = 4  # inflate, deflate, stats, reporting (devices/virtio_balloon/model.py)
        return DeviceSpec(
            id=f"virtio-balloon{slot.slot}{suffix}", kind="virtio_balloon", slot=slot.slot,
            function=slot.function,
            options={"args": list(slot.args), "intx_gsi": gsi, "bus_mode": self.cfg.bus_mode},
            allowed_gsis=frozenset({gsi}), needs_memory=True,
            pci=PciExpect(vectors=queues + 1, queues=queues, intx=True))

    def balloon_device(self):
        """The virtio-balloon's ManagedDevice (JSON-RPC balloon.*), or None."""
        devices = self.supervisor.devices.values() if self.supervisor else ()
        return next((d for d in devices if d.spec.kind == "virtio_balloon"), None)

    def _build_vm(self) -> None:
        """Create the KVM VM, load the guest, set every vCPU's initial state."""
        vm = self.kvm.create_vm()
        boot_setup.create_platform(vm)
        for slot, region in enumerate(self.memory.layout.regions):
            vm.set_user_memory_region(slot, region.gpa, region.size, self.memory.host_address(region))
        self.vm = vm
        self.pci.attach_vm(vm)  # GSI routes, INTx/MSI-X irqfds, BAR windows and ioeventfds
        self.vcpus = [vm.create_vcpu(i) for i in range(self.cfg.cpus)]
        if self.restore_from is not None and not self._restored:
            from vmmd.snapshot import restore as snaprestore
            snaprestore.restore_vm(self, self.restore_from.tip, self.restore_from.clock_mode)
            self._restored = True  # a later guest reset boots the configured guest afresh
            return
        boot_setup.load_guest(self.cfg, self.memory, self.vcpus, self.kvm, self.assists.enabled,
                              pci_irqs=self.pci.pci_irqs(),
                              legacy=any(s.device == "lpc" for s in self.cfg.slots))

    def _start_vcpus(self, keep_control: bool = False) -> None:
        if not keep_control:
            self.control = RunControl()
        events = VcpuEvents(reset=self._vcpu_reset, shutdown=self._vcpu_shutdown, failed=self._vcpu_failed)
        self.threads = [VcpuThread(v, self.iospace, self.control, events, self.assists) for v in self.vcpus]
        for t in self.threads:
            t.start()

    async def _stop_vcpus(self) -> None:
        self.control.stop()
        for t in self.threads:
            await self.loop.run_in_executor(None, t.join, 5.0)
            if t.alive:
                log.error("vcpu%d did not stop", t.index)
        self.threads = []

    def _close_vm(self) -> None:
        for v in self.vcpus:
            v.close()
        self.vcpus = []
        self.pci.detach_vm()
        if self.vm is not None:
            self.vm.close()
            self.vm = None

    async def _teardown(self) -> None:
        await self._stop_vcpus()
        if self.supervisor:
            await self.supervisor.stop_all()
        self._close_vm()
        if self.supervisor:
            self.supervisor.close()
        for sock in self.fdpass.values():
            sock.close()
        self.fdpass.clear()
        shutil.rmtree(self.rundir, ignore_errors=True)

    def _finish(self, code: int) -> None:
        if self._done is not None and not self._done.done():
            self.state = "shutdown"
            self._done.set_result(code)

    # -- callbacks from vCPU threads and devices -------------------------------
    def _vcpu_reset(self, why: str) -> None:
        self.loop.call_soon_threadsafe(self._on_guest_reset, why)

    def _vcpu_shutdown(self, why: str) -> None:
        self.loop.call_soon_threadsafe(self._on_guest_shutdown, why)

    def _vcpu_failed(self, index: int, why: str) -> None:
        self.loop.call_soon_threadsafe(self._on_vcpu_failed, index, why)

    def _on_guest_reset(self, why: str) -> None:
        if self.state in ("shutdown", "resetting"):
            return
        if self.cfg.no_reboot:
            log.info("guest reset (%s): exiting (--no-reboot)", why)
            self._finish(0)
        else:
            log.info("guest reset (%s)", why)
            self.loop.create_task(self.reset())

    def _on_guest_shutdown(self, why: str) -> None:
        log.info("guest shutdown (%s)", why)
        self._finish(0)

    def _on_vcpu_failed(self, index: int, why: str) -> None:
        log.error("vcpu%d stopped the VM: %s", index, why)
        self.exit_code = 1
        self._finish(1)

    def _irq_line(self, gsi: int, level: bool) -> None:
        if self.vm is not None:
            self.vm.irq_line(gsi, 1 if level else 0)

    def _device_request(self, dev, what: str, args: dict) -> None:
        """A request the supervisor authorised (vmmd/authority.py)."""
        if what == "quit":
            log.info("device %s asked to quit", dev.spec.id)
            self._finish(0)
        elif what == "reset":
            self._on_guest_reset(f"reset requested by {dev.spec.id}")
        else:
            log.warning("device %s made an unknown request %r", dev.spec.id, what)

    # -- VmControl (JSON-RPC) ----------------------------------------------------
    def info(self) -> dict:
        return {
            "state": self.state,
            "vcpus": self.cfg.cpus,
            "memory_bytes": self.memory.size,
            "uptime_s": round(time.monotonic() - self.started_at, 3),
            "devices": self.devices(),
            "resets": self.resets,
            "assists": dict(self.assists.counts),
            "protocol": PROTOCOL_VERSION,
            "snapshot": self.snapshot_progress,
            "restored_from": self.restore_from.tip.path if self.restore_from else None,
            "migration": self.migration.status(),
            "restore_time": vars(self.time_plan) if self.time_plan else None,
        }

    def devices(self) -> list[dict]:
        return [d.describe() for d in self.supervisor.devices.values()] if self.supervisor else []

    async def pause(self) -> None:
        self._no_migration("pause")
        async with self._transition:
            if self.state != "running":
                raise VmStateError(f"cannot pause a VM that is {self.state}")
            ok = await self.loop.run_in_executor(None, self.control.pause, 10.0)
            if not ok:
                self.control.resume()
                raise VmStateError("vCPUs did not stop within 10 s")
            self.state = "paused"

    async def resume(self) -> None:
        self._no_migration("resume")
        async with self._transition:
            if self.state != "paused":
                raise VmStateError(f"cannot resume a VM that is {self.state}")
            for v in self.vcpus:
                try:
                    v.kvmclock_ctrl()  # tell the guest it was stopped, not hung
                except OSError:
                    pass  # the guest has not enabled kvm-clock yet
            self.control.resume()
            self.state = "running"

    async def snapshot(self, path: str, resume: bool = True, diff_from: str | None = None,
                       disks: str = "shared", sync: bool = True) -> dict:
        """JSON-RPC snapshot.create (vmmd/snapshot/create.py)."""
        from vmmd.snapshot import create as snapcreate
        from vmmd.snapshot.format import SnapshotError
        self._no_migration("snapshot")
        async with self._transition:
            if self.state not in ("running", "paused"):
                raise VmStateError(f"cannot snapshot a VM that is {self.state}")
            try:
                return await snapcreate.create(self, path, resume, diff_from, disks, sync)
            except (SnapshotError, OSError) as exc:
                raise VmStateError(f"snapshot failed: {exc}") from None
            except Exception as exc:  # a device gone mid-way, ...: the VM is resumed, the directory removed
                log.error("snapshot to %s failed", path, exc_info=True)
                raise VmStateError(f"snapshot failed: {type(exc).__name__}: {exc}") from None
            finally:
                self.snapshot_progress = None

    def _no_migration(self, what: str) -> None:
        if self.migration.active:
            raise VmStateError(f"cannot {what} while a migration is running (migration.cancel first)")

    async def reset(self) -> None:
        async with self._transition:
            if self.state not in ("running", "paused"):
                raise VmStateError(f"cannot reset a VM that is {self.state}")
            self.state = "resetting"
            await self._stop_vcpus()
            self._close_vm()
            self.memory.clear()
            self.snapshot_base, self.kvm_dirty = None, None  # new memslots: no dirty log
            self.acpi_sleep.reset()
            for dev in self.supervisor.devices.values():
                try:
                    await self.loop.run_in_executor(None, dev.control, "reset")
                except Exception as exc:
                    log.warning("device %s reset failed: %s", dev.spec.id, exc)
            self.pci.reset()
            self._build_vm()
            self._start_vcpus()
            self.resets += 1
            self.state = "running"

    async def shutdown(self) -> None:
        if self.state == "shutdown":
            raise VmStateError("the VM is already shut down")
        # Let the JSON-RPC reply go out before the loop winds down.
        self.loop.call_soon(self._finish, 0)

    async def restart_device(self, device_id: str) -> None:
        dev = self.supervisor.devices.get(device_id) if self.supervisor else None
        if dev is None:
            raise NoSuchDevice(f"no device {device_id!r}")
        async with self._transition:
            # Hold the vCPUs while the device is swapped so no access is lost.
            was_running = self.state == "running"
            if was_running:
                await self.loop.run_in_executor(None, self.control.pause, 10.0)
            try:
                await self.supervisor.restart(dev)
            finally:
                if was_running:
                    self.control.resume()

    def _device_or_raise(self, device_id: str):
        dev = self.supervisor.devices.get(device_id) if self.supervisor else None
        if dev is None:
            raise NoSuchDevice(f"no device {device_id!r}")
        return dev

    async def _device_call(self, dev, op: str, args: dict | None = None):
        from bus.endpoint import ChannelError, DeviceControlError
        try:
            return await self.loop.run_in_executor(None, dev.operator_control, op, args or {})
        except DeviceControlError as exc:
            raise VmStateError(f"device {dev.spec.id}: {exc}") from None
        except ChannelError as exc:
            raise VmStateError(f"device {dev.spec.id} did not answer: {exc}") from None

    async def device_stats(self, device_id: str) -> dict:
        """The device process's own counters as of its last heartbeat, vmmd's
        (refusals), and its relayed and dropped log lines ("log_relay"): no bus
        round trip, so pollers never slow the vCPUs."""
        stats = self._device_or_raise(device_id).operator_stats()
        if isinstance(stats, dict):
            stats = {**stats, "log_relay": self.supervisor.log_stats(device_id)}
        return stats

    async def set_link(self, device_id: str, up: bool) -> dict:
        """virtio-net link up/down (CONTROL device set_link)."""
        dev = self._device_or_raise(device_id)
        if dev.spec.kind != "virtio_net":
            raise NoSuchDevice(f"device {device_id!r} is not a virtio-net NIC")
        return await self._device_call(dev, "device", {"op": "set_link", "args": {"up": up}})

    def vcpu_stats(self) -> list[dict]:
        return [{"index": t.index, "exits": dict(t.stats.exits)} for t in self.threads]



    # -- debugging (JSON-RPC debug.vcpus) ----------------------------------------
    async def vcpu_states(self) -> list[dict]:
        """Registers and exit counts of every vCPU, read with the vCPUs stopped.

        A running VM is paused for the read and resumed at once (no
        kvmclock_ctrl: the stop lasts milliseconds); a paused VM stays paused."""
        async with self._transition:
            if self.state not in ("running", "paused"):
                raise VmStateError(f"cannot read the vCPUs of a VM that is {self.state}")
            was_running = self.state == "running"
            if was_running:
                ok = await self.loop.run_in_executor(None, self.control.pause, 10.0)
                if not ok:
                    self.control.resume()
                    raise VmStateError("vCPUs did not stop within 10 s")
            try:
                threads = {t.index: t for t in self.threads}
                return [self._vcpu_state(v, threads.get(v.index)) for v in self.vcpus]
            finally:
                if was_running:
                    self.control.resume()

    @staticmethod
    def _vcpu_state(vcpu, thread) -> dict:
        regs = vcpu.get_regs()
        sregs = vcpu.get_sregs()
        gprs = {name: int(getattr(regs, name)) for name in (
            "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp",
            "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")}
        return {
            "index": vcpu.index,
            "rip": int(regs.rip),
            "rsp": int(regs.rsp),
            "rflags": int(regs.rflags),
            "cr0": int(sregs.cr0),
            "cr3": int(sregs.cr3),
            "cr4": int(sregs.cr4),
            "efer": int(sregs.efer),
            "cs": int(sregs.cs.selector),
            "cpl": int(sregs.cs.dpl),
            "mp_state": int(vcpu.get_mp_state()),
            "gprs": gprs,
            "exits": dict(thread.stats.exits) if thread else {},
            "assists": dict(thread.stats.assists) if thread else {},
            "kvm_stats": _kvm_vcpu_stats(vcpu),
        }


KVM_GET_STATS_FD = 0xAE00 | 0xCE  # _IO(KVMIO, 0xce)


def _kvm_vcpu_stats(vcpu) -> dict[str, int]:
    """KVM's own per-vCPU counters (binary stats, KVM_GET_STATS_FD): exits,
    irq_injections, insn_emulation, halt_exits, ... Scalar counters only;
    {} where the kernel lacks the interface."""
    import fcntl
    import os
    import struct
    try:
        fd = fcntl.ioctl(vcpu.fileno(), KVM_GET_STATS_FD, 0)
    except OSError:
        return {}
    try:
        data = os.pread(fd, 1 << 20, 0)
    finally:
        os.close(fd)
    try:
        _flags, name_size, ndesc, _id_off, desc_off, data_off = struct.unpack_from("<6I", data)
        stats = {}
        step = 16 + name_size
        for i in range(ndesc):
            base = desc_off + i * step
            _fl, _exp, size, off, _bucket = struct.unpack_from("<IhHII", data, base)
            if size != 1:
                continue  # histograms
            name = data[base + 16:base + step].split(b"\0", 1)[0].decode("ascii", "replace")
            stats[name] = struct.unpack_from("<Q", data, data_off + off)[0]
        return stats
    except struct.error:
        return {}
