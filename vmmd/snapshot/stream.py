"""Snapshot sections as a byte stream (sans-I/O): the same sections a snapshot
directory holds, framed for a socket, for live migration (issue 11) to reuse.

Every record carries what a manifest entry does -- kind, instance, section
version, length, SHA-256 -- followed by its payload:

    magic  b"VMSR"        4
    u16    stream format  (STREAM_VERSION)
    u16    len(kind)      <= 32
    u16    len(instance)  <= 64
    u16    reserved (0)
    u32    section version
    u64    payload length <= MAX_PAYLOAD[kind]
    32     SHA-256 of the payload
    kind, instance (ASCII), payload

JSON sections (vm, vcpu, device) carry format.encode_json_section() bytes and
are decoded with format.decode_json_section() (versions upgraded, newer
refused). RAM travels as "ram-run" records, payload = u64 first page then the
run's pages (zero pages are never sent: the receiver's memory starts zeroed;
format.py's RAM digest over the non-zero pages checks the result), and
"ram-zero" records (u64 first page, u64 count) for pages that became zero
after they were sent.

RecordDecoder.feed(bytes) returns the complete records so far; anything
malformed raises StreamError and the decoder stays failed. Nothing is
trusted: every length is bounded before any allocation.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

from vmmd.snapshot import format as fmt

MAGIC = b"VMSR"
STREAM_VERSION = 1
_HEADER = struct.Struct("<4sHHHHIQ32s")
HEADER_SIZE = _HEADER.size
RAM_KINDS = {"ram-run": 1, "ram-zero": 1}
KINDS = {**{k: v for k, v in fmt.SECTION_VERSIONS.items() if k not in fmt.BINARY_KINDS}, **RAM_KINDS}
PAGE = 4096
MAX_PAYLOAD = {"vm": 16 << 20, "vcpu": 1 << 20, "device": 64 << 20,
               "ram-run": 8 + (64 << 20), "ram-zero": 16}


class StreamError(fmt.SnapshotError):
    """A malformed, oversized, corrupted or too new record."""


@dataclass(frozen=True)
class Record:
    kind: str
    instance: str
    version: int
    payload: bytes


def encode_record(kind: str, instance: str, payload: bytes, version: int | None = None,
                  kinds: dict | None = None, max_payload: dict | None = None) -> bytes:
    """kinds/max_payload: extra record kinds of a protocol built on this stream (migration)."""
    kinds = KINDS if kinds is None else {**KINDS, **kinds}
    limits = MAX_PAYLOAD if max_payload is None else {**MAX_PAYLOAD, **max_payload}
    if kind not in kinds:
        raise ValueError(f"unknown record kind {kind!r}")
    k, i = kind.encode("ascii"), instance.encode("ascii")
    if len(payload) > limits[kind]:
        raise ValueError(f"{kind} payload of {len(payload)} bytes is over the limit")
    header = _HEADER.pack(MAGIC, STREAM_VERSION, len(k), len(i), 0, kinds[kind] if version is None else version,
                          len(payload), hashlib.sha256(payload).digest())
    return header + k + i + bytes(payload)


def encode_ram_run(first_page: int, data) -> bytes:
    if len(data) % PAGE or not len(data):
        raise ValueError("a RAM run is a whole number of pages")
    return encode_record("ram-run", "ram", struct.pack("<Q", first_page) + bytes(data))


class RamRunWriter:
    """encode_ram_run() into one buffer reused for every record. The pages are
    copied exactly once (so the SHA-256 covers exactly the bytes sent, even while
    the guest keeps writing its RAM) and no fresh multi-MiB object is allocated
    per record (fresh memory costs a page fault per page, which dominated the
    sender on the development hosts). The result is valid until the next call."""

    def __init__(self, max_pages: int):
        kind, instance = b"ram-run", b"ram"
        self._kl, self._il = len(kind), len(instance)
        self._off = HEADER_SIZE + len(kind) + len(instance)  # where the payload starts
        self.max_pages = max_pages
        self._buf = bytearray(self._off + 8 + max_pages * PAGE)
        self._mv = memoryview(self._buf)
        self._buf[HEADER_SIZE:self._off] = kind + instance

    def encode(self, first_page: int, data) -> memoryview:
        n = len(data)
        if not n or n % PAGE or n // PAGE > self.max_pages:
            raise ValueError(f"a RAM run is 1..{self.max_pages} whole pages")
        off = self._off
        struct.pack_into("<Q", self._buf, off, first_page)
        self._mv[off + 8:off + 8 + n] = data
        payload = self._mv[off:off + 8 + n]
        _HEADER.pack_into(self._buf, 0, MAGIC, STREAM_VERSION, self._kl, self._il, 0, RAM_KINDS["ram-run"],
                          8 + n, hashlib.sha256(payload).digest())
        return self._mv[:off + 8 + n]


def decode_ram_run(rec: Record, pages: int) -> tuple[int, memoryview]:
    """(first page, data) of a ram-run record, checked against a RAM of `pages` pages."""
    if rec.kind != "ram-run" or len(rec.payload) < 8 + PAGE or (len(rec.payload) - 8) % PAGE:
        raise StreamError("malformed ram-run record")
    first = struct.unpack_from("<Q", rec.payload)[0]
    n = (len(rec.payload) - 8) // PAGE
    if first + n > pages:
        raise StreamError(f"ram-run {first}+{n} is outside guest RAM ({pages} pages)")
    return first, memoryview(rec.payload)[8:]


class RecordDecoder:
    """Incremental, sans-I/O: feed() bytes as they arrive, get whole records back."""

    def __init__(self, kinds: dict | None = None, max_payload: dict | None = None):
        """kinds/max_payload: extra record kinds (kind -> version, kind -> bound) a
        protocol built on this stream adds (vmmd/migration/protocol.py)."""
        self._buf = bytearray()
        self._failed: StreamError | None = None
        self._kinds = KINDS if kinds is None else {**KINDS, **kinds}
        self._limits = MAX_PAYLOAD if max_payload is None else {**MAX_PAYLOAD, **max_payload}

    def _fail(self, why: str):
        self._failed = StreamError(why)
        raise self._failed

    def feed(self, data: bytes) -> list[Record]:
        if self._failed:
            raise self._failed
        self._buf += data
        out = []
        while len(self._buf) >= HEADER_SIZE:
            magic, sv, klen, ilen, reserved, version, plen, digest = _HEADER.unpack_from(self._buf)
            if magic != MAGIC:
                self._fail("not a vmmd section stream (bad record magic)")
            if sv > STREAM_VERSION:
                self._fail(f"stream format {sv} is newer than this vmmd supports ({STREAM_VERSION})")
            if sv < 1 or reserved or not 0 < klen <= 32 or not 0 < ilen <= 64:
                self._fail("malformed record header")
            need = HEADER_SIZE + klen + ilen
            if len(self._buf) < need:
                break
            try:
                kind = bytes(self._buf[HEADER_SIZE:HEADER_SIZE + klen]).decode("ascii")
                instance = bytes(self._buf[HEADER_SIZE + klen:need]).decode("ascii")
            except UnicodeDecodeError:
                self._fail("record kind or instance is not ASCII")
            if kind not in self._kinds:
                self._fail(f"unknown record kind {kind!r}")
            if version > self._kinds[kind]:
                self._fail(f"{kind} record version {version} is newer than this vmmd supports "
                           f"({self._kinds[kind]})")
            if version < 1:
                self._fail(f"{kind} record version {version}")
            if plen > self._limits[kind]:
                self._fail(f"{kind} record of {plen} bytes is over the limit")
            if len(self._buf) < need + plen:
                break
            with memoryview(self._buf) as mv, mv[need:need + plen] as sub:
                payload = bytes(sub)  # one copy (slicing the bytearray first would make two)
            if hashlib.sha256(payload).digest() != digest:
                self._fail(f"{kind}/{instance} record: SHA-256 mismatch")
            del self._buf[:need + plen]
            out.append(Record(kind, instance, version, payload))
        return out

    @property
    def pending(self) -> int:
        """Bytes of an incomplete record (non-zero at the end of a stream = truncated)."""
        return len(self._buf)


def json_section_record(kind: str, instance: str, payload: dict) -> bytes:
    """A vm/vcpu/device section as a record (the same bytes a snapshot file holds)."""
    return encode_record(kind, instance, fmt.encode_json_section(kind, instance, payload))


def decode_json_record(rec: Record) -> dict:
    """The section's state (checked, upgraded) from a JSON record."""
    if rec.kind in RAM_KINDS:
        raise StreamError(f"{rec.kind} is not a JSON section")
    entry = fmt.make_section(rec.kind, rec.instance, rec.payload)
    entry = fmt.Section(entry.kind, entry.instance, rec.version, entry.file, entry.size, entry.sha256, {})
    return fmt.decode_json_section(entry, rec.payload)
