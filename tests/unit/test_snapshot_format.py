"""The snapshot format's sans-I/O layer: JSON sections with binary fields,
manifest checks, versions and upgrades, the RAM digest and page runs."""

from __future__ import annotations

import hashlib
import json
import os
import random

import numpy as np
import pytest

from vmmd.snapshot import format as fmt
from vmmd.snapshot import ram as ramio
from vmmd.snapshot.format import SnapshotError


def test_msgpack_shaped_state_survives_json_byte_for_byte():
    state = {"version": 1, "blob": b"\x00\xff" * 10, "nested": [{"b": b""}, 1.5, None, True],
             "intkeys": {1: b"x", 2: [3]}, "$odd": "dollar key"}
    data = fmt.encode_json_section("device", "2.0", state)
    back = fmt.decode_json_section(fmt.make_section("device", "2.0", data), data)
    assert back == state
    assert fmt.encode_json_section("device", "2.0", back) == data  # deterministic


def test_section_checks_size_digest_kind_and_version():
    data = fmt.encode_json_section("vcpu", "0", {"index": 0})
    entry = fmt.make_section("vcpu", "0", data)
    with pytest.raises(SnapshotError, match="truncated"):
        fmt.decode_json_section(entry, data[:-1])
    bad = bytearray(data)
    bad[10] ^= 1
    with pytest.raises(SnapshotError, match="SHA-256"):
        fmt.decode_json_section(entry, bytes(bad))
    other = fmt.make_section("vcpu", "1", data)
    with pytest.raises(SnapshotError, match="does not hold"):
        fmt.decode_json_section(other, data)


def test_newer_section_version_refused_older_upgraded(monkeypatch):
    with pytest.raises(SnapshotError, match="newer"):
        fmt.check_version("vm", 2, "x")
    monkeypatch.setitem(fmt.SECTION_VERSIONS, "vm", 2)
    monkeypatch.setitem(fmt.UPGRADES, "vm", {1: lambda s: {**s, "added_in_v2": True}})
    doc = {"kind": "vm", "instance": "vm", "version": 1, "state": {"a": 1}}
    data = json.dumps(doc).encode()
    entry = fmt.Section("vm", "vm", 1, "vm-vm.json", len(data), fmt.sha256_hex(data), {})
    assert fmt.decode_json_section(entry, data) == {"a": 1, "added_in_v2": True}
    monkeypatch.setitem(fmt.UPGRADES, "vm", {})
    with pytest.raises(SnapshotError, match="no upgrade"):
        fmt.decode_json_section(entry, data)


def _manifest(**over):
    m = {"format": fmt.FORMAT_NAME, "format_version": 1, "id": "x", "type": "full", "parent": None,
         "config": {}, "memory": {"size": 4096, "layout": [[0, 4096, 0]]},
         "sections": [{"kind": "vm", "instance": "vm", "version": 1, "file": "vm-vm.json", "size": 1,
                       "sha256": "0" * 64},
                      {"kind": "ram", "instance": "ram", "version": 1, "file": "ram.img", "size": 4096,
                       "sha256": "0" * 64}]}
    m.update(over)
    return m


def test_manifest_parse_and_refusals():
    body, digest = fmt.encode_manifest(_manifest())
    m, sections = fmt.parse_manifest(body, digest)
    assert [s.kind for s in sections] == ["vm", "ram"]
    with pytest.raises(SnapshotError, match="not a vmmd snapshot"):
        fmt.parse_manifest(body, None)
    with pytest.raises(SnapshotError, match="does not match"):
        fmt.parse_manifest(body + b" ", digest)
    for over, msg in (({"format_version": 7}, "newer"), ({"format": "qemu"}, "not a vmmd"),
                      ({"type": "diff"}, "parent"), ({"sections": []}, "non-empty"),
                      ({"sections": [{"kind": "vm", "instance": "vm", "version": 1, "file": "../x",
                                      "size": 1, "sha256": "0" * 64}]}, "file name")):
        b, d = fmt.encode_manifest(_manifest(**over))
        with pytest.raises(SnapshotError, match=msg):
            fmt.parse_manifest(b, d)


