"""devices.virtio.pci_transport: config space, BARs, capabilities, common config, ISR."""

import struct

import pytest

from devices.virtio import features as vf
from devices.virtio import pci_transport as pt
from devices.virtio.pci_transport import VirtioPciTransport

V1 = 1 << vf.F_VERSION_1
DEV_FEATURES = (1 << 1) | (1 << 6) | (1 << 40 >> 1)   # some device bits, one above 32


class Hooks:
    def __init__(self):
        self.calls = []
        self.accept = True
        self.config = bytearray(range(24))

    def transport_reset(self):
        self.calls.append("reset")

    def transport_features_ok(self, features):
        self.calls.append(("features_ok", features))
        return self.accept

    def transport_driver_ok(self):
        self.calls.append("driver_ok")

    def transport_queue_enabled(self, q):
        self.calls.append(("queue_enabled", q))

    def transport_notify(self, q):
        self.calls.append(("notify", q))

    def transport_config_read(self, off, size):
        return int.from_bytes(self.config[off:off + size], "little")

    def transport_config_write(self, off, size, value):
        self.calls.append(("config_write", off, size, value))

    def transport_isr_cleared(self):
        self.calls.append("isr_cleared")

    def transport_changed(self):
        self.calls.append("changed")


def make(**kw):
    h = Hooks()
    args = dict(virtio_id=vf.VIRTIO_ID_BLOCK, device_features=DEV_FEATURES,
                queue_max_sizes=[256, 128], msix_vectors=3, config_size=24)
    args.update(kw)
    return VirtioPciTransport(h, **args), h


def common_read(t, off, size):
    return t.bar_read(0, pt.COMMON_OFFSET + off, size)


def common_write(t, off, size, value):
    t.bar_write(0, pt.COMMON_OFFSET + off, size, value)


def test_header_identity():
    t, _ = make()
    assert t.cfg_read(0x00, 2) == 0x1AF4
    assert t.cfg_read(0x02, 2) == 0x1042
    assert t.cfg_read(0x08, 1) == 1                        # revision 1 (non-transitional)
    assert t.cfg_read(0x09, 4) >> 8 == 0x0180              # class 01 (storage), subclass 80
    assert t.cfg_read(0x0B, 1) == 0x01 and t.cfg_read(0x0A, 1) == 0x80
    assert t.cfg_read(0x0E, 1) == 0                        # header type 0
    assert t.cfg_read(0x2C, 2) == 0x1AF4 and t.cfg_read(0x2E, 2) >= 0x40
    assert t.cfg_read(0x3D, 1) == 1                        # INTA
    assert t.cfg_read(0x06, 2) & 0x10                      # capability list
    assert make(virtio_id=vf.VIRTIO_ID_NET)[0].cfg_read(0x08, 4) >> 8 == 0x020000
    assert make(virtio_id=77)[0].cfg_read(0x08, 4) >> 8 == vf.PCI_CLASS_OTHER
    # read-only registers stay put
    t.cfg_write(0x00, 4, 0)
    t.cfg_write(0x08, 4, 0)
    assert t.cfg_read(0x00, 4) == 0x10421AF4 and t.cfg_read(0x08, 1) == 1
    # bad accesses
    assert t.cfg_read(0xFE, 4) == 0xFFFFFFFF
    assert t.cfg_read(0x00, 3) == 0xFFFFFF
    t.cfg_write(0xFF, 2, 0)


def test_command_register_mask():
    t, h = make()
    t.cfg_write(0x04, 2, 0xFFFF)
    assert t.cfg_read(0x04, 2) == pt.CMD_MEMORY | pt.CMD_MASTER | pt.CMD_INTX_DISABLE
    assert "changed" in h.calls
    t.cfg_write(0x3C, 1, 11)
    assert t.cfg_read(0x3C, 1) == 11


