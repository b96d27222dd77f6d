"""The `vmmd` command: parse the configuration, run the VM, serve the API."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import termios
import tty

import uvloop

from vmmd.config import parse_or_exit


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
    from vmmd.api.server import serve
    from vmmd.machine import Machine

    machine = Machine(cfg)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, machine._finish, 0)
    server = None
    if cfg.api_socket:
        server = await serve(cfg.api_socket, Dispatcher(build_registry(machine)))
    try:
        return await machine.run()
    finally:
        if server is not None:
            server.close()
            with contextlib.suppress(Exception):
                await server.wait_closed()


def main(argv: list[str] | None = None) -> int:
    cfg = parse_or_exit(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(
        level=getattr(logging, cfg.log_level.upper(), logging.INFO),
        format="vmmd %(levelname)s %(name)s: %(message)s\r" if os.isatty(2) else "vmmd %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr)
    stdio_console = "stdio" in dict(cfg.consoles).values()
    try:
        with raw_terminal(stdio_console):
            code = uvloop.run(_serve(cfg))
    except SystemExit:
        raise
    except Exception as exc:
        logging.getLogger("vmmd").error("%s", exc, exc_info=logging.getLogger().isEnabledFor(logging.DEBUG))
        code = 1
    return code


if __name__ == "__main__":
    sys.exit(main())
