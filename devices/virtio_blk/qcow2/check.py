"""Consistency check and refcount repair of an open Qcow2Image (qemu-img check's job).

Every reference (header, L1/L2 tables, data and compressed clusters,
refcount table and blocks, snapshot tables) is counted from the metadata
and compared with the stored refcounts:
  stored > counted  leak (wasted space, no harm): "Leaked cluster"
  stored < counted  corruption (a write could reuse a live cluster): "ERROR"
Repair sets the stored refcount to the count; new refcount blocks go to the
end of the file, so they never land on a cluster that is still referenced.
"""

from __future__ import annotations

import os
import struct
import sys
from array import array

from devices.virtio_blk.qcow2 import format as fmt
from devices.virtio_blk.qcow2.format import Qcow2Error

SNAPSHOT_ENTRY = struct.Struct(">QIHHIIQII")


def _count(img, fix_mode: str | None) -> dict:
    h, cs, cb = img.h, img.cs, img.cb
    file_size = os.fstat(img.fd).st_size
    nclusters = max(-(-file_size // cs), img.end >> cb)
    if nclusters > MAX_CHECK_CLUSTERS:
        raise Qcow2Error("image has too many clusters to check")
    refs = array("I", bytes(4 * nclusters))
    res = {"corruptions": 0, "leaks": 0, "check-errors": 0, "messages": [],
           "total-clusters": -(-h.size // cs), "allocated-clusters": 0,
           "fragmented-clusters": 0, "compressed-clusters": 0}
    msgs = res["messages"]

    def corrupt(text: str) -> None:
        res["corruptions"] += 1
        if len(msgs) < 10000:
            msgs.append("ERROR " + text)

    def add(off: int, length: int, what: str) -> bool:
        first, last = off >> cb, (off + max(length, 1) - 1) >> cb
        if last >= nclusters:
            corrupt(f"{what} at {off:#x} lies past the end of the image")
            return False
        for c in range(first, last + 1):
            refs[c] += 1
        return True

    add(0, cs, "header")
    add(h.refcount_table_offset, h.refcount_table_clusters * cs, "refcount table")
    for ti, e in enumerate(img.reftable):
        off = e & fmt.REFT_OFFSET_MASK
        if off:
            if off % cs or e & 0x1FF:
                corrupt(f"refcount block {ti} is not properly aligned; refcount table entry corrupted")
            else:
                add(off, cs, f"refcount block {ti}")

    budget = [MAX_CHECK_L2_TABLES]

    def walk(l1_entries, l1_off: int, active: bool) -> None:
        add(l1_off, len(l1_entries) * 8, "L1 table")
        prev_host = None
        for i1, e in enumerate(l1_entries):
            l2 = e & fmt.L1E_OFFSET_MASK
            if not l2:
                continue
            budget[0] -= 1
            if budget[0] < 0:   # hostile snapshot tables: bounded work
                raise Qcow2Error("too many L2 table references to check")
            if l2 % cs or e & fmt.L1E_RESERVED:
                corrupt(f"L2 table offset {l2:#x} (L1 entry {i1}) is invalid")
                continue
            if not add(l2, cs, f"L2 table {i1}"):
                continue
            table = os.pread(img.fd, cs, l2)
            for i2 in range(cs // 8):
                entry, = struct.unpack_from(">Q", table, 8 * i2)
                if not entry:
                    continue
                try:
                    kind, host, nbytes = fmt.decode_l2_entry(entry, h)
                except Qcow2Error as exc:
                    corrupt(f"L2 entry {i1}/{i2}: {exc}")
                    continue
                if kind == fmt.NORMAL:
                    if active:
                        res["allocated-clusters"] += 1
                        if prev_host is not None and host != prev_host + cs:
                            res["fragmented-clusters"] += 1
                        prev_host = host
                    add(host, cs, f"data cluster {i1}/{i2}")
                elif kind == fmt.COMPRESSED:
                    if active:
                        res["allocated-clusters"] += 1
                        res["compressed-clusters"] += 1
                    add(host, nbytes, f"compressed cluster {i1}/{i2}")
                elif kind == fmt.ZERO and host:
                    add(host, cs, f"preallocated zero cluster {i1}/{i2}")

    walk(img.l1, h.l1_table_offset, True)
    if h.nb_snapshots:
        off = h.snapshots_offset
        start = off
        for n in range(h.nb_snapshots):
            raw = os.pread(img.fd, SNAPSHOT_ENTRY.size, off)
            if len(raw) < SNAPSHOT_ENTRY.size:
                corrupt(f"snapshot {n} lies past the end of the image")
                break
            l1_off, l1_size, id_len, name_len, _, _, _, _, extra = SNAPSHOT_ENTRY.unpack(raw)
            if extra > 1024 or l1_size > fmt.MAX_L1_BYTES // 8 or l1_off % cs:
                corrupt(f"snapshot {n} has an invalid L1 table or extra data")
                break
            off += SNAPSHOT_ENTRY.size + extra + id_len + name_len
            off += -off % 8
            data = os.pread(img.fd, l1_size * 8, l1_off)
            if len(data) != l1_size * 8:
                corrupt(f"snapshot {n} L1 table lies past the end of the image")
                continue
            walk(list(struct.unpack(f">{l1_size}Q", data)), l1_off, False)
        add(start, max(off - start, 1), "snapshot table")
    for c in img.pool:
        add(c, cs, "pool cluster")
    for c in img.pending_free:
        add(c, cs, "cluster being freed")
    return res, refs, nclusters


MAX_CHECK_CLUSTERS = 1 << 28   # bounds the reference counts array (1 GiB)
MAX_CHECK_L2_TABLES = 1 << 20  # L2 tables read (shared ones once per reference)


def _compare(img, refs, nclusters, res) -> list:
    """[(cluster, stored, counted)] for every mismatch; counts leaks/corruptions."""
    h = img.h
    E = h.refblock_entries
    out = []
    covered = set()
    for ti, e in enumerate(img.reftable):
        off = e & fmt.REFT_OFFSET_MASK
        if not off or off % img.cs or e & 0x1FF:
            continue
        block = os.pread(img.fd, img.cs, off) if not img.lazy else bytes(img._rb_load(off))
        if off in img.rb_cache:
            block = bytes(img.rb_cache[off])
        if h.refcount_order == 4:
            stored_all = array("H", block)
            if sys.byteorder == "little":
                stored_all.byteswap()
        else:
            stored_all = [fmt.refcount_get(block, i, h.refcount_order) for i in range(E)]
        base = ti * E
        covered.add(ti)
        for bi in range(min(E, nclusters - base)):   # past the end of the file: ignored, as qemu-img does
            c = base + bi
            counted = refs[c]
            stored = stored_all[bi]
            if stored != counted:
                out.append((c, stored, counted))
    for c in range(nclusters):
        if refs[c] and c // E not in covered:
            out.append((c, 0, refs[c]))
    for c, stored, counted in out:
        if stored > counted:
            res["leaks"] += 1
            if len(res["messages"]) < 10000:
                res["messages"].append(f"Leaked cluster {c} refcount={stored} reference={counted}")
        else:
            res["corruptions"] += 1
            if len(res["messages"]) < 10000:
                res["messages"].append(f"ERROR cluster {c} refcount={stored} reference={counted}")
    return out


def check_image(img, fix: str | None = None) -> dict:
    if fix not in (None, "leaks", "all"):
        raise ValueError(f"fix must be None, 'leaks' or 'all', not {fix!r}")
    res, refs, n = _count(img, fix)
    mismatches = _compare(img, refs, n, res)
    res["image-end-offset"] = -(-os.fstat(img.fd).st_size // img.cs) * img.cs
    if fix is None or not mismatches:
        return res
    if img.read_only:
        raise Qcow2Error("cannot repair an image opened read-only")
    lazy, img.lazy = img.lazy, False
    img._no_reuse = True
    img.end = max(img.end, n << img.cb)
    fixed = {"leaks-fixed": 0, "corruptions-fixed": 0}
    try:
        for c, stored, counted in mismatches:
            if stored > counted:
                img._refcount_set(c << img.cb, counted)
                fixed["leaks-fixed"] += 1
            elif fix == "all":
                img._refcount_set(c << img.cb, counted)
                fixed["corruptions-fixed"] += 1
        img._apply_frees()
        img._barrier()
    finally:
        img.lazy = lazy
        img._no_reuse = False
    again = check_image(img, None)
    again.update(fixed)
    again["before"] = {k: res[k] for k in ("leaks", "corruptions")}
    again["repair-messages"] = res["messages"]
    return again
