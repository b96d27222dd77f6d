"""A token bucket for log lines a device can provoke (sans-I/O, clock injected).

A hostile device can make vmmd want to log at any rate it likes; vmmd logs
a short burst, then a few lines per second, and counts what it suppressed so
the next line that gets through says how many were dropped.
"""

from __future__ import annotations

import threading
import time
from typing import Callable


class TokenBucket:
    def __init__(self, rate: float = 5.0, burst: int = 20, clock: Callable[[], float] = time.monotonic):
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be > 0 and burst >= 1")
        self.rate, self.burst, self._clock = rate, burst, clock
        self._tokens = float(burst)
        self._stamp = clock()
        self._lock = threading.Lock()
        self.suppressed = 0        # since the last line that got through
        self.suppressed_total = 0

    def take(self) -> int | None:
        """None: suppress this line. Else the number of lines suppressed since
        the previous one that got through (to report with this one)."""
        with self._lock:
            now = self._clock()
            self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
            self._stamp = now
            if self._tokens < 1.0:
                self.suppressed += 1
                self.suppressed_total += 1
                return None
            self._tokens -= 1.0
            dropped, self.suppressed = self.suppressed, 0
            return dropped
