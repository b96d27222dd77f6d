"""The live-migration protocol, sans-I/O (docs/migration.md).

Built on the snapshot section stream (vmmd/snapshot/stream.py): every
message is one of its records (kind, instance, version, length, SHA-256),
the machine state travels as the very sections a snapshot holds (decoded by
the same code, old versions upgraded, newer refused), RAM as its ram-run /
ram-zero records. This module adds the control records and the order:

    source -> destination                     destination -> source
    mig-hello {"versions": [..]}        ->
                                        <-    mig-hello {"version": v}  (or mig-error)
    mig-config {"config", "memory"}     ->
                                        <-    mig-accept {} (or mig-error: incompatible)
                                        <-    mig-prepared {}  (device processes up; any
                                              time during RAM: the source switches over after it)
    (ram-run | ram-zero)* mig-iter {"iteration": n}   ... repeated per pass
    vm, vcpu x N, device x D sections   ->    (after the vCPUs stopped)
    mig-end {"vcpus": N, "devices": [..]} ->
                                        <-    mig-ready {}  (state loaded, VM built, paused)
    mig-go {}                           ->
                                        <-    mig-running {}
    mig-cancel {"reason"} may come from the source at any point before mig-go.

Receiver (destination) treats its input as hostile: each record is checked
for its kind against the phase, RAM page numbers and counts against the
accepted memory size, each section's instance against the accepted
configuration (each exactly once), every JSON payload's shape. Anything
wrong raises MigrationProtocolError and the receiver stays failed. The
sender side (SourceReplies) checks the destination's replies the same way.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field

from vmmd.snapshot import format as fmt
from vmmd.snapshot import stream

PROTOCOL_VERSIONS = (1,)  # what this vmmd speaks, each side lists its own
PAGE = stream.PAGE
MAX_RUN_PAGES = 1024  # a ram-run carries at most 4 MiB (bounded record, bounded latency)

CONTROL_KINDS = {k: 1 for k in ("mig-hello", "mig-config", "mig-accept", "mig-prepared", "mig-error", "mig-iter",
                                "mig-end", "mig-ready", "mig-go", "mig-running", "mig-cancel")}
CONTROL_MAX = {k: 64 << 10 for k in CONTROL_KINDS}
CONTROL_MAX["mig-config"] = 1 << 20
# The stream's own RAM bound is 64 MiB; migration's runs are smaller.
LIMITS = {**CONTROL_MAX, "ram-run": 8 + MAX_RUN_PAGES * PAGE}
STATE_KINDS = ("vm", "vcpu", "device")


class MigrationProtocolError(Exception):
    """The one error a malformed, out-of-order, oversized or too new stream raises."""


class MigrationRefused(MigrationProtocolError):
    """The peer said no (mig-error) or cancelled (mig-cancel)."""


def control(kind: str, body: dict | None = None) -> bytes:
    payload = json.dumps(body or {}, sort_keys=True, separators=(",", ":")).encode()
    return stream.encode_record(kind, "mig", payload, kinds=CONTROL_KINDS, max_payload=LIMITS)


def ram_run(first_page: int, data) -> bytes:
    if not len(data) or len(data) % PAGE or len(data) // PAGE > MAX_RUN_PAGES:
        raise ValueError("a RAM run is 1..MAX_RUN_PAGES whole pages")
    return stream.encode_record("ram-run", "ram", struct.pack("<Q", first_page) + bytes(data),
                                kinds=CONTROL_KINDS, max_payload=LIMITS)


def ram_zero(first_page: int, count: int) -> bytes:
    return stream.encode_record("ram-zero", "ram", struct.pack("<QQ", first_page, count),
                                kinds=CONTROL_KINDS, max_payload=LIMITS)


def section(kind: str, instance: str, state: dict) -> bytes:
    """A vm/vcpu/device section: the exact bytes a snapshot file holds."""
    return stream.json_section_record(kind, instance, state)


def _body(rec: stream.Record) -> dict:
    try:
        body = json.loads(rec.payload)
    except (ValueError, UnicodeDecodeError):
        raise MigrationProtocolError(f"{rec.kind}: payload is not JSON") from None
    if not isinstance(body, dict):
        raise MigrationProtocolError(f"{rec.kind}: payload is not an object")
    return body


def negotiate(ours, theirs) -> int:
    """The highest version both sides list."""
    if not isinstance(theirs, list) or not theirs or len(theirs) > 64 or \
            not all(type(v) is int and v > 0 for v in theirs):
        raise MigrationProtocolError(f"bad version list {theirs!r}")
    common = set(ours) & set(theirs)
    if not common:
        raise MigrationProtocolError(f"no common migration protocol version: the source speaks "
                                     f"{sorted(theirs)}, this vmmd {sorted(ours)}")
    return max(common)


# -- events the receiver hands to its I/O loop -------------------------------------------
@dataclass(frozen=True)
class Config:
    config: dict
    memory: dict


@dataclass(frozen=True)
class RamRun:
    first_page: int
    data: memoryview


@dataclass(frozen=True)
class RamZero:
    first_page: int
    count: int


@dataclass(frozen=True)
class IterationEnd:
    iteration: int


@dataclass
class StateComplete:
    sections: dict = field(default_factory=dict)  # (kind, instance) -> decoded state


@dataclass(frozen=True)
class Go:
    pass


class Receiver:
    """The destination's state machine. feed(bytes) -> events; pending_output()
    -> bytes to send to the source. Phases:

      hello -> config -> (accept() / refuse()) -> ram -> state -> ready
            -> (ready() sent) -> go -> done
    """

    def __init__(self, versions=PROTOCOL_VERSIONS):
        self.versions = tuple(versions)
        self.phase = "hello"
        self.version: int | None = None
        self._dec = stream.RecordDecoder(kinds=CONTROL_KINDS, max_payload=LIMITS)
        self._out = bytearray()
        self._failed: MigrationProtocolError | None = None
        self.pages = 0
        self.vcpus = 0
        self.devices: frozenset = frozenset()
        self._sections: dict = {}
        self._backlog: list = []
        self._prepared_sent = False
        self.iterations = 0
        self.ram_bytes = 0

    # -- output ---------------------------------------------------------------------
    def pending_output(self) -> bytes:
        out, self._out = bytes(self._out), bytearray()
        return out

    def accept(self, pages: int, vcpus: int, devices) -> None:
        """The I/O loop checked the configuration: RAM of `pages` pages, `vcpus`
        vCPU sections and these device instances ("slot.function") are expected."""
        if self.phase != "config-check":
            raise MigrationProtocolError(f"accept() in phase {self.phase}")
        if not 0 < pages <= (1 << 40) // PAGE or not 0 < vcpus <= 1024:
            raise MigrationProtocolError(f"bad memory ({pages} pages) or vCPU count ({vcpus})")
        self.pages, self.vcpus, self.devices = pages, vcpus, frozenset(devices)
        self.phase = "ram"
        self._out += control("mig-accept")

    def devices_started(self) -> None:
        """The destination's device processes run: the source may switch over."""
        if self.phase not in ("ram", "state") or self._prepared_sent:
            raise MigrationProtocolError(f"devices_started() in phase {self.phase}")
        self._prepared_sent = True
        self._out += control("mig-prepared")

    def refuse(self, message: str) -> None:
        self._out += control("mig-error", {"message": message[:4000]})
        self._fail(message)

    def ready(self) -> None:
        """The VM is rebuilt from the state (paused): ask the source for the go."""
        if self.phase != "loaded" or not self._prepared_sent:
            raise MigrationProtocolError(f"ready() in phase {self.phase}")
        self.phase = "ready"
        self._out += control("mig-ready")

    def running(self) -> None:
        if self.phase != "go":
            raise MigrationProtocolError(f"running() in phase {self.phase}")
        self.phase = "done"
        self._out += control("mig-running")

    # -- input ----------------------------------------------------------------------
    def _fail(self, why: str):
        self._failed = MigrationProtocolError(why)
        self.phase = "failed"
        raise self._failed

    def feed(self, data: bytes) -> list:
        if self._failed:
            raise self._failed
        try:
            self._backlog.extend(self._dec.feed(data))
        except stream.StreamError as exc:
            self._fail(str(exc))
        events = []
        # Stop at a decision the I/O loop must take (accept the configuration,
        # report the VM ready); feed(b"") after it goes on with what is queued.
        while self._backlog and self.phase not in ("config-check", "loaded"):
            ev = self._record(self._backlog.pop(0))
            if ev is not None:
                events.append(ev)
        return events

    def end_of_stream(self) -> None:
        """The source closed the connection: fine only once the go was received."""
        if self.phase in ("go", "done"):
            return
        if self._backlog and self.phase not in ("config-check", "loaded"):
            self.feed(b"")
        self._fail(f"the source closed the connection during the {self.phase} phase"
                   + (" (truncated record)" if self._dec.pending else ""))

    def _record(self, rec: stream.Record):
        kind, phase = rec.kind, self.phase
        if kind == "mig-cancel":
            reason = _body(rec).get("reason")
            self._failed = MigrationRefused(f"the source cancelled the migration: {str(reason)[:200]}")
            self.phase = "failed"
            raise self._failed
        if rec.version != CONTROL_KINDS.get(kind, rec.version) and kind.startswith("mig-"):
            self._fail(f"{kind} record version {rec.version}")
        if phase == "hello":
            if kind != "mig-hello":
                self._fail(f"expected mig-hello, got {kind}")
            try:
                self.version = negotiate(self.versions, _body(rec).get("versions"))
            except MigrationProtocolError as exc:
                self._out += control("mig-error", {"message": str(exc)})
                self._fail(str(exc))
            self._out += control("mig-hello", {"version": self.version, "versions": list(self.versions)})
            self.phase = "config"
            return None
        if phase == "config":
            if kind != "mig-config":
                self._fail(f"expected mig-config, got {kind}")
            body = _body(rec)
            if not isinstance(body.get("config"), dict) or not isinstance(body.get("memory"), dict):
                self._fail("mig-config needs config and memory objects")
            self.phase = "config-check"
            return Config(body["config"], body["memory"])
        if phase == "ram":
            if kind == "ram-run":
                return self._ram_run(rec)
            if kind == "ram-zero":
                return self._ram_zero(rec)
            if kind == "mig-iter":
                n = _body(rec).get("iteration")
                if type(n) is not int or n != self.iterations + 1:
                    self._fail(f"mig-iter {n!r} out of order (expected {self.iterations + 1})")
                self.iterations = n
                return IterationEnd(n)
            if kind in STATE_KINDS:
                self.phase = "state"
                return self._state(rec)
            self._fail(f"{kind} record during RAM transfer")
        if phase == "state":
            if kind in STATE_KINDS:
                return self._state(rec)
            if kind == "mig-end":
                return self._end(rec)
            self._fail(f"{kind} record among the machine state sections")
        if phase == "ready":
            if kind != "mig-go":
                self._fail(f"expected mig-go, got {kind}")
            self.phase = "go"
            return Go()
        self._fail(f"unexpected {kind} record in phase {phase}")

    def _ram_run(self, rec):
        if rec.instance != "ram":
            self._fail("ram-run instance must be 'ram'")
        try:
            first, data = stream.decode_ram_run(rec, self.pages)
        except stream.StreamError as exc:
            self._fail(str(exc))
        self.ram_bytes += len(data)
        return RamRun(first, data)

    def _ram_zero(self, rec):
        if rec.instance != "ram" or len(rec.payload) != 16:
            self._fail("malformed ram-zero record")
        first, count = struct.unpack("<QQ", rec.payload)
        if count == 0 or first >= self.pages or count > self.pages - first:
            self._fail(f"ram-zero {first}+{count} is outside guest RAM ({self.pages} pages)")
        return RamZero(first, count)

    def _state(self, rec):
        key = (rec.kind, rec.instance)
        if rec.kind == "vm":
            ok = rec.instance == "vm"
        elif rec.kind == "vcpu":
            ok = rec.instance.isdigit() and str(int(rec.instance)) == rec.instance and int(rec.instance) < self.vcpus
        else:
            ok = rec.instance in self.devices
        if not ok:
            self._fail(f"{rec.kind} section {rec.instance!r} does not belong to the accepted configuration")
        if key in self._sections:
            self._fail(f"{rec.kind} section {rec.instance!r} sent twice")
        try:
            self._sections[key] = stream.decode_json_record(rec)
        except fmt.SnapshotError as exc:
            self._fail(f"{rec.kind} section {rec.instance}: {exc}")
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            self._fail(f"{rec.kind} section {rec.instance}: malformed ({exc})")
        return None

    def _end(self, rec):
        _body(rec)
        want = {("vm", "vm")} | {("vcpu", str(i)) for i in range(self.vcpus)} | \
            {("device", d) for d in self.devices}
        if set(self._sections) != want:
            missing = sorted(want - set(self._sections))
            self._fail(f"mig-end before every section arrived (missing {missing})")
        self.phase = "loaded"
        return StateComplete(dict(self._sections))


