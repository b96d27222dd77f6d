"""vmmctl: command-line client for vmmd's JSON-RPC control socket.

    vmmctl --api-socket PATH [--json] [--timeout S] COMMAND [ARGS]

Exit codes: 0 ok, 1 the call returned a JSON-RPC error, 2 usage error,
3 cannot talk to vmmd (no socket, refused, timeout, garbled reply).
A new subcommand is one entry in COMMANDS; a name with a space ("balloon set")
makes a nested subcommand.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from dataclasses import dataclass
from typing import Any, Callable

import vmmd

EXIT_OK, EXIT_RPC_ERROR, EXIT_USAGE, EXIT_NO_CONNECTION = 0, 1, 2, 3
DEFAULT_TIMEOUT = 10.0
RESTORE_TIMEOUT = 300.0
MAX_REPLY = 64 << 20
ENV_SOCKET = "VMMD_API_SOCKET"


class ConnectionFailed(Exception):
    """vmmd could not be reached, or its reply was unusable (exit 3)."""


class RpcError(Exception):
    """vmmd answered with a JSON-RPC error object (exit 1)."""

    def __init__(self, code: int, message: str, data: Any = None):
        super().__init__(f"error {code}: {message}")
        self.code, self.message, self.data = code, message, data


# ---------------------------------------------------------------------------
# Transport: one request line out, one response line back.

def call(path: str, method: str, params: dict | list | None = None,
         timeout: float = DEFAULT_TIMEOUT) -> Any:
    """Call method on the vmmd control socket at path and return its result."""
    request = {"jsonrpc": "2.0", "id": 1, "method": method}
    if params:
        request["params"] = params
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(path)
        except socket.timeout:
            raise ConnectionFailed(f"cannot connect to vmmd API socket {path}: timed out") from None
        except OSError as exc:
            reason = exc.strerror or str(exc)
            raise ConnectionFailed(f"cannot connect to vmmd API socket {path}: {reason}") from None
        try:
            sock.sendall(json.dumps(request).encode() + b"\n")
            reply = _read_line(sock)
        except socket.timeout:
            raise ConnectionFailed(f"no reply from {path} within {timeout:g} s") from None
        except OSError as exc:
            raise ConnectionFailed(f"connection to {path} failed: {exc.strerror or exc}") from None
    finally:
        sock.close()
    if reply is None:
        raise ConnectionFailed(f"{path}: vmmd closed the connection without replying")
    try:
        response = json.loads(reply)
    except ValueError:
        raise ConnectionFailed(f"{path}: reply is not JSON") from None
    if not isinstance(response, dict) or response.get("id") != 1:
        raise ConnectionFailed(f"{path}: reply is not a JSON-RPC response to our request")
    if "error" in response:
        err = response["error"] if isinstance(response["error"], dict) else {}
        raise RpcError(err.get("code", 0), str(err.get("message", "")), err.get("data"))
    return response.get("result")


def _read_line(sock: socket.socket) -> bytes | None:
    buf = bytearray()
    while b"\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            return None
        buf += chunk
        if len(buf) > MAX_REPLY:
            raise ConnectionFailed("reply too long")
    return bytes(buf[:buf.index(b"\n")])


# ---------------------------------------------------------------------------
# Human-readable output

def _say(text: str) -> Callable[[Any], str]:
    return lambda result: text


def _table(header: list[str], rows: list[list[Any]]) -> str:
    cells = [header] + [["-" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells)


def _bytes(n: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift} {unit}"
    return f"{n} bytes"


def _duration(s: float) -> str:
    s = int(s)
    h, rest = divmod(s, 3600)
    m, sec = divmod(rest, 60)
    return f"{h}h{m:02d}m{sec:02d}s" if h else f"{m}m{sec:02d}s" if m else f"{sec}s"


def _show_info(info: dict) -> str:
    lines = []
    for key, value in info.items():
        if key == "memory_bytes" and isinstance(value, int):
            key, value = "memory", _bytes(value)
        elif key == "uptime_s" and isinstance(value, (int, float)):
            key, value = "uptime", _duration(value)
        elif key == "devices" and isinstance(value, list):
            value = ", ".join(f"{d.get('id')} ({d.get('state')})" if isinstance(d, dict) else str(d)
                              for d in value) or "none"
        elif isinstance(value, (dict, list)):
            value = json.dumps(value)
        lines.append(f"{key + ':':<10}{value}")
    return "\n".join(lines)


def _show_devices(devices: list[dict]) -> str:
    cols = ["id", "type", "pid", "state", "restarts", "sandbox"]
    return _table([c.upper() for c in cols], [[d.get(c) for c in cols] for d in devices])


def _show_version(v: dict) -> str:
    return f"vmmd {v.get('version')} (device protocol {v.get('protocol')}), vmmctl {vmmd.__version__}"


def _show_discover(doc: dict) -> str:
    methods = doc.get("methods", [])
    return _table(["METHOD", "SUMMARY"], [[m.get("name"), m.get("summary", "")] for m in methods])


def _show_vcpus(vcpus: list[dict]) -> str:
    def hx(v: Any) -> str:
        return f"{v:#x}" if isinstance(v, int) else str(v)
    rows = [[v.get("index"), hx(v.get("rip")), hx(v.get("rsp")), hx(v.get("rflags")), hx(v.get("cr3")),
             hx(v.get("cs")), v.get("cpl"), v.get("mp_state"),
             " ".join(f"{k}={n}" for k, n in {**v.get("exits", {}), **v.get("assists", {})}.items()) or "-"]
            for v in vcpus]
    return _table(["VCPU", "RIP", "RSP", "RFLAGS", "CR3", "CS", "CPL", "MP", "EXITS/ASSISTS"], rows)


def _show_json(result: Any) -> str:
    return json.dumps(result, indent=2)


# ---------------------------------------------------------------------------
# Subcommands

@dataclass(frozen=True)
class Arg:
    name: str
    help: str
    type: Callable[[str], Any] = str
    nargs: str | None = None
    metavar: str | None = None       # default: NAME upper-cased


@dataclass(frozen=True)
class Command:
    name: str                                   # "info", or "balloon set" (nested)
    help: str
    method: str | Callable[[argparse.Namespace], str]
    args: tuple[Arg, ...] = ()
    params: Callable[[argparse.Namespace], dict | list | None] = lambda a: None
    show: Callable[[Any], str] = _show_json
    flags: tuple[tuple[tuple[str, ...], dict], ...] = ()   # optional --flags: (spellings, add_argument kwargs)
    run: Callable[[argparse.Namespace, str, str, Any], Any] | None = None  # custom call (path, method, params)


def _snapshot_with_progress(args: argparse.Namespace, path: str, method: str, params: Any) -> Any:
    """snapshot.create on one connection; vm.info's progress polled on another, one line on stderr."""
    import threading
    box: dict = {}

    def work():
        try:
            box["result"] = call(path, method, params, max(args.timeout, 600.0))
        except BaseException as exc:  # re-raised in the main thread
            box["error"] = exc

    t = threading.Thread(target=work, daemon=True)
    t.start()
    shown = False
    while t.is_alive():
        t.join(0.2)
        if not t.is_alive():
            break
        try:
            snap = call(path, "vm.info", None, 2.0).get("snapshot")
        except (ConnectionFailed, RpcError, AttributeError):
            snap = None
        if snap:
            total = snap.get("bytes_total") or 1
            done = snap.get("bytes_done") or 0
            sys.stderr.write(f"\rsnapshot {snap.get('phase', '?'):>8}: {100 * done // total:3d}% "
                             f"({done >> 20}/{total >> 20} MiB)")
            sys.stderr.flush()
            shown = True
    if shown:
        sys.stderr.write("\n")
    if "error" in box:
        raise box["error"]
    return box["result"]


