"""A virtio-net driver (virtio 1.2, 5.1) on top of tests.harness.driver, a
network-namespace helper and frame builders (ARP, IPv4, ICMP, UDP).

    with NetNs() as ns:                          # ip netns add; deleted at exit
        fd = ns.open_tap("vtap0")                # created inside the namespace
        ns.ip("addr", "add", "10.200.0.1/24", "dev", "vtap0"); ns.ip("link", "set", "vtap0", "up")
        with Harness() as h:
            add_net_device(h, net_spec(["tap=vtap0"]), {"tap": fd})
            nic = VirtioNet(h, slot=3)
            nic.send(arp_request(nic.mac, GUEST_IP, HOST_IP))
            frame = nic.recv_match(lambda f: is_arp_reply(f, HOST_IP))

Receive buffers are posted like Linux does: with MRG_RXBUF one page-sized
(4 KiB) writable descriptor each, without it one buffer big enough for a
whole frame. Transmit chains are header + frame in one readable descriptor.
"""

from __future__ import annotations

import ctypes
import os
import socket
import struct
import subprocess
import threading
import time
from types import SimpleNamespace

from tests.harness.driver import Harness, HarnessError, VirtioPciDriver

F_CSUM, F_GUEST_CSUM, F_MAC, F_GUEST_TSO4, F_GUEST_TSO6 = 0, 1, 5, 7, 8
F_HOST_TSO4, F_HOST_TSO6, F_MRG_RXBUF, F_STATUS, F_CTRL_VQ, F_CTRL_RX = 11, 12, 15, 16, 17, 18
F_CTRL_MAC_ADDR = 23
RXQ, TXQ, CTRLQ = 0, 1, 2
HDR = struct.Struct("<BBHHHHH")
HDR_SIZE = 12
NEEDS_CSUM = 1
GSO_NONE, GSO_TCPV4, GSO_TCPV6 = 0, 1, 4
BASIC_FEATURES = sum(1 << b for b in (F_MAC, F_STATUS, F_MRG_RXBUF, F_CTRL_VQ, F_CTRL_RX,
                                      F_CTRL_MAC_ADDR))
OFFLOAD_FEATURES = sum(1 << b for b in (F_CSUM, F_GUEST_CSUM, F_HOST_TSO4, F_HOST_TSO6,
                                        F_GUEST_TSO4, F_GUEST_TSO6))
PAGE = 4096
BIG_RX = 65536 + 2 * PAGE  # a buffer for a GSO frame without MRG_RXBUF ("big packets")
SMALL_RX = HDR_SIZE + 1518

GUEST_MAC = bytes.fromhex("525400123456")
BROADCAST = b"\xff" * 6


def net_spec(args: list[str], slot: int = 3, *, mac: str | None = None, function: int = 0,
             bus_only: bool = False):
    """The DeviceSpec vmmd builds for `-s SLOT,virtio-net,ARGS...` (vmmd's own code)."""
    from vmmd.machine import Machine
    fake = SimpleNamespace(cfg=SimpleNamespace(bus_mode="bus-only" if bus_only else "fast"))
    if mac is not None:
        args = [*args, f"mac={mac}"]
    slot_cfg = SimpleNamespace(slot=slot, function=function, device="virtio-net", args=list(args))
    return Machine._virtio_net_spec(fake, slot_cfg)


def add_net_device(h: Harness, spec, fds: dict, timeout: float = 30.0):
    """As vmmd's Machine.run: add, hand over the backend fd(s), start. The
    ManagedDevice owns the fds from here on (closed with the supervisor)."""
    dev = h.call(h.supervisor.add, spec)
    dev.fds.update(fds)
    h.run(h.supervisor.start(dev), timeout)
    return dev


