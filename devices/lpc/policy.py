"""Sandbox policy of the lpc device process (UARTs, RTC, i8042, ...).

On top of the base policy it needs what its console backends do after the
jail: accept4 on the console socket backend's listening socket (opened
before the jail), and plain read/write on fds for a terminal or file
backend. vmmd puts the terminal in raw mode; the device never issues
termios ioctls beyond the TCGETS isatty() probe the base policy allows.
A file backend appends console output to a file opened before the jail,
so RLIMIT_FSIZE must allow writes: console logs are capped at 1 GiB.
"""

from sandbox.seccomp_policy import base_policy

CONSOLE_FILE_LIMIT = 1 << 30

POLICY = base_policy().extend(
    "lpc",
    allow={"accept4"},
    file_size_limit=CONSOLE_FILE_LIMIT,
)
