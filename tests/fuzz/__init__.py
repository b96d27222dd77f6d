"""Coverage-guided fuzz targets (atheris) for vmmd's parsers of hostile input.

One module per target, `fuzz_<name>.py`, each with:

    EXPECTED     the exceptions that are the parser's defined errors
                 (anything else escaping one_input is a crash)
    one_input    bytes -> None; runs the parser and asserts on what it returns

Run one with `scripts/fuzz NAME [SECONDS]` (docs/fuzzing.md); the test suite
runs each for a bounded number of inputs (tests/fuzz/test_fuzz_targets.py).
"""

TARGETS = ("bus", "virtqueue", "blk_request", "net", "jsonrpc", "config")
