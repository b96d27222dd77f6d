"""Live migration end to end with the assembly test guests (real KVM): the
incrementer migrated over unix and tcp loopback with its invariant checked on
the destination; repeated bidirectional runs; forced convergence; failures on
either side; refused streams and configurations."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import requires_kvm, requires_root
from tests.guests.checks import check_incrementer_pages
from tests.vmmd_process import RpcError, VmmdProcess
from vmmd.kvm import abi

pytestmark = [requires_kvm, requires_root]


def source(tmp: Path, guest, memory="128M", *extra, env=None) -> VmmdProcess:
    tmp.mkdir(parents=True, exist_ok=True)
    return VmmdProcess(tmp, ["-m", memory, "-s", "31,lpc", "--raw", str(guest), "--raw-mode", "long-cpl3",
                             *extra], extra_env=env)


def destination(tmp: Path, uri: str, *extra) -> VmmdProcess:
    tmp.mkdir(parents=True, exist_ok=True)
    vm = VmmdProcess(tmp, ["--incoming", uri, *extra])
    deadline = time.monotonic() + 30
    while "waiting for an incoming migration" not in vm.stderr():
        if vm.proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"destination not listening: {vm.stderr()[-2000:]}")
        time.sleep(0.05)
    return vm


def kill(vm: VmmdProcess) -> None:
    vm.crash()


def wait_migration(vm: VmmdProcess, timeout: float = 120, until=("completed", "failed", "cancelled")) -> dict:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = vm.rpc("migration.status", timeout=5)
        except (OSError, ValueError):
            if vm.proc.poll() is not None and last and last["state"] in ("switchover", "completed"):
                return dict(last, state="completed")
            raise
        if last["state"] in until:
            return last
        time.sleep(0.05)
    raise AssertionError(f"migration still {last} after {timeout}s")


def check_guest(vm: VmmdProcess, tmp: Path) -> str:
    """Pause the guest, snapshot it and check the incrementer's invariant in its RAM."""
    snap = tmp / f"check-{time.monotonic_ns()}"
    vm.rpc("snapshot.create", {"path": str(snap), "resume": True})
    with open(snap / "ram.img", "rb") as f:
        def read_byte(gpa):
            f.seek(gpa)
            return f.read(1)[0]
        ok, msg = check_incrementer_pages(read_byte)
    assert ok, msg
    return msg


def migrate(src: VmmdProcess, dst: VmmdProcess, uri: str, **params) -> dict:
    src.rpc("migration.start", {"uri": uri, **params})
    st = wait_migration(src)
    assert st["state"] == "completed", (st, dst.stderr()[-3000:], src.stderr()[-3000:])
    assert src.wait(30) == 0
    dst.wait_api()
    assert dst.rpc("vm.info")["state"] == "running"
    return st


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("transport", ["unix", "tcp"])
def test_incrementer_migrates_and_keeps_its_invariant(tmp_path, test_guests, transport):
    uri = f"unix:{tmp_path}/mig.sock" if transport == "unix" else f"tcp:127.0.0.1:{free_port()}"
    src = source(tmp_path / "a", test_guests["incrementer"])
    dst = None
    try:
        src.wait_api()
        src.wait_for("BB", 60)
        dst = destination(tmp_path / "b", uri)
        st = migrate(src, dst, uri)
        assert st["downtime_ms"] is not None and st["iteration"] >= 1 and st["bytes_sent"] > 0
        dst.wait_for("B", 60)  # the guest goes on printing on the destination
        info = dst.rpc("vm.info")
        assert info["restored_from"] == uri
        check_guest(dst, tmp_path)
        dst.wait_for("B", 60, start=len(dst.output()))
    finally:
        kill(src)
        if dst:
            kill(dst)


