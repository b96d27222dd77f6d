"""Spare device processes for `vmmd --restore-wait` (devices/spare.py).

A spare is a device process exec'd ahead of time (`python -m devices.spare`)
that imports everything and waits on a socket pair for its bootstrap; the
supervisor hands one to a device start instead of exec'ing
`python -m devices.<kind>` (Supervisor._spawn_blocking), and from there the
process follows the cold start's path: cgroup, namespaces, ids, model,
handshake, jail. Each spare serves one device incarnation, once.

Why spares rather than a zygote that forks devices: children of one zygote
share its address-space layout (ASLR), its string-hash secret and whatever
else it holds, so one compromised device would learn the layout of every
other device on the host; restoring that per child would mean an exec, the
cost this avoids. A spare is a fresh exec with nothing of another device.
The price: memory (~45 MiB resident per waiting spare) and a bounded
number of pre-started devices; a restore needing more starts the rest cold.

Until its bootstrap a spare's stdout and stderr are a pipe read here
(anything it says, e.g. an import error, is logged as "spare: ...").

Each spare runs in a cgroup of its own from its first instruction (it joins
it through fds on cgroup.procs, as a cold launcher does, before it imports
anything: its imports are charged to it as a cold device's are); when it
becomes a device, vmmd writes that device's limits into it and renames it to
the incarnation's name (vmmd.spawn_jail), instead of making and joining one
on the restore's clock.
"""

from __future__ import annotations

import array
import contextlib
import errno
import json
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import threading

from devices.spare import KINDS, READY
from sandbox.cgroups import DEFAULT_LIMITS, CgroupManager

log = logging.getLogger(__name__)

MAX_SPARES = 16


