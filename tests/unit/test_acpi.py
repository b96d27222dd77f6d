"""ACPI tables read back from guest memory, the AML encoder against known
byte sequences, and the sleep control registers."""

from __future__ import annotations

import shutil
import struct
import subprocess

import pytest

from vmmd.acpi_pm import AcpiSleepControl
from vmmd.boot import ACPI_ADDR, ACPI_END, BOOT_PARAMS_ADDR, MPTABLE_ADDR, BootError
from vmmd.boot import acpi, aml, linux
from vmmd.guest_memory import GuestMemory

from test_elf_bzimage import make_elf64

MiB = 1 << 20


@pytest.fixture
def mem():
    m = GuestMemory.create(64 * MiB)
    yield m
    m.close()


def bsum(data: bytes) -> int:
    return sum(data) & 0xFF


# ---- a reader for what the guest sees ----

def read_table(mem, addr: int) -> tuple[bytes, dict]:
    hdr = mem.read(addr, 36)
    sig, length, rev, _csum, oem, table_id, oem_rev, creator, creator_rev = acpi.HEADER.unpack(hdr)
    assert 36 <= length < 0x10000
    data = mem.read(addr, length)
    assert bsum(data) == 0, f"{sig} checksum"
    return data, {"sig": sig, "length": length, "rev": rev, "oem": oem, "table_id": table_id}


def scan_rsdp(mem) -> int:
    """How an OS without boot_params.acpi_rsdp_addr finds it."""
    for addr in range(0xE0000, 0x100000, 16):
        if mem.read(addr, 8) == b"RSD PTR ":
            return addr
    raise AssertionError("no RSDP in 0xe0000-0xfffff")


def read_all(mem, rsdp_addr: int) -> dict:
    rsdp = mem.read(rsdp_addr, 36)
    sig, _c, oem, rev, rsdt, length, xsdt, _xc, _r = acpi.RSDP.unpack(rsdp)
    assert sig == b"RSD PTR " and rev == 2 and length == 36 and rsdt == 0
    assert bsum(rsdp[:20]) == 0 and bsum(rsdp) == 0
    xsdt_data, xh = read_table(mem, xsdt)
    assert xh["sig"] == b"XSDT" and xh["rev"] == 1 and (xh["length"] - 36) % 8 == 0
    tables = {"XSDT": (xsdt_data, xh)}
    for (ptr,) in struct.iter_unpack("<Q", xsdt_data[36:]):
        data, h = read_table(mem, ptr)
        tables[h["sig"].decode()] = (data, h)
    fadt = tables["FACP"][0]
    x_dsdt = struct.unpack_from("<Q", fadt, acpi.FADT_X_DSDT)[0]
    assert struct.unpack_from("<I", fadt, acpi.FADT_DSDT)[0] == x_dsdt
    tables["DSDT"] = read_table(mem, x_dsdt)
    return tables


def madt_entries(madt: bytes) -> list[tuple[int, bytes]]:
    out, off = [], 44
    while off < len(madt):
        etype, elen = madt[off], madt[off + 1]
        assert elen >= 2 and off + elen <= len(madt)
        out.append((etype, madt[off:off + elen]))
        off += elen
    assert off == len(madt)
    return out


# ---- a decoder for the AML subset vmmd emits ----

def dec_pkglen(b: bytes, i: int) -> tuple[int, int]:
    lead = b[i]
    n = lead >> 6
    if n == 0:
        return lead & 0x3F, i + 1
    value = lead & 0x0F
    for k in range(n):
        value |= b[i + 1 + k] << (4 + 8 * k)
    return value, i + 1 + n


def dec_name(b: bytes, i: int) -> tuple[str, int]:
    prefix = ""
    while b[i] in (0x5C, 0x5E):
        prefix += chr(b[i])
        i += 1
    if b[i] == 0x2E:
        count, i = 2, i + 1
    elif b[i] == 0x2F:
        count, i = b[i + 1], i + 2
    elif b[i] == 0:
        return prefix, i + 1
    else:
        count = 1
    segs = [b[i + 4 * k:i + 4 * k + 4].decode() for k in range(count)]
    return prefix + ".".join(segs), i + 4 * count