# --- network namespaces -----------------------------------------------------------------

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def _in_netns(path: str, fn):
    """Run fn() on a thread that joined the namespace at `path` (setns is
    per thread; the thread ends, so nothing else ever runs in there)."""
    out: dict = {}

    def run():
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            if _libc.setns(fd, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns")
            out["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised on the caller's thread
            out["error"] = exc
        finally:
            os.close(fd)

    t = threading.Thread(target=run, name="netns")
    t.start()
    t.join()
    if "error" in out:
        raise out["error"]
    return out["value"]


class NetNs:
    """A network namespace of our own (ip netns add), deleted at close."""

    def __init__(self, name: str | None = None):
        self.name = name or f"vmmdnet{os.getpid()}x{time.monotonic_ns() % 100000}"
        subprocess.run(["ip", "netns", "add", self.name], check=True, capture_output=True)
        self.path = f"/var/run/netns/{self.name}"
        self.run("sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1")
        self.run("sysctl", "-qw", "net.ipv6.conf.default.disable_ipv6=1")
        self.ip("link", "set", "lo", "up")

    def run(self, *argv: str, check: bool = True) -> str:
        p = subprocess.run(["ip", "netns", "exec", self.name, *argv], capture_output=True, text=True,
                           timeout=20)
        if check and p.returncode:
            raise HarnessError(f"{' '.join(argv)} in {self.name}: {p.stderr.strip()}")
        return p.stdout

    def ip(self, *argv: str) -> str:
        p = subprocess.run(["ip", "-n", self.name, *argv], capture_output=True, text=True, timeout=20)
        if p.returncode:
            raise HarnessError(f"ip {' '.join(argv)} in {self.name}: {p.stderr.strip()}")
        return p.stdout

    def call(self, fn):
        return _in_netns(self.path, fn)

    def open_tap(self, ifname: str, *, vnet_hdr: bool = True) -> int:
        from devices.virtio_net.backend import open_tap
        return self.call(lambda: open_tap(ifname, vnet_hdr=vnet_hdr))

    def socket(self, *args) -> socket.socket:
        """A socket living in this namespace."""
        return self.call(lambda: socket.socket(*args))

    def mac_of(self, ifname: str) -> bytes:
        out = self.ip("-o", "link", "show", ifname)
        return bytes.fromhex(out.split("link/ether ")[1].split()[0].replace(":", ""))

    def close(self) -> None:
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)

    def __enter__(self) -> "NetNs":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --- frames ----------------------------------------------------------------------------------

def ip4(text: str) -> bytes:
    return socket.inet_aton(text)


def checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def eth(dst: bytes, src: bytes, ethertype: int, payload: bytes) -> bytes:
    return dst + src + struct.pack("!H", ethertype) + payload


def arp_request(mac: bytes, sip: str, tip: str) -> bytes:
    arp = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 1, mac, ip4(sip), b"\0" * 6, ip4(tip))
    return eth(BROADCAST, mac, 0x0806, arp)


def parse_arp(frame: bytes):
    """(op, sender mac, sender ip, target mac, target ip) or None."""
    if len(frame) < 42 or frame[12:14] != b"\x08\x06":
        return None
    _, _, _, _, op, sha, spa, tha, tpa = struct.unpack_from("!HHBBH6s4s6s4s", frame, 14)
    return op, sha, socket.inet_ntoa(spa), tha, socket.inet_ntoa(tpa)


def ipv4(src: str, dst: str, proto: int, payload: bytes, ident: int = 1) -> bytes:
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), ident, 0x4000, 64, proto, 0,
                      ip4(src), ip4(dst))
    return hdr[:10] + struct.pack("!H", checksum(hdr)) + hdr[12:] + payload


def icmp_echo(ident: int, seq: int, data: bytes) -> bytes:
    body = struct.pack("!BBHHH", 8, 0, 0, ident, seq) + data
    return body[:2] + struct.pack("!H", checksum(body)) + body[4:]


