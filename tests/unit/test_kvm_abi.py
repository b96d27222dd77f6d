"""vmmd.kvm.abi against the kernel's x86_64 ABI.

The expected numbers were produced by compiling sizeof/offsetof/ioctl-macro
probes against linux/kvm.h and asm/kvm.h (uapi of Linux 6.1) with gcc on
x86_64; they are ABI and never change.
"""

import ctypes

import pytest

from vmmd.kvm import abi

STRUCT_SIZES = {
    "kvm_regs": 144,
    "kvm_segment": 24,
    "kvm_dtable": 16,
    "kvm_sregs": 312,
    "kvm_fpu": 416,
    "kvm_msr_entry": 16,
    "kvm_msrs": 8,
    "kvm_msr_list": 4,
    "kvm_cpuid_entry2": 40,
    "kvm_cpuid2": 8,
    "kvm_lapic_state": 1024,
    "kvm_xsave": 4096,
    "kvm_xcr": 16,
    "kvm_xcrs": 392,
    "kvm_vcpu_events": 64,
    "kvm_debugregs": 128,
    "kvm_mp_state": 4,
    "kvm_clock_data": 48,
    "kvm_device_attr": 24,
    "kvm_userspace_memory_region": 32,
    "kvm_dirty_log": 16,
    "kvm_clear_dirty_log": 24,
    "kvm_irq_level": 8,
    "kvm_pit_config": 64,
    "kvm_pit_channel_state": 24,
    "kvm_pit_state2": 112,
    "kvm_pic_state": 16,
    "kvm_ioapic_state": 216,
    "kvm_irqchip": 520,
    "kvm_irq_routing_entry": 48,  # not 64: the union is u32 pad[8]
    "kvm_irq_routing": 8,
    "kvm_irqfd": 32,
    "kvm_ioeventfd": 64,
    "kvm_msi": 32,
    "kvm_enable_cap": 104,
    "kvm_debug_exit_arch": 32,
    "kvm_sync_regs": 520,
    "kvm_run": 2352,
}


@pytest.mark.parametrize("name,size", sorted(STRUCT_SIZES.items()))
def test_struct_size_matches_kernel(name, size):
    assert ctypes.sizeof(getattr(abi, name)) == size


KVM_RUN_OFFSETS = {
    "request_interrupt_window": 0,
    "immediate_exit": 1,
    "exit_reason": 8,
    "ready_for_interrupt_injection": 12,
    "if_flag": 13,
    "flags": 14,
    "cr8": 16,
    "apic_base": 24,
    "io": 32,
    "kvm_valid_regs": 288,
    "kvm_dirty_regs": 296,
    "s": 304,
}


@pytest.mark.parametrize("field,offset", sorted(KVM_RUN_OFFSETS.items()))
def test_kvm_run_offsets(field, offset):
    assert getattr(abi.kvm_run, field).offset == offset


def test_kvm_run_exit_union_is_256_bytes_at_32():
    assert ctypes.sizeof(abi.kvm_run_exit) == 256
    assert abi.kvm_run.exit.offset == 32


@pytest.mark.parametrize(
    "member,field,offset",
    [
        # offsets inside kvm_run (kernel offsetof minus the union's 32)
        ("io", "direction", 0),
        ("io", "size", 1),
        ("io", "port", 2),
        ("io", "count", 4),
        ("io", "data_offset", 8),
        ("mmio", "phys_addr", 0),
        ("mmio", "data", 8),
        ("mmio", "len", 16),
        ("mmio", "is_write", 20),
        ("internal", "suberror", 0),
        ("internal", "ndata", 4),
        ("internal", "data", 8),
        ("system_event", "type", 0),
        ("system_event", "ndata", 4),
        ("fail_entry", "hardware_entry_failure_reason", 0),
        ("fail_entry", "cpu", 8),
        ("emulation_failure", "flags", 8),
        ("emulation_failure", "insn_size", 16),
        ("emulation_failure", "insn_bytes", 17),
    ],
)
def test_kvm_run_exit_member_offsets(member, field, offset):
    member_type = dict((n, t) for n, t, *_ in abi.kvm_run_exit._fields_)[member]
    assert getattr(member_type, field).offset == offset


