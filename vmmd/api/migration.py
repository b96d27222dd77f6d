"""JSON-RPC migration.start / migration.status / migration.cancel
(vmmd/migration/control.py does the work; docs/migration.md)."""

from __future__ import annotations

from vmmd.api.jsonrpc import Registry

START_PARAMS = {
    "type": "object",
    "properties": {
        "uri": {"type": "string", "minLength": 1, "description": "unix:PATH or tcp:HOST:PORT"},
        "downtime_ms": {"type": "number", "minimum": 0.001, "description": "allowed downtime (300)"},
        "max_bandwidth_mibs": {"type": ["number", "null"], "minimum": 0.001,
                               "description": "bandwidth limit in MiB/s (null: none)"},
        "auto_converge": {"type": "boolean", "description": "throttle vCPUs when dirtying outpaces sending"},
        "timeout_s": {"type": ["number", "null"], "minimum": 0.001,
                      "description": "give up (the VM runs on here) after this long (600)"},
        "insecure": {"type": "boolean", "description": "allow plain TCP to another host"},
        "tls": {"type": "object", "properties": {"cert": {"type": "string"}, "key": {"type": "string"},
                                                 "ca": {"type": "string"}},
                "required": ["cert", "key", "ca"], "additionalProperties": False},
    },
    "required": ["uri"],
    "additionalProperties": False,
}
STATUS_RESULT = {
    "type": "object",
    "description": "state (none, setup, active, switchover, completed, failed, cancelled), iteration, "
                   "bytes_sent, ram_bytes_sent, remaining_dirty_bytes, dirty_rate_mibs, bandwidth_mibs, kvm_dirty_log, "
                   "expected_downtime_ms, downtime_ms (final, pause to destination running), "
                   "throttle_pct, total_ms, error",
    "properties": {"state": {"type": "string"}},
    "required": ["state"],
}


def register(registry: Registry, control) -> None:
    mig = getattr(control, "migration", None)
    if mig is None:
        return

    async def start(params: dict) -> dict:
        return await mig.start(params)

    async def cancel(params: dict) -> dict:
        return await mig.cancel()

    registry.add("migration.start", start, START_PARAMS, STATUS_RESULT,
                 "Start a live migration to a `vmmd --incoming` destination (returns at once)")
    registry.add("migration.status", lambda p: mig.status(), None, STATUS_RESULT,
                 "Progress of the current or last migration")
    registry.add("migration.cancel", cancel, None, STATUS_RESULT,
                 "Cancel the running migration (before the switchover): the VM runs on here")
