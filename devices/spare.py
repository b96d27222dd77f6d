"""A spare device process: `python -m devices.spare --socket-fd N`.

`vmmd --restore-wait` starts a few of these before any restore call, so a
restore does not wait for a Python interpreter and its imports. A spare is
exactly the process vmmd would otherwise exec as `python -m devices.<kind>
--bootstrap JSON`, started early: a fresh exec of its own (own address
space layout, own hash secret; nothing shared with another device), vmmd's
child, root in vmmd's namespaces like that launcher, holding nothing but
its stdio and one end of a socket pair with vmmd. It:

  0. joins the cgroup vmmd made for it (fds on cgroup.procs, as a cold
     launcher does at the start of isolate()); vmmd renames it to the
     device incarnation's and writes that device's limits when it hands
     the spare its bootstrap, whose cgroup_fds are then empty;
  1. imports what every device kind runs (the runtime, the bus, zmq,
     uvloop, each kind's model and policy) -- no thread is started and
     no file opened, so isolate() still finds it single-threaded;
  1'. with --isolate (what `vmmd --restore-wait` uses): runs
     sandbox.namespaces.isolate() now, exactly as a cold launcher does
     (helper fork, unshare of every namespace, id maps written from
     outside, bounding set emptied, device forked as pid 1), the device's
     pid reported on the socket; the launcher and helper exit and what
     waits from here on is the device process itself, in its namespaces,
     still without its bootstrap. Such a spare serves sandbox on/log with
     the default device ids only; it writes "PID n" (vmmd tells it n) on
     its bootstrap's status fd in place of isolate();
  2. says READY on the socket and waits for one message: the bootstrap
     JSON (the very text vmmd would put in argv), the fds it names (SCM_RIGHTS,
     in the order the message lists vmmd's numbers for them) and the three
     fds for its stdin, stdout and stderr;
  3. moves those onto 0, 1, 2, renumbers the bootstrap's fds to where they
     arrived, closes every other fd (the socket included: what is left is
     what Popen(close_fds=True, pass_fds=...) would have left), and runs
     devices.runtime.run(): isolate() (cgroup, namespaces, ids), model,
     handshake, jail -- the same path, in the same order, as a device
     started cold.

The difference from a cold start is when things ran: the imports before
the namespaces instead of after (same code files, no input from anyone
yet), and the namespaces (with --isolate) before the bootstrap arrived.
EOF on the socket (vmmd gone or the spare not needed) ends the process.
"""

from __future__ import annotations

import argparse
import array
import dataclasses
import json
import os
import socket
import sys

KINDS = ("lpc", "virtio_blk", "virtio_net", "virtio_balloon")
MAX_MESSAGE = 1 << 20     # the bootstrap JSON: a few KiB in practice
MAX_FDS = 253             # SCM_MAX_FD
READY = b"READY"
EXIT_USAGE = 2


def preload() -> None:
    """Import everything runtime.run() would import for any kind.

    numpy (the virtio dirty log) would start OpenBLAS's worker threads at
    import, and isolate() must fork while single-threaded: BLAS runs in this
    thread only (no device calls it; a cold start imports numpy after its
    forks and so keeps idle workers)."""
    os.environ["OPENBLAS_NUM_THREADS"] = "1"
    import importlib
    import devices.runtime  # noqa: F401
    import bus.endpoint  # noqa: F401
    import bus.protocol  # noqa: F401
    import sandbox.jail  # noqa: F401
    import sandbox.namespaces  # noqa: F401
    import uvloop  # noqa: F401
    import zmq.asyncio  # noqa: F401
    import vmmd.guest_memory  # noqa: F401
    for kind in KINDS:
        importlib.import_module(f"devices.{kind}.model")
        importlib.import_module(f"devices.{kind}.policy")


class SpareError(ValueError):
    """A malformed message from vmmd."""


def parse_message(data: bytes, nfds: int) -> tuple[str, str, list[int], list[int], int | None]:
    """(kind, bootstrap text, vmmd's fd numbers in arrival order, vmmd's numbers of
    stdin/out/err, the device's pid as vmmd sees it (a pre-isolated spare) or None)."""
    try:
        doc = json.loads(data)
    except ValueError as exc:
        raise SpareError(f"not JSON: {exc}") from None
    if type(doc) is not dict:
        raise SpareError("must be a JSON object")
    kind, text, fds, stdio = doc.get("kind"), doc.get("bootstrap"), doc.get("fds"), doc.get("stdio")
    if kind not in KINDS:
        raise SpareError(f"unknown device kind {kind!r}")
    if type(text) is not str:
        raise SpareError("bootstrap must be the bootstrap JSON text")
    if (type(fds) is not list or any(type(f) is not int or f < 0 for f in fds)
            or len(set(fds)) != len(fds) or len(fds) != nfds):
        raise SpareError(f"fds must list the {nfds} fds sent, each once")
    if type(stdio) is not list or len(stdio) != 3 or any(f not in fds for f in stdio):
        raise SpareError("stdio must name three of the fds sent")
    host_pid = doc.get("host_pid")
    if host_pid is not None and (type(host_pid) is not int or host_pid <= 0):
        raise SpareError("host_pid must be a positive int")
    return kind, text, fds, stdio, host_pid


