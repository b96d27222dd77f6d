"""Per-device cgroups with a memory and a pids limit (vmmd's side).

vmmd creates one cgroup per device incarnation under a sub-hierarchy of its
own ("vmmd-<pid>", next to where vmmd itself runs), writes the limits, and
hands the device launcher an fd on the cgroup's cgroup.procs opened for
writing; sandbox.namespaces.isolate() writes "0" to it (moving itself)
before it unshares the cgroup namespace, and closes it. The cgroup is
removed once the incarnation has been reaped; the sub-hierarchy when vmmd
closes the manager.

Where the controllers are:
  * cgroup2 with memory and pids enabled at vmmd's cgroup: memory.max and
    pids.max (the "+memory +pids" subtree_control of vmmd's cgroup must be
    writable, i.e. vmmd's cgroup has no processes of its own or is the root);
  * a hybrid or legacy host (memory and pids bound to v1 hierarchies, the
    cgroup2 mount at /sys/fs/cgroup/unified with neither controller):
    memory.limit_in_bytes in the memory hierarchy and pids.max in the pids
    hierarchy, same layout;
  * neither writable: no cgroups, and one log line saying why.
"""

from __future__ import annotations

import errno
import logging
import os
from dataclasses import dataclass

log = logging.getLogger(__name__)

MiB = 1 << 20


@dataclass(frozen=True)
class CgroupLimits:
    memory_max: int            # bytes
    pids_max: int              # tasks (threads count)
    # Devices that write guest memory (DMA) are charged for the guest pages
    # they touch first; the limit grows by the guest's RAM so a device is
    # never killed for the guest's own memory.
    plus_guest_memory: bool = False

    def memory_for(self, guest_memory: int) -> int:
        return self.memory_max + (guest_memory if self.plus_guest_memory else 0)


DEFAULT_LIMITS = CgroupLimits(memory_max=256 * MiB, pids_max=32)
_made = 0  # managers made by this process


@dataclass(frozen=True)
class _Hierarchy:
    controller: str   # "memory", "pids", or "" for a cgroup2 hierarchy holding both
    mount: str
    own: str          # vmmd's cgroup path in it


def _mounts(mountinfo: str) -> list[tuple[str, str, str]]:
    """(mount point, fstype, super options) of every cgroup mount."""
    found = []
    for line in mountinfo.splitlines():
        pre, sep, post = line.partition(" - ")
        if not sep:
            continue
        fields, tail = pre.split(), post.split()
        if len(fields) < 5 or len(tail) < 3 or tail[0] not in ("cgroup", "cgroup2"):
            continue
        point = fields[4].replace("\\040", " ")
        found.append((point, tail[0], tail[2]))
    return found


def _own_paths(proc_cgroup: str) -> dict[str, str]:
    """controller ("" for cgroup2) -> vmmd's cgroup path, from /proc/self/cgroup."""
    paths = {}
    for line in proc_cgroup.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if not controllers:
            paths[""] = path
        for c in controllers.split(","):
            if c:
                paths[c] = path
    return paths


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def _free_path(parent: str, name: str) -> str:
    """parent/name for a new device cgroup. A directory left by an earlier
    incarnation of that name (a failed restore's, whose rmdir came too early)
    is removed if it is empty; one still in use keeps its name and the new
    one gets name~N, so a leftover never stops a device from starting."""
    path = os.path.join(parent, name)
    if not os.path.lexists(path):
        return path
    try:
        os.rmdir(path)
        log.info("cgroup %s: removed an earlier incarnation's leftover", path)
        return path
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            return path
        for n in range(2, 1000):
            alt = f"{path}~{n}"
            if not os.path.lexists(alt):
                log.warning("cgroup %s is still in use (%s): this incarnation's is %s",
                            path, exc.strerror, alt)
                return alt
        raise


class DeviceCgroup:
    """One incarnation's cgroup(s): one directory per hierarchy."""

    def __init__(self, dirs: list[str], limits: dict):
        self.dirs = dirs
        self.limits = limits   # what was written, e.g. {"memory.max": n, "pids.max": n}

    def open_procs(self) -> list[int]:
        """fds on each cgroup.procs, for the launcher to write "0" to."""
        fds = []
        try:
            for d in self.dirs:
                fds.append(os.open(os.path.join(d, "cgroup.procs"), os.O_WRONLY | os.O_CLOEXEC))
        except OSError:
            for fd in fds:
                os.close(fd)
            raise
        return fds

    def rename(self, name: str) -> None:
        """Rename every directory to `name` (same parent): a spare device process's
        cgroup becoming its incarnation's. OSError leaves the names it could not change."""
        if not name or "/" in name or name.startswith("."):
            raise ValueError(f"bad cgroup name {name!r}")
        for i, d in enumerate(self.dirs):
            new = _free_path(os.path.dirname(d), name)
            os.rename(d, new)
            self.dirs[i] = new

    def remove(self) -> None:
        """rmdir each directory (after the processes in it were reaped)."""
        for d in self.dirs:
            try:
                os.rmdir(d)
            except FileNotFoundError:
                pass
            except OSError as e:
                log.warning("cgroup %s not removed: %s", d, e)


