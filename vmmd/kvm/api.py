"""Thin wrappers over the KVM ioctls: Kvm (/dev/kvm), Vm and Vcpu.

One method per ioctl, no policy. Kernel failures raise KvmError (an OSError
carrying errno and the ioctl's name); arguments that cannot be encoded raise
TypeError (not an int) or ValueError (out of range) before any system call,
because ctypes would otherwise truncate them silently.

Every ioctl goes through libc's ioctl via ctypes, which releases the GIL for
the duration of the call (so a vCPU thread blocked in KVM_RUN does not stall
the rest of the process) and does not retry on EINTR (so a signal kick makes
KVM_RUN return).
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from vmmd.kvm import abi

__all__ = ["KvmError", "Kvm", "Vm", "Vcpu", "IrqchipRoute", "MsiRoute"]

_libc = ctypes.CDLL(None, use_errno=True)
_sys_ioctl = _libc.ioctl
_sys_ioctl.restype = ctypes.c_int
# The third argument is a pointer (byref of a struct) or a plain integer.
_sys_ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]


class KvmError(OSError):
    """A KVM ioctl (or opening /dev/kvm) failed. `.errno` is the kernel's error,
    `.request` the ioctl name."""

    def __init__(self, err: int, request: str, detail: str | None = None):
        text = f"{request}: {os.strerror(err)}"
        if detail:
            text += f" ({detail})"
        super().__init__(err, text)
        self.request = request


def _ioctl(fd: int, request: str, arg: object = 0) -> int:
    """Issue the ioctl named `request` (a name in abi); returns its result."""
    if not isinstance(arg, int):
        arg = ctypes.byref(arg)  # a ctypes object the kernel reads or fills
    ret = _sys_ioctl(fd, getattr(abi, request), arg)
    if ret < 0:
        raise KvmError(ctypes.get_errno(), request)
    return ret


def _uint(value: object, bits: int, what: str) -> int:
    """Check that value fits an unsigned field of `bits` bits."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{what} must be an int, got {type(value).__name__}")
    if not 0 <= value < (1 << bits):
        raise ValueError(f"{what}={value:#x} does not fit in u{bits}")
    return value


def _check_type(value: object, cls: type, what: str) -> None:
    if not isinstance(value, cls):
        raise TypeError(f"{what} must be abi.{cls.__name__}, got {type(value).__name__}")


_CPUID_UNUSED = 0xFFFFFFFF  # no CPUID leaf has this function and index


def _copy(struct: ctypes.Structure) -> ctypes.Structure:
    """An independent copy of a ctypes structure (not sharing its buffer)."""
    return type(struct).from_buffer_copy(struct)