def walk_caps(t):
    caps = []
    ptr = t.cfg_read(0x34, 1)
    seen = set()
    while ptr:
        assert ptr not in seen and 0x40 <= ptr <= 0xFC and ptr % 4 == 0
        seen.add(ptr)
        caps.append((ptr, t.cfg_read(ptr, 1)))
        ptr = t.cfg_read(ptr + 1, 1)
    return caps


def virtio_caps(t):
    out = {}
    for ptr, cap_id in walk_caps(t):
        if cap_id != pt.CAP_ID_VNDR:
            continue
        cap_len, cfg_type, bar = t.cfg_read(ptr + 2, 1), t.cfg_read(ptr + 3, 1), t.cfg_read(ptr + 4, 1)
        offset, length = t.cfg_read(ptr + 8, 4), t.cfg_read(ptr + 12, 4)
        extra = t.cfg_read(ptr + 16, 4) if cap_len >= 20 else None
        out[cfg_type] = dict(ptr=ptr, len=cap_len, bar=bar, offset=offset, length=length, extra=extra)
    return out


def test_capability_chain():
    t, _ = make()
    ids = [cid for _, cid in walk_caps(t)]
    assert ids.count(pt.CAP_ID_MSIX) == 1 and ids.count(pt.CAP_ID_VNDR) == 5
    caps = virtio_caps(t)
    assert caps[pt.VIRTIO_PCI_CAP_COMMON_CFG]["offset"] == pt.COMMON_OFFSET
    assert caps[pt.VIRTIO_PCI_CAP_COMMON_CFG]["length"] >= pt.COMMON_SIZE
    n = caps[pt.VIRTIO_PCI_CAP_NOTIFY_CFG]
    assert n["len"] == 20 and n["extra"] == pt.NOTIFY_MULTIPLIER and n["offset"] == pt.NOTIFY_OFFSET
    assert caps[pt.VIRTIO_PCI_CAP_ISR_CFG]["offset"] == pt.ISR_OFFSET
    assert caps[pt.VIRTIO_PCI_CAP_DEVICE_CFG]["length"] == 24
    assert pt.VIRTIO_PCI_CAP_PCI_CFG in caps
    for c in caps.values():
        if c["length"]:
            assert c["bar"] == 0 and c["offset"] + c["length"] <= pt.VIRTIO_BAR_SIZE
    # MSI-X cap: table size n-1, table and PBA in BAR2
    msix = t.cap_offsets["msix"]
    assert t.cfg_read(msix + 2, 2) & 0x7FF == 2
    assert t.cfg_read(msix + 4, 4) == t.msix_table_offset | 2
    assert t.cfg_read(msix + 8, 4) == t.msix_pba_offset | 2
    # a device with no config and no MSI-X
    t2, _ = make(msix_vectors=0, config_size=0)
    assert pt.CAP_ID_MSIX not in [cid for _, cid in walk_caps(t2)]
    assert pt.VIRTIO_PCI_CAP_DEVICE_CFG not in virtio_caps(t2)
    assert t2.pci_declaration()["msix"] is None


def test_bar_sizing_mem64_and_mem32():
    t, _ = make()
    t.cfg_write(0x10, 4, 0xFFFFFFFF)
    t.cfg_write(0x14, 4, 0xFFFFFFFF)
    lo, hi = t.cfg_read(0x10, 4), t.cfg_read(0x14, 4)
    assert lo & 0xF == 0x4                                   # memory, 64-bit, not prefetchable
    size = ((~((hi << 32) | (lo & ~0xF))) & ((1 << 64) - 1)) + 1
    assert size == pt.VIRTIO_BAR_SIZE
    t.cfg_write(0x18, 4, 0xFFFFFFFF)
    b2 = t.cfg_read(0x18, 4)
    assert b2 & 0xF == 0 and ((~(b2 & ~0xF)) & 0xFFFFFFFF) + 1 == t.msix_bar_size
    for off in (0x1C, 0x20, 0x24, 0x30):                     # unimplemented BARs, ROM
        t.cfg_write(off, 4, 0xFFFFFFFF)
        assert t.cfg_read(off, 4) == 0
    # program addresses
    t.cfg_write(0x10, 4, 0xE0004000 | 0xF)                  # low type bits are read-only
    t.cfg_write(0x14, 4, 0x1)
    t.cfg_write(0x18, 4, 0xFEB00000)
    assert t.bar_address(0) == 0x1_E0004000 and t.bar_address(2) == 0xFEB00000
    assert t.cfg_read(0x10, 4) == 0xE0004004
    # the size bits below the BAR size cannot be set
    t.cfg_write(0x10, 4, 0xE0001000)
    assert t.bar_address(0) == 0x1_E0000000