class SourceReplies:
    """The source's view of the destination's replies, checked in order:
    mig-hello, mig-accept, mig-prepared, mig-ready, mig-running (mig-error any time)."""

    ORDER = ("mig-hello", "mig-accept", "mig-prepared", "mig-ready", "mig-running")

    def __init__(self, versions=PROTOCOL_VERSIONS):
        self.versions = tuple(versions)
        self._dec = stream.RecordDecoder(kinds=CONTROL_KINDS, max_payload=LIMITS)
        self._next = 0
        self.version: int | None = None

    def hello(self) -> bytes:
        return control("mig-hello", {"versions": list(self.versions)})

    @property
    def expecting(self) -> str | None:
        return self.ORDER[self._next] if self._next < len(self.ORDER) else None

    def feed(self, data: bytes) -> list[str]:
        try:
            records = self._dec.feed(data)
        except stream.StreamError as exc:
            raise MigrationProtocolError(f"destination: {exc}") from None
        got = []
        for rec in records:
            if rec.kind == "mig-error":
                msg = _body(rec).get("message")
                raise MigrationRefused(f"the destination refused: {str(msg)[:2000]}")
            if rec.kind != self.expecting:
                raise MigrationProtocolError(f"destination sent {rec.kind}, expected {self.expecting}")
            if rec.kind == "mig-hello":
                v = _body(rec).get("version")
                if v not in self.versions:
                    raise MigrationProtocolError(f"destination chose protocol version {v!r}, "
                                                 f"not one of {list(self.versions)}")
                self.version = v
            self._next += 1
            got.append(rec.kind)
        return got
