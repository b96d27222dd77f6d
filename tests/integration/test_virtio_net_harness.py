"""virtio-net through the driver harness: a Python guest driving sandboxed
virtio_net device processes through vmmd's real PCI bus and supervisor.

Network traffic only ever goes to a network namespace each test creates
(ip netns add ... deleted at the end): the tap is created inside it, the
namespace's kernel is the peer (10.200.0.1/24), and the socket-backend
tests use a switch on a Unix datagram socket in a temporary directory.
"""

from __future__ import annotations

import os
import struct
import tempfile
import time

import pytest

from tests.conftest import requires_root
from tests.harness.driver import Harness
from tests.harness.net import (
    BASIC_FEATURES, BROADCAST, CTRLQ, F_CTRL_RX, F_MRG_RXBUF, GSO_TCPV4, NEEDS_CSUM,
    OFFLOAD_FEATURES, RXQ, TXQ, NetNs, VirtioNet, add_net_device, arp_request, eth, icmp_echo,
    ipv4, net_hdr, net_spec, parse_arp, parse_ipv4, tcp_segment, udp)

pytestmark = requires_root

HOST_IP, GUEST_IP = "10.200.0.1", "10.200.0.2"
TAP = "vmmdtap0"


def _stats(dev) -> dict:
    return dev.control("stats")["net"]


@pytest.fixture
def netns():
    ns = NetNs()
    try:
        yield ns
    finally:
        ns.close()


@pytest.fixture
def tap_nic(netns, request):
    """(harness, device, driver, netns): a tap in the namespace, host side 10.200.0.1."""
    params = getattr(request, "param", {})
    fd = netns.open_tap(TAP)
    netns.ip("addr", "add", f"{HOST_IP}/24", "dev", TAP)
    netns.ip("link", "set", TAP, "up")
    h = Harness(sandbox="on")
    try:
        dev = add_net_device(h, net_spec([f"tap={TAP}", *params.get("args", [])], slot=3),
                             {"tap": fd})
        nic = VirtioNet(h, slot=3, features=params.get("features", BASIC_FEATURES))
        yield h, dev, nic, netns
    finally:
        h.close()   # the device and vmmd's fd go: the tap disappears with them


def _arp_resolve(nic) -> bytes:
    nic.send(arp_request(nic.mac, GUEST_IP, HOST_IP))
    got = nic.recv_match(lambda f: (a := parse_arp(f)) is not None and a[0] == 2 and a[2] == HOST_IP)
    assert got is not None, "no ARP reply from the namespace's kernel"
    op, sha, spa, tha, tpa = parse_arp(got[1])
    assert (tha, tpa) == (nic.mac, GUEST_IP)
    return sha


def _ping(nic, host_mac: bytes, seq: int, data: bytes = b"vmmd-ping") -> bytes:
    pkt = ipv4(GUEST_IP, HOST_IP, 1, icmp_echo(0x4242, seq, data))
    nic.send(eth(host_mac, nic.mac, 0x0800, pkt))

    def is_reply(f):
        p = parse_ipv4(f)
        return (p is not None and p[2] == 1 and p[1] == GUEST_IP and p[3][0] == 0
                and struct.unpack_from("!HH", p[3], 4) == (0x4242, seq))
    got = nic.recv_match(is_reply)
    assert got is not None, f"no echo reply for seq {seq}"
    return got[1]


def test_tap_arp_and_icmp_echo(tap_nic):
    h, dev, nic, ns = tap_nic
    assert nic.drv.device_id == 0x1041
    assert nic.mac == bytes.fromhex("525400123456") or len(nic.mac) == 6
    assert nic.link_up
    host_mac = _arp_resolve(nic)
    assert host_mac == ns.mac_of(TAP)
    for seq in range(1, 4):
        reply = _ping(nic, host_mac, seq, b"x" * (100 * seq))
        assert parse_ipv4(reply)[3][8:] == b"x" * (100 * seq)
    st = _stats(dev)
    assert st["tx_packets"] >= 4 and st["rx_packets"] >= 4
    assert st["tx_bytes"] > 0 and st["rx_bytes"] > 0
    assert st["tx_malformed"] == 0 and st["backend"]["kind"] == "tap"
    assert "MRG_RXBUF" in st["features"]


