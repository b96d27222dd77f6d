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
from vmmd.api.limits import DEFAULT_LIMITS, ApiLimits
from vmmd.boot import CMDLINE_MAX
from devopts import OptionError
from devopts import console as consoleopts
from devopts import virtio_balloon as balloonopts
from devopts import virtio_blk as blkopts
from devopts import virtio_net as netopts

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
MIN_MEMORY = 16 * MiB
MAX_MEMORY = 1 << 40           # 1 TiB: anything larger is a typo
MAX_CPUS = 255
PAGE_SIZE = 4096
SUN_PATH_MAX = 107             # sockaddr_un.sun_path minus the NUL
MAX_ERROR_CHARS = 400         # an error line quoting a huge argument is cut here
MAX_NUMBER_CHARS = 32          # a longer number is a typo (and int() of 5,000 digits raises)
# --kernel without --cmdline: a console on COM1, reboot by triple fault,
# and a panic that reboots (with --no-reboot: ends vmmd) instead of hanging.
DEFAULT_CMDLINE = "console=ttyS0 panic=-1 reboot=t"
MAX_CONFIG_BYTES = 1 << 20     # a --config file larger than this is not a VM description
MAX_JSON_DEPTH = 32            # the config file's nesting: the schema needs 2
MAX_BOOT_IMAGE = 1 << 30       # kernel/raw guest read whole to check it up front
MAX_RAW_LONG_MEMORY = 511 * GiB  # --raw long modes identity-map RAM + the PCI hole with one PDPT
MIN_DEVICE_TIMEOUT, MAX_DEVICE_TIMEOUT = 0.05, 3600.0
MAX_API_CONNECTIONS = 100000   # still lowered at start to leave RESERVED_FDS descriptors free

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
    device_crash_limit: tuple[int, float] = (5, 60.0)  # crashes within seconds -> device failed
    log_level: str = "info"
    bus_mode: str = "fast"
    pvm_assists: str = "auto"
    api_limits: ApiLimits = DEFAULT_LIMITS        # control socket caps (vmmd.api.limits)


# ---------------------------------------------------------------------------
# Value parsers. `where` names the source: "--cpus" or "vm.json: cpus".

def parse_memory(text: Any, where: str = "--memory") -> int:
    """'512M', '1G', '65536K' or a bare number of MiB (like bhyve) -> bytes."""
    if isinstance(text, int) and not isinstance(text, bool):
        text = str(text)
    m = re.fullmatch(r"(\d+)([KMG]?)", str(text).strip(), re.IGNORECASE)
    if m and len(m.group(1)) > MAX_NUMBER_CHARS:
        raise ConfigError(f"{where}: {_short(text)} is more than the maximum of 1024G")
    if not m:
        raise ConfigError(f"{where}: bad size {_short(text)} (use e.g. 512M, 2G, or a number of MiB)")
    size = int(m.group(1)) * {"K": KiB, "M": MiB, "G": GiB, "": MiB}[m.group(2).upper()]
    if size < MIN_MEMORY:
        raise ConfigError(f"{where}: {_short(text)} is less than the minimum of 16M")
    if size > MAX_MEMORY:
        raise ConfigError(f"{where}: {_short(text)} is more than the maximum of 1024G")
    if size % PAGE_SIZE:
        raise ConfigError(f"{where}: {_short(text)} is not a multiple of 4K")
    return size


def _short(value: Any, limit: int = 40) -> str:
    """repr() for messages, cut short: an error line stays one readable line."""
    text = repr(value) if not isinstance(value, int) or value.bit_length() < 100 else f"{value:.3e}"
    return text if len(text) <= limit else text[:limit - 5] + "...'"


def _int(value: Any, where: str, lo: int, hi: int, what: str = "an integer") -> int:
    if isinstance(value, bool) or not (isinstance(value, int) or re.fullmatch(r"\d+", str(value))):
        raise ConfigError(f"{where}: {_short(value)} is not {what}")
    if isinstance(value, str) and len(value) > MAX_NUMBER_CHARS:
        raise ConfigError(f"{where}: {_short(value)} is out of range {lo}..{hi}")
    n = int(value)
    if not lo <= n <= hi:
        raise ConfigError(f"{where}: {_short(n)} is out of range {lo}..{hi}")
    return n


