#!/usr/bin/env python3
"""virtio-net throughput through the driver harness, against the host's own
loopback in the same run.

A private network namespace (ip netns add, deleted at exit) holds the tap
(10.200.0.1/24); the guest is tests.harness (a Python virtio-pci driver in this
process with vmmd's real PciBus/Supervisor, FakeVm for KVM), the NIC a real
sandboxed devices.virtio_net process. All traffic stays inside that namespace.

    tx   guest -> tap -> a UDP socket in the namespace (frames built by the
         driver, MTU-sized datagrams; counted where the kernel delivered them)
    rx   a UDP sender in the namespace -> tap -> the guest's rx ring (counted
         by the driver as it reaps buffers)
    base the namespace's loopback: a Python UDP sender and receiver thread
         with the same datagram size (what Python moves without any VMM)

    python bench/virtio_net.py [--seconds S] [--payload BYTES] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from tests.harness.driver import Harness  # noqa: E402
from tests.harness.net import (  # noqa: E402
    NetNs, VirtioNet, add_net_device, arp_request, eth, ipv4, net_spec, parse_arp, udp)

HOST_IP, GUEST_IP, TAP = "10.200.0.1", "10.200.0.2", "vmmdbench0"


class Receiver(threading.Thread):
    def __init__(self, sock: socket.socket):
        super().__init__(daemon=True)
        self.sock, self.packets, self.bytes, self.stop = sock, 0, 0, False
        sock.settimeout(0.2)

    def run(self) -> None:
        buf = bytearray(65536)
        while not self.stop:
            try:
                n = self.sock.recv_into(buf)
            except socket.timeout:
                continue
            except OSError:
                return
            self.packets += 1
            self.bytes += n


def _result(packets: int, nbytes: int, seconds: float) -> dict:
    return {"packets": packets, "pps": packets / seconds, "gbit_s": nbytes * 8 / seconds / 1e9}


def bench_loopback(ns: NetNs, payload: int, seconds: float) -> dict:
    rx = ns.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    rx.bind(("127.0.0.1", 0))
    tx = ns.socket(socket.AF_INET, socket.SOCK_DGRAM)
    r = Receiver(rx)
    r.start()
    data = b"x" * payload
    dst = rx.getsockname()
    t0 = time.monotonic()
    end = t0 + seconds
    p0 = b0 = 0
    while time.monotonic() < end:
        for _ in range(64):
            try:
                tx.sendto(data, dst)
            except OSError:
                pass
    time.sleep(0.3)
    r.stop = True
    r.join()
    tx.close()
    rx.close()
    return _result(r.packets - p0, r.bytes - b0, seconds)


def bench_tx(nic: VirtioNet, host_mac: bytes, ns: NetNs, payload: int, seconds: float) -> dict:
    rx = ns.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    rx.bind((HOST_IP, 7001))
    r = Receiver(rx)
    r.start()
    frame = eth(host_mac, nic.mac, 0x0800,
                ipv4(GUEST_IP, HOST_IP, 17, udp(GUEST_IP, HOST_IP, 7000, 7001, b"x" * payload)))
    batch = nic.drv.queues[1].size // 2
    end = time.monotonic() + seconds
    sent = 0
    while time.monotonic() < end:
        tokens = [nic.submit_tx(frame, kick=False) for _ in range(batch)]
        nic.drv.kick(1, force=True)
        nic.reap_tx(tokens)
        sent += batch
    time.sleep(0.3)
    r.stop = True
    r.join()
    rx.close()
    out = _result(r.packets, r.bytes, seconds)
    out["sent"] = sent
    return out


def bench_rx(nic: VirtioNet, ns: NetNs, payload: int, seconds: float) -> dict:
    ns.ip("neigh", "replace", GUEST_IP, "lladdr", nic.mac.hex(":"), "dev", TAP)
    tx = ns.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx.bind((HOST_IP, 0))
    stop = threading.Event()
    data = b"y" * payload

    def send():
        while not stop.is_set():
            for _ in range(64):
                try:
                    tx.sendto(data, (GUEST_IP, 7002))
                except OSError:
                    pass
    t = threading.Thread(target=send, daemon=True)
    t.start()
    nic.recv(2.0)  # warm up
    nic.rx_frames.clear()
    packets = nbytes = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        got = nic.recv(0.5)
        if got is not None:
            packets += 1
            nbytes += len(got[1]) - 42   # UDP payload bytes, comparable with the others
        if nic.rx_frames:
            for _, f in nic.rx_frames:
                packets += 1
                nbytes += len(f) - 42
            nic.rx_frames.clear()
    stop.set()
    t.join()
    tx.close()
    return _result(packets, nbytes, seconds)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--payload", type=int, default=1472)
    ap.add_argument("--sandbox", default="on")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    res = {}
    with NetNs() as ns:
        res["loopback"] = bench_loopback(ns, args.payload, args.seconds)
        fd = ns.open_tap(TAP)
        ns.ip("addr", "add", f"{HOST_IP}/24", "dev", TAP)
        ns.ip("link", "set", TAP, "up")
        with Harness(sandbox=args.sandbox) as h:
            dev = add_net_device(h, net_spec([f"tap={TAP}"], slot=3), {"tap": fd})
            nic = VirtioNet(h, slot=3)
            nic.send(arp_request(nic.mac, GUEST_IP, HOST_IP))
            got = nic.recv_match(lambda f: (a := parse_arp(f)) is not None and a[0] == 2)
            host_mac = parse_arp(got[1])[1]
            res["tx"] = bench_tx(nic, host_mac, ns, args.payload, args.seconds)
            res["rx"] = bench_rx(nic, ns, args.payload, args.seconds)
            res["device"] = {k: v for k, v in dev.control("stats")["net"].items()
                             if isinstance(v, int) and not isinstance(v, bool)}
    base = res["loopback"]["gbit_s"]
    for k in ("tx", "rx"):
        res[k]["vs_loopback"] = res[k]["gbit_s"] / base if base else None
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        print(f"payload {args.payload} B UDP, {args.seconds:g} s each, sandbox {args.sandbox}")
        print("| path | packets/s | Gbit/s (UDP payload) | vs loopback |")
        print("|---|---|---|---|")
        for k, name in (("loopback", "netns loopback (Python UDP pair)"),
                        ("tx", "guest tx -> tap -> netns socket"),
                        ("rx", "netns socket -> tap -> guest rx")):
            r = res[k]
            ratio = r.get("vs_loopback")
            print(f"| {name} | {r['pps']:.0f} | {r['gbit_s']:.3f} | "
                  f"{'-' if ratio is None else f'{100 * ratio:.0f} %'} |")
        d = res["device"]
        print(f"device: tx_dropped {d['tx_dropped']} rx_dropped {d['rx_dropped']} "
              f"rx_stalls {d['rx_stalls']} tx_sent_by_driver {res['tx']['sent']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
