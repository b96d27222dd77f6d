"""The sans-I/O JSON-RPC dispatcher, the standard methods and the OpenRPC document."""

import asyncio
import json

import pytest

import vmmd
from bus.types import PROTOCOL_VERSION
from vmmd.api import jsonrpc
from vmmd.api.jsonrpc import ApiError, Dispatcher, Registry, SchemaError, validate
from vmmd.api.methods import NoSuchDevice, VmStateError, build_registry


class FakeVm:
    def __init__(self):
        self.state = "running"
        self.restarted = []

    def info(self):
        return {"state": self.state, "vcpus": 2, "memory_bytes": 512 << 20, "uptime_s": 3725.5,
                "devices": self.devices(), "assists": {"pio": 3}}

    async def pause(self):
        if self.state != "running":
            raise VmStateError(f"cannot pause: VM is {self.state}")
        self.state = "paused"

    async def resume(self):
        if self.state != "paused":
            raise VmStateError(f"cannot resume: VM is {self.state}")
        self.state = "running"

    async def reset(self):
        self.state = "running"

    async def shutdown(self):
        self.state = "shutdown"

    def devices(self):
        return [{"id": "lpc0", "type": "lpc", "pid": 42, "state": "running", "restarts": 0, "sandbox": "on"}]

    async def device_stats(self, device_id):
        if device_id != "net0":
            raise NoSuchDevice(f"no device {device_id!r}")
        return {"net": {"rx_packets": 3, "tx_packets": 4}}

    async def set_link(self, device_id, up):
        if device_id != "net0":
            raise NoSuchDevice(f"no device {device_id!r}")
        was, self.link_up = getattr(self, "link_up", True), up
        return {"was_up": was, "up": up}

    async def restart_device(self, device_id):
        if device_id != "lpc0":
            raise NoSuchDevice(f"no device {device_id!r}")
        self.restarted.append(device_id)


def make():
    vm = FakeVm()
    registry = build_registry(vm)

    async def boom(params):
        raise RuntimeError("secret detail")

    async def echo(params):
        return params

    registry.add("test.boom", boom, summary="always fails")
    registry.add("test.echo", echo, {
        "type": "object",
        "properties": {
            "name": {"type": "string", "minLength": 1},
            "count": {"type": "integer", "minimum": 0, "maximum": 10},
            "ratio": {"type": "number"},
            "on": {"type": "boolean"},
            "mode": {"type": "string", "enum": ["a", "b"]},
            "tags": {"type": "array", "items": {"type": "string"}},
            "extra": {"type": "object"},
        },
        "required": ["name"],
        "additionalProperties": False,
    })
    registry.add("test.unserializable", lambda p: object())
    return vm, Dispatcher(registry)


def rpc(dispatcher, payload):
    raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    out = asyncio.run(dispatcher.handle(raw))
    return None if out is None else json.loads(out)


def req(method, params=None, id=1):
    msg = {"jsonrpc": "2.0", "method": method, "id": id}
    if params is not None:
        msg["params"] = params
    return msg


def error_code(response):
    assert "result" not in response
    return response["error"]["code"]


# -- protocol ------------------------------------------------------------------

def test_single_request_returns_result_with_same_id():
    _, d = make()
    assert rpc(d, req("vm.info", id="abc")) == {
        "jsonrpc": "2.0", "id": "abc",
        "result": {"state": "running", "vcpus": 2, "memory_bytes": 512 << 20, "uptime_s": 3725.5,
                   "devices": [{"id": "lpc0", "type": "lpc", "pid": 42, "state": "running",
                                "restarts": 0, "sandbox": "on"}],
                   "assists": {"pio": 3}}}


@pytest.mark.parametrize("raw", [b"{", b"not json", b"\xff\xfe", b'{"a": NaN}', b"[" * 100000])
def test_parse_error(raw):
    _, d = make()
    r = rpc(d, raw)
    assert error_code(r) == jsonrpc.PARSE_ERROR and r["id"] is None


@pytest.mark.parametrize("msg", [
    {"method": "vm.info", "id": 1},                       # no jsonrpc
    {"jsonrpc": "1.0", "method": "vm.info", "id": 1},     # wrong version
    {"jsonrpc": "2.0", "id": 1},                          # no method
    {"jsonrpc": "2.0", "method": 5, "id": 1},             # method not a string
    {"jsonrpc": "2.0", "method": "vm.info", "id": [1]},   # bad id type
    {"jsonrpc": "2.0", "method": "vm.info", "id": True},  # bool is not a number
    {"jsonrpc": "2.0", "method": "vm.info", "id": {}},
    {"jsonrpc": "2.0", "method": "vm.info", "params": "x", "id": 1},
    {"jsonrpc": "2.0", "method": "vm.info"} | {"params": 3},  # invalid even as a notification
    "a string", 42, None,
])
def test_invalid_request(msg):
    _, d = make()
    assert error_code(rpc(d, msg)) == jsonrpc.INVALID_REQUEST