@pytest.mark.parametrize("mode", ["manual", "classic"])
def test_incrementer_migrates_in_each_kvm_dirty_log_mode(tmp_path, small_incrementer, mode):
    """KVM's dirty log forced into each mode on the source (VMMD_KVM_DIRTY_LOG):
    the incrementer writes all along several passes (a low bandwidth cap, no
    throttling) and its invariant holds on the destination."""
    if mode == "manual":
        from vmmd.kvm import Kvm
        with Kvm() as k:
            if not k.check_extension(abi.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2):
                pytest.skip("KVM here does not offer KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2")
    src = source(tmp_path / "a", small_incrementer, "64M", env={"VMMD_KVM_DIRTY_LOG": mode})
    uri = f"unix:{tmp_path}/d.sock"
    dst = None
    try:
        src.wait_api()
        src.wait_for("B", 60)
        dst = destination(tmp_path / "b", uri)
        st = migrate(src, dst, uri, max_bandwidth_mibs=8, downtime_ms=100)
        assert st["kvm_dirty_log"] == mode
        assert st["iteration"] >= 2, st  # dirty passes ran while the guest wrote
        dst.wait_for("B", 60)
        check_small(dst, tmp_path)
    finally:
        kill(src)
        if dst:
            kill(dst)


# -- a small incrementer: quick migrations for the repeated and failure cases --------------
SMALL = (0x400000, 0x800000)


@pytest.fixture(scope="module")
def small_incrementer(tmp_path_factory):
    from tests.guests.build import build_incrementer
    return build_incrementer(tmp_path_factory.mktemp("guests"), start=SMALL[0], end=SMALL[1],
                             passes_per_mark=16384)


def check_small(vm: VmmdProcess, tmp: Path) -> str:
    snap = tmp / f"check-{time.monotonic_ns()}"
    vm.rpc("snapshot.create", {"path": str(snap), "resume": True})
    with open(snap / "ram.img", "rb") as f:
        def read_byte(gpa):
            f.seek(gpa)
            return f.read(1)[0]
        ok, msg = check_incrementer_pages(read_byte, *SMALL)
    assert ok, msg
    return msg


def vmmctl(api: str, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vmmd.ctl", "--api-socket", api, *args],
                          capture_output=True, text=True, timeout=300)


def test_twenty_bidirectional_migrations(tmp_path, small_incrementer):
    """A -> B -> A ... 20 times, alternating unix and tcp, through vmmctl migrate --wait."""
    vm = source(tmp_path / "run0", small_incrementer, "32M")
    try:
        vm.wait_api()
        vm.wait_for("B", 60)
        for i in range(1, 21):
            uri = f"unix:{tmp_path}/m{i}.sock" if i % 2 else f"tcp:127.0.0.1:{free_port()}"
            dst = destination(tmp_path / f"run{i}", uri)
            r = vmmctl(vm.api, "migrate", uri, "--wait")
            assert r.returncode == 0, (i, r.stdout, r.stderr, dst.stderr()[-2000:])
            assert "migration completed" in r.stdout and "migration" in r.stderr
            assert vm.wait(30) == 0
            vm.stop()
            dst.wait_api()
            dst.wait_for("B", 60)
            vm = dst
        check_small(vm, tmp_path)
    finally:
        kill(vm)


def test_cancel_then_retry(tmp_path, small_incrementer):
    src = source(tmp_path / "a", small_incrementer, "64M")
    try:
        src.wait_api()
        src.wait_for("B", 60)
        uri = f"unix:{tmp_path}/c.sock"
        dst = destination(tmp_path / "b", uri)
        # Slow enough to be cancelled while RAM moves.
        src.rpc("migration.start", {"uri": uri, "max_bandwidth_mibs": 1, "downtime_ms": 1,
                                    "auto_converge": False})
        wait_migration(src, until=("active",))
        st = src.rpc("migration.cancel")
        assert st["state"] == "cancelled"
        assert src.rpc("vm.info")["state"] == "running"
        src.wait_for("B", 30, start=len(src.output()))
        assert dst.wait(30) != 0
        assert "cancelled" in dst.stderr()
        check_small(src, tmp_path)
        dst2 = destination(tmp_path / "c", uri)
        try:
            migrate(src, dst2, uri)
            dst2.wait_for("B", 60)
            check_small(dst2, tmp_path)
        finally:
            kill(dst2)
    finally:
        kill(src)


