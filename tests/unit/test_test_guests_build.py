"""Build the test guests and check the ELF files they produce; test checks.py."""

from __future__ import annotations

import struct
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.guests import build, checks  # noqa: E402

PT_LOAD = 1
PT_INTERP = 3
PT_DYNAMIC = 2


def parse_elf(path: Path) -> dict:
    data = path.read_bytes()
    assert data[:4] == b"\x7fELF", "not an ELF file"
    ei_class, ei_data, ei_version = data[4], data[5], data[6]
    (e_type, e_machine, e_version, e_entry, e_phoff, e_shoff, e_flags, e_ehsize,
     e_phentsize, e_phnum) = struct.unpack_from("<HHIQQQIHHH", data, 16)
    phdrs = []
    for i in range(e_phnum):
        (p_type, p_flags, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz,
         p_align) = struct.unpack_from("<IIQQQQQQ", data, e_phoff + i * e_phentsize)
        phdrs.append(dict(type=p_type, flags=p_flags, offset=p_offset, vaddr=p_vaddr,
                          paddr=p_paddr, filesz=p_filesz, memsz=p_memsz, align=p_align))
    return dict(data=data, ei_class=ei_class, ei_data=ei_data, ei_version=ei_version,
                type=e_type, machine=e_machine, entry=e_entry, ehsize=e_ehsize,
                phentsize=e_phentsize, phdrs=phdrs)


def image(elf: dict) -> bytes:
    (seg,) = [p for p in elf["phdrs"] if p["type"] == PT_LOAD]
    return elf["data"][seg["offset"]:seg["offset"] + seg["filesz"]]


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    return build.build_all(tmp_path_factory.mktemp("guests"))


def test_build_all_builds_every_guest(built):
    assert set(built) == {"hello", "hammer", "incrementer", "ticker"}
    for p in built.values():
        assert p.is_file() and p.suffix == ".elf"


@pytest.mark.parametrize("name", build.GUESTS)
def test_elf_layout(built, name):
    elf = parse_elf(built[name])
    assert elf["ei_class"] == 2, "ELFCLASS64"
    assert elf["ei_data"] == 1, "little-endian"
    assert elf["ei_version"] == 1
    assert elf["type"] == 2, "ET_EXEC"
    assert elf["machine"] == 62, "EM_X86_64"
    assert elf["ehsize"] == 64 and elf["phentsize"] == 56
    assert elf["entry"] == build.LOAD_ADDR == 0x100000
    loads = [p for p in elf["phdrs"] if p["type"] == PT_LOAD]
    assert len(loads) == 1
    (seg,) = loads
    assert seg["vaddr"] == seg["paddr"] == 0x100000
    assert 0 < seg["filesz"] <= seg["memsz"] < 0x10000
    assert seg["vaddr"] <= elf["entry"] < seg["vaddr"] + seg["filesz"]
    assert seg["offset"] % 0x1000 == 0
    assert not [p for p in elf["phdrs"] if p["type"] in (PT_INTERP, PT_DYNAMIC)]
    # the image sits above the stack (below 0x80000) and below incrementer's range
    assert seg["vaddr"] + seg["memsz"] <= 0x400000


def test_images_contain_their_strings(built):
    assert checks.HELLO_OUTPUT + b"\0" in image(parse_elf(built["hello"]))
    hammer = image(parse_elf(built["hammer"]))
    for s in (b"HAMMER START\n", b"P1 DONE\n", b"P4 DONE\n", b"CYCLES p1=", b"HAMMER END\n"):
        assert s in hammer
    assert b"PING " in image(parse_elf(built["ticker"]))


def test_entry_starts_with_cld(built):
    for p in built.values():
        assert image(parse_elf(p))[0] == 0xFC  # cld: _start is the first byte


def test_defaults_baked_in(built):
    hammer = image(parse_elf(built["hammer"]))
    # movabs imm64 operands for ITER and MMIO_ADDR
    assert struct.pack("<Q", 20000) in hammer
    assert struct.pack("<Q", 0xD0000000) in hammer
    assert b"\x66\xba" + struct.pack("<H", 0x510) in hammer  # mov $0x510, %dx
    assert b"\x66\xba" + struct.pack("<H", 0x3FF) in hammer
    inc = image(parse_elf(built["incrementer"]))
    assert struct.pack("<Q", 0x400000) in inc and struct.pack("<Q", 0x4000000) in inc
    assert struct.pack("<Q", build.INCREMENTER_DEFAULTS["PASSES_PER_MARK"]) in inc


def test_cache_skips_rebuild(built, tmp_path):
    out = built["hello"].parent
    before = {n: p.stat().st_mtime_ns for n, p in built.items()}
    again = build.build_all(out)
    assert again == built
    assert {n: p.stat().st_mtime_ns for n, p in again.items()} == before


