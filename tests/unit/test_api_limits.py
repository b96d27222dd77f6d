"""Control socket limits (issue 9): connection cap, idle timeout, batch and reply
size, ids that cannot be echoed, UTF-8 only. Sans-I/O parts through the
Dispatcher, the rest over a real Unix socket with a fake VM."""

import asyncio
import json

import pytest

from vmmd.api.jsonrpc import (INVALID_PARAMS, INVALID_REQUEST, LIMIT_EXCEEDED, PARSE_ERROR,
                              Dispatcher)
from vmmd.api.limits import RESERVED_FDS, ApiLimits
from vmmd.api.methods import build_registry
from vmmd.api.server import serve
from test_api_server import connect, line, run, sock_path  # noqa: F401  (fixture)
from test_jsonrpc import FakeVm


def dispatch(raw: bytes, **kw):
    out = asyncio.run(Dispatcher(build_registry(FakeVm()), **kw).handle(raw))
    return None if out is None else json.loads(out)


# --- ids ------------------------------------------------------------------------------------

@pytest.mark.parametrize("rid", [b"1e400", b"-1e400", b"18446744073709551616", b"-9223372036854775809",
                                 b"true", b"[1]", b'{"a":1}', b"1" * 4000])
def test_id_that_cannot_be_echoed_gets_error_with_null_id(rid):
    r = dispatch(b'{"jsonrpc":"2.0","method":"vm.info","id":' + rid + b"}")
    assert r["id"] is None and r["error"]["code"] == INVALID_REQUEST, r


@pytest.mark.parametrize("rid", [0, -(1 << 63), (1 << 64) - 1, 1.5, "x" * 1000, None])
def test_echoable_ids_are_echoed(rid):
    r = dispatch(json.dumps({"jsonrpc": "2.0", "method": "vm.info", "id": rid}).encode())
    assert r["id"] == rid and "result" in r


def test_one_bad_id_does_not_drop_the_batch():
    r = dispatch(b'[{"jsonrpc":"2.0","method":"vm.info","id":1e400},'
                 b'{"jsonrpc":"2.0","method":"vmm.version","id":2}]')
    assert len(r) == 2
    assert r[0]["id"] is None and r[0]["error"]["code"] == INVALID_REQUEST
    assert r[1]["id"] == 2 and "result" in r[1]


def test_infinite_number_in_params_is_invalid_params():
    r = dispatch(b'{"jsonrpc":"2.0","method":"balloon.set","id":1,"params":{"size_mib":1e400}}')
    assert r["error"]["code"] == INVALID_PARAMS


# --- encoding -------------------------------------------------------------------------------

@pytest.mark.parametrize("raw", [
    '{"jsonrpc":"2.0","method":"vm.info","id":1}'.encode("utf-16"),       # with BOM
    '{"jsonrpc":"2.0","method":"vm.info","id":1}'.encode("utf-16-le"),
    '{"jsonrpc":"2.0","method":"vm.info","id":1}'.encode("utf-32"),
    b'\xef\xbb\xbf{"jsonrpc":"2.0","method":"vm.info","id":1}',             # UTF-8 BOM
    b'{"jsonrpc":"2.0","method":"vm.\xff","id":1}',                         # invalid UTF-8
    b'{"jsonrpc":"2.0","method":"vm.\xed\xa0\x80","id":1}',                 # encoded surrogate
    b"[" * 100000,
])
def test_only_utf8_json_is_accepted(raw):
    r = dispatch(raw)
    assert r["error"]["code"] == PARSE_ERROR and r["id"] is None


# --- batch and reply size -------------------------------------------------------------------

def discover(i):
    return {"jsonrpc": "2.0", "method": "rpc.discover", "id": i}


def test_batch_over_the_cap_is_one_error():
    r = dispatch(json.dumps([discover(i) for i in range(5)]).encode(), max_batch=4)
    assert r["error"]["code"] == INVALID_REQUEST and "at most 4" in r["error"]["message"]
    assert len(dispatch(json.dumps([discover(i) for i in range(4)]).encode(), max_batch=4)) == 4