@pytest.mark.parametrize("tap_nic", [{"features": BASIC_FEATURES & ~(1 << F_MRG_RXBUF)}],
                         indirect=True)
def test_tap_without_mergeable_buffers(tap_nic):
    h, dev, nic, ns = tap_nic
    assert not nic.mrg
    host_mac = _arp_resolve(nic)
    _ping(nic, host_mac, 7, b"y" * 1400)


def test_mergeable_frame_spans_buffers(tap_nic):
    """A 9000-byte ICMP reply arrives in three 4 KiB buffers with num_buffers = 3."""
    h, dev, nic, ns = tap_nic
    ns.ip("link", "set", TAP, "mtu", "9000")
    host_mac = _arp_resolve(nic)
    data = bytes(range(256)) * 34   # 8704 bytes
    pkt = ipv4(GUEST_IP, HOST_IP, 1, icmp_echo(0x4242, 99, data))
    nic.send(eth(host_mac, nic.mac, 0x0800, pkt))
    got = nic.recv_match(lambda f: (p := parse_ipv4(f)) is not None and p[2] == 1 and p[3][0] == 0)
    assert got is not None
    hdr, frame = got
    assert struct.unpack_from("<H", hdr, 10)[0] == 3
    assert parse_ipv4(frame)[3][8:] == data


def test_rx_backpressure_and_resume(tap_nic):
    """No rx buffers: the device stops reading; buffers + a kick resume it, nothing lost
    beyond what the tap queue holds."""
    h, dev, nic, ns = tap_nic
    host_mac = _arp_resolve(nic)
    # use up the posted buffers by receiving without refilling
    dq = nic.drv.queues[RXQ]
    posted = len(nic._rx)
    sock = ns.socket(2, 2)  # AF_INET, SOCK_DGRAM in the namespace
    try:
        sock.bind((HOST_IP, 0))
        for i in range(posted + 20):
            sock.sendto(b"p%d" % i, (GUEST_IP, 9999))
    finally:
        sock.close()
    # ARP for the guest from the kernel comes first: answer nothing; count frames instead
    seen = 0
    deadline = time.monotonic() + 10
    while seen < posted and time.monotonic() < deadline:
        if nic.recv(1.0, refill=False) is not None:
            seen += 1
    assert seen == posted
    deadline = time.monotonic() + 5
    while not _stats(dev)["rx_stalled"] and time.monotonic() < deadline:
        time.sleep(0.02)
    st = _stats(dev)
    assert st["rx_stalled"] and not st["rx_reading"] and st["rx_stalls"] >= 1
    nic.fill_rx(len(nic._free_rx))
    assert nic.recv(5.0) is not None
    assert not _stats(dev)["rx_stalled"]


@pytest.mark.skipif("device" not in __import__("bus.types").types.CONTROL_OPS,
                    reason="needs the CONTROL 'device' op (device-specific operations)")
def test_link_down_drops_tx_and_stops_rx(tap_nic):
    h, dev, nic, ns = tap_nic
    host_mac = _arp_resolve(nic)
    cfg_irqs = nic.drv.config_interrupts()
    res = dev.control("device", {"op": "set_link", "args": {"up": False}})
    assert res == {"was_up": True, "up": False}
    assert not nic.link_up
    deadline = time.monotonic() + 5
    while nic.drv.config_interrupts() == cfg_irqs and time.monotonic() < deadline:
        h.vm.poll(0.05)
    assert nic.drv.config_interrupts() > cfg_irqs
    before = _stats(dev)
    nic.send(arp_request(nic.mac, GUEST_IP, HOST_IP))
    after = _stats(dev)
    assert after["tx_dropped"] == before["tx_dropped"] + 1
    assert after["tx_packets"] == before["tx_packets"]
    assert nic.recv(0.5) is None
    assert not after["rx_reading"]
    dev.control("device", {"op": "set_link", "args": {"up": True}})
    assert nic.link_up
    _ping(nic, host_mac, 11)


