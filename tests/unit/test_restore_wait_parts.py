"""The pieces of `vmmd --restore-wait` that need no KVM: its command line, the
snapshot.restore params as `vmmd --restore`'s command line, `vmmctl restore`'s
params, and the spare's message from vmmd (devices/spare.py)."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from devices import spare
from devices.runtime import Bootstrap, BootstrapError
from vmmd.config import ConfigError
from vmmd.restore_wait import DEFAULT_SPARES, params_to_argv, parse_wait_args


def test_wait_args(tmp_path):
    sock = str(tmp_path / "api.sock")
    w = parse_wait_args(["--restore-wait", "--api-socket", sock])
    assert (w.api_socket, w.spares, w.sandbox, w.device_timeout) == (sock, DEFAULT_SPARES, None, None)
    w = parse_wait_args(["--restore-wait", "--api-socket", sock, "--spare-devices", "0", "--sandbox", "log",
                         "--device-timeout", "3"])
    assert (w.spares, w.sandbox, w.device_timeout) == (0, "log", 3.0)


@pytest.mark.parametrize("argv,expect", [
    (["--restore-wait"], "needs --api-socket"),
    (["--restore-wait", "--api-socket", "S", "--restore", "D"], "takes no --restore"),
    (["--restore-wait", "--api-socket", "S", "--restore=D"], "takes no --restore"),
    (["--restore-wait", "--api-socket", "S", "--incoming", "unix:/x"], "takes no --incoming"),
    (["--restore-wait", "--api-socket", "S", "--kernel", "k"], "unrecognized"),
    (["--restore-wait", "--api-socket", "S", "--spare-devices", "17"], "--spare-devices"),
    (["--restore-wait", "--api-socket", "S", "--spare-devices", "-1"], "--spare-devices"),
    (["--restore-wait", "--api-socket", "S", "--log-level", "loud"], "--log-level"),
])
def test_bad_wait_args(tmp_path, argv, expect):
    argv = [str(tmp_path / "api.sock") if a == "S" else a for a in argv]
    with pytest.raises(ConfigError, match=expect):
        parse_wait_args(argv)


def test_params_become_the_restore_command_line():
    assert params_to_argv({"path": "/s"}) == ["--restore", "/s", "--clock", "advance"]
    argv = params_to_argv({"path": "/s", "clock": "freeze", "paused": True, "disks": {"2": "/d.img"},
                           "nets": {"3": "tap=t0"}, "consoles": {"com1": "file,/c.log"},
                           "sandbox": "log", "device_timeout": 4})
    assert argv == ["--restore", "/s", "--clock", "freeze", "--paused", "--disk", "2=/d.img",
                    "--net", "3=tap=t0", "-l", "com1,file,/c.log", "--sandbox", "log",
                    "--device-timeout", "4"]
    with pytest.raises(ConfigError):
        params_to_argv({"path": "/s", "disks": {"2": 5}})
    with pytest.raises(ConfigError):
        params_to_argv({"path": "/s", "consoles": {"com1": None}})


def test_vmmctl_restore_params(tmp_path, monkeypatch):
    from vmmd.ctl import _restore_params
    monkeypatch.chdir(tmp_path)
    a = argparse.Namespace(dir="snap", clock=None, paused=False, disk=["2=d.img"], net=["3=tap=t0"],
                           console=["com1,file,c.log", "com2,null"], sandbox=None, device_timeout=None)
    assert _restore_params(a) == {"path": str(tmp_path / "snap"), "disks": {"2": str(tmp_path / "d.img")},
                                  "nets": {"3": "tap=t0"},
                                  "consoles": {"com1": f"file,{tmp_path / 'c.log'}", "com2": "null"}}


# -- the spare's message ------------------------------------------------------------------

def _msg(**over) -> bytes:
    import json
    doc = {"kind": "lpc", "bootstrap": "{}", "fds": [7, 9, 12], "stdio": [7, 9, 9]}
    doc.update(over)
    return json.dumps(doc).encode()


def test_spare_message_parses():
    assert spare.parse_message(_msg(), 3) == ("lpc", "{}", [7, 9, 12], [7, 9, 9], None)
    assert spare.parse_message(_msg(host_pid=4242), 3)[4] == 4242


def test_an_isolated_spare_serves_only_what_it_was_isolated_for():
    ok = Bootstrap(id="lpc", kind="lpc", req="ipc://a", evt="ipc://b", sandbox="on", status_fd=5)
    spare.check_isolated(ok, 4242)
    spare.check_isolated(dataclasses.replace(ok, sandbox="log"), 4242)
    for bad, pid in ((dataclasses.replace(ok, sandbox="off"), 4242),
                     (dataclasses.replace(ok, host_ids=(70000, 70000)), 4242),
                     (dataclasses.replace(ok, cgroup_fds=(6,)), 4242),
                     (dataclasses.replace(ok, status_fd=None), 4242),
                     (ok, None)):
        with pytest.raises(spare.SpareError):
            spare.check_isolated(bad, pid)


@pytest.mark.parametrize("data,nfds", [
    (b"not json", 3), (b"[]", 3), (_msg(kind="qemu"), 3), (_msg(bootstrap={}), 3),
    (_msg(), 2),                                  # more numbers than fds arrived
    (_msg(fds=[7, 7, 9]), 3), (_msg(fds=[7, -1, 9]), 3), (_msg(fds=[7, "9", 12]), 3),
    (_msg(stdio=[7, 9]), 3), (_msg(stdio=[7, 9, 40]), 3),
    (_msg(host_pid=0), 3), (_msg(host_pid="1"), 3), (_msg(host_pid=True), 3),
])
def test_spare_refuses_a_malformed_message(data, nfds):
    with pytest.raises(spare.SpareError):
        spare.parse_message(data, nfds)


def test_spare_renumbers_every_fd_of_the_bootstrap():
    boot = Bootstrap(id="lpc", kind="lpc", req="ipc://a", evt="ipc://b", sandbox="on", mem_fd=20,
                     layout=[[0, 1, 0]], fds={"lifeline": 21, "irqfd.0": 22}, status_fd=23,
                     cgroup_fds=(24, 25))
    where = {20: 4, 21: 5, 22: 6, 23: 7, 24: 8, 25: 9}
    got = spare.renumber(boot, where)
    assert (got.mem_fd, got.fds, got.status_fd, got.cgroup_fds) == (4, {"lifeline": 5, "irqfd.0": 6}, 7, (8, 9))
    assert spare.bootstrap_fds(got) == {4, 5, 6, 7, 8, 9}
    with pytest.raises(BootstrapError, match="fd 25"):
        spare.renumber(boot, {k: v for k, v in where.items() if k != 25})
    assert dataclasses.replace(boot, mem_fd=None, layout=None).mem_fd is None
