"""qcow2 and raw images over a file descriptor: the thin I/O layer around format.py.

Qcow2Image serves byte-addressed read/write/discard/write_zeroes/flush with
pread/pwrite on one fd; all parsing and validation of metadata is format.py's.

Crash consistency (kill -9 at any moment leaves no corruption, only leaks;
with fdatasync barriers the same holds for power loss):
  * new clusters come from a pool whose refcounts are written (and made
    durable) before any L2/L1 entry may point at them; a crash leaves unused
    pool clusters as leaks. Free clusters inside the file are taken
    POOL_BYTES at a time (so a crash leaks at most that much of them); once
    the file is full, clusters are claimed past its end, in pools that double
    at each refill up to POOL_MAX_BYTES (a writer filling the disk pays one
    barrier per pool). Those are not leaks: past the end of the file nothing
    is there, qemu-img check ignores their refcounts, and they are
    overwritten when the file grows over them (unless a refcount block
    placed after them grows the file first: then at most one pool leaks);
  * data is written before the L2 entry that maps it; a new L2 table is
    written and made durable before the L1 entry that points at it;
  * a freed cluster (discard, COW of a compressed cluster, old refcount
    table) is unmapped first; its refcount drops only after a barrier, at
    the next flush (a crash in between leaks it);
  * refcount blocks are written before the refcount table entry pointing at
    them, a grown refcount table is written before the header switches to it.
  Metadata is written through (never cached dirty), so a kill -9 of the
  device process loses nothing it acknowledged. FLUSH = fdatasync after the
  pending frees, so everything acknowledged is durable.
"Made durable" for the pool's refcounts and a new L2 table is a write with
RWF_DSYNC (only those pages are written back, then the disk's cache is
flushed), not an fdatasync, which would also write back every dirty data page
of the file: while the guest streams into new clusters that is the
difference between one small synchronous write and writing the stream
synchronously. Without RWF_DSYNC (old kernel, file system refusing it) the
write is followed by fdatasync, as everywhere else.
A write of whole clusters that are not yet allocated in place takes a
contiguous run from the pool: one pwritev of the data, then one pwrite of the
run's L2 entries (same order as one cluster at a time: data, then mapping).
With lazy refcounts (compatible bit 0) the image is marked dirty on the first
write, refcounts are kept in memory and written at close; an image found
dirty at open is repaired (refcounts rebuilt from the L1/L2 tables).
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
import sys
from array import array
from collections import OrderedDict, deque

from devices.virtio_blk.qcow2 import format as fmt
from devices.virtio_blk.qcow2.check import check_image
from devices.virtio_blk.qcow2.format import Qcow2Error

_Q = struct.Struct(">Q")
_SLOW_BITS = fmt.OFLAG_COMPRESSED | fmt.L2E_STD_RESERVED | fmt.OFLAG_ZERO
L2_CACHE_BYTES = 4 << 20
MIN_L2_CACHE = 16
REFBLOCK_CACHE = 32
POOL_BYTES = 1 << 20          # a pool; one taken past the end of the file doubles ...
POOL_MAX_BYTES = 64 << 20     # ... up to this (see the module docstring)
POOL_MAX_CLUSTERS = 1024
MAX_PENDING_FREES = 4096
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
# pwritev2 flag: this write is durable when the call returns (O_DSYNC for one call).
RWF_DSYNC = getattr(os, "RWF_DSYNC", 0)
_NO_DSYNC = (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS)


def _fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _libc_fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


_libc_fallocate = ctypes.CDLL(None, use_errno=True).fallocate
_libc_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_libc_fallocate.restype = ctypes.c_int


class _Cursor:
    """Walks a list of byte buffers, handing out views of the next n bytes."""

    def __init__(self, bufs):
        self.bufs = [b if isinstance(b, memoryview) and b.format == "B" else memoryview(b).cast("B")
                     for b in bufs]
        self.i = 0
        self.pos = 0

    def take(self, n: int) -> list:
        out = []
        bufs = self.bufs
        while n:
            b = bufs[self.i]
            if not self.pos and len(b) <= n:      # a whole buffer: no slicing
                out.append(b)
                n -= len(b)
                self.i += 1
                continue
            k = min(len(b) - self.pos, n)
            out.append(b[self.pos:self.pos + k])
            n -= k
            self.pos += k
            if self.pos == len(b):
                self.i += 1
                self.pos = 0
        return out


def pread_into(fd: int, views: list, offset: int, total: int | None = None) -> None:
    """Fill views (total bytes, if the caller knows) from fd at offset; bytes
    past the end of the file read as zeros."""
    if len(views) <= 1024:
        if total is None:
            total = sum(map(len, views))
        n = os.preadv(fd, views, offset)
        if n == total:
            return
        if n > 0:
            offset += n
            views = _skip(views, n)
    while views:
        n = os.preadv(fd, views[:1024], offset)
        if n <= 0:
            for v in views:
                v[:] = bytes(len(v))
            return
        offset += n
        while views and n >= len(views[0]):
            n -= len(views[0])
            views = views[1:]
        if n:
            views = [views[0][n:]] + views[1:]


def _skip(views: list, n: int) -> list:
    i = 0
    while i < len(views) and n >= len(views[i]):
        n -= len(views[i])
        i += 1
    views = views[i:]
    if n and views:
        views[0] = views[0][n:]
    return views


def pwrite_from(fd: int, views: list, offset: int, total: int | None = None) -> None:
    if len(views) <= 1024:
        if total is None:
            total = sum(map(len, views))
        n = os.pwritev(fd, views, offset)
        if n == total:
            return
        if n > 0:
            offset += n
            views = _skip(views, n)
    while views:
        n = os.pwritev(fd, views[:1024], offset)
        if n <= 0:
            raise OSError(errno.EIO, "short write")
        offset += n
        while views and n >= len(views[0]):
            n -= len(views[0])
            views = views[1:]
        if n:
            views = [views[0][n:]] + views[1:]


def _be_array(data: bytes) -> array:
    a = array("Q", data)
    if sys.byteorder == "little":
        a.byteswap()
    return a


def _be_bytes(a: array) -> bytes:
    if sys.byteorder == "little":
        a = array("Q", a)
        a.byteswap()
    return a.tobytes()


def _fill_zero(views: list) -> None:
    for v in views:
        v[:] = bytes(len(v))


class RawImage:
    """A raw file as an image (backing file, or the raw side of convert)."""

    format = "raw"

    def __init__(self, fd: int, path: str = "", *, read_only: bool = True, sync: bool = True):
        self.fd = fd
        self.path = path
        self.read_only = read_only
        self.sync = sync
        self.size = os.fstat(fd).st_size
        self.backing = None

    def read_into(self, offset: int, views: list) -> None:
        pread_into(self.fd, views, offset)

    def read(self, offset: int, length: int) -> bytes:
        buf = bytearray(length)
        self.read_into(offset, [memoryview(buf)])
        return bytes(buf)

    def write(self, offset: int, data) -> None:
        self.write_from(offset, [memoryview(data).cast("B")])

    def write_from(self, offset: int, views: list) -> None:
        if self.read_only:
            raise Qcow2Error("image is read-only")
        pwrite_from(self.fd, views, offset)
        end = offset + sum(len(v) for v in views)
        self.size = max(self.size, end)

    def write_zeroes(self, offset: int, length: int, unmap: bool = True) -> None:
        self.write(offset, bytes(length))

    def discard(self, offset: int, length: int) -> None:
        pass

    def flush(self) -> None:
        if self.sync and not self.read_only:
            os.fdatasync(self.fd)

    def block_status(self, offset: int, length: int):
        yield offset, length, "data", offset

    def close(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)


class Qcow2Image:
    """An open qcow2 image. Owns fd (and the backing image object, if any)."""

    format = "qcow2"

    def __init__(self, fd: int, path: str = "", *, read_only: bool = False, backing=None,
                 sync: bool = True, repair: bool = True):
        self.fd = fd
        self.path = path
        self.read_only = read_only
        self.backing = backing
        self.sync = sync
        self.file_size = os.fstat(fd).st_size
        head = os.pread(fd, min(self.file_size, 2 << 20), 0)
        h = self.h = fmt.parse_header(head, self.file_size)
        self.cs = h.cluster_size
        self.cb = h.cluster_bits
        self.size = h.size
        self._check_writable(h, head)
        # arrays, not lists: 8 bytes per entry (an L1 table may have 4 Mi entries)
        self.l1 = _be_array(self._read_meta(h.l1_table_offset, h.l1_size * 8))
        nref = h.refcount_table_clusters * self.cs // 8
        self.reftable = _be_array(self._read_meta(h.refcount_table_offset, nref * 8))
        self.meta = {0}
        self._add_meta(h.l1_table_offset, h.l1_size * 8)
        self._add_meta(h.refcount_table_offset, nref * 8)
        if h.nb_snapshots:
            self._add_meta(h.snapshots_offset, 40 * h.nb_snapshots)
        # No two tables may share a cluster: a write through one would corrupt the other.
        for i, e in enumerate(self.reftable):
            off = fmt.reftable_entry_offset(e, h, self.file_size)
            if off:
                self._meta_clash(off, f"refcount table entry {i}")
                self.meta.add(off)
        for i, e in enumerate(self.l1):
            off = fmt.l1_entry_offset(e, h, self.file_size)
            if off:
                self._meta_clash(off, f"L1 entry {i}")
                self.meta.add(off)
        l2_slots = max(MIN_L2_CACHE, L2_CACHE_BYTES // self.cs)
        self.l2_cache: OrderedDict[int, bytearray] = OrderedDict()
        self.l2_cache_max = l2_slots
        self.rb_cache: OrderedDict[int, bytearray] = OrderedDict()
        self.rb_dirty: set[int] = set()
        self.end = -(-self.file_size // self.cs) * self.cs
        self.pool: deque[int] = deque()
        self.pool_base = self.pool_size = max(1, min(64, POOL_BYTES // self.cs))
        self.pool_max = max(self.pool_size, min(POOL_MAX_CLUSTERS, POOL_MAX_BYTES // self.cs))
        self._dsync = RWF_DSYNC
        self.pending_free: list[int] = []
        self.free_hint = 0
        self._no_reuse = False
        self._dirty_marked = h.dirty
        self._zcache: tuple[int, bytes] | None = None
        self.lazy = h.lazy_refcounts and not read_only
        if h.dirty and not read_only:
            if not repair:
                raise Qcow2Error("image is marked dirty (needs a refcount repair)")
            self.check(fix="all")
            self._set_incompatible(self.h.incompatible & ~fmt.INCOMPAT_DIRTY)
            self._dirty_marked = False

    # --- opening -------------------------------------------------------------------

    def _check_writable(self, h: fmt.Header, head: bytes) -> None:
        if self.read_only:
            return
        why = None
        if h.version < 3:
            why = "version 2 images are read-only (vmmd-img convert makes a version 3 copy)"
        elif h.refcount_order != 4:
            why = f"refcount order {h.refcount_order} is read-only (only 16-bit refcounts are written)"
        elif h.nb_snapshots:
            why = "images with internal snapshots are read-only"
        elif h.corrupt:
            why = "the image is marked corrupt"
        elif any(t == fmt.EXT_BITMAPS for t, _ in h.extensions) or h.autoclear & ~fmt.AUTOCLEAR_BITMAPS:
            why = "images with persistent bitmaps or unknown autoclear features are read-only"
        if why:
            raise Qcow2Error(f"{self.path or 'image'}: cannot open for writing: {why}")
        if h.autoclear:
            self._write_header_field(88, struct.pack(">Q", 0))
            h.autoclear = 0

    def _read_meta(self, offset: int, length: int) -> bytes:
        data = os.pread(self.fd, length, offset)
        if len(data) != length:
            raise Qcow2Error(f"metadata at {offset:#x} lies past the end of the file")
        return data

    def _add_meta(self, offset: int, length: int) -> None:
        for c in range(offset, offset + length, self.cs):
            self.meta.add(c - c % self.cs)

    def _meta_clash(self, off: int, what: str) -> None:
        if off in self.meta:
            raise Qcow2Error(f"{what} points into image metadata at {off:#x}")

    def _write_header_field(self, offset: int, data: bytes) -> None:
        os.pwrite(self.fd, data, offset)
        self._barrier()

    def _set_incompatible(self, value: int) -> None:
        self._write_header_field(72, struct.pack(">Q", value))
        self.h.incompatible = value

    def _barrier(self) -> None:
        if self.sync:
            os.fdatasync(self.fd)

    def _write_durable(self, data, offset: int) -> None:
        """pwrite that is durable on return when barriers are on: RWF_DSYNC
        syncs just this range (see the module docstring); else fdatasync."""
        if self.sync and self._dsync:
            try:
                if os.pwritev(self.fd, [data], offset, self._dsync) == len(data):
                    return
            except OSError as exc:
                if exc.errno not in _NO_DSYNC:
                    raise
                self._dsync = 0      # not here: fdatasync from now on
        os.pwrite(self.fd, data, offset)
        self._barrier()

    # --- L2 --------------------------------------------------------------------------

    def _l2_load(self, off: int) -> bytearray:
        t = self.l2_cache.get(off)
        if t is not None:
            self.l2_cache.move_to_end(off)
            return t
        t = bytearray(self._read_meta(off, self.cs))
        self.l2_cache[off] = t
        if len(self.l2_cache) > self.l2_cache_max:
            self.l2_cache.popitem(last=False)
        return t

    def _entry(self, gc: int) -> int:
        """The raw L2 entry of a guest cluster (0 without an L2 table)."""
        i1 = gc >> (self.cb - 3)
        if i1 >= len(self.l1):
            return 0
        l2 = self.l1[i1] & fmt.L1E_OFFSET_MASK
        if not l2:
            return 0
        t = self.l2_cache.get(l2)
        if t is None:
            t = self._l2_load(l2)
        return _Q.unpack_from(t, (gc & ((1 << (self.cb - 3)) - 1)) << 3)[0]

    def _plain(self, gc: int, writing: bool) -> int:
        """Host offset of a plain data cluster (written in place: copied flag
        set), or 0 for anything else (the slow path decides)."""
        e = self._entry(gc)
        off = e & fmt.L2E_OFFSET_MASK
        if not off or e & _SLOW_BITS or off & (self.cs - 1) or (writing and not e & fmt.OFLAG_COPIED):
            return 0
        return self._data_host(off, False)   # an existing cluster lies inside the file

    def _lookup(self, gc: int) -> tuple[int, int, int]:
        """Guest cluster -> (kind, host offset, compressed bytes)."""
        e = self._entry(gc)
        if not e:
            return fmt.UNALLOCATED, 0, 0
        off = e & fmt.L2E_OFFSET_MASK
        if off and not e & _SLOW_BITS and not off & (self.cs - 1):
            return fmt.NORMAL, off, 0   # fast path: a plain data cluster
        return fmt.decode_l2_entry(e, self.h)

    def _data_host(self, host: int, writing: bool) -> int:
        if host >= self.file_size and not writing:
            raise Qcow2Error(f"data cluster {host:#x} lies past the end of the file")
        if host in self.meta:
            raise Qcow2Error(f"data cluster {host:#x} overlaps image metadata")
        return host

    def _set_l2(self, gc: int, entry: int) -> None:
        """Write one L2 entry (allocating the L2 table if needed)."""
        l2 = self._ensure_l2(gc)
        t = self._l2_load(l2)
        idx = (gc & ((1 << (self.cb - 3)) - 1)) << 3
        _Q.pack_into(t, idx, entry)
        os.pwrite(self.fd, t[idx:idx + 8], l2 + idx)

    def _ensure_l2(self, gc: int) -> int:
        i1 = gc >> (self.cb - 3)
        l2 = self.l1[i1] & fmt.L1E_OFFSET_MASK
        if not l2:
            l2 = self._alloc()
            self._meta_clash(l2, "new L2 table")
            self._write_durable(bytes(self.cs), l2)
            self.file_size = max(self.file_size, l2 + self.cs)
            self.meta.add(l2)
            self.l1[i1] = l2 | fmt.OFLAG_COPIED
            os.pwrite(self.fd, _Q.pack(self.l1[i1]), self.h.l1_table_offset + 8 * i1)
        return l2

    # --- refcounts ---------------------------------------------------------------------

    def _rb_load(self, off: int) -> bytearray:
        b = self.rb_cache.get(off)
        if b is not None:
            self.rb_cache.move_to_end(off)
            return b
        b = bytearray(self._read_meta(off, self.cs))
        self.rb_cache[off] = b
        while len(self.rb_cache) > REFBLOCK_CACHE:
            old, ob = next(iter(self.rb_cache.items()))
            if old in self.rb_dirty:
                os.pwrite(self.fd, ob, old)
                self.rb_dirty.discard(old)
            del self.rb_cache[old]
        return b

    def refcount(self, host: int) -> int:
        ci = host >> self.cb
        ti, bi = divmod(ci, self.h.refblock_entries)
        if ti >= len(self.reftable):
            return 0
        off = self.reftable[ti] & fmt.REFT_OFFSET_MASK
        if not off:
            return 0
        return fmt.refcount_get(self._rb_load(off), bi, self.h.refcount_order)

    def _refcount_set(self, host: int, value: int) -> None:
        if self.read_only:
            raise Qcow2Error("image is read-only")
        ci = host >> self.cb
        ti, bi = divmod(ci, self.h.refblock_entries)
        off = self._refblock_for(ti)
        b = self._rb_load(off)
        fmt.refcount_set(b, bi, self.h.refcount_order, value)
        if self.lazy:
            self.rb_dirty.add(off)
        else:
            os.pwrite(self.fd, b[2 * bi:2 * bi + 2], off + 2 * bi)

    def _refcount_add(self, host: int, delta: int) -> None:
        v = self.refcount(host) + delta
        if v < 0:
            raise Qcow2Error(f"refcount of cluster {host:#x} would drop below zero")
        self._refcount_set(host, v)

    def _refblock_for(self, ti: int) -> int:
        """The refcount block for table index ti, allocated if missing."""
        if ti >= len(self.reftable):
            self._grow_reftable(ti + 1)
        off = self.reftable[ti] & fmt.REFT_OFFSET_MASK
        if off:
            return off
        E = self.h.refblock_entries
        off = self.end
        self.end += self.cs
        block = bytearray(self.cs)
        if (off >> self.cb) // E == ti:
            fmt.refcount_set(block, (off >> self.cb) % E, 4, 1)   # counts itself
        else:
            self._refcount_set(off, 1)
        os.pwrite(self.fd, block, off)
        self.file_size = max(self.file_size, off + self.cs)
        self._barrier()
        self.reftable[ti] = off
        self.meta.add(off)
        os.pwrite(self.fd, _Q.pack(off), self.h.refcount_table_offset + 8 * ti)
        self._barrier()
        return off

    def _grow_reftable(self, min_entries: int) -> None:
        cs, E = self.cs, self.h.refblock_entries
        per = cs // 8
        n = max(min_entries, 2 * len(self.reftable))
        while True:
            n = -(-n // per) * per
            if n * 8 > fmt.MAX_REFTABLE_BYTES:
                raise Qcow2Error("the image is too large for its refcount table")
            k = n // per
            start = self.end >> self.cb
            m = 0
            while True:
                span = range(start // E, (start + k + m - 1) // E + 1)
                new_ranges = [t for t in span if t >= len(self.reftable) or not self.reftable[t]]
                if len(new_ranges) == m:
                    break
                m = len(new_ranges)
            if not new_ranges or new_ranges[-1] < n:
                break
            n = new_ranges[-1] + 1
        table = self.reftable + array("Q", bytes(8 * (n - len(self.reftable))))
        table_off = self.end
        blocks = {t: table_off + (k + j) * cs for j, t in enumerate(new_ranges)}
        contents = {t: bytearray(cs) for t in new_ranges}
        for c in range(start, start + k + m):
            t, i = divmod(c, E)
            if t in contents:
                fmt.refcount_set(contents[t], i, 4, 1)
            else:
                self._refcount_set(c << self.cb, 1)   # an existing block: leaks if we crash
        for t, off in blocks.items():
            os.pwrite(self.fd, contents[t], off)
            table[t] = off
        os.pwrite(self.fd, _be_bytes(table), table_off)
        self.end = table_off + (k + m) * cs
        self.file_size = max(self.file_size, self.end)
        self._barrier()
        old_off, old_clusters = self.h.refcount_table_offset, self.h.refcount_table_clusters
        self._write_header_field(48, struct.pack(">QI", table_off, k))
        self.h.refcount_table_offset, self.h.refcount_table_clusters = table_off, k
        self.reftable = table
        self._add_meta(table_off, k * cs)
        self.meta.update(blocks.values())
        self.pending_free.extend(old_off + i * cs for i in range(old_clusters))

    # --- allocation --------------------------------------------------------------------

    def _mark_dirty(self) -> None:
        if self.lazy and not self._dirty_marked:
            self._set_incompatible(self.h.incompatible | fmt.INCOMPAT_DIRTY)
            self._dirty_marked = True

    def _alloc(self) -> int:
        if not self.pool:
            self._refill_pool()
        return self.pool.popleft()

    def _refill_pool(self) -> None:
        """Take pool_base free clusters, or (none left) pool_size clusters
        from the end of the file; set their refcounts to 1, durably."""
        got = self._find_free(self.pool_base) if not self._no_reuse else []
        # Searched up to the end: the clusters claimed below (pool, refcount
        # blocks) are all in use, so the next search starts past them.
        searched_all = not self._no_reuse and self.free_hint >= self.end
        at_end = searched_all or self._no_reuse
        if self.lazy:
            for c in got:
                self._refcount_add(c, 1)
        E = self.h.refblock_entries
        while at_end and len(got) < self.pool_size:
            # Past the end of the file nothing references a cluster: a stale
            # refcount there (an earlier crash's pool) is overwritten, not added to.
            # Claimed (up to the end of one refcount block's range) before
            # that block may be placed, at the new end.
            c = self.end
            ti = (c >> self.cb) // E
            m = min(self.pool_size - len(got), (ti + 1) * E - (c >> self.cb))
            got.extend(range(c, c + m * self.cs, self.cs))
            self.end += m * self.cs
            if self.lazy:
                for x in got[-m:]:
                    self._refcount_set(x, 1)
            else:
                self._refblock_for(ti)
        if searched_all:
            self.free_hint = self.end
        if at_end:
            self.pool_size = min(self.pool_max, 2 * self.pool_size)
        if not self.lazy:
            self._refcounts_to_one(got)
        self.pool.extend(got)

    def _refcounts_to_one(self, clusters: list[int]) -> None:
        """Refcount 1 for clusters (free ones: 0 or past the end of the file),
        written one span per refcount block, each durable on return."""
        E = self.h.refblock_entries
        blocks: dict[int, list[int]] = {}
        last_ti = last = None
        for c in clusters:
            ti, bi = divmod(c >> self.cb, E)
            if ti != last_ti:
                last_ti, last = ti, blocks.setdefault(self._refblock_for(ti), [])
            last.append(bi)
        for off, idx in blocks.items():
            b = self._rb_load(off)
            lo, hi = min(idx), max(idx) + 1
            if hi - lo == len(idx):           # a contiguous range: one slice
                b[2 * lo:2 * hi] = b"\0\1" * (hi - lo)
            else:
                for bi in idx:
                    fmt.refcount_set(b, bi, 4, 1)
            self._write_durable(b[2 * lo:2 * hi], off + 2 * lo)

    def _find_free(self, n: int) -> list[int]:
        out = []
        c = self.free_hint
        limit = self.end
        while c < limit and len(out) < n:
            if c not in self.meta and self.refcount(c) == 0:
                out.append(c)
            c += self.cs
        self.free_hint = c
        return out

    def _free_later(self, host: int) -> None:
        self.pending_free.append(host)
        if len(self.pending_free) >= MAX_PENDING_FREES:
            self._apply_frees()

    def _apply_frees(self) -> None:
        if not self.pending_free:
            return
        if not self.lazy:
            self._barrier()   # the unmapping is durable before the refcount drops
        frees, self.pending_free = self.pending_free, []
        for host in frees:
            self._refcount_add(host, -1)
            if self.refcount(host) == 0:
                self.meta.discard(host)
                self.free_hint = min(self.free_hint, host)

    # --- reading -------------------------------------------------------------------------

    def read_into(self, offset: int, views: list) -> None:
        """Fill views with the guest bytes at offset (past the virtual size: error)."""
        length = sum(map(len, views))
        if offset < 0 or offset + length > self.size:
            raise Qcow2Error(f"read of {length} bytes at {offset} is outside the disk")
        cs, cb, fd = self.cs, self.cb, self.fd
        host = self._contiguous(offset, length, False)
        if host:
            pread_into(fd, views, host, length)
            return
        cur = _Cursor(views)
        pos, end = offset, offset + length
        run_host = run_len = 0
        while pos < end:
            within = pos & (cs - 1)
            n = min(cs - within, end - pos)
            kind, host, cn = self._lookup(pos >> cb)
            if kind == fmt.NORMAL:
                host = self._data_host(host, False) + within
                if run_len and run_host + run_len == host:
                    run_len += n
                else:
                    if run_len:
                        pread_into(fd, cur.take(run_len), run_host)
                    run_host, run_len = host, n
                pos += n
                continue
            if run_len:
                pread_into(fd, cur.take(run_len), run_host)
                run_len = 0
            out = cur.take(n)
            if kind == fmt.COMPRESSED:
                data = self._decompressed(host, cn)
                p = within
                for v in out:
                    v[:] = data[p:p + len(v)]
                    p += len(v)
            elif kind == fmt.UNALLOCATED and self.backing is not None:
                self._read_backing(pos, out)
            else:
                _fill_zero(out)
            pos += n
        if run_len:
            pread_into(fd, cur.take(run_len), run_host)

    def _contiguous(self, offset: int, length: int, writing: bool) -> int:
        """The host offset of [offset, offset+length) if it is one run of plain
        data clusters (the common case: one I/O, the caller's buffers as they are)."""
        cb = self.cb
        gc = offset >> cb
        k = ((offset + length - 1) >> cb) - gc + 1
        bits = cb - 3
        i1, idx = gc >> bits, gc & ((1 << bits) - 1)
        if idx + k > 1 << bits or i1 >= len(self.l1):
            return self._contiguous_slow(offset, length, writing)
        # One L2 table: its entries read straight from the cached table.
        l2 = self.l1[i1] & fmt.L1E_OFFSET_MASK
        if not l2:
            return 0
        t = self.l2_cache.get(l2)
        if t is None:
            t = self._l2_load(l2)
        e = _Q.unpack_from(t, idx << 3)[0]
        host = e & fmt.L2E_OFFSET_MASK
        if not host or e & _SLOW_BITS or host & ((1 << cb) - 1) or (writing and not e & fmt.OFLAG_COPIED):
            return 0
        meta = self.meta
        if host in meta or host + ((k - 1) << cb) >= self.file_size:
            return self._contiguous_slow(offset, length, writing)   # it raises the error
        for i in range(1, k):
            # same flags, next host cluster: the entry is e plus i clusters
            if _Q.unpack_from(t, (idx + i) << 3)[0] != e + (i << cb) or host + (i << cb) in meta:
                return self._contiguous_slow(offset, length, writing)
        return host + (offset & ((1 << cb) - 1))

    def _contiguous_slow(self, offset: int, length: int, writing: bool) -> int:
        cb, cs = self.cb, self.cs
        gc = offset >> cb
        last = (offset + length - 1) >> cb
        host = self._plain(gc, writing)
        if not host:
            return 0
        for i in range(1, last - gc + 1):
            if self._plain(gc + i, writing) != host + (i << cb):
                return 0
        return host + (offset & (cs - 1))

    def _read_backing(self, pos: int, views: list) -> None:
        bsize = self.backing.size
        n = sum(len(v) for v in views)
        if pos + n <= bsize:
            self.backing.read_into(pos, views)
            return
        c = _Cursor(views)
        inside = max(0, bsize - pos)
        if inside:
            self.backing.read_into(pos, c.take(inside))
        _fill_zero(c.take(n - inside))

    def _decompressed(self, host: int, nbytes: int) -> bytes:
        z = self._zcache
        if z is not None and z[0] == host:
            return z[1]
        if host >= self.file_size:
            raise Qcow2Error(f"compressed cluster at {host:#x} lies past the end of the file")
        nbytes = min(nbytes, self.file_size - host, 2 * self.cs + 512)
        data = fmt.decompress(os.pread(self.fd, nbytes, host), self.h.compression_type, self.cs)
        self._zcache = (host, data)
        return data

    def read(self, offset: int, length: int) -> bytes:
        buf = bytearray(length)
        self.read_into(offset, [memoryview(buf)])
        return bytes(buf)

    def _cluster_content(self, gc: int, kind: int, host: int, cn: int) -> bytearray:
        buf = bytearray(self.cs)
        pos = gc << self.cb
        n = min(self.cs, self.size - pos)
        if kind == fmt.NORMAL:
            pread_into(self.fd, [memoryview(buf)], self._data_host(host, False))
        elif kind == fmt.COMPRESSED:
            buf[:] = self._decompressed(host, cn)
        elif kind == fmt.UNALLOCATED and self.backing is not None:
            self._read_backing(pos, [memoryview(buf)[:n]])
        return buf

    # --- writing -------------------------------------------------------------------------

    def _writable(self, offset: int, length: int) -> None:
        if self.read_only:
            raise Qcow2Error("image is read-only")
        if offset < 0 or offset + length > self.size:
            raise Qcow2Error(f"write of {length} bytes at {offset} is outside the disk")
        self._mark_dirty()

    def write(self, offset: int, data) -> None:
        self.write_from(offset, [memoryview(data).cast("B")])

    def write_from(self, offset: int, views: list) -> None:
        length = sum(map(len, views))
        self._writable(offset, length)
        cs, cb, fd = self.cs, self.cb, self.fd
        host = self._contiguous(offset, length, True)
        if host:
            pwrite_from(fd, views, host, length)
            return
        if not (offset | length) & (cs - 1) and self._unallocated(offset >> cb, length >> cb):
            self._write_new_run(offset >> cb, length >> cb, _Cursor(views))
            return            # whole clusters never written (a guest filling its disk)
        cur = _Cursor(views)
        pos, end = offset, offset + length
        run_host = run_len = 0
        l2_span = 1 << (cb - 3)       # guest clusters per L2 table
        while pos < end:
            within = pos & (cs - 1)
            n = min(cs - within, end - pos)
            gc = pos >> cb
            host = self._plain(gc, True)
            if host:
                host += within
                if run_len and run_host + run_len == host:
                    run_len += n
                else:
                    if run_len:
                        pwrite_from(fd, cur.take(run_len), run_host)
                    run_host, run_len = host, n
                pos += n
                continue
            if run_len:
                pwrite_from(fd, cur.take(run_len), run_host)
                run_len = 0
            if n == cs:
                # Whole clusters (no old content to keep): as many as follow
                # in this L2 table, newly allocated as one run.
                k, lim = 1, min(((end - pos) >> cb), l2_span - (gc & (l2_span - 1)))
                while k < lim and not self._plain(gc + k, True):
                    k += 1
                self._write_new_run(gc, k, cur)
                pos += k << cb
                continue
            kind, host, cn = self._lookup(gc)
            self._write_new_cluster(gc, kind, host, cn, within, cur.take(n))
            pos += n
        if run_len:
            pwrite_from(fd, cur.take(run_len), run_host)
            self.file_size = max(self.file_size, run_host + run_len)

    def _write_new_cluster(self, gc: int, kind: int, host: int, cn: int, within: int, views: list) -> None:
        """Copy-on-write / allocate: data first, then the L2 entry, then the old
        cluster's refcount drops (later)."""
        n = sum(len(v) for v in views)
        self._ensure_l2(gc)          # the table first: data clusters stay contiguous
        new = self._alloc()
        self._data_host(new, True)
        if n == self.cs:
            pwrite_from(self.fd, views, new)
        else:
            buf = self._cluster_content(gc, kind, host, cn)
            p = within
            for v in views:
                buf[p:p + len(v)] = v
                p += len(v)
            os.pwrite(self.fd, buf, new)
        self.file_size = max(self.file_size, new + self.cs)
        self._set_l2(gc, new | fmt.OFLAG_COPIED)
        self._release(kind, host, cn)

    def _unallocated(self, gc: int, k: int) -> bool:
        """Guest clusters gc..gc+k-1 lie in one L2 table and none is mapped."""
        bits = self.cb - 3
        i1, idx = gc >> bits, gc & ((1 << bits) - 1)
        if idx + k > 1 << bits or i1 >= len(self.l1):
            return False
        l2 = self.l1[i1] & fmt.L1E_OFFSET_MASK
        if not l2:
            return True
        t = self.l2_cache.get(l2)
        if t is None:
            t = self._l2_load(l2)
        return t.count(0, idx << 3, (idx + k) << 3) == k << 3

    def _write_new_run(self, gc: int, k: int, cur: _Cursor) -> None:
        """Whole guest clusters gc..gc+k-1 (one L2 table) onto new host
        clusters: per contiguous run taken from the pool, the data in one
        pwritev, then the run's L2 entries in one pwrite, then the old
        clusters' refcounts drop (later)."""
        cs, cb = self.cs, self.cb
        l2 = self._ensure_l2(gc)     # the table first: data clusters stay contiguous
        t = self._l2_load(l2)
        first = (gc & ((1 << (cb - 3)) - 1)) << 3
        # the old mappings (mostly none: a cluster written for the first time)
        old = [self._lookup(gc + i) if e else None
               for i, e in enumerate(struct.unpack_from(f">{k}Q", t, first))]
        done = 0
        while done < k:
            new, m = self._alloc_run(k - done)
            pwrite_from(self.fd, cur.take(m << cb), new)
            self.file_size = max(self.file_size, new + (m << cb))
            t = self._l2_load(l2)
            idx = ((gc + done) & ((1 << (cb - 3)) - 1)) << 3
            struct.pack_into(f">{m}Q", t, idx, *range(new | fmt.OFLAG_COPIED,
                                                      (new + (m << cb)) | fmt.OFLAG_COPIED, cs))
            os.pwrite(self.fd, t[idx:idx + 8 * m], l2 + idx)
            for o in old[done:done + m]:
                if o is not None:
                    self._release(*o)
            done += m

    def _alloc_run(self, most: int) -> tuple[int, int]:
        """Up to `most` contiguous clusters from the pool: (first, count)."""
        first = self._data_host(self._alloc(), True)
        n = 1
        pool, cs = self.pool, self.cs
        while n < most:
            if not pool:
                self._refill_pool()   # from the end of the file: usually contiguous
            if pool[0] != first + n * cs:
                break
            self._data_host(pool.popleft(), True)
            n += 1
        return first, n

    def _release(self, kind: int, host: int, cn: int) -> None:
        """The old mapping of a cluster that was just remapped: drop its refs."""
        if kind == fmt.NORMAL or (kind == fmt.ZERO and host):
            self._free_later(host)
        elif kind == fmt.COMPRESSED:
            first = host & ~(self.cs - 1)
            last = (host + cn - 1) & ~(self.cs - 1)
            for c in range(first, last + self.cs, self.cs):
                self._free_later(c)
            self._zcache = None

    def write_zeroes(self, offset: int, length: int, unmap: bool = True) -> None:
        """Zero a range: whole clusters become zero clusters (their host
        clusters are freed), partial ones are written."""
        self._writable(offset, length)
        pos, end = offset, offset + length
        while pos < end:
            within = pos & (self.cs - 1)
            n = min(self.cs - within, end - pos)
            gc = pos >> self.cb
            kind, host, cn = self._lookup(gc)
            whole = within == 0 and (n == self.cs or pos + n == self.size)
            if kind == fmt.ZERO or (kind == fmt.UNALLOCATED and self.backing is None):
                pass
            elif whole:
                self._set_l2(gc, fmt.OFLAG_ZERO)
                self._release(kind, host, cn)
                self._punch(kind, host)
            else:
                self.write(pos, bytes(n))
            pos += n

    def discard(self, offset: int, length: int) -> None:
        """Deallocate the whole clusters of a range (advisory: partial
        clusters are left alone). With a backing file they become zero
        clusters, so the backing data does not show through."""
        self._writable(offset, length)
        cs = self.cs
        pos = -(-offset // cs) * cs
        end = offset + length
        if end != self.size:
            end &= ~(cs - 1)
        while pos < end:
            gc = pos >> self.cb
            kind, host, cn = self._lookup(gc)
            entry = fmt.OFLAG_ZERO if self.backing is not None else 0
            if kind != fmt.UNALLOCATED or entry:
                if not (kind == fmt.ZERO and not host):
                    self._set_l2(gc, entry)
                    self._release(kind, host, cn)
                    self._punch(kind, host)
            pos += cs

    def make_empty(self) -> None:
        """Unmap every cluster (commit's last step): all reads go to the backing file."""
        self._writable(0, 0)
        for off, n, kind, _ in list(self.block_status(0, self.size)):
            if kind == "unallocated":
                continue
            for pos in range(off, off + n, self.cs):
                gc = pos >> self.cb
                k, host, cn = self._lookup(gc)
                if k != fmt.UNALLOCATED:
                    self._set_l2(gc, 0)
                    self._release(k, host, cn)
                    self._punch(k, host)

    def write_compressed(self, offset: int, data: bytes) -> None:
        """Write one whole guest cluster compressed (convert -c). Compressed
        clusters are packed one after another into host clusters; each host
        cluster holds one reference per compressed cluster that touches it."""
        self._writable(offset, len(data))
        if offset % self.cs or len(data) != min(self.cs, self.size - offset):
            raise Qcow2Error("compressed writes cover exactly one cluster")
        packed = fmt.compress(bytes(data) + bytes(self.cs - len(data)), self.h.compression_type)
        if len(packed) >= self.cs - 512:
            self.write(offset, data)
            return
        gc = offset >> self.cb
        self._ensure_l2(gc)
        kind, host, cn = self._lookup(gc)
        cur = getattr(self, "_cpack", None)
        if cur is None or cur[1] + len(packed) > self.cs:
            cur = [self._alloc(), 0]            # refcount 1: this cluster's first user
            first = True
        else:
            first = False
        at = cur[0] + cur[1]
        os.pwrite(self.fd, packed, at)
        self.file_size = max(self.file_size, at + len(packed))
        if not first:
            self._refcount_add(cur[0], 1)
            if not self.lazy:
                self._barrier()
        cur[1] += len(packed)
        self._cpack = cur
        self._set_l2(gc, fmt.encode_compressed(at, len(packed), self.h))
        self._release(kind, host, cn)

    def _punch(self, kind: int, host: int) -> None:
        if kind == fmt.NORMAL or (kind == fmt.ZERO and host):
            try:
                _fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, host, self.cs)
            except OSError:
                pass   # advisory

    def flush(self) -> None:
        """Everything acknowledged so far is durable when this returns."""
        if self.read_only:
            return
        self._apply_frees()
        self._barrier()

    def close_for_backing(self) -> None:
        """Stop writing: give back the pool, apply the frees, make everything
        durable (and clean), and stay open read-only as a backing image."""
        if not self.read_only:
            while self.pool:
                self._free_later(self.pool.popleft())
            self._apply_frees()
            self._write_back_lazy()
            self._barrier()
            self.read_only = True
            self.lazy = False

    def _write_back_lazy(self) -> None:
        if self.lazy and self._dirty_marked:
            for off in list(self.rb_dirty):
                b = self.rb_cache.get(off)
                if b is not None:
                    os.pwrite(self.fd, b, off)
            self.rb_dirty.clear()
            os.fdatasync(self.fd)
            self._set_incompatible(self.h.incompatible & ~fmt.INCOMPAT_DIRTY)
            self._dirty_marked = False

    def close(self) -> None:
        if self.fd < 0:
            return
        try:
            if not self.read_only:
                while self.pool:
                    self._free_later(self.pool.popleft())
                self._apply_frees()
                if self.lazy and self._dirty_marked:
                    self._write_back_lazy()
                elif self.sync:
                    os.fdatasync(self.fd)
        finally:
            fd, self.fd = self.fd, -1
            os.close(fd)
            if self.backing is not None:
                self.backing.close()

    # --- inspection (vmmd-img) ----------------------------------------------------------

    def block_status(self, offset: int, length: int):
        """(offset, length, kind, host) extents of this layer: kind is one of
        'data', 'zero', 'compressed', 'unallocated'."""
        pos, end = offset, offset + length
        cur = None
        while pos < end:
            n = min(self.cs - (pos & (self.cs - 1)), end - pos)
            kind, host, _ = self._lookup(pos >> self.cb)
            name = ("unallocated", "zero", "data", "compressed")[kind]
            h = host + (pos & (self.cs - 1)) if kind == fmt.NORMAL else None
            if cur and cur[2] == name and (h is None or cur[3] is not None and cur[3] + cur[1] == h):
                cur[1] += n
            else:
                if cur:
                    yield tuple(cur)
                cur = [pos, n, name, h]
            pos += n
        if cur:
            yield tuple(cur)

    def set_backing(self, name: str | None, backing_format: str | None) -> None:
        """Rewrite the header with another backing file name (rebase -u)."""
        if self.read_only:
            raise Qcow2Error("image is read-only")
        old = os.pread(self.fd, self.cs, 0)
        self.h.backing_file, self.h.backing_format = name, backing_format if name else None
        new = fmt.encode_header(self.h)
        # One write of the whole header cluster: the old name's bytes are zeroed.
        os.pwrite(self.fd, new + bytes(max(0, len(old) - len(new))), 0)
        self._barrier()

    def check(self, fix: str | None = None) -> dict:
        """Recount every reference and compare with the refcounts.
        fix: None, 'leaks' or 'all'. Returns qemu-img check's counters plus
        'messages' (one line per problem)."""
        return check_image(self, fix)


def open_image(path: str, *, fmt_name: str | None = None, read_only: bool = True,
               sync: bool = True, max_depth: int = 16, _seen=None, _depth: int = 0):
    """Open an image and its backing chain (backing files always read-only).
    fmt_name None: probe (qcow2 magic or raw)."""
    if _depth > max_depth:
        raise Qcow2Error(f"backing chain is longer than {max_depth} images")
    seen = set() if _seen is None else _seen
    try:
        fd = os.open(path, (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC)
    except OSError as exc:
        raise Qcow2Error(f"cannot open {path!r}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        key = (st.st_dev, st.st_ino)
        if key in seen:
            raise Qcow2Error(f"backing chain loops back to {path!r}")
        seen.add(key)
        if fmt_name is None:
            fmt_name = "qcow2" if os.pread(fd, 4, 0) == fmt.MAGIC else "raw"
        if fmt_name == "raw":
            return RawImage(fd, path, read_only=read_only, sync=sync)
        if fmt_name != "qcow2":
            raise Qcow2Error(f"unknown image format {fmt_name!r} (qcow2 or raw)")
        head = os.pread(fd, min(st.st_size, 2 << 20), 0)
        h = fmt.parse_header(head, st.st_size)
        backing = None
        if h.backing_file:
            bpath = backing_path(path, h.backing_file)
            bfmt = h.backing_format
            if bfmt not in (None, "qcow2", "raw"):
                raise Qcow2Error(f"backing file format {bfmt!r} is not supported")
            backing = open_image(bpath, fmt_name=bfmt, read_only=True, sync=sync,
                                 max_depth=max_depth, _seen=seen, _depth=_depth + 1)
        try:
            return Qcow2Image(fd, path, read_only=read_only, backing=backing, sync=sync)
        except BaseException:
            if backing is not None:
                backing.close()
            raise
    except BaseException:
        os.close(fd)
        raise


def backing_path(image_path: str, name: str) -> str:
    """A backing file name as QEMU resolves it: relative to the image's directory."""
    if os.path.isabs(name):
        return name
    return os.path.join(os.path.dirname(os.path.abspath(image_path)), name)


def create_qcow2(path: str, size: int, *, cluster_size: int = 65536, backing_file: str | None = None,
                 backing_format: str | None = None, lazy_refcounts: bool = False,
                 compression_type: int = fmt.COMPRESSION_DEFLATE, exclusive: bool = False) -> fmt.Header:
    bits = cluster_size.bit_length() - 1
    if cluster_size <= 0 or 1 << bits != cluster_size:
        raise Qcow2Error(f"cluster size {cluster_size} is not a power of two")
    h, data = fmt.new_image(size, bits, backing_file=backing_file, backing_format=backing_format,
                            lazy_refcounts=lazy_refcounts, compression_type=compression_type)
    flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | (os.O_EXCL if exclusive else os.O_TRUNC)
    fd = os.open(path, flags, 0o644)
    try:
        os.pwrite(fd, data, 0)
        os.fdatasync(fd)
    finally:
        os.close(fd)
    return h