def dec_term(b: bytes, i: int):
    op = b[i]
    if op in (0x00, 0x01):
        return op, i + 1
    if op == 0xFF:
        return (1 << 64) - 1, i + 1
    for prefix, size in ((0x0A, 1), (0x0B, 2), (0x0C, 4), (0x0E, 8)):
        if op == prefix:
            return int.from_bytes(b[i + 1:i + 1 + size], "little"), i + 1 + size
    if op == 0x0D:
        end = b.index(0, i + 1)
        return b[i + 1:end].decode(), end + 1
    if op == 0x12:
        length, j = dec_pkglen(b, i + 1)
        end = i + 1 + length
        count, j = b[j], j + 1
        items = []
        while j < end:
            item, j = dec_term(b, j)
            items.append(item)
        assert j == end and len(items) == count
        return items, end
    if op == 0x11:
        length, j = dec_pkglen(b, i + 1)
        end = i + 1 + length
        size, j = dec_term(b, j)
        assert end - j == size
        return bytes(b[j:end]), end
    raise AssertionError(f"unexpected AML byte {op:#x} at {i}")


def dec_termlist(b: bytes, i: int, end: int, scope: str, names: dict) -> None:
    while i < end:
        op = b[i]
        if op == 0x08:
            n, j = dec_name(b, i + 1)
            value, i = dec_term(b, j)
            names[n if n.startswith("\\") else f"{scope}.{n}".lstrip(".")] = value
        elif op == 0x10 or (op == 0x5B and b[i + 1] == 0x82):
            start = i + 1 if op == 0x10 else i + 2
            length, j = dec_pkglen(b, start)
            n, j = dec_name(b, j)
            inner = n.lstrip("\\") if n.startswith("\\") else f"{scope}.{n}".lstrip(".")
            if op != 0x10:
                names[inner] = "Device"
            dec_termlist(b, j, start + length, inner, names)
            i = start + length
        else:
            raise AssertionError(f"unexpected AML opcode {op:#x} at {i}")
    assert i == end


def dsdt_names(dsdt: bytes) -> dict:
    names: dict = {}
    dec_termlist(dsdt, 36, len(dsdt), "", names)
    return names


# ---- tables ----

@pytest.mark.parametrize("ncpus", [1, 2, 8])
def test_tables_read_back(mem, ncpus):
    rsdp = acpi.write_acpi_tables(mem, ncpus)
    assert rsdp == ACPI_ADDR and rsdp % 16 == 0 and scan_rsdp(mem) == rsdp
    tables = read_all(mem, rsdp)
    assert set(tables) == {"XSDT", "FACP", "APIC", "DSDT"}
    for name, (data, h) in tables.items():
        assert h["oem"] == acpi.OEM_ID
    # everything lies between ACPI_ADDR and the MP table, no overlap
    built = acpi.build_acpi_tables(ACPI_ADDR, ncpus)
    spans = sorted([(ACPI_ADDR, ACPI_ADDR + 36)] + [
        (addr, addr + len(tables[sig][0])) for sig, addr in built.tables.items()])
    for (a0, a1), (b0, _b1) in zip(spans, spans[1:]):
        assert a1 <= b0
    assert spans[-1][1] <= ACPI_END <= MPTABLE_ADDR
    assert all(a % 8 == 0 for a, _ in spans)

    madt, h = tables["APIC"]
    assert h["rev"] == acpi.MADT_REVISION
    lapic_addr, flags = struct.unpack_from("<II", madt, 36)
    assert lapic_addr == 0xFEE00000 and flags & acpi.MADT_PCAT_COMPAT
    entries = madt_entries(madt)
    lapics = [e for t, e in entries if t == acpi.MADT_LOCAL_APIC]
    assert len(lapics) == ncpus
    for cpu, e in enumerate(lapics):
        _t, length, uid, apic_id, eflags = acpi.LOCAL_APIC_ENTRY.unpack(e)
        assert (length, uid, apic_id) == (8, cpu, cpu) and eflags & 1
    ioapics = [e for t, e in entries if t == acpi.MADT_IO_APIC]
    assert len(ioapics) == 1
    _t, length, ioapic_id, _r, address, gsi_base = acpi.IO_APIC_ENTRY.unpack(ioapics[0])
    assert (length, ioapic_id, address, gsi_base) == (12, ncpus, 0xFEC00000, 0)
    assert not [e for t, e in entries if t == acpi.MADT_INTERRUPT_OVERRIDE]
    nmis = [e for t, e in entries if t == acpi.MADT_LOCAL_APIC_NMI]
    assert len(nmis) == 1
    assert acpi.LOCAL_APIC_NMI_ENTRY.unpack(nmis[0]) == (4, 6, 0xFF, 0, 1)
    assert {t for t, _ in entries} == {0, 1, 4}


