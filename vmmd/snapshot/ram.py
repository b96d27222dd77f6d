"""Guest RAM as page runs with a canonical digest.

Sans-I/O core: RamDigest and page_runs() work on buffers and page numbers,
so a migration stream can reuse them: a run is (first page, page count) of
non-zero pages; zero pages are never sent or written (holes in the sparse
image). The digest covers exactly the non-zero pages (a bitmap of which
pages are non-zero, then their bytes in page order), so it does not depend
on how a file system happens to lay out the image's extents, and it never
has to read holes.

Thin I/O: copy_ram() writes the memfd's non-zero pages into a sparse file at
the same offsets (SEEK_DATA/SEEK_HOLE skip never-touched and ballooned
pages without reading them) and digest_runs() hashes what it wrote, from the
file, so a snapshot pauses the guest only for the copy; load_ram() copies a
sparse file's data extents back into guest memory (in the kernel where it
can) and computes the digest on the way, on another thread than the copy.
"""

from __future__ import annotations

import errno
import hashlib
import mmap
import os
import struct
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

PAGE = 4096
DIGEST_TAG = b"vmmd-ram-v1"
MAX_RAM = 1 << 40
ZERO_PAGE = bytes(PAGE)

# numpy is imported only where whole page masks are handled (diffs, migration):
# the zero-page scan is find() page by page (~0.7 us a page, zero or not, about
# numpy's speed), so `vmmd --restore` does without numpy's ~0.1 s import.


class RamError(Exception):
    pass


def page_bitmap_bytes(pages: int) -> int:
    return (pages + 7) // 8


def _set_bits(bitmap: bytearray, first: int, n: int) -> None:
    """Bits first..first+n-1 of a little-endian bitmap (bit i = byte i//8, bit i%8)."""
    end = first + n
    while first < end and first % 8:
        bitmap[first >> 3] |= 1 << (first & 7)
        first += 1
    whole = (end - first) >> 3
    if whole:
        bitmap[first >> 3:(first >> 3) + whole] = b"\xff" * whole
        first += whole << 3
    while first < end:
        bitmap[first >> 3] |= 1 << (first & 7)
        first += 1


class RamDigest:
    """SHA-256 over the non-zero pages of a RAM image of `size` bytes.

    Feed runs of non-zero pages in increasing page order (add_run); the
    digest is sha256(tag, size, sha256(nonzero bitmap), sha256(page bytes)),
    the bitmap little-endian (page i is bit i % 8 of byte i // 8)."""

    def __init__(self, size: int):
        if size <= 0 or size % PAGE or size > MAX_RAM:
            raise RamError(f"bad RAM size {size}")
        self.size = size
        self.pages = size // PAGE
        self.bitmap = bytearray(page_bitmap_bytes(self.pages))
        self._data = hashlib.sha256()
        self._next = 0

    def add_run(self, first: int, data) -> None:
        n = len(data) // PAGE
        if len(data) % PAGE or first < self._next or first + n > self.pages:
            raise RamError(f"page run {first}+{n} out of order or outside RAM")
        _set_bits(self.bitmap, first, n)
        self._data.update(data)
        self._next = first + n

    @property
    def nonzero(self):
        """The non-zero pages seen, as a numpy bool per page."""
        import numpy as np
        return np.unpackbits(np.frombuffer(bytes(self.bitmap), dtype=np.uint8), count=self.pages,
                             bitorder="little").astype(bool)

    def hexdigest(self) -> str:
        h = hashlib.sha256(DIGEST_TAG)
        h.update(struct.pack("<Q", self.size))
        h.update(hashlib.sha256(self.bitmap).digest())
        h.update(self._data.digest())
        return h.hexdigest()


