"""Start real device processes over and over, through vmmd's supervisor, and
count how each incarnation ended (used by tests/integration/
test_device_jail.py and bench/device_starts.py).

Every start is an operator restart (save, SIGKILL, spawn with the full
sandbox, handshake, restore) followed by a STATS round trip, so each
incarnation runs its jail and serves. An incarnation killed by us ends
"killed by SIGKILL"; one that died on its own (e.g. a libzmq thread
running for the first time after the seccomp filter: "killed by SIGSYS")
is counted as such; the supervisor then restarts it by itself.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from contextlib import ExitStack, contextmanager

from vmmd.devlink import DeviceSpec
from vmmd.pci.fastpath import PciExpect
from vmmd.supervisor import Supervisor

from tests.harness.driver import Harness

KINDS = ("lpc", "virtio_blk", "virtio_net", "virtio_balloon")
LPC_GSIS = frozenset({1, 3, 4, 8, 12})


class RecordingSupervisor(Supervisor):
    """vmmd's Supervisor, remembering how every reaped incarnation ended."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.reaped: list[str] = []

    def _reap(self, pid: int) -> str:
        status = Supervisor._reap(pid)
        self.reaped.append(status)
        return status


class RecordingHarness(Harness):
    def _make_supervisor(self, timeout: float) -> Supervisor:
        return RecordingSupervisor(loop=self.loop, rundir=self.rundir, memory=self.memory,
                                   iospace=self.iospace, irq_line=self.vm.irq_line,
                                   on_request=self._on_request, sandbox=self.sandbox,
                                   timeout=timeout, pci=self.pci, fast_path=not self.bus_only)


def lpc_spec(mem_size: int, slot: int = 31, com1: str | None = None) -> DeviceSpec:
    """What vmmd's Machine builds for its lpc (no consoles unless com1 is given)."""
    return DeviceSpec(id="lpc", kind="lpc", slot=slot, function=0,
                      options={"com1": com1, "com2": None, "memory_low": mem_size, "memory_high": 0},
                      allowed_gsis=LPC_GSIS, stdio=False,
                      pci=PciExpect(vectors=0, queues=0, intx=False, fixed_ranges=True))


@contextmanager
def device_of_kind(h: Harness, kind: str, workdir: str):
    """Add and start one device of `kind` on harness h; yields its ManagedDevice."""
    with ExitStack() as stack:
        if kind == "lpc":
            dev = h.add_device(lpc_spec(h.memory.size))
        elif kind == "virtio_blk":
            from tests.harness.blk import blk_spec
            path = os.path.join(workdir, "disk.img")
            with open(path, "wb") as f:
                f.truncate(4 << 20)
            dev = h.add_device(blk_spec(path, slot=2))
        elif kind == "virtio_net":
            from devices.virtio_net.backend import open_socket_port
            from devices.virtio_net.switch import Switch
            from tests.harness.net import add_net_device, net_spec
            path = os.path.join(workdir, "switch.sock")
            stack.enter_context(Switch(path))
            dev = add_net_device(h, net_spec([f"socket={path}"], slot=3), {"socket": open_socket_port(path)})
        elif kind == "virtio_balloon":
            from tests.harness.balloon import balloon_spec
            dev = h.add_device(balloon_spec(slot=4))
        else:
            raise ValueError(f"unknown kind {kind!r}")
        yield dev


def start_loop(kind: str, starts: int, *, mem_size: int = 32 << 20, settle: float = 0.02) -> dict:
    """`starts` starts of one device kind; returns {"starts", "ended": Counter,
    "sigsys", "crashes", "seconds"}."""
    with tempfile.TemporaryDirectory(prefix="vmmd-starts-") as workdir, \
            RecordingHarness(sandbox="on", mem_size=mem_size, timeout=10.0) as h:
        t0 = time.monotonic()
        with device_of_kind(h, kind, workdir) as dev:
            for i in range(starts):
                if i:
                    h.restart(dev, timeout=60.0)
                h.wait_running(dev, dev.generation, timeout=60.0)
                dev.control("stats")
                time.sleep(settle)  # let any late thread run into the filter
            h.run(h.supervisor.stop_all(), 30.0)
        seconds = time.monotonic() - t0
        ended = Counter(h.supervisor.reaped)
    crashes = sum(n for status, n in ended.items() if status not in ("killed by SIGKILL", "exit status 0"))
    return {"kind": kind, "starts": starts, "ended": dict(ended), "sigsys": ended.get("killed by SIGSYS", 0),
            "crashes": crashes, "seconds": round(seconds, 1)}


@contextmanager
def cpu_load(processes: int | None = None):
    """One busy-looping process per core (or `processes`), killed on exit."""
    n = processes if processes is not None else (os.cpu_count() or 1)
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    try:
        yield n
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()
