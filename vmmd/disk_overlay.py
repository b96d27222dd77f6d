"""vmmd's half of disk checkpoints: qcow2 disks switch to a fresh external overlay.

How snapshot.create ("disks": "overlay") uses it, per qcow2 virtio-blk device:

  at start-up (Machine.start, next to the virtio-net backend fds; before the
  device's first incarnation is spawned):
      vmm_end, dev_end = fdpass_pair()
      dev.fds["fdpass"] = dev_end          # bootstrap "fds": the device keeps it
      keep vmm_end per device

  at the snapshot point (VM paused, devices quiesced, before RAM is saved):
      path = overlay_path_for(image_path, snapshot_name)
      fd = create_overlay(image_path, path)        # empty, backing = image_path
      send_fd(vmm_end, fd); os.close(fd)
      await _device_call(dev, "device", {"op": "switch_overlay", "args": {"path": path}})
      spec.options["args"][0] = spec.options["path"] = path   # restarts open the overlay
  and record image_path in the snapshot: restoring it means pointing the disk
  at a new overlay over image_path (the image as it was at the snapshot).

The device refuses an overlay that is not empty, has another size or no
backing file (devices/virtio_blk/model.py, VirtioBlkDevice.device_control).
"""

from __future__ import annotations

import os
import socket

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
    return os.open(overlay_path, os.O_RDWR | os.O_CLOEXEC)


def send_fd(sock: socket.socket, fd: int) -> None:
    socket.send_fds(sock, [b"overlay"], [fd])