def test_manifest_parser_never_raises_anything_else():
    rng = random.Random(7)
    body, _ = fmt.encode_manifest(_manifest())
    for _ in range(3000):
        b = bytearray(body)
        for _ in range(rng.randint(1, 8)):
            b[rng.randrange(len(b))] = rng.randrange(256)
        b = bytes(b)
        try:
            fmt.parse_manifest(b, hashlib.sha256(b).hexdigest().encode())
        except SnapshotError:
            pass


def test_from_jsonable_rejects_bad_tags():
    for bad in ({"$b64": 3}, {"$b64": "!!"}, {"$map": 3}, {"$map": [[{"$map": []}, 1]]}):
        with pytest.raises(SnapshotError):
            fmt.from_jsonable(bad)


# -- RAM ------------------------------------------------------------------------------------
def test_page_runs():
    mask = np.array([0, 1, 1, 0, 1, 0, 0, 1], dtype=bool)
    assert list(ramio.page_runs(mask)) == [(1, 2), (4, 1), (7, 1)]
    assert list(ramio.page_runs(np.zeros(0, dtype=bool))) == []


def test_digest_is_independent_of_run_splitting_and_sees_every_page():
    size = 16 * ramio.PAGE
    pages = {2: b"a", 3: b"b", 9: b"c"}
    buf = bytearray(size)
    for p, c in pages.items():
        buf[p * ramio.PAGE] = c[0]
    d1 = ramio.RamDigest(size)
    for first, n in ramio.page_runs(ramio.nonzero_pages(buf)):
        d1.add_run(first, buf[first * ramio.PAGE:(first + n) * ramio.PAGE])
    d2 = ramio.RamDigest(size)
    for p in sorted(pages):
        d2.add_run(p, buf[p * ramio.PAGE:(p + 1) * ramio.PAGE])
    assert d1.hexdigest() == d2.hexdigest()
    d3 = ramio.RamDigest(size)  # same bytes at another page: differs
    d3.add_run(4, buf[2 * ramio.PAGE:3 * ramio.PAGE])
    d3.add_run(5, buf[3 * ramio.PAGE:4 * ramio.PAGE])
    d3.add_run(9, buf[9 * ramio.PAGE:10 * ramio.PAGE])
    assert d3.hexdigest() != d1.hexdigest()
    with pytest.raises(ramio.RamError):
        d3.add_run(1, bytes(ramio.PAGE))  # out of order


def _memfd(data: bytes) -> int:
    fd = os.memfd_create("t")
    os.write(fd, data)
    return fd


def test_save_and_load_ram_keep_holes(tmp_path):
    import mmap
    size = 64 * ramio.PAGE
    src = bytearray(size)
    src[5 * ramio.PAGE + 7] = 1
    src[40 * ramio.PAGE:42 * ramio.PAGE] = os.urandom(2 * ramio.PAGE)
    mfd = os.memfd_create("src")
    os.ftruncate(mfd, size)
    os.pwrite(mfd, bytes(src[:20 * ramio.PAGE]), 0)  # a data extent holding zero pages, then a hole
    os.pwrite(mfd, bytes(src[40 * ramio.PAGE:42 * ramio.PAGE]), 40 * ramio.PAGE)
    m = mmap.mmap(mfd, size)
    out = os.open(tmp_path / "ram.img", os.O_CREAT | os.O_RDWR, 0o600)
    digest, written = ramio.save_ram(memoryview(m), mfd, size, out)
    assert written == 3 * ramio.PAGE
    assert [e for e in ramio.data_extents(out, size)] == [(5 * ramio.PAGE, ramio.PAGE),
                                                          (40 * ramio.PAGE, 2 * ramio.PAGE)]
    dst = bytearray(size)
    assert ramio.load_ram(out, size, memoryview(dst)) == digest
    assert dst == src
    # a diff naming pages 5 (now zero) and 40..41 (new bytes) on top of an old image
    include = np.zeros(64, dtype=bool)
    include[[5, 40, 41]] = True
    src2 = bytearray(src)
    src2[5 * ramio.PAGE + 7] = 0
    src2[40 * ramio.PAGE] ^= 0xFF
    m[:] = bytes(src2)
    out2 = os.open(tmp_path / "diff.img", os.O_CREAT | os.O_RDWR, 0o600)
    d2, w2 = ramio.save_ram(memoryview(m), mfd, size, out2, include)
    assert w2 == 2 * ramio.PAGE
    assert ramio.overlay_ram(out2, size, memoryview(dst), include) == d2
    assert dst == src2
    with pytest.raises(ramio.RamError, match="does not name"):
        ramio.overlay_ram(out2, size, memoryview(dst), np.zeros(64, dtype=bool))
    os.ftruncate(out2, size - ramio.PAGE)
    with pytest.raises(ramio.RamError, match="truncated"):
        ramio.load_ram(out2, size, memoryview(dst))
    m.close()
    for fd in (mfd, out, out2):
        os.close(fd)


