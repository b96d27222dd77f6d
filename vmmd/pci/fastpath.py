"""The fast-path file descriptors vmmd creates for a PCI device before its
first spawn and hands, unchanged, to every incarnation (so KVM's irqfd and
ioeventfd registrations stay valid across device restarts).

Names (bootstrap "fds"): irqfd.<v> per MSI-X vector, ioeventfd.<q> per
queue, intx + intx_resample for INTx, dirty_log (the device dirty log memfd).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

EFD_FLAGS = os.EFD_CLOEXEC | os.EFD_NONBLOCK


@dataclass(frozen=True)
class PciExpect:
    """What vmmd expects a PCI device to declare (from its slot config)."""
    vectors: int
    queues: int
    intx: bool = True
    fixed_ranges: bool = False  # legacy ports besides the function (the LPC bridge)


def create_eventfds(expect: PciExpect) -> dict[str, int]:
    fds: dict[str, int] = {}
    try:
        for v in range(expect.vectors):
            fds[f"irqfd.{v}"] = os.eventfd(0, EFD_FLAGS)
        for q in range(expect.queues):
            fds[f"ioeventfd.{q}"] = os.eventfd(0, EFD_FLAGS)
        if expect.intx:
            fds["intx"] = os.eventfd(0, EFD_FLAGS)
            fds["intx_resample"] = os.eventfd(0, EFD_FLAGS)
    except OSError:
        close_fds(fds)
        raise
    return fds


def close_fds(fds: dict[str, int]) -> None:
    for fd in fds.values():
        try:
            os.close(fd)
        except OSError:
            pass
    fds.clear()


def create_dirty_log(layout):
    """The device dirty log (devices/virtio/dirty_log.py) covering `layout`."""
    from devices.virtio.dirty_log import DirtyLog
    return DirtyLog.for_layout(layout)
