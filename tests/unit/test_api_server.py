"""The control socket server over a real Unix socket, with a fake VmControl."""

import asyncio
import json
import logging
import os
import shutil
import socket
import stat
import tempfile

import pytest

from vmmd.api.jsonrpc import PARSE_ERROR, Dispatcher
from vmmd.api.methods import build_registry
from vmmd.api.server import ServeError, serve
from test_jsonrpc import FakeVm  # same directory (pytest's default import mode)


@pytest.fixture
def sock_path():
    d = tempfile.mkdtemp(prefix="vmmd-api-", dir="/tmp")  # short: sun_path is 108 bytes
    yield os.path.join(d, "api.sock")
    shutil.rmtree(d)


class Gate:
    """test.wait blocks until test.release is called: proves requests overlap."""

    def __init__(self):
        self.event = asyncio.Event()
        self.waiting = asyncio.Event()


def make_dispatcher(gate=None):
    registry = build_registry(FakeVm())
    if gate is not None:
        async def wait(params):
            gate.waiting.set()
            await gate.event.wait()
            return "released"

        def release(params):
            gate.event.set()
            return "ok"
        registry.add("test.wait", wait)
        registry.add("test.release", release)
    return Dispatcher(registry)


def line(method, id=1, params=None):
    msg = {"jsonrpc": "2.0", "method": method, "id": id}
    if params is not None:
        msg["params"] = params
    return json.dumps(msg).encode() + b"\n"


async def connect(path):
    return await asyncio.open_unix_connection(path, limit=8 << 20)


async def ask(reader, writer, data):
    writer.write(data)
    await writer.drain()
    return json.loads(await reader.readline())


def run(coro):
    return asyncio.run(coro)


def test_answers_requests_and_socket_is_private(sock_path):
    async def main():
        async with await serve(sock_path, make_dispatcher()):
            assert stat.S_IMODE(os.stat(sock_path).st_mode) == 0o600
            r, w = await connect(sock_path)
            assert (await ask(r, w, line("vm.info")))["result"]["state"] == "running"
            batch = json.dumps([json.loads(line("vm.info", 1)), json.loads(line("vmm.version", 2))]).encode()
            assert [x["id"] for x in await ask(r, w, batch + b"\n")] == [1, 2]
            w.close()
    run(main())


def test_notifications_and_blank_lines_get_no_response_line(sock_path):
    async def main():
        async with await serve(sock_path, make_dispatcher()):
            r, w = await connect(sock_path)
            w.write(b'{"jsonrpc":"2.0","method":"vm.pause"}\n\n   \r\n')
            resp = await ask(r, w, line("vm.info", id=5))
            assert resp["id"] == 5 and resp["result"]["state"] == "paused"
            w.close()
    run(main())


def test_bad_lines_get_parse_errors_and_connection_stays_usable(sock_path):
    async def main():
        async with await serve(sock_path, make_dispatcher()):
            r, w = await connect(sock_path)
            assert (await ask(r, w, b"garbage\n"))["error"]["code"] == PARSE_ERROR
            assert (await ask(r, w, b"\xff\xff\n"))["error"]["code"] == PARSE_ERROR
            assert (await ask(r, w, b'{"id": 1}\n'))["error"]["code"] == -32600
            assert (await ask(r, w, line("vm.info", id=2)))["id"] == 2
            w.close()
    run(main())


@pytest.mark.parametrize("max_line", [1000, 1 << 20])
def test_huge_line_gets_one_parse_error_then_connection_works(sock_path, max_line):
    async def main():
        kwargs = {} if max_line == 1 << 20 else {"max_line": max_line}
        async with await serve(sock_path, make_dispatcher(), **kwargs):
            r, w = await connect(sock_path)
            huge = b'{"jsonrpc":"2.0","method":"vm.info","id":1,"params":{"x":"' + b"a" * (3 * max_line) + b'"}}\n'
            resp = await ask(r, w, huge)
            assert resp["error"]["code"] == PARSE_ERROR and "line longer" in resp["error"]["message"]
            assert (await ask(r, w, line("vm.info", id=3)))["id"] == 3  # no second error for the tail
            # just over the limit, newline in the same chunk
            over = b'"' + b"x" * max_line + b'"\n'
            assert (await ask(r, w, over))["error"]["code"] == PARSE_ERROR
            assert (await ask(r, w, line("vm.info", id=4)))["id"] == 4
            w.close()
    run(main())


