"""Crash injection: a qcow2 writer is killed with SIGKILL at random moments, over
and over on the same image. After every kill:
  * qemu-img check finds no corruption (leaks are allowed: exit 0 or 3);
  * every completed write is there (a kill loses only the op in flight);
  * vmmd-img check -r all leaves an image qemu-img check calls clean.
Lazy-refcount images are repaired by opening them, then checked."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest

from devices.virtio_blk.qcow2.image import create_qcow2, open_image
from tests.integration.qcow2_crash_writer import apply_to_model, ops

QEMU_IMG = shutil.which("qemu-img")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SIZE = 24 << 20
ROUNDS = 10


def _run_once(path, seed, start, log, delay):
    env = dict(os.environ, PYTHONPATH=ROOT)
    p = subprocess.Popen([sys.executable, "-m", "tests.integration.qcow2_crash_writer", path,
                          str(seed), str(start), log], cwd=ROOT, env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:     # let it open the image first
        if os.path.exists(log) and b"open" in open(log, "rb").read():
            break
        if p.poll() is not None:
            raise AssertionError(f"writer died: {p.stderr.read().decode()}")
        time.sleep(0.01)
    time.sleep(delay)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert p.returncode == -signal.SIGKILL, p.stderr.read().decode()
    p.stderr.close()


@pytest.mark.skipif(QEMU_IMG is None, reason="qemu-img (qemu-utils) is not installed")
@pytest.mark.parametrize("cluster,lazy", [(512, False), (65536, False), (4096, True)])
def test_kill_9_never_corrupts(tmp_path, cluster, lazy):
    path = str(tmp_path / "crash.qcow2")
    create_qcow2(path, SIZE, cluster_size=cluster, lazy_refcounts=lazy)
    model = bytearray(SIZE)
    rnd = random.Random(cluster)
    seed = cluster
    start = 0
    stream = ops(seed, SIZE, cluster)
    pending = []          # ops generated but not yet known to be done
    for rnd_no in range(ROUNDS):
        log = str(tmp_path / f"log{rnd_no}")
        _run_once(path, seed, start, log, rnd.uniform(0.02, 0.6))
        done = [int(x) for x in open(log).read().split()[1:]]
        last = done[-1] if done else start - 1
        while not pending or pending[-1][0] < last + 1:
            pending.append(next(stream))
        for op in [o for o in pending if o[0] <= last]:
            apply_to_model(model, op, cluster)
        inflight = [o for o in pending if o[0] == last + 1][0]
        pending = [o for o in pending if o[0] > last + 1]
        if lazy:
            open_image(path, read_only=False).close()      # repair on open
        res = subprocess.run([QEMU_IMG, "check", path], capture_output=True, text=True)
        assert res.returncode in (0, 3), f"round {rnd_no}: {res.stdout}{res.stderr}"
        img = open_image(path)
        data = bytearray(img.read(0, SIZE))
        img.close()
        _, kind, off, n, _ = inflight
        lo = off - off % cluster
        hi = off + n + (-(off + n)) % cluster
        # the op in flight may or may not have happened: adopt what is there
        model[lo:hi] = data[lo:hi]
        assert data == model, f"round {rnd_no}: lost a completed write (after op {last})"
        start = last + 2          # the writer resumes after the op in flight
        pending = [o for o in pending if o[0] >= start]
    res = subprocess.run([sys.executable, "-m", "vmmd.img", "check", "-r", "all", path],
                         capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stdout + res.stderr
    res = subprocess.run([QEMU_IMG, "check", path], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout
