"""`vmmd --restore-wait --api-socket S`: a started vmmd waiting for a snapshot.

What Firecracker users know as loading a snapshot into a running
firecracker process (`PUT /snapshot/load`): vmmd starts, imports
everything a restore runs, opens /dev/kvm, starts a few spare device
processes (vmmd/spare_pool.py: interpreter and imports done, waiting for a
bootstrap) and serves only the control API until

    snapshot.restore {"path": DIR, "clock": "advance"|"freeze", "paused": bool,
                      "disks": {"SLOT": PATH}, "nets": {"SLOT": "tap=NAME"|"socket=PATH"},
                      "consoles": {"com1"|"com2": SPEC}, "sandbox": MODE, "device_timeout": S}

arrives. The parameters are exactly `vmmd --restore`'s options and are
checked by the same parser, then the snapshot by the same prepare(): a
refusal is a JSON-RPC error whose message is what `vmmd --restore` would
print after "vmmd: error:", and the process goes on waiting with nothing
started (a refusal found by a device or KVM tears down what was started,
and spares are started again to replace any used). On success the call
returns once the vCPUs run, and from then on this is an ordinary vmmd
serving that VM: the full API on the same socket; leftover spares are
stopped (device restarts start cold, as in any vmmd).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import resource
import signal
import time

from vmmd.api.jsonrpc import INVALID_PARAMS, ApiError, Dispatcher, Registry
from vmmd.config import (LOG_LEVELS, SANDBOX_MODES, ConfigError, _check_socket_path, _choice,
                         _float, _int, error_line)
from vmmd.spare_pool import MAX_SPARES

log = logging.getLogger(__name__)

DEFAULT_SPARES = 4          # lpc + a disk + a NIC + the balloon without a cold start
RESTORE_REFUSED = -32003    # the snapshot (or something it needs) refused: nothing runs


@dataclasses.dataclass(frozen=True)
class WaitConfig:
    api_socket: str
    sandbox: str | None = None
    log_level: str = "info"
    device_timeout: float | None = None
    spares: int = DEFAULT_SPARES


def _refusal(code: int, exc: BaseException | str) -> ApiError:
    """The message `vmmd --restore` prints after "vmmd: error: " for the same problem."""
    return ApiError(code, error_line(exc)[len("vmmd: error: "):])


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise ConfigError(message)


def parse_wait_args(argv: list[str]) -> WaitConfig:
    """--restore-wait and what applies before any snapshot is named; the
    snapshot and its host-side overrides come with snapshot.restore."""
    for a in argv:
        if a in ("--restore", "--incoming") or a.startswith(("--restore=", "--incoming=")):
            raise ConfigError(f"--restore-wait takes no {a.split('=')[0]} (the snapshot comes with "
                              f"the snapshot.restore call)")
    p = _Parser(prog="vmmd --restore-wait", allow_abbrev=False)
    p.add_argument("--restore-wait", action="store_true", required=True)
    p.add_argument("--api-socket")
    p.add_argument("--sandbox")
    p.add_argument("--log-level")
    p.add_argument("--device-timeout")
    p.add_argument("--spare-devices")
    ns = p.parse_args(argv)
    if ns.api_socket is None:
        raise ConfigError("--restore-wait needs --api-socket (snapshot.restore arrives there)")
    _check_socket_path(ns.api_socket, "--api-socket")
    return WaitConfig(
        api_socket=ns.api_socket,
        sandbox=None if ns.sandbox is None else _choice(ns.sandbox, "--sandbox", SANDBOX_MODES),
        log_level="info" if ns.log_level is None else _choice(ns.log_level, "--log-level", LOG_LEVELS),
        device_timeout=None if ns.device_timeout is None else _float(ns.device_timeout, "--device-timeout"),
        spares=DEFAULT_SPARES if ns.spare_devices is None else _int(ns.spare_devices, "--spare-devices",
                                                                    0, MAX_SPARES))


RESTORE_PARAMS = {
    "type": "object",
    "properties": {
        "path": {"type": "string", "minLength": 1, "description": "snapshot directory (as vmmd --restore DIR)"},
        "clock": {"type": "string", "enum": ["advance", "freeze"], "description": "guest clock (default advance)"},
        "paused": {"type": "boolean", "description": "leave the vCPUs paused (vm.resume starts them)"},
        "disks": {"type": "object", "description": "PCI slot -> disk image (--disk SLOT=PATH)"},
        "nets": {"type": "object", "description": "PCI slot -> tap=NAME or socket=PATH (--net)"},
        "consoles": {"type": "object", "description": "com1|com2 -> stdio|null|file,PATH|socket,PATH (-l)"},
        "sandbox": {"type": "string", "enum": list(SANDBOX_MODES)},
        "device_timeout": {"type": "number"},
    },
    "required": ["path"],
    "additionalProperties": False,
}
RESTORE_RESULT = {
    "type": "object",
    "description": "the restore's figures (ms): total_ms from the call's arrival to the vCPUs started, "
                   "checks_ms, ram_ms, setup_ms, devices_started_ms, device_states_ms, kvm_ms; state",
}


def params_to_argv(params: dict) -> list[str]:
    """snapshot.restore's params as `vmmd --restore`'s command line (checked by its parser)."""
    argv = ["--restore", params["path"], "--clock", params.get("clock", "advance")]
    if params.get("paused"):
        argv.append("--paused")
    for key, flag in (("disks", "--disk"), ("nets", "--net")):
        for slot, value in (params.get(key) or {}).items():
            if not isinstance(value, str):
                raise ConfigError(f"{key}.{slot}: expected a string")
            argv += [flag, f"{slot}={value}"]
    for port, spec in (params.get("consoles") or {}).items():
        if not isinstance(spec, str):
            raise ConfigError(f"consoles.{port}: expected a string")
        argv += ["-l", f"{port},{spec}"]
    if "sandbox" in params:
        argv += ["--sandbox", params["sandbox"]]
    if "device_timeout" in params:
        argv += ["--device-timeout", str(params["device_timeout"])]
    return argv


class Waiter:
    """The waiting vmmd: its registry before a VM exists, the restore, the hand-over."""

    def __init__(self, wcfg: WaitConfig, kvm, spares):
        self.wcfg = wcfg
        self.kvm = kvm
        self.spares = spares
        self.machine = None
        self.dispatcher: Dispatcher | None = None
        self.started_at = time.monotonic()
        self._busy = False
        self._stack = contextlib.ExitStack()   # the raw terminal of a stdio console
        self.done: asyncio.Future = asyncio.get_running_loop().create_future()

    # -- the API while waiting ------------------------------------------------------
    def registry(self) -> Registry:
        import vmmd
        from bus.types import PROTOCOL_VERSION
        from vmmd.api import openrpc
        from vmmd.api.methods import VERSION_SCHEMA, VmStateError, build_registry
        reg = Registry()
        reg.add("snapshot.restore", self.restore, RESTORE_PARAMS, RESTORE_RESULT,
                "Restore a snapshot into this waiting vmmd; returns once its vCPUs run")
        reg.add("vm.info", lambda p: self.info(), None,
                {"type": "object", "properties": {
                    "state": {"type": "string", "enum": ["waiting", "restoring"]},
                    "spares": {"type": "object", "description": "spare device processes: ready, starting"}}},
                "state \"waiting\" (no VM yet) or \"restoring\", and the spare device processes")
        reg.add("vm.shutdown", self.shutdown, None, {"type": "null"}, "Stop this waiting vmmd")
        reg.add("vmm.version", lambda p: {"version": vmmd.__version__, "protocol": PROTOCOL_VERSION},
                None, VERSION_SCHEMA, "vmmd version and device bus protocol version")

        def no_vm(params):
            raise VmStateError("no VM yet: this vmmd waits for snapshot.restore")
        class NoVm:   # build_registry only keeps references; nothing is called
            def __getattr__(self, name):
                return None
        for m in build_registry(NoVm()):   # the VM's methods: a clear error until there is one
            if m.name not in reg and m.name != "rpc.discover":
                reg.add(m.name, no_vm, m.params_schema, m.result_schema, m.summary)
        reg.add("rpc.discover", lambda p: openrpc.build_document(reg), None, {"type": "object"},
                "This API as an OpenRPC document")
        return reg

    def info(self) -> dict:
        return {"state": "restoring" if self._busy else "waiting", "vcpus": 0, "memory_bytes": 0,
                "uptime_s": round(time.monotonic() - self.started_at, 3), "devices": [],
                "spares": self.spares.status()}

    async def shutdown(self, params) -> None:
        asyncio.get_running_loop().call_soon(self.finish, 0)

    def finish(self, code: int) -> None:
        if not self.done.done():
            self.done.set_result(code)

    # -- snapshot.restore -------------------------------------------------------------
    async def restore(self, params: dict) -> dict:
        from vmmd.api.methods import VmStateError
        arrived = time.monotonic()
        if self._busy or self.machine is not None:
            raise VmStateError("a restore is already under way")
        self._busy = True
        try:
            return await self._restore(params, arrived)
        finally:
            self._busy = False

    async def _restore(self, params: dict, arrived: float) -> dict:
        from vmmd.machine import Machine
        from vmmd.snapshot import restore as snaprestore
        from vmmd.snapshot.format import SnapshotError
        loop = asyncio.get_running_loop()
        try:
            req = snaprestore.parse_restore_args(params_to_argv(params))
        except ConfigError as exc:
            raise _refusal(INVALID_PARAMS, exc) from None
        if req.sandbox is None:
            req.sandbox = self.wcfg.sandbox
        if req.device_timeout is None:
            req.device_timeout = self.wcfg.device_timeout
        work = loop.run_in_executor(None, snaprestore.prepare, req)
        try:
            prepared = await asyncio.shield(work)
        except asyncio.CancelledError:   # vmmd stopping mid-call: what prepare() made goes
            with contextlib.suppress(BaseException):
                done = await work
                done.memory.close()
                done.discard_overlays()
            raise
        except (ConfigError, SnapshotError) as exc:
            raise _refusal(RESTORE_REFUSED, exc) from None
        except OSError as exc:
            raise _refusal(RESTORE_REFUSED, f"snapshot: {exc}") from None
        prepared.cfg = dataclasses.replace(prepared.cfg, api_socket=self.wcfg.api_socket)
        prepared.timings.update(main_at=arrived, since="the snapshot.restore call")
        logging.getLogger().setLevel(getattr(logging, prepared.cfg.log_level.upper(), logging.INFO))
        machine = Machine(prepared.cfg, memory=prepared.memory, restore=prepared, kvm=self.kvm,
                          spares=self.spares)
        if "stdio" in dict(prepared.cfg.consoles).values():
            from vmmd.cli import raw_terminal
            self._stack.enter_context(raw_terminal(True))
        try:
            await machine.start()
        except BaseException as exc:
            await self._undo(machine, prepared)
            if isinstance(exc, (ConfigError, SnapshotError)):
                raise _refusal(RESTORE_REFUSED, exc) from None
            if isinstance(exc, Exception):
                log.error("restore of %s failed", req.path, exc_info=True)
                raise _refusal(RESTORE_REFUSED, f"{type(exc).__name__}: {exc}") from None
            raise
        self._became_vm(machine)
        return {**(machine.restore_report or {}), "state": machine.state}

    async def _undo(self, machine, prepared) -> None:
        """A refusal after processes started: all of it goes, vmmd waits again."""
        from vmmd.cli import remove_console_sockets
        with contextlib.suppress(Exception):
            await machine._teardown()
        remove_console_sockets(prepared.cfg)
        prepared.memory.close()
        prepared.discard_overlays()
        self._stack.close()
        logging.getLogger().setLevel(getattr(logging, self.wcfg.log_level.upper(), logging.INFO))
        asyncio.get_running_loop().run_in_executor(None, self.spares.fill)   # replace the used ones

    def _became_vm(self, machine) -> None:
        """From now on an ordinary vmmd: the VM's API, its signals, its end."""
        from vmmd.api.methods import VmStateError, build_registry
        self.machine = machine
        loop = asyncio.get_running_loop()
        reg = build_registry(machine)

        def already(params):
            raise VmStateError("this vmmd already runs a restored VM")
        reg.add("snapshot.restore", already, RESTORE_PARAMS, RESTORE_RESULT,
                "Restore a snapshot into a waiting vmmd (this one no longer waits)")
        self.dispatcher.registry = reg
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, machine._finish, 0)
        loop.run_in_executor(None, self.spares.close)   # device restarts start cold, as anywhere
        loop.create_task(self._run_vm(machine))

    async def _run_vm(self, machine) -> None:
        from vmmd.cli import remove_console_sockets
        code = 1
        try:
            code = await machine.wait()
        finally:
            await machine._teardown()
            remove_console_sockets(machine.cfg)
            self._stack.close()
            self.finish(code)


