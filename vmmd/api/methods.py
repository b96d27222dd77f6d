"""The control API's methods and the VmControl interface they call.

vmmd.machine implements VmControl. Other modules add their own methods to the
registry returned by build_registry(), e.g.

    registry.add("balloon.set", handler, params_schema, result_schema, "summary")
"""

from __future__ import annotations

from typing import Any, Protocol

import vmmd
from bus.types import PROTOCOL_VERSION
from vmmd.api import balloon, migration, openrpc, snapshot
from vmmd.api.jsonrpc import NO_SUCH_DEVICE, VM_STATE_ERROR, ApiError, Registry

VM_STATES = ("created", "running", "paused", "resetting", "shutdown")


class VmStateError(ApiError):
    """The VM's current state forbids the call (e.g. pause while paused)."""

    def __init__(self, message: str, data: Any = None):
        super().__init__(VM_STATE_ERROR, message, data)


class NoSuchDevice(ApiError):
    """No device with the given id."""

    def __init__(self, message: str, data: Any = None):
        super().__init__(NO_SUCH_DEVICE, message, data)


class VmControl(Protocol):
    """What the control API needs from the running machine."""

    def info(self) -> dict:
        """{"state": one of VM_STATES, "vcpus": int, "memory_bytes": int,
        "uptime_s": float, "devices": devices()}; more keys are passed through."""
        ...

    async def pause(self) -> None:
        """Stop all vCPUs; VmStateError unless running."""
        ...

    async def resume(self) -> None:
        """Restart the vCPUs; VmStateError unless paused."""
        ...

    async def reset(self) -> None:
        """Reset the machine (devices and vCPUs); VmStateError once shut down."""
        ...

    async def shutdown(self) -> None:
        """Stop the VM and its devices; VmStateError if already shut down."""
        ...

    def devices(self) -> list[dict]:
        """[{"id": str, "type": str, "pid": int|None, "state": str,
        "restarts": int, "sandbox": "on"|"log"|"off"}, ...]"""
        ...

    async def restart_device(self, device_id: str) -> None:
        """Kill and respawn one device process; NoSuchDevice if unknown."""
        ...

    async def device_stats(self, device_id: str) -> dict:
        """The device process's counters as of its last heartbeat, plus vmmd's own under
        "vmmd" (state, refusals, stats_age_s); NoSuchDevice if unknown."""
        ...

    async def set_link(self, device_id: str, up: bool) -> dict:
        """virtio-net link state: {"was_up": bool, "up": bool}; NoSuchDevice if unknown
        or not a NIC."""
        ...

    async def vcpu_states(self) -> list[dict]:
        """Each vCPU's registers and exit counts (VCPU_STATE_SCHEMA), read with
        the vCPUs briefly paused; VmStateError unless running or paused."""
        ...


# ---------------------------------------------------------------------------
# Schemas (result schemas are documentation; params schemas are enforced)

DEVICE_SCHEMA = {
    "type": "object",
    "properties": {
        "id": {"type": "string"},
        "type": {"type": "string"},
        "pid": {"type": ["integer", "null"], "description": "null while not running"},
        "state": {"type": "string", "description": "starting, running, unresponsive, crashed, restarting, "
                                                   "failed (crash-loop limit; device.restart revives), stopped"},
        "restarts": {"type": "integer", "minimum": 0},
        "sandbox": {"type": "string", "enum": ["on", "log", "off"]},
        "refused": {"type": "object",
                    "description": "messages from the device vmmd refused, by kind (vector, irq_line, msi, "
                                   "request, state_size, malformed, oversized, stale_replies, unexpected)"},
        "refused_total": {"type": "integer", "minimum": 0},
        "log_lines_suppressed": {"type": "integer", "minimum": 0,
                                 "description": "device-provoked log lines dropped by the rate limit"},
        "heartbeats": {"type": "integer", "minimum": 0},
    },
    "required": ["id", "type", "pid", "state", "restarts", "sandbox"],
}

INFO_SCHEMA = {
    "type": "object",
    "properties": {
        "state": {"type": "string", "enum": list(VM_STATES)},
        "vcpus": {"type": "integer", "minimum": 1},
        "memory_bytes": {"type": "integer", "minimum": 0},
        "uptime_s": {"type": "number", "minimum": 0},
        "devices": {"type": "array", "items": DEVICE_SCHEMA},
    },
    "required": ["state", "vcpus", "memory_bytes", "uptime_s", "devices"],
}

NULL_RESULT = {"type": "null"}

VERSION_SCHEMA = {
    "type": "object",
    "properties": {
        "version": {"type": "string", "description": "vmmd version"},
        "protocol": {"type": "integer", "description": "device bus protocol version"},
    },
    "required": ["version", "protocol"],
}


_U64 = {"type": "integer", "minimum": 0}

