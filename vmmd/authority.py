"""What a device may ask of vmmd: the authorisation of device-originated messages.

Device processes are untrusted. Every event a device sends on the bus
(bus/protocol.py EVT_FROM_DEVICE) is decided here against what the device
owns (its DeviceSpec and PCI declaration), sans-I/O:

| message    | allowed when                                                        |
|------------|---------------------------------------------------------------------|
| IRQ_LINE   | the GSI is one of the device's own lines (lpc: 3, 4, 8; PCI: INTx)  |
| MSI        | never: vmmd builds every MSI from its own MSI-X table (VECTOR)      |
| VECTOR     | the index is below the device's own MSI-X vector count              |
| CHECKPOINT | the frame is at most the kind's state size limit                    |
| REQUEST    | reset: a device owning reset ports, after the guest wrote a reset   |
|            | command to one (a one-shot permit armed by vmmd's own forwarding);  |
|            | quit: a device whose console the operator attached to stdio         |
| LOG, ERROR | always, at a bounded rate (vmmd/ratelimit.py), as one quoted line    |

On the request channel (bus/endpoint.py VmmChannel): HELLO only as the first
message (validated, bus/pci_info.py); READ_REPLY / CONTROL_REPLY only with
the seq vmmd is waiting for, a READ_REPLY no wider than the read, a reply
frame no larger than MAX_SMALL_FRAME (a save: the kind's state limit);
stale or unexpected frames are dropped and counted, garbage fails the
access (the device is replaced). The fast path needs no check: a device
holds eventfds for its own vectors, INTx line and queues only, and vmmd
routes them from its own MSI-X table (vmmd/pci/msix.py).

Refusals are counted per device by kind (`ManagedDevice.refused`, shown in
device.list and device.stats) and logged at a bounded rate.
"""

from __future__ import annotations

import threading

# MSI data: delivery mode in bits 8..10. Only fixed (0) and lowest priority
# (1) are interrupts; SMI (2), NMI (4), INIT (5) and ExtINT (7) would reach
# the CPU outside the guest's interrupt handling (INIT stops a vCPU).
MSI_DELIVERY_SHIFT = 8
MSI_DELIVERY_MASK = 0x7
DELIVERABLE_MODES = frozenset({0, 1})


def msi_delivery_ok(data: int) -> bool:
    """Whether an MSI with this data word is a plain interrupt (fixed or lowest priority)."""
    return ((data >> MSI_DELIVERY_SHIFT) & MSI_DELIVERY_MASK) in DELIVERABLE_MODES


# Largest CHECKPOINT frame accepted, by device kind (bytes). The states are
# registers and ring positions: a few KiB; the limits leave ample room.
STATE_LIMITS = {
    "lpc": 64 << 10,
    "virtio_blk": 256 << 10,
    "virtio_net": 256 << 10,
    "virtio_balloon": 256 << 10,
}
DEFAULT_STATE_LIMIT = 256 << 10

# The lpc's reset ports (devices/lpc/legacy.py): 8042 command 0x64, its data
# port 0x60 (after command 0xD1: output port write) and system control port A.
I8042_DATA, I8042_CMD, PORT_A = 0x60, 0x64, 0x92
RESET_PORTS = frozenset({I8042_DATA, I8042_CMD, PORT_A})


class ResetPortWatch:
    """Arms a one-shot reset permit when the guest writes a reset command to
    a reset port; a device's reset REQUEST is honoured only against a permit.

    Mirrors devices/lpc/legacy.py: 0x64 commands 0xF0..0xFE with bit 0 clear
    pulse RESET; 0x64 0xD1 then a 0x60 byte with bit 0 clear writes the
    output port with RESET low; 0x92 bit 0 set requests a reset. vmmd sees
    these writes because it forwards them, so a device cannot forge one."""

    def __init__(self):
        self._lock = threading.Lock()
        self._pending_d1 = False
        self._permit = False
        self.armed = 0

    def observe_write(self, port: int, value: int) -> None:
        value &= 0xFF
        arm = False
        with self._lock:
            if port == I8042_CMD:
                self._pending_d1 = value == 0xD1
                arm = (value & 0xF1) == 0xF0
            elif port == I8042_DATA:
                arm = self._pending_d1 and not value & 1
                self._pending_d1 = False
            elif port == PORT_A:
                arm = bool(value & 1)
            if arm:
                self._permit = True
                self.armed += 1

    def take_permit(self) -> bool:
        with self._lock:
            ok, self._permit = self._permit, False
            return ok

    def reset(self) -> None:
        with self._lock:
            self._pending_d1 = self._permit = False
