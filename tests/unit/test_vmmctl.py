"""vmmctl against a real control socket served from a background thread."""

import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading

import pytest

import vmmd
from bus.types import PROTOCOL_VERSION
from vmmd import ctl
from vmmd.api.jsonrpc import Dispatcher
from vmmd.api.methods import build_registry
from vmmd.api.server import serve
from test_jsonrpc import FakeVm  # same directory (pytest's default import mode)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def sock_path():
    d = tempfile.mkdtemp(prefix="vmmctl-", dir="/tmp")
    yield os.path.join(d, "api.sock")
    shutil.rmtree(d)


@pytest.fixture
def api(sock_path):
    """A served FakeVm; yields (socket path, vm)."""
    vm = FakeVm()
    registry = build_registry(vm)
    never = None

    async def hang(params):
        await never.wait()
    registry.add("test.hang", hang)
    loop = asyncio.new_event_loop()
    ready = threading.Event()

    def run():
        nonlocal never
        asyncio.set_event_loop(loop)
        never = asyncio.Event()
        server = loop.run_until_complete(serve(sock_path, Dispatcher(registry)))
        ready.set()
        loop.run_forever()
        server.close()
        never.set()
        loop.run_until_complete(server.wait_closed())
        loop.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    ready.wait()
    yield sock_path, vm
    loop.call_soon_threadsafe(loop.stop)
    thread.join()


def vmmctl(capsys, *argv):
    """Run vmmctl in-process; returns (exit code, stdout, stderr)."""
    try:
        code = ctl.main(list(argv))
    except SystemExit as exc:   # argparse usage errors
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_info_human_and_json(api, capsys):
    path, vm = api
    code, out, err = vmmctl(capsys, "--api-socket", path, "info")
    assert code == 0 and err == ""
    lines = dict(line.split(None, 1) for line in out.splitlines())
    assert lines == {"state:": "running", "vcpus:": "2", "memory:": "512 MiB", "uptime:": "1h02m05s",
                     "devices:": "lpc0 (running)", "assists:": '{"pio": 3}'}
    code, out, _ = vmmctl(capsys, "--api-socket", path, "--json", "info")
    assert code == 0 and json.loads(out)["memory_bytes"] == 512 << 20


def test_global_options_also_work_after_the_command(api, capsys):
    path, _ = api
    code, out, _ = vmmctl(capsys, "info", "--json", "--api-socket", path)
    assert code == 0 and json.loads(out)["state"] == "running"


def test_env_var_names_the_socket(api, capsys, monkeypatch):
    path, _ = api
    monkeypatch.setenv("VMMD_API_SOCKET", path)
    code, out, _ = vmmctl(capsys, "version")
    assert code == 0 and f"vmmd {vmmd.__version__}" in out and f"protocol {PROTOCOL_VERSION}" in out


def test_lifecycle_commands_and_state_errors(api, capsys):
    path, vm = api
    assert vmmctl(capsys, "--api-socket", path, "pause")[:2] == (0, "paused\n")
    assert vm.state == "paused"
    code, out, err = vmmctl(capsys, "--api-socket", path, "pause")
    assert code == 1 and out == "" and err.startswith("error -32000: ")
    assert vmmctl(capsys, "--api-socket", path, "resume")[:2] == (0, "resumed\n")
    assert vmmctl(capsys, "--api-socket", path, "reset")[0] == 0
    code, out, _ = vmmctl(capsys, "--api-socket", path, "--json", "shutdown")
    assert code == 0 and json.loads(out) is None and vm.state == "shutdown"


def test_devices_table(api, capsys):
    path, _ = api
    code, out, _ = vmmctl(capsys, "--api-socket", path, "devices")
    header, row = out.splitlines()
    assert header.split() == ["ID", "TYPE", "PID", "STATE", "RESTARTS", "SANDBOX"]
    assert row.split() == ["lpc0", "lpc", "42", "running", "0", "on"]
    code, out, _ = vmmctl(capsys, "--api-socket", path, "--json", "devices")
    assert json.loads(out)[0]["pid"] == 42


