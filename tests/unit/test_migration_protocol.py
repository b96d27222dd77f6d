"""The migration protocol's receiver and source reply checker (sans-I/O): a valid
exchange, every refusal, and a mutation loop over valid streams in which only
MigrationProtocolError may escape."""

from __future__ import annotations

import random

import pytest

from vmmd.migration import protocol as p
from vmmd.snapshot import stream

PAGE = 4096
PAGES = 64


def valid_stream(devices=("31.0",), vcpus=2) -> list[bytes]:
    recs = [p.control("mig-hello", {"versions": [1, 7]}),
            p.control("mig-config", {"config": {"memory": PAGES * PAGE}, "memory": {"size": PAGES * PAGE}}),
            p.ram_run(0, b"\x01" * PAGE * 3), p.ram_run(10, b"\x02" * PAGE),
            p.control("mig-iter", {"iteration": 1}),
            p.ram_zero(1, 2), p.ram_run(63, b"\x03" * PAGE),
            p.control("mig-iter", {"iteration": 2}),
            p.section("vm", "vm", {"ncpus": vcpus})]
    recs += [p.section("vcpu", str(i), {"index": i}) for i in range(vcpus)]
    recs += [p.section("device", d, {"x": b"\x00\xff"}) for d in devices]
    recs += [p.control("mig-end", {}), p.control("mig-go")]
    return recs


def run(data: bytes, chunk: int = 1 << 30, devices=("31.0",), vcpus=2):
    r = p.Receiver()
    events = []
    for i in range(0, len(data), chunk):
        events += drive(r, data[i:i + chunk], devices, vcpus)
    return r, events


def drive(r, data, devices=("31.0",), vcpus=2):
    """Feed, taking the I/O loop's decisions (accept, ready) as they come up."""
    events = []
    while True:
        got = r.feed(data)
        data = b""
        events += got
        if not got:
            return events
        if isinstance(got[-1], p.Config):
            r.accept(PAGES, vcpus, devices)
            r.devices_started()
        elif isinstance(got[-1], p.StateComplete):
            r.ready()


def test_valid_exchange_in_any_chunking():
    data = b"".join(valid_stream())
    for chunk in (1, 7, 4096, len(data)):
        r, events = run(data, chunk)
        kinds = [type(e).__name__ for e in events]
        assert kinds == ["Config", "RamRun", "RamRun", "IterationEnd", "RamZero", "RamRun", "IterationEnd",
                         "StateComplete", "Go"]
        assert r.phase == "go" and r.version == 1
        state = events[7].sections
        assert state[("device", "31.0")] == {"x": b"\x00\xff"}
        assert state[("vcpu", "1")] == {"index": 1}
        r.running()
        out = r.pending_output()
        src = p.SourceReplies()
        assert src.feed(out) == ["mig-hello", "mig-accept", "mig-prepared", "mig-ready", "mig-running"]
        assert src.version == 1


def expect_error(recs, match, **kw):
    with pytest.raises(p.MigrationProtocolError, match=match):
        run(b"".join(recs), **kw)


def test_refusals():
    v = valid_stream()
    expect_error([p.control("mig-hello", {"versions": [2, 3]})], "no common")
    expect_error([p.control("mig-hello", {"versions": "1"})], "bad version list")
    expect_error([v[1]], "expected mig-hello")
    expect_error(v[:2] + [p.ram_run(PAGES - 1, b"\x01" * 2 * PAGE)], "outside guest RAM")
    expect_error(v[:2] + [p.ram_zero(PAGES, 1)], "outside guest RAM")
    expect_error(v[:2] + [p.ram_zero(3, 0)], "outside guest RAM")
    expect_error(v[:2] + [p.control("mig-iter", {"iteration": 2})], "out of order")
    expect_error(v[:2] + [p.control("mig-end", {})], "during RAM transfer")
    expect_error(v[:8] + [p.section("vcpu", "2", {})], "does not belong")
    expect_error(v[:8] + [p.section("vcpu", "01", {})], "does not belong")
    expect_error(v[:8] + [p.section("device", "5.0", {})], "does not belong")
    expect_error(v[:10] + [v[9]], "sent twice")
    expect_error(v[:9] + [p.control("mig-end", {})], "missing")
    expect_error(v[:9] + [p.ram_run(0, b"\x01" * PAGE)], "among the machine state")
    expect_error(v[:4] + [p.control("mig-cancel", {"reason": "user"})], "cancelled")
    # a section with a newer version than this vmmd knows
    newer = stream.encode_record("vm", "vm", b"{}", version=99)
    expect_error(v[:8] + [newer], "newer")


def test_truncated_and_closed():
    data = b"".join(valid_stream())
    for cut in (0, 10, len(data) // 2, len(data) - 3):
        r = p.Receiver()
        try:
            drive(r, data[:cut])
        except p.MigrationProtocolError:
            continue
        with pytest.raises(p.MigrationProtocolError, match="closed the connection"):
            r.end_of_stream()


def test_refuse_sends_error_to_source():
    r = p.Receiver()
    r.feed(b"".join(valid_stream()[:2]))
    with pytest.raises(p.MigrationProtocolError):
        r.refuse("memory size differs")
    src = p.SourceReplies()
    with pytest.raises(p.MigrationRefused, match="memory size differs"):
        src.feed(r.pending_output())


def test_source_replies_out_of_order():
    with pytest.raises(p.MigrationProtocolError, match="expected mig-hello"):
        p.SourceReplies().feed(p.control("mig-ready"))
    with pytest.raises(p.MigrationProtocolError, match="protocol version"):
        p.SourceReplies().feed(p.control("mig-hello", {"version": 5}))


def mutate(data: bytes, rnd: random.Random) -> bytes:
    b = bytearray(data)
    op = rnd.randrange(5)
    if op == 0 and b:
        b[rnd.randrange(len(b))] ^= 1 << rnd.randrange(8)
    elif op == 1:
        i = rnd.randrange(len(b) + 1)
        b[i:i] = rnd.randbytes(rnd.randrange(1, 40))
    elif op == 2 and b:
        i = rnd.randrange(len(b))
        del b[i:i + rnd.randrange(1, 100)]
    elif op == 3:
        b = b[:rnd.randrange(len(b) + 1)]
    else:  # a valid record in the wrong place
        recs = valid_stream()
        i, j = rnd.randrange(len(recs)), rnd.randrange(len(recs))
        recs[i], recs[j] = recs[j], recs[i]
        b = bytearray(b"".join(recs))
    return bytes(b)


def test_fuzz_mutated_streams_only_raise_protocol_error():
    rnd = random.Random(11)
    data = b"".join(valid_stream())
    for _ in range(600):
        m = mutate(data, rnd)
        try:
            r, _ = run(m, chunk=rnd.choice((61, 4096, 1 << 20)))
            r.end_of_stream()
        except p.MigrationProtocolError:
            pass
        try:
            p.SourceReplies().feed(m)
        except p.MigrationProtocolError:
            pass
