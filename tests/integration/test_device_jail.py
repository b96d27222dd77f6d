"""Real device processes of every kind, spawned by vmmd's supervisor with the
full sandbox (issue 9): no capabilities, an unprivileged host id, their own
user/cgroup/time namespaces, a cgroup with memory and pids limits, the
right RLIMIT_FSIZE, stdout/stderr through a rate-limited pipe, and no
death by seccomp at start."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import tempfile
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest

from tests.conftest import requires_root
from tests.harness.starts import KINDS, RecordingHarness, cpu_load, device_of_kind, start_loop

pytestmark = [pytest.mark.root, requires_root]

ROOT = Path(__file__).resolve().parents[2]
HOST_IDS = (65534, 65534)          # sandbox.namespaces.DEFAULT_HOST_IDS
MEM = 32 << 20
NAMESPACES = ("user", "mnt", "pid", "net", "ipc", "uts", "cgroup", "time")
CAP_FIELDS = ("CapEff", "CapPrm", "CapInh", "CapBnd", "CapAmb")


def _status(path: str) -> dict[str, str]:
    with open(f"/proc/{path}/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def _limits(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/limits") as f:
        next(f)
        return {line[:26].strip(): line[26:47].strip() for line in f}


@contextmanager
def four_devices(start: str):
    """One harness (vmmd's supervisor) running one device of each kind, started
    cold (exec'd) or from spare processes (vmmd --restore-wait's, devices/spare.py)."""
    from vmmd.spare_pool import SparePool
    pool = SparePool(len(KINDS), isolate=True)   # as vmmd --restore-wait: in namespaces ahead
    with ExitStack() as outer, tempfile.TemporaryDirectory(prefix="vmmd-jail-") as workdir:
        outer.callback(pool.close_cgroups)   # after the harness reaped the devices in them
        h = outer.enter_context(RecordingHarness(sandbox="on", mem_size=MEM))
        stack = outer.enter_context(ExitStack())
        if start == "spare":
            stack.callback(pool.close)
            pool.fill()
            deadline = time.monotonic() + 60
            while pool.status()["starting"] and time.monotonic() < deadline:
                time.sleep(0.05)   # an isolated spare is used once it reported its pid
            h.supervisor.spares = pool
        devs = {kind: stack.enter_context(device_of_kind(h, kind, workdir)) for kind in KINDS}
        if start == "spare":
            assert pool.take() is None   # every device came from a spare
            for dev in devs.values():
                assert b"devices.spare" in Path(f"/proc/{dev.current.pid}/cmdline").read_bytes()
        yield h, devs


@pytest.fixture(scope="module", params=["cold", "spare"])
def four(request):
    with four_devices(request.param) as hd:
        yield hd


def _fd_shape(pid: int) -> list[str]:
    """What a process holds, without numbers: pipe, socket, anon_inode:[eventfd], a file's name."""
    shape = []
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{name}")
        except OSError:
            continue
        kind = target.split(":[", 1)[0] if target.startswith(("pipe:", "socket:")) else target
        shape.append(os.path.basename(kind) if kind.startswith("/") else kind)
    return sorted(shape)


def test_spare_started_devices_are_jailed_exactly_like_cold_ones():
    """Field by field: ids, capabilities, no_new_privs, seccomp filters, rlimits,
    namespaces and the descriptors held (vmmd --restore-wait's spares)."""
    fields = (*CAP_FIELDS, "Uid", "Gid", "Groups", "NoNewPrivs", "Seccomp", "Seccomp_filters")
    with four_devices("cold") as (hc, cold), four_devices("spare") as (hs, spare):
        for kind in KINDS:
            a, b = cold[kind].current.pid, spare[kind].current.pid
            sa, sb = _status(str(a)), _status(str(b))
            assert {f: sa[f] for f in fields} == {f: sb[f] for f in fields}, kind
            la, lb = _limits(a), _limits(b)
            # RLIMIT_NOFILE is the highest fd kept plus a margin: a spare's fds arrive
            # numbered from 3 up, a cold device keeps vmmd's numbers.
            assert int(lb.pop("Max open files")) <= int(la.pop("Max open files")), kind
            assert la == lb, kind
            for ns in NAMESPACES:
                mine = os.readlink(f"/proc/self/ns/{ns}")
                assert os.readlink(f"/proc/{a}/ns/{ns}") != mine and os.readlink(f"/proc/{b}/ns/{ns}") != mine
            assert _fd_shape(a) == _fd_shape(b), kind
            with open(f"/proc/{b}/cgroup") as f:
                assert f"{spare[kind].spec.id}.{spare[kind].generation}" in f.read(), kind


@pytest.mark.parametrize("kind", KINDS)
def test_device_has_no_capabilities_and_an_unprivileged_id(four, kind):
    h, devs = four
    pid = devs[kind].current.pid
    tasks = os.listdir(f"/proc/{pid}/task")
    assert len(tasks) > 1  # zmq's threads: the drop reached them too
    for tid in tasks:
        st = _status(f"{pid}/task/{tid}")
        for field in CAP_FIELDS:
            assert int(st[field], 16) == 0, (kind, tid, field, st[field])
        assert st["Uid"].split() == [str(HOST_IDS[0])] * 4, (kind, tid, st["Uid"])
        assert st["Gid"].split() == [str(HOST_IDS[1])] * 4, (kind, tid, st["Gid"])
        assert st["Groups"].strip() == "", (kind, tid)
        assert st["NoNewPrivs"] == "1" and st["Seccomp"] == "2", (kind, tid)


@pytest.mark.parametrize("kind", KINDS)
def test_device_namespaces_differ_from_vmmd(four, kind):
    h, devs = four
    pid = devs[kind].current.pid
    for ns in NAMESPACES:
        assert os.readlink(f"/proc/{pid}/ns/{ns}") != os.readlink(f"/proc/self/ns/{ns}"), (kind, ns)


@pytest.mark.parametrize("kind", KINDS)
def test_device_cgroup_limits(four, kind):
    h, devs = four
    dev = devs[kind]
    pid = dev.current.pid
    cgroup = h.supervisor._jail.cgroup_of(pid)
    assert cgroup is not None, "no cgroup (is cgroup v1/v2 writable here?)"
    limits = h.supervisor._jail.limits_for(kind)
    want_memory = limits.memory_for(MEM if dev.spec.needs_memory else 0)
    assert want_memory < 1 << 40 and limits.pids_max <= 64
    seen = {}
    for d in cgroup.dirs:
        with open(os.path.join(d, "cgroup.procs")) as f:
            assert str(pid) in f.read().split(), (d, pid)
        for name in ("memory.max", "memory.limit_in_bytes", "pids.max"):
            p = os.path.join(d, name)
            if os.path.exists(p):
                with open(p) as f:
                    seen[name] = int(f.read())
    assert seen["pids.max"] == limits.pids_max
    assert seen.get("memory.max", seen.get("memory.limit_in_bytes")) == want_memory
    # The device's own view of its cgroup: the root of its cgroup namespace.
    with open(f"/proc/{pid}/cgroup") as f:
        mine = f.read()
    assert f"{dev.spec.id}.{dev.generation}" in mine


@pytest.mark.parametrize("kind,fsize", [("lpc", "0"), ("virtio_blk", str(4 << 20)),
                                        ("virtio_net", "0"), ("virtio_balloon", "0")])
def test_device_file_size_limit(four, kind, fsize):
    h, devs = four
    lim = _limits(devs[kind].current.pid)
    assert lim["Max file size"] == fsize
    assert lim["Max core file size"] == "0"


def test_lpc_with_a_file_console_may_write_its_file():
    from tests.harness.starts import lpc_spec
    with tempfile.TemporaryDirectory(prefix="vmmd-jail-") as d, RecordingHarness(sandbox="on", mem_size=MEM) as h:
        dev = h.add_device(lpc_spec(MEM, com1=f"file,{d}/console.log"))
        assert _limits(dev.current.pid)["Max file size"] == str(1 << 30)
        assert int(_status(str(dev.current.pid))["CapEff"], 16) == 0


@pytest.mark.parametrize("kind", KINDS)
def test_device_holds_no_descriptor_of_vmmds_log(four, kind):
    h, devs = four
    pid = devs[kind].current.pid
    mine = {(os.fstat(fd).st_dev, os.fstat(fd).st_ino) for fd in (1, 2)}
    for fd in (1, 2):
        assert os.readlink(f"/proc/{pid}/fd/{fd}").startswith("pipe:["), (kind, fd)
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            st = os.stat(f"/proc/{pid}/fd/{name}")
        except OSError:
            continue
        assert (st.st_dev, st.st_ino) not in mine, (kind, name, os.readlink(f"/proc/{pid}/fd/{name}"))


def test_cgroups_removed_when_devices_exit():
    with tempfile.TemporaryDirectory(prefix="vmmd-jail-") as workdir:
        h = RecordingHarness(sandbox="on", mem_size=MEM)
        try:
            with device_of_kind(h, "virtio_balloon", workdir) as dev:
                first = h.supervisor._jail.cgroup_of(dev.current.pid).dirs
                bases = {os.path.dirname(d) for d in first}
                assert all(os.path.isdir(d) for d in first)
                gen = dev.generation
                os.kill(dev.current.pid, signal.SIGKILL)  # a crash: restarted by the supervisor
                h.wait_running(dev, gen + 1)
                second = h.supervisor._jail.cgroup_of(dev.current.pid).dirs
                assert second != first
                assert not any(os.path.exists(d) for d in first)
                h.run(h.supervisor.stop_all(), 30.0)
                assert not any(os.path.exists(d) for d in second)
        finally:
            h.close()
        assert not any(os.path.exists(b) for b in bases)  # vmmd's sub-hierarchy too


# --- logs ----------------------------------------------------------------------------------

FAKE_LAUNCH = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); from devices.runtime import main; "
               "from sandbox.seccomp_policy import base_policy; "
               "main('fake', model_module='tests.integration.fake_device', policy=base_policy())")


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_device_stderr_flood_is_attributed_cleaned_and_bounded():
    from vmmd.devlink import DeviceSpec
    from vmmd.device_log import BURST, MAX_LINE, RATE

    records = _Records()
    logger = logging.getLogger("vmmd.devices")
    logger.addHandler(records)
    old_level = logger.level
    logger.setLevel(logging.DEBUG)
    forged = "vmmd ERROR vmmd.machine: guest panicked \x1b[2J\x1b]0;owned\x07 \u202eevil\r\n"
    flood = 64 << 20
    try:
        with RecordingHarness(sandbox="on", mem_size=MEM) as h:
            h.supervisor.command = lambda spec, boot: [sys.executable, "-c", FAKE_LAUNCH,
                                                       "--bootstrap", json.dumps(boot)]
            dev = h.add_device(DeviceSpec(id="fake0", kind="fake", options={}))
            t0 = time.monotonic()
            written = dev.control("device", {"op": "stderr", "args": {"bytes": flood, "line": forged}}, 120.0)
            assert written == flood
            deadline = time.monotonic() + 60
            while h.supervisor.log_stats("fake0")["bytes"] < flood and time.monotonic() < deadline:
                time.sleep(0.05)
            elapsed = time.monotonic() - t0
            stats = h.supervisor.log_stats("fake0")
            assert dev.state == "running"
            # LOG events over the bus go through the same per-device limit.
            assert dev.control("device", {"op": "log_events", "args": {"n": 5000, "text": forged}}) == 5000
            deadline = time.monotonic() + 30
            while (h.supervisor.log_stats("fake0")["dropped"] < stats["dropped"] + 4000
                   and time.monotonic() < deadline):
                time.sleep(0.05)
            after_events = h.supervisor.log_stats("fake0")
            elapsed = time.monotonic() - t0
    finally:
        logger.removeHandler(records)
        logger.setLevel(old_level)
    lines = flood // len(forged.encode())
    assert stats["bytes"] >= flood
    assert stats["dropped"] >= lines - BURST - RATE * elapsed - 10, (stats, elapsed)
    mine = [m for m in records.messages if "fake0" in m]
    assert len(mine) <= BURST + RATE * elapsed + elapsed / 5 + 50, (len(mine), elapsed)
    assert sum(map(len, mine)) < 1 << 20  # vmmd's log stays small
    forged_seen = [m for m in mine if "guest panicked" in m]
    assert forged_seen  # relayed, but never as vmmd's own line:
    for m in mine:
        assert m.startswith("[fake0] "), m
        assert not any(c in m for c in "\x1b\x07\n\r\u202e"), repr(m)
        assert len(m) <= 4 * MAX_LINE + 20
    assert any("log lines dropped" in m for m in mine)
    assert after_events["dropped"] >= stats["dropped"] + 4000, (stats, after_events)