def _show_snapshot(r: dict) -> str:
    lines = [f"snapshot {r.get('type')} {r.get('id')} written to {r.get('path')}: "
             f"{_bytes(r.get('ram_bytes_written', 0))} of RAM, VM paused {r.get('paused_ms')} ms, "
             f"now {r.get('state')}" + ("" if r.get("synced", True) else " (not fsynced)")]
    for inst, d in sorted((r.get("disks") or {}).items()):
        if d.get("mode") == "overlay":
            lines.append(f"disk {inst}: {d.get('frozen')} frozen for the snapshot, writes go to {d.get('now')}")
        else:
            lines.append(f"disk {inst}: {d.get('frozen')} ({d.get('mode')}) recorded")
    return "\n".join(lines)


def _migration_line(st: dict) -> str:
    rem = st.get("remaining_dirty_bytes")
    return (f"migration {st.get('state', '?'):>10}: pass {st.get('iteration', 0)}, "
            f"sent {_bytes(st.get('bytes_sent') or 0)}, dirty {'-' if rem is None else _bytes(rem)}, "
            f"{st.get('bandwidth_mibs') or 0} MiB/s, dirtying {st.get('dirty_rate_mibs') or 0} MiB/s, "
            f"throttle {st.get('throttle_pct', 0)}%, expected downtime {st.get('expected_downtime_ms') or '-'} ms")


