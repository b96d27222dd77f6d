"""virtio-balloon through the driver harness (tests/harness): a Python guest
playing Linux's virtio_balloon against a sandboxed device process, through
vmmd's real PCI bus, supervisor and fast path. Host reclaim is measured on
the guest memory memfd itself (GuestMemory.allocated_bytes: st_blocks)."""

from __future__ import annotations

import struct
import time

import pytest

from tests.conftest import requires_root
from tests.harness.balloon import (
    F_DEFLATE_ON_OOM, F_PAGE_POISON, F_PAGE_REPORTING, F_STATS_VQ, PAGE, S_AVAIL, S_MEMFREE,
    S_MEMTOT, S_SWAP_IN, VirtioBalloon, balloon_spec)
from tests.harness.driver import STATUS_NEEDS_RESET, Harness

pytestmark = requires_root

MiB = 1 << 20
SLOT = 3


@pytest.fixture
def harness():
    with Harness(sandbox="on", mem_size=64 * MiB) as h:
        yield h


def start(h, options=("stats_interval=0",), **kw):
    dev = h.add_device(balloon_spec(SLOT, list(options)))
    return dev, VirtioBalloon(h, SLOT, **kw)


def info(dev) -> dict:
    return dev.control("device", {"op": "info"})


def wait_info(dev, pred, timeout: float = 10.0) -> dict:
    """The device's info once pred(info) holds (a kick travels by ioeventfd,
    not in order with the bus, so a CONTROL may be served before it)."""
    deadline = time.monotonic() + timeout
    while True:
        i = info(dev)
        if pred(i):
            return i
        assert time.monotonic() < deadline, f"device info never matched: {i}"
        time.sleep(0.01)


