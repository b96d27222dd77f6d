"""devices.virtio_net: sans-I/O header validation, rx filter, control commands
(fuzzed: nothing but FrameError ever escapes), the switch core, state and options."""

import random
import struct

import pytest

from devices.virtio_net import frames as fr
from devices.virtio_net import state as st
from devices.virtio_net.model import NetOptions
from devices.virtio_net.switch import SwitchCore

MAC = bytes.fromhex("525400123456")


def _frame(dst=MAC, n=60):
    return dst + bytes.fromhex("525400000001") + b"\x08\x00" + bytes(n - 14)


def test_header_roundtrip_and_num_buffers():
    h = fr.NetHdr(1, fr.GSO_TCPV4, 54, 1448, 34, 16, 0)
    raw = h.pack()
    assert len(raw) == fr.HDR_SIZE == 12
    assert fr.parse_hdr(raw) == h
    assert fr.parse_hdr(fr.with_num_buffers(raw, 3)).num_buffers == 3
    with pytest.raises(fr.FrameError):
        fr.parse_hdr(raw[:11])


@pytest.mark.parametrize("hdr, n, kw, ok", [
    (fr.NetHdr(), 60, {}, True),
    (fr.NetHdr(), 10, {}, False),                                     # shorter than Ethernet
    (fr.NetHdr(flags=1, csum_start=34, csum_offset=6), 60, {}, False),  # CSUM not negotiated
    (fr.NetHdr(flags=1, csum_start=34, csum_offset=6), 60, {"csum": True}, True),
    (fr.NetHdr(flags=1, csum_start=34, csum_offset=60), 60, {"csum": True}, False),
    (fr.NetHdr(flags=1, csum_start=4, csum_offset=2), 60, {"csum": True}, False),
    (fr.NetHdr(flags=2), 60, {}, False),                              # DATA_VALID on tx
    (fr.NetHdr(flags=2), 60, {"data_valid_ok": True}, True),
    (fr.NetHdr(flags=0x40), 60, {"csum": True}, False),
    (fr.NetHdr(1, fr.GSO_TCPV4, 54, 1000, 34, 16), 3054, {"csum": True}, False),
    (fr.NetHdr(1, fr.GSO_TCPV4, 54, 1000, 34, 16), 3054, {"csum": True, "tso4": True}, True),
    (fr.NetHdr(1, fr.GSO_TCPV4, 54, 0, 34, 16), 3054, {"csum": True, "tso4": True}, False),
    (fr.NetHdr(0, fr.GSO_TCPV4, 54, 1000, 34, 16), 3054, {"csum": True, "tso4": True}, False),
    (fr.NetHdr(1, fr.GSO_TCPV4 | fr.GSO_ECN, 54, 1000, 34, 16), 3054,
     {"csum": True, "tso4": True}, False),
    (fr.NetHdr(1, fr.GSO_TCPV6, 74, 1000, 54, 16), 3074, {"csum": True, "tso4": True}, False),
    (fr.NetHdr(1, 7, 54, 1000, 34, 16), 3054, {"csum": True, "tso4": True, "tso6": True}, False),
    (fr.NetHdr(1, fr.GSO_TCPV4, 5000, 1000, 34, 16), 3054, {"csum": True, "tso4": True}, False),
    (fr.NetHdr(), 20000, {}, False),                                   # too big without GSO
])
def test_validate(hdr, n, kw, ok):
    kw = {"csum": False, "tso4": False, "tso6": False, **kw}
    if ok:
        fr.validate(hdr, n, **kw)
    else:
        with pytest.raises(fr.FrameError):
            fr.validate(hdr, n, **kw)


def test_validate_fuzz():
    rng = random.Random(5)
    for _ in range(20000):
        raw = rng.randbytes(12)
        n = rng.choice([0, 13, 14, 60, 1514, 9000, 65000, 70000, rng.randrange(0, 1 << 17)])
        try:
            fr.validate(fr.parse_hdr(raw), n, csum=rng.random() < .5, tso4=rng.random() < .5,
                        tso6=rng.random() < .5, ecn=rng.random() < .5,
                        data_valid_ok=rng.random() < .5)
        except fr.FrameError:
            pass


def test_feature_dependencies():
    assert fr.features_consistent(1 << fr.F_MAC) is None
    assert fr.features_consistent(1 << fr.F_GUEST_TSO4) is not None
    assert fr.features_consistent((1 << fr.F_GUEST_TSO4) | (1 << fr.F_GUEST_CSUM)) is None
    assert fr.features_consistent(1 << fr.F_CTRL_RX) is not None
    assert fr.features_consistent((1 << fr.F_HOST_ECN) | (1 << fr.F_HOST_TSO6)
                                  | (1 << fr.F_CSUM)) is None


def test_rx_filter():
    f = fr.RxFilter()
    assert f.accepts(_frame(bytes(6)), MAC)          # promiscuous at power-on
    f.promisc = False
    assert f.accepts(_frame(MAC), MAC)
    assert not f.accepts(_frame(bytes.fromhex("525400999999")), MAC)
    assert f.accepts(_frame(fr.BROADCAST), MAC)
    f.nobcast = True
    assert not f.accepts(_frame(fr.BROADCAST), MAC)
    mc = bytes.fromhex("01005e000001")
    assert not f.accepts(_frame(mc), MAC)
    f.multi = [mc]
    assert f.accepts(_frame(mc), MAC)
    f.nomulti = True
    assert not f.accepts(_frame(mc), MAC)
    assert fr.RxFilter.load(f.save()) == f


