"""The control socket attacks of issue 9, repeated against a real vmmd (KVM, sandboxed lpc).

Each test prints its figures (run with -s to see them); the assertions are on
behaviour and counts: connections refused at the cap, vmmd's descriptors and
memory bounded, a device restart still possible while the socket is flooded,
ids that cannot be echoed answered with id null, UTF-16 refused.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import time

import pytest

from tests.vmmd_process import RpcError, VmmdProcess
from vmmd.api.jsonrpc import INVALID_REQUEST, LIMIT_EXCEEDED, PARSE_ERROR
from vmmd.api.limits import DEFAULT_LIMITS

pytestmark = [pytest.mark.kvm]
CAP = DEFAULT_LIMITS.max_connections


@pytest.fixture
def vm(tmp_path, test_guests):
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        pytest.skip("needs /dev/kvm")
    v = VmmdProcess(tmp_path, ["-m", "64M", "-s", "31,lpc", "--raw", str(test_guests["ticker"]),
                               "--raw-mode", "long-cpl3"])
    try:
        v.wait_api()
        v.wait_for("PING 1\n", 60)
        yield v
    finally:
        v.stop()


def rpc_when_free(vm, method: str):
    """vm.rpc, retried while the server has not yet seen the test's hang-ups (cap full)."""
    deadline = time.monotonic() + 60
    while True:
        try:
            return vm.rpc(method)
        except RpcError as exc:
            if exc.code != LIMIT_EXCEEDED or time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def open_conn(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)           # blocking: waits while the listen backlog is full
    s.settimeout(30)
    return s


def read_line(s: socket.socket) -> bytes:
    buf = b""
    while not buf.endswith(b"\n"):
        chunk = s.recv(1 << 20)
        if not chunk:
            break
        buf += chunk
    return buf


def is_refusal(s: socket.socket) -> bool:
    """True if the server sent the cap's error line (and closed)."""
    s.settimeout(0.5)
    try:
        data = read_line(s)
    except socket.timeout:
        return False
    finally:
        s.settimeout(30)
    if not data:
        return False
    reply = json.loads(data)
    return reply.get("error", {}).get("code") == LIMIT_EXCEEDED


def test_990_idle_connections_are_capped_and_a_device_still_restarts(vm):
    pid = vm.proc.pid
    (lpc,) = vm.rpc("device.list")
    before = fds(pid)
    conns = [open_conn(vm.api) for _ in range(990)]
    time.sleep(1.0)
    held = fds(pid)
    refused = sum(is_refusal(s) for s in conns[CAP:])
    served = CAP - sum(is_refusal(s) for s in conns[:CAP])
    # the socket is full; a crashed device must still be restarted (descriptors left)
    os.kill(lpc["pid"], signal.SIGKILL)
    new = None
    for c in conns:
        c.close()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            (new,) = vm.rpc("device.list")
            if new["pid"] != lpc["pid"] and new["state"] == "running":
                break
        except (OSError, RpcError):   # the server has not yet seen every hang-up
            pass
        time.sleep(0.2)
    print(f"\n990 idle connections: served {served}, refused {refused}; vmmd fds {before} -> {held}; "
          f"lpc restarted: pid {lpc['pid']} -> {new and new['pid']} ({new and new['state']}); "
          f"RLIMIT_NOFILE soft {open(f'/proc/{pid}/limits').read().split('Max open files')[1].split()[0]}")
    assert served == CAP and refused == 990 - CAP
    assert held - before <= CAP + 8
    assert new is not None and new["pid"] != lpc["pid"] and new["state"] == "running"
    assert rpc_when_free(vm, "vm.info")["state"] == "running"


def test_500_partial_megabyte_lines_cost_little_memory(vm):
    pid = vm.proc.pid
    before = rss_kib(pid)
    conns, refused = [], 0
    chunk = b'{"jsonrpc":"2.0","method":"vm.info","id":1,"params":{"x":"' + b"a" * (1 << 20)
    for _ in range(500):
        s = open_conn(vm.api)
        try:
            s.sendall(chunk)          # 1 MiB without a newline
        except OSError:
            pass
        conns.append(s)
    time.sleep(2.0)
    peak = rss_kib(pid)
    errors = 0
    for s in conns:
        s.settimeout(0.5)
        try:
            data = read_line(s)
        except (socket.timeout, OSError):
            continue
        if data:
            code = json.loads(data)["error"]["code"]
            refused += code == LIMIT_EXCEEDED
            errors += code == PARSE_ERROR
    for s in conns:
        s.close()
    print(f"\n500 x 1 MiB partial lines: vmmd RSS {before // 1024} -> {peak // 1024} MiB "
          f"(+{(peak - before) // 1024} MiB); refused {refused}, 'line too long' {errors}")
    assert refused == 500 - CAP and errors == CAP
    assert peak - before < 64 * 1024          # KiB: was +521 MB
    assert rpc_when_free(vm, "vm.info")["state"] == "running"


def test_rpc_discover_batch_amplification_is_capped(vm):
    pid = vm.proc.pid
    one = len(json.dumps(rpc_when_free(vm, "rpc.discover")))
    member = json.dumps({"jsonrpc": "2.0", "method": "rpc.discover", "id": 1}).encode()
    n_mib = (1 << 20) // (len(member) + 1)
    request_mib = b"[" + b",".join([member] * n_mib) + b"]"
    request_cap = b"[" + b",".join([member] * DEFAULT_LIMITS.max_batch) + b"]"
    before = rss_kib(pid)
    results = {}
    for name, req in (("1 MiB batch", request_mib), (f"{DEFAULT_LIMITS.max_batch}-member batch", request_cap)):
        socks = [open_conn(vm.api) for _ in range(8)]
        for s in socks:
            s.sendall(req + b"\n")
        replies = [read_line(s) for s in socks]
        for s in socks:
            s.close()
        results[name] = (len(req), max(len(r) for r in replies), json.loads(replies[0]))
    peak = rss_kib(pid)
    for name, (req_len, reply_len, _) in results.items():
        print(f"\n{name} of rpc.discover ({req_len} bytes) x 8 at once: largest reply {reply_len} bytes "
              f"(one rpc.discover answer is {one} bytes)")
    print(f"vmmd RSS {before // 1024} -> {peak // 1024} MiB")
    big = results["1 MiB batch"][2]
    assert big["error"]["code"] == PARSE_ERROR       # over max_request: never parsed
    capped = results[f"{DEFAULT_LIMITS.max_batch}-member batch"]
    assert capped[1] <= DEFAULT_LIMITS.max_reply + DEFAULT_LIMITS.max_batch * 200
    assert peak - before < 128 * 1024


def test_unechoable_id_and_utf16_get_errors(vm):
    one = vm.rpc_raw(b'{"jsonrpc":"2.0","method":"vm.info","id":1e400}')
    batch = vm.rpc_raw(b'[{"jsonrpc":"2.0","method":"vm.info","id":1e400},'
                       b'{"jsonrpc":"2.0","method":"vm.info","id":2}]')
    utf16 = vm.rpc_raw('{"jsonrpc":"2.0","method":"vm.info","id":3}'.encode("utf-16"))
    print(f"\nid 1e400: {one}\nbatch [1e400, 2]: ids {[m['id'] for m in batch]}\nUTF-16: {utf16}")
    assert one["id"] is None and one["error"]["code"] == INVALID_REQUEST
    assert [m["id"] for m in batch] == [None, 2] and "result" in batch[1]
    assert utf16["id"] is None and utf16["error"]["code"] == PARSE_ERROR