def _migrate(args: argparse.Namespace, path: str, method: str, params: Any) -> Any:
    """migration.start; with --wait, migration.status polled into one progress line
    until it ends (the source vmmd exits after a completed migration)."""
    st = call(path, method, params, args.timeout)
    if not args.wait:
        return st
    import time
    while st.get("state") in ("setup", "active", "switchover"):
        sys.stderr.write("\r" + _migration_line(st))
        sys.stderr.flush()
        time.sleep(0.2)
        try:
            st = call(path, "migration.status", None, 5.0)
        except ConnectionFailed:
            if st.get("state") == "switchover":  # the source exited: the destination took over
                st = dict(st, state="completed")
            break
    sys.stderr.write("\r" + _migration_line(st) + "\n")
    if st.get("state") != "completed":
        raise RpcError(-32000, f"migration {st.get('state')}: {st.get('error')}")
    return st


def _show_migration(st: dict) -> str:
    if st.get("state") == "completed":
        return (f"migration completed: downtime {st.get('downtime_ms')} ms, {st.get('iteration')} passes, "
                f"{_bytes(st.get('bytes_sent') or 0)} sent in {st.get('total_ms')} ms")
    return f"migration {st.get('state')} to {st.get('uri')}"


def _restore_params(a: argparse.Namespace) -> dict:
    """`vmmctl restore` -> snapshot.restore's params (vmmd checks them as `vmmd --restore` would);
    paths made absolute, since vmmd does not share our working directory."""
    params: dict[str, Any] = {"path": os.path.abspath(a.dir)}
    if a.clock:
        params["clock"] = a.clock
    if a.paused:
        params["paused"] = True
    for key, items, is_path in (("disks", a.disk, True), ("nets", a.net, False)):
        pairs = [text.partition("=")[::2] for text in items]
        if pairs:
            params[key] = {slot: os.path.abspath(v) if is_path and v else v for slot, v in pairs}
    consoles = {}
    for text in a.console:
        port, _, spec = text.partition(",")
        kind, sep, target = spec.partition(",")
        consoles[port] = f"{kind},{os.path.abspath(target)}" if sep and kind in ("file", "socket") else spec
    if consoles:
        params["consoles"] = consoles
    if a.sandbox:
        params["sandbox"] = a.sandbox
    if a.device_timeout is not None:
        params["device_timeout"] = a.device_timeout
    return params


def _show_restore(r: dict) -> str:
    return (f"restored: vCPUs {r.get('state')} {r.get('total_ms', 0):.1f} ms after the call "
            f"(checks {r.get('checks_ms', 0):.1f}, RAM {r.get('ram_ms', 0):.1f}, "
            f"device processes {r.get('devices_started_ms', 0):.1f}, device states "
            f"{r.get('device_states_ms', 0):.1f}, KVM {r.get('kvm_ms', 0):.1f} ms)")


def _json_params(text: str | None) -> dict | list | None:
    if text is None:
        return None
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON: {exc}") from None
    if not isinstance(value, (dict, list)):
        raise argparse.ArgumentTypeError("must be a JSON object or array")
    return value


def _link_state(text: str) -> bool:
    if text not in ("up", "down"):
        raise argparse.ArgumentTypeError(f"must be 'up' or 'down', not {text!r}")
    return text == "up"