def test_kvm_run_exit_members_are_reachable_directly():
    run = abi.kvm_run()
    run.io.port = 0x3F8
    run.system_event.data[0] = 7
    assert run.io.port == 0x3F8
    assert run.system_event.flags == 7  # flags and data[0] share storage
    assert run.exit.io.port == 0x3F8  # the union is also reachable by name
    assert ctypes.sizeof(abi.kvm_run_internal) == 136


@pytest.mark.parametrize(
    "struct,path,offset",
    [
        (abi.kvm_sregs, "gdt", 192),
        (abi.kvm_sregs, "cr0", 224),
        (abi.kvm_sregs, "apic_base", 272),
        (abi.kvm_sregs, "interrupt_bitmap", 280),
        (abi.kvm_segment, "unusable", 22),
        (abi.kvm_fpu, "last_ip", 136),
        (abi.kvm_fpu, "xmm", 152),
        (abi.kvm_fpu, "mxcsr", 408),
        (abi.kvm_vcpu_events, "sipi_vector", 16),
        (abi.kvm_vcpu_events, "flags", 20),
        (abi.kvm_vcpu_events, "smi", 24),
        (abi.kvm_vcpu_events, "triple_fault", 28),
        (abi.kvm_vcpu_events, "exception_has_payload", 55),
        (abi.kvm_vcpu_events, "exception_payload", 56),
        (abi.kvm_clock_data, "realtime", 16),
        (abi.kvm_clock_data, "host_tsc", 24),
        (abi.kvm_ioeventfd, "fd", 20),
        (abi.kvm_ioeventfd, "flags", 24),
        (abi.kvm_irq_routing_entry, "u", 16),
        (abi.kvm_pit_state2, "flags", 72),
        (abi.kvm_pit_channel_state, "count_load_time", 16),
        (abi.kvm_xcrs, "xcrs", 8),
        (abi.kvm_xcrs, "padding", 264),
    ],
)
def test_struct_offsets(struct, path, offset):
    assert getattr(struct, path).offset == offset