@pytest.mark.parametrize("phase", ["setup", "active"])
def test_destination_killed_source_runs_on_and_retry_succeeds(tmp_path, small_incrementer, phase):
    src = source(tmp_path / "a", small_incrementer, "64M")
    try:
        src.wait_api()
        src.wait_for("B", 60)
        uri = f"tcp:127.0.0.1:{free_port()}"
        dst = destination(tmp_path / "b", uri)
        if phase == "setup":
            kill(dst)  # nobody listens any more
        src.rpc("migration.start", {"uri": uri, "max_bandwidth_mibs": 2, "downtime_ms": 1,
                                    "auto_converge": False})
        if phase == "active":
            wait_migration(src, until=("active",))
            time.sleep(0.5)
            kill(dst)
        st = wait_migration(src)
        assert st["state"] == "failed" and st["error"], st
        assert src.rpc("vm.info")["state"] == "running"
        src.wait_for("B", 30, start=len(src.output()))
        check_small(src, tmp_path)
        dst2 = destination(tmp_path / "c", uri)
        try:
            migrate(src, dst2, uri)
            check_small(dst2, tmp_path)
        finally:
            kill(dst2)
    finally:
        kill(src)


def test_source_killed_destination_discards_and_fails(tmp_path, small_incrementer):
    src = source(tmp_path / "a", small_incrementer, "64M")
    uri = f"unix:{tmp_path}/k.sock"
    dst = destination(tmp_path / "b", uri)
    try:
        src.wait_api()
        src.rpc("migration.start", {"uri": uri, "max_bandwidth_mibs": 2, "downtime_ms": 1})
        wait_migration(src, until=("active",))
        kill(src)
        assert dst.wait(30) == 2
        assert "vmmd: error:" in dst.stderr() and "the source" in dst.stderr()
        assert not os.path.exists(dst.api)
    finally:
        kill(src)
        kill(dst)


def test_convergence_forced_both_ways(tmp_path, test_guests):
    src = source(tmp_path / "a", test_guests["incrementer"])
    try:
        src.wait_api()
        src.wait_for("B", 60)
        # Cannot converge (1 ms, 20 MiB/s, no throttling): times out, the VM runs on.
        uri = f"unix:{tmp_path}/t.sock"
        dst = destination(tmp_path / "b", uri)
        src.rpc("migration.start", {"uri": uri, "downtime_ms": 1, "max_bandwidth_mibs": 20,
                                    "auto_converge": False, "timeout_s": 4})
        st = wait_migration(src)
        assert st["state"] == "failed" and "did not converge" in st["error"], st
        assert st["throttle_pct"] == 0
        assert dst.wait(30) != 0
        src.wait_for("B", 30, start=len(src.output()))
        # Throttling makes it converge.
        dst = destination(tmp_path / "c", uri)
        st = migrate(src, dst, uri, downtime_ms=30, max_bandwidth_mibs=60)
        assert st["throttle_pct"] > 0 and st["iteration"] > 2, st
        check_guest(dst, tmp_path)
        src2, dst2 = dst, None
        # A generous limit: the switchover comes right after the first pass.
        uri2 = f"unix:{tmp_path}/t2.sock"
        dst2 = destination(tmp_path / "d", uri2)
        st = migrate(src2, dst2, uri2, downtime_ms=100000)
        # (the first pass, or the first dirty sync after it when the bandwidth
        # estimate is not in yet on a loaded host: never an iterative precopy)
        assert st["iteration"] <= 2 and st["throttle_pct"] == 0, st
        check_guest(dst2, tmp_path)
        kill(dst2)
    finally:
        kill(src)


def raw_client(uri_path: str, data: bytes) -> None:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(uri_path)
    try:
        s.sendall(data)
        s.settimeout(5)
        try:
            while s.recv(65536):
                pass
        except OSError:
            pass
    finally:
        s.close()