VCPU_STATE_SCHEMA = {
    "type": "object",
    "description": "One vCPU as KVM_GET_REGS/KVM_GET_SREGS/KVM_GET_MP_STATE see it "
                   "(register values are unsigned integers)",
    "properties": {
        "index": {"type": "integer", "minimum": 0},
        "rip": _U64, "rsp": _U64, "rflags": _U64,
        "cr0": _U64, "cr3": _U64, "cr4": _U64, "efer": _U64,
        "cs": {"type": "integer", "minimum": 0, "description": "CS selector"},
        "cpl": {"type": "integer", "minimum": 0, "maximum": 3, "description": "CS.DPL"},
        "mp_state": {"type": "integer", "minimum": 0,
                     "description": "KVM_MP_STATE_*: 0 runnable, 1 uninitialized, 3 halted, ..."},
        "gprs": {"type": "object", "description": "rax..r15 by name"},
        "exits": {"type": "object", "description": "exits counted by the vCPU thread: name -> count"},
        "assists": {"type": "object", "description": "assists that fired on this vCPU: name -> count"},
        "kvm_stats": {"type": "object",
                      "description": "KVM's per-vCPU counters (KVM_GET_STATS_FD): exits, irq_injections, "
                                     "insn_emulation, halt_exits, ...; {} if unavailable"},
    },
    "required": ["index", "rip", "rsp", "rflags", "cr0", "cr3", "cr4", "efer", "cs", "cpl",
                 "mp_state", "gprs", "exits", "assists", "kvm_stats"],
}


def build_registry(control: VmControl) -> Registry:
    registry = Registry()

    def action(name: str, call, summary: str) -> None:
        async def handler(params: dict) -> None:
            await call()
        registry.add(name, handler, None, NULL_RESULT, summary)

    registry.add("vm.info", lambda p: control.info(), None, INFO_SCHEMA,
                 "State, vCPU count, memory size, uptime and devices of the VM")
    action("vm.pause", control.pause, "Pause all vCPUs")
    action("vm.resume", control.resume, "Resume paused vCPUs")
    action("vm.reset", control.reset, "Reset the VM (vCPUs and devices)")
    action("vm.shutdown", control.shutdown, "Shut the VM down and stop vmmd")
    registry.add("device.list", lambda p: control.devices(),
                 None, {"type": "array", "items": DEVICE_SCHEMA},
                 "Device processes with their pid, state, restart count and sandbox mode")

    async def restart_device(params: dict) -> None:
        await control.restart_device(params["id"])

    registry.add("device.restart", restart_device,
                 {"type": "object",
                  "properties": {"id": {"type": "string", "minLength": 1, "description": "device id"}},
                  "required": ["id"], "additionalProperties": False},
                 NULL_RESULT, "Restart one device process")
    async def vcpu_states(params: dict) -> list[dict]:
        return await control.vcpu_states()

    registry.add("debug.vcpus", vcpu_states, None, {"type": "array", "items": VCPU_STATE_SCHEMA},
                 "Pause the vCPUs briefly and return their registers and exit counts")
    async def device_stats(params: dict) -> dict:
        return await control.device_stats(params["id"])

    registry.add("device.stats", device_stats,
                 {"type": "object",
                  "properties": {"id": {"type": "string", "minLength": 1, "description": "device id"}},
                  "required": ["id"], "additionalProperties": False},
                 {"type": "object", "description": "the device's counters (virtio-net: net.rx_packets, "
                                                   "rx_bytes, rx_dropped, tx_packets, tx_bytes, "
                                                   "tx_dropped, tx_malformed, ...)"},
                 "Counters of one device process")

    async def set_link(params: dict) -> dict:
        return await control.set_link(params["id"], params["up"])

    registry.add("device.set_link", set_link,
                 {"type": "object",
                  "properties": {"id": {"type": "string", "minLength": 1, "description": "NIC id"},
                                 "up": {"type": "boolean", "description": "link up (true) or down"}},
                  "required": ["id", "up"], "additionalProperties": False},
                 {"type": "object", "properties": {"was_up": {"type": "boolean"},
                                                   "up": {"type": "boolean"}}},
                 "Set a virtio-net NIC's link up or down (STATUS.LINK_UP, config interrupt)")
    registry.add("vmm.version", lambda p: {"version": vmmd.__version__, "protocol": PROTOCOL_VERSION},
                 None, VERSION_SCHEMA, "vmmd version and device bus protocol version")
    balloon.register(registry, control)  # balloon.set, balloon.info (vmmd/api/balloon.py)
    snapshot.register(registry, control)  # snapshot.create (vmmd/api/snapshot.py)
    migration.register(registry, control)  # migration.* (vmmd/api/migration.py)
    registry.add("rpc.discover", lambda p: openrpc.build_document(registry),
                 None, {"type": "object", "description": "OpenRPC 1.2.6 document"},
                 "This API as an OpenRPC document")
    return registry
