"""The common main of every device process (`python -m devices.<kind>`).

The order is the security design (docs/architecture.md, "Processes"):

  1. parse --bootstrap (exit 2 on bad input)
  2. sandbox.namespaces.isolate(): unshare + fork while single-threaded,
     before zmq or uvloop are even imported
  3. import the bus, the model and its policy; create the uvloop loop, so its
     epoll/eventfd exist before the sandbox forbids creating them
  4. map guest memory, build the model (it opens its backends), restore state
  5. connect and handshake with vmmd
  6. sandbox.jail.enter(policy, mode)
  7. serve the bus until vmmd says shutdown (or kills us)

The device never dies from a bad register access: a model exception becomes
an all-ones read and a LOG event.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import importlib
import json
import logging
import os
import re
import sys
import traceback
from dataclasses import dataclass, field
from typing import Any, NoReturn

from devices.model import DeviceModel

log = logging.getLogger("devices.runtime")

HANDSHAKE_TIMEOUT = 10.0
EVENT_BACKLOG = 256   # events a model may raise before the bus is connected
FAULT_LOG_BURST = 20       # model faults reported in full; after that every 1000th
FAIR_BATCH = 64            # bus messages served before yielding to other tasks

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2

# Imported in main() after isolate(): zmq and msgpack must not load before it.
protocol: Any = None
endpoint: Any = None


def _load_bus() -> None:
    global protocol, endpoint
    from bus import endpoint as _endpoint, protocol as _protocol
    protocol, endpoint = _protocol, _endpoint


# --- bootstrap ---------------------------------------------------------------

class BootstrapError(ValueError):
    """The --bootstrap document is malformed."""


_ID_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_KNOWN_KEYS = {"id", "kind", "req", "evt", "mem_fd", "layout", "sandbox", "options", "restore",
               "fds", "status_fd", "generation", "cgroup_fds", "host_ids"}


@dataclass(frozen=True)
class Bootstrap:
    id: str
    kind: str
    req: str
    evt: str
    sandbox: str
    mem_fd: int | None = None
    layout: list | None = None
    options: dict = field(default_factory=dict)
    restore: dict | None = None
    fds: dict = field(default_factory=dict)
    status_fd: int | None = None   # where isolate() reports the pid, if not stdout
    generation: int | None = None
    cgroup_fds: tuple = ()          # cgroup.procs fds isolate() joins and closes
    host_ids: tuple | None = None   # unprivileged host (uid, gid) to drop to
    unknown_keys: tuple = ()


def _fd(v: Any, what: str) -> int:
    if type(v) is not int or v < 0:
        raise BootstrapError(f"{what} must be a non-negative int, not {v!r}")
    return v


def parse_bootstrap(text: str, kind: str) -> Bootstrap:
    """Validate the bootstrap JSON for a device of `kind`."""
    try:
        doc = json.loads(text)
    except ValueError as e:
        raise BootstrapError(f"not JSON: {e}") from None
    if type(doc) is not dict:
        raise BootstrapError("must be a JSON object")
    missing = [k for k in ("id", "kind", "req", "evt", "sandbox") if k not in doc]
    if missing:
        raise BootstrapError(f"missing keys: {', '.join(missing)}")
    dev_id = doc["id"]
    if type(dev_id) is not str or not _ID_RE.fullmatch(dev_id):
        raise BootstrapError(f"id must be 1..64 of [A-Za-z0-9_.-], not {dev_id!r}")
    if doc["kind"] != kind:
        raise BootstrapError(f"kind {doc['kind']!r} given to the {kind!r} device program")
    for key in ("req", "evt"):
        if type(doc[key]) is not str or not doc[key].startswith("ipc://"):
            raise BootstrapError(f"{key} must be an ipc:// endpoint, not {doc[key]!r}")
    if doc["sandbox"] not in ("on", "log", "off"):
        raise BootstrapError(f"sandbox must be on, log or off, not {doc['sandbox']!r}")
    mem_fd, layout = doc.get("mem_fd"), doc.get("layout")
    if (mem_fd is None) != (layout is None):
        raise BootstrapError("mem_fd and layout come together")
    if mem_fd is not None:
        _fd(mem_fd, "mem_fd")
        if type(layout) is not list:
            raise BootstrapError("layout must be a list of [gpa, size, offset]")
    options = {} if doc.get("options") is None else doc["options"]
    restore = doc.get("restore")
    fds = {} if doc.get("fds") is None else doc["fds"]
    if type(options) is not dict:
        raise BootstrapError("options must be an object")
    if restore is not None and type(restore) is not dict:
        raise BootstrapError("restore must be an object or null")
    if type(fds) is not dict or any(type(k) is not str for k in fds):
        raise BootstrapError("fds must be an object of name: fd")
    for name, fd in fds.items():
        _fd(fd, f"fds[{name!r}]")
    status_fd = doc.get("status_fd")
    if status_fd is not None:
        _fd(status_fd, "status_fd")
    generation = doc.get("generation")
    if generation is not None and (type(generation) is not int or generation < 0):
        raise BootstrapError("generation must be a non-negative int")
    cgroup_fds = doc.get("cgroup_fds") or []
    if type(cgroup_fds) is not list:
        raise BootstrapError("cgroup_fds must be a list of fds")
    for fd in cgroup_fds:
        _fd(fd, "cgroup_fds[]")
    host_ids = doc.get("host_ids")
    if host_ids is not None:
        if (type(host_ids) is not list or len(host_ids) != 2
                or any(type(i) is not int or not 0 < i < (1 << 31) for i in host_ids)):
            raise BootstrapError("host_ids must be [uid, gid], both non-zero")
        host_ids = tuple(host_ids)
    return Bootstrap(dev_id, kind, doc["req"], doc["evt"], doc["sandbox"], mem_fd, layout, options,
                     restore, fds, status_fd, generation, tuple(cgroup_fds), host_ids,
                     tuple(sorted(k for k in doc if k not in _KNOWN_KEYS)))


def _usage_exit(kind: str, message: str) -> NoReturn:
    sys.stderr.write(f"devices.{kind}: bad bootstrap: {message}\n")
    sys.exit(EXIT_USAGE)


# --- model lookup --------------------------------------------------------------

def find_model_class(module, kind: str) -> type[DeviceModel]:
    """module.DEVICE_MODEL, else the one DeviceModel subclass defined there with KIND == kind."""
    cls = getattr(module, "DEVICE_MODEL", None)
    if cls is None:
        found = [v for v in vars(module).values()
                 if isinstance(v, type) and issubclass(v, DeviceModel) and v is not DeviceModel
                 and v.__module__ == module.__name__ and v.KIND == kind]
        if len(found) != 1:
            raise LookupError(f"{module.__name__} defines {len(found)} DeviceModel classes with "
                              f"KIND {kind!r}; set DEVICE_MODEL")
        cls = found[0]
    if not (isinstance(cls, type) and issubclass(cls, DeviceModel)):
        raise LookupError(f"{module.__name__}.DEVICE_MODEL is not a DeviceModel subclass")
    return cls


# --- the host a model talks to ---------------------------------------------------

class RuntimeHost:
    """DeviceHost for a model: its side effects become events on the evt channel.

    Events raised before the bus is connected (e.g. in the model's __init__)
    wait in a short backlog. Checkpoints are coalesced: one save_state() per
    loop iteration however often the model asks.
    """

    def __init__(self, memory=None, fds: dict | None = None):
        self.memory = memory
        self.fds = dict(fds or {})  # bootstrap "fds": name -> fd (irqfd.<v>, ioeventfd.<q>, ...)
        self.model: DeviceModel | None = None
        self.channel = None
        self._backlog: list = []
        self._checkpoint_scheduled = False
        self.faults = 0
        # READs and WRITEs handled, counted as vmmd counts what it sends: a
        # checkpoint says how many it covers (vmmd replays the rest into a successor).
        self.accesses = 0
        self._model_closed = False

    def close_model(self) -> None:
        """Close the model once (its files flushed and released): on a shutdown
        request, before the reply (vmmd kills the process once it has it), and
        again harmlessly when the process ends."""
        if self.model is None or self._model_closed:
            return
        self._model_closed = True
        self.model.close()

    def attach(self, channel) -> None:
        self.channel = channel
        backlog, self._backlog = self._backlog, []
        for msg in backlog:
            channel.send_event(msg)

    def _send(self, msg) -> None:
        if self.channel is not None:
            self.channel.send_event(msg)
        elif len(self._backlog) < EVENT_BACKLOG:
            self._backlog.append(msg)

    def set_irq_line(self, gsi: int, level: bool) -> None:
        self._send(protocol.IrqLine(gsi, 1 if level else 0))

    def send_msi(self, address: int, data: int) -> None:
        self._send(protocol.Msi(address, data))

    def fire_vector(self, vector: int) -> None:
        """Bus-only mode: MSI-X vector fired; vmmd applies its table and masks."""
        self._send(protocol.Vector(vector))

    def request(self, what: str, args: dict | None = None) -> None:
        self._send(protocol.Request(what, args or {}))

    def checkpoint(self) -> None:
        if not self._checkpoint_scheduled:
            self._checkpoint_scheduled = True
            asyncio.get_event_loop().call_soon(self._push_checkpoint)

    def _push_checkpoint(self) -> None:
        self._checkpoint_scheduled = False
        try:
            state = self.model.save_state()
        except Exception as exc:
            self.report_fault("save_state for a checkpoint", exc)
            return
        self._send(protocol.Checkpoint(state, self.accesses))

    def log(self, level: int, text: str) -> None:
        """A LOG event for vmmd (and the same line on our stderr)."""
        log.log(level, "%s", text)
        self._send(protocol.Log(level, text[:protocol.MAX_TEXT_LEN]))

    def report_fault(self, what: str, exc: BaseException) -> None:
        """A model exception: reported (rate-limited), never fatal.

        The traceback goes to our stderr; vmmd gets a one-line LOG event.
        """
        self.faults += 1
        n = self.faults
        if n <= FAULT_LOG_BURST or n % 1000 == 0:
            log.error("model fault #%d in %s:\n%s", n, what,
                      "".join(traceback.format_exception(exc)).rstrip())
            text = f"model fault #{n} in {what}: {type(exc).__name__}: {exc}"
            self._send(protocol.Log(logging.ERROR, text[:protocol.MAX_TEXT_LEN]))


# --- serving the bus -------------------------------------------------------------

class Server:
    """Dispatches vmmd's requests to the model, in order."""

    def __init__(self, model: DeviceModel, host: RuntimeHost, channel):
        self.model = model
        self.host = host
        self.channel = channel

    def read(self, msg) -> None:
        self.host.accesses += 1
        try:
            value = self.model.io_read(msg.space, msg.addr, msg.size)
            if not isinstance(value, int) or not 0 <= value < 1 << (8 * msg.size):
                raise ValueError(f"io_read returned {value!r} for a {msg.size}-byte read")
            value = int(value)
        except Exception as exc:
            self.host.report_fault(f"io_read {msg.space.name} {msg.addr:#x}/{msg.size}", exc)
            value = (1 << (8 * msg.size)) - 1
        self.channel.send_read_reply(msg.seq, value)

    def write(self, msg) -> None:
        self.host.accesses += 1
        try:
            self.model.io_write(msg.space, msg.addr, msg.size, msg.value)
        except Exception as exc:
            self.host.report_fault(f"io_write {msg.space.name} {msg.addr:#x}/{msg.size}", exc)

    def control(self, msg) -> bool:
        """Run one CONTROL op and reply; True when the process should exit."""
        model, op = self.model, msg.op
        try:
            result = None
            if op == "quiesce":
                model.quiesce()
            elif op == "resume":
                model.resume()
            elif op == "save":
                result = model.save_state()
            elif op == "restore":
                model.restore_state(msg.args["state"])
                self.host.checkpoint()
            elif op == "reset":
                model.reset()
                self.host.checkpoint()
            elif op == "dirty_sync":
                sync = getattr(model, "dirty_sync", None)
                if sync is not None:
                    sync()
            elif op == "device":
                result = model.device_control(msg.args["op"], msg.args.get("args") or {})
            elif op == "shutdown":
                # The reply says the device's files are complete (a qcow2 image's
                # preallocated clusters given back, everything synced).
                self.host.close_model()
            elif op == "stats":
                result = dict(model.stats())
                result["bus"] = {"faults": self.host.faults,
                                 "dropped_events": self.channel.dropped_events,
                                 "dropped_replies": self.channel.dropped_replies,
                                 "bad_frames": self.channel.bad_frames}
        except Exception as exc:
            log.info("control %s failed: %s: %s", op, type(exc).__name__, exc)
            self.channel.send_control_reply(msg.seq, False, f"{type(exc).__name__}: {exc}")
            return False
        self.channel.send_control_reply(msg.seq, True, result)
        return op == "shutdown"

    async def serve(self) -> int:
        await self.model.start()
        served = 0
        channel = self.channel
        while True:
            msg = channel.recv_nowait()
            if msg is None:
                await channel.wait_readable()
                continue
            t = type(msg)
            if t is protocol.Read:
                self.read(msg)
            elif t is protocol.Write:
                self.write(msg)
            elif t is protocol.Control:
                if self.control(msg):
                    return EXIT_OK
            elif t is protocol.Error:
                log.warning("vmmd reported error %s: %s", msg.code, msg.text)
            else:
                log.warning("unexpected %s from vmmd ignored", msg.TYPE.name)
            served += 1
            if served % FAIR_BATCH == 0:
                # An already-queued frame resolves recv() without yielding.
                await asyncio.sleep(0)


# --- main ----------------------------------------------------------------------------

def _isolate(boot: Bootstrap) -> None:
    from sandbox import namespaces
    kw = {"cgroup_fds": boot.cgroup_fds, "host_ids": boot.host_ids}
    if boot.status_fd is None:
        namespaces.isolate(boot.sandbox, **kw)
        return
    try:
        namespaces.isolate(boot.sandbox, status_fd=boot.status_fd, **kw)
    finally:
        os.close(boot.status_fd)


def _watch_lifeline(boot: Bootstrap) -> None:
    """Exit when vmmd is gone: it holds the write end of the lifeline pipe.

    The device cannot learn of vmmd's death otherwise (its parent, the
    launcher, exited on purpose, so PR_SET_PDEATHSIG does not apply).
    """
    fd = boot.fds.get("lifeline")
    if fd is None:
        return

    def vmmd_gone() -> None:
        log.error("vmmd went away; exiting")
        sys.stderr.flush()
        os._exit(EXIT_FAILURE)

    asyncio.get_running_loop().add_reader(fd, vmmd_gone)


async def _run(boot: Bootstrap, model: DeviceModel, host: RuntimeHost, enter_jail, info: dict) -> int:
    import zmq.asyncio
    ctx = zmq.asyncio.Context()
    channel = endpoint.DeviceChannel(ctx, boot.req, boot.evt)
    try:
        ranges = list(model.io_ranges())
        try:
            await channel.hello(boot.kind, boot.id, ranges, info, HANDSHAKE_TIMEOUT)
        except (endpoint.ChannelError, protocol.ProtocolError) as exc:
            log.error("handshake failed: %s", exc)
            return EXIT_FAILURE
        host.attach(channel)
        _watch_lifeline(boot)
        if enter_jail is not None:
            # Only the model knows what it writes (virtio-blk: its image, in place).
            limit = getattr(model, "file_size_limit", None)
            enter_jail(file_size_limit=limit() if callable(limit) else None)
        return await Server(model, host, channel).serve()
    finally:
        channel.close()
        ctx.destroy(linger=endpoint.DEVICE_LINGER_MS)


def main(kind: str, model_module: str | None = None, policy: Any = None,
         argv: list[str] | None = None) -> NoReturn:
    """Run the device process for `kind`; never returns.

    model_module/policy override `devices.<kind>.model` / `.policy` (tests).
    """
    parser = argparse.ArgumentParser(prog=f"python -m devices.{kind}")
    parser.add_argument("--bootstrap", required=True, help="bootstrap JSON from vmmd")
    args = parser.parse_args(argv)
    try:
        boot = parse_bootstrap(args.bootstrap, kind)
    except BootstrapError as exc:
        _usage_exit(kind, str(exc))
    run(boot, kind, model_module, policy)


def run(boot: Bootstrap, kind: str, model_module: str | None = None, policy: Any = None,
        isolated: bool = False) -> NoReturn:
    """Everything after the bootstrap was parsed, in the security order of the
    module doc: the same for a process exec'd with --bootstrap and for a spare
    (devices/spare.py) that received it later. isolated: the spare ran step 2
    (isolate()) before its bootstrap arrived."""
    logging.basicConfig(stream=sys.stderr, level=logging.INFO,
                        format=f"[{boot.id}] %(levelname)s %(name)s: %(message)s")
    if boot.unknown_keys:
        log.warning("ignoring unknown bootstrap keys: %s", ", ".join(boot.unknown_keys))

    if not isolated:
        _isolate(boot)

    _load_bus()
    import uvloop
    enter_jail = None
    try:
        module = importlib.import_module(model_module or f"devices.{kind}.model")
        model_cls = find_model_class(module, kind)
        if boot.sandbox != "off":
            from sandbox import jail
            if policy is None:
                policy = importlib.import_module(f"devices.{kind}.policy").POLICY
            # Default keep_fds: every fd open at that point stays (the bus, zmq's
            # and the loop's internals, the backends); vmmd's Popen closed the rest.
            enter_jail = functools.partial(jail.enter, policy, boot.sandbox)
    except (ImportError, LookupError, AttributeError) as exc:
        log.error("cannot load the %s device: %s: %s", kind, type(exc).__name__, exc)
        sys.exit(EXIT_FAILURE)
    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)

    memory = None
    if boot.mem_fd is not None:
        from vmmd.guest_memory import GuestMemory, GuestMemoryError, MemoryLayout
        try:
            memory = GuestMemory.from_fd(boot.mem_fd, MemoryLayout.from_wire(boot.layout))
        except (GuestMemoryError, OSError, ValueError) as exc:
            _usage_exit(kind, f"guest memory: {exc}")
    elif model_cls.NEEDS_GUEST_MEMORY:
        _usage_exit(kind, f"a {kind} device needs guest memory (mem_fd, layout)")

    host = RuntimeHost(memory, boot.fds)
    try:
        model = model_cls(host, boot.options)
    except Exception as exc:
        log.error("cannot create the %s model: %s: %s", kind, type(exc).__name__, exc)
        sys.exit(EXIT_FAILURE)
    host.model = model
    info = {"pid_in_ns": os.getpid(), "state_version": model_cls.STATE_VERSION, "restored": False}
    try:
        extra = model.hello_info()
        if type(extra) is not dict:
            raise TypeError(f"hello_info returned {type(extra).__name__}")
    except Exception as exc:
        log.error("cannot describe the %s device: %s: %s", kind, type(exc).__name__, exc)
        sys.exit(EXIT_FAILURE)
    info.update({k: v for k, v in extra.items() if k not in info})
    if boot.restore is not None:
        try:
            model.restore_state(boot.restore)
            info["restored"] = True
        except Exception as exc:
            # Starting fresh beats a crash loop on a state that can never load.
            model.reset()
            info["restore_error"] = f"{type(exc).__name__}: {exc}"[:protocol.MAX_TEXT_LEN]
            host.log(logging.ERROR, f"restore from checkpoint failed, starting fresh: {info['restore_error']}")

    try:
        status = loop.run_until_complete(_run(boot, model, host, enter_jail, info))
    except Exception:
        log.exception("device process failed")
        status = EXIT_FAILURE
    finally:
        try:
            host.close_model()
        except Exception as exc:
            log.warning("model close failed: %s", exc)
    sys.stderr.flush()
    sys.exit(status)
