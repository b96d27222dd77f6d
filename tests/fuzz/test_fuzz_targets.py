"""A short, deterministic run of every fuzz target (longer runs: scripts/fuzz TARGET SECONDS).

Each target first replays its regression inputs (tests/fuzz/regressions/TARGET/,
the crashes fuzzing found, each fixed), then fuzzes RUNS more inputs from a fixed
seed. A crash (an exception outside the target's EXPECTED, or a failed oracle)
fails the test with atheris' traceback and the input.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.fuzz import TARGETS

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RUNS = 2000

pytest.importorskip("atheris", reason="atheris is a test dependency (pyproject.toml [test])")


@pytest.mark.parametrize("target", TARGETS)
def test_fuzz_target_short_run(target, tmp_path):
    corpus = tmp_path / "corpus"          # new inputs go here, not into the repository
    corpus.mkdir()
    regressions = os.path.join(REPO, "tests", "fuzz", "regressions", target)
    dirs = [str(corpus)] + ([regressions] if os.path.isdir(regressions) else [])
    r = subprocess.run(
        [sys.executable, "-m", "tests.fuzz.run", target, f"-runs={RUNS}", "-seed=1",
         "-max_len=4096", f"-artifact_prefix={tmp_path}/", *dirs],
        cwd=REPO, capture_output=True, text=True, timeout=900)
    tail = (r.stdout + r.stderr)[-6000:]
    assert r.returncode == 0, tail
    assert f"Done {RUNS} runs" in r.stderr or "DONE" in r.stderr, tail
    assert not [p for p in os.listdir(tmp_path) if p.startswith(("crash-", "leak-", "timeout-"))], tail