class _FdOwner:
    """Owns one file descriptor; closing is idempotent."""

    _fd: int

    def __init__(self, fd: int):
        self._fd = fd

    @property
    def fd(self) -> int:
        return self._fd

    def fileno(self) -> int:
        return self._fd

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def close(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


# ---------------------------------------------------------------------------
# GSI routes for Vm.set_gsi_routing
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class IrqchipRoute:
    """GSI -> pin of an in-kernel interrupt controller (abi.KVM_IRQCHIP_*)."""

    gsi: int
    chip: int
    pin: int


@dataclass(frozen=True)
class MsiRoute:
    """GSI -> MSI message (address, data), e.g. for an irqfd."""

    gsi: int
    address: int
    data: int
    devid: int | None = None  # only with KVM_CAP_MSI_DEVID


def _route_from(item: IrqchipRoute | MsiRoute | tuple) -> IrqchipRoute | MsiRoute:
    if isinstance(item, (IrqchipRoute, MsiRoute)):
        return item
    if isinstance(item, tuple) and item:
        kind, *rest = item
        if kind == "irqchip" and len(rest) == 3:
            return IrqchipRoute(*rest)
        if kind == "msi" and len(rest) in (3, 4):
            return MsiRoute(*rest)
    raise ValueError(
        f"bad GSI route {item!r}: want IrqchipRoute, MsiRoute, "
        "('irqchip', gsi, chip, pin) or ('msi', gsi, address, data)"
    )


def _fill_route(entry: abi.kvm_irq_routing_entry, route: IrqchipRoute | MsiRoute) -> None:
    entry.gsi = _uint(route.gsi, 32, "gsi")
    if isinstance(route, IrqchipRoute):
        entry.type = abi.KVM_IRQ_ROUTING_IRQCHIP
        entry.u.irqchip.irqchip = _uint(route.chip, 32, "chip")
        entry.u.irqchip.pin = _uint(route.pin, 32, "pin")
        return
    entry.type = abi.KVM_IRQ_ROUTING_MSI
    address = _uint(route.address, 64, "MSI address")
    entry.u.msi.address_lo = address & 0xFFFFFFFF
    entry.u.msi.address_hi = address >> 32
    entry.u.msi.data = _uint(route.data, 32, "MSI data")
    if route.devid is not None:
        entry.flags = abi.KVM_MSI_VALID_DEVID
        entry.u.msi.devid = _uint(route.devid, 32, "MSI devid")


# ---------------------------------------------------------------------------
# /dev/kvm
# ---------------------------------------------------------------------------


class Kvm(_FdOwner):
    """The /dev/kvm system fd."""

    def __init__(self, path: str = "/dev/kvm"):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise KvmError(exc.errno or errno.EIO, f"open {path}") from exc
        super().__init__(fd)

    def api_version(self) -> int:
        return _ioctl(self._fd, "KVM_GET_API_VERSION")

    def check_extension(self, cap: int) -> int:
        """0 if unsupported, else a positive (sometimes meaningful) value."""
        return _ioctl(self._fd, "KVM_CHECK_EXTENSION", _uint(cap, 32, "cap"))

    def vcpu_mmap_size(self) -> int:
        return _ioctl(self._fd, "KVM_GET_VCPU_MMAP_SIZE")

    def supported_cpuid(self, max_entries: int = 256) -> list[abi.kvm_cpuid_entry2]:
        """KVM_GET_SUPPORTED_CPUID; KvmError(E2BIG) if max_entries is too small."""
        return self._cpuid("KVM_GET_SUPPORTED_CPUID", max_entries)

    def emulated_cpuid(self, max_entries: int = 256) -> list[abi.kvm_cpuid_entry2]:
        return self._cpuid("KVM_GET_EMULATED_CPUID", max_entries)

    def _cpuid(self, request: str, max_entries: int) -> list[abi.kvm_cpuid_entry2]:
        buf = abi.kvm_cpuid2_of(_uint(max_entries, 16, "max_entries"))
        _ioctl(self._fd, request, buf)
        return [_copy(buf.entries[i]) for i in range(buf.nent)]

    def msr_index_list(self) -> list[int]:
        """MSR indices KVM saves/restores (KVM_GET_MSR_INDEX_LIST)."""
        return self._msr_list("KVM_GET_MSR_INDEX_LIST")

    def msr_feature_index_list(self) -> list[int]:
        return self._msr_list("KVM_GET_MSR_FEATURE_INDEX_LIST")

    def _msr_list(self, request: str) -> list[int]:
        # Ask with room for nothing: the kernel answers E2BIG and writes the
        # count it needs into nmsrs.
        probe = abi.kvm_msr_list_of(0)
        try:
            _ioctl(self._fd, request, probe)
        except KvmError as exc:
            if exc.errno != errno.E2BIG:
                raise
        buf = abi.kvm_msr_list_of(probe.nmsrs)
        _ioctl(self._fd, request, buf)
        return list(buf.indices[: buf.nmsrs])

    def create_vm(self, machine_type: int = 0) -> Vm:
        fd = _ioctl(self._fd, "KVM_CREATE_VM", _uint(machine_type, 32, "machine_type"))
        try:
            return Vm(fd, self.vcpu_mmap_size())
        except BaseException:
            os.close(fd)
            raise


# ---------------------------------------------------------------------------
# VM
# ---------------------------------------------------------------------------


class Vm(_FdOwner):
    """A VM fd (from Kvm.create_vm)."""

    def __init__(self, fd: int, vcpu_mmap_size: int):
        super().__init__(fd)
        self._vcpu_mmap_size = vcpu_mmap_size

    def check_extension(self, cap: int) -> int:
        """VM-level KVM_CHECK_EXTENSION (KVM_CAP_CHECK_EXTENSION_VM)."""
        return _ioctl(self._fd, "KVM_CHECK_EXTENSION", _uint(cap, 32, "cap"))

    def enable_cap(self, cap: int, args: Sequence[int] = (), flags: int = 0) -> int:
        return _ioctl(self._fd, "KVM_ENABLE_CAP", _enable_cap_struct(cap, args, flags))

    def create_vcpu(self, index: int) -> Vcpu:
        fd = _ioctl(self._fd, "KVM_CREATE_VCPU", _uint(index, 32, "vcpu index"))
        try:
            return Vcpu(fd, index, self._vcpu_mmap_size)
        except BaseException:
            os.close(fd)
            raise

    # -- memory -------------------------------------------------------------

    def set_user_memory_region(
        self, slot: int, gpa: int, size: int, host_addr: int, flags: int = 0
    ) -> None:
        """Map (size > 0) or delete (size == 0) memory slot `slot`."""
        region = abi.kvm_userspace_memory_region(
            slot=_uint(slot, 32, "slot"),
            flags=_uint(flags, 32, "flags"),
            guest_phys_addr=_uint(gpa, 64, "gpa"),
            memory_size=_uint(size, 64, "size"),
            userspace_addr=_uint(host_addr, 64, "host_addr"),
        )
        _ioctl(self._fd, "KVM_SET_USER_MEMORY_REGION", region)

    def set_tss_addr(self, addr: int) -> None:
        _ioctl(self._fd, "KVM_SET_TSS_ADDR", _uint(addr, 32, "TSS address"))

    def set_identity_map_addr(self, addr: int) -> None:
        _ioctl(self._fd, "KVM_SET_IDENTITY_MAP_ADDR", ctypes.c_uint64(_uint(addr, 64, "address")))

    def get_dirty_log(self, slot: int, npages: int) -> bytes:
        """Dirty bitmap of `slot` (bit n = page n), one u64 per 64 pages.
        Without manual protect this also resets the log."""
        bitmap = (ctypes.c_uint8 * _bitmap_bytes(npages))()
        log = abi.kvm_dirty_log(slot=_uint(slot, 32, "slot"), dirty_bitmap=ctypes.addressof(bitmap))
        _ioctl(self._fd, "KVM_GET_DIRTY_LOG", log)
        return bytes(bitmap)

    def clear_dirty_log(self, slot: int, first_page: int, num_pages: int, bitmap: bytes) -> None:
        """Re-protect the pages whose bits are set in `bitmap` (bit 0 =
        first_page). Needs KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 enabled;
        first_page must be a multiple of 64."""
        _uint(num_pages, 32, "num_pages")
        data = bytes(bitmap)
        if len(data) * 8 < num_pages:
            raise ValueError(f"bitmap of {len(data)} bytes is too short for {num_pages} pages")
        buf = (ctypes.c_uint8 * _bitmap_bytes(num_pages))()
        ctypes.memmove(buf, data, min(len(data), len(buf)))
        clear = abi.kvm_clear_dirty_log(
            slot=_uint(slot, 32, "slot"),
            num_pages=num_pages,
            first_page=_uint(first_page, 64, "first_page"),
            dirty_bitmap=ctypes.addressof(buf),
        )
        _ioctl(self._fd, "KVM_CLEAR_DIRTY_LOG", clear)

    # -- clock ----------------------------------------------------------------

    def get_clock(self) -> abi.kvm_clock_data:
        data = abi.kvm_clock_data()
        _ioctl(self._fd, "KVM_GET_CLOCK", data)
        return data

    def set_clock(self, data: abi.kvm_clock_data) -> None:
        _check_type(data, abi.kvm_clock_data, "clock data")
        _ioctl(self._fd, "KVM_SET_CLOCK", data)

    # -- in-kernel interrupt controllers and PIT ------------------------------

    def create_irqchip(self) -> None:
        _ioctl(self._fd, "KVM_CREATE_IRQCHIP")

    def get_irqchip(self, chip_id: int) -> abi.kvm_irqchip:
        chip = abi.kvm_irqchip(chip_id=_uint(chip_id, 32, "chip_id"))
        _ioctl(self._fd, "KVM_GET_IRQCHIP", chip)
        return chip

    def set_irqchip(self, chip: abi.kvm_irqchip) -> None:
        _check_type(chip, abi.kvm_irqchip, "irqchip")
        _ioctl(self._fd, "KVM_SET_IRQCHIP", chip)

    def create_pit2(self, flags: int = 0) -> None:
        _ioctl(self._fd, "KVM_CREATE_PIT2", abi.kvm_pit_config(flags=_uint(flags, 32, "flags")))

    def get_pit2(self) -> abi.kvm_pit_state2:
        state = abi.kvm_pit_state2()
        _ioctl(self._fd, "KVM_GET_PIT2", state)
        return state

    def set_pit2(self, state: abi.kvm_pit_state2) -> None:
        _check_type(state, abi.kvm_pit_state2, "PIT state")
        _ioctl(self._fd, "KVM_SET_PIT2", state)

    def irq_line(self, gsi: int, level: int | bool) -> None:
        line = abi.kvm_irq_level(irq=_uint(gsi, 32, "gsi"), level=1 if level else 0)
        _ioctl(self._fd, "KVM_IRQ_LINE", line)

    def set_gsi_routing(self, entries: Iterable[IrqchipRoute | MsiRoute | tuple]) -> None:
        """Replace the whole GSI routing table."""
        routes = [_route_from(item) for item in entries]
        table = abi.kvm_irq_routing_of(len(routes))
        for entry, route in zip(table.entries, routes):
            _fill_route(entry, route)
        _ioctl(self._fd, "KVM_SET_GSI_ROUTING", table)

    def irqfd(
        self, fd: int, gsi: int, resample_fd: int | None = None, deassign: bool = False
    ) -> None:
        """Writing to eventfd `fd` raises `gsi`. With resample_fd the GSI is
        level-triggered: KVM lowers it on guest EOI and signals resample_fd."""
        irqfd = abi.kvm_irqfd(fd=_uint(fd, 31, "fd"), gsi=_uint(gsi, 32, "gsi"))
        if deassign:
            irqfd.flags |= abi.KVM_IRQFD_FLAG_DEASSIGN
        if resample_fd is not None:
            irqfd.flags |= abi.KVM_IRQFD_FLAG_RESAMPLE
            irqfd.resamplefd = _uint(resample_fd, 31, "resample_fd")
        _ioctl(self._fd, "KVM_IRQFD", irqfd)

    def ioeventfd(
        self,
        fd: int,
        addr: int,
        length: int,
        pio: bool = False,
        datamatch: int | None = None,
        deassign: bool = False,
    ) -> None:
        """Guest writes of `length` bytes (0 = any) to `addr` signal eventfd
        `fd` instead of exiting; with datamatch only writes of that value."""
        if length not in (0, 1, 2, 4, 8):
            raise ValueError(f"ioeventfd length must be 0, 1, 2, 4 or 8, got {length!r}")
        event = abi.kvm_ioeventfd(
            addr=_uint(addr, 16 if pio else 64, "PIO port" if pio else "MMIO address"),
            len=length,
            fd=_uint(fd, 31, "fd"),
        )
        if pio:
            event.flags |= abi.KVM_IOEVENTFD_FLAG_PIO
        if datamatch is not None:
            event.flags |= abi.KVM_IOEVENTFD_FLAG_DATAMATCH
            event.datamatch = _uint(datamatch, 8 * (length or 8), "datamatch")
        if deassign:
            event.flags |= abi.KVM_IOEVENTFD_FLAG_DEASSIGN
        _ioctl(self._fd, "KVM_IOEVENTFD", event)

    def signal_msi(self, addr: int, data: int, devid: int | None = None) -> int:
        """Inject an MSI: >0 delivered, 0 blocked by the guest."""
        address = _uint(addr, 64, "MSI address")
        msi = abi.kvm_msi(
            address_lo=address & 0xFFFFFFFF, address_hi=address >> 32, data=_uint(data, 32, "MSI data")
        )
        if devid is not None:
            msi.flags = abi.KVM_MSI_VALID_DEVID
            msi.devid = _uint(devid, 32, "devid")
        return _ioctl(self._fd, "KVM_SIGNAL_MSI", msi)


def _bitmap_bytes(npages: int) -> int:
    # The kernel reads/writes whole longs: ALIGN(npages, 64) / 8 bytes.
    _uint(npages, 32, "npages")
    return (npages + 63) // 64 * 8


def _enable_cap_struct(cap: int, args: Sequence[int], flags: int) -> abi.kvm_enable_cap:
    if len(args) > 4:
        raise ValueError(f"KVM_ENABLE_CAP takes at most 4 args, got {len(args)}")
    struct = abi.kvm_enable_cap(cap=_uint(cap, 32, "cap"), flags=_uint(flags, 32, "flags"))
    for i, value in enumerate(args):
        struct.args[i] = _uint(value, 64, f"args[{i}]")
    return struct


# ---------------------------------------------------------------------------
# vCPU
# ---------------------------------------------------------------------------

_KVM_RUN = abi.KVM_RUN
_MMIO_DATA_OFFSET = abi.kvm_run.exit.offset + abi.kvm_run_mmio.data.offset


class Vcpu(_FdOwner):
    """A vCPU fd (from Vm.create_vcpu) and its mmapped kvm_run."""

    def __init__(self, fd: int, index: int, mmap_size: int):
        super().__init__(fd)
        self.index = index
        if mmap_size < ctypes.sizeof(abi.kvm_run):
            raise ValueError(f"vcpu mmap size {mmap_size} is smaller than kvm_run")
        self._mmap = mmap.mmap(fd, mmap_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self._view = memoryview(self._mmap)
        # Shares memory with the kernel: read exit data here after run().
        self.run_struct = abi.kvm_run.from_buffer(self._mmap)

    def run(self) -> int:
        """KVM_RUN until the next exit; returns kvm_run.exit_reason, or
        KVM_EXIT_INTR when interrupted by a signal or immediate_exit, or when
        KVM says EAGAIN (an application processor still waiting for its
        INIT/SIPI): in every such case the caller simply runs again."""
        if _sys_ioctl(self._fd, _KVM_RUN, 0) < 0:
            err = ctypes.get_errno()
            if err in (errno.EINTR, errno.EAGAIN):
                return abi.KVM_EXIT_INTR
            raise KvmError(err, "KVM_RUN")
        return self.run_struct.exit_reason

    @property
    def immediate_exit(self) -> bool:
        return bool(self.run_struct.immediate_exit)

    @immediate_exit.setter
    def immediate_exit(self, value: bool) -> None:
        self.run_struct.immediate_exit = 1 if value else 0

    def io_data(self) -> memoryview:
        """The PIO data of the current KVM_EXIT_IO (size * count bytes);
        writable, to fill in the result of an IN."""
        io = self.run_struct.io
        start, length = io.data_offset, io.size * io.count
        if start + length > len(self._view):
            raise ValueError(f"PIO data [{start:#x}, +{length}) is outside the vcpu mapping")
        return self._view[start : start + length]

    def mmio_data(self) -> memoryview:
        """The data of the current KVM_EXIT_MMIO (len bytes); writable."""
        length = min(self.run_struct.mmio.len, 8)
        return self._view[_MMIO_DATA_OFFSET : _MMIO_DATA_OFFSET + length]

    def close(self) -> None:
        if self.closed:
            return
        self.run_struct = None
        self._view.release()
        try:
            self._mmap.close()
        except BufferError:
            # A caller still holds an io_data()/mmio_data() view; the mapping
            # goes away with the last of them.
            pass
        self._mmap = None
        super().close()

    # -- registers --------------------------------------------------------------

    def _get(self, request: str, struct_type: type) -> ctypes.Structure:
        struct = struct_type()
        _ioctl(self._fd, request, struct)
        return struct

    def _set(self, request: str, struct: ctypes.Structure, struct_type: type) -> None:
        _check_type(struct, struct_type, request)
        _ioctl(self._fd, request, struct)

    def get_regs(self) -> abi.kvm_regs:
        return self._get("KVM_GET_REGS", abi.kvm_regs)

    def set_regs(self, regs: abi.kvm_regs) -> None:
        self._set("KVM_SET_REGS", regs, abi.kvm_regs)

    def get_sregs(self) -> abi.kvm_sregs:
        return self._get("KVM_GET_SREGS", abi.kvm_sregs)

    def set_sregs(self, sregs: abi.kvm_sregs) -> None:
        self._set("KVM_SET_SREGS", sregs, abi.kvm_sregs)

    def get_fpu(self) -> abi.kvm_fpu:
        return self._get("KVM_GET_FPU", abi.kvm_fpu)

    def set_fpu(self, fpu: abi.kvm_fpu) -> None:
        self._set("KVM_SET_FPU", fpu, abi.kvm_fpu)

    def get_lapic(self) -> abi.kvm_lapic_state:
        return self._get("KVM_GET_LAPIC", abi.kvm_lapic_state)

    def set_lapic(self, lapic: abi.kvm_lapic_state) -> None:
        self._set("KVM_SET_LAPIC", lapic, abi.kvm_lapic_state)

    def get_xsave(self) -> abi.kvm_xsave:
        return self._get("KVM_GET_XSAVE", abi.kvm_xsave)

    def set_xsave(self, xsave: abi.kvm_xsave) -> None:
        self._set("KVM_SET_XSAVE", xsave, abi.kvm_xsave)

    def get_xcrs(self) -> abi.kvm_xcrs:
        return self._get("KVM_GET_XCRS", abi.kvm_xcrs)

    def set_xcrs(self, xcrs: abi.kvm_xcrs) -> None:
        self._set("KVM_SET_XCRS", xcrs, abi.kvm_xcrs)

    def get_vcpu_events(self) -> abi.kvm_vcpu_events:
        return self._get("KVM_GET_VCPU_EVENTS", abi.kvm_vcpu_events)

    def set_vcpu_events(self, events: abi.kvm_vcpu_events) -> None:
        self._set("KVM_SET_VCPU_EVENTS", events, abi.kvm_vcpu_events)

    def get_debugregs(self) -> abi.kvm_debugregs:
        return self._get("KVM_GET_DEBUGREGS", abi.kvm_debugregs)

    def set_debugregs(self, debugregs: abi.kvm_debugregs) -> None:
        self._set("KVM_SET_DEBUGREGS", debugregs, abi.kvm_debugregs)

    def get_mp_state(self) -> int:
        return self._get("KVM_GET_MP_STATE", abi.kvm_mp_state).mp_state

    def set_mp_state(self, mp_state: int) -> None:
        state = abi.kvm_mp_state(mp_state=_uint(mp_state, 32, "mp_state"))
        _ioctl(self._fd, "KVM_SET_MP_STATE", state)

    # -- MSRs -------------------------------------------------------------------

    def get_msrs(self, indices: Sequence[int]) -> dict[int, int]:
        """Read MSRs; KvmError(EINVAL) names the first one KVM refused."""
        indices = list(indices)
        buf = abi.kvm_msrs_of(len(indices))
        for entry, index in zip(buf.entries, indices):
            entry.index = _uint(index, 32, "MSR index")
        done = _ioctl(self._fd, "KVM_GET_MSRS", buf)
        if done < len(indices):
            raise KvmError(errno.EINVAL, "KVM_GET_MSRS", f"MSR {indices[done]:#x} not readable")
        return {entry.index: entry.data for entry in buf.entries}

    def set_msrs(self, values: Mapping[int, int]) -> None:
        """Write MSRs; KvmError(EINVAL) names the first one KVM refused."""
        items = list(values.items())
        buf = abi.kvm_msrs_of(len(items))
        for entry, (index, value) in zip(buf.entries, items):
            entry.index = _uint(index, 32, "MSR index")
            entry.data = _uint(value, 64, f"MSR {index:#x} value")
        done = _ioctl(self._fd, "KVM_SET_MSRS", buf)
        if done < len(items):
            raise KvmError(errno.EINVAL, "KVM_SET_MSRS", f"MSR {items[done][0]:#x} not writable")

    # -- CPUID ------------------------------------------------------------------

    def set_cpuid2(self, entries: Sequence[abi.kvm_cpuid_entry2]) -> None:
        entries = list(entries)
        buf = abi.kvm_cpuid2_of(len(entries))
        for i, entry in enumerate(entries):
            _check_type(entry, abi.kvm_cpuid_entry2, f"CPUID entry {i}")
            buf.entries[i] = entry
        _ioctl(self._fd, "KVM_SET_CPUID2", buf)

    def get_cpuid2(self, max_entries: int = 256) -> list[abi.kvm_cpuid_entry2]:
        buf = abi.kvm_cpuid2_of(_uint(max_entries, 16, "max_entries"))
        # Some kernels (6.1) leave nent as passed on success: mark every slot so
        # the entries KVM did not write can be told apart.
        for i in range(buf.nent):
            buf.entries[i].function = buf.entries[i].index = _CPUID_UNUSED
        _ioctl(self._fd, "KVM_GET_CPUID2", buf)
        count = buf.nent
        for i in range(count):
            if buf.entries[i].function == _CPUID_UNUSED and buf.entries[i].index == _CPUID_UNUSED:
                count = i
                break
        return [_copy(buf.entries[i]) for i in range(count)]

    # -- misc -------------------------------------------------------------------

    def get_tsc_khz(self) -> int:
        return _ioctl(self._fd, "KVM_GET_TSC_KHZ")

    def set_tsc_khz(self, khz: int) -> None:
        _ioctl(self._fd, "KVM_SET_TSC_KHZ", _uint(khz, 32, "TSC kHz"))

    def kvmclock_ctrl(self) -> None:
        """Tell the guest's kvmclock the vCPU was paused by the host (EINVAL
        if the guest has not enabled kvmclock)."""
        _ioctl(self._fd, "KVM_KVMCLOCK_CTRL")

    # -- vCPU device attributes (KVM_CAP_VCPU_ATTRIBUTES) -----------------------

    def has_attr(self, group: int, attr: int) -> bool:
        """Whether KVM knows this vCPU attribute (False on ENXIO/ENOTTY/EINVAL)."""
        a = abi.kvm_device_attr(group=_uint(group, 32, "group"), attr=_uint(attr, 64, "attr"))
        try:
            _ioctl(self._fd, "KVM_HAS_DEVICE_ATTR", a)
        except KvmError as exc:
            if exc.errno in (errno.ENXIO, errno.ENOTTY, errno.EINVAL, errno.ENOSYS):
                return False
            raise
        return True

    def get_attr_u64(self, group: int, attr: int) -> int:
        value = ctypes.c_uint64()
        a = abi.kvm_device_attr(group=_uint(group, 32, "group"), attr=_uint(attr, 64, "attr"),
                                addr=ctypes.addressof(value))
        _ioctl(self._fd, "KVM_GET_DEVICE_ATTR", a)
        return value.value

    def set_attr_u64(self, group: int, attr: int, value: int) -> None:
        buf = ctypes.c_uint64(_uint(value, 64, "attribute value"))
        a = abi.kvm_device_attr(group=_uint(group, 32, "group"), attr=_uint(attr, 64, "attr"),
                                addr=ctypes.addressof(buf))
        _ioctl(self._fd, "KVM_SET_DEVICE_ATTR", a)

    def nmi(self) -> None:
        _ioctl(self._fd, "KVM_NMI")

    def interrupt(self, vector: int) -> None:
        """KVM_INTERRUPT: queue an external interrupt (no in-kernel irqchip)."""
        _ioctl(self._fd, "KVM_INTERRUPT", ctypes.c_uint32(_uint(vector, 8, "vector")))

    def enable_cap(self, cap: int, args: Sequence[int] = (), flags: int = 0) -> int:
        return _ioctl(self._fd, "KVM_ENABLE_CAP", _enable_cap_struct(cap, args, flags))
