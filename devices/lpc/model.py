"""The LPC device: two 16550A UARTs, the RTC/CMOS and the other legacy ports.

Options:
    com1, com2      console backend spec ("null", "stdio", "file,PATH",
                    "socket,PATH") or None (= "null"; the UART still exists,
                    as on a PC whose COM port has nothing plugged in)
    memory_low      bytes of RAM below 4 GiB (for the CMOS memory-size bytes)
    memory_high     bytes of RAM above 4 GiB
    post_port       claim port 0x80 too (default False; see legacy.py)
    console_fds     [stdin_fd, stdout_fd] for the stdio backend (default [0, 1])

Wider-than-byte accesses are split into byte accesses, low byte first, as
the ISA bus does; bytes that hit no register read as 0xFF.
"""

from __future__ import annotations

import asyncio
from functools import partial
from typing import Callable

from bus.types import IoRange, IoSpace
from devices.lpc import legacy as legacydef
from devices.lpc import pci_config
from devices.lpc.backend import Backend, make_backend
from devices.lpc.legacy import LegacyPorts
from devices.lpc.rtc import Rtc, utc_now
from devices.lpc.state import STATE_VERSION, check_state
from devices.lpc.uart import Uart16550
from devices.model import DeviceHost, DeviceModel

# name -> (I/O base, GSI), the PC assignment
COM_PORTS = {"com1": (0x3F8, 4), "com2": (0x2F8, 3)}
UART_PORTS = 8
RTC_BASE = 0x70
RTC_PORTS = 4  # 0x70/0x71 and the extended bank at 0x72/0x73

OPTION_KEYS = {"com1", "com2", "memory_low", "memory_high", "post_port", "console_fds"}


class SerialPort:
    """One UART wired to its backend and IRQ line.

    Input the UART cannot take yet waits here (the backend is paused
    meanwhile) and is pushed again when the guest makes room, so no typed
    byte is lost."""

    def __init__(self, name: str, gsi: int, backend: Backend, host: DeviceHost,
                 on_config: Callable[[], None]):
        self.name = name
        self.gsi = gsi
        self.backend = backend
        self.host = host
        self.pending = bytearray()
        self.quiesced = False
        self.uart = Uart16550(on_irq=self._irq, on_tx=self._tx, on_rx_ready=self.feed,
                              on_config=on_config)

    def _irq(self, level: bool) -> None:
        self.host.set_irq_line(self.gsi, level)

    def _tx(self, data: bytes) -> None:
        self.backend.write(data)

    def on_input(self, data: bytes) -> None:
        self.pending += data
        self.feed()

    def feed(self) -> None:
        if self.pending and not self.quiesced:
            taken = self.uart.receive(bytes(self.pending))
            del self.pending[:taken]
        if self.pending or self.quiesced:
            self.backend.pause_reading()
        else:
            self.backend.resume_reading()


CONSOLE_FILE_LIMIT = 1 << 30  # a console log is capped at 1 GiB


