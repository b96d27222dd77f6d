"""sandbox.cgroups on fake cgroup trees (no root needed), and the bootstrap
keys that carry cgroups and ids to a device."""

import json
import os

import pytest

from devices.runtime import BootstrapError, parse_bootstrap
from sandbox.cgroups import CgroupLimits, CgroupManager

MiB = 1 << 20


def _file(path, text=""):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def _mountinfo(*mounts):
    return "\n".join(f"{30 + i} 23 0:{40 + i} / {point} rw,relatime - {fstype} {fstype} rw,{opts}"
                     for i, (point, fstype, opts) in enumerate(mounts)) + "\n"


def test_hybrid_host_uses_the_v1_memory_and_pids_hierarchies(tmp_path):
    # As on this machine: cgroup2 at .../unified with only hugetlb.
    _file(f"{tmp_path}/unified/cgroup.controllers", "hugetlb\n")
    os.makedirs(f"{tmp_path}/memory/outer", exist_ok=True)
    os.makedirs(f"{tmp_path}/pids", exist_ok=True)
    m = CgroupManager("vmmd-test", mountinfo=_mountinfo(
        (f"{tmp_path}/unified", "cgroup2", "nsdelegate"),
        (f"{tmp_path}/memory", "cgroup", "memory"),
        (f"{tmp_path}/pids", "cgroup", "pids")),
        proc_cgroup="9:pids:/\n4:memory:/outer\n0::/\n")
    assert m.version == "v1", m.reason
    assert "hugetlb" in m.reason  # says why cgroup2 was not used
    cg = m.create("blk0.3", CgroupLimits(256 * MiB, 32, plus_guest_memory=True), guest_memory=64 * MiB)
    assert cg.dirs == [f"{tmp_path}/memory/outer/vmmd-test/blk0.3", f"{tmp_path}/pids/vmmd-test/blk0.3"]
    with open(f"{cg.dirs[0]}/memory.limit_in_bytes") as f:
        assert int(f.read()) == 320 * MiB
    with open(f"{cg.dirs[1]}/pids.max") as f:
        assert int(f.read()) == 32
    assert cg.limits == {"memory.limit_in_bytes": 320 * MiB, "pids.max": 32}
    for d in cg.dirs:  # a real cgroupfs has no regular files to delete first
        for name in os.listdir(d):
            os.unlink(os.path.join(d, name))
    cg.remove()
    assert not any(os.path.exists(d) for d in cg.dirs)
    m.close()
    assert not os.path.exists(f"{tmp_path}/pids/vmmd-test")


def test_unified_host_uses_memory_max_and_pids_max(tmp_path):
    base = f"{tmp_path}/cg/system.slice/vmmd.service"
    _file(f"{base}/cgroup.controllers", "cpu memory pids\n")
    _file(f"{base}/cgroup.subtree_control")
    os.makedirs(f"{base}/vmmd-test", exist_ok=True)
    _file(f"{base}/vmmd-test/cgroup.subtree_control")
    m = CgroupManager("vmmd-test", mountinfo=_mountinfo((f"{tmp_path}/cg", "cgroup2", "nsdelegate")),
                      proc_cgroup="0::/system.slice/vmmd.service\n")
    assert m.version == "v2", m.reason
    with open(f"{base}/cgroup.subtree_control") as f:
        assert f.read() == "+memory +pids"
    cg = m.create("lpc.1", CgroupLimits(128 * MiB, 16))
    assert cg.limits == {"memory.max": 128 * MiB, "pids.max": 16}
    with open(f"{base}/vmmd-test/lpc.1/memory.max") as f:
        assert f.read() == str(128 * MiB)


def test_a_spares_cgroup_becomes_its_devices(tmp_path):
    """vmmd --restore-wait: the spare's cgroup gets the device's limits and name."""
    os.makedirs(f"{tmp_path}/memory", exist_ok=True)
    os.makedirs(f"{tmp_path}/pids", exist_ok=True)
    m = CgroupManager("vmmd-test", mountinfo=_mountinfo(
        (f"{tmp_path}/memory", "cgroup", "memory"), (f"{tmp_path}/pids", "cgroup", "pids")),
        proc_cgroup="9:pids:/\n4:memory:/\n")
    cg = m.create("spare-1", CgroupLimits(256 * MiB, 32))
    m.set_limits(cg, CgroupLimits(128 * MiB, 16, plus_guest_memory=True), guest_memory=64 * MiB)
    cg.rename("virtio-blk2.1")
    assert cg.dirs == [f"{tmp_path}/memory/vmmd-test/virtio-blk2.1", f"{tmp_path}/pids/vmmd-test/virtio-blk2.1"]
    assert not os.path.exists(f"{tmp_path}/pids/vmmd-test/spare-1")
    with open(f"{cg.dirs[0]}/memory.limit_in_bytes") as f:
        assert int(f.read()) == 192 * MiB
    assert cg.limits == {"memory.limit_in_bytes": 192 * MiB, "pids.max": 16}
    for bad in ("", "a/b", ".x"):
        with pytest.raises(ValueError):
            cg.rename(bad)


def test_no_usable_cgroups_says_why(tmp_path):
    _file(f"{tmp_path}/unified/cgroup.controllers", "hugetlb\n")
    m = CgroupManager("vmmd-test", mountinfo=_mountinfo((f"{tmp_path}/unified", "cgroup2", "x")),
                      proc_cgroup="0::/\n")
    assert not m.available
    assert "no memory and pids controllers" in m.reason and "no v1 hierarchy" in m.reason
    with pytest.raises(OSError):
        m.create("x.1", CgroupLimits(MiB, 1))


def _boot(**extra):
    doc = {"id": "blk0", "kind": "virtio_blk", "req": "ipc:///r", "evt": "ipc:///e", "sandbox": "on"}
    doc.update(extra)
    return json.dumps(doc)


def test_bootstrap_carries_cgroup_fds_and_host_ids():
    b = parse_bootstrap(_boot(cgroup_fds=[7, 8], host_ids=[70000, 70001]), "virtio_blk")
    assert b.cgroup_fds == (7, 8) and b.host_ids == (70000, 70001) and b.unknown_keys == ()
    b = parse_bootstrap(_boot(), "virtio_blk")
    assert b.cgroup_fds == () and b.host_ids is None
    for bad in ({"cgroup_fds": 3}, {"cgroup_fds": [-1]}, {"host_ids": [0, 5]}, {"host_ids": [5]},
                {"host_ids": [5, 1 << 40]}, {"host_ids": ["5", 5]}):
        with pytest.raises(BootstrapError):
            parse_bootstrap(_boot(**bad), "virtio_blk")


def test_a_leftover_cgroup_of_the_same_name_never_stops_a_device(tmp_path):
    # A failed restore's device cgroup "lpc.1" can outlive its rmdir; the next
    # attempt's lpc is again generation 1 (seen in CI: rename -> EEXIST).
    from sandbox.cgroups import DeviceCgroup
    base = tmp_path / "pids" / "vmmd-1"
    (base / "lpc.1").mkdir(parents=True)          # empty leftover: removed, name reused
    (base / "spare-1").mkdir()
    cg = DeviceCgroup([str(base / "spare-1")], {})
    cg.rename("lpc.1")
    assert cg.dirs == [str(base / "lpc.1")] and not (base / "spare-1").exists()
    (base / "spare-2").mkdir()
    (base / "lpc.1" / "cgroup.procs").write_text("123\n")   # still in use: a new name beside it
    cg2 = DeviceCgroup([str(base / "spare-2")], {})
    cg2.rename("lpc.1")
    assert cg2.dirs == [str(base / "lpc.1~2")]
