"""Sandbox policy of the virtio-blk device process.

After the jail the device only works on fds it opened before: the disk
image (and a second, O_DIRECT fd of it with cache=direct), guest memory, the
dirty log, ioeventfds/irqfds and the bus. On top of the base policy (which
already allows preadv/pwritev/pread64/pwrite64, fdatasync/fsync, lseek and
fstat on open fds) it needs:

  preadv2/pwritev2  the data path: CPython's os.preadv/os.pwritev call the
                 v2 syscalls (flags 0) where the libc has them; a qcow2
                 image's range-limited barriers are pwritev2 with RWF_DSYNC
  fallocate      DISCARD (PUNCH_HOLE|KEEP_SIZE) and WRITE_ZEROES (ZERO_RANGE,
                 or PUNCH_HOLE with UNMAP) on image files; WRITE_ZEROES on
                 block devices
  ioctl BLKDISCARD   DISCARD on a block device, and no other new ioctl (the
                 size and block-size ioctls are issued before the jail)

qcow2 images (qcow2_backend.py) need nothing more: metadata goes through
pread64/pwrite64 (pwritev2 with RWF_DSYNC where it must be durable before
the next write: a new pool's refcounts, a new L2 table), other barriers are
fdatasync, DISCARD punches holes with
fallocate, and the whole backing chain is opened before the jail. A disk
checkpoint's overlay fd arrives with recvmsg (SCM_RIGHTS) on the "fdpass"
socket vmmd handed over at bootstrap; zstandard is imported before the jail.

RLIMIT_FSIZE: a raw image is written in place and never extended
(every request is checked against the capacity, fallocate keeps the size);
a qcow2 image grows as clusters are allocated. The policy's limit is
effectively off (1 << 62 bytes); at jail time the runtime lowers it to the
image size for a raw image (VirtioBlkDevice.file_size_limit).
"""

from sandbox.cgroups import CgroupLimits
from sandbox.seccomp_policy import EQ, ArgRule, base_policy

from devices.virtio_blk.backend import BLKDISCARD

IMAGE_FILE_LIMIT = 1 << 62  # lowered to the image size at jail time (model.file_size_limit)

POLICY = base_policy().extend(
    "virtio_blk",
    allow={"fallocate", "preadv2", "pwritev2"},
    conditional=(ArgRule("ioctl", ((1, EQ, BLKDISCARD, 0),)),),
    file_size_limit=IMAGE_FILE_LIMIT,
)

# Cgroup: the process itself (~40-60 MiB resident) plus the guest pages it
# is the first to touch (DMA into pages the guest never wrote is charged
# to the device), hence plus the guest's RAM.
CGROUP_LIMITS = CgroupLimits(memory_max=256 << 20, pids_max=32, plus_guest_memory=True)
