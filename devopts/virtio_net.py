"""virtio-net slot options: `-s N,virtio-net,tap=NAME|socket=PATH[,mac=M][,queue_size=N]
[,mrg_rxbuf=on|off][,offload=on|off][,link=up|down]`, and vmmd's checks of the backend
name before anything starts (the tap or switch socket itself is opened by vmmd)."""

from __future__ import annotations

import os
import stat

from devopts import Opt, OptionError, choice, on_off, parse_table, power_of_two, shorten

IFNAMSIZ = 16
SUN_PATH_MAX = 107
DEFAULT_MAC = "52:54:00:12:34:56"
DEFAULT_QUEUE_SIZE = 256


def parse_mac(text: str) -> bytes:
    """'xx:xx:xx:xx:xx:xx' (unicast) -> 6 bytes, or ValueError."""
    parts = text.split(":")
    if len(parts) != 6 or not all(len(p) == 2 for p in parts):
        raise ValueError(f"MAC address {shorten(text)} is not xx:xx:xx:xx:xx:xx")
    try:
        mac = bytes(int(p, 16) for p in parts)
    except ValueError:
        raise ValueError(f"MAC address {shorten(text)} is not hexadecimal") from None
    if mac[0] & 1:
        raise ValueError(f"MAC address {shorten(text)} is a multicast address")
    return mac


def tap_name(name: str) -> str:
    raw = name.encode(errors="surrogateescape")
    if not raw or len(raw) >= IFNAMSIZ or b"/" in raw or b"\0" in raw or name.strip() != name \
            or name in (".", ".."):
        raise ValueError(f"{shorten(name)} is not a network interface name (1..{IFNAMSIZ - 1} bytes)")
    return name


def switch_path(path: str) -> str:
    if not path:
        raise ValueError("needs a path")
    if len(os.fsencode(path)) > SUN_PATH_MAX:
        raise ValueError(f"longer than {SUN_PATH_MAX} bytes (a Unix socket limit)")
    return path


OPTIONS = (
    Opt("tap", "tap", tap_name),
    Opt("socket", "socket", switch_path),
    Opt("mac", "mac", parse_mac),
    Opt("queue_size", "queue_size", power_of_two(16, 4096)),
    Opt("mrg_rxbuf", "mrg_rxbuf", on_off),
    Opt("offload", "offload", on_off),
    Opt("link", "link_up", lambda v: choice("up", "down")(v) == "up"),
)


class NetOptions:
    """options {"args": [...], "mac": "..."} (what vmmd bootstraps the device with) -> fields;
    OptionError (a ValueError) on anything malformed."""

    def __init__(self, options: dict):
        if not isinstance(options, dict):
            raise OptionError("virtio-net: options must be a map")
        args = options.get("args") or []
        default_mac = options.get("mac") or DEFAULT_MAC
        try:
            default_mac = parse_mac(default_mac) if isinstance(default_mac, str) else None
        except ValueError:
            default_mac = None
        if default_mac is None:
            raise OptionError(f"virtio-net: bad mac {options.get('mac')!r}")
        o = parse_table("virtio-net", OPTIONS, args, {
            "tap": None, "socket": None, "mac": default_mac, "queue_size": DEFAULT_QUEUE_SIZE,
            "mrg_rxbuf": True, "offload": True, "link_up": True})
        backends = [k for k in ("tap", "socket") if o[k] is not None]
        self.backend = backends[0] if len(backends) == 1 else None
        self.backend_target = o[self.backend] if self.backend else None
        self.mac, self.queue_size = o["mac"], o["queue_size"]
        self.mrg_rxbuf, self.offload, self.link_up = o["mrg_rxbuf"], o["offload"], o["link_up"]


def parse(args) -> NetOptions:
    """vmmd's check of a slot's arguments: the options, plus exactly one backend."""
    opts = NetOptions({"args": list(args) if isinstance(args, (list, tuple)) else args})
    if sum(1 for a in args if a.partition("=")[0] in ("tap", "socket")) != 1:
        raise OptionError("virtio-net: needs exactly one of tap=NAME or socket=PATH")
    return opts


def check_backend(opts: NetOptions) -> None:
    """vmmd's up-front check of the host side: the switch socket must exist and be a socket."""
    if opts.backend != "socket":
        return
    path = opts.backend_target
    try:
        st = os.stat(path)
    except OSError as exc:
        raise OptionError(f"virtio-net: socket={path}: {exc.strerror} (start the switch first)") from None
    if not stat.S_ISSOCK(st.st_mode):
        raise OptionError(f"virtio-net: socket={path}: not a socket")
