"""JSON-RPC snapshot.create (vmmd/snapshot/create.py does the work).

    snapshot.create {"path": DIR, "resume": true, "diff_from": DIR?, "disks": "shared"|"overlay",
                     "sync": true}
        -> {"path", "id", "type": "full"|"diff", "ram_bytes_written", "synced", "paused_ms", "total_ms",
            "phases_ms": {"capture", "ram", "commit", "digest"}, "state",
            "disks"?: {"S.F": {"mode", "frozen", "now"}}}
        disks=overlay: each writable qcow2 disk switches to a new overlay at the
        snapshot point; the snapshot records the frozen image (vmmd/snapshot/disks.py).
        A writable raw disk is refused before anything is paused.
        The VM resumes once RAM is copied (to the page cache); the RAM digest is
        then read back from the file while it is fsynced, the other files are
        fsynced and the manifest digest written: the reply comes after that.
        sync=false (Firecracker's sync_snapshot_files=false): no fsync, the
        reply comes once the snapshot is complete in the page cache (the
        RAM digest is then taken during the copy); for a pipeline that copies
        or transforms it next. A crash can then tear it; restore refuses a
        torn one by its digests.

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
        "disks": {"type": "string", "enum": ["shared", "overlay"],
                  "description": "shared (default): the disks are left alone, the snapshot names the "
                                 "live images; overlay: each writable qcow2 disk switches to a new "
                                 "external overlay at the snapshot point and the snapshot keeps the "
                                 "image as it was (raw disks are refused)"},
        "sync": {"type": "boolean",
                 "description": "fsync the snapshot before replying (default true); false: reply once it "
                                "is complete in the page cache (a crash may tear it: refused at restore)"},
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
        "synced": {"type": "boolean", "description": "the snapshot was on disk (fsynced) at the reply"},
        "paused_ms": {"type": "number"}, "total_ms": {"type": "number"},
        "phases_ms": {"type": "object", "description": "capture (devices, vCPUs, VM; includes disks), ram (the copy, paused), "
                                                       "commit (after the resume: RAM digest, fsyncs, manifest), digest (its RAM digest part); "
                                                       "disks (disks=overlay: the switch to overlays)"},
        "state": {"type": "string"},
        "disks": {"type": "object", "description": "disks=overlay: per PCI slot.function, "
                  "{mode: overlay|read-only, frozen: the image the snapshot keeps, now: the image the VM runs on}"},
    },
    "required": ["path", "id", "type"],
}


def register(registry: Registry, control) -> None:
    async def create(params: dict) -> dict:
        extra = {k: params[k] for k in ("disks", "sync") if k in params}
        return await control.snapshot(params["path"], params.get("resume", True), params.get("diff_from"),
                                      **extra)

    registry.add("snapshot.create", create, CREATE_PARAMS, CREATE_RESULT,
                 "Pause, save the VM (vCPUs, devices, RAM) to a directory, resume unless told not to")
