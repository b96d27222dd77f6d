"""Migration transports: unix:PATH and tcp:HOST:PORT, TLS with mutual
certificates for TCP to another host (plain TCP only on loopback or with
--insecure / "insecure": true)."""

from __future__ import annotations

import ipaddress
import os
import socket
import ssl
from dataclasses import dataclass


class TransportError(Exception):
    pass


@dataclass(frozen=True)
class Uri:
    scheme: str  # "unix" | "tcp"
    path: str = ""
    host: str = ""
    port: int = 0

    def __str__(self) -> str:
        return f"unix:{self.path}" if self.scheme == "unix" else f"tcp:{self.host}:{self.port}"

    @property
    def loopback(self) -> bool:
        if self.scheme == "unix":
            return True
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host.strip("[]")).is_loopback
        except ValueError:
            return False


def parse_uri(text: str) -> Uri:
    if not isinstance(text, str):
        raise TransportError("migration URI must be a string")
    scheme, colon, rest = text.partition(":")
    if scheme == "unix" and colon and rest:
        if len(os.fsencode(rest)) >= 108:
            raise TransportError(f"unix socket path too long: {rest}")
        return Uri("unix", path=rest)
    if scheme == "tcp" and colon:
        host, colon2, port = rest.rpartition(":")
        if colon2 and host and port.isdigit() and 0 < int(port) < 65536:
            return Uri("tcp", host=host.strip("[]"), port=int(port))
    raise TransportError(f"bad migration URI {text!r}: expected unix:PATH or tcp:HOST:PORT")


@dataclass(frozen=True)
class Tls:
    cert: str
    key: str
    ca: str


def check_security(uri: Uri, tls: Tls | None, insecure: bool) -> None:
    """Plain TCP to another host is refused unless explicitly allowed."""
    if uri.scheme == "tcp" and tls is None and not insecure and not uri.loopback:
        raise TransportError(f"{uri}: TCP to another host needs TLS (certificate, key and CA) "
                             f"or an explicit insecure flag")


def _context(tls: Tls, server: bool) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(tls.cert, tls.key)
        ctx.load_verify_locations(tls.ca)
    except (OSError, ssl.SSLError) as exc:
        raise TransportError(f"TLS certificates: {exc}") from None
    ctx.verify_mode = ssl.CERT_REQUIRED  # mutual: each side checks the other's certificate
    if not server:
        ctx.check_hostname = False  # the peer is pinned by the CA, not by name
    return ctx


def connect(uri: Uri, tls: Tls | None, timeout: float = 10.0) -> socket.socket:
    try:
        if uri.scheme == "unix":
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(timeout)
            s.connect(uri.path)
        else:
            s = socket.create_connection((uri.host, uri.port), timeout=timeout)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if tls is not None:
                s = _context(tls, server=False).wrap_socket(s, server_hostname=uri.host)
    except (OSError, ssl.SSLError) as exc:
        raise TransportError(f"cannot connect to {uri}: {exc}") from None
    _big_buffers(s)
    return s


def listen(uri: Uri) -> socket.socket:
    try:
        if uri.scheme == "unix":
            if os.path.exists(uri.path):
                os.unlink(uri.path)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.bind(uri.path)
        else:
            info = socket.getaddrinfo(uri.host, uri.port, type=socket.SOCK_STREAM)[0]
            s = socket.socket(info[0], socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(info[4])
        s.listen(1)
    except OSError as exc:
        raise TransportError(f"cannot listen on {uri}: {exc}") from None
    return s


def accept(listener: socket.socket, uri: Uri, tls: Tls | None, timeout: float | None) -> socket.socket:
    listener.settimeout(timeout)
    try:
        s, _ = listener.accept()
        if uri.scheme == "tcp":
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if tls is not None:
                s.settimeout(30)
                s = _context(tls, server=True).wrap_socket(s, server_side=True)
    except socket.timeout:
        raise TransportError(f"no source connected to {uri} in time") from None
    except (OSError, ssl.SSLError) as exc:
        raise TransportError(f"incoming connection on {uri} failed: {exc}") from None
    s.settimeout(None)
    _big_buffers(s)
    return s


def _big_buffers(s: socket.socket) -> None:
    for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        try:
            s.setsockopt(socket.SOL_SOCKET, opt, 4 << 20)
        except OSError:
            pass
