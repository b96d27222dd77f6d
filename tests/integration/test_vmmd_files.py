"""What vmmd leaves on disk: console output files 0600, and no socket it named after it exits."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.kvm
def test_console_file_is_private_and_sockets_are_removed_at_exit(tmp_path, test_guests):
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        pytest.skip("needs /dev/kvm")
    out, com2, api = tmp_path / "com1.out", tmp_path / "com2.sock", tmp_path / "api.sock"
    r = subprocess.run(
        [sys.executable, "-m", "vmmd.cli", "-m", "64M", "-s", "31,lpc", "-l", f"com1,file,{out}",
         "-l", f"com2,socket,{com2}", "--api-socket", str(api), "--raw", str(test_guests["hello"]),
         "--no-reboot"],
        cwd=REPO, capture_output=True, timeout=120, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr[-3000:]
    assert out.read_bytes(), "the guest printed nothing"
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o600
    assert not com2.exists(), "console socket left behind"
    assert not api.exists(), "API socket left behind"