def test_decode_follows_bars_and_memory_enable():
    t, _ = make()
    t.cfg_write(0x10, 4, 0xE0000000)
    t.cfg_write(0x18, 4, 0xE0100000)
    assert t.decode(0xE0000000, 4) is None                   # decoding off
    t.cfg_write(0x04, 2, pt.CMD_MEMORY)
    assert t.decode(0xE0000000 + 0x3004, 2) == (0, 0x3004)
    assert t.decode(0xE0100010, 4) == (2, 0x10)
    assert t.decode(0xE0003FFE, 4) is None                   # straddles the end
    t.cfg_write(0x10, 4, 0xD0000000)                          # BAR moved
    assert t.decode(0xE0000000, 4) is None and t.decode(0xD0000010, 4) == (0, 0x10)
    assert t.notify_address(1) == 0xD0000000 + pt.NOTIFY_OFFSET + 4


def test_msix_control_bits():
    t, h = make()
    msix = t.cap_offsets["msix"]
    t.cfg_write(msix + 2, 2, 0xFFFF)
    assert t.cfg_read(msix + 2, 2) == 0xC002
    assert t.msix_enabled and t.msix_function_masked
    t.cfg_write(msix + 3, 1, 0x80)                            # byte write: enable, unmask
    assert t.msix_enabled and not t.msix_function_masked
    t.cfg_write(msix + 4, 4, 0)                               # table offset read-only
    assert t.cfg_read(msix + 4, 4) == t.msix_table_offset | 2


def negotiate(t, features):
    common_write(t, pt.COMMON_STATUS, 1, vf.STATUS_ACKNOWLEDGE | vf.STATUS_DRIVER)
    for sel in (0, 1):
        common_write(t, pt.COMMON_GFSELECT, 4, sel)
        common_write(t, pt.COMMON_GF, 4, (features >> (32 * sel)) & 0xFFFFFFFF)
    common_write(t, pt.COMMON_STATUS, 1, vf.STATUS_ACKNOWLEDGE | vf.STATUS_DRIVER | vf.STATUS_FEATURES_OK)
    return common_read(t, pt.COMMON_STATUS, 1)


def test_device_features_by_select():
    t, _ = make()
    got = 0
    for sel in (0, 1):
        common_write(t, pt.COMMON_DFSELECT, 4, sel)
        got |= common_read(t, pt.COMMON_DF, 4) << (32 * sel)
    assert got == DEV_FEATURES | vf.TRANSPORT_FEATURES
    common_write(t, pt.COMMON_DFSELECT, 4, 2)
    assert common_read(t, pt.COMMON_DF, 4) == 0


def test_features_ok_accepted():
    t, h = make()
    want = V1 | (1 << vf.F_RING_EVENT_IDX) | (1 << 6)
    assert negotiate(t, want) & vf.STATUS_FEATURES_OK
    assert t.negotiated == want
    assert ("features_ok", want) in h.calls
    # driver features are frozen after FEATURES_OK
    common_write(t, pt.COMMON_GFSELECT, 4, 0)
    common_write(t, pt.COMMON_GF, 4, 0)
    assert t.negotiated == want
    common_write(t, pt.COMMON_GFSELECT, 4, 1)
    assert common_read(t, pt.COMMON_GF, 4) == 1


