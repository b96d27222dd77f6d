"""vmmd-img: create, inspect, check, convert, commit, rebase and map disk images.

    vmmd-img create [-f qcow2|raw] [-o cluster_size=N,lazy_refcounts=on,compression_type=zstd]
                    [-b BACKING [-F FMT]] FILE [SIZE]
    vmmd-img info [-f FMT] [--output human|json] FILE
    vmmd-img check [-f FMT] [-r leaks|all] [--output human|json] FILE
    vmmd-img convert [-f FMT] [-O FMT] [-o OPTIONS] [-c] [-p] SRC DST
    vmmd-img commit [-f FMT] [-d] [-p] FILE
    vmmd-img rebase [-f FMT] [-u] [-p] -b BACKING [-F FMT] FILE
    vmmd-img map [-f FMT] [--output human|json] FILE

Output follows qemu-img's. The image code is the virtio-blk device's own
(devices/virtio_blk/qcow2): what this tool writes is what the device reads.
Exit codes: 0 success; 1 error; 2 usage error; check: 2 corruptions, 3 leaks.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from devices.virtio_blk.qcow2 import format as fmt
from devices.virtio_blk.qcow2.format import Qcow2Error
from devices.virtio_blk.qcow2.image import (
    Qcow2Image, RawImage, backing_path, create_qcow2, open_image)

PROG = "vmmd-img"
CHUNK = 1 << 20
SUFFIXES = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50}


class UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(message)


def parse_size(text: str) -> int:
    t = text.strip().lower()
    if t.endswith("ib"):
        t = t[:-2]
    num, unit = (t[:-1], t[-1]) if t and t[-1] in SUFFIXES and not t[-1].isdigit() else (t, "")
    try:
        value = float(num) if "." in num else int(num)
    except ValueError:
        raise UsageError(f"invalid size {text!r}") from None
    size = int(value * SUFFIXES[unit])
    if size < 0:
        raise UsageError(f"invalid size {text!r}")
    return size


def size_to_str(n: int) -> str:
    units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"]
    v, i = float(n), 0
    while v >= 1024 and i < len(units) - 1:
        v /= 1024
        i += 1
    return f"{v:.3g} {units[i]}"


def parse_options(text: str | None) -> dict:
    out = {}
    for item in (text or "").split(","):
        if not item:
            continue
        key, eq, value = item.partition("=")
        if not eq:
            raise UsageError(f"option {item!r} needs a value")
        out[key] = value
    return out


def _bool_opt(opts: dict, key: str) -> bool:
    v = opts.pop(key, "off")
    if v not in ("on", "off"):
        raise UsageError(f"{key} must be on or off")
    return v == "on"


def _qcow2_create_opts(opts: dict) -> dict:
    opts = dict(opts)
    kw = {"cluster_size": parse_size(opts.pop("cluster_size", "65536")),
          "lazy_refcounts": _bool_opt(opts, "lazy_refcounts")}
    ctype = opts.pop("compression_type", "zlib")
    if ctype not in ("zlib", "zstd"):
        raise UsageError("compression_type must be zlib or zstd")
    kw["compression_type"] = fmt.COMPRESSION_ZSTD if ctype == "zstd" else fmt.COMPRESSION_DEFLATE
    compat = opts.pop("compat", "1.1")
    if compat not in ("1.1", "v3"):
        raise UsageError("only compat=1.1 (version 3) images are created")
    if opts.pop("refcount_bits", "16") != "16":
        raise UsageError("only refcount_bits=16 is supported")
    if opts:
        raise UsageError(f"unknown option(s): {', '.join(opts)}")
    cs = kw["cluster_size"]
    if cs < 512 or cs > (2 << 20) or cs & (cs - 1):
        raise UsageError("cluster_size must be a power of two between 512 and 2M")
    return kw


def _open(path: str, fmt_name: str | None, read_only: bool = True, sync: bool = True):
    return open_image(path, fmt_name=fmt_name, read_only=read_only, sync=sync)


def _progress(enabled: bool, done: int, total: int) -> None:
    if enabled:
        pct = 100.0 * done / total if total else 100.0
        sys.stdout.write(f"    ({pct:.2f}/100%)\r")
        sys.stdout.flush()


# --- create ------------------------------------------------------------------------------

def cmd_create(a) -> int:
    opts = parse_options(a.options)
    size = parse_size(a.size) if a.size is not None else None
    if a.backing and size is None:
        b = _open(backing_path(a.filename, a.backing), a.backing_fmt)
        size = b.size
        b.close()
    if size is None:
        raise UsageError("create: the image size is missing")
    if a.format == "raw":
        if opts or a.backing:
            raise UsageError("raw images take no options and no backing file")
        with open(a.filename, "wb") as f:
            f.truncate(size)
        if not a.quiet:
            print(f"Formatting '{a.filename}', fmt=raw size={size}")
        return 0
    kw = _qcow2_create_opts(opts)
    if a.backing and not a.unsafe:
        b = _open(backing_path(a.filename, a.backing), a.backing_fmt)
        b.close()
    create_qcow2(a.filename, size, backing_file=a.backing, backing_format=a.backing_fmt, **kw)
    if not a.quiet:
        extra = f" backing_file={a.backing}" if a.backing else ""
        extra += f" backing_fmt={a.backing_fmt}" if a.backing_fmt else ""
        ctype = fmt.COMPRESSION_NAMES[kw["compression_type"]]
        lazy = "on" if kw["lazy_refcounts"] else "off"
        print(f"Formatting '{a.filename}', fmt=qcow2 cluster_size={kw['cluster_size']} "
              f"extended_l2=off compression_type={ctype} size={size}{extra} "
              f"lazy_refcounts={lazy} refcount_bits=16")
    return 0


# --- info -------------------------------------------------------------------------------

def image_info(img, path: str) -> dict:
    st = os.stat(path)
    info = {"virtual-size": img.size, "filename": path, "format": img.format,
            "actual-size": st.st_blocks * 512, "dirty-flag": False}
    if isinstance(img, Qcow2Image):
        h = img.h
        info["cluster-size"] = h.cluster_size
        info["dirty-flag"] = h.dirty
        if h.backing_file:
            info["backing-filename"] = h.backing_file
            info["full-backing-filename"] = backing_path(path, h.backing_file)
            if h.backing_format:
                info["backing-filename-format"] = h.backing_format
        data = {"compat": "1.1" if h.version >= 3 else "0.10"}
        if h.version >= 3:
            data.update({"compression-type": fmt.COMPRESSION_NAMES.get(h.compression_type, "?"),
                         "lazy-refcounts": h.lazy_refcounts, "refcount-bits": h.refcount_bits,
                         "corrupt": h.corrupt, "extended-l2": False})
        else:
            data.update({"compression-type": "zlib", "refcount-bits": 16})
        info["format-specific"] = {"type": "qcow2", "data": data}
    return info


def cmd_info(a) -> int:
    img = _open(a.filename, a.f)
    try:
        info = image_info(img, a.filename)
    finally:
        img.close()
    if a.output == "json":
        print(json.dumps(info, indent=4))
        return 0
    print(f"image: {a.filename}")
    print(f"file format: {info['format']}")
    print(f"virtual size: {size_to_str(info['virtual-size'])} ({info['virtual-size']} bytes)")
    print(f"disk size: {size_to_str(info['actual-size'])}")
    if "cluster-size" in info:
        print(f"cluster_size: {info['cluster-size']}")
    if "backing-filename" in info:
        print(f"backing file: {info['backing-filename']}")
        if "backing-filename-format" in info:
            print(f"backing file format: {info['backing-filename-format']}")
    if info.get("format-specific"):
        d = info["format-specific"]["data"]
        print("Format specific information:")
        print(f"    compat: {d['compat']}")
        print(f"    compression type: {d['compression-type']}")
        if "lazy-refcounts" in d:
            print(f"    lazy refcounts: {str(d['lazy-refcounts']).lower()}")
        print(f"    refcount bits: {d['refcount-bits']}")
        if "corrupt" in d:
            print(f"    corrupt: {str(d['corrupt']).lower()}")
            print(f"    extended l2: {str(d['extended-l2']).lower()}")
    return 0


# --- check -----------------------------------------------------------------------------

def cmd_check(a) -> int:
    fix = a.repair
    img = open_image(a.filename, fmt_name=a.f, read_only=fix is None)
    try:
        if not isinstance(img, Qcow2Image):
            print("This image format does not support checks", file=sys.stderr)
            return 63
        res = img.check(fix)
        if fix is not None:
            img.flush()
    finally:
        img.close()
    if a.output == "json":
        out = {"image-end-offset": res["image-end-offset"], "total-clusters": res["total-clusters"],
               "check-errors": res["check-errors"], "allocated-clusters": res["allocated-clusters"],
               "filename": a.filename, "format": "qcow2",
               "fragmented-clusters": res["fragmented-clusters"],
               "compressed-clusters": res["compressed-clusters"]}
        if res["leaks"]:
            out["leaks"] = res["leaks"]
        if res["corruptions"]:
            out["corruptions"] = res["corruptions"]
        for k in ("leaks-fixed", "corruptions-fixed"):
            if res.get(k):
                out[k] = res[k]
        print(json.dumps(out, indent=4))
    else:
        if "before" in res:
            for m in res["repair-messages"]:
                print(("Repairing " + m[6:]) if m.startswith("ERROR cluster") else m)
            print("The following inconsistencies were found and repaired:\n")
            print(f"    {res.get('leaks-fixed', 0)} leaked clusters")
            print(f"    {res.get('corruptions-fixed', 0)} corruptions\n")
            print("Double checking the fixed image now...")
        for m in res["messages"]:
            print(m)
        if res["corruptions"]:
            print(f"\n{res['corruptions']} errors were found on the image.\n"
                  "Data may be corrupted, or further writes to the image may corrupt it.")
        if res["leaks"]:
            print(f"\n{res['leaks']} leaked clusters were found on the image.\n"
                  "This means waste of disk space, but no harm to data.")
        if not res["corruptions"] and not res["leaks"]:
            print("No errors were found on the image.")
        t = res["total-clusters"]
        if t:
            al, fr, co = res["allocated-clusters"], res["fragmented-clusters"], res["compressed-clusters"]
            print(f"{al}/{t} = {100.0 * al / t:.2f}% allocated, "
                  f"{100.0 * fr / al if al else 0:.2f}% fragmented, "
                  f"{100.0 * co / al if al else 0:.2f}% compressed clusters")
        print(f"Image end offset: {res['image-end-offset']}")
    if res["corruptions"]:
        return 2
    if res["leaks"]:
        return 3
    return 0


# --- convert ---------------------------------------------------------------------------

def cmd_convert(a) -> int:
    src = _open(a.source, a.f)
    try:
        size = src.size
        out_fmt = a.O or "raw"
        if out_fmt == "qcow2":
            kw = _qcow2_create_opts(parse_options(a.options))
            create_qcow2(a.dest, size, **kw)
            dst = Qcow2Image(os.open(a.dest, os.O_RDWR | os.O_CLOEXEC), a.dest, sync=False)
        elif out_fmt == "raw":
            if a.options or a.compress:
                raise UsageError("raw output takes no options and cannot be compressed")
            fd = os.open(a.dest, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
            os.ftruncate(fd, size)
            dst = RawImage(fd, a.dest, read_only=False, sync=False)
        else:
            raise UsageError(f"unknown output format {out_fmt!r} (qcow2 or raw)")
        try:
            unit = dst.cs if isinstance(dst, Qcow2Image) else 65536
            step = max(unit, CHUNK)
            zero = bytes(unit)
            pos = 0
            _progress(a.progress, 0, size)
            while pos < size:
                n = min(step, size - pos)
                data = src.read(pos, n)
                for o in range(0, n, unit):
                    piece = data[o:o + unit]
                    if piece == zero[:len(piece)]:
                        continue       # sparse: zeros stay unallocated
                    if a.compress:
                        dst.write_compressed(pos + o, piece)
                    else:
                        dst.write(pos + o, piece)
                pos += n
                _progress(a.progress, pos, size)
            dst.flush()
            if a.progress:
                sys.stdout.write("\n")
            os.fsync(dst.fd)
        finally:
            dst.close()
    finally:
        src.close()
    return 0


# --- commit / rebase -------------------------------------------------------------------------

def cmd_commit(a) -> int:
    top = _open(a.filename, a.f, read_only=False)
    try:
        if not isinstance(top, Qcow2Image) or not top.h.backing_file:
            raise Qcow2Error(f"image {a.filename!r} does not have a backing file")
        base = _open(backing_path(a.filename, top.h.backing_file), top.h.backing_format,
                     read_only=False)
        try:
            extents = [e for e in top.block_status(0, top.size) if e[2] != "unallocated"]
            total = sum(e[1] for e in extents) or 1
            done = 0
            _progress(a.progress, 0, total)
            for off, length, kind, _ in extents:
                end = min(off + length, base.size)
                p = off
                while p < end:
                    n = min(CHUNK, end - p)
                    if kind == "zero":
                        base.write_zeroes(p, n, False)
                    else:
                        base.write(p, top.read(p, n))
                    p += n
                done += length
                _progress(a.progress, done, total)
            base.flush()
        finally:
            base.close()
        if not a.d:
            top.make_empty()
        top.flush()
    finally:
        top.close()
    if a.progress:
        sys.stdout.write("\n")
    print("Image committed.")
    return 0


def cmd_rebase(a) -> int:
    top = _open(a.filename, a.f, read_only=False)
    try:
        if not isinstance(top, Qcow2Image):
            raise Qcow2Error("only qcow2 images have a backing file")
        new_name = a.backing or None
        if not a.unsafe:
            new = _open(backing_path(a.filename, new_name), a.backing_fmt) if new_name else None
            try:
                old = top.backing
                cs = top.cs
                holes = [e for e in top.block_status(0, top.size) if e[2] == "unallocated"]
                total = sum(e[1] for e in holes) or 1
                done = 0
                for off, length, _, _ in holes:
                    for p in range(off, off + length, cs):
                        n = min(cs, off + length - p)
                        want = _read_or_zero(old, p, n)
                        have = _read_or_zero(new, p, n)
                        if want != have:
                            top.write(p, want)
                    done += length
                    _progress(a.progress, done, total)
            finally:
                if new is not None:
                    new.close()
        top.set_backing(new_name, a.backing_fmt if new_name else None)
        top.flush()
    finally:
        top.close()
    if a.progress:
        sys.stdout.write("\n")
    return 0


def _read_or_zero(img, pos: int, n: int) -> bytes:
    if img is None or pos >= img.size:
        return bytes(n)
    inside = min(n, img.size - pos)
    return img.read(pos, inside) + bytes(n - inside)


# --- map -------------------------------------------------------------------------------------

def chain_map(img, path: str, offset: int, length: int, depth: int = 0):
    """qemu-img map's records for [offset, offset+length) through the chain."""
    if isinstance(img, RawImage):
        inside = max(0, min(length, img.size - offset))
        if inside:
            yield {"start": offset, "length": inside, "depth": depth, "present": True,
                   "zero": False, "data": True, "compressed": False, "offset": offset,
                   "filename": path}
        if length - inside:
            yield {"start": offset + inside, "length": length - inside, "depth": depth,
                   "present": False, "zero": True, "data": False, "compressed": False}
        return
    for off, n, kind, host in img.block_status(offset, length):
        if kind == "data":
            yield {"start": off, "length": n, "depth": depth, "present": True, "zero": False,
                   "data": True, "compressed": False, "offset": host, "filename": path}
        elif kind == "compressed":
            yield {"start": off, "length": n, "depth": depth, "present": True, "zero": False,
                   "data": True, "compressed": True}
        elif kind == "zero":
            yield {"start": off, "length": n, "depth": depth, "present": True, "zero": True,
                   "data": False, "compressed": False}
        elif img.backing is not None and off < img.backing.size:
            inside = min(n, img.backing.size - off)
            bpath = backing_path(path, img.h.backing_file)
            yield from chain_map(img.backing, bpath, off, inside, depth + 1)
            if n - inside:
                yield {"start": off + inside, "length": n - inside, "depth": depth,
                       "present": False, "zero": True, "data": False, "compressed": False}
        else:
            yield {"start": off, "length": n, "depth": depth, "present": False, "zero": True,
                   "data": False, "compressed": False}


