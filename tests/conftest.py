"""Shared fixtures and skip rules for the vmmd test suite."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def kvm_available() -> str | None:
    """None when /dev/kvm is usable, else the reason it is not."""
    if not os.path.exists("/dev/kvm"):
        return "needs /dev/kvm (KVM is not available on this machine)"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "needs read/write access to /dev/kvm"
    return None


def is_root() -> bool:
    return os.geteuid() == 0


requires_kvm = pytest.mark.skipif(kvm_available() is not None, reason=kvm_available() or "")
requires_root = pytest.mark.skipif(not is_root(), reason="needs root (namespaces, subreaper, tap)")


@pytest.fixture(scope="session")
def test_guests():
    """The assembly test guests, built once per session (cached by source hash)."""
    if shutil.which("as") is None or shutil.which("ld") is None:
        pytest.skip("needs binutils (as, ld) to build the test guests")
    from tests.guests.build import build_all
    return build_all()
