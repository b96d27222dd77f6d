"""bzImage: the setup header (Documentation/arch/x86/boot.rst) and the payload.

Sans-I/O over bytes. The setup header sits at 0x1f1 of the file and is copied
verbatim into boot_params at the same offset; it ends at 0x202 + the byte at
0x201. The payload (compressed vmlinux ELF, plus relocations) is at
payload_offset from the start of the protected-mode code, which follows the
(setup_sects + 1) * 512 bytes of real-mode setup.
"""

from __future__ import annotations

import bz2
import lzma
import struct
import zlib
from dataclasses import dataclass

from vmmd.boot import BootError
from vmmd.boot.elf import ELF_MAGIC

SETUP_HEADER_OFFSET = 0x1F1
BOOT_FLAG = 0xAA55
HDRS_MAGIC = 0x53726448  # "HdrS"

# loadflags
LOADED_HIGH = 1 << 0
KASLR_FLAG = 1 << 1
QUIET_FLAG = 1 << 5
KEEP_SEGMENTS = 1 << 6
CAN_USE_HEAP = 1 << 7
# xloadflags
XLF_KERNEL_64 = 1 << 0
XLF_CAN_BE_LOADED_ABOVE_4G = 1 << 1

# Payload compression magics (arch/x86/boot/compressed/mkpiggy + decompressors)
LZ4_LEGACY_MAGIC = b"\x02\x21\x4c\x18"
GZIP_MAGIC = b"\x1f\x8b"
XZ_MAGIC = b"\xfd7zXZ\x00"
BZIP2_MAGIC = b"BZh"
LZMA_MAGIC = b"\x5d\x00\x00"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
LZ4_LEGACY_BLOCK = 8 << 20  # each block decompresses to at most 8 MiB

# Setup header fields: name -> (offset in file/boot_params, struct format)
FIELDS = {
    "setup_sects": (0x1F1, "B"),
    "root_flags": (0x1F2, "H"),
    "syssize": (0x1F4, "I"),
    "vid_mode": (0x1FA, "H"),
    "root_dev": (0x1FC, "H"),
    "boot_flag": (0x1FE, "H"),
    "jump": (0x200, "H"),
    "header": (0x202, "I"),
    "version": (0x206, "H"),
    "kernel_version": (0x20E, "H"),
    "type_of_loader": (0x210, "B"),
    "loadflags": (0x211, "B"),
    "code32_start": (0x214, "I"),
    "ramdisk_image": (0x218, "I"),
    "ramdisk_size": (0x21C, "I"),
    "heap_end_ptr": (0x224, "H"),
    "cmd_line_ptr": (0x228, "I"),
    "initrd_addr_max": (0x22C, "I"),
    "kernel_alignment": (0x230, "I"),
    "relocatable_kernel": (0x234, "B"),
    "min_alignment": (0x235, "B"),
    "xloadflags": (0x236, "H"),
    "cmdline_size": (0x238, "I"),
    "hardware_subarch": (0x23C, "I"),
    "payload_offset": (0x248, "I"),
    "payload_length": (0x24C, "I"),
    "setup_data": (0x250, "Q"),
    "pref_address": (0x258, "Q"),
    "init_size": (0x260, "I"),
    "handover_offset": (0x264, "I"),
}


@dataclass(frozen=True)
class SetupHeader:
    setup_sects: int  # 0 means 4
    boot_flag: int
    version: int
    loadflags: int
    xloadflags: int
    kernel_version: int
    code32_start: int
    initrd_addr_max: int
    kernel_alignment: int
    relocatable_kernel: int
    cmdline_size: int
    payload_offset: int
    payload_length: int
    pref_address: int
    init_size: int
    header_end: int  # 0x202 + byte at 0x201

    @property
    def setup_size(self) -> int:
        """Bytes of real-mode code before the protected-mode kernel."""
        return ((self.setup_sects or 4) + 1) * 512

    @property
    def kernel_64(self) -> bool:
        return bool(self.xloadflags & XLF_KERNEL_64)


def _get(data: bytes, name: str) -> int:
    off, fmt = FIELDS[name]
    return struct.unpack_from("<" + fmt, data, off)[0]


def is_bzimage(data: bytes) -> bool:
    return (len(data) >= 0x206 and _get(data, "boot_flag") == BOOT_FLAG
            and _get(data, "header") == HDRS_MAGIC)


