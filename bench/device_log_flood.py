"""A jailed device floods its stderr with forged vmmd log lines (issue 9):
how much reaches vmmd's log, how much is dropped, how long it takes.

    sudo .venv/bin/python bench/device_log_flood.py [--mib 64]

The device is tests/integration/fake_device.py run by devices.runtime with
the base seccomp policy, spawned by vmmd's supervisor (sandbox on); it
writes --mib MiB of the line below to fd 2 from inside its jail. vmmd's log
records are counted by a handler on the "vmmd.devices" logger.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, HERE)

FORGED = "vmmd ERROR vmmd.machine: guest panicked, shutting down \x1b[2J\x1b]0;owned\x07\n"
LAUNCH = (f"import sys; sys.path.insert(0, {HERE!r}); from devices.runtime import main; "
          "from sandbox.seccomp_policy import base_policy; "
          "main('fake', model_module='tests.integration.fake_device', policy=base_policy())")


class Count(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records = 0
        self.bytes = 0
        self.unattributed = 0
        self.controls = 0

    def emit(self, record):
        msg = self.format(record)
        self.records += 1
        self.bytes += len(msg) + 1
        if not record.getMessage().startswith("[flood0] "):
            self.unattributed += 1
        if any(c in msg for c in "\x1b\x07\r\n"):
            self.controls += 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=64)
    args = ap.parse_args()
    from tests.harness.driver import Harness
    from vmmd.devlink import DeviceSpec

    count = Count()
    count.setFormatter(logging.Formatter("vmmd %(levelname)s %(name)s: %(message)s"))
    logger = logging.getLogger("vmmd.devices")
    logger.addHandler(count)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    flood = args.mib << 20
    with Harness(sandbox="on", mem_size=16 << 20) as h:
        h.supervisor.command = lambda spec, boot: [sys.executable, "-c", LAUNCH, "--bootstrap", json.dumps(boot)]
        dev = h.add_device(DeviceSpec(id="flood0", kind="fake", options={}))
        t0 = time.monotonic()
        cpu0 = time.process_time()
        written = dev.control("device", {"op": "stderr", "args": {"bytes": flood, "line": FORGED}}, 300.0)
        t_write = time.monotonic() - t0
        while h.supervisor.log_stats("flood0")["bytes"] < flood and time.monotonic() - t0 < 300:
            time.sleep(0.05)
        t_all = time.monotonic() - t0
        cpu = time.process_time() - cpu0
        stats = h.supervisor.log_stats("flood0")
        alive = dev.state == "running" and dev.control("stats") is not None
    lines = written // len(FORGED.encode())
    print(f"device wrote {written >> 20} MiB ({lines} lines) in {t_write:.2f} s; vmmd read it all in {t_all:.2f} s "
          f"using {cpu:.2f} s of CPU; loadavg {os.getloadavg()[0]:.2f}")
    print(f"relayed {stats['lines']} lines, dropped {stats['dropped']}; vmmd log records {count.records} "
          f"({count.bytes} bytes); not attributed to the device {count.unattributed}; "
          f"with raw control characters {count.controls}; device still serving: {alive}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
