"""`vmmd --incoming URI`: the destination of a live migration.

Before anything starts (prepare): listen, accept one source, negotiate the
protocol version, receive its configuration, apply the host-side overrides
(the same options as `vmmd --restore`), check it can run here (memory
layout, devices, overrides) and accept or refuse it -- a refusal is one
`vmmd: error:` line and exit status 2, no process started, no RAM moved.

Then the Machine starts the device processes while RAM arrives
(receive(), in a worker thread), restores the device states and the VM from
the state sections through the snapshot restore code, reports mig-ready with
the vCPUs parked, and resumes them on mig-go (finish()). If the stream is
bad, or the source goes away before mig-go, everything is torn down and vmmd
exits 2 with the reason: nothing of the guest ever ran here.
"""

from __future__ import annotations

import argparse
import logging
import socket
import time
from dataclasses import dataclass, field

from vmmd.config import ConfigError
from vmmd.guest_memory import GuestMemory, GuestMemoryError, MemoryLayout
from vmmd.migration import protocol as proto
from vmmd.migration import transport
from vmmd.snapshot import config_io
from vmmd.snapshot import restore as snaprestore
from vmmd.snapshot.format import SnapshotError

log = logging.getLogger(__name__)
PAGE = proto.PAGE
DEVICE_KINDS = {"lpc": "lpc", "virtio-blk": "virtio_blk", "virtio-net": "virtio_net",
                "virtio-balloon": "virtio_balloon"}


class IncomingError(SnapshotError):
    """Refused or failed incoming migration (vmmd exits 2 with it)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise ConfigError(message)


@dataclass
class IncomingRequest:
    uri: transport.Uri
    restore: snaprestore.RestoreRequest
    tls: transport.Tls | None = None
    accept_timeout: float | None = None


def parse_incoming_args(argv: list[str]) -> IncomingRequest:
    """--incoming URI, TLS options, and the restore command line's host-side overrides."""
    p = _Parser(prog="vmmd --incoming", allow_abbrev=False, add_help=False)
    p.add_argument("--incoming", required=True, metavar="URI")
    p.add_argument("--tls-cert")
    p.add_argument("--tls-key")
    p.add_argument("--tls-ca")
    p.add_argument("--insecure", action="store_true")
    p.add_argument("--accept-timeout")
    ns, rest = p.parse_known_args(argv)
    try:
        uri = transport.parse_uri(ns.incoming)
    except transport.TransportError as exc:
        raise ConfigError(str(exc)) from None
    tls_opts = (ns.tls_cert, ns.tls_key, ns.tls_ca)
    tls = None
    if any(tls_opts):
        if not all(tls_opts):
            raise ConfigError("--tls-cert, --tls-key and --tls-ca go together")
        if uri.scheme != "tcp":
            raise ConfigError("TLS options need a tcp: URI")
        tls = transport.Tls(*tls_opts)
    try:
        transport.check_security(uri, tls, ns.insecure)
    except transport.TransportError as exc:
        raise ConfigError(str(exc)) from None
    timeout = None
    if ns.accept_timeout is not None:
        try:
            timeout = float(ns.accept_timeout)
        except ValueError:
            raise ConfigError("--accept-timeout: expected seconds") from None
    # The rest is exactly restore's command line, with a placeholder for its DIR.
    req = snaprestore.parse_restore_args(["--restore", "-", *rest])
    return IncomingRequest(uri, req, tls, timeout)


@dataclass
class _Section:
    kind: str
    instance: str
    extra: dict = field(default_factory=dict)


class MigratedState:
    """The received sections, shaped like a LoadedSnapshot for the restore code."""

    def __init__(self, uri: str, sections: dict, device_kinds: dict):
        self.path = uri
        self.id = "migration"
        self._payloads = sections
        self.sections = [_Section(k, i, {"device_kind": device_kinds.get(i)} if k == "device" else {})
                         for (k, i) in sections]

    def payload(self, kind: str, instance: str):
        try:
            return self._payloads[(kind, instance)]
        except KeyError:
            raise SnapshotError(f"no {kind} section {instance!r}") from None


