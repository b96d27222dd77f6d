"""Virtio 1.x constants (spec sections 2.1 status, 2.7 split rings, 6 feature bits)."""

# device status (2.1)
STATUS_ACKNOWLEDGE = 0x01
STATUS_DRIVER = 0x02
STATUS_DRIVER_OK = 0x04
STATUS_FEATURES_OK = 0x08
STATUS_NEEDS_RESET = 0x40
STATUS_FAILED = 0x80

# transport / ring feature bits (6)
F_RING_INDIRECT_DESC = 28
F_RING_EVENT_IDX = 29
F_VERSION_1 = 32
F_ACCESS_PLATFORM = 33
F_RING_PACKED = 34
F_IN_ORDER = 35

# what the transport offers on top of the device's own feature bits
TRANSPORT_FEATURES = (1 << F_VERSION_1) | (1 << F_RING_INDIRECT_DESC) | (1 << F_RING_EVENT_IDX)

# split ring descriptor and ring flags (2.7)
VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTQ_DESC_F_INDIRECT = 4
VIRTQ_USED_F_NO_NOTIFY = 1
VIRTQ_AVAIL_F_NO_INTERRUPT = 1

MAX_QUEUE_SIZE = 32768  # split ring limit (2.7)

# ISR status bits (4.1.4.5)
ISR_QUEUE = 0x1
ISR_CONFIG = 0x2

NO_VECTOR = 0xFFFF

# virtio device ids (5) and the PCI class code vmmd presents for each
VIRTIO_ID_NET = 1
VIRTIO_ID_BLOCK = 2
VIRTIO_ID_CONSOLE = 3
VIRTIO_ID_RNG = 4
VIRTIO_ID_BALLOON = 5
VIRTIO_ID_SCSI = 8
VIRTIO_ID_9P = 9
VIRTIO_ID_VSOCK = 19

PCI_CLASS_BY_ID = {
    VIRTIO_ID_NET: 0x020000,      # network controller, ethernet
    VIRTIO_ID_BLOCK: 0x018000,    # mass storage, other
    VIRTIO_ID_CONSOLE: 0x078000,  # communication, other
    VIRTIO_ID_RNG: 0x00FF00,
    VIRTIO_ID_BALLOON: 0x050000,  # memory controller, RAM
    VIRTIO_ID_SCSI: 0x010000,     # SCSI
}
PCI_CLASS_OTHER = 0xFF0000


def feature_names(features: int) -> list[str]:
    names = {F_RING_INDIRECT_DESC: "RING_INDIRECT_DESC", F_RING_EVENT_IDX: "RING_EVENT_IDX",
             F_VERSION_1: "VERSION_1", F_ACCESS_PLATFORM: "ACCESS_PLATFORM",
             F_RING_PACKED: "RING_PACKED", F_IN_ORDER: "IN_ORDER"}
    return [names.get(b, f"bit{b}") for b in range(64) if features >> b & 1]
