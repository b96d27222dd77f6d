"""Seccomp policies for device processes, and how one becomes a filter.

A Policy lists, by syscall name:
  allow         allowed whatever the arguments;
  conditional   ArgRules: allowed (or failed with an errno) only when the
                arguments match, e.g. clone only with CLONE_THREAD;
  errno_probes  harmless probes that fail with an errno instead of killing,
                so CPython's lazy imports, linecache or isatty checks see an
                ordinary OSError (a dead device is the top complaint about
                seccomp in other VMMs);
  kill          never legitimate for a device: kill the process even in
                "log" mode (exec, ptrace, mount, namespaces, bpf, ...).
Anything else hits the default action: KILL_PROCESS in mode "on", LOG in
mode "log" (allowed, and reported to the kernel audit log).

base_policy() is what CPython 3.11 + uvloop/libuv + pyzmq/libzmq I/O threads
+ msgpack need at steady state, serving already-open sockets, pipes and
eventfds. It was determined with strace -f on tests/integration/
sandbox_probe.py and checked by tests/integration/test_sandbox.py.
Device policies extend it (devices/<kind>/policy.py).
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Iterable, Mapping

import pyseccomp

# pyseccomp comparison operators, re-exported for ArgRule users.
EQ, NE, MASKED_EQ = pyseccomp.EQ, pyseccomp.NE, pyseccomp.MASKED_EQ

# Placeholder for "this process's pid", filled in when the filter is built
# (the pid changes at isolate()'s fork).
SELF_PID = "self_pid"

CLONE_THREAD = 0x00010000
PROT_EXEC = 0x4
AF_UNIX = 1
TCGETS, TCSETS, TIOCGWINSZ = 0x5401, 0x5402, 0x5413
FIONREAD, FIONBIO, FIONCLEX, FIOCLEX = 0x541B, 0x5421, 0x5450, 0x5451
SCHED_OTHER = 0
PR_SET_NAME, PR_GET_NAME = 15, 16


@dataclass(frozen=True)
class ArgRule:
    """syscall allowed (errno None) or failed with errno when every argument
    comparison (index, op, value, mask-or-0) holds. Several ArgRules on one
    syscall are alternatives; they must not overlap with different outcomes."""

    syscall: str
    args: tuple[tuple[int, int, int | str, int], ...]
    errno: int | None = None


@dataclass(frozen=True)
class Policy:
    name: str
    allow: frozenset[str] = frozenset()
    conditional: tuple[ArgRule, ...] = ()
    errno_probes: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))
    kill: frozenset[str] = frozenset()
    # RLIMIT_FSIZE: bytes this device may write to regular files (through
    # fds opened before the jail). 0: it writes none.
    file_size_limit: int = 0
    # RLIMIT_NOFILE headroom above the highest fd open at jail time.
    fd_margin: int = 16

    def __post_init__(self):
        object.__setattr__(self, "allow", frozenset(self.allow))
        object.__setattr__(self, "kill", frozenset(self.kill))
        object.__setattr__(self, "conditional", tuple(self.conditional))
        object.__setattr__(self, "errno_probes", MappingProxyType(dict(self.errno_probes)))
        self._check()

    def _check(self) -> None:
        groups = {
            "allow": self.allow,
            "errno_probes": set(self.errno_probes),
            "kill": self.kill,
            "conditional": {r.syscall for r in self.conditional},
        }
        names = list(groups)
        for i, a in enumerate(names):
            for b in names[i + 1:]:
                both = groups[a] & groups[b]
                if both:
                    raise ValueError(f"policy {self.name}: {sorted(both)} in both {a} and {b}")
        for name in set().union(*groups.values()):
            if pyseccomp.resolve_syscall(pyseccomp.Arch.NATIVE, name) == -1:
                raise ValueError(f"policy {self.name}: unknown syscall {name!r}")

    def extend(self, name: str | None = None, *, allow: Iterable[str] = (),
               conditional: Iterable[ArgRule] = (), errno_probes: Mapping[str, int] | None = None,
               kill: Iterable[str] = (), file_size_limit: int | None = None,
               fd_margin: int | None = None) -> "Policy":
        """A new policy with more rules. Allowing a syscall (plainly or
        conditionally) takes it out of errno_probes; it can never take one
        out of kill (that raises ValueError)."""
        allow = frozenset(allow)
        conditional = tuple(conditional)
        now_allowed = allow | {r.syscall for r in conditional}
        probes = {k: v for k, v in self.errno_probes.items() if k not in now_allowed}
        probes.update(errno_probes or {})
        return replace(
            self,
            name=name or self.name,
            allow=self.allow | allow,
            conditional=self.conditional + conditional,
            errno_probes=probes,
            kill=self.kill | frozenset(kill),
            file_size_limit=self.file_size_limit if file_size_limit is None else file_size_limit,
            fd_margin=self.fd_margin if fd_margin is None else fd_margin,
        )

    def build_filter(self, mode: str) -> pyseccomp.SyscallFilter:
        """A libseccomp filter for mode "on" (default KILL_PROCESS) or "log"
        (default LOG), synchronised to all threads on load (TSYNC)."""
        if mode not in ("on", "log"):
            raise ValueError(f"no seccomp filter in mode {mode!r}")
        default = pyseccomp.KILL_PROCESS if mode == "on" else pyseccomp.LOG
        flt = pyseccomp.SyscallFilter(default)
        flt.set_attr(pyseccomp.Attr.ACT_BADARCH, pyseccomp.KILL_PROCESS)
        flt.set_attr(pyseccomp.Attr.CTL_TSYNC, 1)
        for name in sorted(self.allow):
            _add(flt, pyseccomp.ALLOW, name)
        for name, err in sorted(self.errno_probes.items()):
            _add(flt, pyseccomp.ERRNO(err), name)
        if default != pyseccomp.KILL_PROCESS:  # libseccomp refuses rules equal to the default
            for name in sorted(self.kill):
                _add(flt, pyseccomp.KILL_PROCESS, name)
        pid = os.getpid()
        for rule in self.conditional:
            action = pyseccomp.ALLOW if rule.errno is None else pyseccomp.ERRNO(rule.errno)
            args = [pyseccomp.Arg(i, op, pid if v == SELF_PID else v, m) for i, op, v, m in rule.args]
            _add(flt, action, rule.syscall, *args)
        return flt


def _add(flt: pyseccomp.SyscallFilter, action: int, name: str, *args) -> None:
    nr = pyseccomp.resolve_syscall(pyseccomp.Arch.NATIVE, name)
    if nr < 0:
        return  # a syscall other architectures have (e.g. "open" on arm64)
    flt.add_rule(action, nr, *args)


# What a serving device does: I/O on open fds, polling, timers, memory,
# threads (libzmq's and executors'), signals.
_BASE_ALLOW = {
    # I/O on already-open fds
    "read", "write", "readv", "writev", "pread64", "pwrite64", "preadv", "pwritev",
    "close", "lseek", "fcntl", "fstat", "newfstatat", "statx", "fsync", "fdatasync",
    "dup", "dup2", "dup3", "pipe2", "eventfd2",
    # sockets that already exist
    "recvfrom", "sendto", "recvmsg", "sendmsg", "recvmmsg", "sendmmsg",
    "getsockopt", "setsockopt", "getsockname", "getpeername", "shutdown",
    # polling and waiting
    "epoll_create1", "epoll_ctl", "epoll_wait", "epoll_pwait", "epoll_pwait2",
    "poll", "ppoll", "select", "pselect6",
    "futex", "sched_yield", "restart_syscall", "nanosleep", "clock_nanosleep",
    "clock_gettime", "clock_getres", "gettimeofday",
    # memory (mmap/mprotect are conditional: no PROT_EXEC)
    "brk", "munmap", "mremap", "madvise",
    # threads and signals
    "set_robust_list", "rseq", "set_tid_address", "gettid", "getpid",
    "rt_sigreturn", "rt_sigprocmask", "rt_sigaction", "sigaltstack",
    "sched_getaffinity", "sched_getparam", "sched_getscheduler", "exit", "exit_group",
    # identity and randomness
    "getuid", "geteuid", "getgid", "getegid", "getrandom", "getcwd", "uname",
}

_BASE_CONDITIONAL = (
    # threads yes, processes no
    ArgRule("clone", ((0, MASKED_EQ, CLONE_THREAD, CLONE_THREAD),)),
    ArgRule("clone", ((0, MASKED_EQ, CLONE_THREAD, 0),), errno.EPERM),
    # no new executable memory (a jailed device never loads code)
    ArgRule("mmap", ((2, MASKED_EQ, PROT_EXEC, 0),)),
    ArgRule("mmap", ((2, MASKED_EQ, PROT_EXEC, PROT_EXEC),), errno.EPERM),
    ArgRule("mprotect", ((2, MASKED_EQ, PROT_EXEC, 0),)),
    ArgRule("mprotect", ((2, MASKED_EQ, PROT_EXEC, PROT_EXEC),), errno.EPERM),
    # socketpair for asyncio's self-pipe; never a network socket
    ArgRule("socketpair", ((0, EQ, AF_UNIX, 0),)),
    # reading limits is fine (glibc getrlimit is prlimit64 with new == NULL)
    ArgRule("prlimit64", ((0, EQ, 0, 0), (2, EQ, 0, 0))),
    # abort()/raise() signal only this process
    ArgRule("tgkill", ((0, EQ, SELF_PID, 0),)),
    # What a libzmq background thread does first when it runs: re-apply its
    # (default) scheduling policy, then name itself. Under load a thread
    # created before the jail may run for the first time after it, and died
    # of SIGSYS when these were not admitted (issue 9). Neither can raise a
    # priority: SCHED_OTHER takes only priority 0, and the name is cosmetic.
    ArgRule("sched_setscheduler", ((1, EQ, SCHED_OTHER, 0),)),
    ArgRule("prctl", ((0, EQ, PR_SET_NAME, 0),)),
    ArgRule("prctl", ((0, EQ, PR_GET_NAME, 0),)),
    # ioctl: the few generic fd ioctls Python, libuv and libzmq issue
    *(ArgRule("ioctl", ((1, EQ, req, 0),)) for req in (FIONBIO, FIONREAD, FIOCLEX, FIONCLEX, TCGETS, TIOCGWINSZ)),
)

# Harmless probes: answered with an errno so Python raises OSError.
_BASE_ERRNO = {
    "open": errno.EACCES, "openat": errno.EACCES, "openat2": errno.EACCES,
    "creat": errno.EACCES, "access": errno.EACCES, "faccessat": errno.EACCES,
    "faccessat2": errno.EACCES, "readlink": errno.EACCES, "readlinkat": errno.EACCES,
    "stat": errno.EACCES, "lstat": errno.EACCES,
    "unlink": errno.EACCES, "unlinkat": errno.EACCES,
    "socket": errno.EACCES, "connect": errno.EACCES, "bind": errno.EACCES,
    "fork": errno.EPERM, "vfork": errno.EPERM,
    "clone3": errno.ENOSYS,  # glibc then falls back to clone(), filtered above
    "io_uring_setup": errno.ENOSYS,  # libuv falls back to epoll
    "sysinfo": errno.EPERM,
    "memfd_create": errno.EPERM,
}

# Never legitimate for a device process.
_BASE_KILL = {
    "execve", "execveat", "ptrace", "process_vm_readv", "process_vm_writev",
    "mount", "umount2", "pivot_root", "chroot", "unshare", "setns",
    "fsopen", "fsconfig", "fsmount", "fspick", "move_mount", "open_tree", "mount_setattr",
    "open_by_handle_at", "name_to_handle_at",
    "bpf", "perf_event_open", "userfaultfd", "io_uring_enter", "io_uring_register",
    "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module",
    "reboot", "swapon", "swapoff", "acct", "quotactl", "syslog",
    "keyctl", "add_key", "request_key", "kcmp", "pidfd_getfd",
    "iopl", "ioperm", "modify_ldt", "personality",
    "setuid", "setgid", "setreuid", "setregid", "setresuid", "setresgid", "setgroups", "capset",
    "settimeofday", "clock_settime", "clock_adjtime", "adjtimex", "sethostname", "setdomainname",
}


def base_policy() -> Policy:
    """The steady-state needs of any Python device process (see module doc)."""
    return Policy(
        name="base",
        allow=frozenset(_BASE_ALLOW),
        conditional=_BASE_CONDITIONAL,
        errno_probes=_BASE_ERRNO,
        kill=frozenset(_BASE_KILL),
    )
