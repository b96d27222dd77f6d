"""devices.virtio.dirty_log and DeviceMemory: format, marking, flip/harvest, a racing writer."""

import os
import struct
import threading

import numpy as np
import pytest

from devices.virtio import dirty_log as dl
from devices.virtio.dirty_log import DirtyLog, DirtyLogError
from devices.virtio.memory import DeviceMemory
from vmmd.guest_memory import GiB, GuestMemory, GuestMemoryError, MemoryLayout


def pair(pages):
    """(vmmd side, device side): two mappings of one memfd."""
    vmm = DirtyLog.create(pages)
    dev = DirtyLog.from_fd(os.dup(vmm.fd))
    return vmm, dev


def test_header_format():
    log = DirtyLog.create(1000)
    raw = os.pread(log.fd, 64, 0)
    magic, version, active, shift, pages = struct.unpack_from("<IIIIQ", raw)
    assert (magic, version, active, shift, pages) == (dl.MAGIC, 1, 0, 12, 1000)
    assert raw[:4] == b"VDLG" and raw[24:] == bytes(40)
    assert os.fstat(log.fd).st_size == 64 + 2 * 128   # ceil(1000 / 64) u64 words per bitmap
    log.close()


def test_for_layout_sizes_by_highest_guest_page():
    layout = MemoryLayout.pc(4 * GiB)          # 3 GiB low, 1 GiB at 4 GiB
    log = DirtyLog.for_layout(layout)
    assert log.pages == (5 * GiB) >> 12
    log.mark(5 * GiB - 4096, 4096)             # the last page of high RAM
    assert log.harvest(0).tolist() == [(5 * GiB >> 12) - 1]
    log.close()


def _write_header(fd, **kw):
    h = dict(magic=dl.MAGIC, version=1, active=0, shift=12, pages=100)
    h.update(kw)
    os.pwrite(fd, struct.pack("<IIIIQ", h["magic"], h["version"], h["active"], h["shift"],
                              h["pages"]), 0)


@pytest.mark.parametrize("bad", [dict(magic=0), dict(version=2), dict(active=2), dict(shift=16),
                                 dict(pages=0), dict(pages=1 << 50), dict(pages=10 ** 6)])
def test_from_fd_validates(bad):
    fd = os.memfd_create("dl", os.MFD_CLOEXEC)
    os.ftruncate(fd, dl.file_size(100))
    _write_header(fd, **bad)
    with pytest.raises(DirtyLogError):
        DirtyLog.from_fd(fd)
    os.close(fd)


def test_from_fd_too_small():
    fd = os.memfd_create("dl", os.MFD_CLOEXEC)
    os.ftruncate(fd, 10)
    with pytest.raises(DirtyLogError):
        DirtyLog.from_fd(fd)
    os.close(fd)
    with pytest.raises(DirtyLogError):
        DirtyLog.create(0)


def test_mark_bits_and_ranges():
    vmm, dev = pair(300)
    dev.mark(0x5123, 1)                       # page 5
    dev.mark(7 * 4096 + 4095, 2)              # pages 7 and 8 (crosses a byte boundary)
    dev.mark(20 * 4096, 40 * 4096)            # pages 20..59: partial, full and partial bytes
    dev.mark(62 * 4096, 4096)                 # page 62 exactly
    dev.mark(100 * 4096, 0)                   # nothing
    dev.mark(299 * 4096, 10 * 4096)           # clipped to the last page
    dev.mark(400 * 4096, 4096)                # beyond the log: ignored
    want = [5, 7, 8, *range(20, 60), 62, 299]
    assert vmm.bitmap(0)[0] == (1 << 5) | (1 << 7)
    assert vmm.harvest(0).tolist() == want
    assert vmm.harvest(0).tolist() == []      # cleared
    assert vmm.dirty_count(1) == 0
    vmm.close()
    dev.close()


def test_mark_range_within_one_byte():
    log = DirtyLog.create(64)
    log.mark(2 * 4096, 3 * 4096)              # pages 2..4
    assert log.bitmap(0)[0] == 0b11100
    bm = log.harvest_bitmap(0)
    assert bm[0] == 0b11100 and log.bitmap(0).sum() == 0
    log.close()


def test_flip_switches_where_the_device_marks():
    vmm, dev = pair(64)
    dev.mark(0, 1)
    assert dev.active == 0
    assert vmm.flip() == 0
    assert dev.active == 1
    dev.mark(4096, 1)
    dev.sync()
    assert vmm.harvest(0).tolist() == [0]
    assert vmm.flip() == 1
    assert vmm.harvest(1).tolist() == [1]
    with pytest.raises(DirtyLogError):
        vmm.harvest(2)
    vmm.close()
    dev.close()


