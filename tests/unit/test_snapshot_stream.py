"""The section stream (vmmd/snapshot/stream.py): framing, limits, corruption, fuzz."""

from __future__ import annotations

import os
import random

import pytest

from vmmd.snapshot import stream
from vmmd.snapshot.stream import RecordDecoder, StreamError


def _stream():
    return b"".join([
        stream.json_section_record("vm", "vm", {"a": 1, "blob": b"\x00\x01"}),
        stream.json_section_record("device", "2.0", {"version": 1, "q": [1, 2]}),
        stream.encode_ram_run(5, os.urandom(2 * 4096)),
        stream.encode_record("ram-zero", "ram", (7).to_bytes(8, "little") + (3).to_bytes(8, "little")),
    ])


def test_round_trip_in_any_chunking():
    data = _stream()
    rng = random.Random(1)
    for _ in range(50):
        dec, recs, pos = RecordDecoder(), [], 0
        while pos < len(data):
            n = rng.randint(1, 5000)
            recs += dec.feed(data[pos:pos + n])
            pos += n
        assert dec.pending == 0
        assert [r.kind for r in recs] == ["vm", "device", "ram-run", "ram-zero"]
        assert stream.decode_json_record(recs[0]) == {"a": 1, "blob": b"\x00\x01"}
        assert stream.decode_json_record(recs[1]) == {"version": 1, "q": [1, 2]}
        first, pages = stream.decode_ram_run(recs[2], 16)
        assert first == 5 and len(pages) == 2 * 4096


def test_refusals():
    rec = stream.json_section_record("vcpu", "0", {"index": 0})
    bad = bytearray(rec)
    bad[-3] ^= 1
    with pytest.raises(StreamError, match="SHA-256"):
        RecordDecoder().feed(bytes(bad))
    with pytest.raises(StreamError, match="magic"):
        RecordDecoder().feed(b"XXXX" + rec[4:])
    newer = stream.encode_record("vcpu", "0", b"{}", version=99)
    with pytest.raises(StreamError, match="newer"):
        RecordDecoder().feed(newer)
    huge = bytearray(stream.encode_record("vcpu", "0", b"{}"))
    huge[16:24] = (1 << 40).to_bytes(8, "little")  # the payload length field
    with pytest.raises(StreamError, match="over the limit"):
        RecordDecoder().feed(bytes(huge))
    run = RecordDecoder().feed(stream.encode_ram_run(15, bytes(2 * 4096)))[0]
    with pytest.raises(StreamError, match="outside guest RAM"):
        stream.decode_ram_run(run, 16)
    dec = RecordDecoder()
    assert dec.feed(rec[:-1]) == [] and dec.pending  # truncated: the caller sees bytes pending


def test_fuzz_never_raises_anything_but_stream_error():
    data = _stream()
    rng = random.Random(2)
    for _ in range(3000):
        b = bytearray(data)
        for _ in range(rng.randint(1, 6)):
            b[rng.randrange(len(b))] = rng.randrange(256)
        try:
            for r in RecordDecoder().feed(bytes(b)):
                if r.kind in ("vm", "vcpu", "device"):
                    stream.decode_json_record(r)
                elif r.kind == "ram-run":
                    stream.decode_ram_run(r, 64)
        except StreamError:
            pass
        except stream.fmt.SnapshotError:
            pass


def test_ram_run_writer_encodes_the_same_bytes_into_one_buffer():
    import pytest
    from vmmd.migration import protocol
    w = stream.RamRunWriter(8)
    for first, pages in ((0, 1), (7, 8), (123456, 3), (5, 1)):
        data = os.urandom(pages * 4096)
        rec = w.encode(first, memoryview(bytearray(data)))
        assert bytes(rec) == stream.encode_ram_run(first, data) == protocol.ram_run(first, data)
        [dec] = RecordDecoder().feed(bytes(rec))
        assert stream.decode_ram_run(dec, 1 << 20) == (first, data)
    for bad in (b"", bytes(100), bytes(9 * 4096)):
        with pytest.raises(ValueError):
            w.encode(0, bad)
