"""Glue between vmmd's PCI layer and its neighbours: the virtio transport's
declaration passes bus.pci_info, machine's virtio-blk slot mapping, and
ManagedDevice.harvest_dirty over the device dirty log."""

import pytest

from vmmd.config import ConfigError

from bus.pci_info import parse_pci_info
from vmmd.config import SlotConfig
from vmmd.devlink import DeviceSpec, ManagedDevice
from vmmd.machine import Machine, virtio_blk_queues


class _Hooks:
    def __getattr__(self, name):
        return lambda *a, **k: None


@pytest.mark.parametrize("queues", [1, 4, 64])
def test_virtio_transport_declaration_is_valid(queues):
    transport = pytest.importorskip("devices.virtio.pci_transport")
    t = transport.VirtioPciTransport(_Hooks(), virtio_id=2, device_features=1 << 32,
                                     queue_max_sizes=[256] * queues, msix_vectors=queues + 1,
                                     config_size=60)
    info = parse_pci_info(t.pci_declaration())
    assert info.vectors == queues + 1 and info.queues == queues and info.intx_pin == 1


def test_virtio_blk_queue_option():
    assert virtio_blk_queues(("/x.img",), "-s") == 1
    assert virtio_blk_queues(("/x.img", "ro", "num_queues=4"), "-s") == 4
    for bad in ("num_queues=0", "num_queues=x", "num_queues=65", "num_queues=" + "9" * 5000):
        with pytest.raises(ConfigError):
            virtio_blk_queues(("/x.img", bad), "-s")


def test_virtio_blk_spec():
    m = Machine.__new__(Machine)  # no KVM needed for the mapping

    class Cfg:
        bus_mode = "fast"
    m.cfg = Cfg()
    spec = m._virtio_blk_spec(SlotConfig(2, 0, "virtio-blk", ("/d.img", "num_queues=3")))
    assert spec.kind == "virtio_blk" and spec.slot == 2 and spec.needs_memory
    assert spec.options["args"] == ["/d.img", "num_queues=3"] and spec.options["path"] == "/d.img"
    assert spec.options["intx_gsi"] == 18 and spec.allowed_gsis == frozenset({18})
    assert (spec.pci.vectors, spec.pci.queues, spec.pci.intx) == (4, 3, True)


def test_harvest_dirty_flips_syncs_and_clears():
    dirty_log = pytest.importorskip("devices.virtio.dirty_log")
    dev = ManagedDevice(DeviceSpec("d", "k", {}), 1.0, "off")
    dev.dirty_log = dirty_log.DirtyLog.create(64)
    device_side = dirty_log.DirtyLog.from_fd(dev.dirty_log.fd, owns_fd=False)
    ops = []

    def control(op, args=None, timeout=None):
        ops.append(op)
        device_side.mark(9 << 12, 1)  # a write racing the harvest lands in the new buffer
    dev.control = control
    device_side.mark(3 << 12, 2 << 12)
    assert list(dev.harvest_dirty()) == [3, 4]
    assert ops == ["dirty_sync"]
    assert list(dev.harvest_dirty()) == [9]
    device_side.close()
    dev.close_fds()
    assert dev.dirty_log is None


def test_harvest_dirty_failure_loses_nothing():
    dirty_log = pytest.importorskip("devices.virtio.dirty_log")
    dev = ManagedDevice(DeviceSpec("d", "k", {}), 1.0, "off")
    dev.dirty_log = dirty_log.DirtyLog.create(64)
    dev.dirty_log.mark(5 << 12, 1)

    def dead(op, args=None, timeout=None):
        raise OSError("gone")
    dev.control = dead
    with pytest.raises(OSError):
        dev.harvest_dirty()
    dev.control = lambda *a, **k: None
    got = set(dev.harvest_dirty()) | set(dev.harvest_dirty())
    assert 5 in got
    dev.close_fds()
