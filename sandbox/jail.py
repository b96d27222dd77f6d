"""Lock a device process down once it is fully set up.

devices/runtime.py calls enter() after every import, after opening the
backends and sockets and after the zmq handshake, i.e. with zmq's I/O
threads already running. Steps, in order:

  a. empty root: pivot_root into a read-only 64 KiB tmpfs and detach the
     old root (only inside the mount namespace isolate() created);
  b. close fds (see below);
  c. rlimits: NOFILE just above the highest fd kept, CORE 0, FSIZE from the
     policy (0 unless the device writes files) or the caller (virtio-blk:
     its image size);
  c'. ids: switch to the unprivileged uid/gid isolate() mapped, which
     empties every thread's capabilities (sandbox.privileges); this comes
     after the pivot, which still needed CAP_SYS_ADMIN in the device's
     user namespace;
  d. PR_SET_NO_NEW_PRIVS;
  e. landlock: deny all new filesystem access, when the kernel has it;
  f. seccomp filter from the policy, loaded with TSYNC (every thread).

Which fds get closed: the device process starts with only what vmmd passed
(close_fds + pass_fds), and everything it opened since is its backends and
libzmq/asyncio internals (epoll, eventfds, signal pipes), which must stay.
So the default, keep_fds=None, keeps every fd open at the call and closes
only close_fds, the ones the caller knows it no longer needs. Passing an
explicit keep_fds closes everything else (0, 1, 2 are always kept); then
the caller must include zmq's internal fds, e.g. by taking
sandbox.limits.open_fds() after the handshake and removing what it wants
gone.

After enter() no module can be imported any more (the filesystem is gone):
import everything the serving path needs before calling it. Mode "log"
does all of the above but makes the seccomp default action LOG; mode "off"
does nothing.
"""

from __future__ import annotations

import sys
from typing import Iterable

from sandbox import landlock, limits, namespaces, privileges
from sandbox.seccomp_policy import Policy

_entered = False


class JailError(RuntimeError):
    pass


def _warn(text: str) -> None:
    sys.stderr.write(f"vmmd sandbox: warning: {text}\n")
    sys.stderr.flush()


def enter(policy: Policy, mode: str, keep_fds: Iterable[int] | None = None,
          close_fds: Iterable[int] = (), isolation: namespaces.Isolation | None = None,
          file_size_limit: int | None = None) -> dict:
    """Enter the jail (see module doc). Returns a report of what was applied:
    {"mode", "policy", "root", "fds", "rlimits", "ids", "no_new_privs",
    "landlock", "seccomp"}. file_size_limit overrides the policy's. Raises JailError if called twice, ValueError on a bad mode.
    Steps that the kernel or our privileges do not permit are skipped with a
    warning on stderr and noted in the report; seccomp and the drop of ids
    (when isolate() mapped them) are never skipped: their failure raises."""
    global _entered
    if mode not in namespaces.MODES:
        raise ValueError(f"sandbox mode must be one of {namespaces.MODES}, not {mode!r}")
    if mode == "off":
        return {"mode": "off"}
    if _entered:
        raise JailError("sandbox.jail.enter() called twice")
    _entered = True
    report: dict = {"mode": mode, "policy": policy.name}
    iso = isolation if isolation is not None else namespaces.current()

    # Built before anything changes: a policy error must not leave a half jail.
    seccomp_filter = policy.build_filter(mode)
    open_now = limits.open_fds()  # needs /proc: before the pivot

    # a. empty root
    if iso is not None and iso.own_mount_namespace:
        try:
            namespaces.pivot_to_empty_root()
            report["root"] = "empty"
        except OSError as e:
            _warn(f"root left in place: {e}")
            report["root"] = f"unchanged: {e}"
    else:
        report["root"] = "unchanged: no private mount namespace"

    # b. fds
    close_set = set(close_fds)
    if keep_fds is None:
        limits.close_fds(sorted(close_set))
        kept = set(open_now) - close_set
    else:
        kept = (set(keep_fds) | {0, 1, 2}) - close_set
        limits.close_fds_except(kept)
    report["fds"] = sorted(kept)

    # c. rlimits
    report["rlimits"] = limits.apply_rlimits(
        highest_fd=max(kept | {2}), fd_margin=policy.fd_margin,
        file_size_limit=policy.file_size_limit if file_size_limit is None else file_size_limit)

    # c'. ids and capabilities
    if iso is not None and iso.drop_to is not None:
        try:
            report["ids"] = {**privileges.drop_to(*iso.drop_to), "host": list(iso.host_ids or ())}
        except OSError as e:
            raise JailError(f"cannot drop privileges: {e}") from e
    else:
        report["ids"] = "unchanged: no second id mapped (not started as root)"

    # d. no_new_privs
    limits.set_no_new_privs()
    report["no_new_privs"] = True

    # e. landlock
    try:
        report["landlock"] = landlock.restrict_all_filesystem_access()
    except OSError as e:
        _warn(f"landlock not applied: {e}")
        report["landlock"] = {}

    # f. seccomp, all threads
    seccomp_filter.load()
    report["seccomp"] = "kill" if mode == "on" else "log"
    return report
