"""vmmd's command line and JSON config file -> VmConfig (bhyve-like options).

    vmmd -c 2 -m 512M -s 31,lpc -s 2,virtio-blk,/path.img,ro -l com1,stdio \\
         --kernel bzImage --initrd initrd.img --cmdline "console=ttyS0" --api-socket /run/vm.sock

`--config vm.json` reads a JSON object whose keys are the long option names
("cpus", "memory", "kernel", "no-reboot", ...); the repeatable -s/--slot and
-l/--console are lists under "slots" and "consoles". Options on the command
line override the file; a slot (or console port) given on the command line
replaces the file's entry for that slot (port). Relative paths are relative
to the current directory. Every problem raises ConfigError with one message;
parse_or_exit() turns that into "vmmd: error: ..." and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import stat
import sys
from dataclasses import dataclass, field
from typing import Any, NoReturn

import vmmd

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
MIN_MEMORY = 16 * MiB
MAX_MEMORY = 1 << 40           # 1 TiB: anything larger is a typo
MAX_CPUS = 255
PAGE_SIZE = 4096
SUN_PATH_MAX = 107             # sockaddr_un.sun_path minus the NUL

HOSTBRIDGE = "hostbridge"
KNOWN_DEVICES = ("hostbridge", "lpc", "virtio-blk", "virtio-net", "virtio-balloon")
CONSOLE_PORTS = ("com1", "com2")
CONSOLE_BACKENDS = {"stdio": 0, "null": 0, "file": 1, "socket": 1}  # -> number of args

SANDBOX_MODES = ("on", "log", "off")
RAW_MODES = ("real", "protected", "long", "long-cpl3")
BUS_MODES = ("fast", "bus-only")
PVM_ASSISTS = ("auto", "on", "off")
LOG_LEVELS = ("debug", "info", "warning", "error")


class ConfigError(ValueError):
    """Bad command line or config file; the message says what and where."""


@dataclass(frozen=True)
class SlotConfig:
    slot: int                    # PCI slot 0..31 (0 is the host bridge)
    function: int                # 0..7
    device: str                  # one of KNOWN_DEVICES
    args: tuple[str, ...] = ()   # device-specific, e.g. ("/disk.img", "ro")


@dataclass(frozen=True)
class VmConfig:
    cpus: int = 1
    memory: int = 256 * MiB                       # bytes
    slots: tuple[SlotConfig, ...] = ()            # sorted by (slot, function)
    consoles: dict[str, str] = field(default_factory=dict, hash=False)  # "com1" -> "stdio"
    kernel: str | None = None
    initrd: str | None = None
    cmdline: str = ""
    raw: str | None = None                        # raw/ELF test guest instead of a kernel
    raw_mode: str = "long-cpl3"
    api_socket: str | None = None
    no_reboot: bool = False                       # guest reboot -> vmmd exits
    sandbox: str = "on"
    device_timeout: float = 2.0                   # seconds
    log_level: str = "info"
    bus_mode: str = "fast"
    pvm_assists: str = "auto"


# ---------------------------------------------------------------------------
# Value parsers. `where` names the source: "--cpus" or "vm.json: cpus".

def parse_memory(text: Any, where: str = "--memory") -> int:
    """'512M', '1G', '65536K' or a bare number of MiB (like bhyve) -> bytes."""
    if isinstance(text, int) and not isinstance(text, bool):
        text = str(text)
    m = re.fullmatch(r"(\d+)([KMG]?)", str(text).strip(), re.IGNORECASE)
    if not m:
        raise ConfigError(f"{where}: bad size {text!r} (use e.g. 512M, 2G, or a number of MiB)")
    size = int(m.group(1)) * {"K": KiB, "M": MiB, "G": GiB, "": MiB}[m.group(2).upper()]
    if size < MIN_MEMORY:
        raise ConfigError(f"{where}: {text!r} is less than the minimum of 16M")
    if size > MAX_MEMORY:
        raise ConfigError(f"{where}: {text!r} is more than the maximum of 1024G")
    if size % PAGE_SIZE:
        raise ConfigError(f"{where}: {text!r} is not a multiple of 4K")
    return size


def _int(value: Any, where: str, lo: int, hi: int, what: str = "an integer") -> int:
    if isinstance(value, bool) or not (isinstance(value, int) or re.fullmatch(r"\d+", str(value))):
        raise ConfigError(f"{where}: {value!r} is not {what}")
    n = int(value)
    if not lo <= n <= hi:
        raise ConfigError(f"{where}: {n} is out of range {lo}..{hi}")
    return n


def _float(value: Any, where: str) -> float:
    try:
        if isinstance(value, bool):
            raise ValueError
        f = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: {value!r} is not a number") from None
    if not f > 0 or math.isinf(f):
        raise ConfigError(f"{where}: must be a positive number of seconds, got {value!r}")
    return f


def _choice(value: Any, where: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ConfigError(f"{where}: invalid value {value!r} (choose from {', '.join(choices)})")
    return value


BLK_FORMATS = ("qcow2", "raw")


def _blk_format(args: tuple[str, ...], where: str) -> None:
    """virtio-blk's format= (qcow2|raw); the device parses the image itself."""
    for arg in args[1:]:
        key, eq, value = arg.partition("=")
        if key == "format" and value not in BLK_FORMATS:
            raise ConfigError(f"{where}: format={value!r}: expected one of {', '.join(BLK_FORMATS)}")


