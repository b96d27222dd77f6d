"""The `vmmd` command: parse the configuration, run the VM, serve the API."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
import signal
import stat
import sys
import termios
import tty

from vmmd.config import ConfigError, error_line, parse_or_exit

from vmmd.snapshot.format import SnapshotError


def raise_nofile_limit() -> tuple[int, int]:
    """RLIMIT_NOFILE soft -> hard: the control socket's connection cap leaves the
    rest of the descriptors to devices and their restarts (docs: control socket limits)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


@contextlib.contextmanager
def raw_terminal(enabled: bool):
    """Put the terminal in raw mode while a guest console owns it (like QEMU's -serial stdio)."""
    if not enabled or not os.isatty(0):
        yield
        return
    saved = termios.tcgetattr(0)
    try:
        tty.setraw(0)
        yield
    finally:
        termios.tcsetattr(0, termios.TCSADRAIN, saved)


async def _serve(cfg, prepared=None) -> int:
    from vmmd.api.jsonrpc import Dispatcher
    from vmmd.api.methods import build_registry
    from vmmd.api.server import ServeError, serve
    from vmmd.machine import Machine

    machine = Machine(cfg, memory=prepared.memory if prepared else None, restore=prepared)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, machine._finish, 0)
    server = None
    ran = False
    try:
        if cfg.api_socket:
            try:
                limits = cfg.api_limits.fitted_to(resource.getrlimit(resource.RLIMIT_NOFILE)[0])
                if limits != cfg.api_limits:
                    logging.getLogger("vmmd").warning(
                        "control socket: at most %d connections (RLIMIT_NOFILE leaves no more)",
                        limits.max_connections)
                dispatcher = Dispatcher(build_registry(machine), max_batch=limits.max_batch,
                                        max_reply=limits.max_reply)
                server = await serve(cfg.api_socket, dispatcher, limits=limits)
            except ServeError as exc:   # before any device starts: a usage error
                raise ConfigError(f"--api-socket: {exc}") from None
        ran = True
        return await machine.run()
    finally:
        if server is not None:
            server.close()
            with contextlib.suppress(Exception):
                await server.wait_closed()
        if ran:   # else the sockets at those paths are not ours (e.g. another vmmd's)
            remove_console_sockets(cfg)


def remove_console_sockets(cfg) -> None:
    """The lpc binds its console sockets but cannot unlink them from inside its jail;
    vmmd, which named them, removes them when the VM ends."""
    for spec in dict(cfg.consoles).values():
        kind, _, path = spec.partition(",")
        if kind != "socket":
            continue
        with contextlib.suppress(OSError):
            if stat.S_ISSOCK(os.lstat(path).st_mode):
                os.unlink(path)


def _restore_or_exit(argv: list[str]):
    """`vmmd --restore DIR ...`: the restore command line and the whole snapshot,
    checked before anything starts (vmmd/snapshot/restore.py)."""
    import time
    entered = time.monotonic()
    from vmmd.config import ConfigError
    from vmmd.snapshot import restore
    from vmmd.snapshot.format import SnapshotError
    try:
        req = restore.parse_restore_args(argv)
        prepared = restore.prepare(req)
    except (ConfigError, SnapshotError) as exc:
        print(f"vmmd: error: {exc}", file=sys.stderr)
        sys.exit(2)
    except OSError as exc:
        print(f"vmmd: error: snapshot: {exc}", file=sys.stderr)
        sys.exit(2)
    prepared.timings["main_at"] = entered
    return prepared.cfg, prepared


def _wait_or_exit(argv: list[str]):
    """`vmmd --restore-wait --api-socket S ...` (vmmd/restore_wait.py)."""
    from vmmd.restore_wait import parse_wait_args
    try:
        return parse_wait_args(argv)
    except ConfigError as exc:
        print(error_line(exc), file=sys.stderr)
        sys.exit(2)


def _main_waiting(wcfg) -> int:
    from vmmd.restore_wait import serve_waiting
    logging.basicConfig(
        level=getattr(logging, wcfg.log_level.upper(), logging.INFO),
        format="vmmd %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    raise_nofile_limit()
    import uvloop
    try:
        return uvloop.run(serve_waiting(wcfg))
    except ConfigError as exc:   # /dev/kvm or the API socket: before anything started
        print(error_line(exc), file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    prepared = None
    if "--restore-wait" in argv:
        return _main_waiting(_wait_or_exit(argv))
    if any(a == "--incoming" or a.startswith("--incoming=") for a in argv):
        from vmmd.migration.incoming import prepare_or_exit  # live migration's destination
        cfg, prepared = prepare_or_exit(argv)
    elif any(a == "--restore" or a.startswith("--restore=") for a in argv):
        cfg, prepared = _restore_or_exit(argv)
    else:
        cfg = parse_or_exit(argv)
    logging.basicConfig(
        level=getattr(logging, cfg.log_level.upper(), logging.INFO),
        format="vmmd %(levelname)s %(name)s: %(message)s\r" if os.isatty(2) else "vmmd %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr)
    stdio_console = "stdio" in dict(cfg.consoles).values()
    raise_nofile_limit()
    import uvloop   # here, not at the top: a rejected command line exits before asyncio loads
    try:
        with raw_terminal(stdio_console):
            code = uvloop.run(_serve(cfg, prepared))
    except SystemExit:
        raise
    except ConfigError as exc:   # found while setting up, before any device process
        print(error_line(exc), file=sys.stderr)
        if hasattr(prepared, "discard_overlays"):
            prepared.discard_overlays()
        return 2
    except SnapshotError as exc:  # refused by a device or KVM while restoring: torn down, nothing ran
        print(error_line(exc), file=sys.stderr)
        if hasattr(prepared, "discard_overlays"):
            prepared.discard_overlays()
        code = 2
    except Exception as exc:
        logging.getLogger("vmmd").error("%s", exc, exc_info=logging.getLogger().isEnabledFor(logging.DEBUG))
        code = 1
    return code


if __name__ == "__main__":
    sys.exit(main())