def test_device_restart(api, capsys):
    path, vm = api
    assert vmmctl(capsys, "--api-socket", path, "device-restart", "lpc0")[0] == 0
    assert vm.restarted == ["lpc0"]
    code, _, err = vmmctl(capsys, "--api-socket", path, "device-restart", "nope")
    assert code == 1 and err.startswith("error -32001: ")


def test_device_stats_and_link(api, capsys):
    path, vm = api
    code, out, _ = vmmctl(capsys, "--api-socket", path, "device-stats", "net0")
    assert code == 0 and json.loads(out)["net"]["tx_packets"] == 4
    code, out, _ = vmmctl(capsys, "--api-socket", path, "device-link", "net0", "down")
    assert code == 0 and out.strip() == "link down (was up)" and vm.link_up is False
    code, _, err = vmmctl(capsys, "--api-socket", path, "device-link", "net0", "sideways")
    assert code == 2 and "up' or 'down" in err
    code, _, err = vmmctl(capsys, "--api-socket", path, "device-stats", "nope")
    assert code == 1 and err.startswith("error -32001: ")


def test_discover_lists_methods(api, capsys):
    path, _ = api
    code, out, _ = vmmctl(capsys, "--api-socket", path, "discover")
    assert code == 0 and out.split()[:2] == ["METHOD", "SUMMARY"]
    assert "device.restart" in out and "Restart one device process" in out
    code, out, _ = vmmctl(capsys, "--api-socket", path, "--json", "discover")
    assert json.loads(out)["openrpc"] == "1.2.6"


def test_call_any_method(api, capsys):
    path, vm = api
    code, out, _ = vmmctl(capsys, "--api-socket", path, "call", "vmm.version")
    assert code == 0 and json.loads(out)["version"] == vmmd.__version__
    assert vmmctl(capsys, "--api-socket", path, "call", "device.restart", '{"id": "lpc0"}')[0] == 0
    assert vm.restarted == ["lpc0"]
    code, _, err = vmmctl(capsys, "--api-socket", path, "call", "device.restart", '{"id": 5}')
    assert code == 1 and "error -32602: " in err and "id" in err
    code, _, err = vmmctl(capsys, "--api-socket", path, "call", "vm.fly")
    assert code == 1 and "error -32601: " in err


@pytest.mark.parametrize("argv", [
    ["info", "extra"],
    ["fly"],
    [],
    ["device-restart"],
    ["call"],
    ["call", "vm.info", "{not json"],
    ["call", "vm.info", "3"],
    ["--timeout", "0", "info"],
    ["--timeout", "soon", "info"],
])
def test_usage_errors_exit_2(api, capsys, argv):
    path, _ = api
    code, out, err = vmmctl(capsys, "--api-socket", path, *argv)
    assert code == 2 and out == "" and "error:" in err and err.startswith("usage: vmmctl")


def test_missing_socket_option_is_a_usage_error(capsys, monkeypatch):
    monkeypatch.delenv("VMMD_API_SOCKET", raising=False)
    code, _, err = vmmctl(capsys, "info")
    assert code == 2 and "VMMD_API_SOCKET" in err


def test_no_server_exits_3_naming_the_socket(sock_path, capsys):
    code, out, err = vmmctl(capsys, "--api-socket", sock_path, "info")
    assert code == 3 and out == ""
    assert sock_path in err and "cannot connect" in err


def test_socket_file_without_server_exits_3(sock_path, capsys):
    import socket
    s = socket.socket(socket.AF_UNIX)
    s.bind(sock_path)
    s.close()
    code, _, err = vmmctl(capsys, "--api-socket", sock_path, "info")
    assert code == 3 and sock_path in err


def test_no_reply_within_timeout_exits_3(api, capsys):
    path, _ = api
    code, _, err = vmmctl(capsys, "--api-socket", path, "--timeout", "0.2", "call", "test.hang")
    assert code == 3 and "no reply" in err