# --- no death by seccomp at start -----------------------------------------------------------

STARTS = int(os.environ.get("VMMD_JAIL_STARTS", "20"))


def test_device_starts_under_load_never_die_of_sigsys():
    """bench/device_starts.py does 200 of each; here STARTS of each kind."""
    results = []
    with cpu_load():
        for kind in KINDS:
            results.append(start_loop(kind, STARTS))
    for r in results:
        assert r["sigsys"] == 0 and r["crashes"] == 0, results
        assert r["ended"].get("killed by SIGKILL", 0) >= STARTS - 1, results


@pytest.mark.parametrize("mode", ["log", "off"])
def test_debug_sandbox_modes_still_work(mode):
    """--sandbox log: the same jail, seccomp only logs; off: nothing (but logs still go
    through vmmd's pipe)."""
    with tempfile.TemporaryDirectory(prefix="vmmd-jail-") as d, RecordingHarness(sandbox=mode, mem_size=MEM) as h:
        with device_of_kind(h, "virtio_blk", d) as dev:
            pid = dev.current.pid
            st = _status(str(pid))
            assert dev.control("stats")
            assert os.readlink(f"/proc/{pid}/fd/2").startswith("pipe:[")
            if mode == "log":
                assert int(st["CapEff"], 16) == 0 and st["Uid"].split()[0] == str(HOST_IDS[0])
                assert st["Seccomp"] == "2"
                assert h.supervisor._jail.cgroup_of(pid) is not None
            else:
                assert st["Seccomp"] == "0" and h.supervisor._jail.cgroup_of(pid) is None