@pytest.mark.parametrize("features", [
    V1 | (1 << 3),            # not offered
    V1 | (1 << 63),           # not offered, high
    (1 << vf.F_RING_EVENT_IDX),  # no VERSION_1
])
def test_features_ok_rejected(features):
    t, _ = make()
    status = negotiate(t, features)
    assert not status & vf.STATUS_FEATURES_OK
    assert status & vf.STATUS_DRIVER
    assert t.negotiated == 0
    # DRIVER_OK without FEATURES_OK does not start the device
    common_write(t, pt.COMMON_STATUS, 1, status | vf.STATUS_DRIVER_OK)
    assert not t.driver_ok and "driver_ok" not in t.hooks.calls


def test_features_ok_vetoed_by_the_device():
    t, h = make()
    h.accept = False
    assert not negotiate(t, V1) & vf.STATUS_FEATURES_OK


def test_status_machine_and_reset():
    t, h = make()
    negotiate(t, V1)
    common_write(t, pt.COMMON_Q_SELECT, 2, 1)
    common_write(t, pt.COMMON_Q_SIZE, 2, 64)
    common_write(t, pt.COMMON_MSIX, 2, 2)
    ok = vf.STATUS_ACKNOWLEDGE | vf.STATUS_DRIVER | vf.STATUS_FEATURES_OK | vf.STATUS_DRIVER_OK
    common_write(t, pt.COMMON_STATUS, 1, ok)
    assert h.calls.count("driver_ok") == 1 and t.driver_ok
    assert common_read(t, pt.COMMON_STATUS, 1) == ok
    # NEEDS_RESET: set by the device, not clearable by the driver
    assert t.set_needs_reset() and not t.set_needs_reset()
    assert t.isr & vf.ISR_CONFIG and not t.driver_ok
    common_write(t, pt.COMMON_STATUS, 1, ok)
    assert common_read(t, pt.COMMON_STATUS, 1) == ok | vf.STATUS_NEEDS_RESET
    # reset
    h.calls.clear()
    common_write(t, pt.COMMON_STATUS, 1, 0)
    assert "reset" in h.calls
    assert common_read(t, pt.COMMON_STATUS, 1) == 0 and t.negotiated == 0 and t.isr == 0
    assert common_read(t, pt.COMMON_MSIX, 2) == vf.NO_VECTOR
    common_write(t, pt.COMMON_Q_SELECT, 2, 1)
    assert common_read(t, pt.COMMON_Q_SELECT, 2) == 1
    assert common_read(t, pt.COMMON_Q_SIZE, 2) == 128     # back to the maximum
    assert common_read(t, pt.COMMON_Q_ENABLE, 2) == 0
    # a device that was never started does not signal NEEDS_RESET
    assert not t.set_needs_reset()


