"""Pause, resume and stop for a set of vCPU threads.

Pause returns only once every vCPU thread is out of KVM_RUN and parked. A
vCPU is kicked out of KVM_RUN by setting kvm_run.immediate_exit *before*
sending it a signal: if the signal lands while the thread is between its
pause check and the ioctl, the flag still makes KVM_RUN return at once.
"""

from __future__ import annotations

import signal
import threading

KICK_SIGNAL = signal.SIGUSR1


def install_kick_handler() -> None:
    """A handler (not SIG_IGN) so the kick interrupts KVM_RUN with EINTR.

    Must be called from the main thread, before any vCPU thread starts.
    """
    signal.signal(KICK_SIGNAL, lambda signum, frame: None)


class RunControl:
    """Shared by the vCPU threads of one VM."""

    def __init__(self):
        self._cond = threading.Condition()
        self._pause_requested = False
        self._stopping = False
        self._parked: set[int] = set()
        self._members: dict[int, object] = {}  # vcpu index -> VcpuThread

    # -- called by vCPU threads ---------------------------------------------
    def register(self, index: int, member) -> None:
        with self._cond:
            self._members[index] = member

    def unregister(self, index: int) -> None:
        with self._cond:
            self._members.pop(index, None)
            self._parked.discard(index)
            self._cond.notify_all()

    def checkpoint(self, index: int) -> bool:
        """Park here while paused. Returns False when the thread must stop."""
        with self._cond:
            if not self._pause_requested and not self._stopping:
                return True
            self._parked.add(index)
            self._cond.notify_all()
            while self._pause_requested and not self._stopping:
                self._cond.wait()
            self._parked.discard(index)
            return not self._stopping

    @property
    def stopping(self) -> bool:
        return self._stopping

    # -- called by the VMM --------------------------------------------------
    def pause(self, timeout: float | None = None) -> bool:
        """Stop every vCPU outside KVM_RUN; True once all are parked."""
        with self._cond:
            self._pause_requested = True
            members = list(self._members.values())
        for m in members:
            m.kick()
        with self._cond:
            return self._cond.wait_for(
                lambda: self._parked >= set(self._members), timeout=timeout)

    def resume(self) -> None:
        with self._cond:
            self._pause_requested = False
            self._cond.notify_all()

    @property
    def paused(self) -> bool:
        with self._cond:
            return self._pause_requested and self._parked >= set(self._members)

    def stop(self) -> None:
        """Make every vCPU thread leave its loop (used for shutdown and reset)."""
        with self._cond:
            self._stopping = True
            members = list(self._members.values())
            self._cond.notify_all()
        for m in members:
            m.kick()