IOCTL_NUMBERS = {
    "KVM_GET_API_VERSION": 0x0000AE00,
    "KVM_CREATE_VM": 0x0000AE01,
    "KVM_GET_MSR_INDEX_LIST": 0xC004AE02,
    "KVM_CHECK_EXTENSION": 0x0000AE03,
    "KVM_GET_VCPU_MMAP_SIZE": 0x0000AE04,
    "KVM_GET_SUPPORTED_CPUID": 0xC008AE05,
    "KVM_CREATE_VCPU": 0x0000AE41,
    "KVM_GET_DIRTY_LOG": 0x4010AE42,
    "KVM_SET_USER_MEMORY_REGION": 0x4020AE46,
    "KVM_SET_TSS_ADDR": 0x0000AE47,
    "KVM_SET_IDENTITY_MAP_ADDR": 0x4008AE48,
    "KVM_CREATE_IRQCHIP": 0x0000AE60,
    "KVM_IRQ_LINE": 0x4008AE61,
    "KVM_GET_IRQCHIP": 0xC208AE62,
    "KVM_SET_IRQCHIP": 0x8208AE63,
    "KVM_SET_GSI_ROUTING": 0x4008AE6A,
    "KVM_IRQFD": 0x4020AE76,
    "KVM_CREATE_PIT2": 0x4040AE77,
    "KVM_IOEVENTFD": 0x4040AE79,
    "KVM_SET_CLOCK": 0x4030AE7B,
    "KVM_GET_CLOCK": 0x8030AE7C,
    "KVM_GET_PIT2": 0x8070AE9F,
    "KVM_SET_PIT2": 0x4070AEA0,
    "KVM_SET_TSC_KHZ": 0x0000AEA2,
    "KVM_GET_TSC_KHZ": 0x0000AEA3,
    "KVM_SIGNAL_MSI": 0x4020AEA5,
    "KVM_ENABLE_CAP": 0x4068AEA3,
    "KVM_CLEAR_DIRTY_LOG": 0xC018AEC0,
    "KVM_RUN": 0x0000AE80,
    "KVM_GET_REGS": 0x8090AE81,
    "KVM_SET_REGS": 0x4090AE82,
    "KVM_GET_SREGS": 0x8138AE83,
    "KVM_SET_SREGS": 0x4138AE84,
    "KVM_INTERRUPT": 0x4004AE86,
    "KVM_GET_MSRS": 0xC008AE88,
    "KVM_SET_MSRS": 0x4008AE89,
    "KVM_GET_FPU": 0x81A0AE8C,
    "KVM_SET_FPU": 0x41A0AE8D,
    "KVM_GET_LAPIC": 0x8400AE8E,
    "KVM_SET_LAPIC": 0x4400AE8F,
    "KVM_SET_CPUID2": 0x4008AE90,
    "KVM_GET_CPUID2": 0xC008AE91,
    "KVM_GET_MP_STATE": 0x8004AE98,
    "KVM_SET_MP_STATE": 0x4004AE99,
    "KVM_NMI": 0x0000AE9A,
    "KVM_GET_VCPU_EVENTS": 0x8040AE9F,
    "KVM_SET_VCPU_EVENTS": 0x4040AEA0,
    "KVM_GET_DEBUGREGS": 0x8080AEA1,
    "KVM_SET_DEBUGREGS": 0x4080AEA2,
    "KVM_GET_XSAVE": 0x9000AEA4,
    "KVM_SET_XSAVE": 0x5000AEA5,
    "KVM_GET_XCRS": 0x8188AEA6,
    "KVM_SET_XCRS": 0x4188AEA7,
    "KVM_KVMCLOCK_CTRL": 0x0000AEAD,
    "KVM_SET_DEVICE_ATTR": 0x4018AEE1,
    "KVM_GET_DEVICE_ATTR": 0x4018AEE2,
    "KVM_HAS_DEVICE_ATTR": 0x4018AEE3,
}


@pytest.mark.parametrize("name,number", sorted(IOCTL_NUMBERS.items()))
def test_ioctl_number_matches_kernel(name, number):
    assert getattr(abi, name) == number


def test_ioc_helpers_encode_direction_type_nr_size():
    assert abi._IO(0xAE, 0x80) == 0xAE80
    assert abi._IOR(0xAE, 0x81, abi.kvm_regs) == 0x8090AE81
    assert abi._IOW(0xAE, 0x81, 144) == 0x4090AE81  # a byte count works too
    assert abi._IOWR(0xAE, 0x02, 4) == 0xC004AE02


@pytest.mark.parametrize(
    "args",
    [(4, 0xAE, 0, 0), (0, 256, 0, 0), (0, 0xAE, 256, 0), (0, 0xAE, 0, 1 << 14), (0, 0xAE, 0, -1)],
)
def test_ioc_rejects_fields_that_do_not_fit(args):
    with pytest.raises(ValueError):
        abi._IOC(*args)


