"""What one control socket may cost vmmd: connections, bytes, batch members, idle time.

Defaults fit an operator's tools (vmmctl, a monitoring poller, a few scripts);
`--api-*` options change them (README, "Control socket limits"). Every limit
answers with a JSON-RPC error rather than failing silently.
"""

from __future__ import annotations

from dataclasses import dataclass

# Descriptors vmmd keeps for itself whatever the connection cap says: each device
# incarnation needs a dozen (bus sockets, pidfd, eventfds, memfd, pipes) and a
# restart opens the new set before the old one is closed.
RESERVED_FDS = 512


@dataclass(frozen=True)
class ApiLimits:
    max_connections: int = 64        # open control connections; the next is refused
    idle_timeout: float = 300.0      # seconds without a complete request (or a drained reply)
    max_request: int = 256 << 10     # bytes per request line (newline excluded)
    max_batch: int = 64              # members of one batch
    max_reply: int = 4 << 20         # bytes of one response line; larger becomes an error

    def fitted_to(self, nofile: int) -> "ApiLimits":
        """The connection cap lowered so that RESERVED_FDS descriptors stay free
        under an RLIMIT_NOFILE of `nofile` (each connection holds one)."""
        room = max(1, nofile - RESERVED_FDS)
        if self.max_connections <= room:
            return self
        return ApiLimits(room, self.idle_timeout, self.max_request, self.max_batch, self.max_reply)


DEFAULT_LIMITS = ApiLimits()
