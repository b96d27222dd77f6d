"""Guest memory: PC layout, bounds checks, sharing through the memfd."""

import os

import pytest

from vmmd.guest_memory import GiB, GuestMemory, GuestMemoryError, MemoryLayout

MiB = 1 << 20


def test_small_guest_is_one_region_at_zero():
    layout = MemoryLayout.pc(64 * MiB)
    assert [(r.gpa, r.size, r.offset) for r in layout.regions] == [(0, 64 * MiB, 0)]


def test_large_guest_skips_the_pci_hole():
    layout = MemoryLayout.pc(5 * GiB)
    assert [(r.gpa, r.size, r.offset) for r in layout.regions] == [
        (0, 3 * GiB, 0), (4 * GiB, 2 * GiB, 3 * GiB)]
    assert layout.total_size == 5 * GiB and layout.end == 6 * GiB
    assert not layout.contains(3 * GiB + 4096)
    assert layout.contains(4 * GiB, 4096)


@pytest.mark.parametrize("size", [0, -4096, 4097])
def test_bad_sizes_are_refused(size):
    with pytest.raises(GuestMemoryError):
        MemoryLayout.pc(size)


def test_accessors_are_bounds_checked():
    mem = GuestMemory.create(2 * MiB)
    try:
        mem.write(0x1000, b"abc")
        assert mem.read(0x1000, 3) == b"abc"
        mem.write_u64(2 * MiB - 8, 0x1122334455667788)
        assert mem.read_u64(2 * MiB - 8) == 0x1122334455667788
        assert mem.read_u32(2 * MiB - 8) == 0x55667788
        for gpa, n in [(2 * MiB - 4, 8), (2 * MiB, 1), (-1, 1), (0, 2 * MiB + 1), (1 << 63, 1)]:
            with pytest.raises(GuestMemoryError):
                mem.read(gpa, n)
        with pytest.raises(GuestMemoryError):
            mem.write(2 * MiB - 1, b"xy")
        with pytest.raises(GuestMemoryError):
            mem.read(0, -1)
    finally:
        mem.close()


def test_a_second_mapping_of_the_memfd_sees_the_same_bytes():
    mem = GuestMemory.create(4 * MiB)
    try:
        other = GuestMemory.from_fd(os.dup(mem.fd), MemoryLayout.from_wire(mem.layout.to_wire()))
        mem.write(0x3000, b"shared")
        assert other.read(0x3000, 6) == b"shared"
        other.write_u16(0x10, 0xBEEF)
        assert mem.read_u16(0x10) == 0xBEEF
        other.close()
    finally:
        mem.close()


def test_punch_hole_frees_pages_and_reads_zero():
    mem = GuestMemory.create(8 * MiB)
    try:
        mem.write(0, b"\xff" * (4 * MiB))
        before = mem.allocated_bytes()
        mem.punch_hole(0, 4 * MiB)
        assert mem.allocated_bytes() <= before - 4 * MiB
        assert mem.read(0, 16) == bytes(16)
    finally:
        mem.close()


@pytest.mark.parametrize("wire", [
    "nope", [], [[0, 4096]], [[0, 4096, 0, 1]], [[1, 4096, 0]], [[0, 0, 0]],
    [[0, 8192, 0], [4096, 4096, 8192]], [[True, 4096, 0]], [[0, 4096, -4096]],
    [[0, 4096, 0]] * 17,
])
def test_layouts_from_another_process_are_validated(wire):
    with pytest.raises(GuestMemoryError):
        MemoryLayout.from_wire(wire)
