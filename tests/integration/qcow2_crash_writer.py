"""A qcow2 writer to be killed with SIGKILL (tests/integration/test_qcow2_crash.py).

    python -m tests.integration.qcow2_crash_writer IMAGE SEED START LOG

Runs ops(SEED) from index START on IMAGE through Qcow2Image (with fdatasync
barriers) and appends each completed op's index to LOG, forever."""

from __future__ import annotations

import os
import random
import sys


def ops(seed: int, size: int, cluster: int):
    """The deterministic op stream: (index, kind, offset, length, fill byte)."""
    rnd = random.Random(seed)
    i = 0
    while True:
        kind = rnd.choices(["write", "zero", "discard", "flush"], [60, 15, 15, 10])[0]
        n = rnd.randrange(1, 3 * cluster + 1)
        off = rnd.randrange(0, size - n)
        yield i, kind, off, n, rnd.randrange(1, 256)
        i += 1


def apply_to_model(model: bytearray, op, cluster: int) -> None:
    _, kind, off, n, fill = op
    if kind == "write":
        model[off:off + n] = bytes([fill]) * n
    elif kind == "zero":
        model[off:off + n] = bytes(n)
    elif kind == "discard":
        a = -(-off // cluster) * cluster
        b = (off + n) // cluster * cluster
        if b > a:
            model[a:b] = bytes(b - a)


def main() -> None:
    from devices.virtio_blk.qcow2.image import open_image
    path, seed, start, log = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    img = open_image(path, read_only=False)
    logfd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.write(logfd, b"open\n")
    for op in ops(seed, img.size, img.cs):
        i, kind, off, n, fill = op
        if i < start:
            continue
        if kind == "write":
            img.write(off, bytes([fill]) * n)
        elif kind == "zero":
            img.write_zeroes(off, n)
        elif kind == "discard":
            img.discard(off, n)
        else:
            img.flush()
        os.write(logfd, b"%d\n" % i)


if __name__ == "__main__":
    main()