def merged_map(img, path: str) -> list[dict]:
    out: list[dict] = []
    for r in chain_map(img, path, 0, img.size):
        if out:
            p = out[-1]
            same = all(p.get(k) == r.get(k) for k in ("depth", "present", "zero", "data",
                                                         "compressed", "filename"))
            if same and ("offset" not in r or p["offset"] + p["length"] == r["offset"]):
                p["length"] += r["length"]
                continue
        out.append(dict(r))
    return out


def cmd_map(a) -> int:
    img = _open(a.filename, a.f)
    try:
        records = merged_map(img, a.filename)
    finally:
        img.close()
    if a.output == "json":
        lines = []
        for r in records:
            fields = [f'"start": {r["start"]}', f'"length": {r["length"]}', f'"depth": {r["depth"]}',
                      f'"present": {json.dumps(r["present"])}', f'"zero": {json.dumps(r["zero"])}',
                      f'"data": {json.dumps(r["data"])}', f'"compressed": {json.dumps(r["compressed"])}']
            if "offset" in r:
                fields.append(f'"offset": {r["offset"]}')
            lines.append("{ " + ", ".join(fields) + "}")
        print("[" + ",\n".join(lines) + "]")
        return 0
    print(f"{'Offset':<16}{'Length':<16}{'Mapped to':<16}File")
    for r in records:
        if r["data"] and "offset" in r:
            print(f"{r['start']:<#16x}{r['length']:<#16x}{r['offset']:<#16x}{r['filename']}")
    return 0


