"""devices.runtime: a real device process (the fake model in fake_device.py)
driven through VmmChannel, sandbox off."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import zmq

from bus import protocol as p
from bus.endpoint import DeviceControlError, VmmChannel
from bus.types import IoRange, IoSpace

ROOT = Path(__file__).resolve().parents[2]
PIO = IoSpace.PIO
BASE = 0x500
T = 20.0
LAUNCH = "from devices.runtime import main; main('fake', model_module='tests.integration.fake_device')"

pytest.importorskip("sandbox.namespaces")


@pytest.fixture
def rundir():
    d = tempfile.mkdtemp(prefix="rt", dir="/tmp")
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def ctx():
    c = zmq.Context()
    yield c
    c.destroy(linger=0)


class DeviceProcess:
    def __init__(self, ctx, rundir, gen=1, pass_fds=(), **boot):
        self.chan = VmmChannel(ctx, rundir, "fake0", gen)
        doc = {"id": "fake0", "kind": "fake", "req": self.chan.req_endpoint,
               "evt": self.chan.evt_endpoint, "sandbox": "off", "options": {}, "restore": None,
               "mem_fd": None, "layout": None, "fds": {}}
        doc.update(boot)
        self.stderr = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            [sys.executable, "-c", LAUNCH, "--bootstrap", json.dumps(doc)], cwd=ROOT,
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=self.stderr, pass_fds=pass_fds)
        self.pid_line = self.proc.stdout.readline().decode()
        self.pidfd = os.pidfd_open(self.proc.pid)
        self.hello = self.chan.handshake(T, self.pidfd)
        self.poller = zmq.Poller()
        self.poller.register(self.chan.evt_socket, zmq.POLLIN)

    def read(self, off, size=1):
        return self.chan.read(PIO, BASE + off, size, T, self.pidfd)

    def write(self, off, value, size=1):
        self.chan.write(PIO, BASE + off, size, value, T, self.pidfd)

    def control(self, op, args=None):
        return self.chan.control(op, args or {}, T, self.pidfd)

    def events_until(self, pred):
        """Events in arrival order, up to and including the first that satisfies pred."""
        got = []
        while self.poller.poll(T * 1000):
            msg = self.chan.decode_event(self.chan.evt_socket.recv())
            got.append(msg)
            if pred(msg):
                return got
        raise AssertionError(f"no matching event; got {got}")

    def log_text(self):
        self.stderr.seek(0)
        return self.stderr.read().decode(errors="replace")

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(T)
        self.proc.stdout.close()
        os.close(self.pidfd)
        self.chan.close()
        self.stderr.close()


@pytest.fixture
def dev(ctx, rundir):
    d = DeviceProcess(ctx, rundir)
    yield d
    d.close()


def test_handshake(dev):
    assert dev.pid_line == f"PID {dev.proc.pid}\n"
    h = dev.hello
    assert (h.kind, h.instance) == ("fake", "fake0")
    assert h.ranges == (IoRange(PIO, BASE, 0x10),)
    assert h.info["pid_in_ns"] == dev.proc.pid and h.info["state_version"] == 3
    assert h.info["restored"] is False


def test_reads_and_writes_reach_the_model(dev):
    assert dev.read(5) == 1          # start() ran before serving
    dev.write(0, 0x1234, 2)
    assert dev.read(0, 2) == 0x1234
    assert dev.read(0, 1) == 0x34
    for v in range(100):
        dev.write(0, v)
    assert dev.read(0) == 99


def test_events(dev):
    dev.write(1, 1)
    dev.write(1, 0)
    dev.write(3, 7)
    dev.write(7, 0x41)
    got = dev.events_until(lambda m: type(m) is p.Msi)
    assert got == [p.IrqLine(5, 1), p.IrqLine(5, 0), p.Request("reset", {"n": 7}), p.Msi(0xFEE00000, 0x41)]


def test_checkpoints_follow_the_state(dev):
    for v in range(1, 21):
        dev.write(0, v)
    assert dev.read(0) == 20
    got = dev.events_until(lambda m: type(m) is p.Checkpoint and m.state == {"reg": 20})
    # coalesced: never more than one per change, and the last one is current
    assert 1 <= len(got) <= 20 and all(type(m) is p.Checkpoint for m in got)
    # each says how many accesses it covers (vmmd replays the rest after a crash):
    # the 20 writes, and perhaps the read handled before the state was saved
    applied = [m.applied for m in got]
    assert applied == sorted(applied) and applied[-1] in (20, 21)
    assert all(m.applied >= m.state["reg"] for m in got)


def test_model_faults_are_contained(dev):
    assert dev.read(2, 4) == 0xFFFFFFFF           # io_read raised
    assert dev.read(4, 2) == 0xFFFF               # io_read returned a value too wide
    dev.write(2, 1)                               # io_write raised
    dev.write(0, 9)
    assert dev.read(0) == 9                       # still serving
    logs = [m for m in dev.events_until(lambda m: type(m) is p.Log and "boom on write" in m.text)
            if type(m) is p.Log]
    assert len(logs) == 3 and all(m.level == 40 for m in logs)
    assert "boom on read" in logs[0].text and "too wide" not in logs[0].text
    assert "RuntimeError" in dev.log_text()       # the traceback went to stderr
    assert dev.control("stats", {})["bus"]["faults"] == 3


def test_controls(dev):
    dev.write(0, 5)
    assert dev.control("save") == {"reg": 5}
    assert dev.control("restore", {"state": {"reg": 77}}) is None
    assert dev.read(0) == 77
    with pytest.raises(DeviceControlError, match="no int 'reg'"):
        dev.control("restore", {"state": {"reg": "x"}})
    assert dev.read(0) == 77
    assert dev.control("quiesce") is None and dev.read(5) == 3
    assert dev.control("resume") is None and dev.read(5) == 1
    assert dev.control("reset") is None and dev.read(0) == 0
    stats = dev.control("stats")
    assert stats["reg"] == 0 and stats["bus"]["dropped_events"] == 0
    assert dev.control("shutdown") is None
    assert dev.proc.wait(T) == 0
    assert dev.log_text().count("fake model closed") == 1


def test_shutdown_reply_comes_after_the_model_closed(dev):
    # vmmd kills a device as soon as it has the reply: by then its files must
    # be complete (a qcow2 image's preallocated clusters given back).
    assert dev.control("shutdown") is None
    dev.proc.kill()
    dev.proc.wait(T)
    assert "fake model closed" in dev.log_text()


def test_restore_from_bootstrap(ctx, rundir):
    d = DeviceProcess(ctx, rundir, restore={"reg": 42})
    try:
        assert d.hello.info["restored"] is True
        assert d.read(0) == 42
    finally:
        d.close()


def test_bad_restore_from_bootstrap_starts_fresh(ctx, rundir):
    d = DeviceProcess(ctx, rundir, restore={"reg": []}, options={"initial": 3})
    try:
        assert d.hello.info["restored"] is False and "reg" in d.hello.info["restore_error"]
        assert d.read(0) == 0   # reset, not the half-restored or initial state
        logs = d.events_until(lambda m: type(m) is p.Log)
        assert "restore" in logs[-1].text
    finally:
        d.close()


def test_guest_memory_is_mapped(ctx, rundir):
    from vmmd.guest_memory import GuestMemory
    mem = GuestMemory.create(1 << 20)
    try:
        mem.write_u32(0x8000, 0xCAFEF00D)
        d = DeviceProcess(ctx, rundir, pass_fds=(mem.fd,), mem_fd=mem.fd, layout=mem.layout.to_wire())
        try:
            d.write(6, 0x8000, 4)
            assert d.read(6, 4) == 0xCAFEF00D
            mem.write_u32(0x8000, 1)
            d.write(6, 0x8000, 4)
            assert d.read(6, 4) == 1
            d.write(6, 0x7FFFFFF0, 4)    # outside guest RAM: the model raises, contained
            assert d.read(6, 4) == 1
        finally:
            d.close()
    finally:
        mem.close()


def _run_launcher(bootstrap_args, timeout=T):
    return subprocess.run([sys.executable, "-c", LAUNCH, *bootstrap_args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("doc", [
    "not json",
    "[]",
    json.dumps({"id": "x"}),
    json.dumps({"id": "a/b", "kind": "fake", "req": "ipc:///tmp/a", "evt": "ipc:///tmp/b", "sandbox": "off"}),
    json.dumps({"id": "x", "kind": "lpc", "req": "ipc:///tmp/a", "evt": "ipc:///tmp/b", "sandbox": "off"}),
    json.dumps({"id": "x", "kind": "fake", "req": "tcp://1.2.3.4:5", "evt": "ipc:///tmp/b", "sandbox": "off"}),
    json.dumps({"id": "x", "kind": "fake", "req": "ipc:///tmp/a", "evt": "ipc:///tmp/b", "sandbox": "maybe"}),
    json.dumps({"id": "x", "kind": "fake", "req": "ipc:///tmp/a", "evt": "ipc:///tmp/b", "sandbox": "off",
                "mem_fd": 5}),
    json.dumps({"id": "x", "kind": "fake", "req": "ipc:///tmp/a", "evt": "ipc:///tmp/b", "sandbox": "off",
                "options": []}),
    json.dumps({"id": "x", "kind": "fake", "req": "ipc:///tmp/a", "evt": "ipc:///tmp/b", "sandbox": "off",
                "fds": {"tap": -1}}),
])
def test_bad_bootstrap_exits_2(doc):
    res = _run_launcher(["--bootstrap", doc])
    assert res.returncode == 2
    assert "bad bootstrap" in res.stderr and "Traceback" not in res.stderr
    assert res.stdout == ""      # no PID line: nothing was started


def test_missing_bootstrap_exits_2():
    res = _run_launcher([])
    assert res.returncode == 2 and "--bootstrap" in res.stderr


def test_bad_guest_memory_exits_2():
    doc = {"id": "x", "kind": "fake", "req": "ipc:///tmp/nope-a", "evt": "ipc:///tmp/nope-b",
           "sandbox": "off", "mem_fd": 99, "layout": [[0, 4096, 0]]}
    res = _run_launcher(["--bootstrap", json.dumps(doc)])
    assert res.returncode == 2 and "guest memory" in res.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (namespaces, seccomp jail)")
def test_a_large_checkpoint_from_inside_the_jail_does_not_kill_the_device(ctx, rundir):
    # A frame over 64 KiB sent zero-copy makes pyzmq start a helper thread;
    # started inside the jail, libzmq's thread setup dies on seccomp. The
    # device must send such frames by copy and survive.
    from sandbox.seccomp_policy import base_policy
    launch = ("from devices.runtime import main; from sandbox.seccomp_policy import base_policy; "
              "main('fake', model_module='tests.integration.fake_device', policy=base_policy())")
    chan = VmmChannel(ctx, rundir, "fake0", 1)
    doc = {"id": "fake0", "kind": "fake", "req": chan.req_endpoint, "evt": chan.evt_endpoint,
           "sandbox": "on", "options": {}, "restore": None, "mem_fd": None, "layout": None, "fds": {}}
    errf = tempfile.TemporaryFile()
    proc = subprocess.Popen([sys.executable, "-c", launch, "--bootstrap", json.dumps(doc)], cwd=ROOT,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=errf)
    try:
        line = proc.stdout.readline().decode()
        assert line.startswith("PID "), line
        pid = int(line.split()[1])
        pidfd = os.pidfd_open(pid)
        chan.handshake(T, pidfd)
        blob = bytes(range(256)) * 1024  # 256 KiB
        chan.control("restore", {"state": {"reg": 7, "blob": blob}}, T, pidfd)
        poller = zmq.Poller()
        poller.register(chan.evt_socket, zmq.POLLIN)
        assert poller.poll(T * 1000), "no checkpoint event"
        msg = chan.decode_event(chan.evt_socket.recv())
        assert msg.state["blob"] == blob
        assert chan.read(PIO, BASE, 1, T, pidfd) == 7  # still alive and serving
        assert chan.control("save", {}, T, pidfd)["blob"] == blob
        chan.control("shutdown", {}, T, pidfd)
    finally:
        try:
            os.kill(pid, 9)
        except (ProcessLookupError, UnboundLocalError):
            pass
        proc.wait(10)
        chan.close()