def test_fadt_fields(mem):
    tables = read_all(mem, acpi.write_acpi_tables(mem, 2))
    fadt, h = tables["FACP"]
    assert h["rev"] == 6 and h["length"] == 276
    assert fadt[acpi.FADT_MINOR_VERSION] == acpi.FADT_MINOR_REVISION
    flags = struct.unpack_from("<I", fadt, acpi.FADT_FLAGS)[0]
    assert flags & acpi.FADT_HW_REDUCED_ACPI and flags & acpi.FADT_RESET_REG_SUP
    boot_arch = struct.unpack_from("<H", fadt, acpi.FADT_IAPC_BOOT_ARCH)[0]
    assert boot_arch & acpi.BOOT_ARCH_VGA_NOT_PRESENT
    assert not boot_arch & acpi.BOOT_ARCH_8042
    assert not boot_arch & acpi.BOOT_ARCH_CMOS_RTC_NOT_PRESENT
    assert not boot_arch & acpi.BOOT_ARCH_MSI_NOT_SUPPORTED
    # reset register: I/O port 0xcf9, 8 bits, value 6
    assert acpi.GAS.unpack_from(fadt, acpi.FADT_RESET_REG) == (1, 8, 0, 1, 0xCF9)
    assert fadt[acpi.FADT_RESET_VALUE] == 0x06
    # sleep registers: I/O, 8 bits, byte access, at the ports AcpiSleepControl serves
    ctl = acpi.GAS.unpack_from(fadt, acpi.FADT_SLEEP_CONTROL_REG)
    sts = acpi.GAS.unpack_from(fadt, acpi.FADT_SLEEP_STATUS_REG)
    assert ctl == (1, 8, 0, 1, acpi.SLEEP_CONTROL_PORT)
    assert sts == (1, 8, 0, 1, acpi.SLEEP_STATUS_PORT)
    ports = {(r.base, r.length) for r in AcpiSleepControl.RANGES}
    assert ports == {(ctl[4], 1), (sts[4], 1)}
    # no FACS, no SCI, no SMI command port, no legacy PM blocks (fixed or X_)
    assert struct.unpack_from("<I", fadt, acpi.FADT_FIRMWARE_CTRL)[0] == 0
    assert struct.unpack_from("<Q", fadt, acpi.FADT_X_FIRMWARE_CTRL)[0] == 0
    assert struct.unpack_from("<H", fadt, acpi.FADT_SCI_INT)[0] == 0
    assert struct.unpack_from("<I", fadt, acpi.FADT_SMI_CMD)[0] == 0
    assert fadt[acpi.FADT_PM1A_EVT_BLK:acpi.FADT_PM1A_EVT_BLK + 40] == bytes(40)
    assert fadt[acpi.FADT_X_PM1A_EVT_BLK:acpi.FADT_SLEEP_CONTROL_REG] == bytes(96)


