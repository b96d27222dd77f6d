"""Which TSC method a restore may use: the host's TSC stability, from sysfs."""

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
