"""virtio-net backends: the I/O half of the device.

Both backends work on one non-blocking fd that vmmd opened in the host's
network namespace and handed in (bootstrap fds "tap" or "socket"): the
device process unshares its own (empty) network namespace in
sandbox.namespaces.isolate() before it builds its model, so it could not
create a tap or reach a host socket itself.

  tap     /dev/net/tun with IFF_TAP|IFF_NO_PI|IFF_VNET_HDR and a 12-byte
          vnet header (TUNSETVNETHDRSZ): every read and write carries a
          struct virtio_net_hdr_v1, so checksum and segmentation offloads
          pass through untouched (the kernel checks and completes them);
          TUNSETOFFLOAD tells the tap what the guest accepts on receive.
  socket  an AF_UNIX SOCK_SEQPACKET connection to a switch
          (devices/virtio_net/switch.py): one message per Ethernet frame,
          no vnet header, no offloads. Unprivileged: two vmmd instances of
          any user who can reach the switch's path talk to each other, like
          QEMU's -netdev stream/dgram. A connection, not datagrams to an
          autobound address: abstract addresses belong to one network
          namespace, so a switch could not answer a vmmd running in another
          (the lab's e2e guest in a private namespace found this); a
          connection also tells each side at once when the other is gone.

open_tap() and open_socket_port() run in vmmd (they need the host's
namespace and, for a tap, CAP_NET_ADMIN); the Backend classes run in the
device and only read, write and (tap) TUNSETOFFLOAD.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import struct

from devices.virtio_net.frames import HDR_SIZE

TUNSETIFF = 0x400454CA
TUNGETIFF = 0x800454D2
TUNSETOFFLOAD = 0x400454D0
TUNGETVNETHDRSZ = 0x800454D7
TUNSETVNETHDRSZ = 0x400454D8
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_TSO_ECN = 0x01, 0x02, 0x04, 0x08
IFNAMSIZ = 16

RX_BUFFER = 65536 + 256        # a GSO super-frame, its vnet header and slack
SOCKET_BUFFER = 4 << 20


class BackendError(OSError):
    pass


def open_tap(name: str, *, vnet_hdr: bool = True) -> int:
    """Open (creating if needed) tap `name` in the caller's network namespace:
    a non-blocking, close-on-exec fd. Needs CAP_NET_ADMIN (or an existing
    tap owned by the caller)."""
    raw = name.encode()
    if not raw or len(raw) >= IFNAMSIZ or b"/" in raw or b"\0" in raw or name.strip() != name:
        raise ValueError(f"tap name {name!r} is not a network interface name")
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        flags = IFF_TAP | IFF_NO_PI | (IFF_VNET_HDR if vnet_hdr else 0)
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", raw, flags))
        if vnet_hdr:
            fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", HDR_SIZE))
            fcntl.ioctl(fd, TUNSETOFFLOAD, 0)
    except OSError:
        os.close(fd)
        raise
    return fd


def open_socket_port(switch_path: str) -> int:
    """A SOCK_SEQPACKET connection to the switch at `switch_path` (a
    non-blocking, close-on-exec fd)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            s.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER)
        s.connect(switch_path)
        s.setblocking(False)
        return s.detach()
    except OSError:
        s.close()
        raise


