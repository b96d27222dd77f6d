# Sourced by scripts/boot and scripts/test (and by hand, to get .venv/bin on
# PATH): everything a fresh machine needs. Idempotent and cheap when nothing
# changed. The work runs in a subshell with its own errexit, so sourcing it
# leaves the caller's shell options alone (an interactive shell would
# otherwise exit at its next failing command).
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY="${PYTHON:-python3}"

if ! (
set -euo pipefail
need_apt=()
command -v as >/dev/null || need_apt+=(binutils)
command -v gcc >/dev/null || need_apt+=(gcc)
command -v mkfs.ext4 >/dev/null || need_apt+=(e2fsprogs)
command -v dpkg-deb >/dev/null || need_apt+=(dpkg)
command -v cpio >/dev/null || need_apt+=(cpio)      # cross-checks the initramfs writer
command -v fio >/dev/null || need_apt+=(fio)        # host baseline of bench/virtio_blk.py
command -v ip >/dev/null || need_apt+=(iproute2)    # network namespaces for the virtio-net tests
command -v iasl >/dev/null || need_apt+=(acpica-tools)  # disassembles vmmd's ACPI tables in tests
command -v qemu-img >/dev/null || need_apt+=(qemu-utils)  # qcow2 oracle
# The nested lab (scripts/lab): QEMU, depmod for the L1 kernel's modules, and
# udevd, which virtme-ng's init needs for the command's I/O ports.
command -v qemu-system-x86_64 >/dev/null || need_apt+=(qemu-system-x86)
command -v depmod >/dev/null || [ -x /sbin/depmod ] || need_apt+=(kmod)
command -v udevadm >/dev/null || [ -x /bin/udevadm ] || need_apt+=(udev)
if [ ${#need_apt[@]} -gt 0 ]; then
    echo "bootstrap: installing ${need_apt[*]}" >&2
    if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi
# apt-get download needs package lists; a fresh machine may have none.
if ! ls /var/lib/apt/lists/*_Packages* >/dev/null 2>&1; then
    echo "bootstrap: apt-get update" >&2
    if [ "$(id -u)" = 0 ]; then apt-get update -qq; else sudo apt-get update -qq; fi
fi

stamp="$VENV/.vmmd-deps"
want="$(sha256sum "$ROOT/pyproject.toml" | cut -d' ' -f1)"
if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "bootstrap: creating $VENV" >&2
    "$PY" -m venv "$VENV"
    "$VENV/bin/pip" install -q --disable-pip-version-check -e "$ROOT[test]"
    echo "$want" > "$stamp"
fi
# Bytecode for the project's own packages (an editable install has none, and
# PYTHONDONTWRITEBYTECODE may forbid writing it on import): vmmd and every
# device process would otherwise compile each module from source at start.
# Quick when up to date; a stale .pyc is ignored (source mtime checked).
"$VENV/bin/python" -m compileall -q -j 0 "$ROOT/vmmd" "$ROOT/bus" "$ROOT/devices" "$ROOT/sandbox" "$ROOT/devopts" >/dev/null || true
); then
    echo "bootstrap: set-up failed (see above)" >&2
    return 1 2>/dev/null || exit 1
fi
export PATH="$VENV/bin:$PATH"

# PVM hosts (no VMX/SVM) cannot run a stock guest's user space: scripts/boot
# and scripts/test use the nested lab there (docs/lab.md).
host_is_pvm() {
    python -c 'import sys; from vmmd.assists import host_is_pvm; sys.exit(0 if host_is_pvm() else 1)'
}
