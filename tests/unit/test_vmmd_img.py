"""vmmd-img against qemu-img: what one writes, the other reads and checks."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

from vmmd.img import main, parse_size

QEMU_IMG = shutil.which("qemu-img")
pytestmark = pytest.mark.skipif(QEMU_IMG is None, reason="qemu-img (qemu-utils) is not installed")


def q(*args, check=True):
    return subprocess.run([QEMU_IMG, *args], capture_output=True, text=True, check=check)


def run(capsys, *args):
    rc = main(list(args))
    out = capsys.readouterr()
    return rc, out.out, out.err


def _raw(tmp_path, name="src.raw"):
    p = tmp_path / name
    data = os.urandom(1 << 20) + bytes(2 << 20) + (b"abc" * 400000)[:1 << 20]
    p.write_bytes(data)
    return str(p), data


def test_parse_size():
    assert parse_size("1G") == 1 << 30 and parse_size("64K") == 65536 and parse_size("512") == 512
    assert parse_size("1.5M") == 3 << 19 and parse_size("2MiB") == 2 << 20


def test_create_info_check(tmp_path, capsys):
    p = str(tmp_path / "a.qcow2")
    rc, out, _ = run(capsys, "create", "-f", "qcow2", "-o", "cluster_size=4096", p, "1G")
    assert rc == 0 and "cluster_size=4096" in out
    info = json.loads(q("info", "--output=json", p).stdout)
    assert info["virtual-size"] == 1 << 30 and info["cluster-size"] == 4096
    assert q("check", p, check=False).returncode == 0
    rc, out, _ = run(capsys, "info", "--output", "json", p)
    mine = json.loads(out)
    assert mine["virtual-size"] == info["virtual-size"] and mine["format"] == "qcow2"
    rc, out, _ = run(capsys, "check", p)
    assert rc == 0 and "No errors were found on the image." in out


def test_bad_usage_is_one_line_exit_2(tmp_path, capsys):
    rc, _, err = run(capsys, "create", "-f", "qcow2", str(tmp_path / "x"), "12Q")
    assert rc == 2 and err.strip() == "vmmd-img: error: invalid size '12Q'"
    rc, _, err = run(capsys, "create", "-f", "qcow2", "-o", "cluster_size=3000", str(tmp_path / "x"), "1M")
    assert rc == 2 and err.count("\n") == 1
    rc, _, err = run(capsys, "info", str(tmp_path / "missing"))
    assert rc == 1 and "No such file" in err


@pytest.mark.parametrize("compress", [False, True])
def test_convert_both_ways(tmp_path, capsys, compress):
    src, data = _raw(tmp_path)
    qc = str(tmp_path / "c.qcow2")
    args = ["convert", "-O", "qcow2", "-p"] + (["-c"] if compress else []) + [src, qc]
    rc, out, _ = run(capsys, *args)
    assert rc == 0 and "(100.00/100%)" in out
    assert q("check", qc, check=False).returncode == 0
    assert q("compare", src, qc, check=False).returncode == 0
    back = str(tmp_path / "back.raw")
    assert run(capsys, "convert", "-f", "qcow2", "-O", "raw", qc, back)[0] == 0
    assert open(back, "rb").read() == data
    assert os.stat(back).st_blocks * 512 < len(data)          # sparse: the zeros are holes
    # qemu-img's compressed image read back by vmmd-img
    qc2 = str(tmp_path / "qc2.qcow2")
    q("convert", "-c", "-O", "qcow2", src, qc2)
    back2 = str(tmp_path / "back2.raw")
    assert run(capsys, "convert", "-O", "raw", qc2, back2)[0] == 0
    assert open(back2, "rb").read() == data


def test_map_matches_qemu_img(tmp_path, capsys):
    src, _ = _raw(tmp_path)
    base = str(tmp_path / "base.qcow2")
    q("convert", "-O", "qcow2", src, base)
    top = str(tmp_path / "top.qcow2")
    q("create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top)
    subprocess.run(["qemu-io", "-c", "write -P 7 64k 64k", "-c", "write -z 1M 64k", top],
                   check=True, capture_output=True)
    theirs = json.loads(q("map", "--output=json", top).stdout)
    rc, out, _ = run(capsys, "map", "--output", "json", top)
    mine = json.loads(out)
    keys = ("start", "length", "depth", "present", "zero", "data")
    assert [{k: r[k] for k in keys} for r in mine] == [{k: r[k] for k in keys} for r in theirs]


def test_commit_and_rebase(tmp_path, capsys):
    src, data = _raw(tmp_path)
    base = str(tmp_path / "base.qcow2")
    q("convert", "-O", "qcow2", src, base)
    top = str(tmp_path / "top.qcow2")
    assert run(capsys, "create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top)[0] == 0
    subprocess.run(["qemu-io", "-c", "write -P 9 0 100k", top], check=True, capture_output=True)
    expect = b"\x09" * 102400 + data[102400:]
    # rebase onto a raw copy of base: contents unchanged
    copy = str(tmp_path / "copy.raw")
    shutil.copy(src, copy)
    assert run(capsys, "rebase", "-b", "copy.raw", "-F", "raw", top)[0] == 0
    assert json.loads(q("info", "--output=json", top).stdout)["backing-filename"] == "copy.raw"
    out = str(tmp_path / "flat.raw")
    q("convert", "-O", "raw", top, out)
    assert open(out, "rb").read() == expect
    # rebase onto nothing (safe): the backing data is copied into the overlay
    assert run(capsys, "rebase", "-b", "", top)[0] == 0
    q("convert", "-O", "raw", top, out)
    assert open(out, "rb").read() == expect
    assert q("check", top, check=False).returncode == 0
    # commit a new overlay into base
    top2 = str(tmp_path / "top2.qcow2")
    assert run(capsys, "create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top2)[0] == 0
    subprocess.run(["qemu-io", "-c", "write -P 8 1M 64k", top2], check=True, capture_output=True)
    rc, out_text, _ = run(capsys, "commit", top2)
    assert rc == 0 and "Image committed." in out_text
    q("convert", "-O", "raw", base, out)
    assert open(out, "rb").read()[1 << 20:(1 << 20) + 65536] == b"\x08" * 65536
    assert q("check", base, check=False).returncode == 0
    assert q("check", top2, check=False).returncode == 0
    records = json.loads(q("map", "--output=json", top2).stdout)
    assert all(r["depth"] == 1 for r in records if r["data"])     # emptied: all from base