def test_malformed_tx_dropped_and_counted(tap_nic):
    h, dev, nic, ns = tap_nic
    host_mac = _arp_resolve(nic)
    frame = eth(host_mac, nic.mac, 0x0800, ipv4(GUEST_IP, HOST_IP, 1, icmp_echo(1, 1, b"z")))
    bad = [
        (frame, net_hdr(flags=NEEDS_CSUM, csum_start=34, csum_offset=2)),  # CSUM not negotiated
        (frame, net_hdr(gso_type=GSO_TCPV4, gso_size=1000)),                 # TSO not negotiated
        (frame, net_hdr(flags=0x80)),                                         # unknown flag
        (b"\x01\x02", None),                                                  # shorter than Ethernet
        (b"", None),                                                          # header only
    ]
    before = _stats(dev)
    for f, hdr in bad:
        assert nic.send(f, hdr) == 0
    # a chain with device-writable buffers on tx, a header cut short
    gpa = h.allocator.alloc(64)
    t = nic.drv.submit(TXQ, [(gpa, 6)], [])
    nic.drv.wait(TXQ, [t])
    t = nic.drv.submit(TXQ, [(gpa, 12 + 14)], [(gpa + 32, 8)])
    nic.drv.wait(TXQ, [t])
    # descriptor loops and out-of-RAM buffers: completed, counted, device alive
    dq = nic.drv.queues[TXQ]
    a, b = dq.take_descriptors(2)
    dq.write_desc(a, gpa, 16, 1, b)
    dq.write_desc(b, gpa, 16, 1, a)
    t = nic.drv.submit_raw(TXQ, a)
    nic.drv.wait(TXQ, [t])
    (c,) = dq.take_descriptors(1)
    dq.write_desc(c, 1 << 40, 64, 0, 0)
    t = nic.drv.submit_raw(TXQ, c)
    nic.drv.wait(TXQ, [t])
    after = _stats(dev)
    assert after["tx_malformed"] - before["tx_malformed"] == 7
    assert after["bad_chains"] - before["bad_chains"] == 2
    assert after["tx_packets"] == before["tx_packets"]
    assert dev.state == "running" and dev.restarts == 0
    assert not nic.drv.status & 0x40   # no NEEDS_RESET
    _ping(nic, host_mac, 21)


def test_malformed_rx_buffers(tap_nic):
    """A device-readable rx buffer and one too small for the header are completed
    empty and counted; the frame goes to the next good buffer."""
    h, dev, nic, ns = tap_nic
    host_mac = _arp_resolve(nic)
    # take back every posted buffer: reset and re-init with no rx buffers
    nic.rx_buffers = 0
    nic.init()
    gpa = h.allocator.alloc(4096, 4096)
    t_bad1 = nic.drv.submit(RXQ, [(gpa, 64)], [(gpa + 64, 2048)])
    t_bad2 = nic.drv.submit(RXQ, [], [(gpa + 2048, 8)])
    nic.fill_rx(4)
    before = _stats(dev)
    _ping(nic, host_mac, 31)
    after = _stats(dev)
    assert after["bad_chains"] - before["bad_chains"] == 2
    assert nic.drv.done[RXQ].get(t_bad1) == 0 and nic.drv.done[RXQ].get(t_bad2) == 0
    assert after["rx_packets"] > before["rx_packets"]


@pytest.mark.parametrize("tap_nic", [{"features": BASIC_FEATURES | OFFLOAD_FEATURES}],
                         indirect=True)
