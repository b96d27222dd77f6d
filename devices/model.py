"""The shape every device model has; devices/runtime.py drives it.

A model is sans-I/O at its register interface: accesses come in as method
calls, side effects (interrupts, checkpoints, requests) go out through the
DeviceHost it was given. Backends (files, sockets, taps) are opened in
__init__, before the sandbox, and attached to the event loop in start().
"""

from __future__ import annotations

from typing import Protocol

from bus.types import IoRange, IoSpace


class DeviceHost(Protocol):
    memory: object  # vmmd.guest_memory.GuestMemory or None

    def set_irq_line(self, gsi: int, level: bool) -> None: ...
    def send_msi(self, address: int, data: int) -> None: ...
    def checkpoint(self) -> None: ...
    def request(self, what: str, args: dict | None = None) -> None: ...
    def fire_vector(self, vector: int) -> None: ...   # bus-only MSI-X
    fds: dict  # bootstrap "fds": name -> fd


class DeviceModel:
    KIND = "none"
    STATE_VERSION = 1
    NEEDS_GUEST_MEMORY = False

    def __init__(self, host: DeviceHost, options: dict):
        self.host = host
        self.options = options

    def io_ranges(self) -> list[IoRange]:
        return []

    def hello_info(self) -> dict:
        """Extra HELLO info, e.g. {"pci": ...} (bus/pci_info.py) for a PCI function."""
        return {}

    def io_read(self, space: IoSpace, addr: int, size: int) -> int:
        return (1 << (8 * size)) - 1

    def io_write(self, space: IoSpace, addr: int, size: int, value: int) -> None:
        pass

    async def start(self) -> None:
        pass

    def reset(self) -> None:
        pass

    def quiesce(self) -> None:
        pass

    def resume(self) -> None:
        pass

    def save_state(self) -> dict:
        return {}

    def restore_state(self, state: dict) -> None:
        pass

    def stats(self) -> dict:
        return {}

    def device_control(self, op: str, args: dict):
        """CONTROL "device" {"op": op, "args": args}: a device-specific op from
        vmmd (e.g. the balloon's "set"); the result goes back in the reply.
        ValueError (the reply's error text) for an op the device does not know."""
        raise ValueError(f"{self.KIND}: no device op {op!r}")

    def close(self) -> None:
        pass
