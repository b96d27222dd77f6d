"""ELF parsing/loading and bzImage header parsing / payload extraction."""

from __future__ import annotations

import gzip
import shutil
import struct
import subprocess

import lz4.block
import pytest

from vmmd.boot import BootError
from vmmd.boot import bzimage
from vmmd.boot.elf import ELFCLASS32, PT_LOAD, load_elf, parse_elf
from vmmd.guest_memory import GuestMemory

MiB = 1 << 20


def make_elf64(segments, entry, machine=62, e_type=2):
    """segments: list of (paddr, vaddr, data, memsz). Returns ELF64 bytes."""
    phoff = 64
    data_off = phoff + 56 * len(segments)
    phdrs = b""
    blobs = b""
    for paddr, vaddr, data, memsz in segments:
        off = data_off + len(blobs)
        phdrs += struct.pack("<IIQQQQQQ", PT_LOAD, 7, off, vaddr, paddr, len(data), memsz, 0x1000)
        blobs += data
    ident = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9)
    ehdr = struct.pack("<16sHHIQQQIHHHHHH", ident, e_type, machine, 1, entry, phoff, 0, 0,
                       64, 56, len(segments), 64, 0, 0)
    return ehdr + phdrs + blobs


def make_elf32(paddr, data, memsz, entry):
    ident = b"\x7fELF" + bytes([1, 1, 1]) + bytes(9)
    ehdr = struct.pack("<16sHHIIIIIHHHHHH", ident, 2, 3, 1, entry, 52, 0, 0, 52, 32, 1, 40, 0, 0)
    ph = struct.pack("<IIIIIIII", PT_LOAD, 84, paddr, paddr, len(data), memsz, 7, 0x1000)
    return ehdr + ph + data


@pytest.fixture
def mem():
    m = GuestMemory.create(32 * MiB)
    yield m
    m.close()


def test_parse_and_load_elf64(mem):
    code = b"\x90\x90\xf4"
    data = make_elf64([(0x200000, 0x200000, code, 0x3000)], entry=0x200001)
    img = parse_elf(data)
    assert img.entry == 0x200001 and len(img.segments) == 1
    seg = img.segments[0]
    assert (seg.paddr, seg.filesz, seg.memsz) == (0x200000, 3, 0x3000)
    mem.write(0x200000, b"\xff" * 0x3000)  # stale bytes must be zeroed (bss)
    assert load_elf(mem, data) == 0x200001
    assert mem.read(0x200000, 3) == code
    assert mem.read(0x200003, 0x3000 - 3) == bytes(0x3000 - 3)


def test_virtual_entry_is_translated_to_physical(mem):
    # a kernel linked high, loaded low, with a virtual e_entry
    data = make_elf64([(0x1000000, 0xFFFFFFFF81000000, b"\xf4" * 16, 16)],
                      entry=0xFFFFFFFF81000004)
    assert parse_elf(data).entry_physical() == 0x1000004


def test_elf32(mem):
    data = make_elf32(0x100000, b"\xf4", 0x10, 0x100000)
    img = parse_elf(data)
    assert img.elf_class == ELFCLASS32
    assert load_elf(mem, data) == 0x100000
    assert mem.read_u8(0x100000) == 0xF4


@pytest.mark.parametrize("mutate, msg", [
    (lambda d: b"\x7fELG" + d[4:], "magic"),
    (lambda d: d[:4] + b"\x03" + d[5:], "class"),
    (lambda d: d[:5] + b"\x02" + d[6:], "little-endian"),
    (lambda d: d[:18] + struct.pack("<H", 40) + d[20:], "machine"),
    (lambda d: d[:16] + struct.pack("<H", 1) + d[18:], "type"),
    (lambda d: d[:30], "truncated"),
    (lambda d: d[:32] + struct.pack("<Q", 0x10000) + d[40:], "program headers"),
    (lambda d: d[:56] + struct.pack("<H", 0) + d[58:], "no program headers"),
    (lambda d: d[:70], "program headers"),
    (lambda d: d[:-1], "past the end"),
])
def test_bad_elf_raises(mutate, msg):
    good = make_elf64([(0x200000, 0x200000, b"\x90" * 8, 8)], entry=0x200000)
    parse_elf(good)
    with pytest.raises(BootError, match=msg):
        parse_elf(mutate(good))