def test_dsdt_s5_and_pci_host_bridge(mem):
    irqs = [(0, 1, 0, 16), (0, 3, 2, 18)]
    tables = read_all(mem, acpi.write_acpi_tables(mem, 2, pci_irqs=irqs))
    dsdt, h = tables["DSDT"]
    assert h["rev"] == 2
    names = dsdt_names(dsdt)
    assert names["_S5_"] == [5, 0]
    assert names["_SB_.PCI0"] == "Device"
    assert names["_SB_.PCI0._HID"] == 0x030AD041  # EISAID("PNP0A03")
    assert names["_SB_.PCI0._PRT"] == [[0x1FFFF, 0, 0, 16], [0x3FFFF, 2, 0, 18]]
    crs = names["_SB_.PCI0._CRS"]
    assert crs.endswith(b"\x79\x00")
    assert aml.io_port(0xCF8, 8) in crs and aml.word_bus_number(0, 0xFF) in crs

    acpi.write_acpi_tables(mem, 1, pci=False)
    names = dsdt_names(read_all(mem, ACPI_ADDR)["DSDT"][0])
    assert names == {"_S5_": [5, 0]}


def test_errors(mem):
    for n in (0, 255):
        with pytest.raises(BootError):
            acpi.write_acpi_tables(mem, n)
    with pytest.raises(BootError, match="overrun"):
        acpi.write_acpi_tables(mem, 8, ACPI_END - 64)
    with pytest.raises(BootError, match="aligned"):
        acpi.build_acpi_tables(ACPI_ADDR + 4, 1)
    with pytest.raises(BootError, match="bus 0"):
        acpi.build_acpi_tables(ACPI_ADDR, 1, pci_irqs=[(1, 0, 0, 16)])
    # the largest machine still fits below the MP table
    acpi.write_acpi_tables(mem, 254, pci_irqs=[(0, d, 0, 16 + d % 8) for d in range(1, 32)])


def test_load_linux_sets_rsdp_and_keeps_mptable(mem):
    vmlinux = make_elf64([(0x1000000, 0xFFFFFFFF81000000, b"\xf4" * 4096, 0x200000)],
                         entry=0x1000000)
    info = linux.load_linux(mem, vmlinux, None, "console=ttyS0", ncpus=4)
    rsdp = mem.read_u64(BOOT_PARAMS_ADDR + linux.BP_ACPI_RSDP_ADDR)
    assert rsdp == info.acpi_rsdp_addr == ACPI_ADDR
    madt = read_all(mem, rsdp)["APIC"][0]
    assert len([t for t, _ in madt_entries(madt) if t == acpi.MADT_LOCAL_APIC]) == 4
    assert mem.read(MPTABLE_ADDR, 4) == b"_MP_"

    mem.write(ACPI_ADDR, bytes(64))
    info = linux.load_linux(mem, vmlinux, None, "", ncpus=1, acpi=False)
    assert info.acpi_rsdp_addr == 0
    assert mem.read_u64(BOOT_PARAMS_ADDR + linux.BP_ACPI_RSDP_ADDR) == 0
    assert mem.read(ACPI_ADDR, 8) == bytes(8)


@pytest.mark.skipif(shutil.which("iasl") is None, reason="iasl (acpica-tools) not installed")
def test_iasl_disassembles_tables(tmp_path):
    built = acpi.build_acpi_tables(ACPI_ADDR, 2, pci_irqs=[(0, 1, 0, 16)])
    for sig, addr in built.tables.items():
        off = addr - ACPI_ADDR
        length = struct.unpack_from("<I", built.blob, off + 4)[0]
        path = tmp_path / f"{sig.lower()}.dat"
        path.write_bytes(built.blob[off:off + length])
        subprocess.run(["iasl", "-d", str(path)], check=True, capture_output=True, cwd=tmp_path)
        text = (tmp_path / f"{sig.lower()}.dsl").read_text()
        assert "Incorrect checksum" not in text and "Error" not in text
    dsdt = (tmp_path / "dsdt.dsl").read_text()
    assert "Name (_S5, Package (0x02)" in dsdt and 'EisaId ("PNP0A03")' in dsdt
    assert "Hardware Reduced (V5) : 1" in (tmp_path / "facp.dsl").read_text()


