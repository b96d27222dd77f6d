"""JSON-RPC 2.0, sans-I/O: a method registry and a dispatcher (bytes in, bytes out).

Nothing here touches a socket; vmmd.api.server feeds lines in and writes the
answers back. Params are validated against a small JSON-Schema subset before a
handler runs, so handlers can trust the shape of what they get.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Iterator

log = logging.getLogger(__name__)

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603
VM_STATE_ERROR = -32000  # the VM's state forbids the call
NO_SUCH_DEVICE = -32001
LIMIT_EXCEEDED = -32002  # a control-socket limit (connections, reply size, idle time)

Handler = Callable[[dict[str, Any]], Awaitable[Any] | Any]


class ApiError(Exception):
    """Raised by a handler to return a JSON-RPC error object to the caller."""

    def __init__(self, code: int, message: str, data: Any = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.data = data


class SchemaError(ValueError):
    """A value (or a schema itself) does not fit the supported schema subset."""


# ---------------------------------------------------------------------------
# JSON-Schema subset

_TYPES = ("object", "string", "integer", "number", "boolean", "array", "null")
_KEYWORDS = frozenset({
    "type", "properties", "required", "additionalProperties", "enum",
    "minimum", "maximum", "minLength", "maxLength", "items",
    # documentation only
    "description", "title", "default", "examples",
})


def _type_of(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):  # before int: bool is an int subclass
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def check_schema(schema: dict, where: str = "schema") -> None:
    """Reject schemas using keywords validate() would silently ignore."""
    if not isinstance(schema, dict):
        raise SchemaError(f"{where}: must be an object")
    unknown = set(schema) - _KEYWORDS
    if unknown:
        raise SchemaError(f"{where}: unsupported keyword(s) {sorted(unknown)}")
    t = schema.get("type")
    for one in ([t] if isinstance(t, str) else t if isinstance(t, list) else [t]):
        if one is not None and one not in _TYPES:
            raise SchemaError(f"{where}: unknown type {one!r}")
    for name, sub in schema.get("properties", {}).items():
        check_schema(sub, f"{where}.properties.{name}")
    if "items" in schema:
        check_schema(schema["items"], f"{where}.items")
    ap = schema.get("additionalProperties", True)
    if not isinstance(ap, bool):
        raise SchemaError(f"{where}: additionalProperties must be true or false")
    for name in schema.get("required", ()):
        if name not in schema.get("properties", {}):
            raise SchemaError(f"{where}: required {name!r} is not a property")


def validate(schema: dict, value: Any, path: str = "params") -> None:
    """Raise SchemaError naming the offending field if value does not fit schema."""
    want = schema.get("type")
    got = _type_of(value)
    if want is not None:
        wanted = [want] if isinstance(want, str) else want
        if got not in wanted and not (got == "integer" and "number" in wanted):
            raise SchemaError(f"{path}: expected {' or '.join(wanted)}, got {got}")
    if "enum" in schema and value not in schema["enum"]:
        choices = ", ".join(json.dumps(c) for c in schema["enum"])
        raise SchemaError(f"{path}: must be one of {choices}")
    if got == "number" and not math.isfinite(value):   # 1e400 parses as inf
        raise SchemaError(f"{path}: number out of range")
    if got in ("integer", "number"):
        if "minimum" in schema and value < schema["minimum"]:
            raise SchemaError(f"{path}: must be >= {schema['minimum']}")
        if "maximum" in schema and value > schema["maximum"]:
            raise SchemaError(f"{path}: must be <= {schema['maximum']}")
    if got == "string":
        if "minLength" in schema and len(value) < schema["minLength"]:
            raise SchemaError(f"{path}: must be at least {schema['minLength']} characters")
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            raise SchemaError(f"{path}: must be at most {schema['maxLength']} characters")
    if got == "array" and "items" in schema:
        for i, item in enumerate(value):
            validate(schema["items"], item, f"{path}[{i}]")
    if got == "object":
        props = schema.get("properties", {})
        for name in schema.get("required", ()):
            if name not in value:
                raise SchemaError(f"{path}.{name}: required")
        for name, item in value.items():
            if name in props:
                validate(props[name], item, f"{path}.{name}")
            elif schema.get("additionalProperties", True) is False:
                raise SchemaError(f"{path}.{name}: unknown field")


# ---------------------------------------------------------------------------
# Registry

EMPTY_PARAMS: dict = {"type": "object", "properties": {}, "additionalProperties": False}


@dataclass(frozen=True)
class Method:
    name: str
    handler: Handler
    params_schema: dict = field(default_factory=lambda: dict(EMPTY_PARAMS))
    result_schema: dict = field(default_factory=dict)
    summary: str = ""


class Registry:
    """Named methods. Other modules add theirs with registry.add(...)."""

    def __init__(self) -> None:
        self._methods: dict[str, Method] = {}

    def add(self, name: str, handler: Handler, params_schema: dict | None = None,
            result_schema: dict | None = None, summary: str = "") -> Method:
        """Register handler(params: dict) -> result (sync or async) under name."""
        if not isinstance(name, str) or not name:
            raise ValueError("method name must be a non-empty string")
        if name in self._methods:
            raise ValueError(f"method {name!r} is already registered")
        params_schema = dict(EMPTY_PARAMS) if params_schema is None else params_schema
        if params_schema.get("type") != "object":
            raise SchemaError(f"{name}: params schema must have type object")
        check_schema(params_schema, f"{name}.params")
        result_schema = {} if result_schema is None else result_schema
        check_schema(result_schema, f"{name}.result")
        method = Method(name, handler, params_schema, result_schema, summary)
        self._methods[name] = method
        return method

    def get(self, name: str) -> Method | None:
        return self._methods.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._methods

    def __iter__(self) -> Iterator[Method]:
        return iter(list(self._methods.values()))

    def __len__(self) -> int:
        return len(self._methods)


# ---------------------------------------------------------------------------
# Dispatcher

_NO_ID = object()  # marks a notification (no "id" member at all)


def encode(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), allow_nan=False).encode()


def error_object(code: int, message: str, id: Any = None, data: Any = None) -> dict:
    err: dict[str, Any] = {"code": code, "message": message}
    if data is not None:
        err["data"] = data
    return {"jsonrpc": "2.0", "error": err, "id": id}


def error_response(code: int, message: str, id: Any = None, data: Any = None) -> bytes:
    """Encoded error response, e.g. for the server's 'line too long'."""
    return encode(error_object(code, message, id, data))


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


