"""vmmd's command line and JSON config file."""

import json
import os
import struct
import subprocess
import sys

import pytest

from vmmd.config import (ConfigError, SlotConfig, VmConfig, parse_args, parse_memory,
                         parse_or_exit)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MiB = 1 << 20


def minimal_elf() -> bytes:
    """The smallest ELF64 x86-64 executable vmmd.boot.elf accepts: one PT_LOAD segment."""
    ehdr = struct.pack("<4sBBBBB7xHHIQQQIHHHHHH", b"\x7fELF", 2, 1, 1, 0, 0, 2, 62, 1,
                       0x100000, 64, 0, 0, 64, 56, 1, 0, 0, 0)
    phdr = struct.pack("<IIQQQQQQ", 1, 5, 0, 0x100000, 0x100000, 120, 120, 0x1000)
    return (ehdr + phdr).ljust(512, b"\0")


@pytest.fixture
def files(tmp_path):
    paths = {}
    for name in ("bzImage", "initrd.img", "disk.img", "test.elf"):
        p = tmp_path / name
        p.write_bytes(minimal_elf() if name in ("bzImage", "test.elf") else b"\0" * 512)
        paths[name] = str(p)
    paths["dir"] = str(tmp_path)
    return paths


def error_of(argv):
    """parse_or_exit's stderr line for argv; asserts exit status 2 and one line."""
    with pytest.raises(SystemExit) as exc:
        parse_or_exit(argv)
    assert exc.value.code == 2
    return exc


def fails(argv, capsys, *needles):
    error_of(argv)
    err = capsys.readouterr().err
    assert err.startswith("vmmd: error: ") and err.count("\n") == 1, err
    for needle in needles:
        assert needle in err, err
    return err


# -- good command lines ---------------------------------------------------------------

def test_full_command_line(files):
    cfg = parse_args([
        "-c", "2", "-m", "512M", "-s", "31,lpc", "-s", f"2,virtio-blk,{files['disk.img']},ro",
        "-s", "3:1,virtio-net,tap=tap0", "-s", "4,virtio-balloon",
        "-l", "com1,stdio", "-l", "com2,socket,/tmp/c2.sock",
        "--kernel", files["bzImage"], "--initrd", files["initrd.img"], "--cmdline", "console=ttyS0 quiet",
        "--api-socket", os.path.join(files["dir"], "api.sock"), "--no-reboot", "--sandbox", "log",
        "--device-timeout", "0.5", "--log-level", "debug", "--bus-mode", "bus-only", "--pvm-assists", "off",
    ])
    assert cfg == VmConfig(
        cpus=2, memory=512 * MiB,
        slots=(SlotConfig(2, 0, "virtio-blk", (files["disk.img"], "ro")),
               SlotConfig(3, 1, "virtio-net", ("tap=tap0",)),
               SlotConfig(4, 0, "virtio-balloon", ()),
               SlotConfig(31, 0, "lpc", ())),
        consoles={"com1": "stdio", "com2": "socket,/tmp/c2.sock"},
        kernel=files["bzImage"], initrd=files["initrd.img"], cmdline="console=ttyS0 quiet",
        api_socket=os.path.join(files["dir"], "api.sock"), no_reboot=True, sandbox="log",
        device_timeout=0.5, log_level="debug", bus_mode="bus-only", pvm_assists="off",
    )


def test_defaults_with_raw_guest(files):
    cfg = parse_args(["--raw", files["test.elf"]])
    assert cfg == VmConfig(raw=files["test.elf"])
    assert (cfg.cpus, cfg.memory, cfg.slots, cfg.consoles, cfg.cmdline) == (1, 256 * MiB, (), {}, "")
    assert (cfg.raw_mode, cfg.sandbox, cfg.device_timeout, cfg.bus_mode, cfg.pvm_assists) == \
        ("long-cpl3", "on", 2.0, "fast", "auto")
    assert cfg.kernel is None and cfg.api_socket is None and cfg.no_reboot is False
    assert parse_args(["--raw", files["test.elf"], "--raw-mode", "real"]).raw_mode == "real"


