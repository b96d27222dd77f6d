"""``vmmd-guest``: build (and cache) a Linux test guest from Debian packages.

    vmmd-guest build [--json] [--cache DIR]   fetch, extract, build; print paths
    vmmd-guest path  [--json] [--cache DIR]   print the cached paths (exit 1 if not built)

Artifacts in the cache directory ($VMMD_GUEST_CACHE or ~/.cache/vmmd/guest):
  vmlinux         ELF extracted from the bzImage (enter at startup_64, fast)
  bzImage         the package's /boot/vmlinuz-*
  initramfs.cpio  uncompressed newc archive: static busybox, virtio modules,
                  an /init that prints "vmmd-guest: init started", loads the
                  modules, prints "vmmd-guest: ready" and runs a console shell
  disk.ext4       64 MiB ext4 image holding DISK_FILES
  manifest.json   inputs (package versions, BUILD_VERSION) and outputs; a build
                  whose inputs match the manifest is skipped

Packages: the newest linux-image-*-cloud-amd64 that linux-image-cloud-amd64
depends on, and busybox-static, fetched with ``apt-get download`` and unpacked
with ``dpkg-deb -x`` (no root needed for either; ``apt-get update`` is run once
if the package lists are missing).
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import lzma
import gzip
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from vmmd.boot import BootError
from vmmd.boot.bzimage import extract_vmlinux
from vmmd.guest.initramfs import Initramfs

BUILD_VERSION = 3  # bump when the artifacts change for the same packages
KERNEL_META_PACKAGE = "linux-image-cloud-amd64"
BUSYBOX_PACKAGE = "busybox-static"
DISK_SIZE = 64 << 20
DISK_LABEL = "vmmdtest"
INIT_STARTED = "vmmd-guest: init started"
READY = "vmmd-guest: ready"

# Modules /init loads (with their dependencies), where present in the package.
MODULES = ("virtio_ring", "virtio", "virtio_pci_legacy_dev", "virtio_pci_modern_dev",
           "virtio_pci", "virtio_blk", "failover", "net_failover", "virtio_net",
           "virtio_balloon", "virtio_console", "virtio-rng")

BUSYBOX_APPLETS = (
    "sh", "ash", "cat", "chmod", "cmp", "cp", "cttyhack", "cut", "date", "dd", "df",
    "dmesg", "echo", "env", "false", "find", "free", "grep", "halt", "head", "hexdump",
    "ifconfig", "insmod", "ip", "kill", "ln", "ls", "lsmod", "md5sum", "mdev", "mkdir",
    "mknod", "modprobe", "mount", "mv", "od", "ping", "poweroff", "printf", "ps",
    "reboot", "rm", "rmmod", "sed", "seq", "setsid", "sha256sum", "sleep", "sort",
    "stat", "sync", "tail", "test", "tr", "true", "udhcpc", "umount", "uname", "uniq",
    "wc", "xargs", "[", "stty", "blkdiscard", "fstrim", "blockdev", "nproc", "uptime",
    "mke2fs", "awk", "tee", "usleep", "timeout",
)

# The base command line for this guest. Hosts whose KVM emulates CPL0 need
# more options (vmmd/boot_setup.py adds them); rdinit names our /init.
RECOMMENDED_CMDLINE = "console=ttyS0 panic=-1 reboot=t rdinit=/init"

HELLO_TEXT = b"hello from the vmmd test disk\n"


def disk_pattern() -> bytes:
    """1 MiB of a deterministic pattern (different in every 4 KiB block)."""
    return bytes((i * 13 + (i >> 12)) & 0xFF for i in range(1 << 20))


def disk_files() -> dict[str, bytes]:
    return {"hello.txt": HELLO_TEXT, "pattern.bin": disk_pattern()}


class GuestBuildError(Exception):
    """A package could not be resolved, fetched or unpacked, or a tool failed."""


def default_cache_dir() -> Path:
    env = os.environ.get("VMMD_GUEST_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "vmmd" / "guest"


def _log(msg: str) -> None:
    print(f"vmmd-guest: {msg}", file=sys.stderr, flush=True)


def _run(cmd: list[str], cwd: Path | None = None, env: dict | None = None) -> str:
    try:
        r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env)
    except OSError as e:
        raise GuestBuildError(f"cannot run {cmd[0]}: {e}") from None
    if r.returncode != 0:
        tail = (r.stderr or r.stdout).strip().splitlines()[-5:]
        raise GuestBuildError(f"{' '.join(cmd)} failed (exit {r.returncode}): " + " | ".join(tail))
    return r.stdout


# ---- apt ----

class Apt:
    """apt-cache / apt-get download, with one `apt-get update` on a miss."""

    def __init__(self) -> None:
        self._updated = False
        if shutil.which("apt-cache") is None or shutil.which("apt-get") is None:
            raise GuestBuildError("apt-get/apt-cache not found: this needs a Debian-based host")

    def update_once(self) -> bool:
        if self._updated:
            return False
        self._updated = True
        _log("running apt-get update")
        _run(["apt-get", "update", "-q"])
        return True

    def _retry(self, fn):
        try:
            return fn()
        except GuestBuildError:
            if not self.update_once():
                raise
            return fn()

    def candidate_versions(self, *pkgs: str) -> dict[str, str]:
        """{package: candidate version}, one apt-cache call (each takes ~1 s)."""
        def look() -> dict[str, str]:
            out = _run(["apt-cache", "show", "--no-all-versions", *pkgs])
            found = {}
            for stanza in out.split("\n\n"):
                name = re.search(r"^Package: (\S+)", stanza, re.M)
                version = re.search(r"^Version: (\S+)", stanza, re.M)
                if name and version:
                    found.setdefault(name.group(1), version.group(1))
            missing = [p for p in pkgs if p not in found]
            if missing:
                raise GuestBuildError(f"apt-cache knows no version of {', '.join(missing)}")
            return found
        return self._retry(look)

    def candidate_version(self, pkg: str) -> str:
        return self.candidate_versions(pkg)[pkg]

    def kernel_package(self) -> str:
        def look() -> str:
            out = _run(["apt-cache", "depends", KERNEL_META_PACKAGE])
            names = re.findall(r"Depends: (linux-image-[\w.+-]+-cloud-amd64)\b", out)
            names = [n for n in names if "unsigned" not in n]
            if not names:
                raise GuestBuildError(f"{KERNEL_META_PACKAGE} depends on no cloud kernel image")
            return names
        names = self._retry(look)
        best = names[0]
        for n in names[1:]:
            r = subprocess.run(["dpkg", "--compare-versions", self.candidate_version(n), "gt",
                                self.candidate_version(best)])
            if r.returncode == 0:
                best = n
        return best

    def download(self, pkg: str, version: str, debdir: Path) -> Path:
        debdir.mkdir(parents=True, exist_ok=True)
        quoted = version.replace(":", "%3a")
        found = sorted(debdir.glob(f"{pkg}_{quoted}_*.deb"))
        if found:
            return found[0]
        _log(f"downloading {pkg} {version}")
        self._retry(lambda: _run(["apt-get", "download", "-q", f"{pkg}={version}"], cwd=debdir))
        found = sorted(debdir.glob(f"{pkg}_{quoted}_*.deb"))
        if not found:
            raise GuestBuildError(f"apt-get download left no .deb for {pkg} {version}")
        return found[0]


# ---- modules ----

def _module_name(path: Path) -> str:
    return path.name.split(".ko")[0].replace("-", "_")


def _module_bytes(path: Path) -> bytes:
    data = path.read_bytes()
    if path.name.endswith(".ko.xz"):
        return lzma.decompress(data)
    if path.name.endswith(".ko.gz"):
        return gzip.decompress(data)
    if path.name.endswith(".ko.zst"):
        if shutil.which("zstd") is None:
            raise GuestBuildError(f"{path.name} is zstd-compressed and zstd(1) is missing")
        return subprocess.run(["zstd", "-dc", str(path)], capture_output=True, check=True).stdout
    return data


def _module_depends(data: bytes) -> list[str]:
    m = re.search(rb"(?:^|\0)depends=([\w,-]*)\0", data)
    if not m or not m.group(1):
        return []
    return [d.decode().replace("-", "_") for d in m.group(1).split(b",")]


def select_modules(moddir: Path, wanted=MODULES) -> list[tuple[str, bytes, list[str]]]:
    """The wanted modules that exist in moddir, plus their dependencies, in
    load order: [(path relative to moddir ending in .ko, bytes, deps)]."""
    index = {_module_name(p): p for p in moddir.rglob("*.ko*")
             if re.search(r"\.ko(\.xz|\.gz|\.zst)?$", p.name)}
    loaded: dict[str, tuple[str, bytes, list[str]]] = {}
    order: list[str] = []

    def visit(name: str, stack: tuple[str, ...]) -> None:
        if name in loaded or name not in index or name in stack:
            return  # done, built in (or absent), or a cycle
        path = index[name]
        data = _module_bytes(path)
        deps = _module_depends(data)
        for d in deps:
            visit(d, stack + (name,))
        rel = str(path.relative_to(moddir)).split(".ko")[0] + ".ko"
        loaded[name] = (rel, data, [loaded[d][0] for d in deps if d in loaded])
        order.append(name)

    for w in wanted:
        visit(w.replace("-", "_"), ())
    return [loaded[n] for n in order]


# ---- initramfs ----

# The command channel on COM2 (ttyS1): the host writes "ID COMMAND" lines;
# each answer is framed so that any output can be told apart from the frame.
AGENT_BEGIN = "@@vmmd-begin"
AGENT_END = "@@vmmd-end"
AGENT_READY = "@@vmmd-agent-ready"


def agent_script() -> str:
    return f"""#!/bin/sh