def test_invalid_request_echoes_a_valid_id_and_nulls_a_bad_one():
    _, d = make()
    assert rpc(d, {"jsonrpc": "1.0", "method": "vm.info", "id": 7})["id"] == 7
    assert rpc(d, {"jsonrpc": "2.0", "method": "vm.info", "id": [7]})["id"] is None


def test_empty_batch_is_invalid_request():
    _, d = make()
    r = rpc(d, [])
    assert isinstance(r, dict) and error_code(r) == jsonrpc.INVALID_REQUEST


def test_method_not_found():
    _, d = make()
    r = rpc(d, req("vm.fly"))
    assert error_code(r) == jsonrpc.METHOD_NOT_FOUND and "vm.fly" in r["error"]["message"]


def test_batch_mixes_results_errors_and_notifications_in_order():
    vm, d = make()
    batch = [
        req("vm.pause", id=1),
        {"jsonrpc": "2.0", "method": "vm.resume"},   # notification: runs, no response
        req("vm.info", id=2),
        req("nope", id=3),
        5,
    ]
    r = rpc(d, batch)
    assert [x.get("id") for x in r] == [1, 2, 3, None]
    assert r[0]["result"] is None
    assert r[1]["result"]["state"] == "running"     # the notification resumed it
    assert error_code(r[2]) == jsonrpc.METHOD_NOT_FOUND
    assert error_code(r[3]) == jsonrpc.INVALID_REQUEST


def test_notifications_get_no_response_even_when_failing():
    vm, d = make()
    assert rpc(d, {"jsonrpc": "2.0", "method": "vm.pause"}) is None
    assert vm.state == "paused"
    assert rpc(d, {"jsonrpc": "2.0", "method": "vm.pause"}) is None       # VmStateError
    assert rpc(d, {"jsonrpc": "2.0", "method": "nope"}) is None           # not found
    assert rpc(d, {"jsonrpc": "2.0", "method": "test.boom"}) is None      # internal
    assert rpc(d, [{"jsonrpc": "2.0", "method": "vm.info"}] * 3) is None  # all-notification batch


def test_null_id_is_a_request_not_a_notification():
    _, d = make()
    assert rpc(d, req("vmm.version", id=None))["id"] is None


# -- params ----------------------------------------------------------------------

@pytest.mark.parametrize("params, field", [
    ({}, "name"),
    ({"name": 3}, "name"),
    ({"name": ""}, "name"),
    ({"name": "x", "count": "1"}, "count"),
    ({"name": "x", "count": 1.5}, "count"),
    ({"name": "x", "count": True}, "count"),
    ({"name": "x", "count": -1}, "count"),
    ({"name": "x", "count": 11}, "count"),
    ({"name": "x", "ratio": "1"}, "ratio"),
    ({"name": "x", "on": 1}, "on"),
    ({"name": "x", "mode": "c"}, "mode"),
    ({"name": "x", "tags": ["a", 1]}, "tags[1]"),
    ({"name": "x", "extra": []}, "extra"),
    ({"name": "x", "bogus": 1}, "bogus"),
    (["x"], "by-name"),
])
def test_invalid_params_name_the_field(params, field):
    _, d = make()
    r = rpc(d, req("test.echo", params))
    assert error_code(r) == jsonrpc.INVALID_PARAMS
    assert field in r["error"]["message"]


def test_valid_params_reach_the_handler():
    _, d = make()
    params = {"name": "x", "count": 10, "ratio": 2, "on": False, "mode": "b", "tags": [], "extra": {"k": 1}}
    assert rpc(d, req("test.echo", params))["result"] == params


def test_methods_without_params_accept_missing_empty_object_or_empty_array():
    _, d = make()
    for params in (None, {}, []):
        assert "result" in rpc(d, req("vm.info", params))
    assert error_code(rpc(d, req("vm.info", {"x": 1}))) == jsonrpc.INVALID_PARAMS


# -- application and internal errors ---------------------------------------------------

def test_vm_state_error_maps_to_32000():
    vm, d = make()
    r = rpc(d, req("vm.resume"))
    assert error_code(r) == jsonrpc.VM_STATE_ERROR == -32000
    assert "running" in r["error"]["message"]


