"""Shared virtio machinery: guest-memory access with a dirty log, split
virtqueues, the virtio 1.x modern PCI transport and the VirtioDevice base.

Modules:
    dirty_log      the device dirty-log memfd (both vmmd and device side)
    memory         DeviceMemory: bounds-checked guest memory that logs writes
    queue          split virtqueues, validated descriptor chains
    features       feature bits, status bits and other spec constants
    pci_transport  the virtio-pci function as a sans-I/O register model
    device         VirtioDevice(DeviceModel): transport + queues + fast path
"""
