"""The control socket: newline-delimited JSON-RPC over a Unix stream socket.

A thin asyncio shell around jsonrpc.Dispatcher: one request (or batch) per
line, one response line per non-notification, requests of one connection
answered in order, up to ApiLimits.max_connections connections at once (the
next one gets a LIMIT_EXCEEDED error line and is closed). A connection with
no complete request (or an unread reply) for idle_timeout seconds gets an
error line and is closed; a line longer than max_request is a parse error.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
import stat
from typing import Protocol

from vmmd.api.jsonrpc import LIMIT_EXCEEDED, PARSE_ERROR, error_response
from vmmd.api.limits import DEFAULT_LIMITS, ApiLimits

log = logging.getLogger(__name__)

MAX_LINE = DEFAULT_LIMITS.max_request  # bytes per request line, newline excluded
REFUSAL_LOG_EVERY = 1000               # refused connections: log the 1st, then every 1000th
_CHUNK = 64 * 1024


class ServeError(RuntimeError):
    """The socket path cannot be served (another server is live on it, ...)."""


class _Handles(Protocol):
    async def handle(self, raw: bytes) -> bytes | None: ...


def _claim_path(path: str) -> None:
    """Unlink a stale socket file at path; refuse if a server answers on it."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ServeError(f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.setblocking(False)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)  # nobody listening: left over from a dead vmmd
        return
    except FileNotFoundError:
        return
    except BlockingIOError:
        pass  # backlog full: certainly alive
    except OSError as exc:
        raise ServeError(f"cannot probe existing socket {path}: {exc.strerror}") from None
    finally:
        probe.close()
    raise ServeError(f"another server is already listening on {path}")