def udp(src: str, dst: str, sport: int, dport: int, data: bytes, *, csum: bool = True) -> bytes:
    length = 8 + len(data)
    u = struct.pack("!HHHH", sport, dport, length, 0) + data
    if csum:
        pseudo = ip4(src) + ip4(dst) + struct.pack("!BBH", 0, 17, length)
        c = checksum(pseudo + u) or 0xFFFF
        u = u[:6] + struct.pack("!H", c) + u[8:]
    return u


def tcp_segment(src: str, dst: str, sport: int, dport: int, seq: int, data: bytes,
                flags: int = 0x18) -> bytes:
    """A TCP header (20 bytes) + data with checksum 0 (partial: left to the offload)."""
    return struct.pack("!HHIIBBHHH", sport, dport, seq, 0, 5 << 4, flags, 65535, 0, 0) + data


def parse_ipv4(frame: bytes):
    """(src, dst, proto, payload) of an IPv4 frame, or None."""
    if len(frame) < 34 or frame[12:14] != b"\x08\x00":
        return None
    ihl = (frame[14] & 0xF) * 4
    total = struct.unpack_from("!H", frame, 16)[0]
    return (socket.inet_ntoa(frame[26:30]), socket.inet_ntoa(frame[30:34]), frame[23],
            frame[14 + ihl:14 + total])


# --- the driver --------------------------------------------------------------------------------

