"""Sandbox policy of the lpc device process (UARTs, RTC, i8042, ...).

On top of the base policy it needs what its console backends do after the
jail: accept4 on the console socket backend's listening socket (opened
before the jail), and plain read/write on fds for a terminal or file
backend. vmmd puts the terminal in raw mode; the device never issues
termios ioctls beyond the TCGETS isatty() probe the base policy allows.
A file backend appends console output to a file opened before the jail,
so RLIMIT_FSIZE must allow writes: console logs are capped at 1 GiB. The
policy's limit is that cap; the runtime lowers it to 0 when no console is a
file or stdio (LpcDevice.file_size_limit).

Cgroup: no guest memory at all; a Python process with zmq and uvloop is
~40 MiB resident.
"""

from sandbox.cgroups import CgroupLimits
from sandbox.seccomp_policy import base_policy

from devices.lpc.model import CONSOLE_FILE_LIMIT

MiB = 1 << 20

POLICY = base_policy().extend(
    "lpc",
    allow={"accept4"},
    file_size_limit=CONSOLE_FILE_LIMIT,
)

CGROUP_LIMITS = CgroupLimits(memory_max=128 * MiB, pids_max=32)
