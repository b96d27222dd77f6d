"""The balloon's bookkeeping, sans-I/O: page numbers, the ballooned set, which
host pages may be given back, and the stats queue's entries.

Nothing here touches a file: inflate()/report() return the memfd byte ranges
the caller should punch (backend.Reclaimer does the fallocate). Everything
comes from the guest and is hostile: page numbers outside guest RAM (the PCI
hole, beyond the end, a trailing partial u32) are counted and ignored; a
range is only ever returned when it is inside the memfd and made of whole
host pages.

Units (virtio 1.2, 5.5.6): balloon page numbers are le32 PFNs of 4 KiB
pages (VIRTIO_BALLOON_PFN_SHIFT 12) whatever the guest's or host's page
size. The ballooned set is kept per 4 KiB page of the memfd (a numpy bool
array indexed by memfd offset >> 12). A host page (4 KiB normally, 2 MiB
with hugetlbfs) is punched once *all* its 4 KiB pages are in the balloon,
and is considered given back until one of them is deflated (the guest then
refaults it, as zeroes).
"""

from __future__ import annotations

import struct
import zlib

import numpy as np
import numpy.ma  # noqa: F401  (np.unique imports it lazily; the sandbox forbids that later)

from vmmd.guest_memory import GuestMemoryError, MemoryLayout

BALLOON_PAGE_SHIFT = 12
BALLOON_PAGE = 1 << BALLOON_PAGE_SHIFT

# Memory statistics tags (5.5.6.3), plus the later Linux additions.
STAT_NAMES = {
    0: "swap_in", 1: "swap_out", 2: "major_faults", 3: "minor_faults", 4: "free_memory",
    5: "total_memory", 6: "available_memory", 7: "disk_caches", 8: "hugetlb_allocations",
    9: "hugetlb_failures", 10: "oom_kills", 11: "alloc_stalls", 12: "async_scans",
    13: "direct_scans", 14: "async_reclaims", 15: "direct_reclaims",
}
STAT_ENTRY = struct.Struct("<HQ")  # le16 tag, le64 value: 10 bytes, packed
assert STAT_ENTRY.size == 10
MAX_STAT_ENTRIES = 256