def test_filesz_bigger_than_memsz_rejected():
    data = make_elf64([(0x200000, 0x200000, b"\x90" * 8, 4)], entry=0x200000)
    with pytest.raises(BootError, match="filesz"):
        parse_elf(data)


def test_segment_outside_ram_is_boot_error(mem):
    data = make_elf64([(mem.size - 4, mem.size - 4, b"\x90" * 8, 8)], entry=mem.size - 4)
    with pytest.raises(BootError, match="not inside guest RAM"):
        load_elf(mem, data)
    huge = make_elf64([(0x100000, 0x100000, b"", 1 << 40)], entry=0x100000)
    with pytest.raises(BootError):
        load_elf(mem, huge)


@pytest.mark.skipif(not (shutil.which("as") and shutil.which("ld")), reason="binutils missing")
def test_elf_from_binutils(tmp_path, mem):
    (tmp_path / "t.S").write_text(".globl _start\n_start: hlt\n.data\n.quad 0x1122334455667788\n"
                                  ".bss\n.skip 8192\n")
    subprocess.run(["as", "--64", "-o", str(tmp_path / "t.o"), str(tmp_path / "t.S")], check=True)
    subprocess.run(["ld", "-m", "elf_x86_64", "-static", "-nostdlib", "-Ttext=0x300000",
                    "-o", str(tmp_path / "t"), str(tmp_path / "t.o")], check=True)
    data = (tmp_path / "t").read_bytes()
    entry = load_elf(mem, data)
    assert entry == 0x300000
    assert mem.read_u8(0x300000) == 0xF4
    assert any(s.memsz > s.filesz for s in parse_elf(data).segments)


# ---- bzImage ----

def make_bzimage(payload_blob: bytes, *, setup_sects=4, version=0x020F, xloadflags=1,
                 loadflags=bzimage.LOADED_HIGH, pref_address=0x1000000, init_size=0x400000,
                 relocatable=1):
    setup = bytearray((setup_sects + 1) * 512)
    hdr_end = 0x268
    setup[0x1F1] = setup_sects
    struct.pack_into("<H", setup, 0x1FE, 0xAA55)
    setup[0x200] = 0xEB
    setup[0x201] = hdr_end - 0x202
    struct.pack_into("<I", setup, 0x202, bzimage.HDRS_MAGIC)
    struct.pack_into("<H", setup, 0x206, version)
    setup[0x211] = loadflags
    struct.pack_into("<I", setup, 0x22C, 0x7FFFFFFF)
    struct.pack_into("<I", setup, 0x230, 0x200000)
    setup[0x234] = relocatable
    struct.pack_into("<H", setup, 0x236, xloadflags)
    struct.pack_into("<I", setup, 0x238, 2047)
    pm_prefix = b"\xf4" * 0x300  # stands in for the decompressor code
    struct.pack_into("<I", setup, 0x248, len(pm_prefix))
    struct.pack_into("<I", setup, 0x24C, len(payload_blob))
    struct.pack_into("<Q", setup, 0x258, pref_address)
    struct.pack_into("<I", setup, 0x260, init_size)
    return bytes(setup) + pm_prefix + payload_blob + b"\0" * 16


def lz4_legacy(data: bytes, block=8 << 20) -> bytes:
    out = bytearray(bzimage.LZ4_LEGACY_MAGIC)
    for i in range(0, len(data), block):
        c = lz4.block.compress(data[i:i + block], store_size=False, mode="high_compression")
        out += struct.pack("<I", len(c)) + c
    return bytes(out) + struct.pack("<I", len(data))