def test_offload_headers(tap_nic):
    """With CSUM/HOST_TSO4 a partial-checksum frame and a TSO super-frame are
    accepted and reach the kernel (which completes the checksum and segments);
    with GUEST_CSUM the tap delivers headers the guest may see."""
    h, dev, nic, ns = tap_nic
    st = _stats(dev)
    assert {"CSUM", "GUEST_CSUM", "HOST_TSO4", "GUEST_TSO4"} <= set(st["features"])
    assert st["backend"]["tun_offload"] & 0x3 == 0x3
    host_mac = _arp_resolve(nic)
    sock = ns.socket(2, 2)
    try:
        sock.bind((HOST_IP, 7777))
        sock.settimeout(5)
        # UDP with a partial checksum: the kernel must see a valid datagram
        data = b"offloaded checksum"
        u = udp(GUEST_IP, HOST_IP, 5555, 7777, data, csum=False)
        # checksum field = the pseudo-header sum (not complemented), as Linux leaves it
        from tests.harness.net import checksum, ip4
        pseudo = ip4(GUEST_IP) + ip4(HOST_IP) + struct.pack("!BBH", 0, 17, len(u))
        partial = (~checksum(pseudo)) & 0xFFFF
        u = u[:6] + struct.pack("!H", partial) + u[8:]
        frame = eth(host_mac, nic.mac, 0x0800, ipv4(GUEST_IP, HOST_IP, 17, u))
        nic.send(frame, net_hdr(flags=NEEDS_CSUM, csum_start=34, csum_offset=6))
        got, addr = sock.recvfrom(2048)
        assert got == data and addr == (GUEST_IP, 5555)
    finally:
        sock.close()
    # a TSO frame: 3 segments' worth of TCP payload in one frame (no listener: the
    # kernel answers with RSTs, which proves it parsed the segments)
    payload = b"t" * 3000
    seg = tcp_segment(GUEST_IP, HOST_IP, 40000, 9, 1000, payload)
    frame = eth(host_mac, nic.mac, 0x0800, ipv4(GUEST_IP, HOST_IP, 6, seg))
    before = _stats(dev)
    nic.send(frame, net_hdr(flags=NEEDS_CSUM, gso_type=GSO_TCPV4, hdr_len=54, gso_size=1000,
                            csum_start=34, csum_offset=16))
    after = _stats(dev)
    assert after["tx_packets"] == before["tx_packets"] + 1
    assert after["tx_malformed"] == before["tx_malformed"]
    # invalid GSO header: gso_size 0
    nic.send(frame, net_hdr(flags=NEEDS_CSUM, gso_type=GSO_TCPV4, hdr_len=54, gso_size=0,
                            csum_start=34, csum_offset=16))
    assert _stats(dev)["tx_malformed"] == after["tx_malformed"] + 1
    _ping(nic, host_mac, 41)