class CgroupManager:
    """vmmd's sub-hierarchy; create() makes one device cgroup with limits."""

    def __init__(self, name: str | None = None, *, mountinfo: str | None = None,
                 proc_cgroup: str | None = None):
        if name is None:  # unique per manager (tests run several supervisors in one process)
            global _made
            name = f"vmmd-{os.getpid()}" + (f".{_made}" if _made else "")
            _made += 1
        self.name = name
        self.version = ""           # "v2", "v1" or "" (unavailable)
        self.reason = ""            # why unavailable, or why a cgroup2 mount was not used
        self._bases: dict[str, str] = {}   # controller ("" for v2) -> our sub-hierarchy dir
        try:
            mountinfo = _read("/proc/self/mountinfo") if mountinfo is None else mountinfo
            proc_cgroup = _read("/proc/self/cgroup") if proc_cgroup is None else proc_cgroup
        except OSError as e:
            self.reason = f"cannot read /proc: {e}"
            return
        self._set_up(_mounts(mountinfo), _own_paths(proc_cgroup))

    @property
    def available(self) -> bool:
        return bool(self.version)

    @property
    def locations(self) -> list[str]:
        """The sub-hierarchy directories device cgroups are made in."""
        return list(self._bases.values())

    def _set_up(self, mounts, own) -> None:
        why = []
        for point, fstype, _ in mounts:
            if fstype != "cgroup2" or "" not in own:
                continue
            parent = os.path.normpath(point + own[""])
            try:
                have = _read(os.path.join(parent, "cgroup.controllers")).split()
            except OSError as e:
                why.append(f"cgroup2 at {point}: {e}")
                continue
            if not {"memory", "pids"} <= set(have):
                why.append(f"cgroup2 at {point} has no memory and pids controllers (has {' '.join(have) or 'none'})")
                continue
            try:
                _write(os.path.join(parent, "cgroup.subtree_control"), "+memory +pids")
                base = self._make(parent)
                _write(os.path.join(base, "cgroup.subtree_control"), "+memory +pids")
            except OSError as e:
                why.append(f"cgroup2 at {parent} not writable: {e.strerror or e}")
                self._bases.clear()
                continue
            self._bases[""] = base
            self.version = "v2"
            return
        v1 = {}
        for point, fstype, opts in mounts:
            if fstype != "cgroup":
                continue
            for c in ("memory", "pids"):
                if c in opts.split(",") and c in own and c not in v1:
                    v1[c] = os.path.normpath(point + own[c])
        missing = {"memory", "pids"} - set(v1)
        if missing:
            why.append(f"no v1 hierarchy for {' '.join(sorted(missing))}")
        else:
            try:
                for c, parent in v1.items():
                    self._bases[c] = self._make(parent)
                self.version = "v1"
                self.reason = "; ".join(why)
                return
            except OSError as e:
                why.append(f"cgroup v1 not writable: {e.strerror or e}")
                self.close()
        self.reason = "; ".join(why) or "no cgroup mounts"

    def _make(self, parent: str) -> str:
        base = os.path.join(parent, self.name)
        try:
            os.mkdir(base, 0o755)
        except FileExistsError:
            pass
        return base

    def create(self, name: str, limits: CgroupLimits, guest_memory: int = 0) -> DeviceCgroup:
        """A cgroup `name` with limits applied; raises OSError (nothing left behind)."""
        if not self.available:
            raise OSError(errno.ENOTSUP, f"no cgroups: {self.reason}")
        if not name or "/" in name or name.startswith("."):
            raise ValueError(f"bad cgroup name {name!r}")
        made: list[str] = []
        try:
            if self.version == "v2":
                d = _free_path(self._bases[""], name)
                os.mkdir(d, 0o755)
                made.append(d)
            else:
                for c in ("memory", "pids"):
                    d = _free_path(self._bases[c], name)
                    os.mkdir(d, 0o755)
                    made.append(d)
            cg = DeviceCgroup(made, {})
            self.set_limits(cg, limits, guest_memory)
        except OSError:
            DeviceCgroup(made, {}).remove()
            raise
        return cg

    def set_limits(self, cg: DeviceCgroup, limits: CgroupLimits, guest_memory: int = 0) -> None:
        """Write the limits into a cgroup create() made (again: a spare's cgroup
        gets its device's limits when it becomes that device's)."""
        memory = limits.memory_for(guest_memory)
        if self.version == "v2":
            d = cg.dirs[0]
            _write(os.path.join(d, "memory.max"), str(memory))
            if os.path.exists(os.path.join(d, "memory.swap.max")):
                _write(os.path.join(d, "memory.swap.max"), "0")
            _write(os.path.join(d, "pids.max"), str(limits.pids_max))
            cg.limits = {"memory.max": memory, "pids.max": limits.pids_max}
        else:
            dm, dp = cg.dirs
            _write(os.path.join(dm, "memory.limit_in_bytes"), str(memory))
            _write(os.path.join(dp, "pids.max"), str(limits.pids_max))
            cg.limits = {"memory.limit_in_bytes": memory, "pids.max": limits.pids_max}

    def close(self) -> None:
        """Remove the sub-hierarchy (device cgroups must be gone already)."""
        for base in self._bases.values():
            try:
                os.rmdir(base)
            except FileNotFoundError:
                pass
            except OSError as e:
                log.warning("cgroup %s not removed: %s", base, e)
        self._bases.clear()