DSDT_ASL = r"""
DefinitionBlock ("", "DSDT", 2, "VMMD  ", "VMMDDSDT", 0x00000001)
{
    Name (_S5, Package () { 0x05, Zero })
    Scope (\_SB)
    {
        Device (PCI0)
        {
            Name (_HID, EisaId ("PNP0A03"))
            Name (_SEG, Zero)
            Name (_UID, Zero)
            Name (_BBN, Zero)
            Name (_CRS, ResourceTemplate ()
            {
                WordBusNumber (ResourceProducer, MinFixed, MaxFixed, PosDecode,
                    0x0000, 0x0000, 0x00FF, 0x0000, 0x0100,,,)
                IO (Decode16, 0x0CF8, 0x0CF8, 0x01, 0x08,)
                WordIO (ResourceProducer, MinFixed, MaxFixed, PosDecode, EntireRange,
                    0x0000, 0x0000, 0x0CF7, 0x0000, 0x0CF8,,,, TypeStatic)
                WordIO (ResourceProducer, MinFixed, MaxFixed, PosDecode, EntireRange,
                    0x0000, 0x0D00, 0xFFFF, 0x0000, 0xF300,,,, TypeStatic)
                DWordMemory (ResourceProducer, PosDecode, MinFixed, MaxFixed, NonCacheable,
                    ReadWrite, 0x00000000, 0xC0000000, 0xFEBFFFFF, 0x00000000, 0x3EC00000,,,,
                    AddressRangeMemory, TypeStatic)
            })
            Name (_PRT, Package ()
            {
                Package () { 0x0001FFFF, Zero, Zero, 0x10 },
                Package () { 0x0002FFFF, One, Zero, 0x11 }
            })
        }
    }
}
"""


