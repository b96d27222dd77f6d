"""JSON-RPC snapshot.create (vmmd/snapshot/create.py does the work).

    snapshot.create {"path": DIR, "resume": true, "diff_from": DIR?}
        -> {"path", "id", "type": "full"|"diff", "ram_bytes_written", "paused_ms", "total_ms",
            "phases_ms": {"capture", "ram", "commit"}, "state"}
        The VM resumes once RAM is written (to the page cache); the files are
        then fsynced and the manifest digest written: the reply comes after that.

While it runs, vm.info's "snapshot" holds {"phase", "bytes_done", "bytes_total", "path"}.
"""

from __future__ import annotations

from vmmd.api.jsonrpc import Registry

CREATE_PARAMS = {
    "type": "object",
    "properties": {
        "path": {"type": "string", "minLength": 1,
                 "description": "new (or empty) directory to write the snapshot into"},
        "resume": {"type": "boolean", "description": "resume the VM afterwards (default true)"},
        "diff_from": {"type": "string", "minLength": 1,
                      "description": "parent snapshot: save only pages dirtied since it"},
    },
    "required": ["path"],
    "additionalProperties": False,
}
CREATE_RESULT = {
    "type": "object",
    "properties": {
        "path": {"type": "string"}, "id": {"type": "string"},
        "type": {"type": "string", "enum": ["full", "diff"]},
        "ram_bytes_written": {"type": "integer", "minimum": 0},
        "paused_ms": {"type": "number"}, "total_ms": {"type": "number"},
        "phases_ms": {"type": "object", "description": "capture (devices, vCPUs, VM), ram, commit (fsync)"},
        "state": {"type": "string"},
    },
    "required": ["path", "id", "type"],
}


def register(registry: Registry, control) -> None:
    async def create(params: dict) -> dict:
        return await control.snapshot(params["path"], params.get("resume", True), params.get("diff_from"))

    registry.add("snapshot.create", create, CREATE_PARAMS, CREATE_RESULT,
                 "Pause, save the VM (vCPUs, devices, RAM) to a directory, resume unless told not to")