def test_command_line_entry_point_exit_codes(api, sock_path):
    env = dict(os.environ, PYTHONPATH=REPO)
    env.pop("VMMD_API_SOCKET", None)
    ok = subprocess.run([sys.executable, "-m", "vmmd.ctl", "--api-socket", sock_path, "info"],
                        capture_output=True, text=True, env=env, cwd=REPO)
    assert ok.returncode == 0 and "running" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "vmmd.ctl", "--api-socket", sock_path + ".x", "info"],
                         capture_output=True, text=True, env=env, cwd=REPO)
    assert bad.returncode == 3 and sock_path + ".x" in bad.stderr


def test_nested_commands_are_one_entry(monkeypatch, api, capsys):
    """Nested subcommands (like balloon set/info): entries with a space in the name."""
    path, _ = api
    monkeypatch.setattr(ctl, "COMMANDS", ctl.COMMANDS + [
        ctl.Command("demo set", "set the demo target", "vm.info",
                    args=(ctl.Arg("mib", "target in MiB", int),), params=lambda a: None),
        ctl.Command("demo info", "show the demo", "vmm.version"),
    ])
    code, out, _ = vmmctl(capsys, "--api-socket", path, "demo", "info")
    assert code == 0 and json.loads(out)["version"] == vmmd.__version__
    assert vmmctl(capsys, "--api-socket", path, "demo", "set", "128")[0] == 0
    assert vmmctl(capsys, "--api-socket", path, "demo", "set", "lots")[0] == 2
    assert vmmctl(capsys, "--api-socket", path, "demo")[0] == 2


def test_snapshot_command_shows_progress_and_passes_options(api, capsys, tmp_path):
    path, vm = api
    calls, progress = [], {}

    async def snapshot(p, resume=True, diff_from=None):
        calls.append((p, resume, diff_from))
        progress.update(phase="ram", bytes_done=256 << 20, bytes_total=512 << 20, path=p)
        await asyncio.sleep(0.6)
        progress.clear()
        return {"path": p, "id": "abc", "type": "diff" if diff_from else "full",
                "ram_bytes_written": 4 << 20, "paused_ms": 12.5, "total_ms": 30.0,
                "state": "running" if resume else "paused"}

    base_info = vm.info
    vm.snapshot = snapshot
    vm.info = lambda: {**base_info(), "snapshot": dict(progress) or None}
    code, out, err = vmmctl(capsys, "--api-socket", path, "snapshot", str(tmp_path / "s"), "--stop",
                            "--diff-from", str(tmp_path / "p"))
    assert code == 0, err
    assert calls == [(str(tmp_path / "s"), False, str(tmp_path / "p"))]
    assert "snapshot diff abc" in out and "now paused" in out
    assert "ram:  50% (256/512 MiB)" in err


def test_snapshot_disks_overlay_is_passed_and_shown(api, capsys, tmp_path):
    path, vm = api
    calls = []

    async def snapshot(p, resume=True, diff_from=None, disks="shared"):
        calls.append(disks)
        return {"path": p, "id": "abc", "type": "full", "ram_bytes_written": 0, "paused_ms": 1.0,
                "state": "running",
                "disks": {"2.0": {"mode": "overlay", "frozen": "/d/a.qcow2", "now": "/d/a.snap-x.qcow2"}}}

    vm.snapshot = snapshot
    code, out, err = vmmctl(capsys, "--api-socket", path, "snapshot", str(tmp_path / "s"), "--disks", "overlay")
    assert code == 0, err
    assert calls == ["overlay"]
    assert "disk 2.0: /d/a.qcow2 frozen for the snapshot, writes go to /d/a.snap-x.qcow2" in out
    # without the flag the parameter is not sent (the default applies)
    assert vmmctl(capsys, "--api-socket", path, "snapshot", str(tmp_path / "t"))[0] == 0
    assert calls == ["overlay", "shared"]
    assert vmmctl(capsys, "--api-socket", path, "snapshot", str(tmp_path / "u"), "--disks", "raw")[0] == 2
