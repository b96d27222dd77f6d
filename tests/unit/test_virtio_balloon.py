"""devices.virtio_balloon: the sans-I/O core (page numbers, ballooned set,
host-page accumulation, reporting ranges, stats entries), options, queue
numbering, saved state; vmmd.api.balloon with a fake machine; vmmctl."""

from __future__ import annotations

import asyncio
import json
import struct

import numpy as np
import pytest

from devices.virtio_balloon import core, model, state
from devices.virtio_balloon.core import BalloonCore, encode_stats, parse_stats
from vmmd import ctl
from vmmd.api import jsonrpc
from vmmd.api import balloon
from vmmd.api.jsonrpc import Dispatcher, Registry
from vmmd.guest_memory import MemoryLayout

MiB, GiB = 1 << 20, 1 << 30
PAGE = 4096


def pfns(*values) -> bytes:
    return struct.pack(f"<{len(values)}I", *values)


# --- core: page numbers ------------------------------------------------------------------

def test_inflate_punches_each_new_page_in_runs():
    c = BalloonCore(MemoryLayout.pc(64 * MiB))
    assert c.inflate(pfns(10, 11, 12, 20)) == [(10 * PAGE, 3 * PAGE), (20 * PAGE, PAGE)]
    assert c.count == 4 and c.counters["inflated_pages"] == 4
    assert c.inflate(pfns(11, 12, 21)) == [(21 * PAGE, PAGE)]     # 11, 12 already in
    assert c.counters["duplicate_pfns"] == 2
    assert c.deflate(pfns(11, 30)) == 1
    assert c.counters["not_ballooned_pfns"] == 1
    assert c.inflate(pfns(11)) == [(11 * PAGE, PAGE)]             # punched again once back in


