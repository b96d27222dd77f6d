"""scripts/lab: the nested test lab (a hardware-style /dev/kvm under QEMU TCG).

    scripts/lab build [--json]                 fetch and cache the L1 kernel
    scripts/lab run [OPTIONS] [-i] [--] CMD [ARGS]
                                               run CMD as root inside, in this
                                               directory; exit with its status
                                               (-i: this terminal is its stdin)
    scripts/lab shell [OPTIONS]                an interactive shell inside
OPTIONS: --memory SIZE (4G)  --cpus N (1)  --timeout SECONDS (3600)
         --console-log PATH (default: under the lab cache, printed on failure)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tests.lab import artifacts
from tests.lab.artifacts import LabError
from tests.lab.launcher import EXIT_LAB_FAILED, LabOptions, launch


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="scripts/lab", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="verb", required=True)
    b = sub.add_parser("build", help="fetch and cache the L1 kernel")
    b.add_argument("--json", action="store_true")
    for name in ("run", "shell"):
        s = sub.add_parser(name)
        s.add_argument("--memory", default="4G")
        s.add_argument("--cpus", type=int, default=1)
        s.add_argument("--timeout", type=float, default=3600.0)
        s.add_argument("--console-log", type=Path)
        if name == "run":
            s.add_argument("-i", "--interactive", action="store_true",
                           help="connect this terminal to the command's stdin")
            s.add_argument("command", nargs=argparse.REMAINDER)
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.verb == "build":
            return artifacts.main_build(args.json)
        art = artifacts.build(log=lambda m: print(m, file=sys.stderr))
        opts = LabOptions(memory=args.memory, cpus=args.cpus, timeout=args.timeout,
                          console_log=args.console_log)
        if args.verb == "shell":
            return launch(art, opts, None, interactive=True)
        command = args.command[1:] if args.command[:1] == ["--"] else args.command
        if not command:
            print("lab: error: run needs a command", file=sys.stderr)
            return 2
        return launch(art, opts, command, interactive=args.interactive)
    except LabError as e:
        print(f"lab: error: {e}", file=sys.stderr)
        return EXIT_LAB_FAILED


if __name__ == "__main__":
    sys.exit(main())
