"""Landlock: deny all new filesystem access (and TCP, and scopes) by ruleset.

A ruleset that *handles* every access right of the running kernel's ABI and
has no rules denies them all. Files already open stay usable (landlock checks
at open time), which is exactly the device model: open backends first, then
restrict.

Caveat: before Landlock gains thread synchronisation, landlock_restrict_self
applies to the calling thread and the threads it creates later, not to
threads already running (zmq's I/O threads). seccomp, loaded with TSYNC,
is what covers every thread; landlock is defence in depth on the main one.
"""

from __future__ import annotations

import ctypes
import os
import platform

# Syscall numbers are the same on every architecture (added after the
# unified syscall table).
SYS_LANDLOCK_CREATE_RULESET = 444
SYS_LANDLOCK_ADD_RULE = 445
SYS_LANDLOCK_RESTRICT_SELF = 446

LANDLOCK_CREATE_RULESET_VERSION = 1 << 0

# Filesystem access rights, by the ABI version that introduced them.
_FS_RIGHTS_BY_ABI = {
    1: (1 << 13) - 1,  # EXECUTE .. MAKE_SYM
    2: 1 << 13,  # REFER
    3: 1 << 14,  # TRUNCATE
    5: 1 << 15,  # IOCTL_DEV
}
_NET_RIGHTS_BY_ABI = {4: (1 << 0) | (1 << 1)}  # BIND_TCP, CONNECT_TCP
_SCOPES_BY_ABI = {6: (1 << 0) | (1 << 1)}  # ABSTRACT_UNIX_SOCKET, SIGNAL

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class _RulesetAttr(ctypes.Structure):
    _fields_ = [
        ("handled_access_fs", ctypes.c_uint64),
        ("handled_access_net", ctypes.c_uint64),
        ("scoped", ctypes.c_uint64),
    ]


def _rights(table: dict[int, int], abi: int) -> int:
    bits = 0
    for version, mask in table.items():
        if abi >= version:
            bits |= mask
    return bits


def abi_version() -> int:
    """The kernel's Landlock ABI version; 0 when Landlock is unavailable
    (not built, disabled at boot, or the syscall is filtered)."""
    if platform.system() != "Linux":
        return 0
    res = _libc.syscall(ctypes.c_long(SYS_LANDLOCK_CREATE_RULESET), None, ctypes.c_size_t(0),
                        ctypes.c_uint32(LANDLOCK_CREATE_RULESET_VERSION))
    return max(int(res), 0)


def handled_rights(abi: int) -> dict[str, int]:
    """The rights a deny-everything ruleset handles on this ABI."""
    return {
        "fs": _rights(_FS_RIGHTS_BY_ABI, abi),
        "net": _rights(_NET_RIGHTS_BY_ABI, abi),
        "scoped": _rights(_SCOPES_BY_ABI, abi),
    }


def restrict_all_filesystem_access(abi: int | None = None) -> dict[str, int]:
    """Restrict the calling thread: no new filesystem access of any kind,
    no TCP bind/connect (ABI >= 4), no abstract unix sockets or signals to
    processes outside the domain (ABI >= 6). Needs no_new_privs (or
    CAP_SYS_ADMIN). Returns what was handled, {} when Landlock is missing.
    """
    abi = abi_version() if abi is None else abi
    if abi <= 0:
        return {}
    rights = handled_rights(abi)
    attr = _RulesetAttr(rights["fs"], rights["net"], rights["scoped"])
    # Pass only the struct prefix this ABI knows: older kernels reject
    # sizes they do not understand when the tail is non-zero.
    size = 8 if abi < 4 else 16 if abi < 6 else ctypes.sizeof(_RulesetAttr)
    fd = _libc.syscall(ctypes.c_long(SYS_LANDLOCK_CREATE_RULESET), ctypes.byref(attr),
                       ctypes.c_size_t(size), ctypes.c_uint32(0))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"landlock_create_ruleset: {os.strerror(err)}")
    try:
        res = _libc.syscall(ctypes.c_long(SYS_LANDLOCK_RESTRICT_SELF), ctypes.c_int(fd), ctypes.c_uint32(0))
        if res < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"landlock_restrict_self: {os.strerror(err)}")
    finally:
        os.close(fd)
    return {"abi": abi, **rights}