def test_ctrl_commands():
    feats = (1 << fr.F_CTRL_VQ) | (1 << fr.F_CTRL_RX) | (1 << fr.F_CTRL_MAC_ADDR)
    f = fr.RxFilter()
    assert fr.handle_ctrl(b"\x00\x00\x00", f, feats).ack == fr.OK and not f.promisc
    assert fr.handle_ctrl(b"\x00\x01\x01", f, feats).ack == fr.OK and f.allmulti
    assert fr.handle_ctrl(b"\x00\x09\x01", f, feats).ack == fr.ERR
    assert fr.handle_ctrl(b"\x00\x00", f, feats).ack == fr.ERR
    assert fr.handle_ctrl(b"\x00", f, feats).ack == fr.ERR
    r = fr.handle_ctrl(b"\x01\x01" + MAC, f, feats)
    assert r.ack == fr.OK and r.mac == MAC
    assert fr.handle_ctrl(b"\x01\x01" + b"\x01" + MAC[1:], f, feats).ack == fr.ERR
    tables = struct.pack("<I", 1) + MAC + struct.pack("<I", 2) + bytes.fromhex("01005e000001") * 2
    assert fr.handle_ctrl(b"\x01\x00" + tables, f, feats).ack == fr.OK
    assert f.uni == [MAC] and len(f.multi) == 2
    assert fr.handle_ctrl(b"\x01\x00" + struct.pack("<I", 1000), f, feats).ack == fr.ERR
    assert fr.handle_ctrl(b"\x00\x00\x01", f, 0).ack == fr.ERR        # CTRL_RX not negotiated
    assert fr.handle_ctrl(b"\x05\x00" + struct.pack("<Q", 2), f,
                          feats | 1 << fr.F_CTRL_GUEST_OFFLOADS, offloadable=2).offloads == 2
    rng = random.Random(7)
    for _ in range(20000):
        cmd = rng.randbytes(rng.randrange(0, 40))
        if rng.random() < .5 and len(cmd) >= 2:
            cmd = bytes([rng.randrange(6), rng.randrange(3)]) + cmd[2:]
        assert fr.handle_ctrl(cmd, fr.RxFilter(), feats | 4, offloadable=6).ack in (0, 1)


def test_parse_mac():
    assert fr.parse_mac("52:54:00:12:34:56") == MAC
    for bad in ("52:54:00:12:34", "zz:54:00:12:34:56", "01:00:5e:00:00:01", ""):
        with pytest.raises(ValueError):
            fr.parse_mac(bad)


def test_switch_core_learns_and_floods():
    sw = SwitchCore(port_timeout=10)
    a, b, c = b"\0a", b"\0b", b"\0c"
    for p in (a, b, c):
        assert sw.receive(p, b"", 0) == []
    ma, mb = bytes.fromhex("52540000000a"), bytes.fromhex("52540000000b")
    assert sorted(sw.receive(a, fr.BROADCAST + ma + b"\x88\xb5" + bytes(46), 1)) == [b, c]
    assert sorted(sw.receive(b, mb + ma, 1) or []) == []          # too short: dropped
    assert sw.receive(b, ma + mb + b"\x88\xb5" + bytes(46), 1) == [a]
    assert sw.receive(a, mb + ma + b"\x88\xb5" + bytes(46), 1) == [b]
    sw.expire(100)
    assert sw.ports == {} and sw.macs == {}
    rng = random.Random(3)
    for _ in range(5000):
        sw.receive(rng.choice([a, b, c, b""]), rng.randbytes(rng.randrange(0, 80)), 200)


def test_state_roundtrip_and_rejects():
    good = st.make_state("tap", MAC, True, fr.RxFilter(), 0, {"rx_packets": 3})
    chk = st.check_state(good)
    assert chk["mac"] == MAC and isinstance(chk["rx_filter"], fr.RxFilter)
    for bad in ({**good, "version": 9}, {**good, "mac": b"\x01" * 6}, {**good, "link_up": 1},
                {**good, "backend": "x"}, {**good, "extra": 1}, {**good, "counters": {"a": -1}},
                {**good, "rx_filter": {"promisc": True}}, "nope"):
        with pytest.raises(ValueError):
            st.check_state(bad)


def test_options():
    o = NetOptions({"args": ["tap=t0", "mac=52:54:00:00:00:01", "queue_size=512", "mrg_rxbuf=off",
                             "link=down"]})
    assert o.backend == "tap" and o.queue_size == 512 and not o.mrg_rxbuf and not o.link_up
    for bad in (["queue_size=100"], ["bogus"], ["mac=01:00:00:00:00:00"]):
        with pytest.raises(ValueError):
            NetOptions({"args": bad})


def test_rx_filter_refuses_frames_shorter_than_a_mac_address():
    """Found by tests/fuzz/fuzz_net.py: accepts() raised IndexError on a frame of < 6 bytes."""
    for promisc in (True, False):
        rx = fr.RxFilter(promisc=promisc)
        for frame in (b"", b"\xff", b"\x01\x02\x03\x04\x05"):
            assert rx.accepts(frame, MAC) is False
