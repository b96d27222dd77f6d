"""A tiny learning Ethernet switch for the virtio-net socket backend.

    python -m devices.virtio_net.switch /run/user/1000/vmnet.sock

listens on an AF_UNIX SOCK_SEQPACKET socket at the path (any user who can
write it may attach; no root). Every NIC (vmmd's open_socket_port) connects;
one message is one Ethernet frame. Connections, not datagrams: a reply to an
autobound datagram address fails when the NIC's vmmd runs in another network
namespace (abstract addresses are per namespace), while a connection works
wherever the path is reachable and ends the port the moment its NIC goes.
The switch learns source MACs per port and forwards a unicast frame to the
port that owns its destination, floods broadcast, multicast and unknown
destinations to every other port, and drops a frame for a port whose socket
is full (as a wire would) rather than block the others.

SwitchCore is sans-I/O (tests/unit/test_virtio_net_switch.py); Switch runs
it on a socket, in a thread (tests, benchmarks) or as this program's main.
"""

from __future__ import annotations

import argparse
import itertools
import os
import selectors
import socket
import threading
import time

from devices.virtio_net.frames import ETH_HLEN, MAX_FRAME

PORT_TIMEOUT = 300.0
MAX_PORTS = 256
MAX_MACS = 4096


class SwitchCore:
    def __init__(self, *, port_timeout: float = PORT_TIMEOUT):
        self.port_timeout = port_timeout
        self.ports: dict[bytes, float] = {}     # address -> last seen
        self.macs: dict[bytes, bytes] = {}      # MAC -> address
        self.stats = {"frames": 0, "forwarded": 0, "flooded": 0, "dropped": 0, "registered": 0}

    def _touch(self, addr: bytes, now: float) -> bool:
        if addr not in self.ports:
            if len(self.ports) >= MAX_PORTS:
                self.expire(now)
                if len(self.ports) >= MAX_PORTS:
                    return False
            self.stats["registered"] += 1
        self.ports[addr] = now
        return True

    def attach(self, addr: bytes, now: float) -> bool:
        """A new port (a NIC connected): it receives floods before it sends."""
        return self._touch(addr, now)

    def expire(self, now: float) -> None:
        for addr, seen in list(self.ports.items()):
            if now - seen > self.port_timeout:
                self.remove(addr)

    def remove(self, addr: bytes) -> None:
        self.ports.pop(addr, None)
        for mac in [m for m, a in self.macs.items() if a == addr]:
            del self.macs[mac]

    def receive(self, addr: bytes, frame, now: float) -> list[bytes]:
        """A datagram from `addr`: the addresses to send it to."""
        if not addr or not self._touch(addr, now):
            return []
        if len(frame) == 0:
            return []
        self.stats["frames"] += 1
        if not ETH_HLEN <= len(frame) <= MAX_FRAME:
            self.stats["dropped"] += 1
            return []
        dst, src = bytes(frame[0:6]), bytes(frame[6:12])
        if not src[0] & 1 and (src in self.macs or len(self.macs) < MAX_MACS):
            self.macs[src] = addr
        if not dst[0] & 1:
            to = self.macs.get(dst)
            if to is not None and to in self.ports:
                if to == addr:
                    self.stats["dropped"] += 1
                    return []
                self.stats["forwarded"] += 1
                return [to]
        self.stats["flooded"] += 1
        return [a for a in self.ports if a != addr]


class Switch:
    def __init__(self, path: str, *, port_timeout: float = float("inf")):
        self.path = path
        # A connected port lives until its connection ends: no idle timeout.
        self.core = SwitchCore(port_timeout=port_timeout)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        self.sock.bind(path)
        self.sock.listen(MAX_PORTS)
        self.sock.setblocking(False)
        self.conns: dict[bytes, socket.socket] = {}   # port id -> its connection
        self._ids = itertools.count(1)
        self._stop_r, self._stop_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._thread: threading.Thread | None = None
        self._buf = bytearray(MAX_FRAME + 64)
        self._sel: selectors.BaseSelector | None = None

    def serve(self) -> None:
        sel = self._sel = selectors.DefaultSelector()
        sel.register(self.sock, selectors.EVENT_READ, None)
        sel.register(self._stop_r, selectors.EVENT_READ, None)
        try:
            while True:
                for key, _ in sel.select(timeout=10.0):
                    if key.fd == self._stop_r:
                        return
                    if key.fileobj is self.sock:
                        self._accept()
                    else:
                        self._drain(key.data, time.monotonic())
        finally:
            for conn in self.conns.values():
                conn.close()
            self.conns.clear()
            sel.close()

    def _accept(self) -> None:
        for _ in range(64):
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return             # e.g. EMFILE: the NIC sees its connection refused
            if len(self.conns) >= MAX_PORTS:
                conn.close()
                continue
            conn.setblocking(False)
            for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
                conn.setsockopt(socket.SOL_SOCKET, opt, 4 << 20)
            port = f"p{next(self._ids)}".encode()
            if not self.core.attach(port, time.monotonic()):
                conn.close()
                continue
            self.conns[port] = conn
            self._sel.register(conn, selectors.EVENT_READ, port)

    def _drop_port(self, port: bytes) -> None:
        conn = self.conns.pop(port, None)
        if conn is not None:
            self._sel.unregister(conn)
            conn.close()
        self.core.remove(port)

    def _drain(self, port: bytes, now: float) -> None:
        conn = self.conns.get(port)
        if conn is None:
            return
        view = memoryview(self._buf)
        for _ in range(1024):
            try:
                n = conn.recv_into(self._buf)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                n = 0
            if n == 0:             # the NIC is gone
                self._drop_port(port)
                return
            for to in self.core.receive(port, view[:n], now):
                out = self.conns.get(to)
                if out is None:
                    continue
                try:
                    out.send(view[:n])
                except (BlockingIOError, InterruptedError):
                    self.core.stats["dropped"] += 1
                except OSError:
                    self._drop_port(to)

    def start(self) -> "Switch":
        self._thread = threading.Thread(target=self.serve, name="vnet-switch", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        os.write(self._stop_w, b"x")
        if self._thread is not None:
            self._thread.join(5)
        self.sock.close()
        os.close(self._stop_r)
        os.close(self._stop_w)
        try:
            os.unlink(self.path)
        except OSError:
            pass

    def __enter__(self) -> "Switch":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m devices.virtio_net.switch",
                                description="an Ethernet switch for virtio-net socket= backends")
    p.add_argument("path", help="AF_UNIX socket path to listen on")
    args = p.parse_args(argv)
    sw = Switch(args.path)
    try:
        sw.serve()
    except KeyboardInterrupt:
        pass
    finally:
        sw.sock.close()
        try:
            os.unlink(args.path)
        except OSError:
            pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
