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
from vmmd.snapshot.format import SnapshotError


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
    from vmmd.api.server import serve
    from vmmd.machine import Machine

    machine = Machine(cfg, memory=prepared.memory if prepared else None, restore=prepared)
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


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    prepared = None
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
    try:
        with raw_terminal(stdio_console):
            code = uvloop.run(_serve(cfg, prepared))
    except SystemExit:
        raise
    except SnapshotError as exc:  # refused by a device or KVM while restoring: torn down, nothing ran
        print(f"vmmd: error: {exc}", file=sys.stderr)
        code = 2
    except Exception as exc:
        logging.getLogger("vmmd").error("%s", exc, exc_info=logging.getLogger().isEnabledFor(logging.DEBUG))
        code = 1
    return code


if __name__ == "__main__":
    sys.exit(main())
