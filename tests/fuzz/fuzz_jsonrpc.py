"""The JSON-RPC dispatcher (vmmd/api/jsonrpc.py), bytes of one line in, against the real
method registry over a fake VM.

Defined errors: none — every line gets a JSON-RPC answer or (notifications) none.
Oracles: the answer is UTF-8 JSON; a single answer's id is echoed when it could be
and null otherwise; a batch answer is an array; no answer exceeds max_reply by more
than the per-member error objects; an id never comes back as something else.
"""

import json

from vmmd.api.jsonrpc import Dispatcher
from vmmd.api.methods import build_registry

EXPECTED = ()
MAX_BATCH, MAX_REPLY = 16, 64 << 10


class FakeVm:
    """Everything answers at once (no awaiting), so a coroutine finishes in one step."""

    state = "running"

    def info(self):
        return {"state": self.state, "vcpus": 1, "memory_bytes": 1 << 28, "uptime_s": 1.0,
                "devices": self.devices()}

    async def pause(self):
        self.state = "paused"

    async def resume(self):
        self.state = "running"

    async def reset(self):
        self.state = "running"

    async def shutdown(self):
        self.state = "shutdown"

    def devices(self):
        return [{"id": "lpc", "type": "lpc", "pid": 1, "state": "running", "restarts": 0,
                 "sandbox": "on"}]

    async def restart_device(self, device_id):
        return None

    async def device_stats(self, device_id):
        return {"id": device_id}

    async def set_link(self, device_id, up):
        return {"was_up": True, "up": up}

    async def vcpu_states(self):
        return []


DISPATCHER = Dispatcher(build_registry(FakeVm()), max_batch=MAX_BATCH, max_reply=MAX_REPLY)


def _run(coro):
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value
    coro.close()
    raise AssertionError("dispatch awaited something that never completes")


def one_input(data: bytes) -> None:
    FakeVm.state = "running"
    out = _run(DISPATCHER.handle(data))
    if out is None:
        return
    reply = json.loads(out.decode("utf-8"))
    assert len(out) <= MAX_REPLY + MAX_BATCH * 300, len(out)
    members = reply if isinstance(reply, list) else [reply]
    for m in members:
        assert m["jsonrpc"] == "2.0" and ("result" in m) != ("error" in m), m
        rid = m["id"]
        assert rid is None or isinstance(rid, (str, int, float)) and not isinstance(rid, bool)
        if "error" in m:
            assert isinstance(m["error"]["code"], int) and isinstance(m["error"]["message"], str)
