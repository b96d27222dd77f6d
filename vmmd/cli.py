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


async def _serve(cfg) -> int:
    from vmmd.api.jsonrpc import Dispatcher
    from vmmd.api.methods import build_registry
    from vmmd.api.server import ServeError, serve
    from vmmd.machine import Machine

    machine = Machine(cfg)
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


def main(argv: list[str] | None = None) -> int:
    cfg = parse_or_exit(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(
        level=getattr(logging, cfg.log_level.upper(), logging.INFO),
        format="vmmd %(levelname)s %(name)s: %(message)s\r" if os.isatty(2) else "vmmd %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr)
    stdio_console = "stdio" in dict(cfg.consoles).values()
    raise_nofile_limit()
    import uvloop   # here, not at the top: a rejected command line exits before asyncio loads
    try:
        with raw_terminal(stdio_console):
            code = uvloop.run(_serve(cfg))
    except SystemExit:
        raise
    except ConfigError as exc:   # found while setting up, before any device process
        print(error_line(exc), file=sys.stderr)
        return 2
    except Exception as exc:
        logging.getLogger("vmmd").error("%s", exc, exc_info=logging.getLogger().isEnabledFor(logging.DEBUG))
        code = 1
    return code


if __name__ == "__main__":
    sys.exit(main())