def test_selected_constants():
    assert (abi.KVM_EXIT_IO, abi.KVM_EXIT_HLT, abi.KVM_EXIT_MMIO) == (2, 5, 6)
    assert (abi.KVM_EXIT_SHUTDOWN, abi.KVM_EXIT_FAIL_ENTRY, abi.KVM_EXIT_INTR) == (8, 9, 10)
    assert (abi.KVM_EXIT_INTERNAL_ERROR, abi.KVM_EXIT_SYSTEM_EVENT) == (17, 24)
    assert (abi.KVM_EXIT_UNKNOWN, abi.KVM_EXIT_EXCEPTION, abi.KVM_EXIT_DEBUG) == (0, 1, 4)
    assert abi.KVM_EXIT_IRQ_WINDOW_OPEN == 7
    assert (abi.KVM_EXIT_IO_IN, abi.KVM_EXIT_IO_OUT) == (0, 1)
    assert (abi.KVM_CAP_NR_VCPUS, abi.KVM_CAP_MAX_VCPUS, abi.KVM_CAP_IRQ_ROUTING) == (9, 66, 25)
    assert (abi.KVM_CAP_IRQFD_RESAMPLE, abi.KVM_CAP_SIGNAL_MSI) == (82, 77)
    assert (abi.KVM_CAP_IMMEDIATE_EXIT, abi.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2) == (136, 168)
    assert (abi.KVM_IRQ_ROUTING_IRQCHIP, abi.KVM_IRQ_ROUTING_MSI) == (1, 2)
    assert (abi.KVM_IOEVENTFD_FLAG_DATAMATCH, abi.KVM_IOEVENTFD_FLAG_PIO) == (1, 2)
    assert abi.KVM_IOEVENTFD_FLAG_DEASSIGN == 4
    assert (abi.KVM_IRQFD_FLAG_DEASSIGN, abi.KVM_IRQFD_FLAG_RESAMPLE) == (1, 2)
    assert (abi.KVM_CLOCK_TSC_STABLE, abi.KVM_CLOCK_REALTIME, abi.KVM_CLOCK_HOST_TSC) == (2, 4, 8)
    assert (abi.KVM_MP_STATE_RUNNABLE, abi.KVM_MP_STATE_HALTED) == (0, 3)
    assert abi.KVM_VCPUEVENT_VALID_SIPI_VECTOR == 2
    assert (abi.KVM_SYSTEM_EVENT_SHUTDOWN, abi.KVM_SYSTEM_EVENT_RESET) == (1, 2)
    assert abi.KVM_MEM_LOG_DIRTY_PAGES == 1
    # KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 arguments (linux/kvm.h)
    assert (abi.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE, abi.KVM_DIRTY_LOG_INITIALLY_SET) == (1, 2)


# offsetof() in linux/kvm.h: struct kvm_dirty_log / kvm_clear_dirty_log
DIRTY_LOG_OFFSETS = {
    ("kvm_dirty_log", "slot"): 0,
    ("kvm_dirty_log", "padding1"): 4,
    ("kvm_dirty_log", "dirty_bitmap"): 8,
    ("kvm_clear_dirty_log", "slot"): 0,
    ("kvm_clear_dirty_log", "num_pages"): 4,
    ("kvm_clear_dirty_log", "first_page"): 8,
    ("kvm_clear_dirty_log", "dirty_bitmap"): 16,
}


@pytest.mark.parametrize("struct,field,offset", sorted((s, f, o) for (s, f), o in DIRTY_LOG_OFFSETS.items()))
def test_dirty_log_offsets(struct, field, offset):
    assert getattr(getattr(abi, struct), field).offset == offset


@pytest.mark.parametrize(
    "factory,count_field,entry_size",
    [
        (abi.kvm_msrs_of, "nmsrs", 16),
        (abi.kvm_msr_list_of, "nmsrs", 4),
        (abi.kvm_cpuid2_of, "nent", 40),
        (abi.kvm_irq_routing_of, "nr", 48),
    ],
)
def test_variable_length_buffers(factory, count_field, entry_size):
    header = 4 if factory is abi.kvm_msr_list_of else 8
    for n in (0, 1, 5):
        buf = factory(n)
        assert getattr(buf, count_field) == n
        assert ctypes.sizeof(buf) == header + n * entry_size
    assert type(factory(3)) is type(factory(3))  # one class per size


@pytest.mark.parametrize("bad", [-1, 1.5, True, "3"])
def test_variable_length_buffers_reject_bad_counts(bad):
    with pytest.raises(ValueError):
        abi.kvm_msrs_of(bad)


def test_anonymous_unions():
    level = abi.kvm_irq_level(irq=5, level=1)
    assert level.status == 5
    msi = abi.kvm_irq_routing_msi(devid=9)
    assert msi.pad == 9
