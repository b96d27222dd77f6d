"""The virtio-net device (virtio 1.2, 5.1) over the shared virtio-pci machinery.

Options: {"args": [...], "mac": "52:54:00:..."} from the slot
`-s N,virtio-net,tap=NAME|socket=PATH[,OPTION...]`; vmmd opens the backend
(tap or switch socket) in the host's network namespace and passes it as
bootstrap fd "tap" or "socket" (backend.py). Slot options the device reads:

    mac=xx:xx:xx:xx:xx:xx   the NIC's address (vmmd picks one if absent)
    queue_size=N            rx/tx queue size, a power of 2 in 16..4096 (256)
    mrg_rxbuf=off           do not offer MRG_RXBUF
    offload=off             do not offer CSUM/GUEST_CSUM/TSO (tap only anyway)
    link=down               start with the link down

Queues: 0 receiveq1, 1 transmitq1, 2 controlq (used once CTRL_VQ is
negotiated). Features: MAC, STATUS, MRG_RXBUF, CTRL_VQ, CTRL_RX,
CTRL_MAC_ADDR, and with a vnet-header tap CSUM, GUEST_CSUM, HOST_TSO4/6,
HOST_ECN, GUEST_TSO4/6, GUEST_ECN, CTRL_GUEST_OFFLOADS.

Transmit (kick on queue 1): every chain is popped, its 12-byte
virtio_net_hdr copied once and validated (frames.validate against the
negotiated CSUM/HOST_TSO*), and the frame written to the backend straight
from guest memory (writev of the chain's views; the validated copy of the
header in front for a vnet-header tap). Malformed headers or chains are
dropped and counted; the chain is always completed.

Receive: the backend fd is watched with loop.add_reader while the driver is
up, the link is up, the device is not quiesced and the rx queue has
buffers. A frame (with the tap's header, or a zeroed one) is copied into
one chain, or with MRG_RXBUF spread over as many as it needs (num_buffers
in the header; the used elements are published together). When the rx
queue runs dry the reader is removed (the backend's own queue backs up,
then the host drops) and kicks are re-enabled; the driver's next rx kick
resumes reading. A frame that does not fit in the buffers at all is dropped.

Link down (device.set_link): STATUS.LINK_UP cleared with a config
interrupt; tx chains are completed and their frames dropped, nothing is
received. Counters: stats()["net"].
"""

from __future__ import annotations

import logging
import struct

from devices.virtio.device import VirtioDevice
from devices.virtio.queue import ChainError
from devices.virtio_net import frames as fr
from devices.virtio_net import state as netstate
from devopts.virtio_net import NetOptions  # the slot options, shared with vmmd's check
from devices.virtio_net.backend import (
    TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_TSO_ECN, Backend, make_backend)

log = logging.getLogger("devices.virtio_net")

VIRTIO_ID_NET = 1
RXQ, TXQ, CTRLQ = 0, 1, 2
STATUS_LINK_UP = 1
CONFIG = struct.Struct("<6sHH")   # mac, status, max_virtqueue_pairs
DEFAULT_QUEUE_SIZE = 256
CTRL_QUEUE_SIZE = 64
RX_BUDGET = 256        # frames per reader callback before yielding to the bus
TX_BUDGET = 1024

OFFLOAD_FEATURES = ((1 << fr.F_CSUM) | (1 << fr.F_GUEST_CSUM) | (1 << fr.F_HOST_TSO4)
                    | (1 << fr.F_HOST_TSO6) | (1 << fr.F_HOST_ECN) | (1 << fr.F_GUEST_TSO4)
                    | (1 << fr.F_GUEST_TSO6) | (1 << fr.F_GUEST_ECN)
                    | (1 << fr.F_CTRL_GUEST_OFFLOADS))
GUEST_OFFLOADS = ((1 << fr.F_GUEST_CSUM) | (1 << fr.F_GUEST_TSO4) | (1 << fr.F_GUEST_TSO6)
                  | (1 << fr.F_GUEST_ECN))

COUNTERS = ("rx_packets", "rx_bytes", "rx_dropped", "rx_filtered", "rx_malformed", "rx_too_big",
            "rx_stalls", "tx_packets", "tx_bytes", "tx_dropped", "tx_malformed", "bad_chains",
            "ctrl_ok", "ctrl_err", "link_changes")

_USED_ELEM = struct.Struct("<II")
_U16 = struct.Struct("<H")