def test_long_option_spellings(files):
    cfg = parse_args(["--cpus", "3", "--memory", "1G", "--slot", "31,lpc", "--console", "com1,null",
                      "--kernel", files["bzImage"]])
    assert (cfg.cpus, cfg.memory, cfg.consoles) == (3, 1 << 30, {"com1": "null"})


def test_config_is_frozen_and_hashable(files):
    cfg = parse_args(["--raw", files["test.elf"]])
    with pytest.raises(AttributeError):
        cfg.cpus = 4
    hash(cfg)


@pytest.mark.parametrize("text, size", [
    ("512M", 512 * MiB), ("512m", 512 * MiB), ("512", 512 * MiB), ("2G", 2 << 30),
    ("16384K", 16 * MiB), ("16M", 16 * MiB), (64, 64 * MiB),
])
def test_memory_sizes(text, size):
    assert parse_memory(text) == size


def test_hostbridge_at_slot_0_is_accepted_and_implicit(files):
    cfg = parse_args(["-s", "0,hostbridge", "-s", "31,lpc", "--raw", files["test.elf"]])
    assert cfg.slots == (SlotConfig(31, 0, "lpc", ()),)


def test_console_file_backend_and_uppercase_port(files):
    cfg = parse_args(["-s", "31,lpc", "-l", "COM2,file,/tmp/out.log", "--raw", files["test.elf"]])
    assert cfg.consoles == {"com2": "file,/tmp/out.log"}


# -- JSON config file -------------------------------------------------------------------

def write_config(files, obj):
    path = os.path.join(files["dir"], "vm.json")
    with open(path, "w") as f:
        f.write(obj if isinstance(obj, str) else json.dumps(obj))
    return path


def test_config_file(files):
    path = write_config(files, {
        "cpus": 2, "memory": "512M", "slots": ["31,lpc", f"2,virtio-blk,{files['disk.img']}"],
        "consoles": ["com1,stdio"], "kernel": files["bzImage"], "cmdline": "quiet",
        "no-reboot": True, "device-timeout": 3, "sandbox": "off",
    })
    cfg = parse_args(["--config", path])
    assert (cfg.cpus, cfg.memory, cfg.kernel, cfg.cmdline, cfg.no_reboot, cfg.device_timeout, cfg.sandbox) == \
        (2, 512 * MiB, files["bzImage"], "quiet", True, 3.0, "off")
    assert [s.slot for s in cfg.slots] == [2, 31]
    assert cfg.consoles == {"com1": "stdio"}
    assert parse_args(["--config", write_config(files, {"memory": 1024, "raw": files["test.elf"]})]).memory == 1 << 30


def test_command_line_overrides_config_file(files):
    path = write_config(files, {
        "cpus": 2, "memory": "512M", "kernel": files["bzImage"], "sandbox": "off",
        "slots": ["31,lpc", "5,virtio-net,tap=tap0"], "consoles": ["com1,stdio", "com2,null"],
    })
    cfg = parse_args(["-c", "4", "--config", path, "--sandbox", "log",
                      "-s", "5,virtio-balloon", "-l", "com1,file,/tmp/x"])
    assert (cfg.cpus, cfg.memory, cfg.sandbox) == (4, 512 * MiB, "log")
    assert cfg.slots == (SlotConfig(5, 0, "virtio-balloon", ()), SlotConfig(31, 0, "lpc", ()))
    assert cfg.consoles == {"com1": "file,/tmp/x", "com2": "null"}


@pytest.mark.parametrize("content, needles", [
    ("{", ["invalid JSON", "line 1"]),
    ("[1]", ["must be a JSON object"]),
    ({"cpus": 2, "cpu": 2}, ["unknown key 'cpu'"]),
    ({"config": "other.json"}, ["unknown key 'config'"]),
    ({"cpus": "2"}, ["cpus: expected an integer"]),
    ({"cpus": True}, ["cpus: expected an integer"]),
    ({"no-reboot": "yes"}, ["no-reboot: expected true or false"]),
    ({"slots": "31,lpc"}, ["slots: expected a list of strings"]),
    ({"memory": 1.5}, ["memory: expected a string or an integer"]),
    ({"cpus": 0}, ["vm.json: cpus", "out of range 1..255"]),
    ({"slots": ["31,lpc", "31,virtio-net,tap=t0"]}, ["slot 31:0 given twice"]),
    ({"sandbox": "maybe"}, ["vm.json: sandbox", "choose from on, log, off"]),
])
def test_bad_config_file(files, capsys, content, needles):
    path = write_config(files, content)
    fails(["--config", path, "--raw", files["test.elf"]], capsys, *needles)


