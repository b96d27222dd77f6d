"""The snapshot format, sans-I/O: manifest, sections, versions, checksums.

A snapshot is a manifest plus sections. Each section is identified by
(kind, instance) -- e.g. ("device", "2.0") for the PCI function in slot 2,
so two disks each keep their own state -- and carries its own version.
Sections other than RAM are JSON documents; binary values inside them are
written as {"$b64": "..."} (and maps with non-string keys as
{"$map": [[key, value], ...]}), so any msgpack-shaped device state survives
a JSON round trip byte for byte.

Everything here works on bytes and dicts: store.py writes them to a
directory, a migration stream can carry the same (kind, instance, version,
payload, sha256) records.
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass
from typing import Any, Callable

FORMAT_NAME = "vmmd-snapshot"
FORMAT_VERSION = 2   # 2: the manifest may record disk checkpoints ("disks"; vmmd/snapshot/disks.py)
MANIFEST = "manifest.json"
MANIFEST_DIGEST = "manifest.json.sha256"

# Section kinds and their current versions. An older section is upgraded one
# version at a time through UPGRADES[kind][from_version]; a newer one is refused.
SECTION_VERSIONS = {
    "vm": 1,         # irqchips, PIT, clock, TSC, PCI (vmmd-side MSI-X tables)
    "vcpu": 1,       # one per vCPU: registers, MSRs, LAPIC, events, ...
    "device": 1,     # one per device process: its save_state() (instance = PCI slot.function)
    "ram": 1,        # guest RAM: sparse image of the memfd (binary)
    "ram-pages": 1,  # diff snapshots: bitmap of the pages the RAM section covers (binary)
}
UPGRADES: dict[str, dict[int, Callable[[dict], dict]]] = {k: {} for k in SECTION_VERSIONS}
BINARY_KINDS = frozenset({"ram", "ram-pages"})
MAX_SECTIONS = 4096
MAX_JSON_SECTION = 64 << 20  # a JSON section larger than this is not ours


class SnapshotError(Exception):
    """A snapshot that cannot be used; the message names the problem."""


@dataclass(frozen=True)
class Section:
    kind: str
    instance: str
    version: int
    file: str
    size: int
    sha256: str
    extra: dict  # kind-specific manifest fields (e.g. device kind and id)

    def to_json(self) -> dict:
        return {"kind": self.kind, "instance": self.instance, "version": self.version,
                "file": self.file, "size": self.size, "sha256": self.sha256, **self.extra}


# -- JSON with binary fields -------------------------------------------------------
def to_jsonable(obj: Any) -> Any:
    """msgpack-shaped data -> JSON-shaped (bytes as {"$b64"}, odd keys as {"$map"})."""
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return {"$b64": base64.b64encode(bytes(obj)).decode("ascii")}
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("$") for k in obj):
            return {k: to_jsonable(v) for k, v in obj.items()}
        return {"$map": [[to_jsonable(k), to_jsonable(v)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot put a {type(obj).__name__} in a snapshot section")


def from_jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        if len(obj) == 1 and "$b64" in obj:
            text = obj["$b64"]
            if not isinstance(text, str):
                raise SnapshotError("bad $b64 value")
            try:
                return base64.b64decode(text, validate=True)
            except ValueError:
                raise SnapshotError("bad base64 in a section") from None
        if len(obj) == 1 and "$map" in obj:
            items = obj["$map"]
            if not isinstance(items, list) or not all(isinstance(i, list) and len(i) == 2 for i in items):
                raise SnapshotError("bad $map value")
            out = {}
            for k, v in items:
                k = from_jsonable(k)
                try:
                    out[k] = from_jsonable(v)
                except TypeError:
                    raise SnapshotError("unhashable $map key") from None
            return out
        return {k: from_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [from_jsonable(v) for v in obj]
    return obj


def b64(data: bytes) -> str:
    return base64.b64encode(bytes(data)).decode("ascii")


def unb64(text: Any, what: str, size: int | None = None) -> bytes:
    if not isinstance(text, str):
        raise SnapshotError(f"{what}: expected base64 text")
    try:
        data = base64.b64decode(text, validate=True)
    except ValueError:
        raise SnapshotError(f"{what}: bad base64") from None
    if size is not None and len(data) != size:
        raise SnapshotError(f"{what}: {len(data)} bytes, expected {size}")
    return data


# -- sections ------------------------------------------------------------------------
def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def encode_json_section(kind: str, instance: str, payload: dict) -> bytes:
    """The bytes of a JSON section (deterministic: same state, same bytes)."""
    doc = {"kind": kind, "instance": instance, "version": SECTION_VERSIONS[kind],
           "state": to_jsonable(payload)}
    return (json.dumps(doc, sort_keys=True, indent=1) + "\n").encode()


def section_file_name(kind: str, instance: str) -> str:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in instance)
    return f"{kind}-{safe}.json" if kind not in BINARY_KINDS else {"ram": "ram.img", "ram-pages": "ram-pages.bin"}[kind]


def make_section(kind: str, instance: str, data: bytes, *, file: str | None = None,
                 sha256: str | None = None, size: int | None = None, **extra) -> Section:
    return Section(kind, instance, SECTION_VERSIONS[kind], file or section_file_name(kind, instance),
                   len(data) if size is None else size, sha256 or sha256_hex(data), dict(extra))


def check_version(kind: str, version: Any, where: str) -> int:
    current = SECTION_VERSIONS.get(kind)
    if current is None:
        raise SnapshotError(f"{where}: unknown section kind {kind!r}")
    if type(version) is not int or version < 1:
        raise SnapshotError(f"{where}: bad section version {version!r}")
    if version > current:
        raise SnapshotError(f"{where}: section version {version} is newer than this vmmd supports "
                            f"({current}); restore it with a newer vmmd")
    for v in range(version, current):
        if v not in UPGRADES[kind]:
            raise SnapshotError(f"{where}: section version {version} can no longer be read "
                                f"(no upgrade from {v})")
    return version


def decode_json_section(entry: Section, data: bytes) -> dict:
    """Verify and parse one JSON section; returns its payload at the current version."""
    where = f"section {entry.kind}/{entry.instance} ({entry.file})"
    verify_bytes(entry, data)
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise SnapshotError(f"{where}: not valid JSON ({exc})") from None
    if not isinstance(doc, dict) or doc.get("kind") != entry.kind or doc.get("instance") != entry.instance:
        raise SnapshotError(f"{where}: does not hold the section the manifest names")
    version = check_version(entry.kind, doc.get("version"), where)
    if version != entry.version:
        raise SnapshotError(f"{where}: version {version} differs from the manifest's {entry.version}")
    state = doc.get("state")
    if not isinstance(state, dict):
        raise SnapshotError(f"{where}: state must be an object")
    state = from_jsonable(state)
    for v in range(version, SECTION_VERSIONS[entry.kind]):
        state = UPGRADES[entry.kind][v](state)
    return state


def verify_bytes(entry: Section, data: bytes) -> None:
    where = f"section {entry.kind}/{entry.instance} ({entry.file})"
    if len(data) != entry.size:
        raise SnapshotError(f"{where}: {len(data)} bytes, the manifest says {entry.size} (truncated?)")
    if sha256_hex(data) != entry.sha256:
        raise SnapshotError(f"{where}: SHA-256 mismatch (the file is corrupted)")


# -- the manifest ---------------------------------------------------------------------
def encode_manifest(manifest: dict) -> tuple[bytes, bytes]:
    """(manifest.json bytes, manifest.json.sha256 bytes)."""
    body = (json.dumps(manifest, sort_keys=True, indent=1) + "\n").encode()
    return body, (sha256_hex(body) + "\n").encode()


_HEX = frozenset("0123456789abcdef")


def _s(d: dict, key: str, kind, where: str):
    v = d.get(key)
    if kind is int:
        ok = type(v) is int and v >= 0
    else:
        ok = isinstance(v, kind) and not isinstance(v, bool)
    if not ok:
        raise SnapshotError(f"{where}: {key} missing or of the wrong type")
    return v


def parse_manifest(body: bytes, digest: bytes | None) -> tuple[dict, list[Section]]:
    """Check and parse manifest.json; returns (manifest, sections)."""
    if digest is None:
        raise SnapshotError(f"{MANIFEST_DIGEST} is missing: not a vmmd snapshot, or an incomplete one")
    if digest.strip().decode("ascii", "replace") != sha256_hex(body):
        raise SnapshotError(f"{MANIFEST} does not match {MANIFEST_DIGEST} (corrupted or truncated)")
    try:
        m = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise SnapshotError(f"{MANIFEST} is not valid JSON") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT_NAME:
        raise SnapshotError(f"{MANIFEST} is not a vmmd snapshot manifest (format {m.get('format') if isinstance(m, dict) else None!r})")
    fv = m.get("format_version")
    if type(fv) is not int or fv < 1:
        raise SnapshotError(f"{MANIFEST}: bad format_version {fv!r}")
    if fv > FORMAT_VERSION:
        raise SnapshotError(f"snapshot format version {fv} is newer than this vmmd supports "
                            f"({FORMAT_VERSION}); it was written by vmmd {m.get('vmmd_version')!r}")
    where = MANIFEST
    _s(m, "id", str, where)
    if m.get("type") not in ("full", "diff"):
        raise SnapshotError(f"{where}: type must be full or diff")
    if m["type"] == "diff":
        parent = m.get("parent")
        if not isinstance(parent, dict) or not isinstance(parent.get("id"), str) \
                or not isinstance(parent.get("path"), str):
            raise SnapshotError(f"{where}: a diff snapshot needs parent {{id, path}}")
    _s(m, "config", dict, where)
    mem = _s(m, "memory", dict, where)
    _s(mem, "size", int, f"{where}: memory")
    if not isinstance(mem.get("layout"), list):
        raise SnapshotError(f"{where}: memory.layout missing")
    raw = m.get("sections")
    if not isinstance(raw, list) or not 1 <= len(raw) <= MAX_SECTIONS:
        raise SnapshotError(f"{where}: sections must be a non-empty list")
    sections, seen, files = [], set(), set()
    for i, s in enumerate(raw):
        w = f"{where}: sections[{i}]"
        if not isinstance(s, dict):
            raise SnapshotError(f"{w}: not an object")
        kind, inst = _s(s, "kind", str, w), _s(s, "instance", str, w)
        version = check_version(kind, s.get("version"), f"{w} ({kind})")
        file = _s(s, "file", str, w)
        if "/" in file or file.startswith(".") or not file or file in (MANIFEST, MANIFEST_DIGEST):
            raise SnapshotError(f"{w}: bad file name {file!r}")
        size = _s(s, "size", int, w)
        digest_hex = _s(s, "sha256", str, w)
        if len(digest_hex) != 64 or not set(digest_hex) <= _HEX:
            raise SnapshotError(f"{w}: bad sha256")
        if (kind, inst) in seen or file in files:
            raise SnapshotError(f"{w}: section {kind}/{inst} or file {file} given twice")
        seen.add((kind, inst))
        files.add(file)
        extra = {k: v for k, v in s.items() if k not in ("kind", "instance", "version", "file", "size", "sha256")}
        if kind not in BINARY_KINDS and size > MAX_JSON_SECTION:
            raise SnapshotError(f"{w}: {size} bytes is too large for a {kind} section")
        sections.append(Section(kind, inst, version, file, size, digest_hex, extra))
    kinds = [s.kind for s in sections]
    if kinds.count("vm") != 1 or kinds.count("ram") != 1:
        raise SnapshotError(f"{where}: needs exactly one vm and one ram section")
    if (m["type"] == "diff") != ("ram-pages" in kinds):
        raise SnapshotError(f"{where}: a diff snapshot (and only a diff) has a ram-pages section")
    return m, sections


def find(sections: list[Section], kind: str, instance: str | None = None) -> Section | None:
    for s in sections:
        if s.kind == kind and (instance is None or s.instance == instance):
            return s
    return None
