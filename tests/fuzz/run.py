"""Run one fuzz target under atheris/libFuzzer.

    python -m tests.fuzz.run TARGET [libFuzzer options...] [CORPUS_DIR...]

e.g. `-runs=2000 -seed=1` (a bounded run) or `-max_total_time=300 DIR`.
The code under test is imported with coverage instrumentation; an exception
outside the target's EXPECTED tuple is a crash (atheris prints it and exits 1).
"""

from __future__ import annotations

import importlib
import os
import sys

import atheris

INSTRUMENTED = ("bus", "devices", "devopts", "vmmd")
CRASH_DIR = os.environ.get("VMMD_FUZZ_CRASHES", "/tmp/vmmd-fuzz-crashes")


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1].startswith("-"):
        sys.exit("usage: python -m tests.fuzz.run TARGET [libFuzzer options...]")
    name = sys.argv.pop(1)
    with atheris.instrument_imports(include=list(INSTRUMENTED)):
        target = importlib.import_module(f"tests.fuzz.fuzz_{name}")
    expected = target.EXPECTED

    def test_one_input(data: bytes) -> None:
        try:
            target.one_input(data)
        except expected:
            pass

    if not any(a.startswith("-artifact_prefix=") for a in sys.argv):
        os.makedirs(CRASH_DIR, exist_ok=True)      # not the current directory
        sys.argv.append(f"-artifact_prefix={CRASH_DIR}/{name}-")
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