def test_no_such_device_maps_to_32001():
    vm, d = make()
    assert error_code(rpc(d, req("device.restart", {"id": "blk9"}))) == jsonrpc.NO_SUCH_DEVICE == -32001
    assert rpc(d, req("device.restart", {"id": "lpc0"}))["result"] is None
    assert vm.restarted == ["lpc0"]


def test_api_error_carries_code_message_and_data():
    registry = Registry()

    def fail(params):
        raise ApiError(-32050, "balloon busy", {"retry": True})
    registry.add("x", fail)
    r = rpc(Dispatcher(registry), req("x"))
    assert r["error"] == {"code": -32050, "message": "balloon busy", "data": {"retry": True}}


def test_internal_error_hides_details_and_logs(caplog):
    _, d = make()
    r = rpc(d, req("test.boom", id=9))
    assert r["id"] == 9 and error_code(r) == jsonrpc.INTERNAL_ERROR
    assert "secret" not in json.dumps(r)
    assert "secret detail" in caplog.text


def test_unserializable_result_is_internal_error():
    _, d = make()
    assert error_code(rpc(d, req("test.unserializable"))) == jsonrpc.INTERNAL_ERROR


# -- standard methods --------------------------------------------------------------

def test_standard_methods():
    vm, d = make()
    assert rpc(d, req("vmm.version"))["result"] == {"version": vmmd.__version__, "protocol": PROTOCOL_VERSION}
    assert rpc(d, req("device.list"))["result"][0]["id"] == "lpc0"
    for method, state in (("vm.pause", "paused"), ("vm.resume", "running"),
                          ("vm.reset", "running"), ("vm.shutdown", "shutdown")):
        assert rpc(d, req(method))["result"] is None
        assert vm.state == state


def test_sync_handlers_are_allowed():
    registry = Registry()
    registry.add("plain", lambda p: 41 + 1)
    assert rpc(Dispatcher(registry), req("plain"))["result"] == 42


# -- registry --------------------------------------------------------------------

def test_registry_rejects_duplicates_and_bad_schemas():
    registry = Registry()
    registry.add("a", lambda p: None)
    with pytest.raises(ValueError):
        registry.add("a", lambda p: None)
    with pytest.raises(SchemaError):
        registry.add("b", lambda p: None, {"type": "string"})
    with pytest.raises(SchemaError):
        registry.add("c", lambda p: None, {"type": "object", "properties": {"x": {"pattern": "a+"}}})
    with pytest.raises(SchemaError):
        registry.add("d", lambda p: None, {"type": "object", "required": ["x"]})


def test_validate_type_lists():
    validate({"type": ["integer", "null"]}, None)
    validate({"type": ["integer", "null"]}, 3)
    with pytest.raises(SchemaError):
        validate({"type": ["integer", "null"]}, "3")


# -- OpenRPC ---------------------------------------------------------------------

def test_discover_lists_every_method_with_schemas():
    _, d = make()
    doc = rpc(d, req("rpc.discover"))["result"]
    assert doc["openrpc"] == "1.2.6"
    assert doc["info"] == {"title": "vmmd control API", "version": vmmd.__version__}
    methods = {m["name"]: m for m in doc["methods"]}
    expected = {"vm.info", "vm.pause", "vm.resume", "vm.reset", "vm.shutdown", "device.list",
                "device.restart", "device.stats", "device.set_link", "debug.vcpus", "vmm.version", "rpc.discover", "test.boom", "test.echo",
                "test.unserializable", "balloon.set", "balloon.info", "snapshot.create"}
    assert set(methods) == expected
    for m in methods.values():
        assert m["summary"] is not None and "schema" in m["result"]
        assert isinstance(m["params"], list)
    assert methods["device.restart"]["params"] == [
        {"name": "id", "schema": {"type": "string", "minLength": 1, "description": "device id"}, "required": True}]
    assert methods["vm.info"]["result"]["schema"]["properties"]["state"]["enum"] == [
        "created", "running", "paused", "resetting", "shutdown"]
    echo_params = {p["name"]: p["required"] for p in methods["test.echo"]["params"]}
    assert echo_params["name"] is True and echo_params["count"] is False


def test_discover_includes_methods_added_later():
    vm, d = make()
    d.registry.add("example.set", lambda p: None,
                   {"type": "object", "properties": {"size_mib": {"type": "integer", "minimum": 0}},
                    "required": ["size_mib"], "additionalProperties": False},
                   {"type": "null"}, "Set the example target")
    names = [m["name"] for m in rpc(d, req("rpc.discover"))["result"]["methods"]]
    assert "example.set" in names