COMMANDS: list[Command] = [
    Command("info", "show the VM's state", "vm.info", show=_show_info),
    Command("pause", "pause all vCPUs", "vm.pause", show=_say("paused")),
    Command("resume", "resume the vCPUs", "vm.resume", show=_say("resumed")),
    Command("reset", "reset the VM", "vm.reset", show=_say("reset")),
    Command("shutdown", "shut the VM down", "vm.shutdown", show=_say("shut down")),
    Command("devices", "list device processes", "device.list", show=_show_devices),
    Command("device-restart", "restart one device process", "device.restart",
            args=(Arg("id", "device id (see 'devices')"),),
            params=lambda a: {"id": a.id}, show=_say("restarted")),
    Command("device-stats", "show one device's counters", "device.stats",
            args=(Arg("id", "device id (see 'devices')"),),
            params=lambda a: {"id": a.id}, show=_show_json),
    Command("device-link", "set a network device's link up or down", "device.set_link",
            args=(Arg("id", "device id (see 'devices')"), Arg("state", "up or down", _link_state)),
            params=lambda a: {"id": a.id, "up": a.state},
            show=lambda r: f"link {'up' if r.get('up') else 'down'} (was {'up' if r.get('was_up') else 'down'})"),
    Command("debug-vcpus", "pause briefly and show every vCPU's registers", "debug.vcpus",
            show=_show_vcpus),
    Command("version", "show vmmd's version", "vmm.version", show=_show_version),
    Command("discover", "list the API's methods (OpenRPC)", "rpc.discover", show=_show_discover),
    Command("balloon set", "set the balloon target (MiB taken from the guest)", "balloon.set",
            args=(Arg("size_mib", "balloon size in MiB", int, metavar="MiB"),),
            params=lambda a: {"size_mib": a.size_mib},
            show=lambda r: f"balloon target {r.get('target_mib')} MiB (now {r.get('actual_mib')} MiB)"),
    Command("balloon info", "show the balloon's target, size, guest stats and reclaimed memory",
            "balloon.info", show=_show_info),
    Command("snapshot", "save the VM to a directory (resumes it unless --stop)", "snapshot.create",
            args=(Arg("dir", "new or empty directory for the snapshot", metavar="DIR"),),
            flags=((("--stop",), {"action": "store_true", "help": "leave the VM paused afterwards"}),
                   (("--diff-from",), {"metavar": "DIR", "help": "only pages dirtied since this snapshot"}),
                   (("--disks",), {"choices": ("shared", "overlay"),
                                   "help": "overlay: each qcow2 disk switches to a new overlay, the "
                                           "snapshot keeps the image as it was (default shared)"}),
                   (("--no-sync",), {"action": "store_true",
                                     "help": "reply once the snapshot is in the page cache, without fsync "
                                             "(a crash may tear it; restore then refuses it)"})),
            params=lambda a: {"path": os.path.abspath(a.dir), "resume": not a.stop,
                              **({"sync": False} if a.no_sync else {}),
                              **({"diff_from": os.path.abspath(a.diff_from)} if a.diff_from else {}),
                              **({"disks": a.disks} if a.disks else {})},
            run=_snapshot_with_progress, show=_show_snapshot),
    Command("restore", "restore a snapshot into a waiting `vmmd --restore-wait`", "snapshot.restore",
            args=(Arg("dir", "snapshot directory", metavar="DIR"),),
            flags=((("--clock",), {"choices": ("advance", "freeze"), "help": "guest clock (default advance)"}),
                   (("--paused",), {"action": "store_true", "help": "leave the vCPUs paused"}),
                   (("--disk",), {"action": "append", "default": [], "metavar": "SLOT=PATH"}),
                   (("--net",), {"action": "append", "default": [], "metavar": "SLOT=tap=NAME|socket=PATH"}),
                   (("-l", "--console"), {"action": "append", "default": [], "metavar": "SPEC",
                                          "help": "com1|com2,stdio|null|file,PATH|socket,PATH"}),
                   (("--sandbox",), {"choices": ("on", "log", "off")}),
                   (("--device-timeout",), {"type": float, "metavar": "S"})),
            params=lambda a: _restore_params(a), show=_show_restore,
            # A big snapshot's RAM takes a while to load and check: at least RESTORE_TIMEOUT.
            run=lambda a, path, method, params: call(path, method, params, max(a.timeout, RESTORE_TIMEOUT))),
    Command("migrate", "live-migrate the VM to a `vmmd --incoming URI` destination", "migration.start",
            args=(Arg("uri", "unix:PATH or tcp:HOST:PORT", metavar="URI"),),
            flags=((("--wait",), {"action": "store_true", "help": "show progress until it ends"}),
                   (("--downtime-ms",), {"type": float, "help": "allowed downtime (default 300)"}),
                   (("--max-bandwidth",), {"type": float, "metavar": "MiB/s", "help": "bandwidth limit"}),
                   (("--no-auto-converge",), {"action": "store_true", "help": "never throttle the vCPUs"}),
                   (("--migration-timeout",), {"type": float, "metavar": "S", "help": "give up after S seconds"}),
                   (("--insecure",), {"action": "store_true", "help": "allow plain TCP to another host"}),
                   (("--tls",), {"nargs": 3, "metavar": ("CERT", "KEY", "CA"), "help": "mutual TLS"})),
            params=lambda a: {"uri": a.uri, "auto_converge": not a.no_auto_converge,
                              **({"downtime_ms": a.downtime_ms} if a.downtime_ms else {}),
                              **({"max_bandwidth_mibs": a.max_bandwidth} if a.max_bandwidth else {}),
                              **({"timeout_s": a.migration_timeout} if a.migration_timeout else {}),
                              **({"insecure": True} if a.insecure else {}),
                              **({"tls": dict(zip(("cert", "key", "ca"), map(os.path.abspath, a.tls)))}
                                 if a.tls else {})},
            run=_migrate, show=_show_migration),
    Command("migration-status", "show the current or last migration", "migration.status",
            show=lambda st: _migration_line(st) + (f"\nerror: {st['error']}" if st.get("error") else "")),
    Command("migration-cancel", "cancel the running migration (the VM runs on here)", "migration.cancel",
            show=lambda st: f"migration {st.get('state')}"),
    Command("call", "call any method", lambda a: a.method_name,
            args=(Arg("method_name", "JSON-RPC method name", metavar="METHOD"),
                  Arg("params_json", "params as a JSON object or array", _json_params, "?")),
            params=lambda a: a.params_json),
]


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text!r}")
    return value


