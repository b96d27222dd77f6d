"""vmmd's configuration parser (vmmd/config.py): a --config file's bytes, and command
lines built from the input (split at NUL bytes) through parse_args.

Defined error: ConfigError (becomes `vmmd: error: ...`, exit 2). Oracles: an accepted
configuration has its values in range; error messages are one short line.
"""

from vmmd import config

EXPECTED = ()
_NO_EXIT = {"-h", "--help", "--version"}   # argparse prints and exits 0 for these


def _check_error(exc: config.ConfigError) -> None:
    line = config.error_line(exc)
    assert line.isprintable(), line[:200]          # one line on stderr, whatever the input
    assert len(line) < 600, (len(line), line[:200])  # short values, not 5,000 digits


def one_input(data: bytes) -> None:
    if data[:1] == b"{" or data[:1] == b"[":
        try:
            config.parse_config_text(data, "fuzz.json")
        except config.ConfigError as exc:
            _check_error(exc)
        return
    argv = [a.decode("utf-8", "surrogateescape") for a in data.split(b"\0")]
    if _NO_EXIT & set(argv):
        return
    try:
        cfg = config.parse_args(argv)
    except config.ConfigError as exc:
        _check_error(exc)
        return
    assert 1 <= cfg.cpus <= config.MAX_CPUS
    assert config.MIN_MEMORY <= cfg.memory <= config.MAX_MEMORY
    assert config.MIN_DEVICE_TIMEOUT <= cfg.device_timeout <= config.MAX_DEVICE_TIMEOUT