def push_used_batch(queue, elems: list[tuple[int, int]]) -> None:
    """Publish several used elements with one used->idx update (a mergeable
    rx frame must appear to the driver all at once)."""
    if len(elems) == 1:
        queue.push_used(*elems[0])
        return
    used, size, idx = queue._used, queue.size, queue.used_idx
    for head, n in elems:
        _USED_ELEM.pack_into(used, 4 + 8 * (idx % size), head, n & 0xFFFFFFFF)
        idx = (idx + 1) & 0xFFFF
    queue.used_idx = idx
    _U16.pack_into(used, 2, idx)   # elements before the index (x86 TSO)
    if queue._mark is not None:
        queue._mark(queue.used_gpa, queue._used_size)


class VirtioNetDevice(VirtioDevice):
    KIND = "virtio_net"
    VIRTIO_ID = VIRTIO_ID_NET

    def __init__(self, host, options: dict, *, backend: Backend | None = None):
        self.opts = NetOptions(options)
        fds = dict(getattr(host, "fds", None) or {})
        self.backend = backend if backend is not None else make_backend(fds)
        try:
            self.mac = self.opts.mac
            self.link_up = self.opts.link_up
            self.rx_filter = fr.RxFilter()
            self.guest_offloads = 0
            self.net = dict.fromkeys(COUNTERS, 0)
            self._rx_pending = None      # a frame read but not yet delivered (bytes)
            self._rx_stalled = False
            self._rx_reading = False
            self._device_features = self._offered()
            super().__init__(host, options)
        except Exception:
            self.backend.close()
            raise

    def _offered(self) -> int:
        f = ((1 << fr.F_MAC) | (1 << fr.F_STATUS) | (1 << fr.F_CTRL_VQ) | (1 << fr.F_CTRL_RX)
             | (1 << fr.F_CTRL_MAC_ADDR))
        if self.opts.mrg_rxbuf:
            f |= 1 << fr.F_MRG_RXBUF
        if self.opts.offload and self.backend.offloads:
            f |= OFFLOAD_FEATURES
        return f

    # --- VirtioDevice hooks ----------------------------------------------------------

    def device_features(self) -> int:
        return self._device_features

    def num_queues(self) -> int:
        return 3

    def queue_max_size(self, q: int) -> int:
        return CTRL_QUEUE_SIZE if q == CTRLQ else self.opts.queue_size

    def config_bytes(self) -> bytes:
        return CONFIG.pack(self.mac, STATUS_LINK_UP if self.link_up else 0, 1)

    def config_write(self, offset: int, size: int, value: int) -> None:
        # Drivers without CTRL_MAC_ADDR may write the MAC into the config (legacy habit).
        if offset + size <= 6 and not self.has_feature(fr.F_CTRL_MAC_ADDR):
            mac = bytearray(self.mac)
            mac[offset:offset + size] = value.to_bytes(size, "little")
            if not mac[0] & 1:
                self.mac = bytes(mac)

    def features_ok(self, features: int) -> bool:
        why = fr.features_consistent(features)
        if why:
            log.warning("virtio-net: refusing features %#x: %s", features, why)
            return False
        return True

    def on_driver_ok(self) -> None:
        self._set_guest_offloads(self.features & GUEST_OFFLOADS)
        self._update_rx_reader()

    def on_queue_notify(self, q: int, queue) -> None:
        if q == TXQ:
            self._process_tx(queue)
        elif q == RXQ:
            self._rx_stalled = False
            self._rx_drain()
        elif q == CTRLQ:
            self._process_ctrl(queue)

    def device_reset(self) -> None:
        self._rx_pending = None
        self._rx_stalled = False
        self.rx_filter = fr.RxFilter()
        self.mac = self.opts.mac
        self._update_rx_reader()
        try:
            self._set_guest_offloads(0)
        except OSError as exc:
            log.warning("virtio-net: TUNSETOFFLOAD at reset: %s", exc)

    def device_quiesce(self) -> None:
        self._update_rx_reader()

    def device_resume(self) -> None:
        self._update_rx_reader()

    def device_save(self) -> dict:
        if self._rx_pending is not None:
            self._rx_pending = None
            self.net["rx_dropped"] += 1
        return netstate.make_state(self.backend.kind, self.mac, self.link_up, self.rx_filter,
                                   self.guest_offloads, self.net)

    def device_restore(self, state: dict) -> None:
        st = netstate.check_state(state)
        if st["backend"] != self.backend.kind:
            raise ValueError(f"virtio_net state: saved backend {st['backend']} but this NIC "
                             f"has {self.backend.kind}")
        self.mac, self.link_up, self.rx_filter = st["mac"], st["link_up"], st["rx_filter"]
        self.net.update({k: v for k, v in st["counters"].items() if k in self.net})
        self._set_guest_offloads(st["guest_offloads"] & self.features & GUEST_OFFLOADS)
        self._update_rx_reader()

    # --- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        await super().start()
        self._update_rx_reader()

    def close(self) -> None:
        self._stop_reading()
        try:
            super().close()
        finally:
            self.backend.close()

    # --- link ----------------------------------------------------------------------------

    def set_link(self, up: bool) -> bool:
        """Host-side link state; a config-change interrupt when it changes.
        Returns the previous state."""
        was = self.link_up
        if bool(up) != was:
            self.link_up = bool(up)
            self.net["link_changes"] += 1
            if not up:
                self._rx_pending = None
            if self.transport.driver_ok:
                self.config_changed()
            else:
                self.host.checkpoint()
            self._update_rx_reader()
            if up and self.transport.driver_ok:
                self._poll_tx()
        return was

    def device_control(self, op: str, args: dict):
        """CONTROL "device" ops: "set_link" {"up": bool} (vmmd's device.set_link)."""
        if op == "set_link":
            up = args.get("up") if isinstance(args, dict) else None
            if type(up) is not bool:
                raise ValueError("set_link needs {'up': bool}")
            was = self.set_link(up)
            self.host.checkpoint()
            return {"was_up": was, "up": self.link_up}
        raise ValueError(f"virtio_net: no device op {op!r}")

    # --- offloads --------------------------------------------------------------------------

    def _set_guest_offloads(self, bits: int) -> None:
        self.guest_offloads = bits
        tun = 0
        if bits >> fr.F_GUEST_CSUM & 1:
            tun |= TUN_F_CSUM
            if bits >> fr.F_GUEST_TSO4 & 1:
                tun |= TUN_F_TSO4
            if bits >> fr.F_GUEST_TSO6 & 1:
                tun |= TUN_F_TSO6
            if bits >> fr.F_GUEST_ECN & 1 and tun & (TUN_F_TSO4 | TUN_F_TSO6):
                tun |= TUN_F_TSO_ECN
        if self.backend.offloads:
            self.backend.set_offload(tun)

    # --- transmit ------------------------------------------------------------------------------

    def _poll_tx(self) -> None:
        q = self.queues[TXQ] if len(self.queues) > TXQ else None
        if q is not None:
            self._kick(TXQ)

    def _process_tx(self, queue) -> None:
        mem = self.memory
        backend = self.backend
        net = self.net
        tap_hdr = backend.vnet_hdr
        f = self.features
        csum = bool(f >> fr.F_CSUM & 1)
        tso4, tso6 = bool(f >> fr.F_HOST_TSO4 & 1), bool(f >> fr.F_HOST_TSO6 & 1)
        ecn = bool(f >> fr.F_HOST_ECN & 1)
        pushed = 0
        try:
            while True:
                queue.disable_notification()
                while pushed < TX_BUDGET:
                    try:
                        chain = queue.pop()
                    except ChainError as exc:
                        net["bad_chains"] += 1
                        net["tx_dropped"] += 1
                        log.debug("tx: %s", exc)
                        queue.push_used(exc.head, 0)
                        pushed += 1
                        continue
                    if chain is None:
                        break
                    pushed += 1
                    frame_len = chain.readable_len - fr.HDR_SIZE
                    try:
                        if chain.writable:
                            raise fr.FrameError("tx chain with device-writable buffers")
                        hdr_bytes = chain.read_all(mem, fr.HDR_SIZE)
                        hdr = fr.parse_hdr(hdr_bytes)
                        fr.validate(hdr, frame_len, csum=csum, tso4=tso4, tso6=tso6, ecn=ecn)
                    except fr.FrameError as exc:
                        net["tx_malformed"] += 1
                        net["tx_dropped"] += 1
                        log.debug("tx: chain %d dropped: %s", chain.head, exc)
                        queue.push_used(chain.head, 0)
                        continue
                    if not self.link_up:
                        net["tx_dropped"] += 1
                    else:
                        views = chain.readable_views(mem, fr.HDR_SIZE, frame_len)
                        if tap_hdr:
                            views.insert(0, fr.with_num_buffers(hdr_bytes, 0))
                        if backend.send(views):
                            net["tx_packets"] += 1
                            net["tx_bytes"] += frame_len
                        else:
                            net["tx_dropped"] += 1
                    queue.push_used(chain.head, 0)
                if pushed >= TX_BUDGET:
                    # Let the bus and rx run; finish the rest on the next loop turn.
                    if self._loop is not None:
                        self._loop.call_soon(self._poll_tx)
                    return
                if not queue.enable_notification():
                    return
        finally:
            if pushed:
                self.notify_used(TXQ)

    # --- receive --------------------------------------------------------------------------------

    def _rx_wanted(self) -> bool:
        q = self.queues[RXQ] if self.queues else None
        return (self._loop is not None and not self._quiesced and self.transport.driver_ok
                and q is not None and self.link_up and not self._rx_stalled
                and self.needs_reset_reason is None and self.backend.fd >= 0
                and not self.backend.eof)

    def _update_rx_reader(self) -> None:
        if self._rx_wanted():
            if not self._rx_reading:
                self._loop.add_reader(self.backend.fd, self._on_backend_readable)
                self._rx_reading = True
                # a frame may be waiting already (level-triggered anyway)
        else:
            self._stop_reading()

    def _stop_reading(self) -> None:
        if self._rx_reading:
            if self._loop is not None:
                self._loop.remove_reader(self.backend.fd)
            self._rx_reading = False

    def _on_backend_readable(self) -> None:
        try:
            self._rx_drain()
        except Exception as exc:
            log.exception("rx failed")
            self.set_needs_reset(f"rx: {type(exc).__name__}: {exc}")
            self._update_rx_reader()

    def _rx_drain(self) -> None:
        """Move frames from the backend into rx buffers until either runs out."""
        queue = self.queues[RXQ]
        if queue is None or not self.transport.driver_ok or self._quiesced:
            return
        delivered = 0
        net = self.net
        try:
            for _ in range(RX_BUDGET):
                if not self.link_up:
                    self._rx_pending = None
                    break
                frame = self._rx_pending
                if frame is None:
                    view = self.backend.recv()
                    if view is None:
                        break
                    frame = bytes(view)
                status = self._deliver(queue, frame)
                if status == "stall":
                    self._rx_pending = frame
                    if queue.enable_notification():
                        continue          # buffers arrived meanwhile
                    self._rx_stalled = True
                    net["rx_stalls"] += 1
                    break
                self._rx_pending = None
                if status == "ok":
                    delivered += 1
                    queue.disable_notification()
        finally:
            if delivered:
                self.notify_used(RXQ)
            self._update_rx_reader()

    def _deliver(self, queue, frame: bytes) -> str:
        """'ok', 'dropped' or 'stall' (no buffers: keep the frame)."""
        net = self.net
        if self.backend.vnet_hdr:
            if len(frame) < fr.HDR_SIZE:
                net["rx_malformed"] += 1
                return "dropped"
            hdr_bytes, eth = frame[:fr.HDR_SIZE], memoryview(frame)[fr.HDR_SIZE:]
            try:
                hdr = fr.parse_hdr(hdr_bytes)
                g = self.guest_offloads
                gcsum = bool(g >> fr.F_GUEST_CSUM & 1)
                if not gcsum and hdr.flags & fr.HDR_F_DATA_VALID:
                    hdr_bytes = bytes([hdr.flags & ~fr.HDR_F_DATA_VALID]) + hdr_bytes[1:]
                fr.validate(hdr, len(eth), csum=gcsum, tso4=bool(g >> fr.F_GUEST_TSO4 & 1),
                            tso6=bool(g >> fr.F_GUEST_TSO6 & 1), ecn=bool(g >> fr.F_GUEST_ECN & 1),
                            data_valid_ok=True)
            except fr.FrameError as exc:
                net["rx_malformed"] += 1
                log.debug("rx: frame dropped: %s", exc)
                return "dropped"
        else:
            hdr_bytes, eth = fr.EMPTY_HDR, memoryview(frame)
            if not fr.MIN_FRAME <= len(eth) <= fr.MAX_PLAIN_FRAME:
                net["rx_malformed"] += 1
                return "dropped"
        if self.has_feature(fr.F_CTRL_RX) and not self.rx_filter.accepts(eth, self.mac):
            net["rx_filtered"] += 1
            return "dropped"
        total = fr.HDR_SIZE + len(eth)
        mem = self.memory
        mrg = self.has_feature(fr.F_MRG_RXBUF)
        start = queue.last_avail_idx
        chains = []
        room = 0
        while room < total:
            if not mrg and chains:
                break
            try:
                chain = queue.pop()
            except ChainError as exc:
                net["bad_chains"] += 1
                queue.push_used(exc.head, 0)
                continue
            if chain is None:
                queue.last_avail_idx = start   # give the popped chains back
                return "stall"
            if chain.readable or chain.writable_len < (fr.HDR_SIZE if not chains else 1):
                # rx buffers are device-writable only, the first at least a header long
                net["bad_chains"] += 1
                self._complete_bad(queue, chains, chain)
                start = queue.last_avail_idx
                chains, room = [], 0
                continue
            chains.append(chain)
            room += chain.writable_len
        if room < total:
            # without MRG_RXBUF one buffer must hold the frame: drop it, keep the buffer
            queue.last_avail_idx = start
            net["rx_too_big"] += 1
            net["rx_dropped"] += 1
            return "dropped"
        n = len(chains)
        hdr_out = fr.with_num_buffers(bytes(hdr_bytes), n)
        elems = []
        first = chains[0]
        first.write_at(mem, 0, hdr_out)
        off = 0
        left = len(eth)
        pos = fr.HDR_SIZE
        for i, chain in enumerate(chains):
            cap = chain.writable_len - (pos if i == 0 else 0)
            take = min(cap, left)
            if take:
                chain.write_at(mem, pos if i == 0 else 0, eth[off:off + take])
            elems.append((chain.head, take + (fr.HDR_SIZE if i == 0 else 0)))
            off += take
            left -= take
            pos = 0
        push_used_batch(queue, elems)
        net["rx_packets"] += 1
        net["rx_bytes"] += len(eth)
        return "ok"

    @staticmethod
    def _complete_bad(queue, good_chains, bad) -> None:
        """A malformed rx chain: complete it (0 bytes) and the ones popped
        before it for the same frame (they are returned empty, as Linux expects
        nothing of a 0-length used buffer but to refill it)."""
        push_used_batch(queue, [(c.head, 0) for c in good_chains] + [(bad.head, 0)])

    # --- control queue ---------------------------------------------------------------------------

    def _process_ctrl(self, queue) -> None:
        mem = self.memory
        pushed = 0
        def bad_chain(exc: ChainError) -> None:
            nonlocal pushed
            self.net["bad_chains"] += 1
            self.net["ctrl_err"] += 1   # completed with no ack: no ack byte can be trusted
            pushed += 1

        try:
            for chain in queue.drain(bad_chain):
                pushed += 1
                if chain.writable_len < 1 or chain.readable_len > fr.MAX_CTRL_DATA:
                    self.net["ctrl_err"] += 1
                    queue.push_used(chain.head, 0)
                    continue
                cmd = chain.read_all(mem)
                res = fr.handle_ctrl(cmd, self.rx_filter, self.features,
                                     offloadable=self.features & GUEST_OFFLOADS)
                if res.ack == fr.OK:
                    if res.mac is not None:
                        self.mac = res.mac
                    if res.offloads is not None:
                        try:
                            self._set_guest_offloads(res.offloads)
                        except OSError as exc:
                            res = fr.CtrlResult(fr.ERR, f"TUNSETOFFLOAD: {exc}")
                if res.ack == fr.OK:
                    self.net["ctrl_ok"] += 1
                else:
                    self.net["ctrl_err"] += 1
                    log.debug("ctrl: %s", res.reason)
                # the ack is the last writable byte
                chain.write_at(mem, chain.writable_len - 1, bytes([res.ack]))
                queue.push_used(chain.head, 1)
                self.host.checkpoint()
        finally:
            if pushed:
                self.notify_used(CTRLQ)

    # --- DeviceModel ----------------------------------------------------------------------------

    def stats(self) -> dict:
        out = super().stats()
        out["net"] = {"mac": fr.format_mac(self.mac), "link_up": self.link_up,
                      "backend": self.backend.describe(),
                      "features": [fr.FEATURE_NAMES[b] for b in fr.FEATURE_NAMES
                                   if self.features >> b & 1],
                      "guest_offloads": self.guest_offloads,
                      "rx_reading": self._rx_reading, "rx_stalled": self._rx_stalled,
                      "rx_filter": {k: v for k, v in self.rx_filter.save().items()
                                    if type(v) is bool},
                      **self.net}
        return out


DEVICE_MODEL = VirtioNetDevice