def parse_slot(text: str, where: str = "-s") -> SlotConfig:
    """'SLOT[:FUNC],DEVICE[,ARGS...]' -> SlotConfig (device args checked here too)."""
    parts = text.split(",")
    if len(parts) < 2:
        raise ConfigError(f"{where} {text!r}: expected SLOT[:FUNC],DEVICE[,ARGS...]")
    if any(p == "" for p in parts):
        raise ConfigError(f"{where} {text!r}: empty field")
    slot_s, _, func_s = parts[0].partition(":")
    slot = _int(slot_s, f"{where} {text!r}: slot", 0, 31, "a slot number")
    function = _int(func_s or "0", f"{where} {text!r}: function", 0, 7, "a function number")
    device, args = parts[1], tuple(parts[2:])
    if device not in KNOWN_DEVICES:
        raise ConfigError(f"{where} {text!r}: unknown device {device!r} "
                          f"(known: {', '.join(KNOWN_DEVICES)})")
    if slot == 0 and device != HOSTBRIDGE:
        raise ConfigError(f"{where} {text!r}: slot 0 is reserved for the host bridge")
    if device == HOSTBRIDGE and (slot, function) != (0, 0):
        raise ConfigError(f"{where} {text!r}: the host bridge is always at slot 0:0")
    if device in (HOSTBRIDGE, "lpc") and args:
        raise ConfigError(f"{where} {text!r}: {device} takes no arguments")
    if device == "virtio-blk":
        _readable_file(args[0] if args else None, f"{where} {text!r}: disk image")
        _blk_format(args, f"{where} {text!r}")
    return SlotConfig(slot, function, device, args)


def parse_console(text: str, where: str = "-l") -> tuple[str, str]:
    """'com1,stdio' / 'com2,file,PATH' / 'com2,socket,PATH' / 'com1,null' -> (port, backend spec)."""
    port, _, spec = text.partition(",")
    port = port.lower()
    if port not in CONSOLE_PORTS:
        raise ConfigError(f"{where} {text!r}: unknown port {port!r} (choose from {', '.join(CONSOLE_PORTS)})")
    backend, *args = spec.split(",")
    if backend not in CONSOLE_BACKENDS:
        raise ConfigError(f"{where} {text!r}: unknown backend {backend!r} "
                          f"(choose from {', '.join(CONSOLE_BACKENDS)})")
    if len(args) != CONSOLE_BACKENDS[backend] or any(a == "" for a in args):
        usage = f"{port},{backend}" + (",PATH" if CONSOLE_BACKENDS[backend] else "")
        raise ConfigError(f"{where} {text!r}: expected {usage}")
    if backend == "socket" and len(os.fsencode(args[0])) > SUN_PATH_MAX:
        raise ConfigError(f"{where} {text!r}: socket path longer than {SUN_PATH_MAX} bytes")
    return port, spec


def _readable_file(path: str | None, where: str) -> str:
    if not path:
        raise ConfigError(f"{where}: missing path")
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ConfigError(f"{where} {path}: no such file") from None
    except OSError as exc:
        raise ConfigError(f"{where} {path}: {exc.strerror}") from None
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
        raise ConfigError(f"{where} {path}: not a regular file")
    if not os.access(path, os.R_OK):
        raise ConfigError(f"{where} {path}: not readable")
    return path


# ---------------------------------------------------------------------------
# Options: CLI flags and JSON keys come from this one table.

@dataclass(frozen=True)
class _Opt:
    key: str                       # long option and JSON key
    flags: tuple[str, ...]         # CLI spellings
    json_types: tuple[type, ...]   # accepted types in the config file
    help: str
    metavar: str | None = None
    repeat: bool = False           # repeatable on the CLI, a list of strings in JSON
    switch: bool = False           # flag without value