@pytest.mark.parametrize("case", ["garbage", "truncated", "corrupted", "newer"])
def test_bad_streams_are_refused(tmp_path, case):
    from vmmd.migration import protocol as p
    from vmmd.snapshot import stream
    path = f"{tmp_path}/bad.sock"
    dst = destination(tmp_path / "b", f"unix:{path}")
    try:
        hello = p.control("mig-hello", {"versions": [1]})
        if case == "garbage":
            data = b"GET / HTTP/1.1\r\n\r\n" + bytes(100)
        elif case == "truncated":
            data = hello[:-5]
        elif case == "corrupted":
            data = bytearray(hello)
            data[-3] ^= 0x40
            data = bytes(data)
        else:
            data = stream.encode_record("mig-hello", "mig", b"{}", version=9, kinds=p.CONTROL_KINDS,
                                        max_payload=p.LIMITS)
        raw_client(path, data)
        assert dst.wait(30) == 2
        err = dst.stderr()
        assert err.count("vmmd: error:") == 1 and "Traceback" not in err, err
        assert not os.path.exists(dst.api)
    finally:
        kill(dst)


def test_incompatible_configuration_refused_before_ram(tmp_path, small_incrementer):
    src = source(tmp_path / "a", small_incrementer, "32M")
    try:
        src.wait_api()
        uri = f"unix:{tmp_path}/i.sock"
        img = tmp_path / "disk.img"
        img.write_bytes(bytes(1 << 20))
        dst = destination(tmp_path / "b", uri, "--disk", f"5={img}")  # the source has no disk in slot 5
        src.rpc("migration.start", {"uri": uri})
        st = wait_migration(src)
        assert st["state"] == "failed" and "incompatible configuration" in st["error"], st
        assert st["ram_bytes_sent"] == 0
        assert dst.wait(30) == 2 and "incompatible configuration" in dst.stderr()
        assert src.rpc("vm.info")["state"] == "running"
    finally:
        kill(src)


def test_plain_tcp_to_another_host_is_refused(tmp_path):
    r = subprocess.run([sys.executable, "-m", "vmmd.cli", "--incoming", "tcp:192.0.2.1:4444"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "needs TLS" in r.stderr and r.stderr.count("\n") == 1, r.stderr


def make_certs(d: Path, name: str) -> dict:
    """A CA and a certificate signed by it for each side (openssl CLI)."""
    d.mkdir(parents=True, exist_ok=True)

    def run(*args):
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=d)
    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
        "-days", "2", "-subj", f"/CN={name}-ca")
    out = {"ca": str(d / "ca.pem")}
    for side in ("src", "dst"):
        run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{side}.key", "-out", f"{side}.csr",
            "-subj", f"/CN={side}")
        run("x509", "-req", "-in", f"{side}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", f"{side}.pem", "-days", "2")
        out[side] = (str(d / f"{side}.pem"), str(d / f"{side}.key"))
    return out


@pytest.mark.skipif(subprocess.run(["which", "openssl"], capture_output=True).returncode != 0,
                    reason="needs the openssl CLI to make test certificates")
def test_tls_with_mutual_certificates(tmp_path, small_incrementer):
    good = make_certs(tmp_path / "pki", "good")
    other = make_certs(tmp_path / "pki2", "other")
    src = source(tmp_path / "a", small_incrementer, "32M")
    try:
        src.wait_api()
        src.wait_for("B", 60)
        # A source whose certificate another CA signed is refused; the VM runs on.
        uri = f"tcp:127.0.0.1:{free_port()}"
        dst = destination(tmp_path / "b", uri, "--tls-cert", good["dst"][0], "--tls-key", good["dst"][1],
                          "--tls-ca", good["ca"])
        src.rpc("migration.start", {"uri": uri, "tls": {"cert": other["src"][0], "key": other["src"][1],
                                                        "ca": good["ca"]}})
        st = wait_migration(src)
        assert st["state"] == "failed", st
        assert dst.wait(30) == 2 and "vmmd: error:" in dst.stderr()
        assert src.rpc("vm.info")["state"] == "running"
        # Both certificates from the CA: migrates.
        uri = f"tcp:127.0.0.1:{free_port()}"
        dst = destination(tmp_path / "c", uri, "--tls-cert", good["dst"][0], "--tls-key", good["dst"][1],
                          "--tls-ca", good["ca"])
        migrate(src, dst, uri, tls={"cert": good["src"][0], "key": good["src"][1], "ca": good["ca"]})
        dst.wait_for("B", 60)
        check_small(dst, tmp_path)
        kill(dst)
    finally:
        kill(src)


