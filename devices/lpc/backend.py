"""Console backends for the UARTs: where guest output goes, where input comes from.

Every fd and socket is opened in the constructor, before the sandbox;
start() only attaches them to the running event loop. Nothing here may
block the loop or raise into it: output is written nonblocking, the rest is
buffered (bounded) and flushed by a writer callback; if the consumer is gone
or too slow, output is dropped and counted in stats["tx_dropped"].

Specs (as on the command line):
    "null"          discard output, no input
    "stdio"         input from fd 0, output to fd 1, both made nonblocking
                    until close(); Ctrl-A x asks vmmd to quit, Ctrl-A Ctrl-A
                    sends a literal Ctrl-A. Raw mode for a terminal is
                    vmmd's job (the sandbox forbids termios writes, and vmmd
                    must restore the terminal even if this process dies)
    "file,PATH"     output appended to PATH, no input
    "socket,PATH"   a Unix stream socket listening at PATH, one client at a
                    time (others are closed at once); while no client is
                    connected the newest REPLAY_SIZE bytes of output are
                    kept and replayed to the next client, so a late client
                    still sees the boot log
"""

from __future__ import annotations

import asyncio
import os
import socket
import stat
from typing import Callable

from devopts.console import parse_spec  # the spec grammar, shared with vmmd's check

OUTPUT_BUFFER = 64 * 1024  # pending output per consumer before dropping
REPLAY_SIZE = 64 * 1024
READ_CHUNK = 4096

CTRL_A = 0x01


def _no_input(_data: bytes) -> None:
    pass


class Backend:
    """Base class and the "null" backend."""

    kind = "null"
    has_input = False

    def __init__(self) -> None:
        self.stats = {"tx_bytes": 0, "tx_dropped": 0, "rx_bytes": 0}
        self.loop: asyncio.AbstractEventLoop | None = None
        self.on_input: Callable[[bytes], None] = _no_input
        self.reading_paused = False

    def start(self, loop: asyncio.AbstractEventLoop, on_input: Callable[[bytes], None]) -> None:
        self.loop = loop
        self.on_input = on_input
        self._start()

    def _start(self) -> None:
        pass

    def write(self, data: bytes) -> None:
        self.stats["tx_bytes"] += len(data)

    def pause_reading(self) -> None:
        self.reading_paused = True
        self._sync_reader()

    def resume_reading(self) -> None:
        self.reading_paused = False
        self._sync_reader()

    def _sync_reader(self) -> None:
        """Attach or detach the input reader to match reading_paused (backends with input)."""

    def close(self) -> None:
        pass


class _Output:
    """Nonblocking writes to one fd; bounded buffer; never raises."""

    def __init__(self, stats: dict, write_fn: Callable[[bytes], int], fd: int,
                 on_broken: Callable[[], None]):
        self.stats = stats
        self.write_fn = write_fn
        self.fd = fd
        self.on_broken = on_broken
        self.loop: asyncio.AbstractEventLoop | None = None
        self.buf = bytearray()
        self.watching = False
        self.broken = False

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._watch()

    def write(self, data: bytes) -> None:
        if self.broken:
            self.stats["tx_dropped"] += len(data)
            return
        if not self.buf:
            n = self._try_write(data)
            if n is None:
                self.stats["tx_dropped"] += len(data)
                return
            data = data[n:]
        if data:
            keep = data[: OUTPUT_BUFFER - len(self.buf)]
            self.stats["tx_dropped"] += len(data) - len(keep)
            self.buf += keep
            self._watch()

    def _try_write(self, data: bytes) -> int | None:
        try:
            n = self.write_fn(data)
        except (BlockingIOError, InterruptedError):
            return 0
        except OSError:
            self._break()
            return None
        self.stats["tx_bytes"] += n
        return n

    def _flush(self) -> None:
        n = self._try_write(bytes(self.buf))
        if n is None:
            return
        del self.buf[:n]
        if not self.buf:
            self._unwatch()

    def _watch(self) -> None:
        if self.buf and self.loop is not None and not self.watching and not self.broken:
            try:
                self.loop.add_writer(self.fd, self._flush)
            except OSError:  # not pollable (epoll refuses regular files)
                self._break()
                return
            self.watching = True

    def _unwatch(self) -> None:
        if self.watching and self.loop is not None:
            self.loop.remove_writer(self.fd)
        self.watching = False

    def _break(self) -> None:
        self.close()
        self.broken = True
        self.on_broken()

    def close(self) -> None:
        """Stop writing; whatever is still buffered counts as dropped."""
        self._unwatch()
        self.stats["tx_dropped"] += len(self.buf)
        self.buf.clear()


class EscapeFilter:
    """Ctrl-A x -> quit; Ctrl-A Ctrl-A -> literal Ctrl-A; Ctrl-A + other
    byte -> both bytes passed through (nothing typed is lost)."""

    def __init__(self) -> None:
        self.armed = False

    def feed(self, data: bytes) -> tuple[bytes, bool]:
        out = bytearray()
        quit_ = False
        for b in data:
            if self.armed:
                self.armed = False
                if b == ord("x"):
                    quit_ = True
                elif b == CTRL_A:
                    out.append(CTRL_A)
                else:
                    out += bytes((CTRL_A, b))
            elif b == CTRL_A:
                self.armed = True
            else:
                out.append(b)
        return bytes(out), quit_


class NullBackend(Backend):
    pass