def parse_setup_header(data: bytes) -> SetupHeader:
    """Parse and validate the setup header; BootError on anything bad."""
    if len(data) < 0x206:
        raise BootError(f"file too short for a bzImage ({len(data)} bytes)")
    if _get(data, "boot_flag") != BOOT_FLAG:
        raise BootError("not a bzImage: no 0xAA55 boot flag at 0x1fe")
    if _get(data, "header") != HDRS_MAGIC:
        raise BootError("not a bzImage: no 'HdrS' at 0x202 (boot protocol < 2.00)")
    header_end = 0x202 + data[0x201]
    if header_end > len(data) or header_end < 0x206:
        raise BootError(f"setup header end {header_end:#x} is outside the file")
    # Read every known field that lies inside the declared header; fields the
    # kernel's protocol version does not have read as 0.
    padded = bytes(data[:header_end]).ljust(0x270, b"\0")
    v = {name: _get(padded, name) for name in FIELDS}
    if v["version"] < 0x0206:
        raise BootError(f"boot protocol {v['version']:#06x} is too old (need >= 2.06)")
    hdr = SetupHeader(
        setup_sects=v["setup_sects"], boot_flag=v["boot_flag"], version=v["version"],
        loadflags=v["loadflags"], xloadflags=v["xloadflags"],
        kernel_version=v["kernel_version"], code32_start=v["code32_start"],
        initrd_addr_max=v["initrd_addr_max"], kernel_alignment=v["kernel_alignment"],
        relocatable_kernel=v["relocatable_kernel"], cmdline_size=v["cmdline_size"],
        payload_offset=v["payload_offset"], payload_length=v["payload_length"],
        pref_address=v["pref_address"], init_size=v["init_size"], header_end=header_end)
    if hdr.setup_size >= len(data):
        raise BootError(f"setup ({hdr.setup_size} bytes) covers the whole file")
    return hdr


def setup_header_bytes(data: bytes) -> bytes:
    """The setup header as it goes into boot_params at offset 0x1f1."""
    hdr = parse_setup_header(data)
    return bytes(data[SETUP_HEADER_OFFSET:hdr.header_end])


def protected_mode_kernel(data: bytes) -> bytes:
    """The part loaded at the protected-mode load address."""
    hdr = parse_setup_header(data)
    return bytes(data[hdr.setup_size:])


def payload(data: bytes) -> bytes:
    hdr = parse_setup_header(data)
    start = hdr.setup_size + hdr.payload_offset
    if hdr.payload_length == 0 or start + hdr.payload_length > len(data):
        raise BootError(f"payload {start:#x}+{hdr.payload_length:#x} is outside the file")
    return bytes(data[start:start + hdr.payload_length])


def decompress_lz4_legacy(blob: bytes) -> bytes:
    """LZ4 legacy framing: magic, then blocks each prefixed by its LE u32
    compressed size; the kernel appends the LE u32 uncompressed size."""
    import lz4.block  # only needed for LZ4 kernels

    if blob[:4] != LZ4_LEGACY_MAGIC:
        raise BootError("not an LZ4 legacy stream")
    end = len(blob)
    trailer = struct.unpack_from("<I", blob, end - 4)[0] if end >= 8 else None
    out = []
    pos = 4
    while pos + 4 <= end:
        if pos + 4 == end:
            break  # only the uncompressed-size trailer is left
        (size,) = struct.unpack_from("<I", blob, pos)
        if blob[pos:pos + 4] == LZ4_LEGACY_MAGIC:
            pos += 4  # concatenated stream: another magic
            continue
        if size == 0 or pos + 4 + size > end:
            break  # the trailing size, or padding: not a block
        try:
            out.append(lz4.block.decompress(blob[pos + 4:pos + 4 + size],
                                            uncompressed_size=LZ4_LEGACY_BLOCK))
        except Exception as e:  # lz4.block.LZ4BlockError
            raise BootError(f"corrupt LZ4 block at payload offset {pos:#x}: {e}") from None
        pos += 4 + size
    result = b"".join(out)
    if not result:
        raise BootError("LZ4 payload holds no blocks")
    if trailer is not None and trailer != len(result) & 0xFFFFFFFF:
        raise BootError(f"LZ4 payload decompressed to {len(result)} bytes, "
                        f"trailer says {trailer}")
    return result


def decompress_payload(blob: bytes) -> bytes:
    try:
        if blob[:4] == LZ4_LEGACY_MAGIC:
            return decompress_lz4_legacy(blob)
        if blob[:2] == GZIP_MAGIC:
            return zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(blob)
        if blob[:6] == XZ_MAGIC:
            return lzma.LZMADecompressor(lzma.FORMAT_XZ).decompress(blob)
        if blob[:3] == BZIP2_MAGIC:
            return bz2.BZ2Decompressor().decompress(blob)
        if blob[:3] == LZMA_MAGIC:
            return lzma.LZMADecompressor(lzma.FORMAT_ALONE).decompress(blob)
    except (zlib.error, lzma.LZMAError, OSError, EOFError, ValueError) as e:
        raise BootError(f"corrupt kernel payload: {e}") from None
    if blob[:4] == ELF_MAGIC:
        return blob
    if blob[:4] == ZSTD_MAGIC:
        raise BootError("zstd-compressed kernels are not supported (no zstd in the stdlib)")
    raise BootError(f"unknown kernel payload format (starts {bytes(blob[:6]).hex()})")


def extract_vmlinux(data: bytes) -> bytes:
    """The vmlinux ELF inside a bzImage (or the input, if it already is an ELF).
    The result may carry the kernel's relocation table after the ELF."""
    if data[:4] == ELF_MAGIC:
        return bytes(data)
    out = decompress_payload(payload(data))
    if out[:4] != ELF_MAGIC:
        raise BootError("the decompressed payload is not an ELF vmlinux")
    return out