def test_device_crash_mid_migration_loses_nothing(tmp_path, small_incrementer):
    """The LPC device process is killed while RAM moves: the migration either
    completes with the device restarted, or fails with the source running on;
    either way the guest's invariant holds where it runs, and a retry works."""
    src = source(tmp_path / "a", small_incrementer, "64M")
    dst = None
    try:
        src.wait_api()
        src.wait_for("B", 60)
        uri = f"unix:{tmp_path}/d.sock"
        dst = destination(tmp_path / "b", uri)
        # Slow (about a second of RAM), then converging at once (4 MiB dirty fit 2 s at 4 MiB/s).
        src.rpc("migration.start", {"uri": uri, "max_bandwidth_mibs": 4, "downtime_ms": 2000,
                                    "timeout_s": 60})
        wait_migration(src, until=("active",))
        pid = next(d["pid"] for d in src.rpc("device.list") if d["id"] == "lpc")
        os.kill(pid, signal.SIGKILL)
        st = wait_migration(src)
        if st["state"] == "completed":
            assert src.wait(30) == 0
            dst.wait_api()
            check_small(dst, tmp_path)
            return
        assert st["state"] == "failed", st
        assert src.rpc("vm.info")["state"] == "running"
        check_small(src, tmp_path)
        kill(dst)
        dst = destination(tmp_path / "c", uri)
        migrate(src, dst, uri)
        check_small(dst, tmp_path)
    finally:
        kill(src)
        if dst:
            kill(dst)


def wait_held(src: VmmdProcess, phase: str, timeout: float = 120) -> dict:
    st = None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = src.rpc("migration.status", timeout=5)
        if st.get("held_at") == phase:
            return st
        assert st["state"] in ("setup", "active", "switchover"), st
        time.sleep(0.05)
    raise AssertionError(f"the switchover never held at {phase}: {st}")


@pytest.mark.parametrize("phase", ["devices_saved", "ready"])
@pytest.mark.parametrize("action", ["cancel", "destination-killed", "source-killed"])
def test_failure_in_the_switchover(tmp_path, small_incrementer, phase, action):
    """The switchover held (VMMD_MIGRATION_HOLD) with the source's vCPUs stopped
    and its devices quiesced and saved -- at `devices_saved` (RAM still moving)
    or at `ready` (the destination rebuilt the VM and waits for mig-go) -- then
    cancelled, or one side killed. Cancel or a dead destination: the source
    resumes with its guest intact and a retry succeeds. A dead source: the
    destination discards everything and exits 2 saying why."""
    hold = tmp_path / "hold"
    hold.touch()
    src = source(tmp_path / "a", small_incrementer, "64M", env={"VMMD_MIGRATION_HOLD": f"{phase}:{hold}"})
    uri = f"unix:{tmp_path}/s.sock"
    dst = dst2 = None
    try:
        src.wait_api()
        src.wait_for("B", 60)
        dst = destination(tmp_path / "b", uri)
        src.rpc("migration.start", {"uri": uri, "downtime_ms": 2000})
        st = wait_held(src, phase)
        assert st["state"] == "switchover"
        assert src.rpc("vm.info")["state"] == "paused"
        if action == "source-killed":
            kill(src)
            assert dst.wait(60) == 2
            err = dst.stderr()
            assert "vmmd: error:" in err and "the source" in err, err[-2000:]
            assert "Traceback" not in err
            assert not os.path.exists(dst.api)
            return
        if action == "cancel":
            st = src.rpc("migration.cancel", timeout=90)
            assert st["state"] == "cancelled", st
        else:
            kill(dst)
            st = wait_migration(src)
            assert st["state"] == "failed" and "destination" in st["error"], st
        assert dst.wait(60) != 0
        assert src.rpc("vm.info")["state"] == "running"
        src.wait_for("B", 30, start=len(src.output()))  # the guest runs on here
        check_small(src, tmp_path)
        hold.unlink()  # the retry passes the phase
        dst2 = destination(tmp_path / "c", uri)
        migrate(src, dst2, uri)
        dst2.wait_for("B", 60)
        check_small(dst2, tmp_path)
    finally:
        kill(src)
        for d in (dst, dst2):
            if d:
                kill(d)
