"""The stock Debian cloud kernel under vmmd (slow here: guest kernel code is
emulated on PVM hosts, see ../shared/notes/platform-kvm.md).

One boot per test session; every check runs against that guest.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import requires_kvm, requires_root
from tests.vmmd_process import VmmdProcess

pytestmark = [requires_kvm, requires_root, pytest.mark.e2e]

BOOT_LOG_TIMEOUT = 420  # seconds to the first console line, with margin for a loaded machine


@pytest.fixture(scope="session")
def default_guest():
    """The default guest's artifacts, built from Debian packages (cached)."""
    r = subprocess.run([sys.executable, "-m", "vmmd.guest.build", "build", "--json"],
                       capture_output=True, text=True, timeout=1800)
    if r.returncode != 0:
        pytest.fail(f"vmmd-guest build failed: {r.stderr[-2000:]}")
    return json.loads(r.stdout)


@pytest.fixture(scope="session")
def linux_vm(default_guest, tmp_path_factory):
    vm = VmmdProcess(tmp_path_factory.mktemp("linux"), [
        "-c", "1", "-m", "512M", "-s", "31,lpc",
        "--kernel", default_guest["kernel"], "--initrd", default_guest["initrd"],
        "--cmdline", "console=ttyS0 panic=-1 reboot=t rdinit=/init",
    ])
    vm.wait_api()
    yield vm
    vm.stop()


def test_kernel_prints_its_boot_log_through_the_lpc_process(linux_vm, default_guest):
    out = linux_vm.wait_for("BIOS-e820", BOOT_LOG_TIMEOUT)
    assert f"Linux version {default_guest['version']}" in out
    assert "Command line: console=ttyS0" in out
    # The PVM options are vmmd's own doing, added only on PVM hosts.
    from vmmd.assists import host_is_pvm
    assert ("clearcpuid=" in out) == host_is_pvm()
    (lpc,) = linux_vm.rpc("device.list")
    assert lpc["state"] == "running" and lpc["restarts"] == 0
