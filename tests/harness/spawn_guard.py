"""Run `vmmd` (vmmd.cli.main) with every way of starting a process refused.

    python -m tests.harness.spawn_guard ARGS...

Used by the bad-invocation tests: a rejected command line must end before any
process starts, so here a spawn attempt writes "SPAWNED <how>" to stderr and
exits 99 instead of starting anything.
"""

from __future__ import annotations

import os
import subprocess
import sys


def _refuse(how: str):
    def refused(*_a, **_k):
        os.write(2, f"SPAWNED {how}\n".encode())
        os._exit(99)
    return refused


def install() -> None:
    subprocess.Popen.__init__ = _refuse("subprocess.Popen")
    for name in ("fork", "forkpty", "posix_spawn", "posix_spawnp", "execv", "execve", "system"):
        if hasattr(os, name):
            setattr(os, name, _refuse(f"os.{name}"))


if __name__ == "__main__":
    install()
    from vmmd.cli import main
    sys.exit(main(sys.argv[1:]))
