"""Build the vmmd test guests (tests/guests/*.S) into static ELF64 executables.

Each guest is assembled with GNU ``as`` and linked with GNU ``ld`` against a
fixed linker script: one PT_LOAD segment at physical == virtual address
0x100000, entry point ``_start`` at 0x100000.  Build-time parameters are
passed as ``as --defsym NAME=VALUE``.  Results are cached in the output
directory, keyed by a hash of the sources, parameters, linker script and
tool versions, so repeated test runs do not rebuild.

Usage::

    python -m tests.guests.build [--out DIR] [--json] [--force]

    from tests.guests.build import build_all, build_hammer
    paths = build_all()                      # {"hello": Path, "hammer": Path, ...}
    p = build_hammer(out_dir, iterations=1000)

The guests' contract (entry state, ports, output, how they end) is in
tests/guests/README.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

__all__ = [
    "GUEST_DIR",
    "DEFAULT_OUT_DIR",
    "LOAD_ADDR",
    "GUESTS",
    "HAMMER_DEFAULTS",
    "INCREMENTER_DEFAULTS",
    "TICKER_DEFAULTS",
    "ToolchainMissing",
    "GuestBuildError",
    "build_guest",
    "build_all",
    "build_hammer",
    "build_incrementer",
    "build_ticker",
    "main",
]

GUEST_DIR = Path(__file__).resolve().parent
DEFAULT_OUT_DIR = GUEST_DIR / "out"

#: Physical (== virtual) load address of every guest; also the entry point.
LOAD_ADDR = 0x100000

#: Guests built by build_all(), in build order.
GUESTS = ("hello", "hammer", "incrementer", "ticker")

#: Build-time parameters and their defaults (the .S files carry the same
#: defaults so they assemble stand-alone).
HAMMER_DEFAULTS = {
    "ITER": 20000,
    "PIO_INTERNAL": 0x510,
    "PIO_DEVICE": 0x3FF,
    "MMIO_ADDR": 0xD0000000,
}
INCREMENTER_DEFAULTS = {
    "INC_START": 0x400000,
    "INC_END": 0x4000000,
    "PASSES_PER_MARK": 1024,
}
TICKER_DEFAULTS = {
    "SPIN": 10_000_000,
}
_DEFAULTS = {
    "hello": {},
    "hammer": HAMMER_DEFAULTS,
    "incrementer": INCREMENTER_DEFAULTS,
    "ticker": TICKER_DEFAULTS,
}

# Bump when the build recipe changes in a way the hash below cannot see.
_RECIPE_VERSION = 1

LINKER_SCRIPT = f"""\
/* vmmd test guest: one PT_LOAD, vaddr == paddr == 0x{LOAD_ADDR:x}, entry first */
OUTPUT_FORMAT("elf64-x86-64")
OUTPUT_ARCH(i386:x86-64)
ENTRY(_start)
PHDRS
{{
    image PT_LOAD FLAGS(7);
}}
SECTIONS
{{
    . = 0x{LOAD_ADDR:x};
    .text : AT(0x{LOAD_ADDR:x}) {{
        KEEP(*(.text.entry))
        *(.text .text.*)
    }} :image
    .rodata : {{ *(.rodata .rodata.*) }} :image
    .data : {{ *(.data .data.*) }} :image
    .bss : {{ *(.bss .bss.*) *(COMMON) }} :image
    /DISCARD/ : {{ *(.note.*) *(.comment) *(.eh_frame*) }}
}}
ASSERT(_start == 0x{LOAD_ADDR:x}, "_start must be the first byte of the image")
"""


class GuestBuildError(RuntimeError):
    """Assembling or linking a guest failed."""


class ToolchainMissing(GuestBuildError):
    """GNU as/ld are not installed."""


def _find_tools() -> tuple[str, str]:
    as_ = shutil.which("as")
    ld = shutil.which("ld")
    missing = [n for n, p in (("as", as_), ("ld", ld)) if p is None]
    if missing:
        raise ToolchainMissing(
            f"GNU binutils not found ({', '.join(missing)} missing from PATH); "
            "the test guests need them: apt-get install -y binutils"
        )
    return as_, ld  # type: ignore[return-value]


_version_cache: dict[str, str] = {}


def _tool_version(path: str) -> str:
    if path not in _version_cache:
        try:
            out = subprocess.run(
                [path, "--version"], capture_output=True, text=True, timeout=30
            ).stdout
        except OSError as e:
            raise ToolchainMissing(f"cannot run {path}: {e}") from e
        _version_cache[path] = (out.splitlines() or ["?"])[0]
    return _version_cache[path]


def _check_int(name: str, value: object, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int, got {value!r}")
    if not lo <= value <= hi:
        raise ValueError(f"{name}={value:#x} out of range [{lo:#x}, {hi:#x}]")
    return value


def _cache_key(src: Path, defsyms: dict[str, int], as_: str, ld: str) -> str:
    h = hashlib.sha256()
    h.update(f"recipe {_RECIPE_VERSION}\n".encode())
    # the guest's source and every include file it may pull in
    for p in [src, *sorted(GUEST_DIR.glob("*.inc"))]:
        h.update(f"file {p.name}\n".encode())
        h.update(p.read_bytes())
    for k in sorted(defsyms):
        h.update(f"defsym {k}={defsyms[k]}\n".encode())
    h.update(LINKER_SCRIPT.encode())
    h.update(_tool_version(as_).encode())
    h.update(_tool_version(ld).encode())
    return h.hexdigest()


def _run(cmd: list[str], what: str) -> None:
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=GUEST_DIR)
    if r.returncode != 0:
        raise GuestBuildError(
            f"{what} failed (exit {r.returncode}): {' '.join(cmd)}\n{r.stderr}{r.stdout}"
        )


def build_guest(
    source: str,
    out_dir: str | os.PathLike | None = None,
    defsyms: dict[str, int] | None = None,
    name: str | None = None,
    force: bool = False,
) -> Path:
    """Assemble and link ``tests/guests/<source>.S`` into ``<out_dir>/<name>.elf``.

    ``defsyms`` override the guest's build-time parameters (``as --defsym``).
    Returns the ELF's path.  Skips the build when the cached output matches.
    """
    src = GUEST_DIR / f"{source}.S"
    if not src.is_file():
        raise GuestBuildError(f"no such guest source: {src}")
    name = name or source
    out = Path(out_dir) if out_dir is not None else DEFAULT_OUT_DIR
    out.mkdir(parents=True, exist_ok=True)
    syms = dict(_DEFAULTS.get(source, {}))
    syms.update(defsyms or {})
    for k, v in syms.items():
        if not k.isidentifier():
            raise ValueError(f"bad defsym name {k!r}")
        _check_int(k, v, 0, 2**63 - 1)

    as_, ld = _find_tools()
    key = _cache_key(src, syms, as_, ld)
    elf = out / f"{name}.elf"
    stamp = out / f"{name}.stamp"
    if not force and elf.is_file():
        try:
            if stamp.read_text().strip() == key:
                return elf
        except OSError:
            pass

    with tempfile.TemporaryDirectory(prefix=f".{name}-", dir=out) as tmp:
        tmpd = Path(tmp)
        obj = tmpd / f"{name}.o"
        lds = tmpd / "guest.ld"
        lds.write_text(LINKER_SCRIPT)
        tmp_elf = tmpd / f"{name}.elf"
        as_cmd = [as_, "--64", "-I", str(GUEST_DIR)]
        for k in sorted(syms):
            as_cmd += ["--defsym", f"{k}={syms[k]:#x}"]
        as_cmd += ["-o", str(obj), str(src)]
        _run(as_cmd, f"assembling {src.name}")
        ld_cmd = [
            ld, "-m", "elf_x86_64", "-static", "-nostdlib", "--build-id=none",
            "-z", "max-page-size=0x1000", "-z", "noexecstack",
            "-T", str(lds), "-o", str(tmp_elf), str(obj),
        ]
        if "--no-warn-rwx-segments" in _ld_help(ld):
            ld_cmd.insert(1, "--no-warn-rwx-segments")
        _run(ld_cmd, f"linking {name}")
        # publish: ELF first, then the stamp that vouches for it
        os.replace(tmp_elf, elf)
        tmp_stamp = tmpd / "stamp"
        tmp_stamp.write_text(key + "\n")
        os.replace(tmp_stamp, stamp)
    return elf


_ld_help_cache: dict[str, str] = {}


def _ld_help(ld: str) -> str:
    if ld not in _ld_help_cache:
        r = subprocess.run([ld, "--help"], capture_output=True, text=True)
        _ld_help_cache[ld] = r.stdout
    return _ld_help_cache[ld]


def build_hammer(
    out_dir: str | os.PathLike | None = None,
    iterations: int = HAMMER_DEFAULTS["ITER"],
    pio_port: int = HAMMER_DEFAULTS["PIO_DEVICE"],
    mmio_addr: int = HAMMER_DEFAULTS["MMIO_ADDR"],
    internal_port: int = HAMMER_DEFAULTS["PIO_INTERNAL"],
    force: bool = False,
) -> Path:
    """Build a hammer variant.

    ``iterations``: per phase; ``pio_port``: the device port (phases 2 and 3);
    ``mmio_addr``: phase 4's address (4-byte aligned, unbacked by RAM);
    ``internal_port``: phase 1's port (answered inside vmmd).
    """
    _check_int("iterations", iterations, 0, 2**63 - 1)
    _check_int("pio_port", pio_port, 0, 0xFFFF)
    _check_int("internal_port", internal_port, 0, 0xFFFF)
    _check_int("mmio_addr", mmio_addr, 0, 2**63 - 4)
    if mmio_addr % 4:
        raise ValueError(f"mmio_addr {mmio_addr:#x} must be 4-byte aligned")
    syms = {
        "ITER": iterations,
        "PIO_DEVICE": pio_port,
        "MMIO_ADDR": mmio_addr,
        "PIO_INTERNAL": internal_port,
    }
    if syms == HAMMER_DEFAULTS:
        name = "hammer"
    else:
        name = (f"hammer-i{iterations}-p{pio_port:x}-m{mmio_addr:x}"
                f"-q{internal_port:x}")
    return build_guest("hammer", out_dir, syms, name=name, force=force)


def build_incrementer(
    out_dir: str | os.PathLike | None = None,
    start: int = INCREMENTER_DEFAULTS["INC_START"],
    end: int = INCREMENTER_DEFAULTS["INC_END"],
    passes_per_mark: int = INCREMENTER_DEFAULTS["PASSES_PER_MARK"],
    force: bool = False,
) -> Path:
    """Build an incrementer variant over pages [start, end) (4 KiB aligned)."""
    _check_int("start", start, 0, 2**47)
    _check_int("end", end, 0, 2**47)
    _check_int("passes_per_mark", passes_per_mark, 1, 2**63 - 1)
    if start % 4096 or end % 4096 or end <= start:
        raise ValueError(f"bad range [{start:#x}, {end:#x}): 4 KiB aligned, end > start")
    syms = {"INC_START": start, "INC_END": end, "PASSES_PER_MARK": passes_per_mark}
    if syms == INCREMENTER_DEFAULTS:
        name = "incrementer"
    else:
        name = f"incrementer-{start:x}-{end:x}-m{passes_per_mark}"
    return build_guest("incrementer", out_dir, syms, name=name, force=force)


def build_ticker(
    out_dir: str | os.PathLike | None = None,
    spin: int = TICKER_DEFAULTS["SPIN"],
    force: bool = False,
) -> Path:
    """Build a ticker variant spinning ``spin`` iterations between lines."""
    _check_int("spin", spin, 0, 2**63 - 1)
    name = "ticker" if spin == TICKER_DEFAULTS["SPIN"] else f"ticker-s{spin}"
    return build_guest("ticker", out_dir, {"SPIN": spin}, name=name, force=force)


def build_all(out_dir: str | os.PathLike | None = None, force: bool = False) -> dict[str, Path]:
    """Build every guest with its default parameters; return {name: ELF path}."""
    return {g: build_guest(g, out_dir, force=force) for g in GUESTS}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m tests.guests.build", description="Build the vmmd test guests."
    )
    ap.add_argument("--out", default=str(DEFAULT_OUT_DIR),
                    help="output directory (default: %(default)s)")
    ap.add_argument("--force", action="store_true", help="rebuild even if cached")
    ap.add_argument("--json", action="store_true", help="print {name: path} as JSON")
    args = ap.parse_args(argv)
    try:
        paths = build_all(args.out, force=args.force)
    except GuestBuildError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({k: str(v) for k, v in paths.items()}, indent=2))
    else:
        for k, v in paths.items():
            print(f"{k}\t{v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
