"""The device sandbox, end to end: namespaces, empty root, seccomp, landlock.

Each test runs tests/integration/sandbox_probe.py as a stand-in device under
a small subreaper (like vmmd), talks to it over a zmq PAIR socket, looks at
it from outside through /proc, and collects how every process ended.
Every wait is bounded; the subreaper kills a probe that outlives its
deadline.
"""

from __future__ import annotations

import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROBE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sandbox_probe.py")
DEADLINE = 60.0  # seconds a probe may live at all
WAIT = 20.0  # seconds for any single answer


def _namespaces_permitted() -> str:
    """'' when this process may create the device namespaces, else why not."""
    if sys.platform != "linux":
        return "needs Linux"
    if os.geteuid() != 0:
        return "needs root (CAP_SYS_ADMIN) to unshare mount/pid/net namespaces"
    check = ("from sandbox.namespaces import DEVICE_NAMESPACES, unshare\n"
             "unshare(sum(DEVICE_NAMESPACES.values()))")
    res = subprocess.run([sys.executable, "-c", check], cwd=REPO, capture_output=True, timeout=WAIT,
                         env=dict(os.environ, PYTHONPATH=REPO))
    if res.returncode != 0:
        return f"unshare(2) of device namespaces is not permitted here: {res.stderr.decode()[-200:]}"
    return ""


def _seccomp_available() -> str:
    try:
        import pyseccomp  # noqa: F401
    except (ImportError, RuntimeError) as e:
        return f"pyseccomp/libseccomp unavailable: {e}"
    return ""


_WHY_NOT = _seccomp_available() or _namespaces_permitted()
ALL_NAMESPACES = {"user", "mnt", "pid", "net", "ipc", "uts", "cgroup", "time"}
DEFAULT_HOST_IDS = (65534, 65534)  # sandbox.namespaces.DEFAULT_HOST_IDS
needs_sandbox = pytest.mark.skipif(bool(_WHY_NOT), reason=_WHY_NOT or "ok")
pytestmark = [pytest.mark.root]

zmq = pytest.importorskip("zmq")
msgpack = pytest.importorskip("msgpack")


def _wrapper() -> list[str]:
    """A debugging aid: VMMD_PROBE_WRAPPER="strace -f -o /tmp/x" runs the
    probe under that command."""
    return os.environ.get("VMMD_PROBE_WRAPPER", "").split()


