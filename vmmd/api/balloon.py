"""JSON-RPC methods of the virtio-balloon: balloon.set and balloon.info.

    balloon.set  {"size_mib": int, "stats_interval_s"?: number}  -> balloon.info's result
                 (size_mib may be left out when only the interval changes)
    balloon.info {}                                               -> {target_mib, actual_mib, stats,
                 stats_age_s, reclaimed_bytes, ignored_pfns, ...}

The balloon device process owns its config space; vmmd reaches it with
CONTROL "device" ops (devices/virtio_balloon/model.py device_control):
"set" {num_pages, stats_interval} and "info". The control call blocks on
the device's bus, so it runs in an executor, off vmmd's loop.

The control object must provide balloon_device() -> ManagedDevice | None
(vmmd.machine.Machine) and info()["memory_bytes"].
Errors: no balloon device -> NO_SUCH_DEVICE; a size beyond guest RAM or no
change requested -> INVALID_PARAMS; the device not running -> VM_STATE_ERROR.
"""

from __future__ import annotations

import asyncio
import functools
from typing import Any

from vmmd.api.jsonrpc import (
    INTERNAL_ERROR, INVALID_PARAMS, NO_SUCH_DEVICE, VM_STATE_ERROR, ApiError, Registry)

MiB = 1 << 20
PAGES_PER_MIB = MiB >> 12   # balloon pages are 4 KiB
MAX_INTERVAL = 86400

SET_PARAMS = {
    "type": "object",
    "properties": {
        "size_mib": {"type": "integer", "minimum": 0,
                     "description": "balloon target in MiB (memory taken from the guest)"},
        "stats_interval_s": {"type": "number", "minimum": 0, "maximum": MAX_INTERVAL,
                             "description": "seconds between guest stats requests (0: off)"},
    },
    "additionalProperties": False,
}

_N = {"type": "integer", "minimum": 0}
INFO_SCHEMA = {
    "type": "object",
    "properties": {
        "device": {"type": "string"},
        "target_mib": {"type": "number", "minimum": 0},
        "actual_mib": {"type": "number", "minimum": 0, "description": "as the guest driver reports it"},
        "target_pages": _N, "actual_pages": _N,
        "ballooned_pages": {"type": "integer", "minimum": 0,
                            "description": "4 KiB pages the device holds in its ballooned set"},
        "stats": {"type": "object", "description": "last guest memory stats: name -> value "
                                                   "(bytes for memory sizes, counts otherwise)"},
        "stats_age_s": {"type": ["number", "null"], "description": "null before the first stats"},
        "stats_interval_s": {"type": "number", "minimum": 0},
        "reclaimed_bytes": {"type": "integer", "minimum": 0,
                            "description": "bytes punched out of guest memory so far "
                                           "(inflated and reported pages)"},
        "balloon_reclaimed_bytes": {"type": "integer", "minimum": 0,
                                    "description": "bytes of the balloon given back to the host now"},
        "ignored_pfns": {"type": "integer", "minimum": 0,
                         "description": "page numbers outside guest RAM, ignored"},
    },
    "required": ["target_mib", "actual_mib", "stats", "stats_age_s", "reclaimed_bytes", "ignored_pfns"],
}


def _device(control):
    find = getattr(control, "balloon_device", None)
    dev = find() if find is not None else None
    if dev is None:
        raise ApiError(NO_SUCH_DEVICE, "no virtio-balloon device (add one with -s SLOT,virtio-balloon)")
    return dev


async def _device_op(dev, op: str, args: dict | None = None) -> Any:
    from bus import endpoint
    loop = asyncio.get_running_loop()
    call = functools.partial(dev.operator_control, "device", {"op": op, "args": args or {}})
    try:
        return await loop.run_in_executor(None, call)
    except endpoint.DeviceControlError as exc:
        raise ApiError(INVALID_PARAMS if op == "set" else INTERNAL_ERROR,
                       f"{dev.spec.id}: {exc}") from None
    except endpoint.ChannelError as exc:
        raise ApiError(VM_STATE_ERROR, f"{dev.spec.id} is not available: {exc}") from None


def _info(dev, raw: dict) -> dict:
    out = {"device": dev.spec.id,
           "target_mib": raw["target_pages"] / PAGES_PER_MIB,
           "actual_mib": raw["actual_pages"] / PAGES_PER_MIB}
    out.update(raw)
    for k in ("target_mib", "actual_mib"):
        if out[k] == int(out[k]):
            out[k] = int(out[k])
    return out


def register(registry: Registry, control) -> None:
    """Add balloon.set and balloon.info to the registry."""

    async def balloon_set(params: dict) -> dict:
        dev = _device(control)
        args: dict = {}
        if "size_mib" in params:
            size = params["size_mib"]
            memory = control.info().get("memory_bytes", 0)
            if size * MiB > memory:
                raise ApiError(INVALID_PARAMS, f"size_mib {size} is more than guest RAM "
                                               f"({memory // MiB} MiB)")
            args["num_pages"] = size * PAGES_PER_MIB
        if "stats_interval_s" in params:
            args["stats_interval"] = params["stats_interval_s"]
        if not args:
            raise ApiError(INVALID_PARAMS, "give size_mib and/or stats_interval_s")
        return _info(dev, await _device_op(dev, "set", args))

    async def balloon_info(params: dict) -> dict:
        dev = _device(control)
        return _info(dev, await _device_op(dev, "info"))

    registry.add("balloon.set", balloon_set, SET_PARAMS, INFO_SCHEMA,
                 "Set the balloon target (MiB taken from the guest) and/or the stats interval")
    registry.add("balloon.info", balloon_info, None, INFO_SCHEMA,
                 "Balloon target and actual size, last guest stats with their age, bytes reclaimed")