def test_ctrl_rx_filter_and_mac(tap_nic):
    h, dev, nic, ns = tap_nic
    assert nic.drv.has(F_CTRL_RX)
    host_mac = _arp_resolve(nic)
    assert nic.ctrl(0, 0, b"\x00") == 0         # promisc off
    assert nic.ctrl(0, 5, b"\x01") == 0         # nobcast on
    assert nic.ctrl(9, 9) == 1                  # unknown class: ERR
    assert nic.ctrl(0, 0, b"") == 1             # bad length
    # the namespace's kernel broadcasts an ARP request for a guest address: filtered
    before = _stats(dev)
    sock = ns.socket(2, 2)
    try:
        sock.sendto(b"x", ("10.200.0.77", 9))
    except OSError:
        pass
    finally:
        sock.close()
    deadline = time.monotonic() + 5
    while _stats(dev)["rx_filtered"] == before["rx_filtered"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _stats(dev)["rx_filtered"] > before["rx_filtered"]
    # change the MAC: frames to the old one are filtered, to the new one delivered
    new_mac = bytes.fromhex("525400abcdef")
    assert nic.ctrl(1, 1, new_mac) == 0
    assert nic.read_mac() == new_mac
    nic.mac = new_mac
    ns.ip("neigh", "flush", "dev", TAP)
    _arp_resolve(nic)
    _ping(nic, host_mac, 51)


def test_socket_backend_between_two_devices():
    from devices.virtio_net.backend import open_socket_port
    from devices.virtio_net.switch import Switch
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "switch.sock")
        with Switch(path) as sw, Harness(sandbox="on", mem_size=64 << 20) as h:
            mac_a, mac_b = "52:54:00:00:00:0a", "52:54:00:00:00:0b"
            dev_a = add_net_device(h, net_spec([f"socket={path}"], slot=3, mac=mac_a),
                                   {"socket": open_socket_port(path)})
            dev_b = add_net_device(h, net_spec([f"socket={path}"], slot=4, mac=mac_b),
                                   {"socket": open_socket_port(path)})
            a = VirtioNet(h, slot=3)
            b = VirtioNet(h, slot=4)
            assert a.mac == bytes.fromhex("52540000000a") and b.mac == bytes.fromhex("52540000000b")
            assert not a.drv.has(0) and not a.drv.has(11)   # no CSUM / TSO on a socket
            # broadcast from a reaches b (flooded), then unicast both ways (learned)
            a.send(eth(BROADCAST, a.mac, 0x88B5, b"hello from a".ljust(46, b"\0")))
            got = b.recv(5)
            assert got is not None and got[1][:12] == BROADCAST + a.mac
            assert got[1][14:26] == b"hello from a"
            for i in range(20):
                b.send(eth(a.mac, b.mac, 0x88B5, b"b->a %d" % i + bytes(40)))
            frames = [a.recv(5) for _ in range(20)]
            assert all(f is not None for f in frames)
            assert [f[1][14:20] for f in frames[:1]] == [b"b->a 0"]
            big = eth(b.mac, a.mac, 0x88B5, os.urandom(1486))
            a.send(big)
            got = b.recv(5)
            assert got is not None and got[1] == big
            sa, sb = _stats(dev_a), _stats(dev_b)
            assert sa["tx_packets"] == 2 and sa["rx_packets"] == 20
            assert sb["tx_packets"] == 20 and sb["rx_packets"] == 2
            assert sa["backend"]["kind"] == "socket"
            assert sw.core.stats["forwarded"] >= 21


_NS_PORT = r"""
import os, select, sys
from devices.virtio_net.backend import open_socket_port
fd = open_socket_port(sys.argv[1])
print("ready", flush=True)
r, _, _ = select.select([fd], [], [], 30)
frame = os.read(fd, 2048) if r else b""
# answer the sender (unicast: the switch must have learned it and must reach us)
os.write(fd, frame[6:12] + bytes.fromhex("52540000000c") + b"\x88\xb5" + b"pong".ljust(46, b"\0"))
r, _, _ = select.select([fd], [], [], 30)
print("got", frame[14:18].decode(errors="replace"), flush=True)
"""


def test_switch_reaches_a_nic_in_another_network_namespace():
    """The lab's e2e guest (vmmd in a private namespace) found this: a switch
    answering autobound datagram addresses cannot reach another namespace."""
    import subprocess
    import sys
    from devices.virtio_net.backend import open_socket_port
    from devices.virtio_net.switch import Switch
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "switch.sock")
        with Switch(path):
            child = subprocess.Popen(["unshare", "--net", sys.executable, "-c", _NS_PORT, path],
                                     stdout=subprocess.PIPE, text=True,
                                     cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
            try:
                assert child.stdout.readline().strip() == "ready"
                fd = open_socket_port(path)
                try:
                    mac = bytes.fromhex("52540000000d")
                    os.write(fd, BROADCAST + mac + b"\x88\xb5" + b"ping".ljust(46, b"\0"))
                    deadline = time.monotonic() + 30
                    reply = b""
                    while time.monotonic() < deadline and not reply:
                        try:
                            reply = os.read(fd, 2048)
                        except BlockingIOError:
                            time.sleep(0.05)
                    assert reply[:6] == mac and reply[14:18] == b"pong"
                finally:
                    os.close(fd)
                assert child.stdout.readline().strip() == "got ping"
            finally:
                child.kill()
                child.wait()
