"""vmmd/snapshot/disks.py without a VM: the manifest's disk entries (hostile
input), identities, the overlay switch failing midway, and the restore-side
configuration. Images are real qcow2 files (vmmd's own writer)."""

from __future__ import annotations

import copy
import json
import os
from types import SimpleNamespace

import pytest

from bus.endpoint import DeviceControlError, DeviceTimeout
from devices.virtio_blk.qcow2.image import create_qcow2
from vmmd.config import SlotConfig, VmConfig
from vmmd.disk_overlay import fdpass_pair
from vmmd.snapshot import disks as diskio
from vmmd.snapshot import format as fmt
from vmmd.snapshot import store
from vmmd.snapshot.format import SnapshotError


def _entry(path="/d/disk.qcow2", **over):
    e = {"mode": "overlay", "path": path, "format": "qcow2", "file_size": 1 << 20,
         "mtime_ns": 123, "header_sha256": "ab" * 32}
    e.update(over)
    return e


def test_check_entries_accepts_good_and_refuses_malformed():
    good = {"2.0": _entry(), "3.0": _entry(mode="read-only", format="raw")}
    assert diskio.check_entries(copy.deepcopy(good)) == good
    bad = [
        ([], "must be an object"),
        ({"2": _entry()}, "slot.function"),
        ({"40.0": _entry()}, "slot.function"),
        ({"02.0": _entry()}, "slot.function"),
        ({"\u0661.0": _entry()}, "slot.function"),
        ({"2.0": "x"}, "not an object"),
        ({"2.0": _entry(mode="copy")}, "mode"),
        ({"2.0": _entry(path="rel/disk.qcow2")}, "absolute"),
        ({"2.0": _entry(path="/a\0b")}, "absolute"),
        ({"2.0": _entry(format="vmdk")}, "format"),
        ({"2.0": _entry(format="raw")}, "needs a qcow2"),
        ({"2.0": _entry(file_size=-1)}, "file_size"),
        ({"2.0": _entry(mtime_ns=True)}, "mtime_ns"),
        ({"2.0": _entry(header_sha256="zz")}, "header_sha256"),
    ]
    for doc, msg in bad:
        with pytest.raises(SnapshotError, match=msg):
            diskio.check_entries(doc)


def _write_snapshot(tmp_path, manifest: dict):
    body, digest = fmt.encode_manifest(manifest)
    d = tmp_path / "snap"
    d.mkdir()
    (d / fmt.MANIFEST).write_bytes(body)
    (d / fmt.MANIFEST_DIGEST).write_bytes(digest)
    return d


def _manifest(**over):
    m = {"format": fmt.FORMAT_NAME, "format_version": 2, "id": "x", "type": "full", "parent": None,
         "config": {}, "memory": {"size": 4096, "layout": []},
         "sections": [{"kind": "vm", "instance": "vm", "version": 1, "file": "vm-vm.json", "size": 1,
                       "sha256": "0" * 64},
                      {"kind": "ram", "instance": "ram", "version": 1, "file": "ram.img", "size": 4096,
                       "sha256": "0" * 64}]}
    m.update(over)
    return m


def test_manifest_disks_are_checked_when_read(tmp_path):
    d = _write_snapshot(tmp_path, _manifest(disks={"2.0": _entry(path="relative")}))
    with pytest.raises(SnapshotError, match="absolute"):
        store.read_manifest(str(d))
    # format 1 knows no disk checkpoints: a manifest claiming both is refused
    d2 = tmp_path / "b"
    d2.mkdir()
    d = _write_snapshot(d2, _manifest(format_version=1, disks={"2.0": _entry()}))
    with pytest.raises(SnapshotError, match="format version 1"):
        store.read_manifest(str(d))
    d3 = tmp_path / "c"
    d3.mkdir()
    m, _ = store.read_manifest(str(_write_snapshot(d3, _manifest(disks={"2.0": _entry()}))))
    assert m["disks"]["2.0"]["mode"] == "overlay"


def test_identity_changes_are_named(tmp_path):
    img = tmp_path / "a.qcow2"
    create_qcow2(str(img), 1 << 20)
    e = diskio.identity(str(img))
    assert diskio.identity_problem(e, diskio.identity(str(img)), check_mtime=True) is None
    st = img.stat()
    os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns + 10))
    now = diskio.identity(str(img))
    assert "mtime" in diskio.identity_problem(e, now, check_mtime=True)
    assert diskio.identity_problem(e, now, check_mtime=False) is None      # a copy: no mtime check
    with open(img, "r+b") as f:
        f.seek(200)
        f.write(b"\x01")
    assert "header" in diskio.identity_problem(e, diskio.identity(str(img)), check_mtime=False)
    with open(img, "ab") as f:
        f.write(b"\0" * 512)
    assert "size" in diskio.identity_problem(e, diskio.identity(str(img)), check_mtime=False)


