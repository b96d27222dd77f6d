"""Serial console backends: `null`, `stdio`, `file,PATH`, `socket,PATH` (the lpc's COM1/COM2),
and vmmd's checks of their paths before anything starts."""

from __future__ import annotations

import os
import stat

from devopts import OptionError, shorten

SUN_PATH_MAX = 107
BACKENDS = {"null": 0, "stdio": 0, "file": 1, "socket": 1}   # -> number of arguments


def parse_spec(spec: str) -> tuple[str, str | None]:
    """"kind" or "kind,PATH" -> (kind, path); ValueError on anything else."""
    if not isinstance(spec, str) or not spec:
        raise OptionError(f"console backend spec must be a non-empty string, got {shorten(spec)}")
    kind, sep, arg = spec.partition(",")
    if kind in ("null", "stdio"):
        if sep:
            raise OptionError(f"console backend {kind!r} takes no argument: {shorten(spec)}")
        return kind, None
    if kind in ("file", "socket"):
        if not arg:
            raise OptionError(f"console backend {kind!r} needs a path: '{kind},PATH'")
        if kind == "socket" and len(os.fsencode(arg)) > SUN_PATH_MAX:
            raise OptionError(f"console socket {shorten(arg)}: longer than {SUN_PATH_MAX} bytes "
                              "(a Unix socket limit)")
        return kind, arg
    raise OptionError(
        f"unknown console backend {shorten(spec)}: expected null, stdio, file,PATH or socket,PATH")


def _writable_dir(path: str, what: str) -> None:
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise OptionError(f"{what} {path}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OptionError(f"{what} {path}: directory {parent} is not writable")


def check_host(spec: str) -> None:
    """What the lpc will do with the path, checked by vmmd up front (OptionError):
    a file is appended to (created 0600), a socket is bound (a stale socket replaced)."""
    kind, path = parse_spec(spec)
    if path is None:
        return
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    except OSError as exc:
        raise OptionError(f"console {kind} {path}: {exc.strerror}") from None
    if kind == "file":
        if st is not None:
            if stat.S_ISDIR(st.st_mode):
                raise OptionError(f"console file {path}: is a directory")
            if not os.access(path, os.W_OK):
                raise OptionError(f"console file {path}: not writable")
        else:
            _writable_dir(path, "console file")
    else:
        if st is not None and not stat.S_ISSOCK(st.st_mode):
            raise OptionError(f"console socket {path}: exists and is not a socket")
        _writable_dir(path, "console socket")
