"""Which TSC method a restore may use, and writing IA32_TSC past KVM's sync heuristic."""

import pytest

from vmmd.snapshot import clock


def test_tsc_listed_as_a_clocksource_is_stable(tmp_path):
    f = tmp_path / "available_clocksource"
    f.write_text("tsc kvm-clock \n")
    assert clock.host_tsc_stable(str(f))


def test_tsc_gone_from_the_clocksources_is_unstable(tmp_path):
    # What a kernel that marked its TSC unstable lists (the lab's L1 under TCG):
    # KVM then rewrites TSC offsets at each vCPU load, so the attribute cannot hold.
    f = tmp_path / "available_clocksource"
    f.write_text("hpet acpi_pm \n")
    assert not clock.host_tsc_stable(str(f))


def test_no_sysfs_assumes_the_common_case(tmp_path):
    assert clock.host_tsc_stable(str(tmp_path / "missing"))


# ---- KVM's TSC "sync" heuristic (kvm_synchronize_tsc before Linux 6.7) ----

class _KvmTsc:
    """The per-VM state of the heuristic, with a hand-driven host clock."""
    HZ = 1_000_000_000   # 1 GHz: cycles == ns

    def __init__(self, unstable: bool = False):
        self.ns = 0
        self.unstable = unstable
        self.last_write, self.last_ns, self.cur_offset = 0, 0, 0

    def write(self, vcpu, data: int) -> None:
        offset = data - self.ns          # guest TSC = host TSC (== ns) + offset
        elapsed = self.ns - self.last_ns
        expected = self.last_write + elapsed
        if data == 0 or (data < expected + self.HZ and data + self.HZ > expected):
            if self.unstable:
                data += elapsed
                offset = data - self.ns
            else:
                offset = self.cur_offset
        vcpu.offset = offset
        self.last_write, self.last_ns, self.cur_offset = data, self.ns, offset


class _Vcpu:
    def __init__(self, kvm: _KvmTsc):
        self.kvm, self.offset = kvm, 0
        kvm.write(self, 0)    # what vCPU creation does

    def set_msrs(self, msrs):
        self.kvm.write(self, msrs[clock.MSR_IA32_TSC] % (1 << 64))

    def tsc(self) -> int:
        return self.kvm.ns + self.offset


@pytest.mark.parametrize("unstable", [False, True])
def test_a_young_guests_tsc_is_written_exactly_not_synced_to_the_new_vms_age(unstable):
    kvm = _KvmTsc(unstable)
    kvm.ns = 5_000_000_000
    vcpus = [_Vcpu(kvm) for _ in range(3)]
    kvm.ns += 200_000_000            # the restore runs 0.2 s after the vCPUs exist
    saved = 600_000_000              # a guest snapshotted 0.6 s into its life
    vcpus[0].set_msrs({clock.MSR_IA32_TSC: saved})
    assert vcpus[0].tsc() != saved   # the trap: a plain write is taken as a sync
    clock.write_guest_tsc(vcpus, saved)
    assert [v.tsc() for v in vcpus] == [saved] * 3


def test_the_other_vcpus_are_matched_to_the_first():
    kvm = _KvmTsc()
    vcpus = [_Vcpu(kvm) for _ in range(2)]
    kvm.ns = 10_000_000_000
    clock.start_tsc_generation(vcpus[0], 7 * 10**12)
    vcpus[0].set_msrs({clock.MSR_IA32_TSC: 7 * 10**12})
    kvm.ns += 1_000                   # written a microsecond later, same value
    vcpus[1].set_msrs({clock.MSR_IA32_TSC: 7 * 10**12})
    assert vcpus[1].offset == vcpus[0].offset