def test_missing_config_file(files, capsys):
    fails(["--config", "/nonexistent/vm.json"], capsys, "cannot read config file /nonexistent/vm.json")


# -- bad command lines --------------------------------------------------------------------

@pytest.mark.parametrize("args, needles", [
    (["-c", "0"], ["--cpus", "out of range 1..255"]),
    (["-c", "256"], ["--cpus", "out of range"]),
    (["-c", "two"], ["--cpus", "'two' is not an integer"]),
    (["-c", "-1"], ["-c"]),
    (["-m", "8M"], ["--memory", "minimum of 16M"]),
    (["-m", "2000K"], ["--memory", "minimum"]),
    (["-m", "16385K"], ["--memory", "multiple of 4K"]),
    (["-m", "512X"], ["--memory", "bad size"]),
    (["-m", "2048G"], ["--memory", "maximum"]),
    (["-m", ""], ["--memory", "bad size"]),
    (["-s", "31"], ["'31'", "SLOT[:FUNC],DEVICE"]),
    (["-s", "32,lpc"], ["slot", "out of range 0..31"]),
    (["-s", "x,lpc"], ["not a slot number"]),
    (["-s", "3:8,virtio-net"], ["function", "out of range 0..7"]),
    (["-s", "3,floppy"], ["unknown device 'floppy'", "virtio-blk"]),
    (["-s", "0,lpc"], ["slot 0 is reserved for the host bridge"]),
    (["-s", "5,hostbridge"], ["the host bridge is always at slot 0:0"]),
    (["-s", "31,lpc,extra"], ["lpc takes no arguments"]),
    (["-s", "2,virtio-blk"], ["disk image", "missing path"]),
    (["-s", "2,virtio-blk,/nonexistent.img"], ["/nonexistent.img", "No such file"]),
    (["-s", "2,virtio-blk,,ro"], ["empty field"]),
    (["-s", "31,lpc", "-s", "31,virtio-net,tap=t0"], ["slot 31:0 given twice"]),
    (["-s", "30,lpc", "-s", "31,lpc"], ["only one lpc"]),
    (["-l", "com1,stdio"], ["add an lpc slot"]),
    (["-s", "31,lpc", "-l", "com3,stdio"], ["unknown port 'com3'"]),
    (["-s", "31,lpc", "-l", "com1,tty"], ["unknown backend 'tty'"]),
    (["-s", "31,lpc", "-l", "com1"], ["unknown backend ''"]),
    (["-s", "31,lpc", "-l", "com1,file"], ["expected com1,file,PATH"]),
    (["-s", "31,lpc", "-l", "com1,stdio,x"], ["expected com1,stdio"]),
    (["-s", "31,lpc", "-l", "com1,socket," + "x" * 200], ["longer than 107"]),
    (["-s", "31,lpc", "-l", "com1,stdio", "-l", "com1,null"], ["port com1 given twice"]),
    (["-s", "31,lpc", "-l", "com1,stdio", "-l", "com2,stdio"], ["only one console can use stdio"]),
    (["--sandbox", "maybe"], ["--sandbox", "choose from on, log, off"]),
    (["--bus-mode", "slow"], ["--bus-mode"]),
    (["--pvm-assists", "yes"], ["--pvm-assists"]),
    (["--log-level", "loud"], ["--log-level"]),
    (["--device-timeout", "0"], ["--device-timeout", "positive"]),
    (["--device-timeout", "-1"], ["--device-timeout"]),
    (["--device-timeout", "nan"], ["--device-timeout"]),
    (["--device-timeout", "soon"], ["--device-timeout", "not a number"]),
    (["--api-socket", "/nonexistent/dir/api.sock"], ["directory /nonexistent/dir does not exist"]),
    (["--api-socket", "/tmp/" + "s" * 120], ["longer than 107 bytes"]),
    (["--bogus"], ["unrecognized arguments: --bogus"]),
    (["stray"], ["unrecognized arguments: stray"]),
    (["-c"], ["expected one argument"]),
])
def test_bad_arguments(files, capsys, args, needles):
    fails(args + ["--raw", files["test.elf"]], capsys, *needles)


