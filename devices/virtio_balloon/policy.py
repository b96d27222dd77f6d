"""Sandbox policy of the virtio-balloon device process.

On top of the base policy it needs only fallocate: host reclaim punches
holes (PUNCH_HOLE|KEEP_SIZE) in the guest memory memfd it was handed. It
writes no regular files (RLIMIT_FSIZE stays 0: fallocate with KEEP_SIZE
never extends the file).
"""

from sandbox.cgroups import CgroupLimits
from sandbox.seccomp_policy import base_policy

POLICY = base_policy().extend("virtio_balloon", allow={"fallocate"})

# Cgroup: the process itself (~40-60 MiB resident) plus the guest pages it
# is the first to touch (DMA into pages the guest never wrote is charged
# to the device), hence plus the guest's RAM.
CGROUP_LIMITS = CgroupLimits(memory_max=128 << 20, pids_max=32, plus_guest_memory=True)
