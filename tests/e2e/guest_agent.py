"""Host side of the default guest's command channel on COM2.

vmmd serves COM2 as a Unix socket (``-l com2,socket,PATH``); the guest's
/bin/agent (vmmd/guest/build.py) reads "ID COMMAND" lines from ttyS1 and
answers with the output framed by "@@vmmd-begin ID" / "@@vmmd-end ID RC".
"""

from __future__ import annotations

import itertools
import re
import socket
import time

from vmmd.guest.build import AGENT_BEGIN, AGENT_END, AGENT_READY


class AgentError(Exception):
    pass


class GuestAgent:
    def __init__(self, path: str):
        self.path = path
        self.sock: socket.socket | None = None
        self.buf = b""
        self._ids = itertools.count(1)

    def connect(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.connect(self.path)
                self.sock = s
                return
            except OSError:
                s.close()
                if time.monotonic() > deadline:
                    raise AgentError(f"COM2 socket {self.path} never accepted")
                time.sleep(0.2)

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def _read_until(self, pattern: re.Pattern, deadline: float) -> re.Match:
        while True:
            m = pattern.search(self.buf)
            if m:
                return m
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AgentError(f"no {pattern.pattern!r} from the guest agent; "
                                 f"last bytes: {self.buf[-500:]!r}")
            self.sock.settimeout(min(remaining, 1.0))
            try:
                chunk = self.sock.recv(65536)
            except socket.timeout:
                continue
            if not chunk:
                raise AgentError("COM2 socket closed")
            self.buf += chunk

    def wait_ready(self, timeout: float) -> None:
        """Until the agent answers a no-op (it may have announced itself
        before anyone was connected)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.run("true", timeout=min(20.0, max(1.0, deadline - time.monotonic())))
                return
            except AgentError:
                if time.monotonic() > deadline:
                    raise

    def run(self, command: str, timeout: float = 60.0) -> tuple[int, str]:
        """Run ``command`` in the guest; (exit status, output)."""
        if self.sock is None:
            raise AgentError("not connected")
        if "\n" in command:
            raise ValueError("one line per command")
        cid = f"c{next(self._ids)}"
        self.sock.sendall(f"{cid} {command}\n".encode())
        deadline = time.monotonic() + timeout
        end = self._read_until(re.compile(
            rb"\n" + re.escape(AGENT_END.encode()) + b" " + cid.encode() + rb" (\d+)\r?\n"), deadline)
        begin = re.compile(re.escape(AGENT_BEGIN.encode()) + b" " + cid.encode() + rb"\r?\n")
        b = begin.search(self.buf, 0, end.start() + 1)
        if b is None:
            raise AgentError(f"answer to {cid} has no begin marker")
        out = self.buf[b.end():end.start()]
        self.buf = self.buf[end.end():]
        return int(end.group(1)), out.decode(errors="replace")

    def check(self, command: str, timeout: float = 60.0) -> str:
        rc, out = self.run(command, timeout)
        if rc != 0:
            raise AgentError(f"{command!r} exited {rc}: {out[-2000:]}")
        return out


__all__ = ["AGENT_READY", "AgentError", "GuestAgent"]