def test_source_change_rebuilds(tmp_path, monkeypatch):
    # copy the sources so the change doesn't touch the tree
    gdir = tmp_path / "src"
    gdir.mkdir()
    for f in list(build.GUEST_DIR.glob("*.S")) + list(build.GUEST_DIR.glob("*.inc")):
        (gdir / f.name).write_bytes(f.read_bytes())
    monkeypatch.setattr(build, "GUEST_DIR", gdir)
    out = tmp_path / "out"
    p1 = build.build_guest("hello", out)
    m1 = p1.stat().st_mtime_ns
    assert build.build_guest("hello", out).stat().st_mtime_ns == m1
    src = gdir / "hello.S"
    src.write_text(src.read_text().replace("Hello from vmmd", "Howdy from vmmd"))
    p2 = build.build_guest("hello", out)
    assert b"Howdy from vmmd" in p2.read_bytes()


def test_hammer_variant(tmp_path):
    p = build.build_hammer(tmp_path, iterations=1234, pio_port=0x2F8 + 7, mmio_addr=0xD0001000)
    assert p.name != "hammer.elf"
    elf = parse_elf(p)
    assert elf["entry"] == 0x100000
    img = image(elf)
    assert struct.pack("<Q", 1234) in img
    assert struct.pack("<Q", 0xD0001000) in img
    assert b"\x66\xba" + struct.pack("<H", 0x2FF) in img
    assert struct.pack("<Q", 20000) not in img
    # the default variant keeps the plain name
    assert build.build_hammer(tmp_path).name == "hammer.elf"


def test_other_variants(tmp_path):
    p = build.build_incrementer(tmp_path, start=0x200000, end=0x300000, passes_per_mark=7)
    img = image(parse_elf(p))
    assert struct.pack("<Q", 0x200000) in img and struct.pack("<Q", 7) in img
    t = build.build_ticker(tmp_path, spin=1000)
    assert struct.pack("<Q", 1000) in image(parse_elf(t))


@pytest.mark.parametrize(
    "kwargs",
    [dict(iterations=-1), dict(pio_port=0x10000), dict(mmio_addr=0xD0000002),
     dict(iterations=True)],
)
def test_hammer_bad_params(tmp_path, kwargs):
    with pytest.raises(ValueError):
        build.build_hammer(tmp_path, **kwargs)


def test_incrementer_bad_range(tmp_path):
    with pytest.raises(ValueError):
        build.build_incrementer(tmp_path, start=0x400800)
    with pytest.raises(ValueError):
        build.build_incrementer(tmp_path, start=0x400000, end=0x400000)


def test_toolchain_missing_is_clear(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(build.ToolchainMissing, match="binutils"):
        build.build_guest("hello", tmp_path / "out", force=True)


def test_unknown_guest(tmp_path):
    with pytest.raises(build.GuestBuildError):
        build.build_guest("nope", tmp_path)


def test_cli(tmp_path, capsys):
    assert build.main(["--out", str(tmp_path), "--json"]) == 0
    out = capsys.readouterr().out
    assert '"hello"' in out and str(tmp_path) in out


# ---- checks.py -----------------------------------------------------------

def _pages(values, start=0x10000):
    mem = {start + i * 4096: v for i, v in enumerate(values)}
    return (lambda a: mem[a]), start, start + len(values) * 4096


@pytest.mark.parametrize(
    "values",
    [[0] * 8, [5] * 8, [6, 6, 6, 5, 5, 5, 5, 5], [0, 0, 255, 255], [1, 0, 0, 0],
     [9, 9, 9, 9, 9, 9, 9, 8]],
)
def test_incrementer_invariant_ok(values):
    ok, msg = checks.check_incrementer_pages(*_pages(values))
    assert ok, msg


@pytest.mark.parametrize(
    "values",
    [[6, 6, 5, 5, 4, 4], [6, 6, 4, 4], [5, 5, 6, 6], [6, 5, 6, 6], [0, 0, 1, 1],
     [7, 7, 7, 3, 7]],
)
def test_incrementer_invariant_broken(values):
    ok, msg = checks.check_incrementer_pages(*_pages(values))
    assert not ok
    assert "0x" in msg


def test_incrementer_checker_default_range_reads_every_page():
    seen = []
    ok, _ = checks.check_incrementer_pages(lambda a: seen.append(a) or 3)
    assert ok
    assert seen[0] == 0x400000 and seen[-1] == 0x4000000 - 4096
    assert len(seen) == (0x4000000 - 0x400000) // 4096


def test_parse_hammer_output():
    out = (b"HAMMER START\nP1 DONE\nP2 DONE\nP3 DONE\nP4 DONE\n"
           b"CYCLES p1=ae201b0c p2=0 p3=1 p4=ff\nHAMMER END\n")
    assert checks.parse_hammer_output(out) == {"p1": 0xAE201B0C, "p2": 0, "p3": 1, "p4": 255}
    with pytest.raises(ValueError):
        checks.parse_hammer_output(out.replace(b"HAMMER END\n", b""))
    with pytest.raises(ValueError):
        checks.parse_hammer_output(out.replace(b"p2=0", b"p2=0x0"))


def test_parse_ticker_output():
    assert checks.parse_ticker_output(b"PING 0\nPING 1\nPING 2\nPI") == [0, 1, 2]
    assert checks.parse_ticker_output("") == []
    with pytest.raises(ValueError):
        checks.parse_ticker_output(b"PING 0\nPING 2\n")
    with pytest.raises(ValueError):
        checks.parse_ticker_output(b"PING 0\nPONG 1\n")
