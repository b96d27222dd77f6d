"""What a device process writes to its stdout/stderr, and its LOG events,
relayed into vmmd's log: attributed, cleaned and rate-limited.

A device is untrusted: it may write gigabytes, lines without an end, lines
that look like vmmd's own, or terminal escapes. So every line becomes one
vmmd log record "[<device id>] <text>" (the id is vmmd's, from the
configuration, never the device's), with control characters replaced by
"\\xNN" escapes and at most MAX_LINE characters; lines beyond a token
bucket (BURST lines, then RATE per second) are dropped and counted, and the
count is logged (at a bounded rate) once lines pass again. Dropping is
cheap (counting newlines), and reading stops for a moment once a byte
budget per second is spent, so a flooding device costs vmmd a bounded
amount of work; the device itself then blocks on a full pipe.

DeviceLogLimiter holds a device's counters across incarnations;
PipeReader reads one incarnation's pipe on vmmd's event loop.
"""

from __future__ import annotations

import logging
import os
import re
import time

log = logging.getLogger("vmmd.devices")

RATE = 20.0             # lines per second, sustained
BURST = 200             # lines at once
MAX_LINE = 1024         # characters kept of a line (the rest is dropped, marked "...")
READ_CHUNK = 64 * 1024
BYTES_PER_SECOND = 16 << 20  # read budget; above it the pipe is left full for a while
DROP_REPORT_EVERY = 5.0      # seconds between "N lines dropped" reports

# C0 (but tab), DEL, C1, line/paragraph separators, bidi overrides.
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f\u200e\u200f\u2028-\u202e\u2066-\u2069]")


def clean(text: str, limit: int = MAX_LINE) -> str:
    """One printable line: control characters as \\xNN, at most limit chars."""
    if len(text) > limit:
        text = text[:limit] + "..."
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


class DeviceLogLimiter:
    """A token bucket for one device's log lines, with its counters."""

    def __init__(self, device_id: str, *, rate: float = RATE, burst: int = BURST,
                 clock=time.monotonic, logger: logging.Logger = log):
        self.device_id = device_id
        self.rate = rate
        self.burst = burst
        self.clock = clock
        self.logger = logger
        self.tokens = float(burst)
        self.stamp = clock()
        self.lines = 0        # lines relayed
        self.dropped = 0      # lines dropped by the rate limit
        self.bytes = 0        # bytes read from the device's pipe
        self._unreported = 0
        self._last_report = -DROP_REPORT_EVERY

    def _refill(self) -> None:
        now = self.clock()
        self.tokens = min(float(self.burst), self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now

    def take(self, n: int) -> int:
        """How many of n lines may be logged now; the rest are counted dropped."""
        self._refill()
        ok = min(n, int(self.tokens))
        self.tokens -= ok
        if n > ok:
            self.dropped += n - ok
            self._unreported += n - ok
        return ok

    def emit(self, level: int, text: str) -> bool:
        """Log one line if the bucket allows; False when it was dropped."""
        if not self.take(1):
            return False
        self.lines += 1
        self.logger.log(level, "[%s] %s", self.device_id, clean(text))
        self._report_drops()
        return True

    def _report_drops(self) -> None:
        now = self.clock()
        if self._unreported and now - self._last_report >= DROP_REPORT_EVERY:
            self.logger.warning("[%s] %d log lines dropped (rate limit %g/s, %d dropped in all)",
                                self.device_id, self._unreported, self.rate, self.dropped)
            self._unreported = 0
            self._last_report = now

    def flush_report(self) -> None:
        """Report drops not yet reported (at exit)."""
        if self._unreported:
            self._last_report = -DROP_REPORT_EVERY
            self._report_drops()

    def stats(self) -> dict:
        return {"lines": self.lines, "dropped": self.dropped, "bytes": self.bytes}


class PipeReader:
    """Reads one device incarnation's stdout/stderr pipe on the event loop."""

    def __init__(self, loop, fd: int, limiter: DeviceLogLimiter, level: int = logging.INFO):
        self.loop = loop
        self.fd = fd
        self.limiter = limiter
        self.level = level
        self._partial = b""
        self._budget = float(BYTES_PER_SECOND)
        self._budget_stamp = time.monotonic()
        self._paused = None
        self.closed = False
        os.set_blocking(fd, False)
        loop.add_reader(fd, self._on_readable)

    def _on_readable(self) -> None:
        now = time.monotonic()
        self._budget = min(float(BYTES_PER_SECOND), self._budget + (now - self._budget_stamp) * BYTES_PER_SECOND)
        self._budget_stamp = now
        if self._budget <= 0:
            # Leave the pipe full (the device blocks) until the budget refills.
            self.loop.remove_reader(self.fd)
            self._paused = self.loop.call_later(0.1, self._resume)
            return
        try:
            data = os.read(self.fd, READ_CHUNK)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.close()
            return
        self._budget -= len(data)
        self.limiter.bytes += len(data)
        self._feed(data)

    def _resume(self) -> None:
        self._paused = None
        if not self.closed:
            self.loop.add_reader(self.fd, self._on_readable)

    def _feed(self, data: bytes) -> None:
        n = data.count(b"\n")
        if n == 0:
            self._partial += data
            self._trim_partial()
            return
        allowed = self.limiter.take(n)   # counts the rest as dropped
        if allowed == 0:
            # The common case under a flood: no splitting, no decoding.
            self._partial = data[data.rindex(b"\n") + 1:]
            self._trim_partial()
            return
        parts = data.split(b"\n", allowed)  # allowed complete lines, then the rest
        parts[0] = self._partial + parts[0]
        rest = parts.pop()
        for raw in parts:  # the first lines of a burst pass, the rest are dropped
            self._log(raw)
        self.limiter._report_drops()
        self._partial = rest[rest.rfind(b"\n") + 1:]
        self._trim_partial()

    def _trim_partial(self) -> None:
        # A line without an end is cut at MAX_LINE bytes (4 per character
        # at most): vmmd never buffers more of it.
        if len(self._partial) > 4 * MAX_LINE:
            self._partial = self._partial[:4 * MAX_LINE]

    def _log(self, raw: bytes) -> None:
        self.limiter.lines += 1
        self.limiter.logger.log(self.level, "[%s] %s", self.limiter.device_id,
                                clean(raw.decode("utf-8", errors="replace").rstrip("\r")))

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._paused is not None:
            self._paused.cancel()
        try:
            self.loop.remove_reader(self.fd)
        except (ValueError, OSError):
            pass
        if self._partial and self.limiter.take(1):
            self._log(self._partial)
        self._partial = b""
        self.limiter.flush_report()
        try:
            os.close(self.fd)
        except OSError:
            pass
