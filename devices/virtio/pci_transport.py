"""The virtio 1.x modern PCI function (virtio spec 4.1) as a sans-I/O register model.

The device process owns this function's configuration space and the virtio
registers in its BARs; vmmd owns the bus, the BAR routing and the MSI-X table
and PBA (docs/architecture.md, "PCI and virtio"). Nothing here does I/O: the
owner (devices.virtio.device.VirtioDevice) implements TransportHooks.

Layout (vmmd learns it from pci_declaration(), the guest from the caps):

    config space  type-0 header; vendor 0x1AF4, device 0x1040 + virtio id,
                  revision 1, subsystem 0x1AF4:0x0040, INTA, capability list:
        0x40      MSI-X (when vectors > 0): table BAR2 @0, PBA BAR2 @pba_off
        ...       virtio vendor caps: common, notify (multiplier 4), ISR,
                  device config (when the device has one), PCI cfg access
    BAR0/1        mem64, 16 KiB, the virtio registers:
        0x0000    common config (0x38 bytes used)
        0x1000    ISR status (read to clear)
        0x2000    device-specific config
        0x3000    notify: queue q at 0x3000 + 4*q (queue_notify_off = q)
    BAR2          mem32, MSI-X table and PBA (emulated by vmmd; accesses
                  never reach the device)

BAR sizing: the size bits of a BAR are read-only zeros, so writing all ones
reads back the size mask with the type bits (mem64: 0x4) in the low nibble;
the upper half of a 64-bit BAR is fully writable.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Protocol

from devices.virtio.features import (
    F_VERSION_1, MAX_QUEUE_SIZE, NO_VECTOR, PCI_CLASS_BY_ID, PCI_CLASS_OTHER, STATUS_DRIVER_OK,
    STATUS_FEATURES_OK, STATUS_NEEDS_RESET, TRANSPORT_FEATURES, ISR_CONFIG)

VENDOR_ID = 0x1AF4
DEVICE_ID_BASE = 0x1040
SUBSYSTEM_VENDOR_ID = 0x1AF4
SUBSYSTEM_ID = 0x0040           # spec 4.1.2.1: non-transitional devices use >= 0x40
REVISION = 1

CFG_SIZE = 256
# type-0 header offsets
PCI_VENDOR_ID, PCI_DEVICE_ID, PCI_COMMAND, PCI_STATUS = 0x00, 0x02, 0x04, 0x06
PCI_REVISION, PCI_CLASS_PROG = 0x08, 0x09
PCI_CACHE_LINE, PCI_LATENCY, PCI_HEADER_TYPE = 0x0C, 0x0D, 0x0E
PCI_BAR0 = 0x10
PCI_SUBSYSTEM_VENDOR, PCI_SUBSYSTEM_ID = 0x2C, 0x2E
PCI_CAP_PTR, PCI_INTERRUPT_LINE, PCI_INTERRUPT_PIN = 0x34, 0x3C, 0x3D

CMD_IO, CMD_MEMORY, CMD_MASTER, CMD_INTX_DISABLE = 0x1, 0x2, 0x4, 0x400
COMMAND_WMASK = CMD_MEMORY | CMD_MASTER | CMD_INTX_DISABLE  # no I/O BARs: I/O bit hardwired 0
STATUS_CAP_LIST, STATUS_INTERRUPT = 0x10, 0x08

CAP_ID_MSIX, CAP_ID_VNDR = 0x11, 0x09
MSIX_ENABLE, MSIX_FUNCTION_MASK = 0x8000, 0x4000
MAX_MSIX_VECTORS = 2048

# virtio_pci_cap cfg_type
VIRTIO_PCI_CAP_COMMON_CFG = 1
VIRTIO_PCI_CAP_NOTIFY_CFG = 2
VIRTIO_PCI_CAP_ISR_CFG = 3
VIRTIO_PCI_CAP_DEVICE_CFG = 4
VIRTIO_PCI_CAP_PCI_CFG = 5

# BAR layout
VIRTIO_BAR = 0                  # mem64: occupies BAR0 and BAR1
VIRTIO_BAR_SIZE = 0x4000
MSIX_BAR = 2                    # mem32
COMMON_OFFSET, COMMON_LENGTH = 0x0000, 0x1000
ISR_OFFSET, ISR_LENGTH = 0x1000, 0x1000
DEVICE_OFFSET, DEVICE_LENGTH = 0x2000, 0x1000
NOTIFY_OFFSET, NOTIFY_LENGTH = 0x3000, 0x1000
NOTIFY_MULTIPLIER = 4
MAX_QUEUES = NOTIFY_LENGTH // NOTIFY_MULTIPLIER

# common config (struct virtio_pci_common_cfg)
COMMON_DFSELECT, COMMON_DF, COMMON_GFSELECT, COMMON_GF = 0x00, 0x04, 0x08, 0x0C
COMMON_MSIX, COMMON_NUMQ, COMMON_STATUS, COMMON_CFGGENERATION = 0x10, 0x12, 0x14, 0x15
COMMON_Q_SELECT, COMMON_Q_SIZE, COMMON_Q_MSIX, COMMON_Q_ENABLE, COMMON_Q_NOFF = (
    0x16, 0x18, 0x1A, 0x1C, 0x1E)
COMMON_Q_DESCLO, COMMON_Q_DESCHI = 0x20, 0x24
COMMON_Q_AVAILLO, COMMON_Q_AVAILHI = 0x28, 0x2C
COMMON_Q_USEDLO, COMMON_Q_USEDHI = 0x30, 0x34
COMMON_SIZE = 0x38
_COMMON = struct.Struct("<IIIIHHBBHHHHHQQQ")
assert _COMMON.size == COMMON_SIZE

STATE_VERSION = 1


class TransportHooks(Protocol):
    """What the transport asks of its owner (all synchronous)."""

    def transport_reset(self) -> None: ...                 # device_status := 0
    def transport_features_ok(self, features: int) -> bool: ...
    def transport_driver_ok(self) -> None: ...             # DRIVER_OK set (after FEATURES_OK)
    def transport_queue_enabled(self, q: int) -> None: ... # queue_enable := 1 after DRIVER_OK
    def transport_notify(self, q: int) -> None: ...        # a kick written to the notify region
    def transport_config_read(self, offset: int, size: int) -> int: ...
    def transport_config_write(self, offset: int, size: int, value: int) -> None: ...
    def transport_isr_cleared(self) -> None: ...           # ISR was read: deassert INTx
    def transport_changed(self) -> None: ...               # register state changed (checkpoint)


@dataclass
class QueueConfig:
    max_size: int
    size: int = 0
    msix_vector: int = NO_VECTOR
    enabled: bool = False
    desc: int = 0
    driver: int = 0
    device: int = 0

    def reset(self) -> None:
        self.size, self.msix_vector, self.enabled = self.max_size, NO_VECTOR, False
        self.desc = self.driver = self.device = 0

    def valid_size(self) -> bool:
        return 1 <= self.size <= self.max_size and not self.size & (self.size - 1)


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


class VirtioPciTransport:
    """Configuration space + common/ISR/notify/device-config registers of one function."""

    def __init__(self, hooks: TransportHooks, *, virtio_id: int, device_features: int,
                 queue_max_sizes: list[int], msix_vectors: int, config_size: int,
                 pci_class: int | None = None, intx_pin: int = 1):
        if not 1 <= len(queue_max_sizes) <= MAX_QUEUES:
            raise ValueError(f"a virtio device has 1..{MAX_QUEUES} queues")
        for m in queue_max_sizes:
            if not 1 <= m <= MAX_QUEUE_SIZE or m & (m - 1):
                raise ValueError(f"queue max size {m} is not a power of 2 <= {MAX_QUEUE_SIZE}")
        if not 0 <= msix_vectors <= MAX_MSIX_VECTORS:
            raise ValueError(f"msix_vectors must be 0..{MAX_MSIX_VECTORS}")
        if not 0 <= config_size <= DEVICE_LENGTH:
            raise ValueError(f"device config is 0..{DEVICE_LENGTH} bytes")
        self.hooks = hooks
        self.virtio_id = virtio_id
        self.offered = (device_features | TRANSPORT_FEATURES) & ((1 << 64) - 1)
        self.msix_vectors = msix_vectors
        self.config_size = config_size
        self.intx_pin = intx_pin
        self.pci_class = PCI_CLASS_BY_ID.get(virtio_id, PCI_CLASS_OTHER) if pci_class is None \
            else pci_class
        self.queues = [QueueConfig(m) for m in queue_max_sizes]
        # MSI-X table: 16 bytes per vector; PBA: one bit per vector, in u64s
        self.msix_table_offset = 0
        self.msix_pba_offset = _pow2_at_least(max(16 * msix_vectors, 8))
        self.msix_bar_size = max(0x1000, _pow2_at_least(
            self.msix_pba_offset + 8 * ((msix_vectors + 63) // 64)))
        self._build_config_space()
        self.power_on_reset()

    # --- configuration space ----------------------------------------------------------

    def _build_config_space(self) -> None:
        cfg = bytearray(CFG_SIZE)
        wmask = bytearray(CFG_SIZE)
        struct.pack_into("<HH", cfg, PCI_VENDOR_ID, VENDOR_ID, DEVICE_ID_BASE + self.virtio_id)
        struct.pack_into("<H", cfg, PCI_STATUS, STATUS_CAP_LIST)
        struct.pack_into("<I", cfg, PCI_REVISION, REVISION | (self.pci_class << 8))
        cfg[PCI_HEADER_TYPE] = 0
        struct.pack_into("<HH", cfg, PCI_SUBSYSTEM_VENDOR, SUBSYSTEM_VENDOR_ID, SUBSYSTEM_ID)
        cfg[PCI_INTERRUPT_PIN] = self.intx_pin
        struct.pack_into("<H", wmask, PCI_COMMAND, COMMAND_WMASK)
        wmask[PCI_CACHE_LINE] = wmask[PCI_LATENCY] = wmask[PCI_INTERRUPT_LINE] = 0xFF
        # BARs
        self.bars: dict[int, tuple[int, str]] = {VIRTIO_BAR: (VIRTIO_BAR_SIZE, "mem64")}
        if self.msix_vectors:
            self.bars[MSIX_BAR] = (self.msix_bar_size, "mem32")
        for index, (size, kind) in self.bars.items():
            off = PCI_BAR0 + 4 * index
            struct.pack_into("<I", cfg, off, 0x4 if kind == "mem64" else 0x0)
            struct.pack_into("<I", wmask, off, ~(size - 1) & 0xFFFFFFF0)
            if kind == "mem64":
                struct.pack_into("<I", wmask, off + 4, 0xFFFFFFFF)
        # capabilities
        caps: list[tuple[str, bytes, int]] = []   # (name, body, length) in chain order
        if self.msix_vectors:
            caps.append(("msix", struct.pack("<BBHII", CAP_ID_MSIX, 0, self.msix_vectors - 1,
                                             self.msix_table_offset | MSIX_BAR,
                                             self.msix_pba_offset | MSIX_BAR), 12))

        def vcap(cfg_type: int, offset: int, length: int, extra: bytes = b"") -> bytes:
            return struct.pack("<BBBBBBHII", CAP_ID_VNDR, 0, 16 + len(extra), cfg_type,
                               VIRTIO_BAR, 0, 0, offset, length) + extra

        caps.append(("common", vcap(VIRTIO_PCI_CAP_COMMON_CFG, COMMON_OFFSET, COMMON_LENGTH), 16))
        caps.append(("notify", vcap(VIRTIO_PCI_CAP_NOTIFY_CFG, NOTIFY_OFFSET, NOTIFY_LENGTH,
                                    struct.pack("<I", NOTIFY_MULTIPLIER)), 20))
        caps.append(("isr", vcap(VIRTIO_PCI_CAP_ISR_CFG, ISR_OFFSET, ISR_LENGTH), 16))
        if self.config_size:
            caps.append(("device", vcap(VIRTIO_PCI_CAP_DEVICE_CFG, DEVICE_OFFSET,
                                        self.config_size), 16))
        caps.append(("pci_cfg", vcap(VIRTIO_PCI_CAP_PCI_CFG, 0, 0, bytes(4)), 20))
        self.cap_offsets: dict[str, int] = {}
        pos, prev_next = 0x40, PCI_CAP_PTR
        for name, body, length in caps:
            cfg[prev_next] = pos
            cfg[pos:pos + length] = body
            self.cap_offsets[name] = pos
            prev_next = pos + 1
            pos = (pos + length + 3) & ~3
        cfg[prev_next] = 0
        if self.msix_vectors:
            struct.pack_into("<H", wmask, self.cap_offsets["msix"] + 2,
                             MSIX_ENABLE | MSIX_FUNCTION_MASK)
        pc = self.cap_offsets["pci_cfg"]
        wmask[pc + 4] = 0xFF                           # bar
        wmask[pc + 8:pc + 16] = b"\xff" * 8            # offset, length
        self.pci_cfg_data = pc + 16
        self._initial_cfg = bytes(cfg)
        self.cfg = cfg
        self.wmask = bytes(wmask)

    def power_on_reset(self) -> None:
        """Function reset: config space as at power-on (BARs 0, decoding off)
        and a virtio reset."""
        self.cfg[:] = self._initial_cfg
        self.intx_asserted = False
        self.config_generation = 0
        self.virtio_reset()

    def virtio_reset(self) -> None:
        """The register side of device_status := 0."""
        self.status = 0
        self.device_feature_select = 0
        self.driver_feature_select = 0
        self.driver_features = 0
        self.config_msix_vector = NO_VECTOR
        self.queue_select = 0
        self.isr = 0
        for q in self.queues:
            q.reset()

    def cfg_read(self, offset: int, size: int) -> int:
        if size not in (1, 2, 4) or offset < 0 or offset + size > CFG_SIZE:
            return (1 << (8 * size)) - 1
        if offset <= self.pci_cfg_data + 3 and offset + size > self.pci_cfg_data:
            return self._pci_cfg_data_read(offset, size)
        value = int.from_bytes(self.cfg[offset:offset + size], "little")
        if self.intx_asserted and offset <= PCI_STATUS < offset + size:
            value |= STATUS_INTERRUPT << (8 * (PCI_STATUS - offset))
        return value

    def cfg_write(self, offset: int, size: int, value: int) -> None:
        if size not in (1, 2, 4) or offset < 0 or offset + size > CFG_SIZE:
            return
        if offset <= self.pci_cfg_data + 3 and offset + size > self.pci_cfg_data:
            self._pci_cfg_data_write(offset, size, value)
            return
        cfg, wmask = self.cfg, self.wmask
        changed = False
        for i in range(size):
            m = wmask[offset + i]
            if m:
                b = (value >> (8 * i)) & 0xFF
                new = (cfg[offset + i] & ~m) | (b & m)
                if new != cfg[offset + i]:
                    cfg[offset + i] = new
                    changed = True
        if changed:
            self.hooks.transport_changed()

    # VIRTIO_PCI_CAP_PCI_CFG: a window into BAR0 through configuration space
    def _pci_cfg_window(self) -> tuple[int, int] | None:
        pc = self.cap_offsets["pci_cfg"]
        bar = self.cfg[pc + 4]
        off, length = struct.unpack_from("<II", self.cfg, pc + 8)
        if bar != VIRTIO_BAR or length not in (1, 2, 4) or off % length \
                or off + length > VIRTIO_BAR_SIZE:
            return None
        return off, length

    def _pci_cfg_data_read(self, offset: int, size: int) -> int:
        win = self._pci_cfg_window()
        value = self.bar_read(VIRTIO_BAR, win[0], win[1]) if win else 0
        shift = 8 * (offset - self.pci_cfg_data)
        return (value >> shift) & ((1 << (8 * size)) - 1) if shift >= 0 else \
            (value << -shift) & ((1 << (8 * size)) - 1)

    def _pci_cfg_data_write(self, offset: int, size: int, value: int) -> None:
        win = self._pci_cfg_window()
        if win is None or offset != self.pci_cfg_data:
            return
        self.bar_write(VIRTIO_BAR, win[0], win[1], value & ((1 << (8 * win[1])) - 1))

    # --- PCI state derived from config space ----------------------------------------------

    @property
    def command(self) -> int:
        return struct.unpack_from("<H", self.cfg, PCI_COMMAND)[0]

    @property
    def memory_enabled(self) -> bool:
        return bool(self.command & CMD_MEMORY)

    @property
    def intx_disabled(self) -> bool:
        return bool(self.command & CMD_INTX_DISABLE)

    def bar_address(self, index: int) -> int:
        size, kind = self.bars[index]
        lo = struct.unpack_from("<I", self.cfg, PCI_BAR0 + 4 * index)[0]
        addr = lo & 0xFFFFFFF0
        if kind == "mem64":
            addr |= struct.unpack_from("<I", self.cfg, PCI_BAR0 + 4 * index + 4)[0] << 32
        return addr

    @property
    def msix_control(self) -> int:
        if not self.msix_vectors:
            return 0
        return struct.unpack_from("<H", self.cfg, self.cap_offsets["msix"] + 2)[0]

    @property
    def msix_enabled(self) -> bool:
        return bool(self.msix_control & MSIX_ENABLE)

    @property
    def msix_function_masked(self) -> bool:
        return bool(self.msix_control & MSIX_FUNCTION_MASK)

    def decode(self, addr: int, size: int) -> tuple[int, int] | None:
        """(bar, offset) of a guest-physical MMIO access, by the current BARs."""
        if not self.memory_enabled:
            return None
        for index, (bar_size, _kind) in self.bars.items():
            base = self.bar_address(index)
            if base and base <= addr and addr + size <= base + bar_size:
                return index, addr - base
        return None

    # --- the virtio registers (BAR0) ---------------------------------------------------------

    def bar_read(self, bar: int, offset: int, size: int) -> int:
        ones = (1 << (8 * size)) - 1
        if bar != VIRTIO_BAR or size not in (1, 2, 4, 8):
            return ones
        if COMMON_OFFSET <= offset < COMMON_OFFSET + COMMON_LENGTH:
            return self._common_read(offset - COMMON_OFFSET, size)
        if ISR_OFFSET <= offset < ISR_OFFSET + ISR_LENGTH:
            if offset != ISR_OFFSET:
                return 0
            value, self.isr = self.isr, 0
            if value:
                self.hooks.transport_isr_cleared()
            return value
        if DEVICE_OFFSET <= offset < DEVICE_OFFSET + DEVICE_LENGTH:
            off = offset - DEVICE_OFFSET
            if off + size > self.config_size:
                return 0
            return self.hooks.transport_config_read(off, size) & ones
        return 0  # notify region and holes

    def bar_write(self, bar: int, offset: int, size: int, value: int) -> None:
        if bar != VIRTIO_BAR or size not in (1, 2, 4, 8):
            return
        if NOTIFY_OFFSET <= offset < NOTIFY_OFFSET + NOTIFY_LENGTH:
            q = (offset - NOTIFY_OFFSET) // NOTIFY_MULTIPLIER
            if q < len(self.queues):
                self.hooks.transport_notify(q)
        elif COMMON_OFFSET <= offset < COMMON_OFFSET + COMMON_LENGTH:
            self._common_write(offset - COMMON_OFFSET, size, value)
        elif DEVICE_OFFSET <= offset < DEVICE_OFFSET + DEVICE_LENGTH:
            off = offset - DEVICE_OFFSET
            if off + size <= self.config_size:
                self.hooks.transport_config_write(off, size, value)

    def notify_address(self, q: int) -> int:
        return self.bar_address(VIRTIO_BAR) + NOTIFY_OFFSET + q * NOTIFY_MULTIPLIER

    @property
    def selected(self) -> QueueConfig | None:
        return self.queues[self.queue_select] if self.queue_select < len(self.queues) else None

    def _common_image(self) -> bytes:
        sel = self.device_feature_select
        df = (self.offered >> (32 * sel)) & 0xFFFFFFFF if sel < 2 else 0
        gsel = self.driver_feature_select
        gf = (self.driver_features >> (32 * gsel)) & 0xFFFFFFFF if gsel < 2 else 0
        q = self.selected
        if q is None:
            qvals = (0, NO_VECTOR, 0, 0, 0, 0, 0)
        else:
            qvals = (q.size, q.msix_vector, int(q.enabled), self.queue_select,
                     q.desc, q.driver, q.device)
        return _COMMON.pack(sel, df, gsel, gf, self.config_msix_vector, len(self.queues),
                            self.status, self.config_generation, self.queue_select, *qvals)

    def _common_read(self, offset: int, size: int) -> int:
        if offset + size > COMMON_SIZE:
            return 0
        return int.from_bytes(self._common_image()[offset:offset + size], "little")

    def _common_write(self, offset: int, size: int, value: int) -> None:
        key = (offset, size)
        q = self.selected
        if key == (COMMON_DFSELECT, 4):
            self.device_feature_select = value
        elif key == (COMMON_GFSELECT, 4):
            self.driver_feature_select = value
        elif key == (COMMON_GF, 4):
            sel = self.driver_feature_select
            if sel < 2 and not self.status & STATUS_FEATURES_OK:
                mask = 0xFFFFFFFF << (32 * sel)
                self.driver_features = (self.driver_features & ~mask) | (value << (32 * sel))
        elif key == (COMMON_MSIX, 2):
            self.config_msix_vector = self._vector(value)
            self.hooks.transport_changed()
        elif key == (COMMON_STATUS, 1):
            self._write_status(value)
        elif key == (COMMON_Q_SELECT, 2):
            self.queue_select = value
        elif q is None:
            return
        elif key == (COMMON_Q_MSIX, 2):
            q.msix_vector = self._vector(value)
            self.hooks.transport_changed()
        elif q.enabled:
            return  # the rest of a queue's configuration is frozen once enabled
        elif key == (COMMON_Q_SIZE, 2):
            q.size = value
        elif key == (COMMON_Q_ENABLE, 2):
            if value == 1:
                q.enabled = True
                self.hooks.transport_changed()
                if self.status & STATUS_DRIVER_OK:
                    self.hooks.transport_queue_enabled(self.queue_select)
        elif COMMON_Q_DESCLO <= offset < COMMON_SIZE and size in (4, 8) and offset % size == 0:
            field = ("desc", "driver", "device")[(offset - COMMON_Q_DESCLO) // 8]
            shift = 32 * ((offset - COMMON_Q_DESCLO) // 4 % 2)
            mask = ((1 << (8 * size)) - 1) << shift
            setattr(q, field, (getattr(q, field) & ~mask) | (value << shift))

    def _vector(self, value: int) -> int:
        return value if value < self.msix_vectors else NO_VECTOR

    def features_acceptable(self, features: int) -> bool:
        return (not features & ~self.offered and bool(features >> F_VERSION_1 & 1)
                and self.hooks.transport_features_ok(features))

    def _write_status(self, value: int) -> None:
        if value == 0:
            self.virtio_reset()
            self.hooks.transport_reset()
            self.hooks.transport_changed()
            return
        old = self.status
        new = (value & ~STATUS_NEEDS_RESET) | (old & STATUS_NEEDS_RESET)
        if new & STATUS_FEATURES_OK and not old & STATUS_FEATURES_OK \
                and not self.features_acceptable(self.driver_features):
            new &= ~STATUS_FEATURES_OK
        self.status = new
        self.hooks.transport_changed()
        if (new & STATUS_DRIVER_OK and not old & STATUS_DRIVER_OK
                and new & STATUS_FEATURES_OK):
            self.hooks.transport_driver_ok()

    # --- device-side events ------------------------------------------------------------------

    @property
    def negotiated(self) -> int:
        return self.driver_features if self.status & STATUS_FEATURES_OK else 0

    @property
    def driver_ok(self) -> bool:
        return (self.status & (STATUS_DRIVER_OK | STATUS_FEATURES_OK | STATUS_NEEDS_RESET)
                == STATUS_DRIVER_OK | STATUS_FEATURES_OK)

    def set_needs_reset(self) -> bool:
        """Set DEVICE_NEEDS_RESET; True when newly set (then raise a config interrupt)."""
        if self.status & STATUS_NEEDS_RESET or not self.status:
            return False
        self.status |= STATUS_NEEDS_RESET
        self.isr |= ISR_CONFIG
        return True

    def config_changed(self) -> None:
        """The device config changed: bump config_generation, ISR config bit."""
        self.config_generation = (self.config_generation + 1) & 0xFF
        self.isr |= ISR_CONFIG

    # --- declaration and state --------------------------------------------------------------

    def pci_declaration(self) -> dict:
        return {
            "bars": [[i, size, kind] for i, (size, kind) in sorted(self.bars.items())],
            "msix": ({"cap": self.cap_offsets["msix"], "vectors": self.msix_vectors,
                      "table": [MSIX_BAR, self.msix_table_offset],
                      "pba": [MSIX_BAR, self.msix_pba_offset]} if self.msix_vectors else None),
            "notify": {"bar": VIRTIO_BAR, "offset": NOTIFY_OFFSET,
                       "multiplier": NOTIFY_MULTIPLIER, "queues": len(self.queues)},
            "intx_pin": self.intx_pin,
        }

    def save(self) -> dict:
        return {
            "version": STATE_VERSION,
            "cfg": bytes(self.cfg),
            "intx_asserted": self.intx_asserted,
            "status": self.status,
            "device_feature_select": self.device_feature_select,
            "driver_feature_select": self.driver_feature_select,
            "driver_features": self.driver_features,
            "config_msix_vector": self.config_msix_vector,
            "config_generation": self.config_generation,
            "queue_select": self.queue_select,
            "isr": self.isr,
            "queues": [[q.size, q.msix_vector, q.enabled, q.desc, q.driver, q.device]
                       for q in self.queues],
        }

    def restore(self, state: dict) -> None:
        """Load save(); ValueError (and nothing changed) on a malformed state."""
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise ValueError("transport state: not a map of version 1")

        def u(key: str, bits: int) -> int:
            v = state.get(key)
            if type(v) is not int or not 0 <= v < 1 << bits:
                raise ValueError(f"transport state {key}: {v!r} is not a u{bits}")
            return v

        cfg = state.get("cfg")
        if not isinstance(cfg, (bytes, bytearray)) or len(cfg) != CFG_SIZE:
            raise ValueError("transport state cfg must be 256 bytes")
        # read-only bits must match this device (same kind, same declaration)
        ro = bytes(c & ~m & 0xFF for c, m in zip(self._initial_cfg, self.wmask))
        if bytes(c & ~m & 0xFF for c, m in zip(cfg, self.wmask)) != ro:
            raise ValueError("transport state cfg does not belong to this device")
        vals = {k: u(k, b) for k, b in (("status", 8), ("device_feature_select", 32),
                                        ("driver_feature_select", 32), ("driver_features", 64),
                                        ("config_msix_vector", 16), ("config_generation", 8),
                                        ("queue_select", 16), ("isr", 8))}
        if vals["driver_features"] & ~self.offered:
            raise ValueError("transport state has features this device does not offer")
        if type(state.get("intx_asserted")) is not bool:
            raise ValueError("transport state intx_asserted must be a bool")
        queues = state.get("queues")
        if not isinstance(queues, list) or len(queues) != len(self.queues):
            raise ValueError(f"transport state must have {len(self.queues)} queues")
        parsed = []
        for qc, item in zip(self.queues, queues):
            if (not isinstance(item, list) or len(item) != 6 or type(item[2]) is not bool
                    or not all(type(v) is int for v in item[:2] + item[3:])
                    or not 0 <= item[0] <= 0xFFFF or not 0 <= item[1] <= 0xFFFF
                    or not all(0 <= v < 1 << 64 for v in item[3:])):
                raise ValueError(f"transport state: bad queue {item!r}")
            parsed.append(item)
        self.cfg[:] = cfg
        self.intx_asserted = state["intx_asserted"]
        for k, v in vals.items():
            setattr(self, k, v)
        for qc, (size, vec, enabled, desc, driver, device) in zip(self.queues, parsed):
            qc.size, qc.msix_vector, qc.enabled = size, self._vector(vec), enabled
            qc.desc, qc.driver, qc.device = desc, driver, device