class FakeDev:
    """A virtio-blk ManagedDevice whose switch_overlay succeeds or fails."""

    def __init__(self, slot, path, fail=None):
        self.spec = SimpleNamespace(id=f"virtio-blk{slot}", kind="virtio_blk", slot=slot, function=0,
                                    options={"args": [path, "serial=x"], "path": path})
        self.fail = fail
        self.switched = []

    def control(self, op, args):
        assert op == "device" and args["op"] == "switch_overlay"
        if self.fail is not None:
            raise self.fail
        self.switched.append(args["args"]["path"])


def _machine(tmp_path, fails):
    devs, fdpass, slots = [], {}, []
    for i, fail in enumerate(fails):
        path = str(tmp_path / f"d{i}.qcow2")
        create_qcow2(path, 1 << 20)
        dev = FakeDev(2 + i, path, fail)
        devs.append(dev)
        vmm_end, dev_end = fdpass_pair()
        os.close(dev_end)   # nobody reads: send_fd only queues (or fails once the peer is gone)
        fdpass[dev.spec.id] = vmm_end
        slots.append(SlotConfig(2 + i, 0, "virtio-blk", (path, "serial=x")))
    return SimpleNamespace(cfg=VmConfig(slots=tuple(slots)), fdpass=fdpass), devs


def _machine_live(tmp_path, fails):
    """As _machine, with the device ends kept open (send_fd succeeds)."""
    devs, fdpass, slots, keep = [], {}, [], []
    for i, fail in enumerate(fails):
        path = str(tmp_path / f"d{i}.qcow2")
        create_qcow2(path, 1 << 20)
        dev = FakeDev(2 + i, path, fail)
        devs.append(dev)
        vmm_end, dev_end = fdpass_pair()
        keep.append(dev_end)
        fdpass[dev.spec.id] = vmm_end
        slots.append(SlotConfig(2 + i, 0, "virtio-blk", (path, "serial=x")))
    return SimpleNamespace(cfg=VmConfig(slots=tuple(slots)), fdpass=fdpass, keep=keep), devs


def test_freeze_switches_every_disk_and_records_them(tmp_path):
    m, devs = _machine_live(tmp_path, [None, None])
    plans = diskio.plan(m, devs)
    assert [p.mode for p in plans] == ["overlay", "overlay"]
    diskio.prepare_overlays(plans, "snap-1")
    assert all(os.path.exists(p.overlay) and p.fd is not None for p in plans)
    entries = diskio.freeze(m, plans)
    diskio.discard(plans)
    assert all(p.fd is None and os.path.exists(p.overlay) for p in plans)
    for i, dev in enumerate(devs):
        old = str(tmp_path / f"d{i}.qcow2")
        new = str(tmp_path / f"d{i}.snap-1.qcow2")
        assert dev.switched == [new] and os.path.exists(new)
        assert dev.spec.options["path"] == new and dev.spec.options["args"] == [new, "serial=x", "format=qcow2"]
        assert m.cfg.slots[i].args == (new, "serial=x", "format=qcow2")
        e = entries[f"{2 + i}.0"]
        assert e["path"] == old and e["mode"] == "overlay" and e == {**e, **diskio.identity(old)}
    cfg_json = {"slots": [{"slot": s.slot, "function": 0, "device": "virtio-blk", "args": list(s.args)}
                          for s in m.cfg.slots]}
    out = diskio.manifest_config(cfg_json, entries)
    assert [s["args"][0] for s in out["slots"]] == [str(tmp_path / "d0.qcow2"), str(tmp_path / "d1.qcow2")]


@pytest.mark.parametrize("failure", [DeviceControlError("ValueError: no"), DeviceTimeout("slow")])
def test_a_switch_failing_midway_leaves_consistent_disks(tmp_path, failure):
    m, devs = _machine_live(tmp_path, [None, failure])
    plans = diskio.plan(m, devs)
    diskio.prepare_overlays(plans, "snap-1")
    with pytest.raises(SnapshotError) as exc:
        diskio.freeze(m, plans)
    diskio.discard(plans)
    msg = str(exc.value)
    first = str(tmp_path / "d0.snap-1.qcow2")
    assert "slot 3.0" in msg and f"already switched, and staying on their overlays: {first}" in msg
    # the first disk runs on its (empty) overlay, and the configuration says so
    assert devs[0].switched == [first] and os.path.exists(first)
    assert m.cfg.slots[0].args[0] == first
    # the second keeps its image; a refused overlay is removed, one a hung device
    # may have taken is left (the supervisor restarts it on the configured image)
    second = tmp_path / "d1.snap-1.qcow2"
    assert m.cfg.slots[1].args[0] == str(tmp_path / "d1.qcow2")
    assert devs[1].spec.options["path"] == str(tmp_path / "d1.qcow2")
    assert second.exists() == isinstance(failure, DeviceTimeout)


