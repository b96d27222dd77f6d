"""Linux namespaces for a device process, and its move into an empty root.

isolate() is the very first thing a device process does (single-threaded,
before zmq/uvloop are imported): unshare mount, pid, net, ipc and uts
namespaces, then fork. The parent, still in vmmd's pid namespace, reports
the child's pid as "PID <n>\\n" on a status fd (stdout by default; vmmd
passes a pipe so the device's stdout can stay a console) and exits at once; vmmd is a child
subreaper, so it adopts and can wait on the child. The child is pid 1 of
the new pid namespace and carries on as the device.

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

CLONE_NEWNS = 0x00020000
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
}

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


def _write_id_maps() -> None:
    """Map our own uid/gid to 0 in a fresh user namespace (the only mapping
    an unprivileged process may write for itself)."""
    uid, gid = os.geteuid(), os.getegid()
    with open("/proc/self/setgroups", "w") as f:
        f.write("deny")
    with open("/proc/self/uid_map", "w") as f:
        f.write(f"0 {uid} 1")
    with open("/proc/self/gid_map", "w") as f:
        f.write(f"0 {gid} 1")


def _unshare_device_namespaces() -> tuple[frozenset[str], str]:
    """Try plain unshare (root / CAP_SYS_ADMIN), then with a user namespace.
    Returns (entered, reason-if-nothing)."""
    flags = 0
    for bit in DEVICE_NAMESPACES.values():
        flags |= bit
    try:
        unshare(flags)
        return frozenset(DEVICE_NAMESPACES), ""
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.EACCES):
            return frozenset(), f"unshare: {e}"
        first = e
    try:
        unshare(flags | CLONE_NEWUSER)
        _write_id_maps()
        return frozenset(DEVICE_NAMESPACES) | {"user"}, ""
    except OSError as e:
        return frozenset(), f"unshare: {first}; with a user namespace: {e}"


def _announce_pid(pid: int, status_fd: int) -> None:
    # os.write, not print: nothing may sit in a stdio buffer across fork.
    try:
        os.write(status_fd, f"PID {pid}\n".encode())
    except OSError:
        pass


def _exit_on_signal(signum, _frame) -> None:
    os._exit(128 + signum)


def isolate(mode: str, status_fd: int = 1) -> Isolation:
    """Enter new namespaces (modes "on"/"log") or not ("off"); see module doc.

    Must run while the process is single-threaded. Only the child returns
    when a pid namespace was entered. Without root/CAP_SYS_ADMIN a user
    namespace is tried; if namespaces are not permitted at all, a warning
    goes to stderr and the process continues un-isolated. In "on"/"log" it
    also installs the early io_uring refusal (limits.refuse_io_uring), so
    /proc/PID/status shows "Seccomp: 2" from here on.
    """
    global _current
    if mode not in MODES:
        raise ValueError(f"sandbox mode must be one of {MODES}, not {mode!r}")
    if mode == "off":
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

    entered, reason = _unshare_device_namespaces()
    if not entered:
        sys.stderr.write(f"vmmd sandbox: warning: no namespaces ({reason}); continuing without\n")
        sys.stderr.flush()
        _announce_pid(os.getpid(), status_fd)
        _current = Isolation(mode, reason=reason)
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
    _current = Isolation(mode, entered=entered)
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
