"""vmmd's half of disk checkpoints: qcow2 disks switch to a fresh external overlay.

The primitives snapshot.create {"disks": "overlay"} is built from
(vmmd/snapshot/disks.py puts them together; docs/snapshot.md):

  at start-up (Machine.run, before a virtio-blk's first incarnation):
      vmm_end, dev_end = fdpass_pair()     # dev_end: bootstrap fd "fdpass", the device keeps it
  at the snapshot point (VM paused, devices quiesced):
      fd = create_overlay(image_path, overlay_path_for(image_path, tag))  # empty, backing = image
      send_fd(vmm_end, fd)
      CONTROL device {"op": "switch_overlay", "args": {"path": ...}}
  restore: create_overlay() again on the frozen image, and the disk opens that.

The device refuses an overlay that is not empty, has another size or no
backing file (devices/virtio_blk/model.py, VirtioBlkDevice.device_control).
"""

from __future__ import annotations

import os
import socket
import stat

from devices.virtio_blk.qcow2.format import Qcow2Error
from devices.virtio_blk.qcow2.image import create_qcow2, open_image


def fdpass_pair() -> tuple[socket.socket, int]:
    """(vmmd's end, the device's end as a raw fd) of a datagram socket pair."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    a.set_inheritable(False)
    fd = b.detach()
    return a, fd


def overlay_path_for(image_path: str, tag: str) -> str:
    base, _ = os.path.splitext(image_path)
    return f"{base}.{tag}.qcow2"


def create_overlay(image_path: str, overlay_path: str) -> int:
    """Create an empty qcow2 overlay backed by image_path; returns an O_RDWR fd."""
    img = open_image(image_path, read_only=True)
    try:
        size, fmt_name = img.size, img.format
    finally:
        img.close()
    name = os.path.relpath(os.path.abspath(image_path), os.path.dirname(os.path.abspath(overlay_path)))
    try:
        create_qcow2(overlay_path, size, backing_file=name, backing_format=fmt_name, exclusive=True)
    except FileExistsError:
        raise Qcow2Error(f"overlay {overlay_path!r} already exists") from None
    except BaseException:
        _remove(overlay_path)   # created here (exclusively), then not written whole (ENOSPC, ...)
        raise
    try:
        # The overlay holds the same guest's data: no wider access than its image
        # (and always writable by its owner).
        os.chmod(overlay_path, (stat.S_IMODE(os.stat(image_path).st_mode) & 0o666) | 0o600)
        return os.open(overlay_path, os.O_RDWR | os.O_CLOEXEC)
    except BaseException:
        _remove(overlay_path)
        raise


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def send_fd(sock: socket.socket, fd: int) -> None:
    socket.send_fds(sock, [b"overlay"], [fd])
