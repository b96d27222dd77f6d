"""Guest RAM as page runs with a canonical digest.

Sans-I/O core: RamDigest and page_runs() work on buffers and page numbers,
so a migration stream can reuse them: a run is (first page, page count) of
non-zero pages; zero pages are never sent or written (holes in the sparse
image). The digest covers exactly the non-zero pages (a bitmap of which
pages are non-zero, then their bytes in page order), so it does not depend
on how a file system happens to lay out the image's extents, and it never
has to read holes.

Thin I/O: save_ram() writes the memfd's non-zero pages into a sparse file at
the same offsets (SEEK_DATA/SEEK_HOLE skip never-touched and ballooned
pages without reading them); load_ram() reads a sparse file's data extents
back into guest memory. Both compute the digest on the way.
"""

from __future__ import annotations

import errno
import hashlib
import os
import struct
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np

PAGE = 4096
DIGEST_TAG = b"vmmd-ram-v1"
MAX_RAM = 1 << 40


class RamError(Exception):
    pass


def page_bitmap_bytes(pages: int) -> int:
    return (pages + 7) // 8


class RamDigest:
    """SHA-256 over the non-zero pages of a RAM image of `size` bytes.

    Feed runs of non-zero pages in increasing page order (add_run); the
    digest is sha256(tag, size, sha256(nonzero bitmap), sha256(page bytes))."""

    def __init__(self, size: int):
        if size <= 0 or size % PAGE or size > MAX_RAM:
            raise RamError(f"bad RAM size {size}")
        self.size = size
        self.pages = size // PAGE
        self.nonzero = np.zeros(self.pages, dtype=bool)
        self._data = hashlib.sha256()
        self._next = 0

    def add_run(self, first: int, data) -> None:
        n = len(data) // PAGE
        if len(data) % PAGE or first < self._next or first + n > self.pages:
            raise RamError(f"page run {first}+{n} out of order or outside RAM")
        self.nonzero[first:first + n] = True
        self._data.update(data)
        self._next = first + n

    def hexdigest(self) -> str:
        bitmap = np.packbits(self.nonzero, bitorder="little").tobytes()
        h = hashlib.sha256(DIGEST_TAG)
        h.update(struct.pack("<Q", self.size))
        h.update(hashlib.sha256(bitmap).digest())
        h.update(self._data.digest())
        return h.hexdigest()