def test_queue_configuration():
    t, h = make()
    assert common_read(t, pt.COMMON_NUMQ, 2) == 2
    common_write(t, pt.COMMON_Q_SELECT, 2, 0)
    assert common_read(t, pt.COMMON_Q_SIZE, 2) == 256
    assert common_read(t, pt.COMMON_Q_NOFF, 2) == 0
    assert common_read(t, pt.COMMON_Q_MSIX, 2) == vf.NO_VECTOR
    common_write(t, pt.COMMON_Q_SIZE, 2, 32)
    common_write(t, pt.COMMON_Q_MSIX, 2, 1)
    common_write(t, pt.COMMON_Q_DESCLO, 4, 0x12345000)
    common_write(t, pt.COMMON_Q_DESCHI, 4, 0x1)
    common_write(t, pt.COMMON_Q_AVAILLO, 8, 0x2_00006000)   # one 64-bit write
    common_write(t, pt.COMMON_Q_USEDLO, 4, 0x7000)
    assert common_read(t, pt.COMMON_Q_DESCLO, 4) == 0x12345000
    assert common_read(t, pt.COMMON_Q_DESCHI, 4) == 1
    assert common_read(t, pt.COMMON_Q_DESCLO, 8) == 0x1_12345000
    assert common_read(t, pt.COMMON_Q_AVAILHI, 4) == 2
    qc = t.queues[0]
    assert (qc.size, qc.msix_vector, qc.desc, qc.driver, qc.device) == (32, 1, 0x1_12345000,
                                                                        0x2_00006000, 0x7000)
    common_write(t, pt.COMMON_Q_MSIX, 2, 3)                  # only 3 vectors: 0..2
    assert common_read(t, pt.COMMON_Q_MSIX, 2) == vf.NO_VECTOR
    common_write(t, pt.COMMON_Q_MSIX, 2, 1)
    common_write(t, pt.COMMON_Q_ENABLE, 2, 1)
    assert common_read(t, pt.COMMON_Q_ENABLE, 2) == 1
    assert not any(c == ("queue_enabled", 0) for c in h.calls)   # not before DRIVER_OK
    # frozen once enabled (except the vector)
    common_write(t, pt.COMMON_Q_SIZE, 2, 16)
    common_write(t, pt.COMMON_Q_DESCLO, 4, 0)
    assert (qc.size, qc.desc) == (32, 0x1_12345000)
    # queue 1: notify off, and a late enable after DRIVER_OK reaches the hooks
    common_write(t, pt.COMMON_Q_SELECT, 2, 1)
    assert common_read(t, pt.COMMON_Q_NOFF, 2) == 1
    negotiate(t, V1)
    common_write(t, pt.COMMON_STATUS, 1, 0xF)
    common_write(t, pt.COMMON_Q_ENABLE, 2, 1)
    assert ("queue_enabled", 1) in h.calls
    # a queue that does not exist
    common_write(t, pt.COMMON_Q_SELECT, 2, 7)
    assert common_read(t, pt.COMMON_Q_SIZE, 2) == 0
    common_write(t, pt.COMMON_Q_SIZE, 2, 8)
    common_write(t, pt.COMMON_Q_ENABLE, 2, 1)
    assert common_read(t, pt.COMMON_Q_ENABLE, 2) == 0


def test_queue_size_validity():
    t, _ = make()
    qc = t.queues[0]
    for bad in (0, 3, 512, 0xFFFF):
        qc.size = bad
        assert not qc.valid_size()
    for good in (1, 2, 128, 256):
        qc.size = good
        assert qc.valid_size()


def test_isr_read_to_clear_and_config_generation():
    t, h = make()
    assert t.bar_read(0, pt.ISR_OFFSET, 1) == 0 and "isr_cleared" not in h.calls
    t.isr = vf.ISR_QUEUE
    gen = common_read(t, pt.COMMON_CFGGENERATION, 1)
    t.config_changed()
    assert common_read(t, pt.COMMON_CFGGENERATION, 1) == (gen + 1) & 0xFF
    assert t.bar_read(0, pt.ISR_OFFSET, 1) == vf.ISR_QUEUE | vf.ISR_CONFIG
    assert "isr_cleared" in h.calls
    assert t.bar_read(0, pt.ISR_OFFSET, 1) == 0


def test_device_config_and_notify_dispatch():
    t, h = make()
    assert t.bar_read(0, pt.DEVICE_OFFSET + 4, 4) == 0x07060504
    assert t.bar_read(0, pt.DEVICE_OFFSET + 22, 4) == 0             # past the config
    t.bar_write(0, pt.DEVICE_OFFSET + 8, 2, 0xBEEF)
    t.bar_write(0, pt.DEVICE_OFFSET + 30, 2, 1)                      # past: ignored
    assert ("config_write", 8, 2, 0xBEEF) in h.calls
    assert not any(c[0] == "config_write" and c[1] == 30 for c in h.calls if isinstance(c, tuple))
    t.bar_write(0, pt.NOTIFY_OFFSET + 4, 2, 1)
    t.bar_write(0, pt.NOTIFY_OFFSET + 8, 2, 2)                       # queue 2 does not exist
    assert [c for c in h.calls if isinstance(c, tuple) and c[0] == "notify"] == [("notify", 1)]
    assert t.bar_read(2, 0, 4) == 0xFFFFFFFF                         # the MSI-X BAR is vmmd's
    t.bar_write(2, 0, 4, 0)


