"""Snapshot directories: write the files (0600) and read them back verified.

The commit point of a snapshot is manifest.json.sha256, written last: a
directory without it is an incomplete snapshot and is refused.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from vmmd.snapshot import format as fmt
from vmmd.snapshot import ram as ramio
from vmmd.snapshot.format import Section, SnapshotError

MAX_CHAIN = 64
MAX_MANIFEST = 16 << 20


class SnapshotWriter:
    """A new snapshot directory; files are created exclusively, mode 0600."""

    def __init__(self, path: str):
        self.path = os.path.abspath(path)
        try:
            os.mkdir(self.path, 0o700)
        except FileExistsError:
            if not os.path.isdir(self.path) or os.listdir(self.path):
                raise SnapshotError(f"{path}: exists and is not an empty directory") from None
            os.chmod(self.path, 0o700)
        except OSError as exc:
            raise SnapshotError(f"{path}: cannot create: {exc.strerror}") from None
        self.sections: list[Section] = []

    def open(self, name: str) -> int:
        return os.open(os.path.join(self.path, name), os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_CLOEXEC, 0o600)

    def write_file(self, name: str, data: bytes, sync: bool = False) -> None:
        fd = self.open(name)
        try:
            ramio._pwrite_all(fd, memoryview(data), 0)
            if sync:
                os.fsync(fd)
        finally:
            os.close(fd)

    def add_json(self, kind: str, instance: str, payload: dict, **extra) -> Section:
        data = fmt.encode_json_section(kind, instance, payload)
        s = fmt.make_section(kind, instance, data, **extra)
        self.write_file(s.file, data)
        self.sections.append(s)
        return s

    def add_binary(self, kind: str, data: bytes, **extra) -> Section:
        s = fmt.make_section(kind, kind, data, **extra)
        self.write_file(s.file, data)
        self.sections.append(s)
        return s

    def add_ram(self, size: int, digest: str, **extra) -> Section:
        s = fmt.Section("ram", "ram", fmt.SECTION_VERSIONS["ram"], "ram.img", size, digest,
                        {"digest": "sha256-nonzero-pages-v1", **extra})
        self.sections.append(s)
        return s

    def commit(self, manifest: dict, sync: bool = True) -> None:
        """Write the manifest, then its digest (the commit point). sync: every
        file and the directory reach the disk before the commit point does, and
        it before this returns; without, they stay in the page cache (a crash
        can then leave a committed snapshot whose sections fail their digests:
        refused at restore, never run)."""
        manifest = dict(manifest, sections=[s.to_json() for s in self.sections])
        body, digest = fmt.encode_manifest(manifest)
        self.write_file(fmt.MANIFEST, body)
        if not sync:
            self.write_file(fmt.MANIFEST_DIGEST, digest)
            return
        dfd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for name in os.listdir(self.path):
                fd = os.open(os.path.join(self.path, name), os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            os.fsync(dfd)  # every file and its name on disk before the commit point exists
            self.write_file(fmt.MANIFEST_DIGEST, digest, sync=True)
            os.fsync(dfd)
        finally:
            os.close(dfd)


@dataclass
class LoadedSnapshot:
    """A snapshot whose manifest and JSON sections are verified."""
    path: str
    manifest: dict
    sections: list[Section]
    payloads: dict = field(default_factory=dict)  # (kind, instance) -> payload

    @property
    def id(self) -> str:
        return self.manifest["id"]

    def payload(self, kind: str, instance: str):
        return self.payloads.get((kind, instance))

    def file(self, section: Section) -> str:
        return os.path.join(self.path, section.file)


def _read(path: str, limit: int) -> bytes:
    with open(path, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise SnapshotError(f"{path}: larger than {limit} bytes")
    return data


def read_manifest(path: str) -> tuple[dict, list[Section]]:
    if not os.path.isdir(path):
        raise SnapshotError(f"{path}: not a directory")
    mpath = os.path.join(path, fmt.MANIFEST)
    if not os.path.exists(mpath):
        raise SnapshotError(f"{path}: no {fmt.MANIFEST}: not a vmmd snapshot")
    body = _read(mpath, MAX_MANIFEST)
    dpath = os.path.join(path, fmt.MANIFEST_DIGEST)
    digest = _read(dpath, 256) if os.path.exists(dpath) else None
    manifest, sections = fmt.parse_manifest(body, digest)
    if "disks" in manifest:
        from vmmd.snapshot.disks import check_entries
        if manifest["format_version"] < 2:
            raise SnapshotError(f"{fmt.MANIFEST}: format version 1 has no disk checkpoints")
        check_entries(manifest["disks"])
    return manifest, sections


def open_snapshot(path: str) -> LoadedSnapshot:
    """Read the manifest and every JSON section, checking sizes and SHA-256."""
    path = os.path.abspath(path)
    manifest, sections = read_manifest(path)
    snap = LoadedSnapshot(path, manifest, sections)
    for s in sections:
        fpath = snap.file(s)
        try:
            st = os.stat(fpath)
        except FileNotFoundError:
            raise SnapshotError(f"section {s.kind}/{s.instance}: file {s.file} is missing") from None
        if st.st_size != s.size:
            raise SnapshotError(f"section {s.kind}/{s.instance} ({s.file}): {st.st_size} bytes, "
                                f"the manifest says {s.size} (truncated?)")
        if s.kind == "ram":
            continue
        data = _read(fpath, max(s.size, 1) + 1)
        if s.kind in fmt.BINARY_KINDS:
            fmt.verify_bytes(s, data)
            snap.payloads[(s.kind, s.instance)] = data
        else:
            snap.payloads[(s.kind, s.instance)] = fmt.decode_json_section(s, data)
    return snap


def open_chain(path: str) -> list[LoadedSnapshot]:
    """The snapshot at `path` and its parents, base (full) first."""
    chain: list[LoadedSnapshot] = []
    seen: set[str] = set()
    cur = path
    while True:
        snap = open_snapshot(cur)
        if snap.id in seen or len(chain) >= MAX_CHAIN:
            raise SnapshotError(f"{cur}: diff chain loops or is longer than {MAX_CHAIN}")
        seen.add(snap.id)
        chain.append(snap)
        if snap.manifest["type"] == "full":
            break
        parent = snap.manifest["parent"]
        ppath = parent["path"] if os.path.isabs(parent["path"]) else os.path.join(snap.path, parent["path"])
        try:
            pm, _ = read_manifest(ppath)
        except SnapshotError as exc:
            raise SnapshotError(f"{cur}: its parent {ppath}: {exc}") from None
        if pm["id"] != parent["id"]:
            raise SnapshotError(f"{cur}: parent {ppath} is snapshot {pm['id']}, not {parent['id']}")
        cur = ppath
    chain.reverse()
    base = chain[0].manifest["memory"]
    for s in chain[1:]:
        if s.manifest["memory"] != base:
            raise SnapshotError(f"{s.path}: memory layout differs from its parent's")
    return chain


def pages_mask(snap: LoadedSnapshot, pages: int):
    import numpy as np  # diffs only: a full restore does not import it
    data = snap.payload("ram-pages", "ram-pages")
    if data is None or len(data) != ramio.page_bitmap_bytes(pages):
        raise SnapshotError(f"{snap.path}: ram-pages bitmap has the wrong size")
    return np.unpackbits(np.frombuffer(data, dtype=np.uint8), count=pages, bitorder="little").astype(bool)


def load_chain_ram(chain: list[LoadedSnapshot], view: memoryview, size: int, mem_fd: int | None = None) -> None:
    """Guest RAM of the chain's tip into `view` (an empty memfd mapping; `mem_fd`
    that memfd, so the base image is copied in the kernel), every image verified."""
    for snap in chain:
        s = fmt.find(snap.sections, "ram")
        if s.size != size:
            raise SnapshotError(f"{snap.path}: RAM image is {s.size} bytes, guest RAM is {size}")
        fd = os.open(snap.file(s), os.O_RDONLY | os.O_CLOEXEC)
        try:
            if snap.manifest["type"] == "full":
                digest = ramio.load_ram(fd, size, view, dst_fd=mem_fd)
            else:
                digest = ramio.overlay_ram(fd, size, view, pages_mask(snap, size // ramio.PAGE))
        except ramio.RamError as exc:
            raise SnapshotError(f"{snap.path}: {s.file}: {exc}") from None
        finally:
            os.close(fd)
        if digest != s.sha256:
            raise SnapshotError(f"{snap.path}: {s.file}: SHA-256 mismatch (the RAM image is corrupted)")
