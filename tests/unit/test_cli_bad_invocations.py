"""Every bad `vmmd` invocation: exit 2, exactly one `vmmd: error:` line, no traceback,
and no process started (tests/harness/spawn_guard.py refuses any spawn with exit 99).

Each row is an attack or a typo found by trying the command line as a user
would (issue 9): 5,000-digit numbers, nested or oversized JSON, device options
the device process itself would refuse, images and console paths the device
could not use. Runs as root here, so "unreadable" is tried as uid 65534.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIG = "9" * 5000


def minimal_elf() -> bytes:
    ehdr = struct.pack("<4sBBBBB7xHHIQQQIHHHHHH", b"\x7fELF", 2, 1, 1, 0, 0, 2, 62, 1,
                       0x100000, 64, 0, 0, 64, 56, 1, 0, 0, 0)
    phdr = struct.pack("<IIQQQQQQ", 1, 5, 0, 0x100000, 0x100000, 120, 120, 0x1000)
    return (ehdr + phdr).ljust(512, b"\0")


@pytest.fixture(scope="module")
def d():
    """A world-readable directory of fixtures (uid 65534 must reach it)."""
    root = tempfile.mkdtemp(prefix="vmmd-cli-", dir="/tmp")
    os.chmod(root, 0o755)
    files = {
        "guest.elf": minimal_elf(), "ok.img": b"\0" * 4096, "empty.img": b"",
        "odd.img": b"\0" * 1000, "junk.bin": b"junk" * 100, "secret.img": b"\0" * 4096,
        "nested.json": b"[" * 100000 + b"]" * 100000,
        "nested-value.json": b'{"cpus":' + b"[" * 50000 + b"]" * 50000 + b"}",
        "huge-int.json": b'{"cpus":' + BIG.encode() + b"}",
        "huge-memory.json": b'{"memory":' + BIG.encode() + b"}",
        "inf.json": b'{"device-timeout":1e400}',
        "nan.json": b'{"device-timeout":NaN}',
        "utf16.json": '{"cpus":1}'.encode("utf-16"),
        "bom.json": b'\xef\xbb\xbf{"cpus":1}',
        "latin1.json": b'{"cmdline":"\xe9"}',
        "wrong-type.json": b'{"cpus":"2"}',
        "list.json": b'[1,2]',
        "slots-string.json": b'{"slots":"31,lpc"}',
        "slots-ints.json": b'{"slots":[31]}',
        "unknown-key.json": b'{"cpu":1}',
        "big.json": b'{"cmdline":"' + b"x" * (2 << 20) + b'"}',
        "bad-slot.json": b'{"slots":["2,virtio-balloon,queue_size=3"]}',
    }
    for name, data in files.items():
        with open(os.path.join(root, name), "wb") as f:
            f.write(data)
    with open(os.path.join(root, "secret-kernel"), "wb") as f:
        f.write(minimal_elf())
    for name in ("secret.img", "secret-kernel"):
        os.chmod(os.path.join(root, name), 0o600)
    os.mkdir(os.path.join(root, "ro-dir"), 0o555)
    with open(os.path.join(root, "plain-file"), "w"):
        pass
    yield root
    shutil.rmtree(root)


G = ["--raw", "{d}/guest.elf"]

CASES = [
    # numbers (used to end in a traceback)
    ("memory-5000-digits", ["-m", BIG] + G, "--memory"),
    ("cpus-5000-digits", ["-c", BIG] + G, "--cpus"),
    ("slot-5000-digits", ["-s", BIG + ",lpc"] + G, "slot"),
    ("function-5000-digits", ["-s", "2:" + BIG + ",virtio-balloon"] + G, "function"),
    ("cpus-zero", ["-c", "0"] + G, "out of range"),
    ("cpus-negative", ["-c", "-1"] + G, "-c"),
    ("memory-too-big", ["-m", "2048G"] + G, "maximum"),
    ("memory-raw-long-too-big", ["-m", "1024G"] + G, "maps at most"),
    ("device-timeout-inf", ["--device-timeout", "1e400"] + G, "--device-timeout"),
    ("device-timeout-tiny", ["--device-timeout", "1e-300"] + G, "outside"),
    ("device-timeout-huge", ["--device-timeout", "1e9"] + G, "outside"),
    ("device-timeout-5000-digits", ["--device-timeout", BIG] + G, "--device-timeout"),
    ("api-max-connections-0", ["--api-max-connections", "0"] + G, "--api-max-connections"),
    ("api-max-request-tiny", ["--api-max-request", "10"] + G, "--api-max-request"),
    ("api-idle-timeout-nan", ["--api-idle-timeout", "nan"] + G, "--api-idle-timeout"),
    # --config (nested JSON and huge integers used to end in a traceback)
    ("config-nested", ["--config", "{d}/nested.json"], "nested deeper"),
    ("config-nested-value", ["--config", "{d}/nested-value.json"] + G, "nested deeper"),
    ("config-huge-int", ["--config", "{d}/huge-int.json"] + G, "too long"),
    ("config-huge-memory", ["--config", "{d}/huge-memory.json"] + G, "too long"),
    ("config-1e400", ["--config", "{d}/inf.json"] + G, "out of range"),
    ("config-NaN", ["--config", "{d}/nan.json"] + G, "NaN"),
    ("config-utf16", ["--config", "{d}/utf16.json"] + G, "not UTF-8"),
    ("config-bom", ["--config", "{d}/bom.json"] + G, "invalid JSON"),
    ("config-latin1", ["--config", "{d}/latin1.json"] + G, "not UTF-8"),
    ("config-wrong-type", ["--config", "{d}/wrong-type.json"] + G, "expected an integer"),
    ("config-not-object", ["--config", "{d}/list.json"] + G, "must be a JSON object"),
    ("config-slots-string", ["--config", "{d}/slots-string.json"] + G, "list of strings"),
    ("config-slots-ints", ["--config", "{d}/slots-ints.json"] + G, "list of strings"),
    ("config-unknown-key", ["--config", "{d}/unknown-key.json"] + G, "unknown key"),
    ("config-too-big", ["--config", "{d}/big.json"] + G, "larger than"),
    ("config-bad-device-option", ["--config", "{d}/bad-slot.json"] + G, "queue_size"),
    ("config-directory", ["--config", "{d}"] + G, "Is a directory"),
    ("config-missing", ["--config", "{d}/none.json"] + G, "No such file"),
    # virtio-blk options and images (used to fail inside the device, after vmmd started)
    ("blk-no-path", ["-s", "2,virtio-blk"] + G, "missing path"),
    ("blk-missing-image", ["-s", "2,virtio-blk,{d}/none.img"] + G, "No such file"),
    ("blk-empty-image", ["-s", "2,virtio-blk,{d}/empty.img"] + G, "is empty"),
    ("blk-odd-size-image", ["-s", "2,virtio-blk,{d}/odd.img"] + G, "multiple of 512"),
    ("blk-directory-image", ["-s", "2,virtio-blk,{d}"] + G, "is a directory"),
    ("blk-cache", ["-s", "2,virtio-blk,{d}/ok.img,cache=bogus"] + G, "cache="),
    ("blk-num-queues-0", ["-s", "2,virtio-blk,{d}/ok.img,num_queues=0"] + G, "num_queues"),
    ("blk-num-queues-65", ["-s", "2,virtio-blk,{d}/ok.img,num_queues=65"] + G, "1..64"),
    ("blk-num-queues-x", ["-s", "2,virtio-blk,{d}/ok.img,num_queues=x"] + G, "not an integer"),
    ("blk-num-queues-5000-digits", ["-s", "2,virtio-blk,{d}/ok.img,num_queues=" + BIG] + G, "num_queues"),
    ("blk-queue-size-3", ["-s", "2,virtio-blk,{d}/ok.img,queue_size=3"] + G, "queue_size"),
    ("blk-queue-size-100", ["-s", "2,virtio-blk,{d}/ok.img,queue_size=100"] + G, "power of 2"),
    ("blk-serial-long", ["-s", "2,virtio-blk,{d}/ok.img,serial=" + "x" * 21] + G, "at most 20"),
    ("blk-serial-control", ["-s", "2,virtio-blk,{d}/ok.img,serial=a\x01b"] + G, "printable"),
    ("blk-unknown-option", ["-s", "2,virtio-blk,{d}/ok.img,bogus"] + G, "unknown option"),
    ("blk-option-first", ["-s", "2,virtio-blk,cache=direct"] + G, "first argument"),
    ("blk-same-image-twice", ["-s", "2,virtio-blk,{d}/ok.img", "-s", "3,virtio-blk,{d}/ok.img"] + G,
     "already used"),
    # virtio-net
    ("net-no-backend", ["-s", "3,virtio-net"] + G, "exactly one of tap"),
    ("net-two-backends", ["-s", "3,virtio-net,tap=t0,socket=/x"] + G, "exactly one of tap"),
    ("net-bad-mac", ["-s", "3,virtio-net,tap=t0,mac=zz"] + G, "MAC address"),
    ("net-multicast-mac", ["-s", "3,virtio-net,tap=t0,mac=01:00:00:00:00:00"] + G, "multicast"),
    ("net-queue-size", ["-s", "3,virtio-net,tap=t0,queue_size=3"] + G, "queue_size"),
    ("net-unknown-option", ["-s", "3,virtio-net,tap=t0,bogus=1"] + G, "unknown option"),
    ("net-long-tap-name", ["-s", "3,virtio-net,tap=" + "x" * 40] + G, "network interface name"),
    ("net-missing-switch", ["-s", "3,virtio-net,socket={d}/none.sock"] + G, "start the switch"),
    ("net-switch-not-socket", ["-s", "3,virtio-net,socket={d}/ok.img"] + G, "not a socket"),
    ("net-mrg-rxbuf", ["-s", "3,virtio-net,tap=t0,mrg_rxbuf=maybe"] + G, "on or off"),
    # virtio-balloon
    ("balloon-unknown-option", ["-s", "4,virtio-balloon,bogus"] + G, "unknown option"),
    ("balloon-interval-x", ["-s", "4,virtio-balloon,stats_interval=x"] + G, "stats_interval"),
    ("balloon-interval-1e400", ["-s", "4,virtio-balloon,stats_interval=1e400"] + G, "stats_interval"),
    ("balloon-interval-nan", ["-s", "4,virtio-balloon,stats_interval=nan"] + G, "stats_interval"),
    ("balloon-queue-size", ["-s", "4,virtio-balloon,queue_size=3"] + G, "queue_size"),
    ("balloon-reporting", ["-s", "4,virtio-balloon,reporting=maybe"] + G, "on or off"),
    ("lpc-with-args", ["-s", "31,lpc,x"] + G, "takes no arguments"),
    # consoles
    ("console-file-no-dir", ["-s", "31,lpc", "-l", "com1,file,{d}/none/out"] + G, "does not exist"),
    ("console-file-is-dir", ["-s", "31,lpc", "-l", "com1,file,{d}"] + G, "is a directory"),
    ("console-socket-no-dir", ["-s", "31,lpc", "-l", "com1,socket,{d}/none/s"] + G, "does not exist"),
    ("console-socket-not-socket", ["-s", "31,lpc", "-l", "com1,socket,{d}/ok.img"] + G, "not a socket"),
    ("console-socket-too-long", ["-s", "31,lpc", "-l", "com1,socket,/tmp/" + "s" * 200] + G, "longer than 107"),
    ("console-socket-shared", ["-s", "31,lpc", "-l", "com1,socket,{d}/c.sock",
                               "-l", "com2,socket,{d}/c.sock"] + G, "already used"),
    ("console-socket-is-api", ["-s", "31,lpc", "-l", "com1,socket,{d}/api.sock",
                               "--api-socket", "{d}/api.sock"] + G, "already used"),
    ("console-without-lpc", ["-l", "com1,stdio"] + G, "add an lpc slot"),
    # API socket
    ("api-socket-no-dir", ["--api-socket", "{d}/none/api.sock"] + G, "does not exist"),
    ("api-socket-not-socket", ["--api-socket", "{d}/plain-file"] + G, "not a socket"),
    ("api-socket-is-dir", ["--api-socket", "{d}"] + G, "not a socket"),
    ("api-socket-too-long", ["--api-socket", "/tmp/" + "s" * 200] + G, "longer than 107"),
    ("api-socket-live-server", ["--api-socket", "{d}/live.sock"] + G, "already listening"),
    # boot images (used to fail with exit 1 after the devices had started)
    ("kernel-junk", ["--kernel", "{d}/junk.bin"], "neither an ELF"),
    ("kernel-empty", ["--kernel", "{d}/empty.img"], "neither an ELF"),
    ("kernel-directory", ["--kernel", "{d}"], "not a regular file"),
    ("raw-junk", ["--raw", "{d}/junk.bin"], "not an ELF"),
    ("raw-empty", ["--raw", "{d}/empty.img"], "not an ELF"),
    ("cmdline-with-nul", ["--kernel", "{d}/guest.elf", "--cmdline", "a\x01b".replace("\x01", "\n")],
     None),  # placeholder replaced below
    ("cmdline-too-long", ["--kernel", "{d}/guest.elf", "--cmdline", "x" * 70000], "--cmdline"),
    # vmmd --restore-wait (no spare device process may start either)
    ("wait-no-api-socket", ["--restore-wait"], "needs --api-socket"),
    ("wait-with-restore", ["--restore-wait", "--api-socket", "{d}/w.sock", "--restore", "{d}"], "takes no --restore"),
    ("wait-with-slot", ["--restore-wait", "--api-socket", "{d}/w.sock", "-s", "31,lpc"], "unrecognized"),
    ("wait-spares-5000-digits", ["--restore-wait", "--api-socket", "{d}/w.sock", "--spare-devices", BIG],
     "--spare-devices"),
    ("wait-api-socket-no-dir", ["--restore-wait", "--api-socket", "{d}/none/api.sock"], "does not exist"),
    ("wait-api-socket-live-server", ["--restore-wait", "--api-socket", "{d}/live.sock"], "already listening"),
    # argparse itself
    ("no-boot-source", [], "exactly one of --kernel and --raw"),
    ("unknown-option", ["--bogus"] + G, "unrecognized arguments"),
    ("missing-value", ["-m"], "expected one argument"),
]
# A NUL cannot travel in argv; the config file carries it instead.
CASES = [c for c in CASES if c[0] != "cmdline-with-nul"]


def run_vmmd(args: list[str], *, as_nobody: bool = False) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "tests.harness.spawn_guard", *args]
    if as_nobody:
        cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *cmd]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, timeout=60, stdin=subprocess.DEVNULL)


def assert_usage_error(r: subprocess.CompletedProcess, needle: str | None) -> str:
    err = r.stderr.decode(errors="replace")
    assert "SPAWNED" not in err, f"a process was started: {err[-500:]}"
    assert "Traceback" not in err, err[-3000:]
    assert r.returncode == 2, (r.returncode, err[-2000:])
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("vmmd: error: "), err[-2000:]
    assert len(lines[0]) < 400, f"error line of {len(lines[0])} characters"
    if needle:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def results(d):
    """Every case run once, a few at a time (each is a fresh interpreter)."""
    live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    live.bind(os.path.join(d, "live.sock"))
    live.listen(1)
    try:
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            futures = {name: pool.submit(run_vmmd, [a.replace("{d}", d) for a in args])
                       for name, args, _ in CASES}
            return {name: f.result() for name, f in futures.items()}
    finally:
        live.close()


@pytest.mark.parametrize("name,args,needle", CASES, ids=[c[0] for c in CASES])
def test_bad_invocation(results, name, args, needle):
    assert_usage_error(results[name], needle)


def test_unreadable_image_and_unwritable_dirs_as_unprivileged_user(d):
    """Root reads and writes everything; uid 65534 meets the permission checks."""
    for args, needle in (
        (["-s", f"2,virtio-blk,{d}/secret.img,ro"], "cannot open to read"),
        (["-s", f"2,virtio-blk,{d}/ok.img"], "add ,ro"),          # owned by root, 0644
        (["-s", "31,lpc", "-l", f"com1,file,{d}/ro-dir/out"], "not writable"),
        (["--api-socket", f"{d}/ro-dir/api.sock"], "not writable"),
    ):
        assert_usage_error(run_vmmd(args + ["--raw", f"{d}/guest.elf"], as_nobody=True), needle)
    assert_usage_error(run_vmmd(["--kernel", f"{d}/secret-kernel"], as_nobody=True), "not readable")


def test_cmdline_with_nul_from_config_file(d):
    path = os.path.join(d, "nul.json")
    with open(path, "w") as f:
        json.dump({"kernel": f"{d}/guest.elf", "cmdline": "a\0b"}, f)
    assert_usage_error(run_vmmd(["--config", path]), "--cmdline")


def test_guard_catches_a_spawn(d):
    """The harness itself: a good command line gets as far as starting a device."""
    r = run_vmmd(["-s", "4,virtio-balloon", "--raw", f"{d}/guest.elf", "--sandbox", "off"])
    assert r.returncode == 99 and b"SPAWNED" in r.stderr, r.stderr[-2000:]