def fake_vmlinux(size: int) -> bytes:
    body = make_elf64([(0x1000000, 0xFFFFFFFF81000000, b"\xf4" * 64, 64)], entry=0x1000000)
    pattern = bytes((i * 31 + (i >> 9)) & 0xFF for i in range(4096))
    return (body + pattern * (size // 4096 + 1))[:size]


def test_setup_header_parse():
    img = make_bzimage(b"\x1f\x8b" + bytes(30), setup_sects=27)
    hdr = bzimage.parse_setup_header(img)
    assert hdr.setup_sects == 27 and hdr.setup_size == 28 * 512
    assert hdr.version == 0x020F and hdr.kernel_64
    assert hdr.pref_address == 0x1000000 and hdr.init_size == 0x400000
    assert hdr.initrd_addr_max == 0x7FFFFFFF and hdr.cmdline_size == 2047
    assert hdr.kernel_alignment == 0x200000 and hdr.relocatable_kernel == 1
    assert hdr.payload_offset == 0x300 and hdr.header_end == 0x268
    hb = bzimage.setup_header_bytes(img)
    assert len(hb) == 0x268 - 0x1F1 and hb[0] == 27
    assert bzimage.protected_mode_kernel(img)[:0x300] == b"\xf4" * 0x300


def test_setup_sects_zero_means_four():
    img = bytearray(make_bzimage(b"x" * 8, setup_sects=4))
    img[0x1F1] = 0
    assert bzimage.parse_setup_header(bytes(img)).setup_size == 5 * 512


@pytest.mark.parametrize("mutate, msg", [
    (lambda d: d[:0x100], "too short"),
    (lambda d: d[:0x1FE] + b"\0\0" + d[0x200:], "boot flag"),
    (lambda d: d[:0x202] + b"HdrX" + d[0x206:], "HdrS"),
    (lambda d: d[:0x206] + struct.pack("<H", 0x0204) + d[0x208:], "too old"),
    (lambda d: d[:0x24C] + struct.pack("<I", 1 << 30) + d[0x250:], "payload"),
])
def test_bad_bzimage(mutate, msg):
    img = make_bzimage(lz4_legacy(fake_vmlinux(10000)))
    with pytest.raises(BootError, match=msg):
        bzimage.extract_vmlinux(mutate(img))


def test_lz4_legacy_extraction_multi_block():
    vmlinux = fake_vmlinux(9 * MiB + 123)  # two blocks: 8 MiB + the rest
    blob = lz4_legacy(vmlinux)
    assert bzimage.extract_vmlinux(make_bzimage(blob)) == vmlinux


def test_lz4_corrupt_block():
    blob = bytearray(lz4_legacy(fake_vmlinux(100000)))
    blob[20:40] = b"\xff" * 20
    with pytest.raises(BootError):
        bzimage.extract_vmlinux(make_bzimage(bytes(blob)))


def test_lz4_size_trailer_mismatch():
    vmlinux = fake_vmlinux(50000)
    blob = lz4_legacy(vmlinux)[:-4] + struct.pack("<I", 12345)
    with pytest.raises(BootError, match="trailer"):
        bzimage.extract_vmlinux(make_bzimage(blob))


def test_gzip_and_plain_elf_payloads():
    vmlinux = fake_vmlinux(70000)
    gz = gzip.compress(vmlinux)
    assert bzimage.extract_vmlinux(make_bzimage(gz)) == vmlinux
    assert bzimage.extract_vmlinux(make_bzimage(vmlinux)) == vmlinux
    assert bzimage.extract_vmlinux(vmlinux) == vmlinux  # already an ELF


def test_unknown_or_non_elf_payload():
    with pytest.raises(BootError, match="unknown"):
        bzimage.extract_vmlinux(make_bzimage(b"ABCDEFGH" * 4))
    with pytest.raises(BootError, match="not an ELF"):
        bzimage.extract_vmlinux(make_bzimage(gzip.compress(b"hello world" * 10)))
