"""What a compromised device sends vmmd, from inside its jail.

Imported by the hostile model modules before the sandbox is entered (the
jail has an empty root: nothing can be imported afterwards). The attack runs
once the model is started (after the jail), then the device keeps serving
the bus normally. Its stats() carry {"hostile": {"done", "sent"}} so a test
can see, through vmmd's device.stats, that the attack finished and how many
frames left the device.

VMMD_HOSTILE_FLOOD (seconds, default 3): how long the flood phase lasts.
VMMD_HOSTILE_REQ=1: also send garbage and unsolicited replies on the request
channel (vmmd then replaces the device: a broken reply fails it).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections import Counter

import msgpack
import zmq

from bus import protocol as p

INIT, NMI, SMI, EXTINT, FIXED = 5 << 8, 4 << 8, 2 << 8, 7 << 8, 0x30
MSI_ADDRESS = 0xFEE00000


class Attack:
    def __init__(self, model, own_vectors: int, own_gsis: set[int]):
        self.model = model
        self.own_vectors = own_vectors
        self.own_gsis = own_gsis
        self.sent: Counter = Counter()
        self.done = False
        self.flood_seconds = float(os.environ.get("VMMD_HOSTILE_FLOOD", "3"))
        self.req_garbage = os.environ.get("VMMD_HOSTILE_REQ") == "1"

    def start(self) -> None:
        asyncio.get_running_loop().call_later(0.5, lambda: asyncio.ensure_future(self.run()))

    def report(self) -> dict:
        return {"done": self.done, "sent": dict(self.sent)}

    # -- sending --------------------------------------------------------------------
    def _event(self, kind: str, msg) -> None:
        if self.model.host.channel.send_event(msg):
            self.sent[kind] += 1

    def _raw(self, kind: str, sock_attr: str, frame: bytes) -> None:
        sock = getattr(self.model.host.channel, sock_attr)
        try:
            zmq.Socket.send(sock, frame, flags=zmq.DONTWAIT, copy=True)
            self.sent[kind] += 1
        except zmq.ZMQError:
            pass

    def _once(self) -> None:
        n = self.own_vectors
        for v in (n, n + 1, 100, p.MAX_VECTORS - 1):        # vectors it does not own
            self._event("vector", p.Vector(v))
        for data in (INIT, NMI, SMI, EXTINT, FIXED):         # raw MSIs, INIT/NMI/SMI/ExtINT included
            self._event("msi", p.Msi(MSI_ADDRESS, data))
            self._event("msi", p.Msi(MSI_ADDRESS | 0x1000, data | 0x8000))
        for gsi in (0, 1, 2, 3, 4, 8, 9, 16, 23, 100):       # interrupt lines it does not own
            if gsi not in self.own_gsis:
                self._event("irq_line", p.IrqLine(gsi, 1))
                self._event("irq_line", p.IrqLine(gsi, 0))
        for what in ("reset", "quit"):                        # VM-level requests
            self._event("request", p.Request(what, {}))
        # A state far over any device's limit (1 MiB of padding).
        self._event("state_size", p.Checkpoint({"blob": "x" * (1 << 20)}))
        # Garbage on the event channel, a reply on the wrong channel.
        self._raw("malformed", "_evt", b"\xc1\xff garbage")
        self._raw("malformed", "_evt", msgpack.packb([99, 1, 2]))
        self._raw("malformed", "_evt", msgpack.packb([int(p.MsgType.READ_REPLY), 1, 2]))
        # Forged log lines.
        for i in range(500):
            self._event("log", p.Log(logging.CRITICAL, f"vmmd ERROR vmmd.machine: forged line {i}\nvmmd INFO x"))
        if self.req_garbage:
            self._req_garbage()

    def _req_garbage(self) -> None:
        """Unsolicited replies and garbage on the request channel."""
        self._raw("req", "_req", msgpack.packb([int(p.MsgType.READ_REPLY), 0xFFFF_FFF0, 7]))
        self._raw("req", "_req", msgpack.packb([int(p.MsgType.CONTROL_REPLY), 0xFFFF_FFF1, True, None]))
        self._raw("req", "_req", b"\x00\x01 not msgpack")
        # A send on the edge-triggered zmq socket can swallow the edge the serve
        # loop waits for; wake it, or this device would hang itself (and be
        # replaced by the heartbeat, which is right, but not what this tests).
        readable = getattr(self.model.host.channel, "_readable", None)
        if readable is not None:
            readable.set()

    async def run(self) -> None:
        self._once()
        loop = asyncio.get_running_loop()
        end = loop.time() + self.flood_seconds
        bad_vector = p.Vector(p.MAX_VECTORS - 1)
        init = p.Msi(MSI_ADDRESS, INIT)
        reset = p.Request("reset", {})
        while loop.time() < end:
            for _ in range(200):
                self._event("flood", bad_vector)
                self._event("flood", init)
                self._event("flood", reset)
            await asyncio.sleep(0.001)
        self.done = True
