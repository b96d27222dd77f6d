"""Linux namespaces for a device process, and its move into an empty root.

isolate() is the very first thing a device process does (single-threaded,
before zmq/uvloop are imported). Run as root (under vmmd), it:

  1. moves itself into the device's cgroups (fds vmmd opened on their
     cgroup.procs files), so the new cgroup namespace is rooted there;
  2. forks a helper that unshares user, mount, pid, net, ipc, uts, cgroup
     and time namespaces at once (all owned by the new user namespace);
  3. writes the helper's uid/gid maps from outside (only a process with
     CAP_SETUID in the parent namespace may map ids other than its own):
     inside 0 -> host 0 for setup, inside DEVICE_INSIDE_ID -> the
     unprivileged host ids vmmd chose for the device;
  4. the helper drops every capability from the bounding set (while still
     single-threaded: the bounding set is per thread), makes mounts
     private and forks the device, pid 1 of the new pid and time namespaces.

The helper reports the device's pid as "PID <n>\\n" on a status fd
(stdout by default; vmmd passes a pipe so the device's stdout can stay a
console) and exits, and so does the launcher; vmmd is a child subreaper,
so it adopts and can wait on the device.

Until the jail, the device is uid 0 of its own user namespace: host uid 0
for file ownership (it opens its image or console file by path), but with
no capability at all in vmmd's user namespace. sandbox.jail.enter() then
switches to DEVICE_INSIDE_ID (host: the unprivileged ids), which empties
the effective, permitted and ambient sets of every thread (glibc applies
setresuid to all threads); the inheritable set is empty from the start.

Without root, isolate() falls back to an unprivileged user namespace that
maps only the caller's own ids (no capability drop to another uid then).

pivot_to_empty_root() is used later by sandbox.jail: a read-only 64 KiB
tmpfs becomes the root and the old root is detached. It only ever runs in a
mount namespace isolate() created, never in vmmd's.
"""

from __future__ import annotations

import ctypes
import errno
import os
import signal
import sys
from dataclasses import dataclass, field

from sandbox import limits

CLONE_NEWTIME = 0x00000080
CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REC = 0x4000
MS_PRIVATE = 0x40000
MNT_DETACH = 0x2

DEVICE_NAMESPACES = {
    "mnt": CLONE_NEWNS,
    "pid": CLONE_NEWPID,
    "net": CLONE_NEWNET,
    "ipc": CLONE_NEWIPC,
    "uts": CLONE_NEWUTS,
    "cgroup": CLONE_NEWCGROUP,
    "time": CLONE_NEWTIME,
}

# Unprivileged host ids of a device when vmmd does not say (nobody/nogroup).
DEFAULT_HOST_IDS = (65534, 65534)
# The uid/gid a device switches to inside its user namespace at jail time.
DEVICE_INSIDE_ID = 1000

PR_CAPBSET_DROP = 24
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4

MODES = ("on", "log", "off")

# glibc has no pivot_root() wrapper.
_SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "riscv64": 41}.get(os.uname().machine)

_libc = ctypes.CDLL(None, use_errno=True)
_libc.unshare.argtypes = [ctypes.c_int]
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.syscall.restype = ctypes.c_long


@dataclass(frozen=True)
class Isolation:
    """What isolate() did. `entered` names the new namespaces ("mnt", "pid",
    "net", "ipc", "uts", plus "user" when a user namespace was needed)."""

    mode: str
    entered: frozenset[str] = field(default_factory=frozenset)
    reason: str = ""  # why nothing (or less) was entered
    # (uid, gid) inside the user namespace to switch to at jail time, and
    # what they are on the host; None when no second id was mapped.
    drop_to: tuple[int, int] | None = None
    host_ids: tuple[int, int] | None = None
    cgroups: int = 0  # cgroups joined before unsharing

    @property
    def own_mount_namespace(self) -> bool:
        return "mnt" in self.entered


_current: Isolation | None = None


def current() -> Isolation | None:
    """The result of this process's isolate() call, or None."""
    return _current


def _check(res: int, what: str) -> None:
    if res < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def unshare(flags: int) -> None:
    _check(_libc.unshare(flags), "unshare")


def mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    enc = lambda s: None if s is None else s.encode()  # noqa: E731
    _check(_libc.mount(enc(source), enc(target), enc(fstype), flags, enc(data)), f"mount {target}")


def umount2(target: str, flags: int) -> None:
    _check(_libc.umount2(target.encode(), flags), f"umount2 {target}")


def pivot_root(new_root: str, put_old: str) -> None:
    if _SYS_PIVOT_ROOT is None:
        raise OSError(errno.ENOSYS, f"pivot_root: unknown syscall number on {os.uname().machine}")
    _check(_libc.syscall(ctypes.c_long(_SYS_PIVOT_ROOT), new_root.encode(), put_old.encode()), "pivot_root")


