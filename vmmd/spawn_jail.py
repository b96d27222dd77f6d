"""The sandbox side of spawning a device incarnation, for vmmd.supervisor:
its cgroup (sandbox.cgroups), the unprivileged host ids it drops to, and the
pipe its stdout/stderr go to (relayed by vmmd.device_log).

JailSetup.prepare() runs before the Popen (in the spawning thread) and
returns a Spawn: bootstrap keys, fds for the launcher, the log pipe.
track() files it under the device's pid; read_logs() starts relaying on
vmmd's loop; release() removes the cgroup once the incarnation was reaped.
"""

from __future__ import annotations

import importlib
import logging
import os
import threading

from sandbox.cgroups import DEFAULT_LIMITS, CgroupLimits, CgroupManager
from vmmd.device_log import DeviceLogLimiter, PipeReader
from vmmd.devlink import DeviceSpec, Incarnation, ManagedDevice

log = logging.getLogger("vmmd.supervisor")


class Spawn:
    """What one incarnation's spawn set up outside the bootstrap basics."""

    def __init__(self, cgroup, cgroup_fds: list[int], log_r: int, log_w: int, bootstrap: dict,
                 limiter: DeviceLogLimiter):
        self.limiter = limiter
        self.cgroup = cgroup
        self.cgroup_fds = cgroup_fds
        self.log_r, self.log_w = log_r, log_w
        self.bootstrap = bootstrap
        self.reader: PipeReader | None = None
        self._adopt = None   # (manager, limits, guest memory, name): a spare's cgroup to finish

    def finish_adopt(self) -> None:
        """A spare's cgroup becomes the device's: its limits, then its name. Done
        while the device sets itself up, before vmmd attaches it (before any guest
        access or state reaches it); OSError if the kernel refuses."""
        if self._adopt is not None:
            manager, limits, guest_memory, name = self._adopt
            self._adopt = None
            manager.set_limits(self.cgroup, limits, guest_memory)
            self.cgroup.rename(name)

    @property
    def pass_fds(self) -> list[int]:
        return list(self.cgroup_fds)

    def spawned(self) -> None:
        """After Popen: close the fds only the launcher needed."""
        for fd in (*self.cgroup_fds, self.log_w):
            try:
                os.close(fd)
            except OSError:
                pass
        self.cgroup_fds, self.log_w = [], -1

    def release(self) -> None:
        """After the incarnation was reaped (or never ran)."""
        if self.cgroup is not None:
            self.cgroup.remove()
            self.cgroup = None
        if self.reader is None and self.log_r >= 0:
            # Never attached (the spawn failed): relay what it said, then close.
            # A PipeReader closes its own fd at EOF.
            os.set_blocking(self.log_r, False)
            try:
                said = os.read(self.log_r, 64 * 1024)
            except OSError:
                said = b""
            for line in said.decode("utf-8", errors="replace").splitlines():
                self.limiter.emit(logging.WARNING, line)
            os.close(self.log_r)
            self.log_r = -1


class JailSetup:
    """One per supervisor: the cgroup manager (made at the first spawn), the
    per-device log limiters (kept across incarnations), live spawns by pid."""

    def __init__(self, sandbox: str, limits: dict[str, CgroupLimits], device_ids):
        self.sandbox = sandbox
        self.limits = limits
        self.device_ids = device_ids
        self._cgroups: CgroupManager | None = None
        self._lock = threading.Lock()
        self._spawns: dict[int, Spawn] = {}   # by device pid
        self._limiters: dict[str, DeviceLogLimiter] = {}

    def _manager(self) -> CgroupManager | None:
        with self._lock:
            if self._cgroups is None:
                self._cgroups = CgroupManager()
                if self._cgroups.available:
                    log.info("device cgroups: %s, under %s%s", self._cgroups.version,
                             ", ".join(self._cgroups.locations),
                             f" ({self._cgroups.reason})" if self._cgroups.reason else "")
                else:
                    log.warning("device cgroups skipped (no memory/pids limits): %s", self._cgroups.reason)
            return self._cgroups if self._cgroups.available else None

    def limits_for(self, kind: str) -> CgroupLimits:
        if kind in self.limits:
            return self.limits[kind]
        try:
            return importlib.import_module(f"devices.{kind}.policy").CGROUP_LIMITS
        except (ImportError, AttributeError):
            return DEFAULT_LIMITS

    def prepare(self, spec: DeviceSpec, gen: int, guest_memory: int, adopt=None) -> Spawn:
        """adopt: (DeviceCgroup, its CgroupManager) of a spare device process
        (vmmd.spare_pool), already in it: the bootstrap names no cgroup to join,
        and Spawn.finish_adopt() gives it this device's limits and the
        incarnation's name once the spare has its bootstrap."""
        boot: dict = {}
        cgroup, fds, pending = None, [], None
        if adopt is not None:
            cgroup, manager = adopt
            pending = (manager, self.limits_for(spec.kind), guest_memory, f"{spec.id}.{gen}")
        if cgroup is not None:
            if self.sandbox != "off":
                if self.device_ids is not None:
                    boot["host_ids"] = list(self.device_ids)
                boot["cgroup_fds"] = []
        elif self.sandbox != "off":
            if self.device_ids is not None:
                boot["host_ids"] = list(self.device_ids)
            manager = self._manager()
            if manager is not None:
                try:
                    cgroup = manager.create(f"{spec.id}.{gen}", self.limits_for(spec.kind), guest_memory)
                    fds = cgroup.open_procs()
                except OSError as exc:
                    log.warning("device %s: no cgroup (%s)", spec.id, exc)
                    if cgroup is not None:
                        cgroup.remove()
                    cgroup, fds = None, []
            boot["cgroup_fds"] = fds
        log_r, log_w = os.pipe2(os.O_CLOEXEC)
        spawn = Spawn(cgroup, fds, log_r, log_w, boot, self.limiter(spec.id))
        spawn._adopt = pending
        return spawn

    def track(self, inc: Incarnation, spawn: Spawn) -> None:
        with self._lock:
            self._spawns[inc.pid] = spawn

    def limiter(self, device_id: str) -> DeviceLogLimiter:
        with self._lock:
            lim = self._limiters.get(device_id)
            if lim is None:
                lim = self._limiters[device_id] = DeviceLogLimiter(device_id)
            return lim

    def read_logs(self, loop, dev: ManagedDevice, inc: Incarnation) -> None:
        """On the loop: start relaying the incarnation's pipe."""
        spawn = self._spawns.get(inc.pid)
        if spawn is not None and spawn.reader is None and spawn.log_r >= 0:
            spawn.reader = PipeReader(loop, spawn.log_r, self.limiter(dev.spec.id))

    def release(self, inc: Incarnation) -> None:
        with self._lock:
            spawn = self._spawns.pop(inc.pid, None)
        if spawn is not None:
            spawn.release()

    def cgroup_of(self, pid: int):
        spawn = self._spawns.get(pid)
        return spawn.cgroup if spawn is not None else None

    def close(self) -> None:
        with self._lock:
            spawns, self._spawns = list(self._spawns.values()), {}
        for spawn in spawns:
            spawn.release()
        if self._cgroups is not None:
            self._cgroups.close()
