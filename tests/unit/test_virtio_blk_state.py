"""devices.virtio_blk.state and .policy."""

import copy

import msgpack
import pytest

from devices.virtio_blk import state as s


def good():
    return s.make_state(16384, False, 4, 256)


def test_round_trip_through_msgpack():
    st = good()
    back = msgpack.unpackb(msgpack.packb(st), raw=False)
    assert s.check_state(back) == st


@pytest.mark.parametrize("mutate,msg", [
    (lambda d: d.pop("capacity"), "missing"),
    (lambda d: d.update(extra=1), "unexpected"),
    (lambda d: d.update(version=2), "not supported"),
    (lambda d: d.update(version="1"), "version"),
    (lambda d: d.update(capacity=-1), "capacity"),
    (lambda d: d.update(capacity=1 << 64), "capacity"),
    (lambda d: d.update(read_only=1), "read_only"),
    (lambda d: d.update(num_queues=0), "num_queues"),
    (lambda d: d.update(queue_size=100), "power of 2"),
    (lambda d: d.update(queue_size=True), "queue_size"),
])
def test_bad_states(mutate, msg):
    st = copy.deepcopy(good())
    mutate(st)
    with pytest.raises(ValueError, match=msg):
        s.check_state(st)


def test_not_a_map():
    with pytest.raises(ValueError):
        s.check_state([1, 2])


def test_migration_hook(monkeypatch):
    monkeypatch.setattr(s, "STATE_VERSION", 2)
    monkeypatch.setitem(s.MIGRATIONS, 1, lambda d: {**d, "version": 2})
    out = s.check_state(good())
    assert out["version"] == 2


def test_compatibility():
    cur = good()
    assert s.check_compatible(good(), cur) is False
    assert s.check_compatible({**good(), "capacity": 1}, cur) is True
    for key, v in (("read_only", True), ("num_queues", 2), ("queue_size", 128)):
        with pytest.raises(ValueError, match=key):
            s.check_compatible({**good(), key: v}, cur)


def test_policy():
    from devices.virtio_blk.backend import BLKDISCARD
    from devices.virtio_blk.policy import POLICY
    assert POLICY.name == "virtio_blk"
    assert "fallocate" in POLICY.allow
    for name in ("preadv", "pwritev", "preadv2", "pwritev2", "pread64", "pwrite64", "fdatasync", "lseek"):
        assert name in POLICY.allow
    blk_ioctls = [r for r in POLICY.conditional
                  if r.syscall == "ioctl" and r.args[0][0] == 1 and r.args[0][2] == BLKDISCARD]
    assert len(blk_ioctls) == 1 and blk_ioctls[0].errno is None
    assert POLICY.file_size_limit >= 1 << 40
    assert {"execve", "ptrace"} <= POLICY.kill
    assert "openat" in POLICY.errno_probes   # no new files after the jail
    POLICY.build_filter("on")                # builds (not loaded here)