def make_mounts_private() -> None:
    """Stop mount events propagating back to the host (and pivot_root needs
    the old root not to be a shared mount)."""
    mount(None, "/", None, MS_REC | MS_PRIVATE)


def _thread_count() -> int:
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return 1


def _write_own_id_maps() -> None:
    """Map our own uid/gid to 0 in a fresh user namespace (the only mapping
    an unprivileged process may write for itself)."""
    uid, gid = os.geteuid(), os.getegid()
    with open("/proc/self/setgroups", "w") as f:
        f.write("deny")
    with open("/proc/self/uid_map", "w") as f:
        f.write(f"0 {uid} 1")
    with open("/proc/self/gid_map", "w") as f:
        f.write(f"0 {gid} 1")


def write_id_maps(pid: int, host_ids: tuple[int, int]) -> None:
    """From the parent user namespace (needs CAP_SETUID/CAP_SETGID there):
    inside 0 -> host 0 (the device's set-up phase) and DEVICE_INSIDE_ID ->
    host_ids (what it runs as once jailed)."""
    uid, gid = host_ids
    for name, host in (("uid_map", uid), ("gid_map", gid)):
        if host == 0:
            raise ValueError(f"a device's host {name[:3]} must not be 0")
        with open(f"/proc/{pid}/{name}", "w") as f:
            f.write(f"0 0 1\n{DEVICE_INSIDE_ID} {host} 1\n")


def _all_flags(names) -> int:
    flags = 0
    for name in names:
        flags |= DEVICE_NAMESPACES[name]
    return flags


def _unshare_unprivileged() -> tuple[frozenset[str], str]:
    """Not root: a user namespace mapping only our own ids. Returns
    (entered, reason-if-nothing)."""
    names = list(DEVICE_NAMESPACES)
    errors = []
    # Older kernels lack time namespaces: retry without them.
    for attempt in (names, [n for n in names if n != "time"]):
        try:
            unshare(_all_flags(attempt) | CLONE_NEWUSER)
            _write_own_id_maps()
            return frozenset(attempt) | {"user"}, ""
        except OSError as e:
            errors.append(str(e))
    return frozenset(), "unshare with a user namespace: " + "; ".join(errors)


def drop_bounding_set() -> None:
    """Empty this thread's capability bounding set (and its ambient set):
    threads created later inherit it. Needs CAP_SETPCAP (in the user
    namespace); stops at the first capability number the kernel does not know."""
    for cap in range(64):
        try:
            limits.prctl(PR_CAPBSET_DROP, cap)
        except OSError as e:
            if e.errno == errno.EINVAL:
                break
            raise
    limits.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)


def join_cgroups(fds) -> int:
    """Move this process into the cgroups whose cgroup.procs vmmd opened
    for us ("0" means the writer); closes the fds. Returns how many."""
    joined = 0
    for fd in fds:
        try:
            os.write(fd, b"0")
            joined += 1
        except OSError as e:
            sys.stderr.write(f"vmmd sandbox: warning: cannot join a cgroup: {e}\n")
            sys.stderr.flush()
        finally:
            os.close(fd)
    return joined


def _announce_pid(pid: int, status_fd: int) -> None:
    # os.write, not print: nothing may sit in a stdio buffer across fork.
    try:
        os.write(status_fd, f"PID {pid}\n".encode())
    except OSError:
        pass


def _exit_on_signal(signum, _frame) -> None:
    os._exit(128 + signum)


def _read_byte(fd: int) -> bytes:
    while True:
        try:
            return os.read(fd, 1)
        except InterruptedError:
            continue


def _fork_into_user_namespace(host_ids: tuple[int, int]) -> tuple[frozenset[str], str]:
    """Root path of isolate(): fork a helper that unshares every namespace,
    map its ids from here, and leave only the helper running (this process
    exits with the helper's status). Returns (entered, reason) in the helper;
    (frozenset(), reason) in the caller when nothing could be entered."""
    names = list(DEVICE_NAMESPACES)
    to_parent_r, to_parent_w = os.pipe()
    to_child_r, to_child_w = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    helper = os.fork()
    if helper == 0:
        os.close(to_parent_r)
        os.close(to_child_w)
        entered, reason = frozenset(), ""
        for attempt in (names, [n for n in names if n != "time"]):
            try:
                unshare(_all_flags(attempt) | CLONE_NEWUSER)
                entered = frozenset(attempt) | {"user"}
                break
            except OSError as e:
                reason += f"unshare: {e}; "
        os.write(to_parent_w, b"U" if entered else b"N")
        os.close(to_parent_w)
        if not entered:
            sys.stderr.write(f"vmmd sandbox: warning: {reason}\n")
            sys.stderr.flush()
            os._exit(3)  # the launcher carries on un-isolated
        answer = _read_byte(to_child_r)
        os.close(to_child_r)
        if answer != b"M":
            os._exit(1)  # the launcher reported why
        return entered, ""
    os.close(to_parent_w)
    os.close(to_child_r)
    said = _read_byte(to_parent_r)
    os.close(to_parent_r)
    if said != b"U":
        os.close(to_child_w)
        os.waitpid(helper, 0)
        return frozenset(), "the namespace helper could not unshare"
    try:
        write_id_maps(helper, host_ids)
        os.write(to_child_w, b"M")
    except (OSError, ValueError) as e:
        sys.stderr.write(f"vmmd sandbox: error: cannot map the device's ids: {e}\n")
        sys.stderr.flush()
        os.close(to_child_w)
        os.waitpid(helper, 0)
        os._exit(1)
    os.close(to_child_w)
    # The helper forks the device, reports its pid and exits: then so do we.
    _, status = os.waitpid(helper, 0)
    os._exit(os.waitstatus_to_exitcode(status) & 0xFF if os.WIFEXITED(status) else 1)