_OPTS = (
    _Opt("cpus", ("-c", "--cpus"), (int,), "number of vCPUs (1..255, default 1)", "N"),
    _Opt("memory", ("-m", "--memory"), (str, int), "guest RAM, e.g. 512M or 2G; bare number = MiB (default 256M)", "SIZE"),
    _Opt("slots", ("-s", "--slot"), (str,), "PCI slot: SLOT[:FUNC],DEVICE[,ARGS...]", "SPEC", repeat=True),
    _Opt("consoles", ("-l", "--console"), (str,), "serial port: com1|com2,stdio|null|file,PATH|socket,PATH", "SPEC", repeat=True),
    _Opt("kernel", ("--kernel",), (str,), "Linux bzImage to boot", "PATH"),
    _Opt("initrd", ("--initrd",), (str,), "initramfs for --kernel", "PATH"),
    _Opt("cmdline", ("--cmdline",), (str,), "kernel command line", "TEXT"),
    _Opt("raw", ("--raw",), (str,), "raw/ELF test guest to run instead of a kernel", "PATH"),
    _Opt("raw-mode", ("--raw-mode",), (str,), f"CPU mode for --raw: {'|'.join(RAW_MODES)} (default long-cpl3)", "MODE"),
    _Opt("api-socket", ("--api-socket",), (str,), "JSON-RPC control socket path", "PATH"),
    _Opt("no-reboot", ("--no-reboot",), (bool,), "exit instead of rebooting the guest", switch=True),
    _Opt("sandbox", ("--sandbox",), (str,), f"device sandbox: {'|'.join(SANDBOX_MODES)} (default on)", "MODE"),
    _Opt("device-timeout", ("--device-timeout",), (int, float), "seconds to wait for a device reply (default 2.0)", "S"),
    _Opt("log-level", ("--log-level",), (str,), f"{'|'.join(LOG_LEVELS)} (default info)", "LEVEL"),
    _Opt("bus-mode", ("--bus-mode",), (str,), f"{'|'.join(BUS_MODES)} (default fast)", "MODE"),
    _Opt("pvm-assists", ("--pvm-assists",), (str,), f"{'|'.join(PVM_ASSISTS)} (default auto)", "MODE"),
)
_BY_KEY = {o.key: o for o in _OPTS}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # ConfigError instead of print + exit
        raise ConfigError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="vmmd", description="KVM virtual machine monitor", allow_abbrev=False)
    p.add_argument("--version", action="version", version=f"vmmd {vmmd.__version__}")
    p.add_argument("--config", metavar="FILE", help="JSON config file (options override it)")
    for o in _OPTS:
        dest = o.key.replace("-", "_")
        if o.switch:
            p.add_argument(*o.flags, dest=dest, action="store_true", default=None, help=o.help)
        elif o.repeat:
            p.add_argument(*o.flags, dest=dest, action="append", metavar=o.metavar, help=o.help)
        else:
            p.add_argument(*o.flags, dest=dest, metavar=o.metavar, help=o.help)
    return p


_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false"}


def _json_type_ok(opt: _Opt, value: Any) -> bool:
    if opt.repeat:
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    if isinstance(value, bool):  # bool is an int subclass; only bool options take it
        return bool in opt.json_types
    return isinstance(value, opt.json_types)