class LpcDevice(DeviceModel):
    KIND = "lpc"
    STATE_VERSION = STATE_VERSION
    NEEDS_GUEST_MEMORY = False

    def __init__(self, host: DeviceHost, options: dict, *, now=utc_now):
        super().__init__(host, options)
        opts = self._check_options(options)
        self.ports: dict[str, SerialPort] = {}
        try:
            for name, (base, gsi) in COM_PORTS.items():
                backend = make_backend(opts[name] or "null", on_quit=self._quit,
                                       stdin_fd=opts["console_fds"][0],
                                       stdout_fd=opts["console_fds"][1])
                self.ports[name] = SerialPort(name, gsi, backend, host, host.checkpoint)
        except Exception:
            self.close()
            raise
        self.rtc = Rtc(now, opts["memory_low"], opts["memory_high"], on_config=host.checkpoint)
        self.legacy = LegacyPorts(on_reset=self._reset_request, post_port=opts["post_port"])
        self.pci_config = pci_config.IsaBridgeConfig()
        self._dispatch = self._build_dispatch()

    @staticmethod
    def _check_options(options: dict) -> dict:
        if not isinstance(options, dict):
            raise ValueError(f"lpc options must be a map, got {type(options).__name__}")
        unknown = options.keys() - OPTION_KEYS
        if unknown:
            raise ValueError(f"lpc: unknown options {sorted(map(str, unknown))}")
        out = {}
        for name in COM_PORTS:
            spec = options.get(name)
            if spec is not None and not isinstance(spec, str):
                raise ValueError(f"lpc: {name} must be a backend spec string or null")
            out[name] = spec
        shared = [out[n] for n in COM_PORTS if out[n] and (out[n] == "stdio" or out[n].startswith("socket,"))]
        if len(shared) != len(set(shared)):
            raise ValueError(f"lpc: com1 and com2 cannot share the console {shared[0]!r}")
        for key in ("memory_low", "memory_high"):
            v = options.get(key, 0)
            if type(v) is not int or v < 0:
                raise ValueError(f"lpc: {key} must be a non-negative int, got {v!r}")
            out[key] = v
        post = options.get("post_port", False)
        if type(post) is not bool:
            raise ValueError(f"lpc: post_port must be a bool, got {post!r}")
        out["post_port"] = post
        fds = options.get("console_fds", [0, 1])
        if (not isinstance(fds, (list, tuple)) or len(fds) != 2
                or any(type(fd) is not int or fd < 0 for fd in fds)):
            raise ValueError(f"lpc: console_fds must be [stdin_fd, stdout_fd], got {fds!r}")
        out["console_fds"] = list(fds)
        return out

    def _build_dispatch(self) -> dict[int, tuple[Callable[[], int], Callable[[int], None]]]:
        table = {}
        for name, (base, _gsi) in COM_PORTS.items():
            uart = self.ports[name].uart
            for i in range(UART_PORTS):
                table[base + i] = (partial(uart.io_read, i), partial(uart.io_write, i))
        for i in range(RTC_PORTS):
            table[RTC_BASE + i] = (partial(self.rtc.io_read, i), partial(self.rtc.io_write, i))
        for port in self.legacy.ports:
            table[port] = (partial(self.legacy.io_read, port),
                           partial(self.legacy.io_write, port))
        return table

    # --- host requests ---------------------------------------------------------

    def _quit(self) -> None:
        self.host.request("quit")

    def _reset_request(self) -> None:
        self.host.request("reset")

    # --- bus ---------------------------------------------------------------------

    def io_ranges(self) -> list[IoRange]:
        ranges = [IoRange(IoSpace.PIO, base, UART_PORTS) for base, _ in COM_PORTS.values()]
        ranges.append(IoRange(IoSpace.PIO, RTC_BASE, RTC_PORTS))
        ranges += [IoRange(IoSpace.PIO, port, 1) for port in self.legacy.ports]
        return ranges

    def hello_info(self) -> dict:
        return {"pci": pci_config.PCI_DECLARATION}

    def io_read(self, space: IoSpace, addr: int, size: int) -> int:
        if space == IoSpace.PCI_CFG:
            return self.pci_config.read(addr, size)
        if space != IoSpace.PIO:
            return (1 << (8 * size)) - 1
        value = 0
        for i in range(size):
            entry = self._dispatch.get(addr + i)
            value |= (entry[0]() if entry else 0xFF) << (8 * i)
        return value

    def io_write(self, space: IoSpace, addr: int, size: int, value: int) -> None:
        if space == IoSpace.PCI_CFG:
            self.pci_config.write(addr, size, value)
            return
        if space != IoSpace.PIO:
            return
        for i in range(size):
            entry = self._dispatch.get(addr + i)
            if entry:
                entry[1]((value >> (8 * i)) & 0xFF)

    # --- lifecycle -----------------------------------------------------------------

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        for port in self.ports.values():
            port.backend.start(loop, port.on_input)
            port.feed()  # applies the quiesced / pending state to the backend

    def reset(self) -> None:
        self.pci_config.reset()
        for port in self.ports.values():
            port.uart.reset()
        self.rtc.reset()
        self.legacy.reset()
        for port in self.ports.values():
            port.feed()

    def quiesce(self) -> None:
        for port in self.ports.values():
            port.quiesced = True
            port.backend.pause_reading()

    def resume(self) -> None:
        for port in self.ports.values():
            port.quiesced = False
            port.feed()

    def save_state(self) -> dict:
        return {
            "version": STATE_VERSION,
            "com1": self.ports["com1"].uart.save(),
            "com2": self.ports["com2"].uart.save(),
            "rtc": self.rtc.save(),
            "legacy": self.legacy.save(),
        }

    def restore_state(self, state: dict) -> None:
        clean = check_state(state)  # raises ValueError before anything changes
        self.rtc.restore(clean["rtc"])
        self.legacy.restore(clean["legacy"])
        for name, port in self.ports.items():
            port.uart.restore(clean[name])  # re-asserts the IRQ line
            port.feed()

    def stats(self) -> dict:
        out = {}
        for name, port in self.ports.items():
            out[name] = {
                "backend": port.backend.kind,
                **port.uart.stats,
                "backend_tx_bytes": port.backend.stats["tx_bytes"],
                "backend_tx_dropped": port.backend.stats["tx_dropped"],
                "backend_rx_bytes": port.backend.stats["rx_bytes"],
                "pending_input": len(port.pending),
                "irq_level": port.uart.irq_level,
            }
        out["rtc"] = {"nmi_masked": self.rtc.nmi_masked, "offset_us": self.rtc.offset_us}
        out["post_code"] = self.legacy.latches[legacydef.POST]
        return out

    def file_size_limit(self) -> int:
        """RLIMIT_FSIZE in the jail: a file console appends to its file, and
        a stdio console may be a file vmmd's stdout was redirected to;
        otherwise the device writes no regular file."""
        kinds = {port.backend.kind for port in self.ports.values()}
        return CONSOLE_FILE_LIMIT if kinds & {"file", "stdio"} else 0

    def close(self) -> None:
        for port in getattr(self, "ports", {}).values():
            port.backend.close()


DEVICE_MODEL = LpcDevice  # what devices/runtime.py instantiates for kind "lpc"