@pytest.mark.parametrize("args, needle", [
    ([], "exactly one of --kernel and --raw"),
    (["--kernel", "K", "--raw", "R"], "exactly one of --kernel and --raw"),
    (["--kernel", "/nonexistent/bzImage"], "--kernel /nonexistent/bzImage: no such file"),
    (["--raw", "/nonexistent.elf"], "--raw /nonexistent.elf: no such file"),
    (["--kernel", "{dir}"], "not a regular file"),
    (["--kernel", "{bzImage}", "--initrd", "/nonexistent"], "--initrd /nonexistent: no such file"),
    (["--raw", "{test.elf}", "--initrd", "{initrd.img}"], "--initrd needs --kernel"),
    (["--raw", "{test.elf}", "--cmdline", "x"], "--cmdline needs --kernel"),
    (["--kernel", "{bzImage}", "--raw-mode", "real"], "--raw-mode needs --raw"),
    (["--raw", "{test.elf}", "--raw-mode", "virtual"], "--raw-mode: invalid value 'virtual'"),
])
def test_bad_boot_source(files, capsys, args, needle):
    def fill(arg):
        for name, path in files.items():
            arg = arg.replace("{%s}" % name, path)
        return arg
    fails([fill(a) for a in args], capsys, needle)


# An unreadable kernel: tests/unit/test_cli_bad_invocations.py (as uid 65534; root reads everything).


def test_parse_args_raises_config_error(files):
    with pytest.raises(ConfigError, match="--cpus"):
        parse_args(["-c", "0", "--raw", files["test.elf"]])


def test_help_exits_0(capsys):
    with pytest.raises(SystemExit) as exc:
        parse_or_exit(["--help"])
    assert exc.value.code == 0 and "--api-socket" in capsys.readouterr().out


def test_subprocess_exit_code_and_single_line(files):
    code = "import sys; from vmmd.config import parse_or_exit; parse_or_exit(sys.argv[1:])"
    r = subprocess.run([sys.executable, "-c", code, "-c", "0", "--raw", files["test.elf"]],
                       capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr == "vmmd: error: --cpus: 0 is out of range 1..255\n"
    ok = subprocess.run([sys.executable, "-c", code, "--raw", files["test.elf"]],
                        capture_output=True, text=True, cwd=REPO)
    assert ok.returncode == 0 and ok.stderr == ""


def test_two_read_only_disks_may_share_an_image(files):
    img = files["disk.img"]
    cfg = parse_args(["-s", f"2,virtio-blk,{img},ro", "-s", f"3,virtio-blk,{img},ro",
                      "--raw", files["test.elf"]])
    assert len(cfg.slots) == 2
    with pytest.raises(ConfigError, match="already used"):
        parse_args(["-s", f"2,virtio-blk,{img},ro", "-s", f"3,virtio-blk,{img}",
                    "--raw", files["test.elf"]])


def test_blk_image_format_checks(files, tmp_path):
    """A qcow2 image need not be whole sectors (its own parser checks it in the device);
    a raw one must; format= takes qcow2 or raw only."""
    q = tmp_path / "q.qcow2"
    q.write_bytes(b"QFI\xfb" + b"\0" * 1000)
    for args in ([str(q)], [str(q), "format=qcow2"]):
        parse_args(["-s", "2,virtio-blk," + ",".join(args), "--raw", files["test.elf"]])
    with pytest.raises(ConfigError, match="multiple of 512"):
        parse_args(["-s", f"2,virtio-blk,{q},format=raw", "--raw", files["test.elf"]])
    with pytest.raises(ConfigError, match="format="):
        parse_args(["-s", f"2,virtio-blk,{files['disk.img']},format=vmdk", "--raw", files["test.elf"]])