def _crash_limit(value: Any, where: str) -> tuple[int, float]:
    """N/SECONDS, e.g. 5/60."""
    count, slash, window = str(value).partition("/")
    if not slash:
        raise ConfigError(f"{where}: {value!r} is not N/SECONDS (e.g. 5/60)")
    return _int(count, where, 1, 1000, "a crash count"), _float(window, where)


def _float(value: Any, where: str) -> float:
    try:
        if isinstance(value, bool) or isinstance(value, str) and len(value) > MAX_NUMBER_CHARS:
            raise ValueError
        f = float(value)
    except (TypeError, ValueError, OverflowError):
        raise ConfigError(f"{where}: {_short(value)} is not a number") from None
    if not f > 0 or math.isinf(f):
        raise ConfigError(f"{where}: must be a positive number of seconds, got {_short(value)}")
    if not MIN_DEVICE_TIMEOUT <= f <= MAX_DEVICE_TIMEOUT:
        raise ConfigError(f"{where}: {_short(value)} is outside "
                          f"{MIN_DEVICE_TIMEOUT:g}..{MAX_DEVICE_TIMEOUT:g} seconds")
    return f


def _seconds(value: Any, where: str, lo: float, hi: float) -> float:
    try:
        if isinstance(value, bool) or isinstance(value, str) and len(value) > MAX_NUMBER_CHARS:
            raise ValueError
        f = float(value)
    except (TypeError, ValueError, OverflowError):
        raise ConfigError(f"{where}: {_short(value)} is not a number") from None
    if not lo <= f <= hi:
        raise ConfigError(f"{where}: {_short(value)} is outside {lo:g}..{hi:g} seconds")
    return f


