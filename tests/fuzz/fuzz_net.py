"""virtio-net frames and control commands (devices/virtio_net/frames.py).

Input byte 0 picks the parser: a transmitted frame's virtio_net_hdr checked by
validate() against the offloads in force, a control-queue command applied by
handle_ctrl(), a MAC_TABLE_SET payload, or saved rx-filter state.
Defined errors: FrameError (header, frame or MAC table malformed) and
ValueError from RxFilter.load (bad saved state). handle_ctrl never raises: a
bad command is an ERR ack. Oracles: an accepted header really is within the
frame; the rx filter's tables stay bounded; accepts() never raises.
"""

import atheris

from devices.virtio_net import frames as fr

EXPECTED = (fr.FrameError, ValueError)


def one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    mode = fdp.ConsumeIntInRange(0, 3)
    if mode == 0:
        hdr = fr.parse_hdr(fdp.ConsumeBytes(fr.HDR_SIZE))
        frame_len = fdp.ConsumeIntInRange(0, 1 << 17)
        flags = [fdp.ConsumeBool() for _ in range(6)]
        fr.validate(hdr, frame_len, csum=flags[0], tso4=flags[1], tso6=flags[2], ufo=flags[3],
                    ecn=flags[4], data_valid_ok=flags[5])
        if hdr.flags & fr.HDR_F_NEEDS_CSUM:
            assert fr.ETH_HLEN <= hdr.csum_start and hdr.csum_start + hdr.csum_offset + 2 <= frame_len
        if hdr.gso != fr.GSO_NONE:
            assert hdr.gso_size > 0 and hdr.hdr_len <= frame_len <= fr.MAX_FRAME
        else:
            assert frame_len <= fr.MAX_PLAIN_FRAME
    elif mode == 1:
        rx = fr.RxFilter(promisc=fdp.ConsumeBool())
        features = fdp.ConsumeIntInRange(0, (1 << 64) - 1)
        offloadable = fdp.ConsumeIntInRange(0, (1 << 64) - 1)
        for _ in range(fdp.ConsumeIntInRange(1, 4)):
            cmd = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 512))
            res = fr.handle_ctrl(cmd, rx, features, offloadable=offloadable)
            assert res.ack in (fr.OK, fr.ERR)
            if res.mac is not None:
                assert len(res.mac) == 6 and not res.mac[0] & 1
            if res.offloads is not None:
                assert not res.offloads & ~offloadable
        assert len(rx.uni) <= fr.MAX_MAC_TABLE and len(rx.multi) <= fr.MAX_MAC_TABLE
        assert isinstance(rx.accepts(fdp.ConsumeBytes(64), fdp.ConsumeBytes(6).ljust(6, b"\0")), bool)
        assert fr.RxFilter.load(rx.save()) == rx
    elif mode == 2:
        uni, uo, multi, mo = fr.parse_mac_tables(fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 4096)))
        assert len(uni) <= fr.MAX_MAC_TABLE and len(multi) <= fr.MAX_MAC_TABLE
        assert all(len(m) == 6 for m in uni + multi)
    else:
        keys = list(fr.RxFilter().save())
        state = {}
        for k in keys:
            if fdp.ConsumeIntInRange(0, 20) == 0:
                continue                                 # a key missing
            if k in ("uni", "multi"):
                state[k] = [fdp.ConsumeBytes(fdp.PickValueInList([5, 6, 6, 7]))
                            for _ in range(fdp.ConsumeIntInRange(0, 70))]
            else:
                state[k] = fdp.PickValueInList([True, False, 0, 1, None, "x"])
        rx = fr.RxFilter.load(state)
        assert fr.RxFilter.load(rx.save()) == rx
