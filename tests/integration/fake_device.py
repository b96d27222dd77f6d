"""A tiny device model for tests/integration/test_device_runtime.py.

Registers (PIO 0x500..0x50f), by offset:
  0  r/w  a register; writing it asks for a checkpoint
  1  w    IRQ line 5 level          3  w  REQUEST "reset" {"n": value}
  2  r/w  raises (a buggy model)    4  r  returns a value too wide for any access
  5  r    bit0 started, bit1 quiesced
  6  w    latch the u32 at guest-physical `value`; r: the latched value
  7  w    MSI with data `value`
  8  r/w  a register whose writes ask for no checkpoint (one the device
          died before checkpointing)
  9  r    a FIFO-like counter: each read returns it and adds one, no checkpoint
Device ops (CONTROL "device"): "stderr" {"bytes", "line"} writes that many
bytes of `line` repeated to fd 2 (a flooding or forging device); "log_events"
{"n", "text"} sends n LOG events.
"""

import os

from bus.types import IoRange, IoSpace
from devices.model import DeviceModel

BASE = 0x500


class FakeDevice(DeviceModel):
    KIND = "fake"
    STATE_VERSION = 3

    def __init__(self, host, options):
        super().__init__(host, options)
        self.reg = options.get("initial", 0)
        self.latched = 0
        self.unsaved = 0
        self.pops = 0
        self.started = False
        self.quiesced = False

    def io_ranges(self):
        return [IoRange(IoSpace.PIO, BASE, 0x10)]

    def io_read(self, space, addr, size):
        off = addr - BASE
        if off == 2:
            raise RuntimeError("boom on read")
        if off == 4:
            return 1 << 70
        if off == 5:
            return int(self.started) | int(self.quiesced) << 1
        if off == 6:
            return self.latched
        if off == 8:
            return self.unsaved & ((1 << (8 * size)) - 1)
        if off == 9:
            self.pops += 1
            return (self.pops - 1) & ((1 << (8 * size)) - 1)
        return self.reg & ((1 << (8 * size)) - 1) if off == 0 else 0

    def io_write(self, space, addr, size, value):
        off = addr - BASE
        if off == 0:
            self.reg = value
            self.host.checkpoint()
        elif off == 1:
            self.host.set_irq_line(5, bool(value))
        elif off == 2:
            raise ValueError("boom on write")
        elif off == 3:
            self.host.request("reset", {"n": value})
        elif off == 6:
            self.latched = self.host.memory.read_u32(value)
        elif off == 7:
            self.host.send_msi(0xFEE00000, value)
        elif off == 8:
            self.unsaved = value

    async def start(self):
        self.started = True

    def quiesce(self):
        self.quiesced = True

    def resume(self):
        self.quiesced = False

    def reset(self):
        self.reg = 0

    def save_state(self):
        state = {"reg": self.reg}
        if self.unsaved or self.pops:
            state.update(unsaved=self.unsaved, pops=self.pops)
        if getattr(self, "blob", None):
            state["blob"] = self.blob
        return state

    def restore_state(self, state):
        if type(state.get("reg")) is not int:
            raise ValueError("state has no int 'reg'")
        self.reg = state["reg"]
        self.unsaved, self.pops = state.get("unsaved", 0), state.get("pops", 0)
        self.blob = state.get("blob")  # lets tests make large checkpoints

    def stats(self):
        return {"reg": self.reg}

    def close(self):
        # Counted on stderr: a test checks the model closes once, before the
        # shutdown reply (vmmd kills the process as soon as it has it).
        try:
            os.write(2, b"fake model closed\n")
        except OSError:
            pass   # in the jail stderr is a file past its size limit

    def device_control(self, op, args):
        if op == "log_events":
            for i in range(args["n"]):
                self.host.log(40, f"{i} {args['text']}")
            return args["n"]
        if op != "stderr":
            return super().device_control(op, args)
        chunk = args["line"].encode(errors="surrogateescape") * max(1, 65536 // max(1, len(args["line"])))
        written = 0
        while written < args["bytes"]:
            written += os.write(2, chunk[:args["bytes"] - written])
        return written
