"""Sandbox policy of the virtio-net device process.

After the jail the device works on fds it was handed (the tap or the switch
socket, guest memory, the dirty log, eventfds, the bus). The base policy
already allows read/readv/writev and send/recv on existing sockets; on top
it needs one ioctl: TUNSETOFFLOAD on the tap, issued when the driver's
negotiated receive offloads (GUEST_CSUM/GUEST_TSO4/6/ECN) change. No
socket(), connect() or open() (the base policy fails them with EACCES):
the device cannot reach any other network than the one it was given.
"""

from sandbox.cgroups import CgroupLimits
from sandbox.seccomp_policy import EQ, ArgRule, base_policy

from devices.virtio_net.backend import TUNSETOFFLOAD

POLICY = base_policy().extend(
    "virtio_net",
    conditional=(ArgRule("ioctl", ((1, EQ, TUNSETOFFLOAD, 0),)),),
)

# Cgroup: the process itself (~40-60 MiB resident) plus the guest pages it
# is the first to touch (DMA into pages the guest never wrote is charged
# to the device), hence plus the guest's RAM.
CGROUP_LIMITS = CgroupLimits(memory_max=256 << 20, pids_max=32, plus_guest_memory=True)