def _add_common(p: argparse.ArgumentParser, top: bool) -> None:
    # Also accepted after the subcommand; there SUPPRESS keeps the top-level value.
    d = (lambda v: v) if top else (lambda v: argparse.SUPPRESS)
    p.add_argument("--api-socket", metavar="PATH", default=d(None),
                   help=f"vmmd control socket (default: ${ENV_SOCKET})")
    p.add_argument("--json", action="store_true", default=d(False),
                   help="print the raw JSON result")
    p.add_argument("--timeout", metavar="S", type=_positive_float, default=d(DEFAULT_TIMEOUT),
                   help=f"seconds to wait for vmmd (default {DEFAULT_TIMEOUT:g})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vmmctl", description="Control a running vmmd.")
    parser.add_argument("--version", action="version", version=f"vmmctl {vmmd.__version__}")
    _add_common(parser, top=True)
    groups: dict[str, argparse._SubParsersAction] = {
        "": parser.add_subparsers(dest="command", metavar="COMMAND", required=True)}
    for cmd in COMMANDS:
        *path, leaf = cmd.name.split()
        prefix = ""
        for part in path:  # create the group parsers of a nested name on first use
            key = f"{prefix} {part}".strip()
            if key not in groups:
                gp = groups[prefix].add_parser(part, help=f"{part} commands")
                groups[key] = gp.add_subparsers(dest=f"sub_{key.replace(' ', '_')}", metavar="COMMAND", required=True)
            prefix = key
        sp = groups[prefix].add_parser(leaf, help=cmd.help, description=cmd.help)
        for arg in cmd.args:
            sp.add_argument(arg.name, help=arg.help, type=arg.type, nargs=arg.nargs,
                            metavar=arg.metavar or arg.name.upper())
        for spellings, kwargs in cmd.flags:
            sp.add_argument(*spellings, **kwargs)
        _add_common(sp, top=False)
        sp.set_defaults(cmd=cmd)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    path = args.api_socket or os.environ.get(ENV_SOCKET)
    if not path:
        parser.error(f"no control socket: use --api-socket PATH or set {ENV_SOCKET}")
    cmd: Command = args.cmd
    method = cmd.method(args) if callable(cmd.method) else cmd.method
    try:
        if cmd.run is not None:
            result = cmd.run(args, path, method, cmd.params(args))
        else:
            result = call(path, method, cmd.params(args), args.timeout)
    except ConnectionFailed as exc:
        print(f"vmmctl: {exc}", file=sys.stderr)
        return EXIT_NO_CONNECTION
    except RpcError as exc:
        print(f"error {exc.code}: {exc.message}", file=sys.stderr)
        if exc.data is not None:
            print(f"data: {json.dumps(exc.data)}", file=sys.stderr)
        return EXIT_RPC_ERROR
    print(json.dumps(result) if args.json else cmd.show(result))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