ID_INT_MIN, ID_INT_MAX = -(1 << 63), (1 << 64) - 1   # ids any client can hold and compare


def _valid_id(value: Any) -> bool:
    """An id we can echo exactly: a string, null, a finite number, an int of at most 64 bits."""
    if value is None or isinstance(value, str):
        return True
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return ID_INT_MIN <= value <= ID_INT_MAX
    return isinstance(value, float) and math.isfinite(value)


def decode(raw: bytes) -> Any:
    """One line -> a JSON value; ValueError for anything that is not UTF-8 JSON text
    (json.loads on bytes would also take UTF-16/32, which this socket does not speak)."""
    text = raw.decode("utf-8")       # strict: UnicodeDecodeError is a ValueError
    if text.startswith("\ufeff"):
        raise ValueError("byte order mark")
    return json.loads(text, parse_constant=_reject_constant)


DEFAULT_MAX_BATCH = 64
DEFAULT_MAX_REPLY = 4 << 20


class Dispatcher:
    """max_batch: members one batch may have; max_reply: bytes one response line may
    take (a member's answer that would cross it becomes an error object instead)."""

    def __init__(self, registry: Registry, *, max_batch: int = DEFAULT_MAX_BATCH,
                 max_reply: int = DEFAULT_MAX_REPLY):
        self.registry = registry
        self.max_batch = max_batch
        self.max_reply = max_reply

    async def handle(self, raw: bytes) -> bytes | None:
        """One JSON-RPC message (single or batch) in, the response out (None: no response)."""
        try:
            msg = decode(raw)
        except (ValueError, RecursionError) as exc:  # includes UnicodeDecodeError
            return error_response(PARSE_ERROR, f"Parse error: {str(exc)[:200]}")
        if isinstance(msg, list):
            if not msg:
                return error_response(INVALID_REQUEST, "Invalid Request: empty batch")
            if len(msg) > self.max_batch:
                return error_response(INVALID_REQUEST, f"Invalid Request: batch of {len(msg)} "
                                      f"requests (at most {self.max_batch})")
            # Sequential on purpose: a batch like [pause, reset] must run in order.
            out: list[bytes] = []
            room = self.max_reply - 2          # the brackets
            for m in msg:
                r = await self._one(m, room)
                if r is not None:
                    out.append(r)
                    room -= len(r) + 1
            return b"[" + b",".join(out) + b"]" if out else None
        return await self._one(msg, self.max_reply)

    async def _one(self, msg: Any, room: int) -> bytes | None:
        response = await self._respond(msg)
        if response is None:
            return None
        try:
            out = encode(response)
        except (TypeError, ValueError, RecursionError):
            log.exception("result of %r is not JSON-serializable", msg.get("method"))
            return encode(error_object(INTERNAL_ERROR, "Internal error", response.get("id")))
        if len(out) > room:
            return encode(error_object(LIMIT_EXCEEDED, f"Reply too large: {len(out)} bytes "
                                       f"(at most {self.max_reply} per response line)",
                                       response.get("id")))
        return out

    async def _respond(self, msg: Any) -> dict | None:
        if not isinstance(msg, dict):
            return error_object(INVALID_REQUEST, "Invalid Request: not an object")
        rid = msg.get("id", _NO_ID)
        echo_id = rid if rid is not _NO_ID and _valid_id(rid) else None
        if msg.get("jsonrpc") != "2.0":
            return error_object(INVALID_REQUEST, 'Invalid Request: "jsonrpc" must be "2.0"', echo_id)
        if rid is not _NO_ID and not _valid_id(rid):
            return error_object(INVALID_REQUEST, 'Invalid Request: "id" must be a string, a finite '
                                'number (integers of at most 64 bits) or null')
        name = msg.get("method")
        if not isinstance(name, str):
            return error_object(INVALID_REQUEST, 'Invalid Request: "method" must be a string', echo_id)
        params = msg.get("params", {})
        if not isinstance(params, (dict, list)):
            return error_object(INVALID_REQUEST, 'Invalid Request: "params" must be an object or array', echo_id)

        notification = rid is _NO_ID
        try:
            result = await self._call(name, params)
        except ApiError as exc:
            if notification:
                log.info("notification %s failed: %s", name, exc.message)
                return None
            return error_object(exc.code, exc.message, rid, exc.data)
        except Exception:
            log.exception("method %s raised", name)
            return None if notification else error_object(INTERNAL_ERROR, "Internal error", rid)
        return None if notification else {"jsonrpc": "2.0", "result": result, "id": rid}

    async def _call(self, name: str, params: dict | list) -> Any:
        method = self.registry.get(name)
        if method is None:
            raise ApiError(METHOD_NOT_FOUND, f"Method not found: {name}")
        if isinstance(params, list):
            if params:  # methods take named params only; [] is as good as {}
                raise ApiError(INVALID_PARAMS, "Invalid params: params must be an object (by-name)")
            params = {}
        try:
            validate(method.params_schema, params)
        except SchemaError as exc:
            raise ApiError(INVALID_PARAMS, f"Invalid params: {exc}") from None
        result = method.handler(params)
        if inspect.isawaitable(result):
            result = await result
        return result