class VirtioNet:
    def __init__(self, harness: Harness, slot: int, function: int = 0, *,
                 features: int = BASIC_FEATURES, rx_buffers: int | None = None,
                 timeout: float = 10.0, probe: bool = True):
        self.h = harness
        self.mem = harness.memory
        self.drv = VirtioPciDriver(harness, slot, function, timeout=timeout)
        self.timeout = timeout
        self.want = features
        self.rx_buffers = rx_buffers
        if probe:
            self.drv.probe()
            self.init()

    def init(self, **kw) -> None:
        kw.setdefault("features", self.want)
        self.drv.init(queues=3, **kw)
        self.mrg = self.drv.has(F_MRG_RXBUF)
        self.mac = self.read_mac()
        big = self.drv.has(F_GUEST_TSO4) or self.drv.has(F_GUEST_TSO6)
        self.rx_size = PAGE if self.mrg else (BIG_RX if big else SMALL_RX)
        self._rx: dict[int, int] = {}        # token -> buffer gpa
        self._free_rx: list[int] = []
        self._tx_free: list[int] = []
        self._tx_inflight: dict[int, int] = {}
        self.rx_frames: list[tuple[bytes, bytes]] = []   # (header, frame) received, not yet taken
        self._pending_mrg: list = []
        qsize = self.drv.queues[RXQ].size
        self.fill_rx(self.rx_buffers if self.rx_buffers is not None else qsize)

    # -- config ----------------------------------------------------------------------------
    def read_mac(self) -> bytes:
        return self.drv.device_cfg_bytes(0, 6)

    @property
    def link_status(self) -> int:
        return struct.unpack("<H", self.drv.device_cfg_bytes(6, 2))[0]

    @property
    def link_up(self) -> bool:
        return bool(self.link_status & 1)

    # -- receive -----------------------------------------------------------------------------
    def fill_rx(self, n: int, *, kick: bool = True) -> int:
        """Post up to n receive buffers; returns how many were posted."""
        dq = self.drv.queues[RXQ]
        posted = 0
        while posted < n and dq.num_free > 0:
            gpa = self._free_rx.pop() if self._free_rx else self.h.allocator.alloc(self.rx_size, PAGE)
            token = self.drv.submit(RXQ, [], [(gpa, self.rx_size)], kick=False)
            self._rx[token] = gpa
            posted += 1
        if posted and kick:
            self.drv.kick(RXQ)
        return posted

    def _collect_rx(self, refill: bool) -> int:
        done = self.drv.done[RXQ]
        got = 0
        for token in sorted(done):
            if token not in self._rx:
                continue          # a chain the test submitted itself: left in drv.done
            n = done.pop(token)
            gpa = self._rx.pop(token)
            data = self.mem.read(gpa, min(n, self.rx_size))
            self._free_rx.append(gpa)
            if self._pending_mrg:
                self._pending_mrg[1].append(data)
                self._pending_mrg[2] -= 1
            else:
                if len(data) < HDR_SIZE:
                    self.rx_frames.append((data, b""))   # a bad completion: surface it
                    continue
                hdr = data[:HDR_SIZE]
                nbuf = struct.unpack_from("<H", hdr, 10)[0] if self.mrg else 1
                self._pending_mrg = [hdr, [data[HDR_SIZE:]], max(nbuf, 1) - 1]
            if self._pending_mrg[2] <= 0:
                hdr, parts, _ = self._pending_mrg
                self._pending_mrg = []
                self.rx_frames.append((hdr, b"".join(parts)))
                got += 1
        if refill:
            self.fill_rx(len(self._free_rx))
        return got

    def recv(self, timeout: float | None = None, *, refill: bool = True):
        """The next received (header, frame), or None on timeout."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while not self.rx_frames:
            self.drv.poll_used(RXQ)
            self._collect_rx(refill)
            if self.rx_frames:
                break
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self.drv.wait_used(RXQ, min(left, 0.2))
            self._collect_rx(refill)
        return self.rx_frames.pop(0)

    def recv_match(self, pred, timeout: float | None = None):
        """The first received frame for which pred(frame) holds (others are skipped)."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            got = self.recv(left)
            if got is None:
                return None
            if pred(got[1]):
                return got

    # -- transmit ------------------------------------------------------------------------------
    def _tx_buf(self) -> int:
        return self._tx_free.pop() if self._tx_free else self.h.allocator.alloc(BIG_RX, PAGE)

    def submit_tx(self, frame: bytes, hdr: bytes | None = None, *, kick: bool = True,
                  split: bool = False) -> int:
        hdr = hdr if hdr is not None else bytes(HDR_SIZE)
        gpa = self._tx_buf()
        self.mem.write(gpa, hdr + frame)
        if split:
            readable = [(gpa, len(hdr)), (gpa + len(hdr), len(frame))] if frame else [(gpa, len(hdr))]
        else:
            readable = [(gpa, len(hdr) + len(frame))]
        token = self.drv.submit(TXQ, readable, [], kick=kick)
        self._tx_inflight[token] = gpa
        return token

    def reap_tx(self, tokens=None, timeout: float | None = None) -> dict:
        if tokens is None:
            tokens = list(self._tx_inflight)
        out = self.drv.wait(TXQ, tokens, timeout or self.timeout)
        for t in out:
            self._tx_free.append(self._tx_inflight.pop(t))
        return out

    def send(self, frame: bytes, hdr: bytes | None = None, **kw) -> int:
        """Transmit one frame and wait until the device completed it."""
        token = self.submit_tx(frame, hdr, **kw)
        return self.reap_tx([token])[token]

    # -- control queue -------------------------------------------------------------------------
    def ctrl(self, cls: int, cmd: int, data: bytes = b"") -> int:
        """One control command; returns the ack byte (0 OK, 1 ERR)."""
        gpa = self.h.allocator.alloc(2 + len(data) + 16, 16)
        self.mem.write(gpa, bytes([cls, cmd]) + data + b"\xee")
        ack = gpa + 2 + len(data)
        readable = [(gpa, 2)] + ([(gpa + 2, len(data))] if data else [])
        token = self.drv.submit(CTRLQ, readable, [(ack, 1)])
        self.drv.wait(CTRLQ, [token], self.timeout)
        return self.mem.read(ack, 1)[0]


def net_hdr(flags: int = 0, gso_type: int = 0, hdr_len: int = 0, gso_size: int = 0,
            csum_start: int = 0, csum_offset: int = 0, num_buffers: int = 0) -> bytes:
    return HDR.pack(flags, gso_type, hdr_len, gso_size, csum_start, csum_offset, num_buffers)