class Spare:
    def __init__(self, proc: subprocess.Popen, sock: socket.socket, log_r: int, cgroup=None,
                 cgroups: CgroupManager | None = None, isolated: bool = False):
        self.proc = proc
        self.sock = sock
        self.log_r = log_r
        self.ready = False
        self.cgroup = cgroup      # sandbox.cgroups.DeviceCgroup the spare joined, or None
        self.cgroups = cgroups    # the manager that made it (limits for the device)
        # --isolate: the spare enters its namespaces ahead; from its "PID n" on, the
        # process waiting is the device (pid n, vmmd's child as the subreaper).
        self.isolated = isolated
        self.pid: int | None = None
        self._pidfd: int | None = None

    def take_cgroup(self):
        """The spare's cgroup, now the device's to keep and remove (vmmd.spawn_jail)."""
        cg, self.cgroup = self.cgroup, None
        return cg

    def poll_ready(self) -> bool:
        """True once the spare said READY (its imports are done; with --isolate,
        after it reported the device's pid)."""
        while not self.ready:
            try:
                msg = self.sock.recv(64, socket.MSG_DONTWAIT)
            except OSError:   # nothing yet (BlockingIOError), or gone
                break
            if not msg:
                break
            if msg.startswith(b"PID ") and msg[4:].strip().isdigit() and self.pid is None:
                self.pid = int(msg[4:])
                if self.pid != self.proc.pid:
                    try:
                        self._pidfd = os.pidfd_open(self.pid)
                    except OSError:
                        self.pid = None   # already gone: never ready
                        break
            elif msg == READY:
                self.ready = not self.isolated or self.pid is not None
        return self.ready

    def alive(self) -> bool:
        launcher_gone = self.proc.poll() is not None   # before reading: its PID line precedes its exit
        if self.isolated and self.pid is None:
            self.poll_ready()
        if self._pidfd is not None:   # the launcher has exited; the device waits
            return not select.select([self._pidfd], [], [], 0)[0]
        return not launcher_gone

    def hand_over(self, kind: str, bootstrap: str, fds: list[int], stdio: tuple[int, int, int]) -> subprocess.Popen:
        """Send the bootstrap and its fds (vmmd keeps its copies); the spare becomes
        the device's launcher. OSError if the spare is gone."""
        if kind not in KINDS:
            raise ValueError(f"spares do not run {kind!r} devices")
        fds = list(dict.fromkeys([*fds, *stdio]))
        doc = {"kind": kind, "bootstrap": bootstrap, "fds": fds, "stdio": list(stdio)}
        if self.isolated:
            if self.pid is None:
                raise OSError(errno.EAGAIN, "an isolated spare that has not reported its pid")
            doc["host_pid"] = self.pid   # it says "PID n" on the bootstrap's status fd
        msg = json.dumps(doc).encode()
        try:
            self.sock.sendmsg([msg], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
        finally:
            self.sock.close()
            self.drain_log()
        if self._pidfd is not None:   # the supervisor watches the device with its own pidfd
            os.close(self._pidfd)
            self._pidfd = None
        return self.proc

    def drain_log(self) -> None:
        """What the spare said before its bootstrap, into vmmd's log; closes the pipe."""
        if self.log_r < 0:
            return
        os.set_blocking(self.log_r, False)
        try:
            said = os.read(self.log_r, 64 * 1024)
        except OSError:
            said = b""
        os.close(self.log_r)
        self.log_r = -1
        for line in said.decode("utf-8", "replace").splitlines():
            log.warning("spare: %r", line)

    def discard(self) -> None:
        """Not needed: EOF makes it exit; killed if it does not within a second."""
        self.sock.close()
        if self._pidfd is not None:
            if not select.select([self._pidfd], [], [], 1.0)[0]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(self.pid, 0)   # vmmd's child once the launcher exited (subreaper)
            os.close(self._pidfd)
            self._pidfd = None
        try:
            self.proc.wait(1.0)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.drain_log()
        if self.cgroup is not None:
            self.cgroup.remove()
            self.cgroup = None


class SparePool:
    """Up to `count` spares, started by start(); take() hands one out (ready ones
    first), None when there is none left."""

    def __init__(self, count: int, python: str = sys.executable, isolate: bool = False):
        if not 0 <= count <= MAX_SPARES:
            raise ValueError(f"spare count must be 0..{MAX_SPARES}")
        self.count = count
        self.python = python
        self.isolate = isolate   # spares enter their namespaces ahead (serve sandbox on/log only)
        self._spares: list[Spare] = []
        self._lock = threading.Lock()
        self._cgroups: CgroupManager | None = None
        self._made = 0
        self._filling = threading.Lock()   # one fill() at a time (the start's, a refusal's)

    def _cgroup_manager(self) -> CgroupManager | None:
        if self._cgroups is None:
            self._cgroups = CgroupManager()
            if not self._cgroups.available:
                log.warning("spare device processes start without a cgroup: %s", self._cgroups.reason)
        return self._cgroups if self._cgroups.available else None

    def _spawn_one(self) -> Spare:
        vmm_end, spare_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        log_r, log_w = os.pipe2(os.O_CLOEXEC)
        cgroup, cg_fds, manager = None, [], self._cgroup_manager()
        if manager is not None:
            self._made += 1
            try:
                cgroup = manager.create(f"spare-{self._made}", DEFAULT_LIMITS)
                cg_fds = cgroup.open_procs()
            except OSError as exc:
                log.warning("spare device process without a cgroup: %s", exc)
                if cgroup is not None:
                    cgroup.remove()
                cgroup, cg_fds = None, []
        cmd = [self.python, "-m", "devices.spare", "--socket-fd", str(spare_end.fileno())]
        if self.isolate:
            cmd.append("--isolate")
        if cg_fds:
            cmd += ["--cgroup-fds", ",".join(map(str, cg_fds))]
        try:
            proc = subprocess.Popen(cmd, pass_fds=[spare_end.fileno(), *cg_fds], stdin=subprocess.DEVNULL,
                                    stdout=log_w, stderr=log_w, close_fds=True)
        except OSError:
            vmm_end.close()
            os.close(log_r)
            if cgroup is not None:
                cgroup.remove()
            raise
        finally:
            spare_end.close()
            os.close(log_w)
            for fd in cg_fds:
                os.close(fd)
        return Spare(proc, vmm_end, log_r, cgroup, manager, self.isolate)

    def fill(self) -> None:
        """Start spares up to `count` (dead ones are dropped first)."""
        with self._filling:
            self._fill()

    def _fill(self) -> None:
        with self._lock:
            dead = [s for s in self._spares if not s.alive()]
            self._spares = [s for s in self._spares if s.alive()]
        for s in dead:
            s.discard()
        while True:
            with self._lock:
                if len(self._spares) >= self.count:
                    return
            try:
                spare = self._spawn_one()
            except OSError as exc:
                log.warning("cannot start a spare device process: %s", exc)
                return
            with self._lock:
                self._spares.append(spare)

    def take(self, isolated_ok: bool = True) -> Spare | None:
        """A spare (ready ones first; an isolated one only once ready), or None.
        isolated_ok=False: the device needs a spare not yet in namespaces."""
        if self.isolate and not isolated_ok:
            return None
        with self._lock:
            for s in self._spares:
                s.poll_ready()
            live = [s for s in self._spares if s.alive()]
            dead = [s for s in self._spares if s not in live]
            usable = [s for s in live if s.ready or not s.isolated]
            pick = next((s for s in usable if s.ready), usable[0] if usable else None)
            self._spares = [s for s in live if s is not pick]
        for s in dead:
            s.discard()
        return pick

    def status(self) -> dict:
        with self._lock:
            live = [s for s in self._spares if s.alive()]
            ready = sum(1 for s in live if s.poll_ready())   # alive() read an isolated one's pid
        return {"ready": ready, "starting": len(live) - ready}

    def pids(self) -> list[int]:
        with self._lock:
            return [s.proc.pid for s in self._spares]

    def close(self) -> None:
        """Stop the spares left (devices made from spares keep their cgroups)."""
        with self._lock:
            spares, self._spares = self._spares, []
        for s in spares:
            s.discard()

    def close_cgroups(self) -> None:
        """At the end, once every device made from a spare is gone: the sub-hierarchy."""
        if self._cgroups is not None:
            self._cgroups.close()