# vmmd-guest command agent on /dev/ttyS1: one "ID COMMAND" line in, the
# command's output and exit status out between {AGENT_BEGIN}/{AGENT_END} ID.
stty -F /dev/ttyS1 raw -echo clocal 2>/dev/null
exec </dev/ttyS1 >/dev/ttyS1 2>&1
printf '\n{AGENT_READY}\n'
while read -r id cmd; do
    [ -n "$id" ] || continue
    printf '\n{AGENT_BEGIN} %s\n' "$id"
    sh -c "$cmd" </dev/null
    rc=$?
    printf '\n{AGENT_END} %s %d\n' "$id" "$rc"
done
"""


def init_script(release: str, modules: list[str]) -> str:
    mods = " ".join(modules)
    return f"""#!/bin/sh
# vmmd test guest /init (generated by vmmd-guest build {BUILD_VERSION})
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev || echo "vmmd-guest: devtmpfs mount failed"
mkdir -p /tmp && mount -t tmpfs tmpfs /tmp
echo "{INIT_STARTED}"
for m in {mods}; do
    insmod /lib/modules/{release}/$m || echo "vmmd-guest: insmod $m failed"
done
ip link set lo up 2>/dev/null
[ -c /dev/ttyS1 ] && setsid /bin/agent &
echo "{READY}"
setsid cttyhack sh
echo "vmmd-guest: shell exited, powering off"
poweroff -f
"""


def build_initramfs(busybox: bytes, release: str, modules) -> bytes:
    fs = Initramfs()
    for d in ("bin", "dev", "proc", "sys", "tmp", "mnt", "root", "etc", "run", "usr"):
        fs.add_dir(d)
    fs.add_symlink("sbin", "bin")
    fs.add_symlink("usr/bin", "../bin")
    fs.add_symlink("usr/sbin", "../bin")
    # the kernel opens /dev/console for init before anything mounts devtmpfs
    fs.add_device("dev/console", "c", 5, 1)
    fs.add_device("dev/ttyS0", "c", 4, 64)
    fs.add_device("dev/null", "c", 1, 3, mode=0o666)
    fs.add_file("bin/busybox", busybox, mode=0o755)
    for applet in BUSYBOX_APPLETS:
        fs.add_symlink(f"bin/{applet}", "busybox")
    base = f"lib/modules/{release}"
    fs.add_dir(base)
    # modules.dep lists every (transitive) dependency; modprobe loads them
    # right to left, so they go in reverse load order
    position = {rel: i for i, (rel, _, _) in enumerate(modules)}
    direct = {rel: deps for rel, _, deps in modules}
    dep_lines = []
    for rel, data, _ in modules:
        fs.add_file(f"{base}/{rel}", data)
        closure, todo = set(), list(direct[rel])
        while todo:
            d = todo.pop()
            if d not in closure:
                closure.add(d)
                todo.extend(direct.get(d, ()))
        ordered = sorted(closure, key=position.__getitem__, reverse=True)
        dep_lines.append(f"{rel}: {' '.join(ordered)}".rstrip() + "\n")
    fs.add_file(f"{base}/modules.dep", "".join(dep_lines).encode())
    fs.add_file("init", init_script(release, [m[0] for m in modules]).encode(), mode=0o755)
    fs.add_file("bin/agent", agent_script().encode(), mode=0o755)
    return fs.to_bytes()


# ---- disk ----

def _mkfs_ext4(apt: Apt) -> str:
    for cand in (shutil.which("mkfs.ext4"), "/sbin/mkfs.ext4", "/usr/sbin/mkfs.ext4"):
        if cand and os.access(cand, os.X_OK):
            return cand
    _log("mkfs.ext4 missing: installing e2fsprogs")
    apt._retry(lambda: _run(["apt-get", "install", "-y", "-q", "e2fsprogs"]))
    found = shutil.which("mkfs.ext4") or "/sbin/mkfs.ext4"
    if not os.access(found, os.X_OK):
        raise GuestBuildError("mkfs.ext4 is still missing after installing e2fsprogs")
    return found


def build_disk(path: Path, mkfs: str) -> None:
    with tempfile.TemporaryDirectory(prefix="vmmd-disk-") as src:
        for name, data in disk_files().items():
            Path(src, name).write_bytes(data)
        if path.exists():
            path.unlink()
        with open(path, "wb") as f:
            f.truncate(DISK_SIZE)
        # initialise inode tables and journal now: lazy init in the guest is slow
        _run([mkfs, "-q", "-F", "-L", DISK_LABEL, "-m", "0",
              "-E", "lazy_itable_init=0,lazy_journal_init=0,root_owner=0:0",
              "-d", src, str(path)])


# ---- build ----

ARTIFACTS = {"kernel": "vmlinux", "bzimage": "bzImage", "initrd": "initramfs.cpio",
             "disk": "disk.ext4"}


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_manifest(cache: Path) -> dict | None:
    """The manifest if every artifact it names is present, else None."""
    try:
        manifest = json.loads((cache / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict):
        return None
    for key in ARTIFACTS:
        p = manifest.get(key)
        if not isinstance(p, str) or not Path(p).is_file() or Path(p).stat().st_size == 0:
            return None
    return manifest


def _extract(deb: Path, dest: Path) -> None:
    _run(["dpkg-deb", "-x", str(deb), str(dest)])


def build(cache: Path) -> dict:
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one build per cache at a time
        apt = Apt()
        kpkg = apt.kernel_package()
        versions = apt.candidate_versions(kpkg, BUSYBOX_PACKAGE)
        inputs = {"build_version": BUILD_VERSION, "kernel_package": kpkg,
                  "kernel_package_version": versions[kpkg],
                  "busybox_version": versions[BUSYBOX_PACKAGE]}
        old = read_manifest(cache)
        if old is not None and old.get("inputs") == inputs:
            return old
        kdeb = apt.download(kpkg, inputs["kernel_package_version"], cache / "debs")
        bdeb = apt.download(BUSYBOX_PACKAGE, inputs["busybox_version"], cache / "debs")
        mkfs = _mkfs_ext4(apt)
        with tempfile.TemporaryDirectory(prefix=".extract-", dir=cache) as tmp:
            kdir, bdir = Path(tmp, "kernel"), Path(tmp, "busybox")
            _extract(kdeb, kdir)
            _extract(bdeb, bdir)
            vmlinuz = sorted(kdir.glob("boot/vmlinuz-*"))
            if not vmlinuz:
                raise GuestBuildError(f"{kdeb.name} holds no /boot/vmlinuz-*")
            release = vmlinuz[0].name[len("vmlinuz-"):]
            bz = vmlinuz[0].read_bytes()
            try:
                vmlinux = extract_vmlinux(bz)
            except BootError as e:
                raise GuestBuildError(f"cannot extract vmlinux from {vmlinuz[0].name}: {e}") from None
            moddir = next((d for d in (kdir / "lib/modules" / release,
                                       kdir / "usr/lib/modules" / release) if d.is_dir()), None)
            modules = select_modules(moddir) if moddir else []
            busybox = next((p for p in (bdir / "bin/busybox", bdir / "usr/bin/busybox")
                            if p.is_file()), None)
            if busybox is None:
                raise GuestBuildError(f"{bdeb.name} holds no busybox binary")
            initrd = build_initramfs(busybox.read_bytes(), release, modules)

            outputs = {"kernel": vmlinux, "bzimage": bz, "initrd": initrd}
            for key, data in outputs.items():
                tmpfile = Path(tmp, ARTIFACTS[key])
                tmpfile.write_bytes(data)
                os.replace(tmpfile, cache / ARTIFACTS[key])
            disk_tmp = Path(tmp, ARTIFACTS["disk"])
            build_disk(disk_tmp, mkfs)
            os.replace(disk_tmp, cache / ARTIFACTS["disk"])

        manifest = {key: str((cache / name).resolve()) for key, name in ARTIFACTS.items()}
        manifest.update(
            version=release, inputs=inputs, cmdline=RECOMMENDED_CMDLINE,
            init_markers=[INIT_STARTED, READY], modules=[m[0] for m in modules],
            disk_label=DISK_LABEL,
            disk_files={n: _sha256(d) for n, d in disk_files().items()},
            sha256={key: _sha256(d) for key, d in outputs.items()})
        tmpm = cache / "manifest.json.tmp"
        tmpm.write_text(json.dumps(manifest, indent=2) + "\n")
        os.replace(tmpm, cache / "manifest.json")
        return manifest


def _print(manifest: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(manifest))
        return
    print(f"version  {manifest['version']}")
    for key in ARTIFACTS:
        print(f"{key:8} {manifest[key]}")
    print(f"cmdline  {manifest['cmdline']}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="vmmd-guest", description="Build the vmmd Linux test guest.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name, text in (("build", "fetch packages and build the guest (cached)"),
                       ("path", "print the cached guest's paths without building")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--json", action="store_true", help="print one JSON object")
        p.add_argument("--cache", type=Path, default=None,
                       help="cache directory (default $VMMD_GUEST_CACHE or ~/.cache/vmmd/guest)")
    args = ap.parse_args(argv)
    cache = args.cache or default_cache_dir()
    if args.cmd == "path":
        manifest = read_manifest(cache)
        if manifest is None:
            print(f"vmmd-guest: no guest built in {cache}; run: vmmd-guest build", file=sys.stderr)
            return 1
        _print(manifest, args.json)
        return 0
    try:
        manifest = build(cache)
    except (GuestBuildError, OSError) as e:
        print(f"vmmd-guest: build failed: {e}", file=sys.stderr)
        return 1
    _print(manifest, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