class FileBackend(Backend):
    kind = "file"

    def __init__(self, path: str):
        super().__init__()
        try:
            self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise ValueError(f"console file {path!r}: {e.strerror}") from None

    def write(self, data: bytes) -> None:
        if self.fd < 0:
            self.stats["tx_dropped"] += len(data)
            return
        try:
            n = os.write(self.fd, data)  # regular files do not return EAGAIN
        except OSError:
            n = 0
        self.stats["tx_bytes"] += n
        self.stats["tx_dropped"] += len(data) - n

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class StdioBackend(Backend):
    kind = "stdio"
    has_input = True

    def __init__(self, stdin_fd: int = 0, stdout_fd: int = 1,
                 on_quit: Callable[[], None] | None = None):
        super().__init__()
        self.in_fd = stdin_fd
        self.out_fd = stdout_fd
        self.on_quit = on_quit or (lambda: None)
        self.escape = EscapeFilter()
        self.eof = False
        self.reader_added = False
        self.saved_flags: dict[int, int] = {}
        for fd in {stdin_fd, stdout_fd}:
            try:
                flags = os.get_blocking(fd)
            except OSError as e:
                raise ValueError(f"console stdio: fd {fd}: {e.strerror}") from None
            self.saved_flags[fd] = flags
            os.set_blocking(fd, False)
        self.out = _Output(self.stats, lambda d: os.write(self.out_fd, d), stdout_fd, lambda: None)

    def _start(self) -> None:
        self.out.attach(self.loop)
        self._sync_reader()

    def _sync_reader(self) -> None:
        want = self.loop is not None and not self.reading_paused and not self.eof
        if want and not self.reader_added:
            try:
                self.loop.add_reader(self.in_fd, self._readable)
            except OSError:  # e.g. /dev/null or a regular file: no input
                self.eof = True
                want = False
        elif not want and self.reader_added:
            self.loop.remove_reader(self.in_fd)
        self.reader_added = want

    def _readable(self) -> None:
        try:
            data = os.read(self.in_fd, READ_CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self.eof = True  # stdin closed: the guest simply gets no more input
            self._sync_reader()
            return
        data, quit_ = self.escape.feed(data)
        if quit_:
            self.on_quit()
        if data:
            self.stats["rx_bytes"] += len(data)
            self.on_input(data)

    def write(self, data: bytes) -> None:
        self.out.write(data)

    def close(self) -> None:
        self.eof = True
        self._sync_reader()
        self.out.close()
        for fd, blocking in self.saved_flags.items():
            try:
                os.set_blocking(fd, blocking)
            except OSError:
                pass
        self.saved_flags = {}


class SocketBackend(Backend):
    kind = "socket"
    has_input = True

    def __init__(self, path: str):
        super().__init__()
        self.path = path
        self.replay = bytearray()
        self.client: socket.socket | None = None
        self.out: _Output | None = None
        self.client_reading = False
        self.stats["connections"] = 0
        self.stats["refused"] = 0
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            pass
        except OSError as e:
            raise ValueError(f"console socket {path!r}: {e.strerror}") from None
        else:
            if not stat.S_ISSOCK(st.st_mode):
                raise ValueError(f"console socket {path!r}: exists and is not a socket")
            os.unlink(path)  # stale socket from an earlier run
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            self.listener.bind(path)
            self.listener.listen(1)
        except OSError as e:
            self.listener.close()
            raise ValueError(f"console socket {path!r}: {e.strerror}") from None
        self.listener.setblocking(False)

    def _start(self) -> None:
        self.loop.add_reader(self.listener.fileno(), self._accept)

    def _accept(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            return
        if self.client is not None:
            self.stats["refused"] += 1
            conn.close()
            return
        conn.setblocking(False)
        self.client = conn
        self.stats["connections"] += 1
        self.out = _Output(self.stats, lambda d: conn.send(d, socket.MSG_NOSIGNAL),
                           conn.fileno(), self._disconnect)
        self.out.attach(self.loop)
        self._sync_reader()
        if self.replay:
            backlog = bytes(self.replay)
            self.replay.clear()
            self.out.write(backlog)

    def _sync_reader(self) -> None:
        want = self.client is not None and not self.reading_paused and self.loop is not None
        if want and not self.client_reading:
            self.loop.add_reader(self.client.fileno(), self._readable)
        elif not want and self.client_reading and self.client is not None:
            self.loop.remove_reader(self.client.fileno())
        self.client_reading = want

    def _readable(self) -> None:
        if self.client is None:
            return
        try:
            data = self.client.recv(READ_CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._disconnect()
            return
        self.stats["rx_bytes"] += len(data)
        self.on_input(data)

    def _disconnect(self) -> None:
        client = self.client
        if client is None:
            return
        if self.client_reading and self.loop is not None:
            self.loop.remove_reader(client.fileno())
        self.client_reading = False
        if self.out is not None:
            self.out.close()
            self.out = None
        self.client = None
        client.close()

    def write(self, data: bytes) -> None:
        if self.out is not None:
            self.out.write(data)
            return
        # No client: keep the newest REPLAY_SIZE bytes for the next one.
        self.replay += data
        excess = len(self.replay) - REPLAY_SIZE
        if excess > 0:
            self.stats["tx_dropped"] += excess
            del self.replay[:excess]

    def close(self) -> None:
        self._disconnect()
        if self.loop is not None and self.listener.fileno() >= 0:
            self.loop.remove_reader(self.listener.fileno())
        self.listener.close()
        try:
            os.unlink(self.path)
        except OSError:
            pass  # inside the sandbox the path is out of reach; the next run unlinks it


def make_backend(spec: str, *, on_quit: Callable[[], None] | None = None,
                 stdin_fd: int = 0, stdout_fd: int = 1) -> Backend:
    kind, path = parse_spec(spec)
    if kind == "null":
        return NullBackend()
    if kind == "stdio":
        return StdioBackend(stdin_fd, stdout_fd, on_quit)
    if kind == "file":
        return FileBackend(path)
    return SocketBackend(path)
