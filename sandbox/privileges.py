"""Dropping a device's ids and capabilities at jail time.

namespaces.isolate() (as root) leaves the device as uid 0 of its own user
namespace, with an empty bounding set, and maps DEVICE_INSIDE_ID to the
unprivileged host ids. drop_to() switches to those ids: glibc's setres*id
run the syscall on every thread of the process (zmq's I/O threads exist by
then), and a uid change away from 0 empties each thread's effective,
permitted and ambient sets. capset() then clears this thread's sets
explicitly (inheritable included), and capabilities() reads them back.
"""

from __future__ import annotations

import ctypes
import os

from sandbox import limits

_LINUX_CAPABILITY_VERSION_3 = 0x20080522
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.capget.argtypes = [ctypes.POINTER(_CapHeader), ctypes.POINTER(_CapData)]
_libc.capset.argtypes = [ctypes.POINTER(_CapHeader), ctypes.POINTER(_CapData)]


def capabilities() -> dict[str, int]:
    """This thread's effective, permitted and inheritable sets (64-bit masks)."""
    hdr = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    if _libc.capget(ctypes.byref(hdr), data) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"capget: {os.strerror(err)}")
    return {name: getattr(data[0], name) | getattr(data[1], name) << 32
            for name in ("effective", "permitted", "inheritable")}


def clear_capabilities() -> None:
    """Empty this thread's effective, permitted, inheritable and ambient sets."""
    hdr = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    if _libc.capset(ctypes.byref(hdr), data) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"capset: {os.strerror(err)}")
    limits.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)


def drop_to(uid: int, gid: int) -> dict:
    """Become uid/gid (of the current user namespace) in every thread, with
    no supplementary groups and no capabilities. Returns what was done.
    Raises OSError when a step fails, or if any capability is left."""
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    clear_capabilities()
    left = capabilities()
    if any(left.values()):
        raise OSError(f"capabilities left after dropping to {uid}:{gid}: {left}")
    return {"uid": uid, "gid": gid, "capabilities": 0}