class Incoming:
    """The connection and receiver, from accept to mig-running."""

    def __init__(self, req: IncomingRequest, sock: socket.socket, receiver: proto.Receiver):
        self.req, self.sock, self.rx = req, sock, receiver
        self.prepared = None
        self.device_kinds: dict = {}
        self._rbuf: memoryview | None = None

    def _recv(self) -> memoryview:
        """What arrived, in a buffer reused by the next call (the receiver copies
        what it keeps: no fresh 4 MiB object, and its page faults, per call)."""
        if self._rbuf is None:
            self._rbuf = memoryview(bytearray(4 << 20))
        try:
            n = self.sock.recv_into(self._rbuf)
        except OSError as exc:
            raise IncomingError(f"incoming migration aborted: the source went away during the "
                                f"{self.rx.phase} phase ({exc})") from None
        return self._rbuf[:n]

    def _flush(self) -> None:
        out = self.rx.pending_output()
        if out:
            try:
                self.sock.sendall(out)
            except OSError as exc:
                raise IncomingError(self._why_closed(
                    f"incoming migration aborted: the source went away during the {self.rx.phase} phase "
                    f"({exc})")) from None

    def _why_closed(self, default: str) -> str:
        """The source's mig-cancel / mig-error if it sent one before closing."""
        try:
            self.sock.settimeout(0.5)
            while data := self.sock.recv(1 << 20):
                self.rx.feed(data)
        except proto.MigrationRefused as exc:
            return f"incoming migration aborted: {exc}"
        except (OSError, proto.MigrationProtocolError):
            pass
        return default

    def _events(self):
        """Events until the receiver stops for a decision; raises on EOF or a bad stream."""
        try:
            while True:
                events = self.rx.feed(b"")
                if not events:
                    data = self._recv()
                    if not data:
                        self.rx.end_of_stream()
                        continue
                    events = self.rx.feed(data)
                self._flush()  # replies the receiver made on the way (mig-hello)
                for ev in events:
                    yield ev
        except proto.MigrationProtocolError as exc:
            self._flush_quietly()
            raise IncomingError(f"incoming migration aborted: {exc}") from None

    def _flush_quietly(self) -> None:
        try:
            self._flush()
        except IncomingError:
            pass

    # -- before any process ---------------------------------------------------------
    def handshake(self) -> snaprestore.Prepared:
        for ev in self._events():
            if isinstance(ev, proto.Config):
                try:
                    prepared = self._check_config(ev)
                except (SnapshotError, ConfigError) as exc:
                    try:
                        self.rx.refuse(f"incompatible configuration: {exc}")
                    except proto.MigrationProtocolError:
                        pass
                    self._flush_quietly()
                    raise IncomingError(f"incoming migration refused: incompatible configuration: {exc}") \
                        from None
                self._flush()
                return prepared
        raise IncomingError("incoming migration: no configuration received")

    def _check_config(self, ev: proto.Config) -> snaprestore.Prepared:
        r = self.req.restore
        cfg = config_io.config_from_json(ev.config)
        scalars = {k: v for k, v in (("sandbox", r.sandbox), ("log_level", r.log_level),
                                     ("device_timeout", r.device_timeout)) if v is not None}
        scalars["api_socket"] = r.api_socket
        cfg = config_io.apply_overrides(cfg, disks=r.disks or {}, nets=r.nets or {},
                                        consoles=r.consoles or {}, scalars=scalars)
        for s in cfg.slots:
            if s.device not in DEVICE_KINDS and s.device != "hostbridge":
                raise IncomingError(f"device {s.device!r} in slot {s.slot} is not supported here")
        mem_doc = ev.memory
        if mem_doc.get("size") != cfg.memory or mem_doc.get("page_size") != PAGE:
            raise IncomingError(f"memory size {mem_doc.get('size')!r} does not match the configuration "
                                f"({cfg.memory})")
        try:
            layout = MemoryLayout.from_wire(mem_doc.get("layout"))
        except (GuestMemoryError, TypeError, ValueError) as exc:
            raise IncomingError(f"memory layout: {exc}") from None
        memory = GuestMemory.create(cfg.memory)
        if layout != memory.layout:
            memory.close()
            raise IncomingError("the source's memory layout differs from this vmmd's for that size")
        self.device_kinds = {f"{s.slot}.{s.function}": DEVICE_KINDS[s.device]
                             for s in cfg.slots if s.device in DEVICE_KINDS}
        self.rx.accept(memory.size // PAGE, cfg.cpus, self.device_kinds)
        placeholder = MigratedState(str(self.req.uri), {}, {})  # until the state arrives
        prepared = snaprestore.Prepared(cfg, [placeholder], memory, "advance", False, {"verify": 0, "ram": 0})
        prepared.incoming = self
        self.prepared = prepared
        return prepared

    # -- inside the Machine -----------------------------------------------------------
    async def receive(self, machine) -> None:
        """RAM passes and the machine state, in a worker thread (device processes
        start meanwhile)."""
        self.rx.devices_started()  # the source switches over only after this
        await machine.loop.run_in_executor(None, self._flush)
        state = await machine.loop.run_in_executor(None, self._receive_blocking, machine.memory)
        tip = MigratedState(str(self.req.uri), state.sections, self.device_kinds)
        snaprestore.check_sections(tip, self.prepared.cfg)
        self.prepared.chain = [tip]

    def _receive_blocking(self, memory) -> proto.StateComplete:
        view = memory._view
        t0 = time.monotonic()
        for ev in self._events():
            if isinstance(ev, proto.RamRun):
                off = ev.first_page * PAGE
                view[off:off + len(ev.data)] = ev.data
            elif isinstance(ev, proto.RamZero):
                off = ev.first_page * PAGE
                view[off:off + ev.count * PAGE] = bytes(ev.count * PAGE)
            elif isinstance(ev, proto.IterationEnd):
                log.debug("incoming: pass %d done", ev.iteration)
            elif isinstance(ev, proto.StateComplete):
                log.info("incoming: RAM and state received in %.1f ms (%d passes, %d RAM bytes)",
                         (time.monotonic() - t0) * 1000, self.rx.iterations, self.rx.ram_bytes)
                return ev
        raise IncomingError("incoming migration: stream ended")

    async def finish(self, machine) -> None:
        """mig-ready with the vCPUs parked; mig-go resumes them; mig-running."""
        self.rx.ready()
        loop = machine.loop
        await loop.run_in_executor(None, self._flush)
        await loop.run_in_executor(None, self._wait_go)
        from vmmd.snapshot import clock
        clock.kvmclock_ctrl_all(machine.vcpus)
        machine.control.resume()
        machine.state = "running"
        self.rx.running()
        try:
            self._flush()
        except IncomingError as exc:
            log.warning("mig-running not delivered (%s); the guest runs here", exc)
        self.sock.close()
        log.info("incoming migration from %s complete: the guest runs here", self.req.uri)

    def _wait_go(self) -> None:
        for ev in self._events():
            if isinstance(ev, proto.Go):
                return


def prepare_or_exit(argv: list[str]):
    """The whole pre-start part of `vmmd --incoming`: exit 2 with one line on failure."""
    import sys
    try:
        req = parse_incoming_args(argv)
        listener = transport.listen(req.uri)
    except (ConfigError, transport.TransportError) as exc:
        print(f"vmmd: error: {exc}", file=sys.stderr)
        sys.exit(2)
    try:
        print(f"vmmd: waiting for an incoming migration on {req.uri}", file=sys.stderr, flush=True)
        sock = transport.accept(listener, req.uri, req.tls, req.accept_timeout)
        inc = Incoming(req, sock, proto.Receiver())
        prepared = inc.handshake()
    except (transport.TransportError, SnapshotError, ConfigError) as exc:
        print(f"vmmd: error: {exc}", file=sys.stderr)
        sys.exit(2)
    finally:
        listener.close()
        if req.uri.scheme == "unix":
            import contextlib
            import os
            with contextlib.suppress(OSError):
                os.unlink(req.uri.path)
    prepared.timings["main_at"] = time.monotonic()
    return prepared.cfg, prepared
