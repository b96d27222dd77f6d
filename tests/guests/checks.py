"""Checkers for the vmmd test guests' memory and COM1 output.

Pure functions, no vmmd imports: tests call them with whatever gives access to
guest memory (``GuestMemory.read_u8``, a bytes object's ``__getitem__``, ...).
"""

from __future__ import annotations

import re
from collections.abc import Callable

PAGE_SIZE = 4096

#: hello's complete COM1 output.
HELLO_OUTPUT = b"Hello from vmmd test guest\n"

#: incrementer defaults (must match tests/guests/build.py INCREMENTER_DEFAULTS).
INCREMENTER_START = 0x400000
INCREMENTER_END = 0x4000000

#: The single byte incrementer prints every PASSES_PER_MARK passes.
INCREMENTER_MARKER = b"B"


def check_incrementer_pages(
    read_byte: Callable[[int], int],
    start: int = INCREMENTER_START,
    end: int = INCREMENTER_END,
    page_size: int = PAGE_SIZE,
) -> tuple[bool, str]:
    """Check the incrementer's invariant over the pages of [start, end).

    The guest increments the first byte of each page, lowest page first, pass
    after pass.  With its vCPU stopped (or after migration, on the
    destination), the bytes read in address order must all be equal, except
    at most one point where a page's byte is exactly one lower (mod 256) than
    its predecessor's: the pages before that point have had one more
    increment than the pages from it on.  Anything else (a byte that is
    higher, or lower by more than one, or a second drop) means a write was
    lost, e.g. a dirty page that was never sent.

    ``read_byte(gpa) -> int`` reads one guest-physical byte.
    Returns ``(ok, message)``; the message describes the state or the first
    violation.
    """
    if start % page_size or end % page_size or end <= start:
        raise ValueError(f"bad range [{start:#x}, {end:#x})")
    npages = (end - start) // page_size
    prev = read_byte(start) & 0xFF
    first = prev
    drop_at: int | None = None
    for i in range(1, npages):
        gpa = start + i * page_size
        cur = read_byte(gpa) & 0xFF
        if cur != prev:
            if cur == (prev - 1) & 0xFF and drop_at is None:
                drop_at = gpa
            elif cur == (prev - 1) & 0xFF:
                return False, (
                    f"second drop at {gpa:#x} (byte {cur}, previous page {prev}); "
                    f"first drop was at {drop_at:#x}"
                )
            else:
                return False, (
                    f"page {gpa:#x} holds {cur} but the page before it holds {prev}: "
                    f"expected {prev} or {(prev - 1) & 0xFF}"
                    + (f" (a drop was already seen at {drop_at:#x})" if drop_at else "")
                )
        prev = cur
    if drop_at is None:
        return True, f"all {npages} pages hold {first} (between two passes)"
    return True, (
        f"{npages} pages: {first} below {drop_at:#x}, {prev} from {drop_at:#x} on "
        f"(pass in progress)"
    )


_CYCLES_RE = re.compile(
    r"^CYCLES p1=([0-9a-f]+) p2=([0-9a-f]+) p3=([0-9a-f]+) p4=([0-9a-f]+)$", re.M
)
HAMMER_LINES = ("HAMMER START", "P1 DONE", "P2 DONE", "P3 DONE", "P4 DONE")


def parse_hammer_output(output: bytes | str) -> dict[str, int]:
    """Parse hammer's COM1 output; return TSC cycles per phase {"p1": ..., "p4": ...}.

    Raises ValueError unless the output is complete and in order.
    """
    text = output.decode("ascii", "replace") if isinstance(output, bytes) else output
    lines = text.splitlines()
    expected = list(HAMMER_LINES)
    if lines[: len(expected)] != expected:
        raise ValueError(f"hammer output does not start with {expected}: {lines[:6]!r}")
    if len(lines) < 7 or lines[6] != "HAMMER END":
        raise ValueError(f"hammer output incomplete: {lines!r}")
    m = _CYCLES_RE.match(lines[5])
    if not m:
        raise ValueError(f"bad CYCLES line: {lines[5]!r}")
    return {f"p{i + 1}": int(v, 16) for i, v in enumerate(m.groups())}


_PING_RE = re.compile(r"^PING (\d+)$")


def parse_ticker_output(output: bytes | str) -> list[int]:
    """Return the counters of ticker's complete "PING <n>" lines, in order.

    A trailing incomplete line is ignored.  Raises ValueError on a malformed
    line or a counter that does not follow its predecessor by one.
    """
    text = output.decode("ascii", "replace") if isinstance(output, bytes) else output
    lines = text.split("\n")[:-1]  # the last element is the unfinished line
    counts: list[int] = []
    for line in lines:
        m = _PING_RE.match(line)
        if not m:
            raise ValueError(f"bad ticker line: {line!r}")
        n = int(m.group(1))
        if counts and n != counts[-1] + 1:
            raise ValueError(f"ticker counter jumped from {counts[-1]} to {n}")
        counts.append(n)
    return counts