def test_write_racing_a_harvest_loses_nothing():
    """One thread marks pages continuously; another flips, syncs (the
    dirty_sync barrier) and harvests. Every mark that completed before a flip
    is in that harvest or an earlier one (a mark racing the flip lands in the
    new active buffer, for the next round), and nothing is lost or duplicated."""
    pages = 1 << 16
    vmm, dev = pair(pages)
    total = 40000
    done = [0]                  # marks completed (pages 0..done-1, in order)
    stop = threading.Event()

    def writer():
        for p in range(total):
            dev.mark((p * 7919 % pages) << 12, 1)   # a permutation of the pages
            done[0] = p + 1
        stop.set()

    harvested = []
    order = [p * 7919 % pages for p in range(total)]
    t = threading.Thread(target=writer)
    t.start()
    rounds = 0
    while True:
        finished = stop.is_set()
        before = done[0]
        old = vmm.flip()
        dev.sync()                                   # CONTROL dirty_sync
        got = vmm.harvest(old)
        harvested.append(got)
        rounds += 1
        seen = set(np.concatenate(harvested).tolist())
        assert all(order[i] in seen for i in range(before)), "a completed mark was lost"
        if finished:
            break
    t.join()
    # the final harvest of both buffers
    for _ in range(2):
        old = vmm.flip()
        dev.sync()
        harvested.append(vmm.harvest(old))
    allp = np.concatenate(harvested)
    assert len(allp) == total == len(set(allp.tolist()))
    assert sorted(allp.tolist()) == sorted(order)
    assert rounds > 1
    vmm.close()
    dev.close()


def test_marks_from_many_threads():
    vmm, dev = pair(4096)
    def w(k):
        for p in range(k, 4096, 8):
            dev.mark(p << 12, 1)
    ts = [threading.Thread(target=w, args=(k,)) for k in range(8)]
    [t.start() for t in ts]
    [t.join() for t in ts]
    assert vmm.harvest(0).tolist() == list(range(4096))   # no lost read-modify-write
    vmm.close()
    dev.close()


# --- DeviceMemory ---------------------------------------------------------------------

@pytest.fixture
def dmem():
    g = GuestMemory.create(8 << 20)
    m = DeviceMemory(g, DirtyLog.for_layout(g.layout))
    yield m
    m.dirty_log.close()
    g.close()


def test_device_memory_write_marks_pages(dmem):
    dmem.write(0x1FFE, b"abcd")
    dmem.write_u16(0x5000, 7)
    dmem.write_u32(0x6000, 7)
    dmem.write_u64(0x7000, 7)
    assert dmem.read(0x1FFE, 4) == b"abcd"
    assert (dmem.read_u16(0x5000), dmem.read_u32(0x6000), dmem.read_u64(0x7000)) == (7, 7, 7)
    assert dmem.dirty_log.harvest(0).tolist() == [1, 2, 5, 6, 7]


def test_device_memory_zero_copy_and_read_only_view(dmem):
    v = dmem.writable_view(0x10000, 8192)
    v[:] = b"x" * 8192
    assert dmem.dirty_log.harvest(0).tolist() == []     # not marked until told
    dmem.mark_dirty(0x10000, 8192)
    assert dmem.dirty_log.harvest(0).tolist() == [16, 17]
    ro = dmem.view(0x10000, 4)
    assert bytes(ro) == b"xxxx"
    with pytest.raises(TypeError):
        ro[0] = 1


@pytest.mark.parametrize("gpa,n", [(8 << 20, 1), ((8 << 20) - 2, 4), (-1, 2), (1 << 62, 8)])
def test_device_memory_bounds(dmem, gpa, n):
    for call in (lambda: dmem.read(gpa, n), lambda: dmem.view(gpa, n),
                 lambda: dmem.write(gpa, b"z" * n), lambda: dmem.writable_view(gpa, n)):
        with pytest.raises(GuestMemoryError):
            call()
    assert not dmem.contains(gpa, n)
    assert dmem.dirty_log.harvest(0).tolist() == []


def test_device_memory_without_log():
    g = GuestMemory.create(1 << 20)
    m = DeviceMemory(g)
    m.write(0, b"a")
    m.mark_dirty(0, 1)
    assert m.read(0, 1) == b"a"
    g.close()