def test_plan_refuses_a_writable_raw_disk_and_records_read_only_ones(tmp_path):
    raw = tmp_path / "r.img"
    raw.write_bytes(b"\0" * 4096)
    m, devs = _machine_live(tmp_path, [None])
    dev = FakeDev(5, str(raw))
    with pytest.raises(SnapshotError, match=r"slot 5.0 .*raw image"):
        diskio.plan(m, [*devs, dev])
    dev.spec.options["args"] = [str(raw), "ro"]
    plans = diskio.plan(m, [*devs, dev])
    assert [(p.mode, p.fmt) for p in plans] == [("overlay", "qcow2"), ("read-only", "raw")]
    # probed format: a qcow2 image without format= is switched too
    devs[0].spec.options["args"] = [devs[0].spec.options["path"]]
    assert diskio.plan(m, devs)[0].mode == "overlay"


def test_restore_makes_an_overlay_per_frozen_image_and_names_it_in_the_config(tmp_path):
    frozen = tmp_path / "f.qcow2"
    create_qcow2(str(frozen), 1 << 20)
    ro = tmp_path / "ro.img"
    ro.write_bytes(b"\0" * 4096)
    disks = {"2.0": {"mode": "overlay", "path": str(frozen), "format": "qcow2", **diskio.identity(str(frozen))},
             "3.0": {"mode": "read-only", "path": str(ro), "format": "raw", **diskio.identity(str(ro))}}
    cfg0 = VmConfig(slots=(SlotConfig(2, 0, "virtio-blk", (str(frozen),)),))
    with pytest.raises(SnapshotError, match=r"\['3.0'\] name no virtio-blk"):
        diskio.check_for_restore(disks, {}, cfg0)
    plan = diskio.check_for_restore(disks, {})
    assert [d.base for d in plan] == [str(frozen), str(ro)]
    diskio.create_restore_overlays(plan, "0123456789")
    ov = plan[0].overlay
    assert ov and os.path.basename(ov).startswith("f.restore-01234567-") and plan[1].overlay is None
    cfg = VmConfig(slots=(SlotConfig(2, 0, "virtio-blk", (str(frozen), "format=qcow2", "num_queues=2")),
                          SlotConfig(3, 0, "virtio-blk", (str(ro), "ro", "format=raw"))))
    out = diskio.apply_to_config(cfg, plan)
    assert out.slots[0].args == (ov, "num_queues=2", "format=qcow2")
    assert out.slots[1].args == (str(ro), "ro", "format=raw")
    # a second restore gets its own overlay
    plan2 = diskio.check_for_restore(disks, {})
    diskio.create_restore_overlays(plan2, "0123456789")
    assert plan2[0].overlay != ov
    diskio.remove_overlays(plan2)
    assert not os.path.exists(plan2[0].overlay or "/nonexistent") and os.path.exists(ov)
    # a frozen image that is gone is named
    os.unlink(frozen)
    with pytest.raises(SnapshotError, match="slot 2.0"):
        diskio.check_for_restore(disks, {})
    assert json.dumps(disks)  # the entries are plain JSON


def test_an_fd_that_cannot_be_sent_removes_the_overlay(tmp_path):
    m, devs = _machine(tmp_path, [None])   # the device's end is closed
    plans = diskio.plan(m, devs)
    diskio.prepare_overlays(plans, "snap-1")
    with pytest.raises(SnapshotError, match="slot 2.0"):
        diskio.freeze(m, plans)
    diskio.discard(plans)
    assert devs[0].switched == [] and not (tmp_path / "d0.snap-1.qcow2").exists()
    assert m.cfg.slots[0].args[0] == str(tmp_path / "d0.qcow2")


def test_an_overlay_that_cannot_be_made_removes_the_others(tmp_path):
    m, devs = _machine_live(tmp_path, [None, None])
    plans = diskio.plan(m, devs)
    (tmp_path / "d1.snap-1.qcow2").write_bytes(b"in the way")
    with pytest.raises(SnapshotError, match=r"slot 3.0: cannot create the overlay .*already exists"):
        diskio.prepare_overlays(plans, "snap-1")
    assert not (tmp_path / "d0.snap-1.qcow2").exists()
    assert (tmp_path / "d1.snap-1.qcow2").read_bytes() == b"in the way"   # not ours: left alone
    assert all(p.fd is None and p.overlay is None for p in plans)
    assert [d.switched for d in devs] == [[], []]


def test_check_entries_raises_only_snapshot_errors_on_random_input():
    import random
    rnd = random.Random(12)
    values = [None, True, 0, -1, 2**70, 1.5, "", "x", "/abs", "3.0", [], {}, ["a"], {"a": 1}, "ab" * 32]
    keys = ["mode", "path", "format", "file_size", "mtime_ns", "header_sha256", "extra"]
    for _ in range(3000):
        e = _entry()
        for _ in range(rnd.randrange(1, 4)):
            k = rnd.choice(keys)
            if rnd.random() < 0.2:
                e.pop(k, None)
            else:
                e[k] = rnd.choice(values)
        doc = {rnd.choice(["2.0", "31.7", "0.0", "2.8", "x", "", "2.0.0", "١.0"]): e}
        try:
            diskio.check_entries(doc)
        except SnapshotError:
            pass