@pytest.mark.skipif(shutil.which("iasl") is None, reason="iasl (acpica-tools) not installed")
def test_dsdt_matches_iasl(tmp_path):
    """Byte for byte what iasl compiles from the equivalent ASL (-on: keep
    the \\_SB root prefix as written), without warnings."""
    (tmp_path / "dsdt.asl").write_text(DSDT_ASL)
    res = subprocess.run(["iasl", "-on", "-p", "out", "dsdt.asl"], capture_output=True,
                         text=True, cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "0 Errors, 0 Warnings" in res.stdout
    ref = (tmp_path / "out.aml").read_bytes()
    mine = acpi.build_dsdt(True, [(0, 1, 0, 16), (0, 2, 1, 17)])
    assert mine[36:] == ref[36:]
    assert mine[:4] == ref[:4] and mine[4:8] == ref[4:8] and mine[8] == ref[8]


# ---- AML encoding ----

def test_aml_integers_and_strings():
    assert aml.integer(0) == b"\x00"
    assert aml.integer(1) == b"\x01"
    assert aml.integer(5) == b"\x0a\x05"
    assert aml.integer(0xFF) == b"\x0a\xff"
    assert aml.integer(0x1234) == b"\x0b\x34\x12"
    assert aml.integer(0x0001FFFF) == b"\x0c\xff\xff\x01\x00"
    assert aml.integer(0x1_0000_0000) == b"\x0e\x00\x00\x00\x00\x01\x00\x00\x00"
    assert aml.integer((1 << 64) - 1) == b"\xff"
    assert aml.string("PCI0") == b"\x0dPCI0\x00"
    with pytest.raises(aml.AmlError):
        aml.integer(-1)
    with pytest.raises(aml.AmlError):
        aml.integer(1 << 64)


def test_aml_pkg_length():
    assert aml.pkg_length(0) == b"\x01"
    assert aml.pkg_length(62) == b"\x3f"
    # 63-byte body: total 65 = 0x41 -> two bytes, low nibble in the lead byte
    assert aml.pkg_length(63) == bytes([0x40 | 0x1, 0x04])
    assert aml.pkg_length(0xFFD) == bytes([0x40 | 0xF, 0xFF])
    assert aml.pkg_length(0xFFE) == bytes([0x80 | 0x1, 0x00, 0x01])  # total 0x1001
    assert aml.pkg_length(0x100000) == bytes([0xC0 | 0x4, 0x00, 0x00, 0x01])  # total 0x100004
    for n in (0, 62, 63, 100, 0xFFC, 0xFFD, 0xFFE, 0xFFFFC, 0xFFFFD, 0x123456):
        enc = aml.pkg_length(n)
        total, end = dec_pkglen(enc, 0)
        assert end == len(enc) and total == n + len(enc)


def test_aml_names():
    assert aml.name_string("_S5") == b"_S5_"
    assert aml.name_string("\\_SB_") == b"\\_SB_"
    assert aml.name_string("\\_SB_.PCI0") == b"\\\x2e_SB_PCI0"
    assert aml.name_string("_SB_.PCI0.S08_") == b"\x2f\x03_SB_PCI0S08_"
    assert aml.name_string("^PCI0") == b"^PCI0"
    for bad in ("lower", "1ABC", "TOOLONG", "A-B"):
        with pytest.raises(aml.AmlError):
            aml.name_string(bad)


def test_aml_known_sequences():
    # Name (_S5, Package (0x04) {Zero, Zero, Zero, Zero}) as iasl compiles it (QEMU's DSDT)
    assert aml.name("_S5_", aml.package(0, 0, 0, 0)) == bytes.fromhex("085f53355f12060400000000")
    # Name (_S5, Package () {0x05, Zero})
    assert aml.name("_S5_", aml.package(5, 0)) == bytes.fromhex("085f53355f120502" "0a05" "00")
    # Name (_HID, EisaId ("PNP0A03")) and EisaId ("PNP0A08")
    assert aml.name("_HID", aml.eisa_id("PNP0A03")) == bytes.fromhex("085f4849440c41d00a03")
    assert aml.eisa_id("PNP0A08") == bytes.fromhex("0c41d00a08")
    assert aml.eisa_id("PNP0501") == bytes.fromhex("0c41d00501")
    # Scope (\_SB) {} and Device (PCI0) {}
    assert aml.scope("\\_SB_") == bytes.fromhex("10065c5f53425f")
    assert aml.device("PCI0") == bytes.fromhex("5b820550434930")
    # Name (_UID, "x") / Buffer (0x02) {0x79, 0x00}
    assert aml.name("_UID", "x") == b"\x08_UID\x0dx\x00"
    assert aml.buffer(b"\x79\x00") == bytes.fromhex("1105" "0a02" "7900")


def test_aml_resource_descriptors():
    # as iasl encodes IO (Decode16, 0x0CF8, 0x0CF8, 0x01, 0x08)
    assert aml.io_port(0xCF8, 8) == bytes.fromhex("4701f80cf80c0108")
    # WordBusNumber (ResourceProducer, MinFixed, MaxFixed, PosDecode, 0, 0, 0xFF, 0, 0x100)
    assert aml.word_bus_number(0, 0xFF) == bytes.fromhex("880d00020c0000000000ff0000000001")
    # WordIO (..., EntireRange, 0, 0x0000, 0x0CF7, 0, 0x0CF8)
    assert aml.word_io(0, 0xCF7) == bytes.fromhex("880d00010c030000" "0000f70c0000f80c")
    # DWordMemory (..., NonCacheable, ReadWrite, 0, 0xC0000000, 0xFEBFFFFF, 0, 0x3EC00000)
    assert aml.dword_memory(0xC0000000, 0xFEBFFFFF) == bytes.fromhex(
        "871700000c01" "00000000" "000000c0" "ffffbffe" "00000000" "0000c03e")
    assert aml.resource_template(aml.io_port(0x3F8, 8)) == bytes.fromhex(
        "110d0a0a" "4701f803f8030108" "7900")


# ---- sleep control ----

def test_sleep_control_s5_powers_off():
    calls = []
    dev = AcpiSleepControl(calls.append)
    sp = acpi.SLEEP_CONTROL_PORT
    # what Linux's acpi_hw_extended_sleep does for S5: clear WAK_STS, then SLP_TYP|SLP_EN
    dev.io_write(0, acpi.SLEEP_STATUS_PORT, 1, acpi.WAK_STS)
    assert calls == []
    dev.io_write(0, sp, 1, (5 << 2) | 0x20)
    assert len(calls) == 1 and "S5" in calls[0]
    assert dev.io_read(0, sp, 1) == 5 << 2  # SLP_EN reads back 0


def test_sleep_control_ignores_other_writes():
    calls = []
    dev = AcpiSleepControl(calls.append)
    sp = acpi.SLEEP_CONTROL_PORT
    dev.io_write(0, sp, 1, 5 << 2)          # SLP_TYP 5 without SLP_EN
    dev.io_write(0, sp, 1, (3 << 2) | 0x20)  # S3 with SLP_EN: not offered
    dev.io_write(0, sp, 1, 0x20)             # S0
    dev.io_write(0, sp, 1, 0xFF00 | 0x14)    # high bits dropped, no SLP_EN
    assert calls == []
    assert dev.io_read(0, acpi.SLEEP_STATUS_PORT, 1) == 0
    dev.io_write(0, sp, 1, 0x134)            # 0x34 in the low byte: S5 + SLP_EN
    assert len(calls) == 1
    dev.reset()
    assert dev.io_read(0, sp, 1) == 0


LEGACY_ASL = r"""
DefinitionBlock ("", "DSDT", 2, "VMMD  ", "VMMDDSDT", 0x00000001)
{
    Name (_S5, Package () { 0x05, Zero })
    Scope (\_SB)
    {
        Device (COM1)
        {
            Name (_HID, EisaId ("PNP0501"))
            Name (_UID, One)
            Name (_CRS, ResourceTemplate () { IO (Decode16, 0x03F8, 0x03F8, 0x01, 0x08,) IRQNoFlags () {4} })
        }
        Device (COM2)
        {
            Name (_HID, EisaId ("PNP0501"))
            Name (_UID, 0x02)
            Name (_CRS, ResourceTemplate () { IO (Decode16, 0x02F8, 0x02F8, 0x01, 0x08,) IRQNoFlags () {3} })
        }
        Device (RTC)
        {
            Name (_HID, EisaId ("PNP0B00"))
            Name (_UID, Zero)
            Name (_CRS, ResourceTemplate () { IO (Decode16, 0x0070, 0x0070, 0x01, 0x02,) IRQNoFlags () {8} })
        }
    }
}
"""


@pytest.mark.skipif(shutil.which("iasl") is None, reason="iasl (acpica-tools) not installed")
def test_legacy_devices_match_iasl(tmp_path):
    """COM1/COM2/RTC with their ISA IRQs, byte for byte as iasl compiles them:
    without them a hardware-reduced guest maps no ISA IRQ (no legacy PIC)."""
    (tmp_path / "dsdt.asl").write_text(LEGACY_ASL)
    res = subprocess.run(["iasl", "-on", "-p", "out", "dsdt.asl"], capture_output=True,
                         text=True, cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    ref = (tmp_path / "out.aml").read_bytes()
    assert acpi.build_dsdt(False, legacy=True)[36:] == ref[36:]


def test_legacy_devices_only_with_an_lpc_bridge():
    assert b"PNP0501" not in acpi.build_dsdt(True)
    assert acpi.build_dsdt(True, legacy=True).count(aml.eisa_id("PNP0501")) == 2