async def serve_waiting(wcfg: WaitConfig) -> int:
    """Everything a restore needs, ready; the API until the VM (or the wait) ends."""
    from vmmd.api.limits import DEFAULT_LIMITS
    from vmmd.api.server import ServeError, serve
    from vmmd.kvm import Kvm
    from vmmd.kvm.api import KvmError
    from vmmd.runcontrol import install_kick_handler
    from vmmd.spare_pool import SparePool
    from vmmd.supervisor import become_subreaper
    # Imported now, not on the restore's clock.
    import vmmd.machine  # noqa: F401
    import vmmd.snapshot.create  # noqa: F401
    import vmmd.snapshot.restore  # noqa: F401
    import vmmd.api.methods  # noqa: F401
    try:
        kvm = Kvm()
    except KvmError as exc:
        raise ConfigError(str(exc)) from None
    install_kick_handler()
    become_subreaper()
    loop = asyncio.get_running_loop()
    spares = SparePool(wcfg.spares, isolate=True)
    limits = DEFAULT_LIMITS.fitted_to(resource.getrlimit(resource.RLIMIT_NOFILE)[0])
    waiter = Waiter(wcfg, kvm, spares)
    waiter.dispatcher = Dispatcher(waiter.registry(), max_batch=limits.max_batch, max_reply=limits.max_reply)
    try:
        server = await serve(wcfg.api_socket, waiter.dispatcher, limits=limits)
    except ServeError as exc:
        kvm.close()
        raise ConfigError(f"--api-socket: {exc}") from None
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, waiter.finish, 0)
    fill = loop.run_in_executor(None, spares.fill)
    log.info("waiting for snapshot.restore on %s (%d spare device processes)", wcfg.api_socket, wcfg.spares)
    try:
        return await waiter.done
    finally:
        server.close()
        with contextlib.suppress(Exception):
            await server.wait_closed()
        with contextlib.suppress(Exception):
            await fill
        spares.close()
        spares.close_cgroups()   # the VM's devices (and their cgroups) are gone by now
        if waiter.machine is None:
            kvm.close()
