"""vmmd.device_log: device output into vmmd's log, attributed, cleaned, bounded."""

import asyncio
import logging
import os

from vmmd.device_log import BURST, MAX_LINE, DeviceLogLimiter, PipeReader, clean


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


class Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append((record.levelno, record.getMessage()))


def _logger(name):
    lg = logging.getLogger(name)
    lg.propagate = False
    lg.setLevel(logging.DEBUG)
    rec = Records()
    lg.addHandler(rec)
    return lg, rec


def test_clean_escapes_controls_and_cuts():
    assert clean("a\tb") == "a\tb"
    assert clean("x\x1b[2Jy\rz\n") == "x\\x1b[2Jy\\x0dz\\x0a"
    assert clean("\u202eevil\u2028") == "\\x202eevil\\x2028"
    assert clean("\x9b") == "\\x9b"
    long = clean("a" * (MAX_LINE + 50))
    assert long == "a" * MAX_LINE + "..."


def test_limiter_burst_then_rate_and_drop_report():
    clock = Clock()
    lg, rec = _logger("test.device_log.limiter")
    lim = DeviceLogLimiter("dev0", rate=10, burst=5, clock=clock, logger=lg)
    sent = [lim.emit(logging.ERROR, f"line {i}") for i in range(20)]
    assert sent == [True] * 5 + [False] * 15
    assert lim.dropped == 15 and lim.lines == 5
    clock.t += 1.0  # 10 more tokens, and time for a drop report
    assert lim.emit(logging.INFO, "after")
    msgs = [m for _, m in rec.messages]
    assert msgs[:5] == [f"[dev0] line {i}" for i in range(5)]
    assert msgs[5] == "[dev0] after"
    assert msgs[6].startswith("[dev0] 15 log lines dropped")
    assert all(m.startswith("[dev0] ") for m in msgs)
    assert lim.stats() == {"lines": 6, "dropped": 15, "bytes": 0}


def test_pipe_reader_lines_partials_flood_and_eof():
    lg, rec = _logger("test.device_log.pipe")

    async def run():
        loop = asyncio.get_running_loop()
        r, w = os.pipe()
        lim = DeviceLogLimiter("d", logger=lg)
        reader = PipeReader(loop, r, lim)
        os.write(w, b"one\nvmmd ERROR vmmd.machine: forged\x1b[0m\ntw")
        await asyncio.sleep(0.05)
        os.write(w, b"o\n" + b"x" * (10 * MAX_LINE))   # a line without an end: kept bounded
        await asyncio.sleep(0.05)
        assert len(reader._partial) <= 4 * MAX_LINE
        os.write(w, b"\n" + b"flood\n" * 5000)
        await asyncio.sleep(0.2)
        os.close(w)
        for _ in range(50):
            if reader.closed:
                break
            await asyncio.sleep(0.02)
        return lim, reader

    lim, reader = asyncio.run(run())
    assert reader.closed
    msgs = [m for _, m in rec.messages]
    assert msgs[0] == "[d] one"
    assert msgs[1] == "[d] vmmd ERROR vmmd.machine: forged\\x1b[0m"
    assert msgs[2] == "[d] two"
    assert msgs[3].startswith("[d] xxx") and len(msgs[3]) <= 4 * MAX_LINE + 10
    assert lim.lines <= BURST + 20  # the burst, and what 20/s refilled meanwhile
    assert lim.lines + lim.dropped == 4 + 5000
    assert lim.dropped >= 4 + 5000 - BURST - 20  # every line past the burst (and a refill)
    assert any("log lines dropped" in m for m in msgs)  # reported at EOF