def test_inflate_deflate_exact_accounting_and_memfd_reclaim(harness):
    dev, b = start(harness)
    assert b.drv.has(F_STATS_VQ) and b.drv.has(F_DEFLATE_ON_OOM) and b.drv.has(F_PAGE_REPORTING)
    pages = b.alloc_pages(1000)                  # touched: backed by the memfd now
    before = harness.memory.allocated_bytes()
    b.inflate(pages)
    after = harness.memory.allocated_bytes()
    assert before - after == 1000 * PAGE         # exactly the inflated pages went back to the host
    i = info(dev)
    assert i["ballooned_pages"] == 1000 and i["actual_pages"] == b.actual == 1000
    assert i["reclaimed_bytes"] == i["balloon_reclaimed_bytes"] == 1000 * PAGE
    ranges = dev.control("device", {"op": "pages"})["ranges"]
    assert sum(n for _, n in ranges) == 1000 * PAGE
    assert {g // PAGE + k for g, n in ranges for k in range(n // PAGE)} == set(pages)

    b.deflate(pages[:300])
    i = info(dev)
    assert i["ballooned_pages"] == 700 and i["actual_pages"] == 700
    assert i["balloon_reclaimed_bytes"] == 700 * PAGE
    assert i["deflated_pages"] == 300
    # a deflated page is the guest's again: it refaults as zeroes
    assert harness.memory.read(pages[0] * PAGE, 64) == bytes(64)
    harness.memory.write(pages[0] * PAGE, b"back")
    assert harness.memory.read(pages[0] * PAGE, 4) == b"back"
    b.deflate(pages[300:])
    assert info(dev)["ballooned_pages"] == 0 and b.actual == 0


def test_target_from_vmmd_and_driver_follows(harness):
    dev, b = start(harness)
    pool = b.alloc_pages(512)
    seen = b.drv.config_interrupts()
    res = dev.control("device", {"op": "set", "args": {"num_pages": 512}})
    assert res["target_pages"] == 512
    b.wait_config_change(seen)
    assert b.target == 512
    b.follow_target(pool)
    i = info(dev)
    assert i["actual_pages"] == i["ballooned_pages"] == 512
    dev.control("device", {"op": "set", "args": {"num_pages": 128}})
    b.follow_target(pool)
    assert info(dev)["ballooned_pages"] == 128 == b.actual
    with pytest.raises(Exception, match="num_pages"):
        dev.control("device", {"op": "set", "args": {"num_pages": 64 * MiB // PAGE + 1}})
    with pytest.raises(Exception, match="unknown device op"):
        dev.control("device", {"op": "explode"})


def test_stats_flow_from_the_driver(harness):
    dev, b = start(harness, stats={S_MEMTOT: 64 * MiB, S_MEMFREE: 40 * MiB})
    first = info(dev)                             # the buffer Linux adds before DRIVER_OK
    assert first["stats"] == {"total_memory": 64 * MiB, "free_memory": 40 * MiB}
    assert first["stats_age_s"] is not None and first["stats_updates"] == 1
    # on request
    assert dev.control("device", {"op": "request_stats"}) == {"requested": True}
    b.serve_stats({S_MEMTOT: 64 * MiB, S_MEMFREE: 10 * MiB, S_AVAIL: 12 * MiB, 999: 5})
    i = wait_info(dev, lambda i: i["stats_updates"] == 2)
    assert i["stats"] == {"total_memory": 64 * MiB, "free_memory": 10 * MiB, "available_memory": 12 * MiB}
    assert i["stats_unknown_tags"] == 1 and i["stats_updates"] == 2
    # while the driver has the buffer the device holds none: nothing to return
    assert dev.control("device", {"op": "request_stats"}) == {"requested": True}
    assert dev.control("device", {"op": "request_stats"}) == {"requested": False}
    b.serve_stats({S_SWAP_IN: 7})
    wait_info(dev, lambda i: i["stats"] == {"swap_in": 7})
    # periodic polling: the device returns the buffer by itself
    dev.control("device", {"op": "set", "args": {"stats_interval": 0.05}})
    for n in range(3):
        b.serve_stats({S_SWAP_IN: 100 + n}, timeout=10)
    dev.control("device", {"op": "set", "args": {"stats_interval": 0}})
    assert wait_info(dev, lambda i: i["stats"].get("swap_in", 0) >= 101)["stats_interval_s"] == 0


def test_bad_page_numbers_are_counted_and_ignored(harness):
    dev, b = start(harness)
    good = b.alloc_pages(4)
    before = harness.memory.allocated_bytes()
    ram_pages = 64 * MiB // PAGE
    bad = [ram_pages, ram_pages + 1, (3 << 30) // PAGE, (4 << 30) // PAGE, 0xFFFFFFFF]
    b.send_raw("inflate", struct.pack(f"<{len(bad) + 1}I", *bad, good[0]) + b"\x01\x02")
    b.send_raw("inflate", struct.pack("<I", good[0]))              # duplicate
    b.send_raw("deflate", struct.pack("<2I", good[1], ram_pages))  # not ballooned, outside RAM
    i = info(dev)
    assert i["ignored_pfns"] == len(bad) + 1
    assert i["partial_pfn_bytes"] == 2
    assert i["duplicate_pfns"] == 1 and i["not_ballooned_pfns"] == 1
    assert i["ballooned_pages"] == 1 and i["punch_errors"] == 0
    assert before - harness.memory.allocated_bytes() == PAGE      # only the one good page
    assert not b.drv.status & STATUS_NEEDS_RESET
    b.inflate(good[1:])                                           # still serving
    assert info(dev)["ballooned_pages"] == 4


def test_deflate_on_oom_without_a_host_request(harness):
    dev, b = start(harness)
    assert b.drv.has(F_DEFLATE_ON_OOM)
    pool = b.alloc_pages(256)
    dev.control("device", {"op": "set", "args": {"num_pages": 256}})
    b.follow_target(pool)
    assert b.actual == 256
    b.deflate(b.ballooned[-64:])          # the guest's OOM notifier, target unchanged
    i = info(dev)
    assert i["target_pages"] == 256 and i["ballooned_pages"] == 192 == i["actual_pages"]
    assert i["unrequested_deflates"] == 1


def test_free_page_reporting_reclaims(harness):
    dev, b = start(harness)
    pages = b.alloc_pages(1024)           # 4 MiB, touched
    base = pages[0] * PAGE
    before = harness.memory.allocated_bytes()
    assert b.report([(base, 2 * MiB)]) == 0
    assert before - harness.memory.allocated_bytes() == 2 * MiB
    # a misaligned range: only the whole pages inside it
    mid = base + 2 * MiB
    before = harness.memory.allocated_bytes()
    b.report([(mid + 100, 3 * PAGE)])
    assert before - harness.memory.allocated_bytes() == 2 * PAGE
    i = info(dev)
    assert i["reported_ranges"] == 2 and i["reclaimed_bytes"] == 2 * MiB + 2 * PAGE
    assert i["ballooned_pages"] == 0      # reported pages stay the guest's
    assert harness.memory.read(base, 8) == bytes(8)


def test_reporting_queue_index_without_stats(harness):
    dev, b = start(harness, features=(1 << F_PAGE_REPORTING) | (1 << F_PAGE_POISON))
    assert b.q == {"inflate": 0, "deflate": 1, "reporting": 2}
    pages = b.alloc_pages(16)
    before = harness.memory.allocated_bytes()
    b.report([(pages[0] * PAGE, 8 * PAGE)])
    assert before - harness.memory.allocated_bytes() == 8 * PAGE
    # a non-zero poison value: the pages must keep it, nothing is punched
    b.write_poison(0xAA)
    before = harness.memory.allocated_bytes()
    b.report([(pages[8] * PAGE, 8 * PAGE)])
    assert harness.memory.allocated_bytes() == before
    assert info(dev)["reports_skipped_poison"] == 1


def test_restart_keeps_the_balloon(harness):
    dev, b = start(harness)
    pages = b.alloc_pages(64)
    dev.control("device", {"op": "set", "args": {"num_pages": 64}})
    b.inflate(pages)
    gen = dev.generation
    harness.restart(dev)
    assert dev.generation == gen + 1
    i = info(dev)
    assert i["target_pages"] == 64 and i["ballooned_pages"] == 64 == i["actual_pages"]
    assert i["balloon_reclaimed_bytes"] == 64 * PAGE
    b.deflate(pages[:8])                  # the queues go on where they were
    assert info(dev)["ballooned_pages"] == 56
    # the held stats buffer survived too
    assert dev.control("device", {"op": "request_stats"}) == {"requested": True}
    b.serve_stats({S_MEMFREE: 1})


def test_driver_reset_empties_the_balloon(harness):
    dev, b = start(harness)
    b.inflate(b.alloc_pages(32))
    b.init()                              # reset + re-probe (e.g. a new guest kernel)
    i = info(dev)
    assert i["ballooned_pages"] == 0 and i["actual_pages"] == 0