def _bind(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # umask, not chmod after bind: no window in which others could connect.
    old = os.umask(0o177)
    try:
        sock.bind(path)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise ServeError(f"another server is already listening on {path}") from None
        raise ServeError(f"cannot bind {path}: {exc.strerror}") from None
    finally:
        os.umask(old)
    sock.listen(64)
    sock.setblocking(False)
    return sock


class ApiServer:
    """The listening control socket; close() stops it and removes the socket file."""

    def __init__(self, path: str, dispatcher: _Handles, max_line: int,
                 limits: ApiLimits = DEFAULT_LIMITS):
        self.path = path
        self._dispatcher = dispatcher
        self._max_line = max_line
        self.limits = limits
        self.refused = 0          # connections refused at the cap
        self.timed_out = 0        # connections closed for idleness
        self._server: asyncio.AbstractServer | None = None
        self._inode: int | None = None
        self._clients: dict[asyncio.Task, asyncio.StreamWriter] = {}
        self._busy: set[asyncio.Task] = set()
        self._closing = False

    async def _start(self) -> None:
        _claim_path(self.path)
        sock = _bind(self.path)
        self._inode = os.stat(self.path).st_ino
        self._server = await asyncio.start_unix_server(self._client, sock=sock)

    @property
    def sockets(self):
        return self._server.sockets if self._server else ()

    def is_serving(self) -> bool:
        return bool(self._server and self._server.is_serving())

    def close(self) -> None:
        """Stop accepting, remove the socket file, and hang up on idle clients.

        A request already being handled still gets its answer (so a client's
        vm.shutdown sees its reply) before that connection is closed.
        """
        if self._closing:
            return
        self._closing = True
        if self._server is not None:
            self._server.close()
        try:  # only our own socket file: a successor may already own the path
            if os.stat(self.path).st_ino == self._inode:
                os.unlink(self.path)
        except FileNotFoundError:
            pass
        for task, writer in self._clients.items():
            if task not in self._busy:
                writer.close()

    async def wait_closed(self) -> None:
        """Wait for client connections to finish; safe to call from a handler."""
        others = [t for t in self._clients if t is not asyncio.current_task()]
        if others:
            await asyncio.wait(others)

    async def serve_forever(self) -> None:
        await self._server.serve_forever()

    async def __aenter__(self) -> ApiServer:
        return self

    async def __aexit__(self, *exc) -> None:
        self.close()
        await self.wait_closed()

    # -- one connection ---------------------------------------------------

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._clients) >= self.limits.max_connections:
            await self._refuse(writer)
            return
        task = asyncio.current_task()
        self._clients[task] = writer
        try:
            if not self._closing:
                await self._serve_lines(task, reader, writer)
        except asyncio.TimeoutError:   # before OSError: TimeoutError is one
            self.timed_out += 1
            if writer.transport.get_write_buffer_size():
                writer.transport.abort()   # it does not read: drop its unread replies too
            else:
                with contextlib.suppress(Exception):
                    writer.write(error_response(LIMIT_EXCEEDED, "idle timeout: no request for "
                                                f"{self.limits.idle_timeout:g} s; closing") + b"\n")
        except (ConnectionError, OSError):
            pass  # the client went away; nothing to answer
        except Exception:
            log.exception("control connection failed")
        finally:
            self._clients.pop(task, None)
            self._busy.discard(task)
            writer.close()

    async def _refuse(self, writer: asyncio.StreamWriter) -> None:
        """Over the connection cap: one error line (best effort, never waited on) and close."""
        self.refused += 1
        if self.refused % REFUSAL_LOG_EVERY == 1:
            log.warning("control socket: refused a connection (cap %d reached; %d refused so far)",
                        self.limits.max_connections, self.refused)
        with contextlib.suppress(Exception):
            writer.write(error_response(LIMIT_EXCEEDED, "too many connections: at most "
                                        f"{self.limits.max_connections}; try again later") + b"\n")
        writer.close()

    async def _serve_lines(self, task, reader, writer) -> None:
        buf = bytearray()
        scanned = 0          # no newline in buf[:scanned]
        discarding = False   # inside an over-long line: drop up to its newline
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.limits.idle_timeout
        while not self._closing:
            # Idle means no complete request: trickling bytes does not keep a connection.
            chunk = await asyncio.wait_for(reader.read(_CHUNK), max(0.0, deadline - loop.time()))
            if not chunk:
                return
            buf += chunk
            while True:
                nl = buf.find(b"\n", scanned)
                if nl < 0:
                    scanned = len(buf)
                    if len(buf) > self._max_line:
                        if not discarding:
                            await self._send(writer, self._too_long())
                            discarding = True
                        buf.clear()
                        scanned = 0
                    break
                line = bytes(buf[:nl]).strip()
                del buf[:nl + 1]
                scanned = 0
                if discarding:  # tail of the over-long line, already answered
                    discarding = False
                    continue
                if len(line) > self._max_line:
                    await self._send(writer, self._too_long())
                    continue
                if not line:
                    continue
                self._busy.add(task)
                try:
                    response = await self._dispatcher.handle(line)
                    if response is not None:
                        await self._send(writer, response)
                finally:
                    self._busy.discard(task)
                # A request answered: the idle clock restarts (blank lines and
                # over-long junk do not restart it).
                deadline = loop.time() + self.limits.idle_timeout
                if self._closing:
                    return

    def _too_long(self) -> bytes:
        return error_response(PARSE_ERROR, f"Parse error: line longer than {self._max_line} bytes")

    async def _send(self, writer: asyncio.StreamWriter, response: bytes) -> None:
        if writer.is_closing():
            # The client hung up while its call ran (uvloop raises RuntimeError on
            # a write to a closed transport): nobody is left to answer.
            raise ConnectionResetError("the client closed the connection")
        writer.write(response + b"\n")
        # A client that does not read its replies is idle too.
        await asyncio.wait_for(writer.drain(), self.limits.idle_timeout)


async def serve(path: str, dispatcher: _Handles, *, max_line: int | None = None,
                limits: ApiLimits = DEFAULT_LIMITS) -> ApiServer:
    """Listen on the Unix socket path (mode 0600) and answer JSON-RPC lines.

    A stale socket file is replaced; ServeError if a live server answers on
    path or it is not a socket. max_line overrides limits.max_request.
    """
    server = ApiServer(path, dispatcher, limits.max_request if max_line is None else max_line,
                       limits)
    await server._start()
    return server
