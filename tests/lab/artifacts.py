"""The lab's L1 kernel: a Debian generic kernel (it ships kvm-amd.ko, which
the cloud kernel lacks) and busybox, fetched with ``apt-get download``,
unpacked with ``dpkg-deb -x`` and ``depmod``-ed, cached by package versions.

Cache ($VMMD_LAB_CACHE or ~/.cache/vmmd/lab):
  root/boot/vmlinuz-VER, root/lib/modules/VER/...   the unpacked kernel
  busybox                                            static busybox (virtme's initramfs)
  manifest.json                                      inputs and outputs
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from vmmd.guest.build import BUSYBOX_PACKAGE, Apt, GuestBuildError, _run

KERNEL_META_PACKAGE = "linux-image-amd64"
LAB_BUILD_VERSION = 1


class LabError(Exception):
    """The lab could not be built or started; the message says why."""


@dataclass(frozen=True)
class LabArtifacts:
    kernel: Path        # vmlinuz inside the unpacked package tree (virtme finds modules beside it)
    release: str        # e.g. 6.1.0-57-amd64
    busybox: Path
    cache: Path


def default_cache_dir() -> Path:
    env = os.environ.get("VMMD_LAB_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "vmmd" / "lab"


def _kernel_package(apt: Apt) -> str:
    def look() -> list[str]:
        out = _run(["apt-cache", "depends", KERNEL_META_PACKAGE])
        names = [n for n in re.findall(r"Depends: (linux-image-[\w.+-]+-amd64)\b", out)
                 if "cloud" not in n and "unsigned" not in n and "rt-" not in n]
        if not names:
            raise GuestBuildError(f"{KERNEL_META_PACKAGE} depends on no generic kernel image")
        return names
    return apt._retry(look)[0]


def _artifacts(cache: Path, manifest: dict) -> LabArtifacts:
    return LabArtifacts(kernel=cache / manifest["kernel"], release=manifest["release"],
                        busybox=cache / "busybox", cache=cache)


def build(cache: Path | None = None, log=print) -> LabArtifacts:
    """Build (or find in the cache) the L1 kernel tree and busybox."""
    cache = cache or default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            apt = Apt()
            kpkg = _kernel_package(apt)
            versions = apt.candidate_versions(kpkg, BUSYBOX_PACKAGE)
        except GuestBuildError as e:
            raise LabError(str(e)) from None
        inputs = {"build": LAB_BUILD_VERSION, "packages": versions}
        manifest_path = cache / "manifest.json"
        try:
            manifest = json.loads(manifest_path.read_text())
            if manifest.get("inputs") == inputs and (cache / manifest["kernel"]).exists():
                return _artifacts(cache, manifest)
        except (OSError, ValueError, KeyError):
            pass
        log(f"lab: building the L1 kernel from {kpkg} {versions[kpkg]}")
        try:
            debs = {p: apt.download(p, v, cache / "debs") for p, v in versions.items()}
        except GuestBuildError as e:
            raise LabError(str(e)) from None
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            root = Path(tmp) / "root"
            _run(["dpkg-deb", "-x", str(debs[kpkg]), str(root)])
            vmlinuz = sorted((root / "boot").glob("vmlinuz-*"))
            if not vmlinuz:
                raise LabError(f"{kpkg} holds no /boot/vmlinuz-*")
            release = vmlinuz[0].name[len("vmlinuz-"):]
            depmod = shutil.which("depmod") or "/sbin/depmod"
            _run([depmod, "-a", "-b", str(root), release])
            bb = Path(tmp) / "bb"
            _run(["dpkg-deb", "-x", str(debs[BUSYBOX_PACKAGE]), str(bb)])
            shutil.rmtree(cache / "root", ignore_errors=True)
            os.replace(root, cache / "root")
            os.replace(bb / "bin" / "busybox", cache / "busybox")
        manifest = {"inputs": inputs, "release": release,
                    "kernel": f"root/boot/vmlinuz-{release}"}
        manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
        return _artifacts(cache, manifest)


def kvm_modules_present(art: LabArtifacts) -> bool:
    moddir = art.cache / "root" / "lib" / "modules" / art.release
    return any(moddir.rglob("kvm-amd.ko*"))


def main_build(json_out: bool) -> int:
    art = build()
    if json_out:
        print(json.dumps({"kernel": str(art.kernel), "release": art.release,
                          "busybox": str(art.busybox)}))
    else:
        print(art.kernel)
    return 0

