"""A device killed before it checkpointed the guest's last accesses comes
back with them: vmmd restores its successor from the last checkpoint and
replays the accesses sent after it (vmmd/access_journal.py). Real device
processes (tests/integration/fake_device.py), the real Supervisor."""

import asyncio
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path

from bus.types import IoSpace
from vmmd.devlink import DeviceSpec
from vmmd.iospace import IoSpaceMap
from vmmd.supervisor import Supervisor

ROOT = Path(__file__).resolve().parents[2]
PIO = IoSpace.PIO
BASE = 0x500
LAUNCH = ("import sys; sys.path.insert(0, {root!r}); from devices.runtime import main; "
          "main('fake', model_module='tests.integration.fake_device')")


class FakeSupervisor(Supervisor):
    def command(self, spec, boot):
        return [sys.executable, "-c", LAUNCH.format(root=str(ROOT)), "--bootstrap", json.dumps(boot)]


def run(body):
    rundir = tempfile.mkdtemp(prefix="replay", dir="/tmp")

    async def main():
        loop = asyncio.get_running_loop()
        io = IoSpaceMap()
        sup = FakeSupervisor(loop=loop, rundir=rundir, memory=None, iospace=io,
                             irq_line=lambda g, l: None, on_request=lambda *a: None,
                             sandbox="off", timeout=10.0)
        dev = sup.add(DeviceSpec(id="fake0", kind="fake", options={}))
        await sup.start(dev)

        async def call(fn, *a):
            return await loop.run_in_executor(None, fn, *a)
        try:
            await body(sup, dev, io, call)
        finally:
            await sup.stop_all()
            sup.close()
    try:
        asyncio.run(main())
    finally:
        shutil.rmtree(rundir, ignore_errors=True)


async def until(pred, what, timeout=60.0):
    for _ in range(int(timeout * 50)):
        if pred():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


async def kill_and_wait_for_successor(dev):
    old = dev.current.pid
    os.kill(old, signal.SIGKILL)
    await until(lambda: dev.current is not None and dev.current.pid != old and dev.state == "running",
                "the successor")


def test_accesses_after_the_last_checkpoint_are_replayed_into_the_successor():
    async def body(sup, dev, io, call):
        await call(io.write, PIO, BASE, 1, 5)                    # checkpointed
        await until(lambda: (dev.last_checkpoint or {}).get("reg") == 5, "the checkpoint")
        await call(io.write, PIO, BASE + 8, 1, 0x42)             # never checkpointed
        assert [await call(io.read, PIO, BASE + 9, 1) for _ in range(2)] == [0, 1]   # two pops
        await kill_and_wait_for_successor(dev)
        assert await call(io.read, PIO, BASE, 1) == 5
        assert await call(io.read, PIO, BASE + 8, 1) == 0x42     # the write came back
        assert await call(io.read, PIO, BASE + 9, 1) == 2        # each pop happened once
        # A second crash, before the successor checkpointed anything of its own
        # (its replayed accesses are journaled again): still all there.
        await kill_and_wait_for_successor(dev)
        assert await call(io.read, PIO, BASE + 8, 1) == 0x42
        assert await call(io.read, PIO, BASE + 9, 1) == 3        # the three pops so far, each once
    run(body)


def test_a_checkpoint_covers_what_came_before_it():
    async def body(sup, dev, io, call):
        await call(io.write, PIO, BASE + 8, 1, 7)
        await call(io.write, PIO, BASE, 1, 9)                    # checkpoint: covers the write above
        await until(lambda: (dev.last_checkpoint or {}).get("reg") == 9, "the checkpoint")
        await until(lambda: len(dev.journal) == 0, "the journal emptied")
        # Checkpoints racing the writes they cover are never taken for lies.
        for v in range(100):
            await call(io.write, PIO, BASE, 1, v)
        await until(lambda: (dev.last_checkpoint or {}).get("reg") == 99, "the last checkpoint")
        assert "checkpoint" not in dev.refused
        await call(io.write, PIO, BASE, 1, 9)
        await until(lambda: (dev.last_checkpoint or {}).get("reg") == 9 and len(dev.journal) == 0,
                    "the journal emptied again")
        await kill_and_wait_for_successor(dev)
        assert await call(io.read, PIO, BASE + 8, 1) == 7
        assert await call(io.read, PIO, BASE, 1) == 9
    run(body)


def test_past_the_journal_limit_the_successor_gets_the_checkpoint_alone(caplog):
    async def body(sup, dev, io, call):
        dev.journal.limit = 4
        await call(io.write, PIO, BASE, 1, 3)
        await until(lambda: (dev.last_checkpoint or {}).get("reg") == 3, "the checkpoint")
        for v in range(1, 11):
            await call(io.write, PIO, BASE + 8, 1, v)            # 10 unsaved writes, 4 kept
        with caplog.at_level(logging.WARNING, logger="vmmd.supervisor"):
            await kill_and_wait_for_successor(dev)
        assert "restored from the checkpoint alone" in caplog.text
        assert await call(io.read, PIO, BASE, 1) == 3
        assert await call(io.read, PIO, BASE + 8, 1) == 0        # not a partial replay
    run(body)