# --- main --------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="create, inspect and convert qcow2/raw disk images")
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=_Parser)
    c = sub.add_parser("create")
    c.add_argument("-f", dest="format", default="raw", choices=("qcow2", "raw"))
    c.add_argument("-o", dest="options")
    c.add_argument("-b", dest="backing")
    c.add_argument("-F", dest="backing_fmt", choices=("qcow2", "raw"))
    c.add_argument("-u", dest="unsafe", action="store_true")
    c.add_argument("-q", dest="quiet", action="store_true")
    c.add_argument("filename")
    c.add_argument("size", nargs="?")
    i = sub.add_parser("info")
    i.add_argument("-f", choices=("qcow2", "raw"))
    i.add_argument("--output", choices=("human", "json"), default="human")
    i.add_argument("filename")
    k = sub.add_parser("check")
    k.add_argument("-f", choices=("qcow2", "raw"))
    k.add_argument("-r", dest="repair", choices=("leaks", "all"))
    k.add_argument("--output", choices=("human", "json"), default="human")
    k.add_argument("filename")
    v = sub.add_parser("convert")
    v.add_argument("-f", choices=("qcow2", "raw"))
    v.add_argument("-O", choices=("qcow2", "raw"))
    v.add_argument("-o", dest="options")
    v.add_argument("-c", dest="compress", action="store_true")
    v.add_argument("-p", dest="progress", action="store_true")
    v.add_argument("source")
    v.add_argument("dest")
    m = sub.add_parser("commit")
    m.add_argument("-f", choices=("qcow2", "raw"))
    m.add_argument("-d", action="store_true", help="do not empty the image after committing")
    m.add_argument("-p", dest="progress", action="store_true")
    m.add_argument("filename")
    r = sub.add_parser("rebase")
    r.add_argument("-f", choices=("qcow2", "raw"))
    r.add_argument("-u", dest="unsafe", action="store_true")
    r.add_argument("-p", dest="progress", action="store_true")
    r.add_argument("-b", dest="backing", required=True)
    r.add_argument("-F", dest="backing_fmt", choices=("qcow2", "raw"))
    r.add_argument("filename")
    mp = sub.add_parser("map")
    mp.add_argument("-f", choices=("qcow2", "raw"))
    mp.add_argument("--output", choices=("human", "json"), default="human")
    mp.add_argument("filename")
    return p


COMMANDS = {"create": cmd_create, "info": cmd_info, "check": cmd_check, "convert": cmd_convert,
            "commit": cmd_commit, "rebase": cmd_rebase, "map": cmd_map}


def main(argv: list[str] | None = None) -> int:
    try:
        a = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
        return COMMANDS[a.cmd](a)
    except UsageError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        return 1
    except (Qcow2Error, OSError) as exc:
        text = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        where = f" {exc.filename!r}" if isinstance(exc, OSError) and exc.filename else ""
        print(f"{PROG}: {text}{where}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