class Probe:
    """One stand-in device process, seen from the vmmd side."""

    def __init__(self, tmp_path, mode: str, policy: str = "lpc", loop_at: str = "after",
                 as_user: list[str] | None = None):
        self.workdir = str(tmp_path)
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.PAIR)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.endpoint = f"ipc://{tmp_path}/probe.bus"
        self.sock.bind(self.endpoint)
        if as_user:  # let an unprivileged probe reach the workdir and the bus
            os.chmod(self.workdir, 0o777)
            os.chmod(f"{tmp_path}/probe.bus", 0o777)
        env = dict(os.environ, PYTHONPATH=REPO, PYTHONDONTWRITEBYTECODE="1")
        argv = [*_wrapper(), *(as_user or []), sys.executable, PROBE, "device", mode, self.endpoint, self.workdir, policy, loop_at]
        self.proc = subprocess.Popen(
            [sys.executable, PROBE, "supervise", str(DEADLINE), "--", *argv],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=REPO)
        self._out = b""

    def handshake(self) -> "Probe":
        first = self._stdout_line()
        assert first.startswith("PID "), f"first stdout line {first!r}; stderr: {self.stderr_so_far()}"
        self.pid = int(first.split()[1])
        self.hello = self.recv()
        assert self.hello is not None and self.hello["op"] == "hello", self.stderr_so_far()
        self.sock.send(msgpack.packb({"op": "welcome"}))
        jailed = self.recv()
        assert jailed is not None and jailed["op"] == "jailed", self.stderr_so_far()
        self.report = jailed["report"]
        return self

    def _stdout_line(self) -> str:
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + WAIT
        while b"\n" not in self._out:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return ""
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            self._out += chunk
        line, _, self._out = self._out.partition(b"\n")
        return line.decode()

    def stderr_so_far(self) -> str:
        fd = self.proc.stderr.fileno()
        data = b""
        while select.select([fd], [], [], 0)[0]:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            data += chunk
        return data.decode(errors="replace")

    def recv(self, timeout: float = WAIT):
        if not self.sock.poll(int(timeout * 1000)):
            return None
        return msgpack.unpackb(self.sock.recv())

    def call(self, op: str, timeout: float = WAIT, **args):
        """The probe's answer, or None when it gave none (it died)."""
        self.sock.send(msgpack.packb({"op": op, **args}))
        return self.recv(timeout)

    def call_fatal(self, op: str, **args) -> dict[int, tuple[str, int]]:
        """Send an op the probe must die of; how every process ended."""
        self.sock.send(msgpack.packb({"op": op, **args}))
        ended = self.finish()
        assert self.recv(timeout=0) is None, "the probe answered instead of dying"
        return ended

    def finish(self) -> dict[int, tuple[str, int]]:
        """Wait for every process of the probe; {pid: ("exit"|"signal", n)}."""
        try:
            out, err = self.proc.communicate(timeout=DEADLINE + WAIT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, err = self.proc.communicate()
        self.stderr = err.decode(errors="replace")
        ended = {}
        for line in (self._out + out).decode().splitlines():
            parts = line.split()
            if len(parts) == 4 and parts[0] == "REAPED":
                ended[int(parts[1])] = (parts[2], int(parts[3]))
        return ended

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.finish()
        self.sock.close()
        self.ctx.term()


@pytest.fixture
def public_dir():
    """A workdir an unprivileged probe can reach (pytest's tmp_path base is 0700)."""
    path = tempfile.mkdtemp(prefix="vmmd-sandbox-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def probe_factory(tmp_path):
    made = []

    def make(mode: str, workdir=None, **kw) -> Probe:
        p = Probe(workdir or tmp_path, mode, **kw)
        made.append(p)
        return p.handshake()

    yield make
    for p in made:
        p.close()


def _status(pid: int | str) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def _limits(pid: int) -> dict[str, str]:
    """Soft limits from /proc/PID/limits, by name."""
    with open(f"/proc/{pid}/limits") as f:
        next(f)
        return {line[:26].strip(): line[26:47].strip() for line in f}


def _ns(pid: int | str, name: str) -> str:
    return os.readlink(f"/proc/{pid}/ns/{name}")


def _assert_unprivileged(status: dict[str, str], host_ids, what) -> None:
    """No capability in any set, every uid/gid the unprivileged host id, no groups."""
    for field in ("CapEff", "CapPrm", "CapInh", "CapBnd", "CapAmb"):
        assert int(status[field], 16) == 0, (what, field, status[field])
    assert set(status["Uid"].split()) == {str(host_ids[0])}, (what, status["Uid"])
    assert set(status["Gid"].split()) == {str(host_ids[1])}, (what, status["Gid"])
    assert status["Groups"].strip() == "", (what, status["Groups"])


def _assert_process_ok(p: Probe) -> None:
    """The serving path still works inside the jail."""
    assert p.call("ping")["ok"]
    assert p.call("timer") == {"ok": True, "value": "later"}
    assert p.call("pipe", data=b"through a pipe") == {"ok": True, "data": b"through a pipe"}
    assert p.call("socketpair", data=b"pair") == {"ok": True, "data": b"pair"}
    assert p.call("thread")["ok"]
    assert p.call("executor") == {"ok": True, "value": 1024}
    assert p.call("traceback")["ok"]  # linecache's opens fail cleanly


@needs_sandbox
def test_on_mode_confines_and_keeps_serving(probe_factory):
    p = probe_factory("on")
    assert set(p.hello["entered"]) == ALL_NAMESPACES
    assert p.report["root"] == "empty"
    assert p.report["seccomp"] == "kill"
    assert p.report["ids"]["host"] == list(DEFAULT_HOST_IDS)

    threads = os.listdir(f"/proc/{p.pid}/task")
    assert len(threads) > 1  # libzmq's I/O threads were running before the jail
    for tid in threads:  # TSYNC: the filter and no_new_privs reach every thread
        status = _status(f"{p.pid}/task/{tid}")
        assert status["Seccomp"] == "2", tid
        assert status["NoNewPrivs"] == "1", tid
        _assert_unprivileged(status, DEFAULT_HOST_IDS, tid)
    for ns in ALL_NAMESPACES:
        assert _ns(p.pid, ns) != _ns("self", ns), ns
    assert os.listdir(f"/proc/{p.pid}/root") == []  # the old / is gone
    assert p.call("ping")["pid"] == 1  # pid 1 of its own pid namespace
    from sandbox import landlock
    if landlock.abi_version():
        assert p.report["landlock"]["fs"] == landlock.handled_rights(landlock.abi_version())["fs"]
    limits = _limits(p.pid)
    assert limits["Max core file size"] == "0"
    assert limits["Max file size"] == str(1 << 30)  # lpc: a file console backend may write
    assert int(limits["Max open files"]) <= max(p.report["fds"]) + 1 + 16

    _assert_process_ok(p)

    # The console socket backend: accept a client on a socket bound before the jail.
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.settimeout(WAIT)
    client.connect(os.path.join(p.workdir, "console.sock"))
    p.sock.send(msgpack.packb({"op": "accept"}))
    client.sendall(b"hello console")
    assert client.recv(100) == b"HELLO CONSOLE"
    assert p.recv() == {"ok": True, "data": b"hello console"}
    client.close()

    # A file console backend writes through its already-open fd.
    assert p.call("logfile", data=b"console output\n")["ok"]
    with open(os.path.join(p.workdir, "console.log"), "rb") as f:
        assert f.read() == b"console output\n"

    # Denied, without killing.
    for path in ("/etc/passwd", "/", "console.log"):
        r = p.call("open", path=path)
        assert r["ok"] is False and r["error"] in ("PermissionError", "FileNotFoundError"), (path, r)
    assert p.call("open", path="/new-file", how="wb")["ok"] is False
    r = p.call("listdir", path="/")
    assert r["ok"] is False or r["names"] == []
    assert p.call("socket", family=socket.AF_INET)["error"] == "PermissionError"
    assert p.call("socket", family=socket.AF_UNIX)["error"] == "PermissionError"
    assert p.call("fork")["error"] == "PermissionError"

    assert p.call("exit") == {"ok": True, "exit": True}
    ended = p.finish()
    assert ended[p.pid] == ("exit", 0), (ended, p.stderr)


@needs_sandbox
def test_zmq_threads_first_running_inside_the_jail_survive(probe_factory):
    """Issue 9: a libzmq thread whose first instructions ran after the filter
    died of SIGSYS (sched_setscheduler, prctl PR_SET_NAME)."""
    p = probe_factory("on")
    for _ in range(3):
        assert p.call("zmq_threads") == {"ok": True}, p.stderr_so_far()
    assert p.call("ping")["ok"]
    assert p.call("exit")["ok"]
    assert p.finish()[p.pid] == ("exit", 0)


@needs_sandbox
def test_on_mode_exec_kills_the_device(probe_factory):
    p = probe_factory("on")
    ended = p.call_fatal("exec")
    assert ended[p.pid] == ("signal", signal.SIGSYS), (ended, p.stderr)


@needs_sandbox
def test_on_mode_unlisted_syscall_kills_the_device(probe_factory):
    p = probe_factory("on")
    ended = p.call_fatal("harmless")
    assert ended[p.pid] == ("signal", signal.SIGSYS), (ended, p.stderr)


@needs_sandbox
@pytest.mark.skipif(not shutil.which("setpriv"), reason="needs setpriv(1) to run the probe as nobody")
def test_unprivileged_device_falls_back_to_a_user_namespace(probe_factory, public_dir):
    p = probe_factory("on", workdir=public_dir, as_user=["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"])
    if "user" not in p.hello["entered"]:
        pytest.skip(f"unprivileged user namespaces are not permitted here: {p.stderr_so_far()}")
    assert set(p.hello["entered"]) == ALL_NAMESPACES
    assert p.report["root"] == "empty"
    assert _status(p.pid)["Seccomp"] == "2"
    assert _status(p.pid)["Uid"].split()[0] == "65534"
    assert _ns(p.pid, "user") != _ns("self", "user")
    assert os.listdir(f"/proc/{p.pid}/root") == []
    _assert_process_ok(p)
    assert p.call("open", path="/etc/passwd")["ok"] is False
    assert p.call("exit")["ok"]
    assert p.finish()[p.pid] == ("exit", 0)


@needs_sandbox
def test_jail_entered_from_inside_a_running_loop(probe_factory):
    """devices/runtime.py handshakes on its loop, then jails, then serves."""
    p = probe_factory("on", loop_at="before")
    assert _status(p.pid)["Seccomp"] == "2"
    _assert_process_ok(p)
    assert p.call("exit")["ok"]
    assert p.finish()[p.pid] == ("exit", 0)


@needs_sandbox
def test_base_policy_serves_without_device_extras(probe_factory):
    p = probe_factory("on", policy="base")
    _assert_process_ok(p)
    assert p.call("exit")["ok"]
    assert p.finish()[p.pid] == ("exit", 0)


@needs_sandbox
def test_log_mode_logs_instead_of_killing(probe_factory):
    p = probe_factory("log")
    assert p.report["seccomp"] == "log"
    assert _status(p.pid)["Seccomp"] == "2"
    assert os.listdir(f"/proc/{p.pid}/root") == []
    r = p.call("harmless")  # not in the policy: logged, allowed
    assert r["ok"] is True and len(r["value"]) == 2
    assert p.call("open", path="/etc/passwd")["ok"] is False  # errno probes still answer
    _assert_process_ok(p)
    # The kill list kills in every mode.
    assert p.call_fatal("exec")[p.pid] == ("signal", signal.SIGSYS)


@needs_sandbox
def test_off_mode_changes_nothing(probe_factory):
    p = probe_factory("off")
    assert p.hello["entered"] == []
    assert p.report == {"mode": "off"}
    status = _status(p.pid)
    assert status["Seccomp"] == "0"
    assert status["NoNewPrivs"] == "0"
    for ns in ("mnt", "net", "pid"):
        assert _ns(p.pid, ns) == _ns("self", ns)
    assert p.call("harmless")["ok"]
    assert p.call("open", path=PROBE)["ok"]
    assert p.call("exit")["ok"]
    assert p.finish()[p.pid] == ("exit", 0)


def test_isolate_rejects_unknown_mode():
    from sandbox import namespaces
    with pytest.raises(ValueError):
        namespaces.isolate("maybe")


def test_policies_are_consistent():
    from devices.lpc.policy import POLICY
    from sandbox.seccomp_policy import ArgRule, base_policy

    base = base_policy()
    assert {"execve", "ptrace", "mount", "unshare", "bpf"} <= base.kill
    assert "openat" in base.errno_probes and "openat" not in base.allow
    assert "accept4" in POLICY.allow and "accept4" not in base.allow
    assert POLICY.file_size_limit > 0 and base.file_size_limit == 0
    # extend() may lift an errno probe but never a kill rule.
    assert "socket" in base.extend(allow={"socket"}).allow
    with pytest.raises(ValueError):
        base.extend(allow={"execve"})
    with pytest.raises(ValueError):
        base.extend(allow={"no_such_syscall"})
    with pytest.raises(ValueError):
        base.extend(conditional=[ArgRule("read", ())])  # already plainly allowed
    for mode in ("on", "log"):
        POLICY.build_filter(mode)
    with pytest.raises(ValueError):
        POLICY.build_filter("off")


def test_landlock_abi_is_a_number():
    from sandbox import landlock
    abi = landlock.abi_version()
    assert isinstance(abi, int) and abi >= 0
    if abi:
        assert landlock.handled_rights(abi)["fs"] & 0b111  # execute, write, read


def test_close_fds_except_keeps_exactly_what_was_asked():
    script = """
import os, sys
from sandbox import limits
fds = [os.open("/dev/null", os.O_RDONLY) for _ in range(6)]
keep = {fds[1], fds[4]}
before = set(limits.open_fds())
limits.close_fds_except(keep)
after = set(limits.open_fds())
assert set(fds) <= before, (fds, before)
assert after == {0, 1, 2} | keep, (after, keep)
print("ok")
"""
    res = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, timeout=WAIT,
                         env=dict(os.environ, PYTHONPATH=REPO))
    assert res.stdout.decode().strip() == "ok", res.stderr.decode()