def _bytes(value: Any, where: str, lo: int, hi: int) -> int:
    """'256K', '4M', '1G' or a bare number of bytes."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    m = re.fullmatch(r"(\d{1,%d})([KMG]?)" % MAX_NUMBER_CHARS, str(value).strip(), re.IGNORECASE)
    if not m:
        raise ConfigError(f"{where}: bad size {_short(value)} (use e.g. 65536, 256K or 4M)")
    n = int(m.group(1)) * {"K": KiB, "M": MiB, "G": GiB, "": 1}[m.group(2).upper()]
    if not lo <= n <= hi:
        raise ConfigError(f"{where}: {_short(value)} is outside {lo}..{hi} bytes")
    return n


def _choice(value: Any, where: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ConfigError(f"{where}: invalid value {_short(value)} (choose from {', '.join(choices)})")
    return value


BLK_FORMATS = blkopts.FORMATS   # virtio-blk format= (devopts.virtio_blk's option table)


def parse_slot(text: str, where: str = "-s") -> SlotConfig:
    """'SLOT[:FUNC],DEVICE[,ARGS...]' -> SlotConfig (device args checked here too)."""
    shown = _short(text, 60)
    parts = text.split(",")
    if len(parts) < 2:
        raise ConfigError(f"{where} {shown}: expected SLOT[:FUNC],DEVICE[,ARGS...]")
    if any(p == "" for p in parts):
        raise ConfigError(f"{where} {shown}: empty field")
    slot_s, _, func_s = parts[0].partition(":")
    slot = _int(slot_s, f"{where} {shown}: slot", 0, 31, "a slot number")
    function = _int(func_s or "0", f"{where} {shown}: function", 0, 7, "a function number")
    device, args = parts[1], tuple(parts[2:])
    if device not in KNOWN_DEVICES:
        raise ConfigError(f"{where} {shown}: unknown device {_short(device)} "
                          f"(known: {', '.join(KNOWN_DEVICES)})")
    if slot == 0 and device != HOSTBRIDGE:
        raise ConfigError(f"{where} {shown}: slot 0 is reserved for the host bridge")
    if device == HOSTBRIDGE and (slot, function) != (0, 0):
        raise ConfigError(f"{where} {shown}: the host bridge is always at slot 0:0")
    if device in (HOSTBRIDGE, "lpc") and args:
        raise ConfigError(f"{where} {shown}: {device} takes no arguments")
    try:
        _check_device_args(device, args)
    except OptionError as exc:
        raise ConfigError(f"{where} {shown}: {exc}") from None
    return SlotConfig(slot, function, device, args)


def _check_blk(args) -> None:
    if not args:
        raise OptionError("disk image: missing path")
    opts = blkopts.parse(args)
    blkopts.check_image(opts.path, opts.read_only, opts.image_format)


def _check_net(args) -> None:
    netopts.check_backend(netopts.parse(args))


# device -> the check of its slot arguments: the device's own option parser (devopts),
# plus what vmmd can see of the host resources they name. A new device (or option)
# goes into devopts and, for a new kind, one row here.
DEVICE_ARG_CHECKS = {
    "virtio-blk": _check_blk,
    "virtio-net": _check_net,
    "virtio-balloon": balloonopts.parse,
}


def _check_device_args(device: str, args: tuple[str, ...]) -> None:
    check = DEVICE_ARG_CHECKS.get(device)
    if check is not None:
        check(list(args))


def parse_console(text: str, where: str = "-l") -> tuple[str, str]:
    """'com1,stdio' / 'com2,file,PATH' / 'com2,socket,PATH' / 'com1,null' -> (port, backend spec)."""
    shown = _short(text, 60)
    port, _, spec = text.partition(",")
    port = port.lower()
    if port not in CONSOLE_PORTS:
        raise ConfigError(f"{where} {shown}: unknown port {_short(port)} (choose from {', '.join(CONSOLE_PORTS)})")
    backend, *args = spec.split(",")
    if backend not in CONSOLE_BACKENDS:
        raise ConfigError(f"{where} {shown}: unknown backend {_short(backend)} "
                          f"(choose from {', '.join(CONSOLE_BACKENDS)})")
    if len(args) != CONSOLE_BACKENDS[backend] or any(a == "" for a in args):
        usage = f"{port},{backend}" + (",PATH" if CONSOLE_BACKENDS[backend] else "")
        raise ConfigError(f"{where} {shown}: expected {usage}")
    if backend == "socket" and len(os.fsencode(args[0])) > SUN_PATH_MAX:
        raise ConfigError(f"{where} {shown}: socket path longer than {SUN_PATH_MAX} bytes")
    try:
        consoleopts.check_host(spec)
    except OptionError as exc:
        raise ConfigError(f"{where} {shown}: {exc}") from None
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
    _Opt("kernel", ("--kernel",), (str,), "Linux kernel to boot: an ELF vmlinux or a bzImage", "PATH"),
    _Opt("initrd", ("--initrd",), (str,), "initramfs for --kernel", "PATH"),
    _Opt("cmdline", ("--cmdline",), (str,),
         f"kernel command line (default with --kernel: {DEFAULT_CMDLINE!r}, the console on COM1)", "TEXT"),
    _Opt("raw", ("--raw",), (str,), "raw/ELF test guest to run instead of a kernel", "PATH"),
    _Opt("raw-mode", ("--raw-mode",), (str,), f"CPU mode for --raw: {'|'.join(RAW_MODES)} (default long-cpl3)", "MODE"),
    _Opt("api-socket", ("--api-socket",), (str,), "JSON-RPC control socket path", "PATH"),
    _Opt("no-reboot", ("--no-reboot",), (bool,), "exit instead of rebooting the guest", switch=True),
    _Opt("sandbox", ("--sandbox",), (str,), f"device sandbox: {'|'.join(SANDBOX_MODES)} (default on)", "MODE"),
    _Opt("device-timeout", ("--device-timeout",), (int, float), "seconds to wait for a device reply (default 2.0)", "S"),
    _Opt("device-crash-limit", ("--device-crash-limit",), (str,),
         "N/SECONDS: a device that crashes more than N times within SECONDS is marked failed "
         "and not restarted (default 5/60)", "N/S"),
    _Opt("log-level", ("--log-level",), (str,), f"{'|'.join(LOG_LEVELS)} (default info)", "LEVEL"),
    _Opt("bus-mode", ("--bus-mode",), (str,), f"{'|'.join(BUS_MODES)} (default fast)", "MODE"),
    _Opt("pvm-assists", ("--pvm-assists",), (str,), f"{'|'.join(PVM_ASSISTS)} (default auto)", "MODE"),
    _Opt("api-max-connections", ("--api-max-connections",), (int,),
         f"control connections at once (default {DEFAULT_LIMITS.max_connections})", "N"),
    _Opt("api-idle-timeout", ("--api-idle-timeout",), (int, float),
         f"seconds a control connection may go without a request (default {DEFAULT_LIMITS.idle_timeout:g})", "S"),
    _Opt("api-max-request", ("--api-max-request",), (str, int),
         f"bytes per request line, e.g. 256K (default {DEFAULT_LIMITS.max_request >> 10}K)", "SIZE"),
    _Opt("api-max-batch", ("--api-max-batch",), (int,),
         f"requests per batch (default {DEFAULT_LIMITS.max_batch})", "N"),
    _Opt("api-max-reply", ("--api-max-reply",), (str, int),
         f"bytes per response line, e.g. 4M (default {DEFAULT_LIMITS.max_reply >> 20}M)", "SIZE"),
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


def _json_number(text: str) -> int | float:
    """parse_int/parse_float hook: no 5,000-digit integers, no 1e400 (= inf)."""
    if len(text) > MAX_NUMBER_CHARS:
        raise ValueError(f"number {text[:20]}... is too long")
    value = float(text) if any(c in text for c in ".eE") else int(text)
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"number {text} is out of range")
    return value


def _reject_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not valid JSON")


def _json_depth(text: str) -> int:
    """Deepest [/{ nesting outside strings, found without recursing."""
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def parse_config_text(data: bytes, path: str = "config") -> dict[str, Any]:
    """The bytes of a --config file -> its checked top-level object (ConfigError).

    Sans-I/O so it can be fuzzed directly: ConfigError is its only error."""
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_CONFIG_BYTES} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    if _json_depth(text) > MAX_JSON_DEPTH:
        raise ConfigError(f"{path}: JSON nested deeper than {MAX_JSON_DEPTH} levels")
    try:
        data = json.loads(text, parse_int=_json_number, parse_float=_json_number,
                          parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: invalid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except (ValueError, RecursionError) as exc:
        raise ConfigError(f"{path}: invalid JSON: {_short(str(exc), 80)}") from None
    return _check_file_keys(data, path)


def _load_file(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    return parse_config_text(data, path)


def _check_file_keys(data: Any, path: str) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: must be a JSON object")
    for key, value in data.items():
        opt = _BY_KEY.get(key)
        if opt is None:
            raise ConfigError(f"{path}: unknown key {_short(key)} (known: {', '.join(_BY_KEY)})")
        if not _json_type_ok(opt, value):
            want = "a list of strings" if opt.repeat else " or ".join(_TYPE_NAMES[t] for t in opt.json_types)
            raise ConfigError(f"{path}: {key}: expected {want}, got {_short(json.dumps(value), 60)}")
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
                raise ConfigError(f"{where} {_short(text, 60)}: {_describe_key(what, k)} given twice")
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
    device_crash_limit = scalar("device-crash-limit", _crash_limit, (5, 60.0))
    no_reboot = bool(scalar("no-reboot", lambda v, w: v, False))
    d = DEFAULT_LIMITS
    api_limits = ApiLimits(
        max_connections=scalar("api-max-connections", lambda v, w: _int(v, w, 1, MAX_API_CONNECTIONS), d.max_connections),
        idle_timeout=scalar("api-idle-timeout", lambda v, w: _seconds(v, w, 0.1, 86400.0), d.idle_timeout),
        max_request=scalar("api-max-request", lambda v, w: _bytes(v, w, 1 * KiB, 64 * MiB), d.max_request),
        max_batch=scalar("api-max-batch", lambda v, w: _int(v, w, 1, 100000), d.max_batch),
        max_reply=scalar("api-max-reply", lambda v, w: _bytes(v, w, 64 * KiB, 1 * GiB), d.max_reply),
    )

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
        _check_boot_image(_readable_file(kernel, kernel_where), kernel_where, "kernel")
    else:
        _check_boot_image(_readable_file(raw, raw_where), raw_where, "raw")
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
    _check_distinct_paths(api_socket, consoles, slots.values())

    cmdline = get("cmdline")[0]
    if cmdline is None:  # without console= Linux would have no console at all
        cmdline = DEFAULT_CMDLINE if kernel is not None else ""
    if "\0" in cmdline or len(cmdline.encode(errors="surrogateescape")) >= CMDLINE_MAX:
        raise ConfigError(f"--cmdline: longer than {CMDLINE_MAX - 1} bytes or holds a NUL")
    if raw is not None and raw_mode.startswith("long") and memory > MAX_RAW_LONG_MEMORY:
        raise ConfigError(f"--memory: --raw-mode {raw_mode} maps at most "
                          f"{MAX_RAW_LONG_MEMORY // GiB}G of guest RAM")

    return VmConfig(
        cpus=cpus, memory=memory,
        slots=tuple(slots[k] for k in sorted(slots)), consoles=consoles,
        kernel=kernel, initrd=initrd, cmdline=cmdline,
        raw=raw, raw_mode=raw_mode, api_socket=api_socket, no_reboot=no_reboot,
        sandbox=sandbox, device_timeout=device_timeout, device_crash_limit=device_crash_limit,
        log_level=log_level,
        bus_mode=bus_mode, pvm_assists=pvm_assists, api_limits=api_limits,
    )


def _check_socket_path(path: str, where: str) -> None:
    if not path:
        raise ConfigError(f"{where}: empty path")
    if len(os.fsencode(path)) > SUN_PATH_MAX:
        raise ConfigError(f"{where} {_short(path, 60)}: longer than {SUN_PATH_MAX} bytes (a Unix socket limit)")
    parent = os.path.dirname(path) or "."
    if not os.path.isdir(parent):
        raise ConfigError(f"{where} {path}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{where} {path}: directory {parent} is not writable")
    try:
        st = os.lstat(path)
    except OSError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ConfigError(f"{where} {path}: exists and is not a socket; refusing to replace it")


def _check_distinct_paths(api_socket, consoles: dict[str, str], slots) -> None:
    """No two sockets/files vmmd or its devices write may share a path (two read-only
    disks on one image may)."""
    seen: dict[str, tuple[str, bool]] = {}
    named = [("--api-socket", api_socket, True)] if api_socket else []
    named += [(f"-l {port}", spec.partition(",")[2], True) for port, spec in consoles.items()
              if spec.partition(",")[0] in ("file", "socket")]
    named += [(f"-s {s.slot}:{s.function}", s.args[0], "ro" not in s.args[1:])
              for s in slots if s.device == "virtio-blk"]
    for what, path, writes in named:
        key = os.path.realpath(path)
        if key in seen and (writes or seen[key][1]):
            raise ConfigError(f"{what} {path}: already used by {seen[key][0]}")
        seen.setdefault(key, (what, writes))


def _check_boot_image(path: str, where: str, kind: str) -> None:
    """The kernel (ELF vmlinux or bzImage) or raw guest (ELF) must parse, checked before
    anything starts; the loader parses it again when it loads it."""
    from vmmd.boot import BootError, bzimage, elf
    try:
        if os.path.getsize(path) > MAX_BOOT_IMAGE:
            raise ConfigError(f"{where} {path}: larger than {MAX_BOOT_IMAGE >> 20} MiB")
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise ConfigError(f"{where} {path}: {exc.strerror}") from None
    try:
        if kind == "raw" or elf.is_elf(data):
            elf.parse_elf(data)
        elif bzimage.is_bzimage(data):
            bzimage.parse_setup_header(data)
        else:
            raise BootError("neither an ELF vmlinux nor a bzImage")
    except BootError as exc:
        raise ConfigError(f"{where} {path}: {exc}") from None


def error_line(exc: BaseException) -> str:
    """'vmmd: error: ...' as one printable line: a path or value holding a newline
    or other control character is shown escaped, never split across lines."""
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(exc))
    if len(text) > MAX_ERROR_CHARS:   # e.g. argparse quoting a huge stray argument
        text = text[:MAX_ERROR_CHARS - 3] + "..."
    return f"vmmd: error: {text}"


def parse_or_exit(argv: list[str] | None = None) -> VmConfig:
    """parse_args() for main(): on error print 'vmmd: error: ...' and exit 2."""
    try:
        return parse_args(sys.argv[1:] if argv is None else argv)
    except ConfigError as exc:
        print(error_line(exc), file=sys.stderr)
        sys.exit(2)