def test_many_clients_at_once(sock_path):
    gate = Gate()

    async def client(i):
        r, w = await connect(sock_path)
        for k in range(5):
            assert (await ask(r, w, line("vm.info", id=f"{i}.{k}")))["id"] == f"{i}.{k}"
        w.close()

    async def main():
        async with await serve(sock_path, make_dispatcher(gate)):
            # one client parked in a slow call must not hold up the others
            r0, w0 = await connect(sock_path)
            w0.write(line("test.wait", id="slow"))
            await gate.waiting.wait()
            await asyncio.gather(*(client(i) for i in range(20)))
            r1, w1 = await connect(sock_path)
            assert (await ask(r1, w1, line("test.release")))["result"] == "ok"
            assert json.loads(await r0.readline()) == {"jsonrpc": "2.0", "result": "released", "id": "slow"}
            w0.close()
            w1.close()
    run(main())


def test_client_disconnecting_mid_request_does_not_hurt(sock_path, caplog):
    gate = Gate()

    async def main():
        async with await serve(sock_path, make_dispatcher(gate)):
            r, w = await connect(sock_path)
            w.write(line("test.wait"))
            await gate.waiting.wait()
            w.transport.abort()               # gone before its answer
            r2, w2 = await connect(sock_path)
            w2.write(b'{"jsonrpc":"2.0","method":"vm.in')   # half a request, then gone
            await w2.drain()
            w2.transport.abort()
            r3, w3 = await connect(sock_path)
            assert (await ask(r3, w3, line("test.release")))["result"] == "ok"
            assert (await ask(r3, w3, line("vm.info", id=8)))["id"] == 8
            w3.close()
    with caplog.at_level(logging.DEBUG):
        run(main())
    assert "control connection failed" not in caplog.text


def test_close_removes_socket_and_hangs_up_idle_clients(sock_path):
    async def main():
        server = await serve(sock_path, make_dispatcher())
        r, w = await connect(sock_path)
        assert (await ask(r, w, line("vm.info")))["id"] == 1
        server.close()
        await server.wait_closed()
        assert not os.path.exists(sock_path)
        assert await r.read() == b""        # hung up
        with pytest.raises(OSError):
            await connect(sock_path)
        w.close()
    run(main())


def test_request_in_flight_at_close_still_gets_its_answer(sock_path):
    gate = Gate()

    async def main():
        server = await serve(sock_path, make_dispatcher(gate))
        r, w = await connect(sock_path)
        w.write(line("test.wait", id="last"))
        await gate.waiting.wait()
        server.close()
        gate.event.set()
        assert json.loads(await r.readline())["id"] == "last"
        assert await r.read() == b""
        await server.wait_closed()
        w.close()
    run(main())


def test_stale_socket_file_is_replaced(sock_path):
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(sock_path)
    dead.close()                              # file left behind, nobody listening

    async def main():
        async with await serve(sock_path, make_dispatcher()):
            r, w = await connect(sock_path)
            assert (await ask(r, w, line("vm.info")))["id"] == 1
            w.close()
    run(main())


def test_refuses_path_with_live_server_or_non_socket(sock_path):
    async def main():
        async with await serve(sock_path, make_dispatcher()):
            with pytest.raises(ServeError, match="already listening"):
                await serve(sock_path, make_dispatcher())
            assert os.path.exists(sock_path)   # the live server's file is untouched
            r, w = await connect(sock_path)
            assert (await ask(r, w, line("vm.info")))["id"] == 1
            w.close()
        with open(sock_path, "w") as f:
            f.write("precious")
        with pytest.raises(ServeError, match="not a socket"):
            await serve(sock_path, make_dispatcher())
        with open(sock_path) as f:
            assert f.read() == "precious"
    run(main())


def test_close_leaves_a_successors_socket_alone(sock_path):
    async def main():
        first = await serve(sock_path, make_dispatcher())
        os.unlink(sock_path)                  # someone replaced it meanwhile
        second = await serve(sock_path, make_dispatcher())
        first.close()
        await first.wait_closed()
        assert os.path.exists(sock_path)
        second.close()
        await second.wait_closed()
        assert not os.path.exists(sock_path)
    run(main())


def test_bind_failure_is_a_clear_error():
    async def main():
        with pytest.raises(ServeError, match="cannot bind"):
            await serve("/nonexistent-dir/api.sock", make_dispatcher())
    run(main())