def test_pfns_outside_ram_and_in_the_pci_hole_are_ignored():
    layout = MemoryLayout.pc(4 * GiB)          # 3 GiB low, hole, 1 GiB at 4 GiB
    c = BalloonCore(layout, 1 << 21)
    hole = (3 * GiB) // PAGE
    high = (4 * GiB) // PAGE
    end = (5 * GiB) // PAGE
    idx = c.page_indices(pfns(hole, hole + 5, high - 1, end, 0xFFFFFFFF, high, 0) + b"\x07")
    assert list(idx) == [(3 * GiB) // PAGE, 0]  # high RAM sits right after low RAM in the memfd
    assert c.counters["ignored_pfns"] == 5 and c.counters["partial_pfn_bytes"] == 1


def test_large_host_pages_are_punched_only_when_whole():
    layout = MemoryLayout.pc(4 * GiB)
    c = BalloonCore(layout, 2 * MiB)
    per = 512
    first = list(range(per))
    assert c.inflate(pfns(*first[:-1])) == []               # 511 of 512: nothing yet
    assert c.inflate(pfns(first[-1])) == [(0, 2 * MiB)]
    high = (4 * GiB) // PAGE
    got = c.inflate(pfns(*range(high, high + 2 * per)))
    assert got == [(3 * GiB, 4 * MiB)]                       # memfd offsets, one run
    assert c.punched_bytes_now == 6 * MiB
    c.deflate(pfns(high + 3))
    assert c.punched_bytes_now == 4 * MiB
    assert c.inflate(pfns(high + 3)) == [(3 * GiB, 2 * MiB)]


def test_ballooned_ranges_are_guest_physical_and_split_at_regions():
    c = BalloonCore(MemoryLayout.pc(4 * GiB))
    low_last = (3 * GiB) // PAGE - 1
    high = (4 * GiB) // PAGE
    c.inflate(pfns(low_last, high, high + 1, 5))
    assert c.ballooned_ranges() == [[5 * PAGE, PAGE], [3 * GiB - PAGE, PAGE], [4 * GiB, 2 * PAGE]]


def test_report_ranges_are_shrunk_to_whole_host_pages():
    c = BalloonCore(MemoryLayout.pc(4 * GiB), 2 * MiB)
    assert c.report(4 * MiB, 4 * MiB) == (4 * MiB, 4 * MiB)
    assert c.report(4 * MiB + 1, 4 * MiB) == (6 * MiB, 2 * MiB)
    assert c.report(4 * MiB, MiB) is None                     # no whole host page inside
    assert c.report(4 * GiB, 2 * MiB) == (3 * GiB, 2 * MiB)
    assert c.report(3 * GiB - MiB, 2 * MiB) is None           # runs into the hole
    assert c.report(-4096, 8192) is None and c.report(0, 0) is None
    assert c.counters["ignored_ranges"] == 3 and c.counters["reported_ranges"] == 4


def test_packed_state_round_trip_and_validation():
    c = BalloonCore(MemoryLayout.pc(64 * MiB))
    c.inflate(pfns(1, 2, 3, 1000))
    d = BalloonCore(MemoryLayout.pc(64 * MiB))
    d.load_packed(c.packed())
    assert d.count == 4 and np.array_equal(d.ballooned, c.ballooned) and d.punched_bytes_now == 4 * PAGE
    with pytest.raises(ValueError):
        d.load_packed(b"not zlib")
    with pytest.raises(ValueError):
        BalloonCore(MemoryLayout.pc(128 * MiB)).load_packed(c.packed())


def test_hostile_pfn_fuzz_never_leaves_the_memfd():
    rng = np.random.default_rng(5)
    c = BalloonCore(MemoryLayout.pc(4 * GiB + 8 * MiB), 2 * MiB)
    for _ in range(200):
        data = rng.integers(0, 256, size=int(rng.integers(0, 400)), dtype=np.uint8).tobytes()
        for off, n in c.inflate(data):
            assert 0 <= off and n > 0 and off + n <= c.memfd_size and off % (2 * MiB) == 0
        c.deflate(data[::-1])
    assert c.count == int(c.ballooned.sum())


def test_bad_host_page_size():
    for bad in (0, 1024, 3 * PAGE):
        with pytest.raises(ValueError):
            BalloonCore(MemoryLayout.pc(64 * MiB), bad)


# --- core: stats ------------------------------------------------------------------------------

def test_parse_stats_entries():
    raw = encode_stats({4: 100, 5: 200, 6: 150, 10: 1, 99: 7, 4: 101})
    stats, unknown, trailing = parse_stats(raw + b"\x01\x02\x03")
    assert stats == {"free_memory": 101, "total_memory": 200, "available_memory": 150, "oom_kills": 1}
    assert unknown == 1 and trailing == 3
    assert len(encode_stats({0: 1})) == 10
    assert parse_stats(b"") == ({}, 0, 0)
    many = encode_stats({0: 1}) * (core.MAX_STAT_ENTRIES + 5)
    assert parse_stats(many)[2] == 50


# --- options, queues, state -----------------------------------------------------------------------

def test_options():
    o = model.parse_options({"args": []})
    assert o["stats_interval"] == model.DEFAULT_STATS_INTERVAL and o["reporting"] and o["deflate_on_oom"]
    o = model.parse_options({"args": ["stats_interval=0.5", "reporting=off", "must_tell_host=on",
                                      "queue_size=64"]})
    assert (o["stats_interval"], o["reporting"], o["must_tell_host"], o["queue_size"]) == (0.5, False, True, 64)
    for bad in (["stats_interval=-1"], ["stats_interval=x"], ["reporting=maybe"], ["queue_size=3"],
                ["bogus"], ["x=1"], [1]):
        with pytest.raises(ValueError):
            model.parse_options({"args": bad})


def test_queue_roles_follow_negotiated_features():
    S, H, R = 1 << model.F_STATS_VQ, 1 << model.F_FREE_PAGE_HINT, 1 << model.F_PAGE_REPORTING
    assert model.queue_roles(0) == {0: "inflate", 1: "deflate"}
    assert model.queue_roles(S | R) == {0: "inflate", 1: "deflate", 2: "stats", 3: "reporting"}
    assert model.queue_roles(R) == {0: "inflate", 1: "deflate", 2: "reporting"}
    assert model.queue_roles(S | H | R)[4] == "reporting"


def good_state(**kw):
    c = BalloonCore(MemoryLayout.pc(64 * MiB))
    s = {"version": 1, "num_pages": 10, "actual": 5, "poison_val": 0, "stats_interval": 5.0,
         "stats_head": 3, "pages": c.pages, "host_page_size": PAGE, "ballooned": c.packed(),
         "counters": {"inflated_pages": 5}}
    s.update(kw)
    return s


def test_state_check():
    assert state.check_state(good_state())["stats_head"] == 3
    for bad in (dict(version=2), dict(num_pages=-1), dict(actual=1 << 32), dict(stats_interval="5"),
                dict(stats_head=-1), dict(host_page_size=6000), dict(ballooned="x"),
                dict(counters={"a": -1}), dict(extra=1)):
        with pytest.raises(ValueError):
            state.check_state(good_state(**bad))
    s = good_state()
    del s["actual"]
    with pytest.raises(ValueError):
        state.check_state(s)
    with pytest.raises(ValueError):
        state.check_compatible(state.check_state(good_state()), 1, PAGE)


# --- JSON-RPC -------------------------------------------------------------------------------------

class FakeDev:
    def __init__(self, fail=None):
        self.spec = type("S", (), {"id": "virtio-balloon3"})()
        self.calls = []
        self.fail = fail
        self.target = 0

    def control(self, op, args=None, timeout=None):
        from bus import endpoint
        self.calls.append((op, args))
        if self.fail:
            raise self.fail
        if args["op"] == "set" and "num_pages" in args["args"]:
            self.target = args["args"]["num_pages"]
        return {"target_pages": self.target, "actual_pages": 384, "stats": {"free_memory": 5},
                "stats_age_s": 1.5, "reclaimed_bytes": 4096, "ignored_pfns": 2}

    operator_control = control  # the API's bounded entry point (vmmd.devlink.ManagedDevice)


class FakeMachine:
    def __init__(self, dev):
        self.dev = dev

    def info(self):
        return {"state": "running", "vcpus": 1, "memory_bytes": 512 * MiB, "uptime_s": 1.0, "devices": []}

    def devices(self):
        return []

    def balloon_device(self):
        return self.dev


def call(machine, method, params=None):
    registry = Registry()
    balloon.register(registry, machine)
    d = Dispatcher(registry)
    req = {"jsonrpc": "2.0", "id": 1, "method": method}
    if params is not None:
        req["params"] = params
    out = asyncio.run(d.handle(json.dumps(req).encode()))
    return json.loads(out)


def test_balloon_set_and_info():
    dev = FakeDev()
    m = FakeMachine(dev)
    r = call(m, "balloon.set", {"size_mib": 256})["result"]
    assert dev.calls[-1] == ("device", {"op": "set", "args": {"num_pages": 256 * 256}})
    assert r["target_mib"] == 256 and r["actual_mib"] == 1.5 and r["device"] == "virtio-balloon3"
    call(m, "balloon.set", {"stats_interval_s": 2})
    assert dev.calls[-1][1] == {"op": "set", "args": {"stats_interval": 2}}
    r = call(m, "balloon.info")["result"]
    assert r["stats"] == {"free_memory": 5} and r["stats_age_s"] == 1.5
    assert r["reclaimed_bytes"] == 4096 and r["ignored_pfns"] == 2


def test_balloon_errors():
    m = FakeMachine(FakeDev())
    for params in ({"size_mib": 513}, {"size_mib": -1}, {"size_mib": "1"}, {}, {"size_mib": 1, "x": 2}):
        assert call(m, "balloon.set", params)["error"]["code"] == jsonrpc.INVALID_PARAMS, params
    assert call(FakeMachine(None), "balloon.info")["error"]["code"] == jsonrpc.NO_SUCH_DEVICE
    assert call(FakeMachine(None), "balloon.set", {"size_mib": 1})["error"]["code"] == jsonrpc.NO_SUCH_DEVICE
    from bus import endpoint
    gone = FakeMachine(FakeDev(endpoint.DeviceGone("crashed")))
    assert call(gone, "balloon.info")["error"]["code"] == jsonrpc.VM_STATE_ERROR
    refused = FakeMachine(FakeDev(endpoint.DeviceControlError("ValueError: no")))
    assert call(refused, "balloon.set", {"size_mib": 1})["error"]["code"] == jsonrpc.INVALID_PARAMS


def test_vmmctl_balloon_commands():
    p = ctl.build_parser()
    a = p.parse_args(["--api-socket", "/x", "balloon", "set", "128"])
    assert a.cmd.method == "balloon.set" and a.cmd.params(a) == {"size_mib": 128}
    a = p.parse_args(["--api-socket", "/x", "balloon", "info"])
    assert a.cmd.method == "balloon.info" and a.cmd.params(a) is None
    with pytest.raises(SystemExit):
        p.parse_args(["--api-socket", "/x", "balloon", "set", "lots"])
