"""format=qcow2|raw: vmmd's config check, the device's option parser, probing."""

from __future__ import annotations

import logging

import pytest

from devices.virtio_blk import model as m
from devices.virtio_blk.backend import BlockBackend
from devices.virtio_blk.qcow2.image import create_qcow2
from devices.virtio_blk.qcow2_backend import Qcow2Backend, open_backend
from devices.virtio_blk.request import S_IOERR, S_OK


def test_config_checks_the_format(tmp_path):
    from vmmd.config import ConfigError, parse_slot
    disk = tmp_path / "d.img"
    disk.write_bytes(bytes(4096))
    assert parse_slot(f"2,virtio-blk,{disk},format=qcow2").args[1] == "format=qcow2"
    with pytest.raises(ConfigError, match="format='vmdk'"):
        parse_slot(f"2,virtio-blk,{disk},format=vmdk")


def test_device_parses_the_format():
    assert m.parse_options({"args": ["/d.img", "format=raw"]}).image_format == "raw"
    assert m.parse_options({"args": ["/d.img"]}).image_format is None
    with pytest.raises(ValueError, match="format"):
        m.parse_options({"args": ["/d.img", "format=vdi"]})


def test_probing(tmp_path, caplog):
    q = str(tmp_path / "d.qcow2")
    create_qcow2(q, 1 << 20)
    with caplog.at_level(logging.WARNING):
        b = open_backend(q, image_format=None, read_only=False, cache="writeback", serial=b"")
    assert isinstance(b, Qcow2Backend) and b.capacity == 2048
    assert "format=qcow2" in caplog.text
    b.close()
    r = str(tmp_path / "d.raw")
    with open(r, "wb") as f:
        f.truncate(1 << 20)
    b = open_backend(r, image_format=None, read_only=False, cache="writeback", serial=b"")
    assert isinstance(b, BlockBackend)
    header = bytearray(512)
    header[:4] = b"QFI\xfb"
    assert b.write(0, [memoryview(header)], 512) == S_IOERR       # probed raw: refused
    assert b.write(1, [memoryview(header)], 512) == S_OK
    assert b.write(0, [memoryview(header[:2]), memoryview(header[2:])], 512) == S_IOERR
    b.close()
    b = open_backend(r, image_format="raw", read_only=False, cache="writeback", serial=b"")
    assert b.write(0, [memoryview(header)], 512) == S_OK           # explicit raw: the user's call
    b.close()
    # an explicit raw format on a qcow2 file exposes the file as it is
    b = open_backend(q, image_format="raw", read_only=True, cache="writeback", serial=b"")
    assert isinstance(b, BlockBackend)
    b.close()


def test_hostile_image_is_refused_at_open(tmp_path):
    q = tmp_path / "bad.qcow2"
    create_qcow2(str(q), 1 << 20)
    data = bytearray(q.read_bytes())
    data[72 + 7] |= 1 << 5      # an unknown incompatible feature
    q.write_bytes(data)
    with pytest.raises(ValueError, match="unsupported incompatible"):
        open_backend(str(q), image_format="qcow2", read_only=False, cache="writeback", serial=b"")
