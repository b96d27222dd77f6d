"""`vmmd-snapshot`: offline snapshot tools.

    vmmd-snapshot verify DIR          check a snapshot (chain) whole: manifest, every
                                      section's SHA-256, the RAM digests
    vmmd-snapshot merge DIR OUT       write the full snapshot a diff chain ending at DIR
                                      stands for (same id as DIR, so diffs taken from
                                      DIR still apply on top of OUT)
    vmmd-snapshot info DIR            the manifest, summarised

Errors print one "vmmd-snapshot: error: ..." line and exit 2.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import sys

from vmmd.snapshot import format as fmt
from vmmd.snapshot import ram as ramio
from vmmd.snapshot import store
from vmmd.snapshot.format import SnapshotError


def _scratch(size: int):
    fd = os.memfd_create("vmmd-snapshot-merge", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    m = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    return fd, m


def verify(path: str) -> dict:
    chain = store.open_chain(path)
    size = chain[-1].manifest["memory"]["size"]
    fd, m = _scratch(size)
    try:
        view = memoryview(m)
        store.load_chain_ram(chain, view, size, fd)
        view.release()
    finally:
        m.close()
        os.close(fd)
    return {"ok": True, "chain": [s.path for s in chain]}


def merge(path: str, out: str) -> dict:
    chain = store.open_chain(path)
    tip = chain[-1]
    size = tip.manifest["memory"]["size"]
    fd, m = _scratch(size)
    view = memoryview(m)
    try:
        store.load_chain_ram(chain, view, size, fd)
        writer = store.SnapshotWriter(out)
        try:
            rfd = writer.open("ram.img")
            try:
                digest, written = ramio.save_ram(view, fd, size, rfd)
            finally:
                os.close(rfd)
            writer.add_ram(size, digest, bytes_written=written)
            for s in tip.sections:
                if s.kind in fmt.BINARY_KINDS:
                    continue
                with open(tip.file(s), "rb") as f:
                    data = f.read()
                fmt.verify_bytes(s, data)
                writer.write_file(s.file, data)
                writer.sections.append(s)
            manifest = {k: v for k, v in tip.manifest.items() if k != "sections"}
            manifest.update(type="full", parent=None, merged_from=[s.id for s in chain])
            writer.commit(manifest)
        except BaseException:
            import shutil
            shutil.rmtree(writer.path, ignore_errors=True)
            raise
    finally:
        view.release()
        m.close()
        os.close(fd)
    return {"path": os.path.abspath(out), "id": tip.id, "merged": [s.path for s in chain]}


def info(path: str) -> dict:
    m, sections = store.read_manifest(path)
    return {"id": m["id"], "type": m["type"], "format_version": m["format_version"],
            "vmmd_version": m.get("vmmd_version"), "parent": m.get("parent"),
            "memory_bytes": m["memory"]["size"],
            **({"disks": {k: f"{e['mode']} {e['path']}" for k, e in m["disks"].items()}} if m.get("disks") else {}),
            "sections": [f"{s.kind}/{s.instance} v{s.version} {s.size} bytes" for s in sections]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="vmmd-snapshot", description="offline vmmd snapshot tools")
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("verify").add_argument("dir")
    mp = sub.add_parser("merge")
    mp.add_argument("dir")
    mp.add_argument("out")
    sub.add_parser("info").add_argument("dir")
    ns = p.parse_args(argv)
    try:
        if ns.cmd == "verify":
            result = verify(ns.dir)
        elif ns.cmd == "merge":
            result = merge(ns.dir, ns.out)
        else:
            result = info(ns.dir)
    except (SnapshotError, OSError) as exc:
        print(f"vmmd-snapshot: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