def _load_file(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: invalid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: must be a JSON object")
    for key, value in data.items():
        opt = _BY_KEY.get(key)
        if opt is None:
            raise ConfigError(f"{path}: unknown key {key!r} (known: {', '.join(_BY_KEY)})")
        if not _json_type_ok(opt, value):
            want = "a list of strings" if opt.repeat else " or ".join(_TYPE_NAMES[t] for t in opt.json_types)
            raise ConfigError(f"{path}: {key}: expected {want}, got {json.dumps(value)}")
    return data


def _merged_entries(file_items: list[str], cli_items: list[str], path: str | None,
                    parse, key_of, what: str) -> dict:
    """Entries of a repeatable option; the CLI's replace the file's with the same key."""
    merged: dict = {}
    for items, where in ((file_items, f"{path}: {what}"), (cli_items, _BY_KEY[what].flags[0])):
        seen: set = set()
        for text in items:
            parsed = parse(text, where)
            k = key_of(parsed)
            if k in seen:
                raise ConfigError(f"{where} {text!r}: {_describe_key(what, k)} given twice")
            seen.add(k)
            merged[k] = parsed
    return merged


def _describe_key(what: str, k) -> str:
    return f"slot {k[0]}:{k[1]}" if what == "slots" else f"port {k}"


def parse_args(argv: list[str]) -> VmConfig:
    """Command line (plus --config file) -> validated VmConfig, or ConfigError."""
    ns = build_parser().parse_args(argv)
    cli = {k: v for k, v in vars(ns).items() if v is not None and k != "config"}
    cli = {k.replace("_", "-"): v for k, v in cli.items()}
    file = _load_file(ns.config) if ns.config else {}

    def get(key: str) -> tuple[Any, str] | tuple[None, None]:
        """(value, where) from the CLI, else the file, else (None, None)."""
        if key in cli:
            return cli[key], f"--{key}"
        if key in file:
            return file[key], f"{ns.config}: {key}"
        return None, None

    def scalar(key: str, convert, default):
        value, where = get(key)
        return default if where is None else convert(value, where)

    cpus = scalar("cpus", lambda v, w: _int(v, w, 1, MAX_CPUS), 1)
    memory = scalar("memory", parse_memory, VmConfig.memory)
    sandbox = scalar("sandbox", lambda v, w: _choice(v, w, SANDBOX_MODES), "on")
    raw_mode = scalar("raw-mode", lambda v, w: _choice(v, w, RAW_MODES), "long-cpl3")
    bus_mode = scalar("bus-mode", lambda v, w: _choice(v, w, BUS_MODES), "fast")
    pvm_assists = scalar("pvm-assists", lambda v, w: _choice(v, w, PVM_ASSISTS), "auto")
    log_level = scalar("log-level", lambda v, w: _choice(v, w, LOG_LEVELS), "info")
    device_timeout = scalar("device-timeout", _float, 2.0)
    no_reboot = bool(scalar("no-reboot", lambda v, w: v, False))

    slots = _merged_entries(file.get("slots", []), cli.get("slots", []), ns.config,
                            parse_slot, lambda s: (s.slot, s.function), "slots")
    slots.pop((0, 0), None)  # "-s 0,hostbridge" is bhyve habit; the host bridge is always there
    lpcs = [s for s in slots.values() if s.device == "lpc"]
    if len(lpcs) > 1:
        raise ConfigError(f"-s: only one lpc slot allowed (got slots {', '.join(str(s.slot) for s in lpcs)})")
    consoles = _merged_entries(file.get("consoles", []), cli.get("consoles", []), ns.config,
                               parse_console, lambda c: c[0], "consoles")
    consoles = {port: spec for port, (_, spec) in sorted(consoles.items())}
    if consoles and not lpcs:
        raise ConfigError("-l: consoles live on the LPC bridge; add an lpc slot (e.g. -s 31,lpc)")
    if [spec for spec in consoles.values()].count("stdio") > 1:
        raise ConfigError("-l: only one console can use stdio")

    kernel, kernel_where = get("kernel")
    raw, raw_where = get("raw")
    if (kernel is None) == (raw is None):
        raise ConfigError("exactly one of --kernel and --raw is required")
    if kernel is not None:
        _readable_file(kernel, kernel_where)
    else:
        _readable_file(raw, raw_where)
        for key in ("initrd", "cmdline"):
            if get(key)[1] is not None:
                raise ConfigError(f"--{key} needs --kernel (not --raw)")
    if kernel is not None and get("raw-mode")[1] is not None:
        raise ConfigError("--raw-mode needs --raw")
    initrd, initrd_where = get("initrd")
    if initrd is not None:
        _readable_file(initrd, initrd_where)

    api_socket, api_where = get("api-socket")
    if api_socket is not None:
        _check_socket_path(api_socket, api_where)

    return VmConfig(
        cpus=cpus, memory=memory,
        slots=tuple(slots[k] for k in sorted(slots)), consoles=consoles,
        kernel=kernel, initrd=initrd, cmdline=get("cmdline")[0] or "",
        raw=raw, raw_mode=raw_mode, api_socket=api_socket, no_reboot=no_reboot,
        sandbox=sandbox, device_timeout=device_timeout, log_level=log_level,
        bus_mode=bus_mode, pvm_assists=pvm_assists,
    )


def _check_socket_path(path: str, where: str) -> None:
    if not path:
        raise ConfigError(f"{where}: empty path")
    if len(os.fsencode(path)) > SUN_PATH_MAX:
        raise ConfigError(f"{where} {path}: longer than {SUN_PATH_MAX} bytes (a Unix socket limit)")
    parent = os.path.dirname(path) or "."
    if not os.path.isdir(parent):
        raise ConfigError(f"{where} {path}: directory {parent} does not exist")


def parse_or_exit(argv: list[str] | None = None) -> VmConfig:
    """parse_args() for main(): on error print 'vmmd: error: ...' and exit 2."""
    try:
        return parse_args(sys.argv[1:] if argv is None else argv)
    except ConfigError as exc:
        print(f"vmmd: error: {exc}", file=sys.stderr)
        sys.exit(2)
