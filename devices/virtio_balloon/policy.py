"""Sandbox policy of the virtio-balloon device process.

On top of the base policy it needs only fallocate: host reclaim punches
holes (PUNCH_HOLE|KEEP_SIZE) in the guest memory memfd it was handed. It
writes no regular files (RLIMIT_FSIZE stays 0: fallocate with KEEP_SIZE
never extends the file).
"""

from sandbox.seccomp_policy import base_policy

POLICY = base_policy().extend("virtio_balloon", allow={"fallocate"})
