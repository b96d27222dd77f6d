"""Process limits for a jailed device: open fds, rlimits, no_new_privs.

Everything here works after pivot_root into an empty root (no /proc needed),
except open_fds(), which jail.enter() calls before the pivot.
"""

from __future__ import annotations

import ctypes
import errno
import os
import resource
import signal

_libc = ctypes.CDLL(None, use_errno=True)
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
_libc.prctl.restype = ctypes.c_int
# A second binding of prctl whose third argument is a pointer.
_prctl_ptr_arg = _libc["prctl"]
_prctl_ptr_arg.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_ulong]
_prctl_ptr_arg.restype = ctypes.c_int

PR_SET_NO_NEW_PRIVS = 38
PR_GET_NO_NEW_PRIVS = 39
PR_SET_CHILD_SUBREAPER = 36
PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2

# Headroom above the highest fd open at jail time: a console backend accepts
# one client at a time, asyncio may create a self-pipe or an eventfd.
DEFAULT_FD_MARGIN = 16
_FD_CEILING = 1 << 30  # close_range(2) takes the whole span in one call


def prctl(option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0, arg5: int = 0) -> int:
    res = _libc.prctl(option, arg2, arg3, arg4, arg5)
    if res < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl({option}): {os.strerror(err)}")
    return res


def set_no_new_privs() -> None:
    """After this, execve can never grant privileges (setuid bits, file caps).
    Also what lets an unprivileged process load seccomp and landlock."""
    prctl(PR_SET_NO_NEW_PRIVS, 1)


def no_new_privs() -> bool:
    return prctl(PR_GET_NO_NEW_PRIVS) == 1


def open_fds() -> list[int]:
    """The fds open right now, sorted. Reads /proc/self/fd (falls back to
    probing with fstat up to the soft RLIMIT_NOFILE when /proc is absent)."""
    try:
        names = os.listdir("/proc/self/fd")
    except OSError:
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        found = []
        for fd in range(min(soft, 1 << 16)):
            try:
                os.fstat(fd)
            except OSError:
                continue
            found.append(fd)
        return found
    fds = []
    for name in names:
        fd = int(name)
        try:
            os.fstat(fd)  # drop the directory fd listdir itself had open
        except OSError:
            continue
        fds.append(fd)
    return sorted(fds)


def close_fds_except(keep: set[int] | frozenset[int] | list[int]) -> None:
    """Close every fd not in keep (0, 1, 2 are always kept). Uses
    os.closerange over the gaps (close_range(2)), so it needs no /proc."""
    kept = sorted(set(keep) | {0, 1, 2})
    low = 0
    for fd in kept:
        if fd > low:
            os.closerange(low, fd)
        low = fd + 1
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    ceiling = soft if 0 < soft < _FD_CEILING else _FD_CEILING
    if ceiling > low:
        os.closerange(low, ceiling)


def close_fds(fds) -> None:
    """Close the listed fds, ignoring ones already closed."""
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def _lower(res: int, value: int) -> None:
    """Set soft and hard limit to value, never raising an existing limit."""
    soft, hard = resource.getrlimit(res)
    if hard != resource.RLIM_INFINITY:
        value = min(value, hard)
    resource.setrlimit(res, (value, value))


def apply_rlimits(*, highest_fd: int, fd_margin: int = DEFAULT_FD_MARGIN,
                  file_size_limit: int = 0, address_space_limit: int | None = None) -> dict:
    """Lower the resource limits of a device process; returns what was set.

    RLIMIT_NOFILE limits fd *numbers* (a new fd must be < limit), so it is set
    from the highest fd kept open, not the count. RLIMIT_FSIZE applies to
    writes to regular files through any fd, including ones opened before the
    jail (a file-backed console): policies that write files say how much.
    SIGXFSZ is ignored so an over-limit write fails with EFBIG instead of
    killing the device. RLIMIT_NPROC is left alone on purpose: it counts
    threads of the whole real uid (not this process) and root ignores it;
    seccomp is what forbids fork.
    """
    applied = {}
    nofile = highest_fd + 1 + fd_margin
    _lower(resource.RLIMIT_NOFILE, nofile)
    applied["nofile"] = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    _lower(resource.RLIMIT_CORE, 0)
    applied["core"] = 0
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    _lower(resource.RLIMIT_FSIZE, file_size_limit)
    applied["fsize"] = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if address_space_limit is not None:
        _lower(resource.RLIMIT_AS, address_space_limit)
        applied["as"] = resource.getrlimit(resource.RLIMIT_AS)[0]
    return applied


# --- early io_uring refusal --------------------------------------------------

NR_IO_URING_SETUP = 425  # the same on every architecture (unified numbering)
_SECCOMP_RET_ALLOW = 0x7FFF0000
_SECCOMP_RET_ERRNO = 0x00050000


class _SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_SockFilter))]


def refuse_io_uring() -> None:
    """Install a tiny seccomp filter: io_uring_setup fails with ENOSYS,
    everything else is allowed. Called by namespaces.isolate() before the
    device sets anything up, so libuv never creates its io_uring (it uses
    one to batch epoll_ctl when it can, and ring operations bypass seccomp:
    the jail's filter could not allow io_uring_enter safely). libuv falls
    back to plain epoll_ctl. Stacks under the jail's filter later."""
    ld_nr = 0x20  # BPF_LD | BPF_W | BPF_ABS, seccomp_data.nr at offset 0
    jeq = 0x15  # BPF_JMP | BPF_JEQ | BPF_K
    ret = 0x06  # BPF_RET | BPF_K
    prog = (_SockFilter * 4)(
        _SockFilter(ld_nr, 0, 0, 0),
        _SockFilter(jeq, 0, 1, NR_IO_URING_SETUP),
        _SockFilter(ret, 0, 0, _SECCOMP_RET_ERRNO | errno.ENOSYS),
        _SockFilter(ret, 0, 0, _SECCOMP_RET_ALLOW),
    )
    fprog = _SockFprog(len(prog), prog)
    address = ctypes.addressof(fprog)
    res = _prctl_ptr_arg(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, address, 0, 0)
    if res < 0 and ctypes.get_errno() == errno.EACCES:  # without CAP_SYS_ADMIN it needs no_new_privs
        set_no_new_privs()
        res = _prctl_ptr_arg(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, address, 0, 0)
    if res < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"seccomp (io_uring refusal): {os.strerror(err)}")
