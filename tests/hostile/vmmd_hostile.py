"""vmmd, with the device kinds named in VMMD_HOSTILE_KINDS (comma-separated)
run from tests/hostile/<kind>.py: the real device program and sandbox policy,
a compromised model. `python -m tests.hostile.vmmd_hostile <vmmd args>`."""

import json
import os
import sys

from vmmd import supervisor
from vmmd.cli import main

HOSTILE = {k for k in os.environ.get("VMMD_HOSTILE_KINDS", "").split(",") if k}
_command = supervisor.Supervisor.command


def command(self, spec, boot):
    if spec.kind not in HOSTILE:
        return _command(self, spec, boot)
    launch = f"from devices.runtime import main; main({spec.kind!r}, model_module='tests.hostile.{spec.kind}')"
    return [sys.executable, "-c", launch, "--bootstrap", json.dumps(boot)]


supervisor.Supervisor.command = command

if __name__ == "__main__":
    sys.exit(main())
