"""OpenRPC 1.2.6 description of a method registry (what rpc.discover returns).

Built on each call, so methods added after startup are listed too.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import vmmd

if TYPE_CHECKING:
    from vmmd.api.jsonrpc import Registry

OPENRPC_VERSION = "1.2.6"


def build_document(registry: Registry, title: str = "vmmd control API",
                   version: str | None = None) -> dict:
    methods = []
    for m in sorted(registry, key=lambda m: m.name):
        props = m.params_schema.get("properties", {})
        required = set(m.params_schema.get("required", ()))
        methods.append({
            "name": m.name,
            "summary": m.summary,
            "paramStructure": "by-name",
            "params": [{"name": name, "schema": schema, "required": name in required}
                       for name, schema in props.items()],
            "result": {"name": f"{m.name}.result", "schema": m.result_schema},
        })
    return {
        "openrpc": OPENRPC_VERSION,
        "info": {"title": title, "version": version or vmmd.__version__},
        "methods": methods,
    }