def nonzero_pages(buf):
    """Bool per page of `buf` (a multiple of PAGE bytes): True where any byte is set."""
    import numpy as np
    a = np.frombuffer(buf, dtype=np.uint64)
    return a.reshape(-1, PAGE // 8).any(axis=1)


def page_runs(mask) -> Iterator[tuple[int, int]]:
    """(first, count) of each run of True in `mask` (a numpy bool array)."""
    import numpy as np
    if not len(mask):
        return
    m = np.concatenate(([False], mask, [False])).astype(np.int8)
    d = np.diff(m)
    starts = np.flatnonzero(d == 1)
    ends = np.flatnonzero(d == -1)
    for s, e in zip(starts.tolist(), ends.tolist()):
        yield s, e - s


def _zero_test(view):
    """is_zero(offset) for the page at `offset` of `view`, without copying it:
    find() of the buffer view exports (mmap, bytearray, bytes) compares the
    page against a zero page in C and stops at the first set byte."""
    obj = view.obj if isinstance(view, memoryview) else view
    find = getattr(obj, "find", None)
    if find is not None and isinstance(view, memoryview) and view.nbytes == len(obj) and view.c_contiguous:
        return lambda off: find(ZERO_PAGE, off, off + PAGE) == off
    return lambda off: bytes(view[off:off + PAGE]) == ZERO_PAGE


def nonzero_runs(view, start: int, end: int, include=None) -> list[tuple[int, int]]:
    """(offset, length) of each run of non-zero pages of view[start:end]
    (page aligned), page by page; with `include` (one byte per page of the
    whole view, non-zero = take), only the pages it takes."""
    is_zero = _zero_test(view)
    runs = []
    run = -1
    for off in range(start, end, PAGE):
        if is_zero(off) or (include is not None and not include[off // PAGE]):
            if run >= 0:
                runs.append((run, off - run))
                run = -1
        elif run < 0:
            run = off
    if run >= 0:
        runs.append((run, end - run))
    return runs


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


CHUNK = 64 << 20  # overlay_ram's read unit: bounded temporaries
SCAN = 4 << 20     # scan for zero pages and hash in pieces that stay in the CPU cache
BATCH = 32 << 20   # hand writes and copies to the other thread in batches this big


def _scan(view, start: int, length: int, include, runs: list, digest=None) -> int:
    """Append to `runs` the (offset, length) of each run of non-zero pages of
    view[start:start+length] (memfd offsets), SCAN bytes at a time; only pages
    set in `include` (bytes, one per page) when given; and feed them to
    `digest` when given, while each piece is in cache. Returns their bytes."""
    found = 0
    for sstart in range(start, start + length, SCAN):
        for off, n in nonzero_runs(view, sstart, min(sstart + SCAN, start + length), include):
            runs.append((off, n))
            found += n
            if digest is not None:
                digest.add_run(off // PAGE, view[off:off + n])
    return found


def save_ram(view: memoryview, mem_fd: int, size: int, out_fd: int,
             include=None, progress=None) -> tuple[str, int]:
    """copy_ram then digest_runs: (digest, bytes written)."""
    runs, written = copy_ram(view, mem_fd, size, out_fd, include, progress)
    return digest_runs(out_fd, size, runs), written


def copy_ram(view: memoryview, mem_fd: int, size: int, out_fd: int,
             include=None, progress=None, digest=None) -> tuple[list, int]:
    """Write the non-zero pages of guest RAM (`view` over memfd `mem_fd`) to
    `out_fd` at their memfd offsets; only pages set in `include` when given
    (a diff). Returns (the runs written, bytes written); the file is
    truncated to `size`. This is the part a snapshot pauses the guest for:
    the digest (digest_runs) can read the file afterwards, while the guest
    runs; or, given `digest` (a RamDigest), this thread feeds it the same
    pages as it finds them, beside the other thread's copy.

    This thread scans for zero pages (no copy: views of guest memory) while a
    writer thread copies the runs found, in batches, memfd to file in the
    kernel (sendfile; pwrite from the mapping where the kernel refuses; both
    release the GIL). Nothing here starts writeback: sync_file_range during the copy made
    it 2.5-4.5x slower (its CPU work lands in the pause) and saved only a
    third of the fsync after it; the caller's fsync, after the resume, does it."""
    if os.fstat(out_fd).st_size:
        # (Not on a new file: ext4 takes a truncate to 0 for "replace via
        # truncate" and flushes the whole file at close, ~0.2 s in the pause
        # for 512 MiB: auto_da_alloc.)
        os.ftruncate(out_fd, 0)
    os.ftruncate(out_fd, size)
    written = 0
    if include is not None:  # numpy bool per page -> one byte per page, cheap to index
        include = include.astype(bool).tobytes()
    all_runs: list = []
    in_kernel = True

    def write_batch(runs) -> None:
        nonlocal in_kernel
        for off, n in runs:
            if in_kernel:
                in_kernel = _sendfile_copied(mem_fd, out_fd, off, n, "guest memory")
                if in_kernel:
                    continue
            _pwrite_all(out_fd, view[off:off + n], off)

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="ram-write") as writer:
        try:
            pending = []
            runs: list = []
            batch = 0
            for start, length in data_extents(mem_fd, size):
                for cstart in range(start, start + length, BATCH):
                    clen = min(BATCH, start + length - cstart)
                    n = _scan(view, cstart, clen, include, runs, digest)
                    written += n
                    batch += n
                    if batch >= BATCH:
                        all_runs += runs
                        pending.append(writer.submit(write_batch, runs))
                        runs, batch = [], 0
                        while len(pending) > 2:   # keep the writer at most two batches behind
                            pending.pop(0).result()
                    if progress:
                        progress(cstart + clen)
            all_runs += runs
            pending.append(writer.submit(write_batch, runs))
            for f in pending:
                f.result()
        finally:
            for f in pending:
                f.cancel()
            writer.shutdown(wait=True)  # no write may land after we return
    return all_runs, written


def digest_runs(fd: int, size: int, runs) -> str:
    """The RAM digest of a RAM image file of `size` bytes whose non-zero pages
    are exactly `runs` ((offset, length), in increasing order: copy_ram's):
    read through a read-only mapping of the file (its page cache; SHA-256
    releases the GIL)."""
    digest = RamDigest(size)
    if not runs:
        return digest.hexdigest()
    with mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ) as m:
        view = memoryview(m)
        try:
            for off, n in runs:
                digest.add_run(off // PAGE, view[off:off + n])
        finally:
            view.release()
    return digest.hexdigest()


# What sendfile raises where the kernel cannot do a copy (then: through the mapping).
_NO_SENDFILE = (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP)


def _sendfile_all(in_fd: int, out_fd: int, off: int, length: int, what: str) -> None:
    """in_fd[off:off+length] to out_fd at the same offset, inside the kernel
    (page cache to page cache: no page faults in this process, no copy
    through a mapping). `what` names in_fd in the error when it ends early."""
    os.lseek(out_fd, off, os.SEEK_SET)   # sendfile then moves the position on
    end = off + length
    while off < end:
        n = os.sendfile(out_fd, in_fd, off, end - off)
        if n <= 0:
            raise RamError(f"{what} ended early")
        off += n


def _sendfile_copied(in_fd: int, out_fd: int, off: int, length: int, what: str) -> bool:
    """_sendfile_all, or False where the kernel cannot (the caller copies
    through its mapping instead; a partial copy is simply redone)."""
    try:
        _sendfile_all(in_fd, out_fd, off, length, what)
        return True
    except OSError as exc:
        if exc.errno not in _NO_SENDFILE:
            raise
        return False


def _pwrite_all(fd: int, data, off: int) -> None:
    while len(data):
        n = os.pwrite(fd, data, off)
        data, off = data[n:], off + n


def _copy_extent(in_fd: int, view, dst_fd: int | None, off: int, length: int) -> None:
    """Image bytes [off, off+length) into guest memory at the same offset: in
    the kernel (sendfile into the memfd: no page faults in this process) when
    `dst_fd` is given and the kernel allows it, else read into the mapping."""
    end = off + length
    if dst_fd is not None and _sendfile_copied(in_fd, dst_fd, off, length, "RAM image"):
        return
    while off < end:
        n = os.preadv(in_fd, [view[off:end]], off)
        if n <= 0:
            raise RamError("RAM image ended early")
        off += n


def load_ram(in_fd: int, size: int, view: memoryview, mask_out=None,
             dst_fd: int | None = None) -> str:
    """Copy the data extents of sparse image `in_fd` into guest memory (`view`,
    the mapping of memfd `dst_fd` when given) at the same offsets; returns the
    digest of what guest memory now holds. The file must be exactly `size`
    bytes. mask_out (bool per page), when given, gets the non-zero pages.

    A copier thread moves the extents in batches; this thread hashes each batch
    from guest memory once it is there, so what is verified is what the guest
    will run with (not the file, which could change under us)."""
    st = os.fstat(in_fd)
    if st.st_size != size:
        raise RamError(f"RAM image is {st.st_size} bytes, expected {size} (truncated?)")
    digest = RamDigest(size)
    pieces = []
    for start, length in data_extents(in_fd, size):
        for cstart in range(start, start + length, BATCH):
            pieces.append((cstart, min(BATCH, start + length - cstart)))
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="ram-copy") as copier:
        copies = [copier.submit(_copy_extent, in_fd, view, dst_fd, off, n) for off, n in pieces]
        try:
            for (off, n), done in zip(pieces, copies):
                done.result()
                _scan(view, off, n, None, [], digest)  # hashed while each piece is in cache
        finally:
            for f in copies:
                f.cancel()
    if mask_out is not None:
        mask_out[:] = digest.nonzero
    return digest.hexdigest()


def overlay_ram(in_fd: int, size: int, view: memoryview, listed) -> str:
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
