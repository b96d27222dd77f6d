"""Run vmmd as a subprocess in tests: start, read the guest console, call the API."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path


# Waits in tests are bounds against hangs, not timing assertions: on a slow
# host (the nested lab runs everything under software emulation) every bound
# and vmmd's default device timeout stretch by this factor.
TIME_SCALE = max(1.0, float(os.environ.get("VMMD_TEST_TIME_SCALE", "1") or 1))
DEFAULT_DEVICE_TIMEOUT = 2.0


class VmmdProcess:
    """One vmmd run. COM1 goes to a file the test reads; the API socket is always on."""

    def __init__(self, tmp_path: Path, args: list[str], *, com1: str | None = "file",
                 sandbox: str = "on", extra_env: dict | None = None, netns: str | None = None,
                 entry: str = "vmmd.cli"):
        self.tmp = tmp_path
        self.console = tmp_path / "com1.out"
        self.api = str(tmp_path / "api.sock")
        self.stderr_path = tmp_path / "vmmd.stderr"
        cmd = [sys.executable, "-m", entry, "--api-socket", self.api, "--sandbox", sandbox]
        self.com1_socket = tmp_path / "com1.sock"
        if com1 == "file":
            cmd += ["-l", f"com1,file,{self.console}"]
        elif com1 == "socket":  # read into self.console by a thread; write_console() types
            cmd += ["-l", f"com1,socket,{self.com1_socket}"]
        self._com1: socket.socket | None = None
        cmd += args
        if TIME_SCALE > 1 and "--device-timeout" not in args:
            cmd += ["--device-timeout", str(DEFAULT_DEVICE_TIMEOUT * TIME_SCALE)]
        if netns is not None:  # ip execs vmmd after joining the namespace: same pid
            cmd = ["ip", "netns", "exec", netns, *cmd]
        self.cmd = cmd
        env = dict(os.environ)
        env.update(extra_env or {})
        self._stderr = open(self.stderr_path, "wb")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=self._stderr,
                                     stderr=self._stderr, env=env, start_new_session=True)

    # -- console --------------------------------------------------------------
    def attach_console(self, timeout: float = 60.0) -> None:
        """With com1="socket": connect and copy the console into self.console."""
        deadline = time.monotonic() + timeout * TIME_SCALE
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(str(self.com1_socket))
                break
            except OSError:
                s.close()
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise AssertionError(f"COM1 socket never accepted: {self.stderr()[-2000:]}")
                time.sleep(0.1)
        self._com1 = s

        def copy() -> None:
            with open(self.console, "ab") as out:
                while chunk := s.recv(65536):
                    out.write(chunk)
                    out.flush()
        threading.Thread(target=copy, daemon=True).start()

    def write_console(self, data: bytes) -> None:
        if self._com1 is None:
            raise AssertionError("COM1 is not a socket (com1='socket')")
        self._com1.sendall(data)

    def output(self) -> str:
        try:
            return self.console.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def wait_for(self, text: str, timeout: float, start: int = 0) -> str:
        """Wait until `text` appears in the console output (after offset `start`)."""
        timeout *= TIME_SCALE
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out = self.output()
            if text in out[start:]:
                return out
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(
            f"{text!r} not seen within {timeout}s (vmmd exit {self.proc.poll()}).\n"
            f"console tail: {self.output()[-2000:]!r}\nstderr tail: {self.stderr()[-4000:]}")

    # -- API --------------------------------------------------------------------
    def wait_api(self, timeout: float = 30.0) -> None:
        """Wait until the API answers and the VM has left the "created" state."""
        timeout *= TIME_SCALE
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if os.path.exists(self.api):
                try:
                    reply = self.rpc_raw({"jsonrpc": "2.0", "id": 1, "method": "vm.info"})
                    if reply and reply.get("result", {}).get("state", "created") != "created":
                        return
                except (OSError, ValueError):
                    pass
            if self.proc.poll() is not None:
                raise AssertionError(f"vmmd exited {self.proc.returncode}: {self.stderr()[-4000:]}")
            time.sleep(0.05)
        raise AssertionError(f"the API socket never answered within {timeout} s; "
                             f"vmmd stderr tail: {self.stderr()[-3000:]}")

    def rpc_raw(self, request: dict | list | bytes, timeout: float = 30.0):
        data = request if isinstance(request, bytes) else json.dumps(request).encode()
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout * TIME_SCALE)
            s.connect(self.api)
            s.sendall(data + b"\n")
            buf = b""
            while not buf.endswith(b"\n"):
                chunk = s.recv(65536)
                if not chunk:
                    break
                buf += chunk
        return json.loads(buf) if buf else None

    def rpc(self, method: str, params: dict | None = None, timeout: float = 30.0):
        req = {"jsonrpc": "2.0", "id": 1, "method": method}
        if params is not None:
            req["params"] = params
        reply = self.rpc_raw(req, timeout)
        if "error" in reply:
            raise RpcError(reply["error"])
        return reply["result"]

    # -- end ----------------------------------------------------------------------
    def wait(self, timeout: float) -> int:
        timeout *= TIME_SCALE
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"vmmd did not exit within {timeout}s; stderr: {self.stderr()[-4000:]}")

    def crash(self) -> None:
        """kill -9 vmmd's whole session (devices included), as a crash would."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(10)
        self.stop()

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(10)
            except (subprocess.TimeoutExpired, ProcessLookupError):
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(10)
        self._stderr.close()


class RpcError(Exception):
    def __init__(self, error: dict):
        super().__init__(f"{error.get('code')}: {error.get('message')}")
        self.code = error.get("code")
        self.error = error