def nonzero_pages(buf) -> np.ndarray:
    """Bool per page of `buf` (a multiple of PAGE bytes): True where any byte is set."""
    a = np.frombuffer(buf, dtype=np.uint64)
    return a.reshape(-1, PAGE // 8).any(axis=1)


def page_runs(mask: np.ndarray) -> Iterator[tuple[int, int]]:
    """(first, count) of each run of True in `mask`."""
    if not len(mask):
        return
    m = np.concatenate(([False], mask, [False])).astype(np.int8)
    d = np.diff(m)
    starts = np.flatnonzero(d == 1)
    ends = np.flatnonzero(d == -1)
    for s, e in zip(starts.tolist(), ends.tolist()):
        yield s, e - s


def data_extents(fd: int, size: int, start: int = 0) -> Iterator[tuple[int, int]]:
    """(offset, length) of the data (non-hole) extents of fd within [start, size), page aligned
    (start a multiple of the page size)."""
    pos = start
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                return
            raise
        if start >= size:
            return
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        start -= start % PAGE
        end = min(size, (end + PAGE - 1) // PAGE * PAGE)
        yield start, end - start
        pos = end


CHUNK = 64 << 20  # scan and write in chunks: bounded temporaries


def save_ram(view: memoryview, mem_fd: int, size: int, out_fd: int,
             include: np.ndarray | None = None, progress=None) -> tuple[str, int]:
    """Write the non-zero pages of guest RAM (`view` over memfd `mem_fd`) to
    `out_fd` at their memfd offsets; only pages set in `include` when given
    (a diff). Returns (digest, bytes written). The file is truncated to `size`.

    Scanning and hashing a chunk overlaps with writing the previous one
    (hashlib and pwrite release the GIL)."""
    os.ftruncate(out_fd, 0)
    os.ftruncate(out_fd, size)
    digest = RamDigest(size)
    written = 0
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="ram-write") as writer:
        pending = None
        for start, length in data_extents(mem_fd, size):
            for cstart in range(start, start + length, CHUNK):
                clen = min(CHUNK, start + length - cstart)
                chunk = view[cstart:cstart + clen]
                mask = nonzero_pages(chunk)
                if include is not None:
                    first = cstart // PAGE
                    mask &= include[first:first + len(mask)]
                runs = []
                for first, n in page_runs(mask):
                    off = cstart + first * PAGE
                    data = view[off:off + n * PAGE]
                    digest.add_run(off // PAGE, data)
                    runs.append((data, off))
                    written += n * PAGE
                if pending is not None:
                    pending.result()
                pending = writer.submit(_write_runs, out_fd, runs)
                if progress:
                    progress(cstart + clen)
        if pending is not None:
            pending.result()
    return digest.hexdigest(), written


def _write_runs(fd: int, runs) -> None:
    for data, off in runs:
        _pwrite_all(fd, data, off)


def _pwrite_all(fd: int, data, off: int) -> None:
    while len(data):
        n = os.pwrite(fd, data, off)
        data, off = data[n:], off + n


def load_ram(in_fd: int, size: int, view: memoryview, mask_out: np.ndarray | None = None) -> str:
    """Read the data extents of sparse image `in_fd` into `view` (same offsets);
    returns the digest of what was read. The file must be exactly `size` bytes.
    mask_out (bool per page), when given, gets the non-zero pages. Hashing a
    chunk overlaps with reading the next one."""
    st = os.fstat(in_fd)
    if st.st_size != size:
        raise RamError(f"RAM image is {st.st_size} bytes, expected {size} (truncated?)")
    digest = RamDigest(size)

    def hash_chunk(cstart: int, dest) -> None:
        for first, n in page_runs(nonzero_pages(dest)):
            off = cstart + first * PAGE
            digest.add_run(off // PAGE, dest[off - cstart:off - cstart + n * PAGE])

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="ram-hash") as hasher:
        pending = None
        for start, length in data_extents(in_fd, size):
            for cstart in range(start, start + length, CHUNK):
                clen = min(CHUNK, start + length - cstart)
                dest = view[cstart:cstart + clen]
                got = 0
                while got < clen:
                    n = os.preadv(in_fd, [dest[got:]], cstart + got)
                    if n <= 0:
                        raise RamError("RAM image ended early")
                    got += n
                if pending is not None:
                    pending.result()
                pending = hasher.submit(hash_chunk, cstart, dest)
        if pending is not None:
            pending.result()
    if mask_out is not None:
        mask_out[:] = digest.nonzero
    return digest.hexdigest()


def overlay_ram(in_fd: int, size: int, view: memoryview, listed: np.ndarray) -> str:
    """Apply a diff image: every page set in `listed` takes the image's content
    (zero where the image has a hole); other pages keep theirs. Returns the
    image's digest. A non-zero page outside `listed` is refused (RamError)."""
    st = os.fstat(in_fd)
    if st.st_size != size:
        raise RamError(f"RAM image is {st.st_size} bytes, expected {size} (truncated?)")
    digest = RamDigest(size)
    for start, length in data_extents(in_fd, size):
        for cstart in range(start, start + length, CHUNK):
            clen = min(CHUNK, start + length - cstart)
            buf = bytearray(clen)
            got = 0
            while got < clen:
                n = os.preadv(in_fd, [memoryview(buf)[got:]], cstart + got)
                if n <= 0:
                    raise RamError("RAM image ended early")
                got += n
            mask = nonzero_pages(buf)
            first_page = cstart // PAGE
            if (mask & ~listed[first_page:first_page + len(mask)]).any():
                raise RamError("diff RAM image holds a page its page list does not name")
            for first, n in page_runs(mask):
                off = first * PAGE
                digest.add_run(first_page + first, memoryview(buf)[off:off + n * PAGE])
                view[cstart + off:cstart + off + n * PAGE] = buf[off:off + n * PAGE]
    zero = listed & ~digest.nonzero
    for first, n in page_runs(zero):
        view[first * PAGE:(first + n) * PAGE] = bytes(n * PAGE)
    return digest.hexdigest()