def parse_stats(data: bytes) -> tuple[dict[str, int], int, int]:
    """10-byte entries -> ({name: value}, unknown tag count, trailing bytes ignored).

    Unknown tags are ignored (the spec says the device must); a tag given
    twice keeps its last value; at most MAX_STAT_ENTRIES entries are read."""
    n = min(len(data) // STAT_ENTRY.size, MAX_STAT_ENTRIES)
    stats: dict[str, int] = {}
    unknown = 0
    for tag, value in STAT_ENTRY.iter_unpack(data[:n * STAT_ENTRY.size]):
        name = STAT_NAMES.get(tag)
        if name is None:
            unknown += 1
        else:
            stats[name] = value
    return stats, unknown, len(data) - n * STAT_ENTRY.size


def encode_stats(stats: dict[int, int]) -> bytes:
    """tag -> value as the driver lays them out (for tests and the harness)."""
    return b"".join(STAT_ENTRY.pack(t, v) for t, v in stats.items())


class BalloonCore:
    """The ballooned set of one guest memory layout, and the punch decisions."""

    COUNTERS = ("inflated_pages", "deflated_pages", "ignored_pfns", "duplicate_pfns",
                "not_ballooned_pfns", "partial_pfn_bytes", "reported_ranges", "reported_bytes",
                "ignored_ranges", "punched_bytes")

    def __init__(self, layout: MemoryLayout, host_page_size: int = BALLOON_PAGE):
        if (type(host_page_size) is not int or host_page_size < BALLOON_PAGE
                or host_page_size & (host_page_size - 1)):
            raise ValueError(f"host page size {host_page_size!r} is not a power of 2 >= 4096")
        self.layout = layout
        self.host_page_size = host_page_size
        self.ratio = host_page_size // BALLOON_PAGE
        self.memfd_size = layout.total_size
        self.pages = self.memfd_size >> BALLOON_PAGE_SHIFT
        self.host_pages = self.memfd_size // host_page_size   # a partial last one is never punched
        self.ballooned = np.zeros(self.pages, dtype=np.bool_)
        self.punched = np.zeros(self.host_pages, dtype=np.bool_)
        self.count = 0                                        # pages in the balloon
        self.counters = dict.fromkeys(self.COUNTERS, 0)
        self._regions = [(r.gpa, r.end, r.offset) for r in layout.regions]
        _warm_up()


    # --- page numbers -> memfd page indices ------------------------------------

    def page_indices(self, data: bytes) -> np.ndarray:
        """le32 PFNs -> memfd page indices of those inside guest RAM (order kept);
        the others (and a trailing partial PFN) are counted and dropped."""
        whole = len(data) & ~3
        if whole != len(data):
            self.counters["partial_pfn_bytes"] += len(data) - whole
        pfns = np.frombuffer(data, dtype="<u4", count=whole // 4).astype(np.int64)
        gpa = pfns << BALLOON_PAGE_SHIFT
        idx = np.full(pfns.shape, -1, dtype=np.int64)
        for lo, hi, off in self._regions:
            inside = (gpa >= lo) & (gpa + BALLOON_PAGE <= hi)
            idx[inside] = (gpa[inside] - lo + off) >> BALLOON_PAGE_SHIFT
        bad = idx < 0
        nbad = int(bad.sum())
        if nbad:
            self.counters["ignored_pfns"] += nbad
            idx = idx[~bad]
        return idx

    # --- inflate / deflate --------------------------------------------------------

    def inflate(self, data: bytes) -> list[tuple[int, int]]:
        """Put the pages in the balloon; returns memfd (offset, length) runs of
        host pages that became wholly ballooned and should be punched now."""
        idx = self.page_indices(data)
        if not idx.size:
            return []
        uniq = np.unique(idx)
        new = uniq[~self.ballooned[uniq]]
        self.counters["duplicate_pfns"] += int(idx.size - new.size)
        if not new.size:
            return []
        self.ballooned[new] = True
        self.count += int(new.size)
        self.counters["inflated_pages"] += int(new.size)
        hps = np.unique(new // self.ratio)
        hps = hps[hps < self.host_pages]
        if self.ratio > 1:
            full = self.ballooned[:self.host_pages * self.ratio].reshape(-1, self.ratio)[hps].all(axis=1)
            hps = hps[full]
        hps = hps[~self.punched[hps]]
        self.punched[hps] = True
        runs = _runs(hps)
        hs = self.host_page_size
        return [(start * hs, n * hs) for start, n in runs]

    def deflate(self, data: bytes) -> int:
        """Take the pages out of the balloon; returns how many left it."""
        idx = self.page_indices(data)
        if not idx.size:
            return 0
        uniq = np.unique(idx)
        out = uniq[self.ballooned[uniq]]
        self.counters["not_ballooned_pfns"] += int(idx.size - out.size)
        if out.size:
            self.ballooned[out] = False
            hps = out // self.ratio
            self.punched[hps[hps < self.host_pages]] = False
            self.count -= int(out.size)
            self.counters["deflated_pages"] += int(out.size)
        return int(out.size)

    def clear(self) -> None:
        """The driver reset: nothing is in the balloon any more (the punched
        pages refault as zeroes when the guest touches them)."""
        self.ballooned[:] = False
        self.punched[:] = False
        self.count = 0

    # --- free page reporting ----------------------------------------------------------

    def report(self, gpa: int, length: int) -> tuple[int, int] | None:
        """A reported free range -> the memfd (offset, length) of the whole host
        pages inside it, or None (outside RAM, across regions, or no whole page)."""
        try:
            if gpa < 0 or length <= 0:
                raise GuestMemoryError("empty or negative range")
            region = self.layout.region_for(gpa, length)
        except GuestMemoryError:
            self.counters["ignored_ranges"] += 1
            return None
        self.counters["reported_ranges"] += 1
        self.counters["reported_bytes"] += length
        off = region.offset + (gpa - region.gpa)
        hs = self.host_page_size
        start = -(-off // hs) * hs
        end = min((off + length) // hs * hs, self.host_pages * hs)
        if end <= start:
            return None
        return start, end - start

    # --- queries ------------------------------------------------------------------------

    @property
    def punched_bytes_now(self) -> int:
        """Bytes of the balloon that are given back to the host at the moment."""
        return int(self.punched.sum()) * self.host_page_size

    def gpa_of_index(self, i: int) -> int:
        off = i << BALLOON_PAGE_SHIFT
        for lo, hi, roff in self._regions:
            if roff <= off < roff + (hi - lo):
                return lo + off - roff
        raise ValueError(f"memfd page {i} is outside the layout")

    def ballooned_ranges(self) -> list[list[int]]:
        """[[gpa, length], ...] of the ballooned pages (for migration to skip)."""
        out: list[list[int]] = []
        for start, n in _runs(np.flatnonzero(self.ballooned)):
            # split where a run crosses from one region's memfd span into the next
            i, end = start, start + n
            while i < end:
                gpa = self.gpa_of_index(i)
                region = self.layout.region_for(gpa, BALLOON_PAGE)
                stop = min(end, (region.offset + region.size) >> BALLOON_PAGE_SHIFT)
                out.append([gpa, (stop - i) << BALLOON_PAGE_SHIFT])
                i = stop
        return out

    # --- state ---------------------------------------------------------------------------

    def packed(self) -> bytes:
        return zlib.compress(np.packbits(self.ballooned).tobytes(), 1)

    def load_packed(self, blob: bytes) -> None:
        """Replace the ballooned set (ValueError if the blob does not fit)."""
        try:
            raw = zlib.decompress(blob, bufsize=(self.pages + 7) // 8 + 64)
        except zlib.error as exc:
            raise ValueError(f"ballooned bitmap: {exc}") from None
        if len(raw) != (self.pages + 7) // 8:
            raise ValueError(f"ballooned bitmap has {len(raw)} bytes, want {(self.pages + 7) // 8}")
        bits = np.unpackbits(np.frombuffer(raw, dtype=np.uint8), count=self.pages).astype(np.bool_)
        self.ballooned = bits
        self.count = int(bits.sum())
        if self.ratio > 1:
            self.punched = bits[:self.host_pages * self.ratio].reshape(-1, self.ratio).all(axis=1)
        else:
            self.punched = bits[:self.host_pages].copy()


def _runs(sorted_idx: np.ndarray) -> list[tuple[int, int]]:
    """Consecutive runs in a sorted index array: [(start, count), ...]."""
    if not sorted_idx.size:
        return []
    breaks = np.flatnonzero(np.diff(sorted_idx) != 1) + 1
    starts = np.concatenate(([0], breaks))
    ends = np.concatenate((breaks, [sorted_idx.size]))
    return [(int(sorted_idx[s]), int(e - s)) for s, e in zip(starts, ends)]


def _warm_up() -> None:
    """Run every numpy path once: numpy imports some lazily (np.unique pulls in
    numpy.ma), and a device process can no longer open files in its jail."""
    a = np.array([3, 1, 2, 2], dtype=np.int64)
    _runs(np.unique(a))
    np.unpackbits(np.packbits(a > 1), count=4)
    zlib.decompress(zlib.compress(b"x", 1))