def renumber(boot, where: dict[int, int]):
    """The bootstrap with vmmd's fd numbers replaced by where they arrived here."""
    from devices.runtime import BootstrapError

    def fd(n):
        if n not in where:
            raise BootstrapError(f"fd {n} is named in the bootstrap but was not sent")
        return where[n]

    return dataclasses.replace(
        boot,
        mem_fd=None if boot.mem_fd is None else fd(boot.mem_fd),
        status_fd=None if boot.status_fd is None else fd(boot.status_fd),
        fds={name: fd(n) for name, n in boot.fds.items()},
        cgroup_fds=tuple(fd(n) for n in boot.cgroup_fds))


def bootstrap_fds(boot) -> set[int]:
    named = set(boot.fds.values()) | set(boot.cgroup_fds)
    named |= {f for f in (boot.mem_fd, boot.status_fd) if f is not None}
    return named


def _receive(sock: socket.socket) -> tuple[bytes, list[int]]:
    fds = array.array("i")
    data, ancdata, flags, _ = sock.recvmsg(MAX_MESSAGE, socket.CMSG_SPACE(MAX_FDS * fds.itemsize))
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[:len(payload) - len(payload) % fds.itemsize])
    if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
        for f in fds:
            os.close(f)
        raise SpareError("message truncated")
    return data, list(fds)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m devices.spare")
    p.add_argument("--socket-fd", type=int, required=True)
    p.add_argument("--cgroup-fds", default="", help="cgroup.procs fds of the spare's cgroup")
    p.add_argument("--isolate", action="store_true",
                   help="enter the device's namespaces before the bootstrap (sandbox on/log)")
    args = p.parse_args(argv)
    sock = socket.socket(fileno=args.socket_fd)
    if args.cgroup_fds:
        # First, as a cold launcher joins its cgroup first: the imports are charged to it.
        from sandbox.namespaces import join_cgroups
        join_cgroups([int(fd) for fd in args.cgroup_fds.split(",")])
    preload()
    if args.isolate:
        # isolate() as a cold launcher runs it (host ids: the default), reporting
        # the device's pid on the socket; only the device, pid 1 of its new pid
        # namespace, returns here.
        from sandbox import namespaces
        namespaces.isolate("on", status_fd=sock.fileno())
    try:
        sock.send(READY)
    except OSError:
        pass          # vmmd already sent the bootstrap and closed its end (or went away)
    try:
        data, received = _receive(sock)
    except OSError:
        os._exit(0)   # vmmd went away
    if not data:
        os._exit(0)   # EOF: not needed
    sock.close()
    from devices import runtime
    try:
        kind, text, numbers, stdio, host_pid = parse_message(data, len(received))
        where = dict(zip(numbers, received))
        boot = renumber(runtime.parse_bootstrap(text, kind), where)
        if args.isolate:
            check_isolated(boot, host_pid)
    except (SpareError, runtime.BootstrapError) as exc:
        sys.stderr.write(f"devices.spare: bad message from vmmd: {exc}\n")
        os._exit(EXIT_USAGE)
    sys.stdout.flush()
    sys.stderr.flush()
    for target, n in enumerate(stdio):
        os.dup2(where[n], target)
    # What Popen(close_fds=True, pass_fds=...) leaves: stdio and the bootstrap's fds.
    from sandbox import limits
    limits.close_fds_except(bootstrap_fds(boot))
    if args.isolate:
        # What isolate() would say now: the device's pid, first on the status fd.
        os.write(boot.status_fd, f"PID {host_pid}\n".encode())
        os.close(boot.status_fd)
        boot = dataclasses.replace(boot, status_fd=None)
    runtime.run(boot, kind, isolated=args.isolate)


def check_isolated(boot, host_pid) -> None:
    """A spare already in its namespaces serves only what it was isolated for."""
    if boot.sandbox not in ("on", "log"):
        raise SpareError(f"isolated for a sandbox, not for sandbox {boot.sandbox!r}")
    if boot.host_ids is not None or boot.cgroup_fds:
        raise SpareError("isolated with the default ids in its own cgroup: no host_ids or cgroup_fds")
    if host_pid is None or boot.status_fd is None:
        raise SpareError("an isolated spare needs host_pid and status_fd")


if __name__ == "__main__":
    main()