def test_load_ram_into_a_memfd_copies_in_the_kernel_and_keeps_holes(tmp_path):
    import mmap
    size = 4096 * ramio.PAGE  # 16 MiB: several scan pieces
    src = bytearray(size)
    for page in (3, 4, 5, 1000, 4095):
        src[page * ramio.PAGE + page % 4096] = page % 251 + 1
    src[2000 * ramio.PAGE:2100 * ramio.PAGE] = os.urandom(100 * ramio.PAGE)
    mfd = os.memfd_create("src")
    os.ftruncate(mfd, size)
    os.pwrite(mfd, bytes(src), 0)  # every page allocated: zero pages must still become holes
    m = mmap.mmap(mfd, size)
    out = os.open(tmp_path / "ram.img", os.O_CREAT | os.O_RDWR, 0o600)
    digest, written = ramio.save_ram(memoryview(m), mfd, size, out)
    assert written == 105 * ramio.PAGE
    dfd = os.memfd_create("dst")
    os.ftruncate(dfd, size)
    dst = mmap.mmap(dfd, size)
    mask = np.zeros(size // ramio.PAGE, dtype=bool)
    assert ramio.load_ram(out, size, memoryview(dst), mask, dst_fd=dfd) == digest
    # (before reading the mapping: a read fault on a shared memfd hole allocates the page)
    assert list(ramio.data_extents(dfd, size)) == list(ramio.data_extents(out, size))
    assert dst[:] == bytes(src)
    assert sorted(np.flatnonzero(mask).tolist()) == [3, 4, 5, 1000, *range(2000, 2100), 4095]
    # one byte changed in the image: the digest of what was loaded differs
    os.pwrite(out, b"\x55", 4095 * ramio.PAGE + 9)
    dst[:] = bytes(size)
    assert ramio.load_ram(out, size, memoryview(dst), dst_fd=dfd) != digest
    for mm in (m, dst):
        mm.close()
    for fd in (mfd, out, dfd):
        os.close(fd)


def test_zero_page_scan_matches_numpy(tmp_path):
    """nonzero_runs (find() page by page) against the vectorised reference, with
    zero pages inside a data extent, set bytes at page edges and an include mask."""
    import mmap
    pages = 300
    size = pages * ramio.PAGE
    rng = np.random.default_rng(7)
    src = bytearray(size)
    for p in rng.choice(pages, 120, replace=False).tolist():
        src[p * ramio.PAGE + int(rng.integers(ramio.PAGE))] = int(rng.integers(1, 256))
    src[ramio.PAGE - 1] = 1               # last byte of a page
    src[2 * ramio.PAGE] = 1               # first byte of the next but one
    include = rng.random(pages) < 0.7
    mfd = os.memfd_create("src")
    os.ftruncate(mfd, size)
    os.pwrite(mfd, bytes(src), 0)         # one data extent with zero pages in it
    m = mmap.mmap(mfd, size)
    for view in (memoryview(m), memoryview(src), memoryview(m)[:size - ramio.PAGE]):
        n = len(view) // ramio.PAGE
        mask = ramio.nonzero_pages(view)
        for inc, want in ((None, mask), (include[:n].astype(np.uint8).tobytes(), mask & include[:n])):
            expect = [(f * ramio.PAGE, k * ramio.PAGE) for f, k in ramio.page_runs(want)]
            assert ramio.nonzero_runs(view, 0, len(view), inc) == expect
    out = os.open(tmp_path / "r.img", os.O_CREAT | os.O_RDWR, 0o600)
    digest, written = ramio.save_ram(memoryview(m), mfd, size, out, include)
    assert written == int((ramio.nonzero_pages(memoryview(m)) & include).sum()) * ramio.PAGE
    os.close(out)
    os.close(mfd)


def _valid_vcpu_state():
    import ctypes
    from vmmd.kvm import abi
    from vmmd.snapshot import machine_state as ms

    def blob(cls):
        return fmt.b64(bytes(ctypes.sizeof(cls)))
    return {"index": 0, "regs": {n: 0 for n in ms.REG_NAMES}, "sregs": blob(abi.kvm_sregs),
            "fpu": blob(abi.kvm_fpu), "lapic": blob(abi.kvm_lapic_state), "events": blob(abi.kvm_vcpu_events),
            "debugregs": blob(abi.kvm_debugregs), "mp_state": 0, "cpuid": [blob(abi.kvm_cpuid_entry2)],
            "msrs": {"0x10": 5}, "xsave": blob(abi.kvm_xsave), "xcrs": None}


def test_vcpu_section_checks_refuse_only_with_snapshot_error():
    from vmmd.snapshot import machine_state as ms
    ms.check_vcpu(_valid_vcpu_state(), 0)
    rng = random.Random(3)
    junk = [None, -1, 1 << 70, "x", "AAAA", [], {}, 1.5, True, [None] * 300, {"0xzz": 1}]
    for _ in range(2000):
        st = _valid_vcpu_state()
        key = rng.choice(list(st))
        if key == "regs" and rng.random() < 0.5:
            st["regs"][rng.choice(ms.REG_NAMES)] = rng.choice(junk)
        elif key == "msrs" and rng.random() < 0.5:
            st["msrs"][rng.choice(["0x10", "zz", "0x100000000"])] = rng.choice(junk)
        else:
            st[key] = rng.choice(junk)
        try:
            ms.check_vcpu(st, 0)
        except SnapshotError:
            pass


def test_manifest_config_checks():
    from vmmd.snapshot import config_io
    cfg = config_io.config_from_json({"cpus": 2, "memory": 64 << 20, "slots": [
        {"slot": 31, "function": 0, "device": "lpc", "args": []}], "consoles": {"com1": "null"}})
    assert cfg.cpus == 2 and cfg.slots[0].device == "lpc"
    for bad in ({"cpus": 0}, {"memory": 5}, {"slots": [{"slot": "x"}]}, {"nope": 1}, {"consoles": []}):
        with pytest.raises(SnapshotError):
            config_io.config_from_json(bad)
    with pytest.raises(SnapshotError, match="no virtio-blk in slot 4"):
        config_io.apply_overrides(cfg, disks={4: "/x"}, nets={}, consoles={}, scalars={})


def test_restore_overrides_replace_host_side_resources_only():
    from vmmd.snapshot import config_io
    cfg = config_io.config_from_json({"cpus": 1, "memory": 64 << 20, "api_socket": "/old.sock", "slots": [
        {"slot": 2, "function": 0, "device": "virtio-blk", "args": ["/a.img", "num_queues=2"]},
        {"slot": 3, "function": 0, "device": "virtio-net", "args": ["tap=old0", "mac=52:54:00:00:00:01"]},
        {"slot": 31, "function": 0, "device": "lpc", "args": []}], "consoles": {"com1": "stdio"}})
    new = config_io.apply_overrides(cfg, disks={2: "/b.img"}, nets={3: "socket=/sw.sock"},
                                    consoles={"com1": "file,/log", "com2": "null"},
                                    scalars={"api_socket": None})
    slots = {s.slot: s.args for s in new.slots}
    assert slots[2] == ("/b.img", "num_queues=2")
    assert slots[3] == ("mac=52:54:00:00:00:01", "socket=/sw.sock")
    assert new.consoles == {"com1": "file,/log", "com2": "null"} and new.api_socket is None
    assert new.cpus == cfg.cpus and new.memory == cfg.memory
    with pytest.raises(SnapshotError, match="no virtio-net in slot 2"):
        config_io.apply_overrides(cfg, disks={}, nets={2: "tap=x"}, consoles={}, scalars={})


def test_restore_command_line():
    from vmmd.config import ConfigError
    from vmmd.snapshot import restore
    req = restore.parse_restore_args(["--restore", "/s", "--clock", "freeze", "--net", "3=tap=t0",
                                      "-l", "com1,null", "--paused"])
    assert (req.path, req.clock, req.nets, req.consoles, req.paused) == \
        ("/s", "freeze", {3: "tap=t0"}, {"com1": "null"}, True)
    for bad in (["--restore", "/s", "--clock", "x"], ["--restore", "/s", "--net", "3=eth0"],
                ["--restore", "/s", "--disk", "x=/a"], ["--restore", "/s", "-m", "1G"]):
        with pytest.raises(ConfigError):
            restore.parse_restore_args(bad)


@pytest.mark.parametrize("sync", [True, False])
def test_writer_commit_point_with_and_without_fsync(tmp_path, monkeypatch, sync):
    """The manifest digest (the commit point) is written last either way; with
    sync every file and the directory are fsynced before it, without none is."""
    from vmmd.snapshot import store
    synced = []
    real_fsync = os.fsync

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    w = store.SnapshotWriter(str(tmp_path / "snap"))
    w.add_json("vm", "vm", {"ncpus": 1})
    os.close(w.open("ram.img"))
    os.truncate(os.path.join(w.path, "ram.img"), ramio.PAGE)
    w.add_ram(ramio.PAGE, "00" * 32)
    manifest = {"format": fmt.FORMAT_NAME, "format_version": 1, "vmmd_version": "0", "id": "ab" * 16,
                "type": "full", "parent": None, "created": "2026-11-30T00:00:00+00:00", "config": {},
                "memory": {"size": ramio.PAGE, "page_size": ramio.PAGE, "layout": []}}
    w.commit(manifest, sync=sync)
    names = sorted(os.listdir(w.path))
    assert fmt.MANIFEST in names and fmt.MANIFEST_DIGEST in names
    m, sections = store.read_manifest(w.path)
    assert m["id"] == "ab" * 16 and sorted(s.kind for s in sections) == ["ram", "vm"]
    if not sync:
        assert synced == []
        return
    # every file before the commit point, then the directory; the commit point last
    files_first = [os.path.join(w.path, n) for n in names if n != fmt.MANIFEST_DIGEST]
    assert sorted(synced[:len(files_first)]) == sorted(files_first)
    assert synced[len(files_first):] == [w.path, os.path.join(w.path, fmt.MANIFEST_DIGEST), w.path]


@pytest.mark.parametrize("diff", [False, True])
def test_copy_ram_digest_taken_during_the_copy_matches_the_file(tmp_path, diff):
    """snapshot.create without fsync hashes guest memory while it copies; with,
    it reads the file back: both must give the same digest."""
    import mmap
    size = 256 * ramio.PAGE
    mfd = os.memfd_create("src")
    os.ftruncate(mfd, size)
    rnd = random.Random(7)
    for page in rnd.sample(range(256), 60):
        os.pwrite(mfd, os.urandom(ramio.PAGE) if page % 3 else b"\0" * ramio.PAGE, page * ramio.PAGE)
    include = None
    if diff:
        include = np.zeros(256, dtype=bool)
        include[rnd.sample(range(256), 100)] = True
    m = mmap.mmap(mfd, size)
    out = os.open(tmp_path / "ram.img", os.O_CREAT | os.O_RDWR, 0o600)
    during = ramio.RamDigest(size)
    runs, written = ramio.copy_ram(memoryview(m), mfd, size, out, include, digest=during)
    assert written == sum(n for _, n in runs) > 0
    assert during.hexdigest() == ramio.digest_runs(out, size, runs)
    m.close()
    os.close(out)
    os.close(mfd)