def isolate(mode: str, status_fd: int = 1, cgroup_fds=(), host_ids: tuple[int, int] | None = None) -> Isolation:
    """Enter new namespaces (modes "on"/"log") or not ("off"); see module doc.

    Must run while the process is single-threaded. Only the device process
    returns when a pid namespace was entered. As root: cgroups joined, user
    namespace with host_ids (default DEFAULT_HOST_IDS) mapped for the jail,
    bounding set emptied. Without root an unprivileged user namespace is
    tried; if namespaces are not permitted at all, a warning goes to stderr
    and the process continues un-isolated. In "on"/"log" it also installs
    the early io_uring refusal (limits.refuse_io_uring), so /proc/PID/status
    shows "Seccomp: 2" from here on.
    """
    global _current
    if mode not in MODES:
        raise ValueError(f"sandbox mode must be one of {MODES}, not {mode!r}")
    if mode == "off":
        for fd in cgroup_fds:
            os.close(fd)
        _announce_pid(os.getpid(), status_fd)
        _current = Isolation(mode, reason="sandbox off")
        return _current
    if _thread_count() != 1:
        raise RuntimeError("sandbox.namespaces.isolate() must run before any thread is started")
    try:
        limits.refuse_io_uring()  # before libuv can set up a ring: see there
    except OSError as e:
        sys.stderr.write(f"vmmd sandbox: warning: io_uring not refused ({e})\n")
        sys.stderr.flush()
    joined = join_cgroups(cgroup_fds)  # before the cgroup namespace: it is rooted here

    drop_to = None
    if os.geteuid() == 0:
        host_ids = tuple(host_ids or DEFAULT_HOST_IDS)
        entered, reason = _fork_into_user_namespace(host_ids)
        if entered:
            drop_to = (DEVICE_INSIDE_ID, DEVICE_INSIDE_ID)
            drop_bounding_set()
    else:
        host_ids = None
        entered, reason = _unshare_unprivileged()
    if not entered:
        sys.stderr.write(f"vmmd sandbox: warning: no namespaces ({reason}); continuing without\n")
        sys.stderr.flush()
        _announce_pid(os.getpid(), status_fd)
        _current = Isolation(mode, reason=reason, cgroups=joined)
        return _current

    make_mounts_private()
    sys.stdout.flush()
    sys.stderr.flush()
    # The child waits for EOF on this pipe, i.e. for the parent to have
    # written the PID line and exited: that line is always the status fd's first.
    gate_r, gate_w = os.pipe()
    pid = os.fork()
    if pid:
        _announce_pid(pid, status_fd)
        os._exit(0)
    os.close(gate_w)
    while os.read(gate_r, 1):
        pass
    os.close(gate_r)
    # pid 1 of the new namespace: the kernel drops signals from outside for
    # which pid 1 has no handler (except SIGKILL/SIGSTOP). Give SIGTERM and
    # SIGHUP a handler that exits, so vmmd's polite stop still works; the
    # device runtime may install its own later.
    signal.signal(signal.SIGTERM, _exit_on_signal)
    signal.signal(signal.SIGHUP, _exit_on_signal)
    _current = Isolation(mode, entered=entered, drop_to=drop_to,
                         host_ids=host_ids if drop_to else None, cgroups=joined)
    return _current


def pivot_to_empty_root(candidates=("/tmp", "/mnt", "/proc")) -> None:
    """Make a read-only, empty 64 KiB tmpfs the root of this mount namespace
    and detach the old root. pivot_root changes the root and cwd of every
    thread of the process (they share one fs_struct), so this works after
    zmq's I/O threads exist. The tmpfs is mounted over an existing directory
    (the first of candidates) so nothing has to be created on the host.
    """
    target = next((c for c in candidates if os.path.isdir(c)), None)
    if target is None:
        raise OSError(errno.ENOENT, f"no mount point among {candidates}")
    mount("vmmd-jail", target, "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=64k,mode=0555")
    os.chdir(target)
    # pivot_root(".", "."): the old root ends up stacked on top of the new
    # one at "/", and is then detached (see pivot_root(2), NOTES).
    pivot_root(".", ".")
    umount2(".", MNT_DETACH)
    os.chdir("/")
