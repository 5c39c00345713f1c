"""The lab on real loop devices with real LVM: visibility, activation, teardown."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import CLI, cli, lab_loops, lab_processes

pytestmark = pytest.mark.lab

MiB = 1 << 20


def make_vg(lab, vg="sanvg", host="h1"):
    dev = lab.device(host, vg)
    lab.exec(host, "pvcreate", "-q", "--metadatasize", "4m", dev)
    lab.exec(host, "vgcreate", "-q", "--setautoactivation", "n", vg, dev)


def lvnames(lab, host, vg="sanvg"):
    out = lab.on(host, "scan", "--json", "--vg", vg).stdout
    return {lv["name"]: lv for lv in json.loads(out)["lvs"]}


def etc_lvm_digest():
    h = hashlib.sha256()
    for p in sorted(Path("/etc/lvm").rglob("*")):
        if p.is_file():
            h.update(str(p).encode() + p.read_bytes())
    return h.hexdigest()


def test_lv_created_on_h1_is_seen_by_every_host_through_its_own_loop(make_lab):
    before = etc_lvm_digest()
    lab = make_lab(3)
    devices = {h: lab.device(h) for h in lab.hosts}
    assert len(set(devices.values())) == 3, "each host must have its own loop device"
    make_vg(lab)
    # Scan once on h2 and h3 before the LV exists, so that a stale view would show.
    for host in ("h2", "h3"):
        assert "demo" not in lvnames(lab, host)
    lab.exec("h1", "lvcreate", "-q", "-an", "-Zn", "-L", "64m", "-n", "demo", "sanvg")
    for host in ("h2", "h3"):
        scan = json.loads(lab.on(host, "scan", "--json").stdout)
        assert [p["name"] for p in scan["pvs"]] == [devices[host]]
        assert scan["lvs"][0]["name"] == "demo"
        assert scan["lvs"][0]["size"] == 64 * MiB
    # The machine's own LVM config saw none of it.
    assert etc_lvm_digest() == before


def test_each_host_namespace_has_its_own_lvm_view(make_lab):
    lab = make_lab(2)
    conf = lab.exec("h2", "cat", "/etc/lvm/lvm.conf").stdout
    assert lab.device("h2") in conf
    assert lab.device("h1") not in conf
    outside = Path("/etc/lvm/lvm.conf").read_text() if Path("/etc/lvm/lvm.conf").exists() else ""
    assert lab.device("h2") not in outside
    env = lab.exec("h2", "sh", "-c", "echo $FENCELESS_CONFIG").stdout.strip()
    assert env == lab.config("h2")


def _dd_write(device, offset, data):
    subprocess.run(["dd", f"of={device}", "bs=4096", f"seek={offset // 4096}", "oflag=direct",
                    "conv=notrunc,fsync", "status=none"], input=data, check=True)


def _dd_read(device, offset, length):
    return subprocess.run(["dd", f"if={device}", "bs=4096", f"skip={offset // 4096}",
                           f"count={length // 4096}", "iflag=direct", "status=none"],
                          capture_output=True, check=True).stdout


def test_lab_activated_lv_shows_the_same_bytes_in_the_image_and_on_h3(make_lab):
    lab = make_lab(3)
    make_vg(lab)
    lab.exec("h1", "lvcreate", "-q", "-an", "-Zn", "-L", "16m", "-n", "pad", "sanvg")
    lab.exec("h1", "lvcreate", "-q", "-an", "-Zn", "-L", "32m", "-n", "data", "sanvg")
    h3 = json.loads(cli("lab", "activate", "--dir", str(lab.dir), "h3", "data", "--readonly",
                        "--json").stdout)
    h2 = json.loads(cli("lab", "activate", "--dir", str(lab.dir), "h2", "data",
                        "--json").stdout)
    assert h2["size_bytes"] == h3["size_bytes"] == 32 * MiB
    # Hold h3's mapping open across the write, so a cached read would be stale.
    holder = os.open(h3["device"], os.O_RDONLY)
    try:
        before = _dd_read(h3["device"], 8 * MiB, 4096)
        pattern = os.urandom(8192)
        _dd_write(h2["device"], 8 * MiB, pattern)
        # Where the bytes must be in the image: PE start + the LV's first extent.
        scan = json.loads(lab.on("h1", "scan", "--json").stdout)
        pe_start = scan["pvs"][0]["pe_start"]
        extent = scan["vg"]["extent_size"]
        segs = subprocess.run(
            ["lvm", "lvs", "--readonly", "--noheadings", "-o", "seg_pe_ranges", "sanvg/data"],
            env={**os.environ, "LVM_SYSTEM_DIR": str(lab.dir / "hosts/h1/lvm"),
                 "LVM_SUPPRESS_FD_WARNINGS": "1"},
            capture_output=True, text=True, check=True).stdout.strip()
        first_pe = int(segs.split(":")[1].split("-")[0])
        assert first_pe == 4, "pad takes extents 0-3"
        image = next((lab.dir / "luns").glob("*.img"))
        with open(image, "rb") as f:
            f.seek(pe_start + first_pe * extent + 8 * MiB)
            assert f.read(8192) == pattern
        assert _dd_read(h3["device"], 8 * MiB, 8192) == pattern
        assert before != pattern[:4096]
    finally:
        os.close(holder)
    # A read-only mapping refuses writes.
    with pytest.raises(subprocess.CalledProcessError):
        _dd_write(h3["device"], 0, b"x" * 4096)


def test_refresh_after_extend_resizes_the_mapping(make_lab):
    lab = make_lab(2)
    make_vg(lab)
    lab.exec("h1", "lvcreate", "-q", "-an", "-Zn", "-L", "16m", "-n", "grow", "sanvg")
    got = json.loads(cli("lab", "activate", "--dir", str(lab.dir), "h2", "grow",
                         "--json").stdout)
    lab.exec("h1", "lvextend", "-q", "-L", "48m", "sanvg/grow")
    size = subprocess.run(["blockdev", "--getsize64", got["device"]], capture_output=True,
                          text=True, check=True).stdout.strip()
    assert int(size) == 16 * MiB, "before a refresh the host keeps the old size"
    cli("lab", "refresh", "--dir", str(lab.dir), "h2", "grow")
    size = subprocess.run(["blockdev", "--getsize64", got["device"]], capture_output=True,
                          text=True, check=True).stdout.strip()
    assert int(size) == 48 * MiB


def test_multi_segment_lv_is_refused_in_lab_mode(make_lab):
    lab = make_lab(2)
    make_vg(lab)
    lab.exec("h1", "lvcreate", "-q", "-an", "-Zn", "-L", "8m", "-n", "a", "sanvg")
    lab.exec("h1", "lvcreate", "-q", "-an", "-Zn", "-L", "8m", "-n", "b", "sanvg")
    lab.exec("h1", "lvextend", "-q", "-L", "16m", "sanvg/a")
    res = cli("lab", "activate", "--dir", str(lab.dir), "h2", "a", check=False)
    assert res.returncode == 2
    assert "has 2 segments" in res.stderr
    assert lab_loops(lab.dir) and len(lab_loops(lab.dir)) == 2  # only the two host loops


def test_second_up_on_the_same_dir_is_refused(make_lab):
    lab = make_lab(1)
    res = cli("lab", "up", "--dir", str(lab.dir), "--hosts", "1", "--size", "1G", check=False)
    assert res.returncode == 2
    assert "a lab already exists here" in res.stderr
    assert "fenceless lab down --dir" in res.stderr
    assert json.loads(cli("lab", "status", "--dir", str(lab.dir), "--json").stdout)[
        "hosts"][0]["namespace"] == "up"


def test_two_vgs_two_luns(make_lab):
    lab = make_lab(2, "--vg", "fast", "--vg", "slow")
    assert lab.device("h1", "fast") != lab.device("h1", "slow")
    make_vg(lab, "fast")
    make_vg(lab, "slow")
    lab.exec("h1", "lvcreate", "-q", "-an", "-Zn", "-L", "8m", "-n", "x", "fast")
    assert "x" in lvnames(lab, "h2", "fast")
    assert lvnames(lab, "h2", "slow") == {}
    res = lab.on("h2", "scan", check=False)
    assert res.returncode == 2 and "--vg" in res.stderr


@pytest.mark.parametrize("point", ["lab.up.loop-attached", "lab.up.holder-started"])
def test_down_after_kill9_at_a_crash_point_leaves_nothing(tmp_path, point):
    env = {**os.environ, "FENCELESS_CRASHPOINT": point}
    proc = subprocess.run([*CLI, "lab", "up", "--dir", str(tmp_path), "--hosts", "3",
                           "--size", "1G"], env=env, capture_output=True, text=True, check=False)
    assert proc.returncode == -signal.SIGKILL
    assert lab_loops(tmp_path), "the crash left something to clean up"
    cli("lab", "down", "--dir", str(tmp_path))
    assert lab_loops(tmp_path) == []
    assert lab_processes(tmp_path) == []


def test_down_after_kill9_at_a_random_moment_leaves_nothing(tmp_path):
    rng = random.Random()
    for _ in range(3):
        proc = subprocess.Popen([*CLI, "lab", "up", "--dir", str(tmp_path), "--hosts", "4",
                                 "--size", "1G"], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.05, 0.6))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        cli("lab", "down", "--dir", str(tmp_path), "--force")
        assert lab_loops(tmp_path) == []
        assert lab_processes(tmp_path) == []


def test_down_also_stops_processes_started_in_a_host(make_lab):
    lab = make_lab(2)
    # A long-running process started inside h2, detached from the CLI.
    cli("lab", "exec", "--dir", str(lab.dir), "h2", "--", "sh", "-c",
        "setsid sleep 600 >/dev/null 2>&1 < /dev/null &")
    deadline = time.monotonic() + 10  # the shell returns before its child has started
    while len(lab_processes(lab.dir)) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(lab_processes(lab.dir)) >= 3
    cli("lab", "down", "--dir", str(lab.dir))
    assert lab_processes(lab.dir) == []