def test_reply_over_the_cap_becomes_an_error_object():
    one = len(json.dumps(dispatch(json.dumps(discover(1)).encode())))
    r = dispatch(json.dumps(discover(7)).encode(), max_reply=one // 2)
    assert r["id"] == 7 and r["error"]["code"] == LIMIT_EXCEEDED


def test_batch_reply_stays_near_the_cap():
    """The rpc.discover amplification: members past the cap answer with small errors."""
    one = len(json.dumps(dispatch(json.dumps(discover(1)).encode())))
    cap = 3 * one + 100
    raw = asyncio.run(Dispatcher(build_registry(FakeVm()), max_batch=64, max_reply=cap)
                      .handle(json.dumps([discover(i) for i in range(64)]).encode()))
    r = json.loads(raw)
    assert [m["id"] for m in r] == list(range(64))
    assert sum("result" in m for m in r) == 3
    assert all(m["error"]["code"] == LIMIT_EXCEEDED for m in r[3:])
    assert len(raw) < cap + 64 * 200


def test_limits_leave_reserved_descriptors():
    assert ApiLimits(max_connections=5000).fitted_to(1024).max_connections == 1024 - RESERVED_FDS
    assert ApiLimits(max_connections=64).fitted_to(1 << 20).max_connections == 64


# --- over the socket ------------------------------------------------------------------------

def make_dispatcher():
    return Dispatcher(build_registry(FakeVm()))


def test_connection_cap_refuses_with_an_error_line(sock_path):  # noqa: F811
    async def main():
        limits = ApiLimits(max_connections=3)
        async with await serve(sock_path, make_dispatcher(), limits=limits) as server:
            held = [await connect(sock_path) for _ in range(3)]
            for r, w in held:      # all three are being served
                w.write(line("vm.info"))
                assert "result" in json.loads(await r.readline())
            r, w = await connect(sock_path)
            refusal = json.loads(await r.readline())
            assert refusal["error"]["code"] == LIMIT_EXCEEDED and refusal["id"] is None
            assert "too many connections" in refusal["error"]["message"]
            assert await r.read() == b""           # then closed
            assert server.refused == 1
            held[0][1].close()
            await held[0][1].wait_closed()
            for _ in range(100):                   # the server notices the hang-up
                if len(server._clients) < 3:
                    break
                await asyncio.sleep(0.01)
            r, w = await connect(sock_path)
            w.write(line("vm.info", id=9))
            assert json.loads(await r.readline())["id"] == 9
            for _, hw in held[1:] + [(r, w)]:
                hw.close()
    run(main())


@pytest.mark.parametrize("trickle", [False, True])
def test_idle_connection_is_closed_with_an_error_line(sock_path, trickle):  # noqa: F811
    async def main():
        limits = ApiLimits(idle_timeout=0.5)
        async with await serve(sock_path, make_dispatcher(), limits=limits) as server:
            r, w = await connect(sock_path)
            w.write(line("vm.info", id=1))
            assert json.loads(await r.readline())["id"] == 1   # a request restarts the clock

            async def trickle_bytes():
                for i in range(1000):   # bytes and blank lines are not requests
                    w.write(b" " if i % 2 else b"\n")
                    await asyncio.sleep(0.05)
            t = asyncio.create_task(trickle_bytes()) if trickle else None
            bye = json.loads(await asyncio.wait_for(r.readline(), 30))
            assert bye["error"]["code"] == LIMIT_EXCEEDED and "idle" in bye["error"]["message"]
            assert await asyncio.wait_for(r.read(), 30) == b""
            assert server.timed_out == 1
            if t:
                t.cancel()
            w.close()
    run(main())


def test_request_size_is_bounded_by_the_limits(sock_path):  # noqa: F811
    async def main():
        limits = ApiLimits(max_request=4096)
        async with await serve(sock_path, make_dispatcher(), limits=limits):
            r, w = await connect(sock_path)
            w.write(b'"' + b"x" * 5000 + b'"\n')
            assert json.loads(await r.readline())["error"]["code"] == PARSE_ERROR
            w.write(line("vm.info", id=2))
            assert json.loads(await r.readline())["id"] == 2
            w.close()
    run(main())


def test_client_that_never_reads_its_replies_is_dropped(sock_path):  # noqa: F811
    async def main():
        limits = ApiLimits(idle_timeout=0.5, max_batch=64)
        async with await serve(sock_path, make_dispatcher(), limits=limits) as server:
            r, w = await connect(sock_path)
            batch = json.dumps([{"jsonrpc": "2.0", "method": "rpc.discover", "id": i}
                                for i in range(64)]).encode() + b"\n"
            for _ in range(200):          # far more reply bytes than the socket buffers
                w.write(batch)
                try:
                    await asyncio.wait_for(w.drain(), 0.1)
                except (asyncio.TimeoutError, ConnectionError):
                    break
            for _ in range(300):
                if server.timed_out:
                    break
                await asyncio.sleep(0.05)
            assert server.timed_out == 1 and not server._clients
            w.close()
    run(main())


def test_a_slow_request_does_not_count_as_idle(sock_path):  # noqa: F811
    async def main():
        registry = build_registry(FakeVm())

        async def slow(params):
            await asyncio.sleep(1.0)
            return "done"
        registry.add("test.slow", slow)
        limits = ApiLimits(idle_timeout=0.5)
        async with await serve(sock_path, Dispatcher(registry), limits=limits) as server:
            r, w = await connect(sock_path)
            w.write(line("test.slow", id=1))
            assert json.loads(await r.readline())["result"] == "done"
            w.write(line("vm.info", id=2))       # right after the slow answer: not idle
            assert json.loads(await r.readline())["id"] == 2
            assert server.timed_out == 0
            w.close()
    run(main())