class Backend:
    """One fd: non-blocking reads of whole frames, gathered writes."""

    kind = "none"
    vnet_hdr = False          # frames on the fd carry a 12-byte virtio_net_hdr
    offloads = False          # the backend can take and give checksum/GSO offloads
    eof = False               # the peer closed the connection: nothing more to read

    def __init__(self, fd: int):
        self.fd = fd
        os.set_blocking(fd, False)
        self._buf = bytearray(RX_BUFFER)
        self._view = memoryview(self._buf)
        self.errors = 0
        self.last_error = ""

    def recv(self):
        """The next frame (a memoryview valid until the next recv), or None."""
        try:
            n = os.readv(self.fd, [self._buf])
        except (BlockingIOError, InterruptedError):
            return None
        return self._view[:n]

    def send(self, parts) -> bool:
        """Write one frame given as a list of buffers; False if it was dropped."""
        try:
            os.writev(self.fd, parts)
            return True
        except (BlockingIOError, InterruptedError):
            return False
        except OSError as exc:
            self.errors += 1
            self.last_error = os.strerror(exc.errno or 0)
            return False

    def set_offload(self, tun_flags: int) -> None:
        pass

    def describe(self) -> dict:
        return {"kind": self.kind, "vnet_hdr": self.vnet_hdr, "errors": self.errors,
                "last_error": self.last_error}

    def close(self) -> None:
        if self.fd >= 0:
            try:
                os.close(self.fd)
            except OSError:
                pass
            self.fd = -1


class TapBackend(Backend):
    kind = "tap"

    def __init__(self, fd: int):
        super().__init__(fd)
        ifr = bytearray(40)
        fcntl.ioctl(fd, TUNGETIFF, ifr)
        name, flags = struct.unpack_from("16sH", ifr)
        if not flags & IFF_TAP or not flags & IFF_NO_PI:
            raise BackendError(errno.EINVAL, "the tap fd is not IFF_TAP|IFF_NO_PI")
        self.name = name.rstrip(b"\0").decode(errors="replace")
        self.vnet_hdr = bool(flags & IFF_VNET_HDR)
        if self.vnet_hdr:
            size = bytearray(4)
            fcntl.ioctl(fd, TUNGETVNETHDRSZ, size)
            if struct.unpack("i", size)[0] != HDR_SIZE:
                fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", HDR_SIZE))
            self.offloads = True
            self.tun_offload = 0
            self.set_offload(0)   # before the jail: checks the ioctl works

    def set_offload(self, tun_flags: int) -> None:
        if self.vnet_hdr:
            fcntl.ioctl(self.fd, TUNSETOFFLOAD, tun_flags)
            self.tun_offload = tun_flags

    def describe(self) -> dict:
        return {**super().describe(), "ifname": self.name,
                "tun_offload": getattr(self, "tun_offload", 0)}


class SocketBackend(Backend):
    kind = "socket"

    def __init__(self, fd: int):
        super().__init__(fd)
        s = socket.socket(fileno=os.dup(fd))
        try:
            if s.family != socket.AF_UNIX or s.type & 0xF != socket.SOCK_SEQPACKET:
                raise BackendError(errno.EINVAL, "the socket fd is not AF_UNIX SOCK_SEQPACKET")
        finally:
            s.close()

    def recv(self):
        view = super().recv()
        if view is not None and len(view) == 0:
            # End of file on a SEQPACKET connection: the switch went away. Stop
            # reading (the fd stays readable for ever); sends are dropped.
            self.eof = True
            self.errors += 1
            self.last_error = "the switch closed the connection"
            return None
        return view

    def send(self, parts) -> bool:
        try:
            os.writev(self.fd, parts)
            return True
        except (BlockingIOError, InterruptedError, ConnectionRefusedError, BrokenPipeError,
                ConnectionResetError):
            return False       # the switch is busy or gone: the frame is lost, as on a wire
        except OSError as exc:
            self.errors += 1
            self.last_error = os.strerror(exc.errno or 0)
            return False


def make_backend(fds: dict) -> Backend:
    if "tap" in fds:
        return TapBackend(fds["tap"])
    if "socket" in fds:
        return SocketBackend(fds["socket"])
    raise ValueError("virtio-net: no backend fd (bootstrap fds 'tap' or 'socket')")


def open_host_fds(backend) -> dict:
    """vmmd side: ["tap", NAME] or ["socket", PATH] -> {"tap"|"socket": fd}."""
    kind, target = backend
    if kind == "tap":
        return {"tap": open_tap(target)}
    if kind == "socket":
        return {"socket": open_socket_port(target)}
    raise ValueError(f"unknown virtio-net backend {kind!r}")