def test_pci_cfg_access_capability():
    t, _ = make()
    c = virtio_caps(t)[pt.VIRTIO_PCI_CAP_PCI_CFG]
    ptr = c["ptr"]
    t.cfg_write(ptr + 4, 1, 0)                        # bar 0
    t.cfg_write(ptr + 8, 4, pt.COMMON_OFFSET + pt.COMMON_NUMQ)
    t.cfg_write(ptr + 12, 4, 2)
    assert t.cfg_read(ptr + 16, 4) == 2               # num_queues through the window
    t.cfg_write(ptr + 8, 4, pt.COMMON_OFFSET + pt.COMMON_Q_SELECT)
    t.cfg_write(ptr + 16, 4, 1)
    assert t.queue_select == 1
    t.cfg_write(ptr + 12, 4, 3)                       # bad length: no access
    assert t.cfg_read(ptr + 16, 4) == 0


def test_pci_declaration_is_valid():
    t, _ = make()
    decl = t.pci_declaration()
    assert decl["bars"] == [[0, pt.VIRTIO_BAR_SIZE, "mem64"], [2, t.msix_bar_size, "mem32"]]
    assert decl["notify"] == {"bar": 0, "offset": pt.NOTIFY_OFFSET, "multiplier": 4, "queues": 2}
    assert decl["msix"]["vectors"] == 3 and decl["msix"]["cap"] == t.cap_offsets["msix"]
    assert decl["intx_pin"] == 1
    try:
        from bus.pci_info import parse_pci_info
    except ImportError:
        pytest.skip("bus.pci_info not available")
    info = parse_pci_info(decl)
    assert info.msix.vectors == 3 and info.notify.queues == 2
    big = make(msix_vectors=65, queue_max_sizes=[64] * 64)[0].pci_declaration()
    parse_pci_info(big)


def test_save_restore_round_trip():
    t, _ = make()
    t.cfg_write(0x10, 4, 0xE0000000)
    t.cfg_write(0x04, 2, pt.CMD_MEMORY | pt.CMD_MASTER)
    t.cfg_write(t.cap_offsets["msix"] + 3, 1, 0x80)
    negotiate(t, V1 | (1 << vf.F_RING_INDIRECT_DESC))
    common_write(t, pt.COMMON_Q_DESCLO, 4, 0x1000)
    common_write(t, pt.COMMON_Q_ENABLE, 2, 1)
    common_write(t, pt.COMMON_STATUS, 1, 0xF)
    t.config_changed()
    state = t.save()
    t2, _ = make()
    t2.restore(state)
    assert t2.save() == state
    assert t2.bar_address(0) == 0xE0000000 and t2.msix_enabled and t2.driver_ok
    assert t2.queues[0].enabled and t2.queues[0].desc == 0x1000
    import msgpack
    assert msgpack.unpackb(msgpack.packb(state)) == state


@pytest.mark.parametrize("mutate", [
    lambda s: s.update(version=2),
    lambda s: s.update(cfg=b"\0" * 256),                  # another device's identity
    lambda s: s.update(cfg=b"short"),
    lambda s: s.update(status=256),
    lambda s: s.update(driver_features=1 << 3),            # not offered
    lambda s: s.update(queues=[]),
    lambda s: s["queues"].__setitem__(0, [1, 2, "x", 0, 0, 0]),
    lambda s: s.update(intx_asserted=None),
])
def test_restore_rejects_bad_state(mutate):
    t, _ = make()
    state = t.save()
    mutate(state)
    t2, _ = make()
    before = t2.save()
    with pytest.raises(ValueError):
        t2.restore(state)
    assert t2.save() == before


def test_constructor_limits():
    with pytest.raises(ValueError):
        make(queue_max_sizes=[])
    with pytest.raises(ValueError):
        make(queue_max_sizes=[100])
    with pytest.raises(ValueError):
        make(msix_vectors=5000)
    with pytest.raises(ValueError):
        make(config_size=0x2000)
