"""A pure-Python writer of "newc" cpio archives, the format the kernel unpacks
as an initramfs (Documentation/driver-api/early-userspace/buffer-format.rst).

Output is deterministic: inode numbers are assigned in insertion order and
every mtime is 0, so the same inputs give the same bytes (cacheable).
Uncompressed on purpose: decompression in the guest would run emulated.
"""

from __future__ import annotations

import stat

NEWC_MAGIC = b"070701"
TRAILER = "TRAILER!!!"


def _pad4(n: int) -> bytes:
    return b"\0" * (-n % 4)


def _norm(path: str) -> str:
    parts = [p for p in path.split("/") if p and p != "."]
    if not parts or ".." in parts:
        raise ValueError(f"bad archive path {path!r}")
    return "/".join(parts)


class Initramfs:
    """Collects entries; parent directories are added on demand so the
    kernel always sees a directory before what it holds."""

    def __init__(self) -> None:
        self._entries: list[tuple[str, int, bytes, int, int]] = []  # name, mode, data, rmaj, rmin
        self._names: set[str] = set()

    def __contains__(self, path: str) -> bool:
        return _norm(path) in self._names

    def _add(self, path: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        name = _norm(path)
        if name in self._names:
            if stat.S_ISDIR(mode):
                return  # directories may be requested more than once
            raise ValueError(f"duplicate archive entry {name!r}")
        parent = name.rpartition("/")[0]
        if parent and parent not in self._names:
            self.add_dir(parent)
        self._names.add(name)
        self._entries.append((name, mode, bytes(data), *rdev))

    def add_dir(self, path: str, mode: int = 0o755) -> None:
        self._add(path, stat.S_IFDIR | mode)

    def add_file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        self._add(path, stat.S_IFREG | mode, data)

    def add_symlink(self, path: str, target: str) -> None:
        self._add(path, stat.S_IFLNK | 0o777, target.encode())

    def add_device(self, path: str, kind: str, major: int, minor: int, mode: int = 0o600) -> None:
        """kind: 'c' (character) or 'b' (block)."""
        fmt = {"c": stat.S_IFCHR, "b": stat.S_IFBLK}.get(kind)
        if fmt is None:
            raise ValueError(f"device kind must be 'c' or 'b', not {kind!r}")
        self._add(path, fmt | mode, rdev=(major, minor))

    def to_bytes(self) -> bytes:
        out = bytearray()
        entries = self._entries + [(TRAILER, 0, b"", 0, 0)]
        for ino, (name, mode, data, rmaj, rmin) in enumerate(entries, start=1):
            raw_name = name.encode() + b"\0"
            nlink = 2 if stat.S_ISDIR(mode) else 1
            if name == TRAILER:
                ino = nlink = 0
            fields = (ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rmaj, rmin, len(raw_name), 0)
            out += NEWC_MAGIC + b"".join(b"%08X" % f for f in fields)
            out += raw_name + _pad4(110 + len(raw_name))
            out += data + _pad4(len(data))
        return bytes(out)
