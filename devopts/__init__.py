"""Device options: the slot-argument grammar of every device kind.

Shared by vmmd (vmmd.config checks every `-s`/`-l` argument before any
process starts) and the device processes (each model parses the options it
is bootstrapped with through the same functions), so the two cannot drift.
Pure standard library: device processes import it before their sandbox.

Each device module declares its options as a table of `Opt`s; `parse_table`
walks a slot's `KEY=VALUE`/`FLAG` arguments through it. Adding an option is
one row (a name, the field it sets, and a value parser that raises
ValueError saying what it wants).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

MAX_NUMBER_CHARS = 32   # longer numbers are typos or attacks; int() of 5,000 digits raises


class OptionError(ValueError):
    """A device argument is malformed; the message names the device and the option."""


@dataclass(frozen=True)
class Opt:
    name: str                                   # KEY of KEY=VALUE, or a bare FLAG
    field: str                                  # the parsed option it sets
    parse: Callable[[str], Any] | None = None   # value -> parsed value (ValueError); None: a flag
    flag_value: Any = True                      # what a flag sets
    aliases: tuple[str, ...] = ()

    def usage(self) -> str:
        return self.name if self.parse is None else f"{self.name}="


def parse_table(device: str, table: tuple[Opt, ...], args, defaults: dict) -> dict:
    """KEY=VALUE and FLAG arguments -> {field: value} over defaults; OptionError otherwise."""
    if not isinstance(args, (list, tuple)) or any(type(a) is not str for a in args):
        raise OptionError(f"{device}: arguments must be a list of strings")
    by_name = {n: o for o in table for n in (o.name, *o.aliases)}
    out = dict(defaults)
    for arg in args:
        key, eq, value = arg.partition("=")
        opt = by_name.get(key)
        if opt is None or (opt.parse is None) == bool(eq):
            known = ", ".join(o.usage() for o in table)
            raise OptionError(f"{device}: unknown option {shorten(arg)} ({known})")
        if opt.parse is None:
            out[opt.field] = opt.flag_value
            continue
        try:
            out[opt.field] = opt.parse(value)
        except ValueError as exc:
            raise OptionError(f"{device}: {key}={shorten(value)}: {exc}") from None
    return out


def shorten(text: str, limit: int = 40) -> str:
    """repr() cut short, so an error about a 5,000-character value stays readable."""
    r = repr(text)
    return r if len(r) <= limit else r[:limit - 5] + "...'"


# --- value parsers (each raises ValueError saying what it wants) --------------------

def integer(text: str) -> int:
    """Decimal, 0x hex, 0o octal; bounded length so int() cannot blow up."""
    if len(text) > MAX_NUMBER_CHARS:
        raise ValueError("not an integer (too long)")
    try:
        return int(text, 0)
    except ValueError:
        raise ValueError("not an integer") from None


def int_range(lo: int, hi: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        v = integer(text)
        if not lo <= v <= hi:
            raise ValueError(f"{v} is outside {lo}..{hi}")
        return v
    return parse


def power_of_two(lo: int, hi: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        v = int_range(lo, hi)(text)
        if v & (v - 1):
            raise ValueError(f"{v} is not a power of 2 in {lo}..{hi}")
        return v
    return parse


def choice(*choices: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}")
        return text
    return parse


def on_off(text: str) -> bool:
    if text not in ("on", "off"):
        raise ValueError("want on or off")
    return text == "on"


def seconds(lo: float, hi: float) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            v = float(text) if len(text) <= MAX_NUMBER_CHARS else math.nan
        except ValueError:
            v = math.nan
        if not lo <= v <= hi:   # also false for nan
            raise ValueError(f"want seconds in {lo:g}..{hi:g}")
        return v
    return parse
