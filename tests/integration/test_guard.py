"""The guard installed for real (dpkg-divert, wrapper, lvm.conf) inside a lab host's namespace.

The lab overlays /usr/sbin, /usr/libexec and /var/lib/dpkg per host, so the
diversion and the wrapper exist only in that host's view; the machine's own
binary and diversion list are checked to be byte-identical before and after,
and its /usr/libexec to have no fenceless directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import pytest

from fenceless.guard import install, role
from tests.conftest import cli

pytestmark = pytest.mark.lab

MACHINE_FILES = ("/usr/sbin/lvm", "/var/lib/dpkg/diversions")
REAL = "/usr/libexec/fenceless/lvm"


def sha(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def guard_argv(*args: str) -> list[str]:
    """`fenceless guard ...`, through cli.main once it is wired there."""
    from fenceless.cli import main

    module = "fenceless.cli.main" if "guard" in main.COMMANDS else "fenceless.cli.guard_cmd"
    return [sys.executable, "-m", module, "guard", *args]


def seqno(lab, host="h2") -> int:
    out = lab.exec(host, "vgs", "--noheadings", "-o", "vg_seqno", "sanvg").stdout
    return int(out.strip())


def lv_names(lab, host) -> set[str]:
    out = lab.exec(host, "lvs", "--noheadings", "-o", "lv_name", "sanvg").stdout
    return {x.strip() for x in out.split()}


def host_dir(lab, host, key: str) -> str:
    import tomllib

    return str(tomllib.loads(Path(lab.config(host)).read_text())[key])


def in_ns(lab, host, script: str) -> str:
    return lab.exec(host, "sh", "-c", script).stdout


@pytest.fixture
def guarded(make_lab):
    machine = {p: sha(p) for p in MACHINE_FILES}
    lab = make_lab(2)
    dev = lab.device("h1")
    lab.exec("h1", "pvcreate", "-q", dev)
    lab.exec("h1", "vgcreate", "-q", "--setautoactivation", "n", "sanvg", dev)
    lab.exec("h1", "lvcreate", "-q", "-an", "-Zn", "-L", "8m", "-n", "a", "sanvg")
    before = {
        "binary": in_ns(lab, "h2", "sha256sum /usr/sbin/lvm"),
        "diversions": in_ns(lab, "h2", "dpkg-divert --list | sort"),
        "lvm_conf": (lab.dir / "hosts" / "h2" / "lvm" / "lvm.conf").read_bytes(),
    }
    lab.exec("h2", *guard_argv("install"))
    yield lab, before
    assert {p: sha(p) for p in MACHINE_FILES} == machine, "the machine's files changed"
    assert not Path("/usr/libexec/fenceless").exists()


def test_reader_is_refused_every_way_and_the_vg_is_unchanged(guarded):
    lab, _ = guarded
    assert f"local diversion of /sbin/lvm to {REAL}" in in_ns(lab, "h2", "dpkg-divert --list")
    # The real binary is on no PATH, root's only, and reachable by no other name.
    assert in_ns(lab, "h2", f"stat -c %a {os.path.dirname(REAL)}") == "700\n"
    assert sha("/usr/sbin/lvm") in in_ns(lab, "h2", f"sha256sum {REAL}")
    assert in_ns(lab, "h2", "ls /usr/sbin/lvm.distrib /sbin/lvm.distrib 2>/dev/null; "
                 "command -v lvm.distrib; echo done") == "done\n"
    assert not (Path(host_dir(lab, "h2", "state_dir")) / "guard" / "lvm").exists()
    # Only h2 sees it: h1's view of the system is the machine's.
    assert sha("/usr/sbin/lvm") in in_ns(lab, "h1", "sha256sum /usr/sbin/lvm")
    assert in_ns(lab, "h1", f"ls {REAL} 2>/dev/null; echo done") == "done\n"
    before = seqno(lab)
    for argv in (["lvcreate"], ["lvm", "lvcreate"], ["/sbin/lvm", "lvcreate"],
                 ["/usr/sbin/lvcreate"]):
        res = lab.exec("h2", *argv, "-an", "-Zn", "-L", "8m", "-n", "b", "sanvg", check=False)
        assert res.returncode == 5, res.stderr
        assert res.stderr.startswith(
            "Refused: this host (h2) is not the metadata writer of VG sanvg (the local agent's "
            "role file"), res.stderr
        assert "`fenceless volume create NAME SIZE`" in res.stderr
    assert seqno(lab) == before
    assert lv_names(lab, "h1") == {"a"}
    # Reports and deactivation still work; activation is fenceless's alone.
    assert lab.exec("h2", "vgs").returncode == 0
    assert lv_names(lab, "h2") == {"a"}
    res = lab.exec("h2", "lvchange", "-ay", "--sysinit", "--readonly", "sanvg/a", check=False)
    assert res.returncode == 5 and "only fenceless activates them" in res.stderr
    lab.exec("h2", "lvchange", "-an", "sanvg/a")  # rewritten to --sysinit --readonly
    assert seqno(lab) == before


def test_role_file_decides_and_expires(guarded):
    lab, _ = guarded
    sd = host_dir(lab, "h2", "run_dir")
    role.write_role_file(sd, [role.entry("sanvg", "reader", "h1", 7, 60.0)])
    res = lab.exec("h2", "lvcreate", "-an", "-Zn", "-L", "8m", "-n", "b", "sanvg", check=False)
    assert res.returncode == 5
    assert res.stderr.splitlines()[0] == (
        "Refused: this host (h2) is not the metadata writer of VG sanvg (h1 is, epoch 7). "
        "Use `fenceless volume create NAME SIZE`, which forwards the request to h1.")

    before = seqno(lab)
    role.write_role_file(sd, [role.entry("sanvg", "writer", "h2", 8, 60.0)])
    lab.exec("h2", "lvcreate", "-q", "-an", "-Zn", "-L", "8m", "-n", "b", "sanvg")
    assert seqno(lab) == before + 1
    assert lv_names(lab, "h1") == {"a", "b"}

    role.write_role_file(sd, [role.RoleEntry("sanvg", "writer", "h2", 8,
                                             role.boottime_cs() - 1)])
    res = lab.exec("h2", "lvremove", "-y", "sanvg/b", check=False)
    assert res.returncode == 5
    assert "the local agent's role file is stale: is `fenceless agent` running?" in res.stderr
    assert "`fenceless volume remove NAME`" in res.stderr
    assert seqno(lab) == before + 1


def test_status_and_remove_restore_exactly(guarded):
    lab, before = guarded
    lab.exec("h1", "vgchange", "-q", "--setautoactivation", "y", "sanvg")
    st = json.loads(lab.exec("h2", *guard_argv("status", "--json")).stdout)
    assert st["installed"] and st["diverted"] and st["wrapper"]["matches"]
    assert st["lvm_conf"]["block"]
    assert st["role_file"]["vgs"][0]["state"] == "missing"
    assert st["autoactivation"] == [{"vg": "sanvg", "autoactivation": True, "raw": "enabled"}]
    assert any("autoactivation on" in w for w in st["warnings"])
    conf = lab.dir / "hosts" / "h2" / "lvm" / "lvm.conf"
    assert b"metadata_read_only = 1" in conf.read_bytes()
    # LVM 2.03 accepts the writer's override of the block.
    lab.exec("h2", "/sbin/lvm", "lvs", "--config", "global/metadata_read_only=0")

    lab.exec("h2", *guard_argv("install"))  # again: idempotent, keeps the first original
    lab.exec("h2", *guard_argv("remove"))
    assert in_ns(lab, "h2", "sha256sum /usr/sbin/lvm") == before["binary"]
    assert in_ns(lab, "h2", "dpkg-divert --list | sort") == before["diversions"]
    assert conf.read_bytes() == before["lvm_conf"]
    assert in_ns(lab, "h2", "ls /usr/sbin/lvm.distrib 2>/dev/null || echo gone") == "gone\n"
    assert in_ns(lab, "h2", "ls -d /usr/libexec/fenceless 2>/dev/null || echo gone") == "gone\n"
    st = json.loads(lab.exec("h2", *guard_argv("status", "--json")).stdout)
    assert not st["installed"] and not st["diverted"] and not st["lvm_conf"]["block"]


def test_install_over_an_old_install_moves_the_diversion(guarded):
    """An earlier fenceless diverted to lvm.distrib next to the wrapper (on PATH)."""
    lab, before = guarded
    lab.exec("h2", *guard_argv("remove"))
    conf = lab.dir / "hosts" / "h2" / "lvm" / "lvm.conf"
    gdir = Path(host_dir(lab, "h2", "state_dir")) / "guard"
    gdir.mkdir(parents=True, exist_ok=True)
    (gdir / "lvm.conf.orig").write_bytes(conf.read_bytes())
    (gdir / "install.json").write_text(json.dumps({
        "binary": "/sbin/lvm", "diverted_to": "/sbin/lvm.distrib", "format": 1,
        "lvm_conf": str(conf), "lvm_conf_existed": True, "lvm_conf_sha256": "x"}))
    conf.write_text(install.add_block(conf.read_text()))
    (gdir / "lvm").symlink_to("/sbin/lvm.distrib")
    in_ns(lab, "h2", "dpkg-divert --local --add --rename --divert /sbin/lvm.distrib /sbin/lvm "
          ">/dev/null && printf '#!/bin/sh\\n# fenceless LVM guard (older)\\nexit 5\\n' "
          ">/usr/sbin/lvm && chmod 755 /usr/sbin/lvm")
    assert "/usr/sbin/lvm.distrib" in in_ns(lab, "h2", "command -v lvm.distrib")

    lab.exec("h2", *guard_argv("install"))
    assert f"local diversion of /sbin/lvm to {REAL}" in in_ns(lab, "h2", "dpkg-divert --list")
    assert in_ns(lab, "h2", "command -v lvm.distrib; ls /usr/sbin/lvm.distrib 2>/dev/null; "
                 "echo done") == "done\n"
    assert sha("/usr/sbin/lvm") in in_ns(lab, "h2", f"sha256sum {REAL}")
    assert not (gdir / "lvm").exists()
    st = json.loads(lab.exec("h2", *guard_argv("status", "--json")).stdout)
    assert st["installed"] and st["wrapper"]["matches"] and st["real_binary"]["ok"]
    assert lv_names(lab, "h2") == {"a"}  # the new wrapper runs the moved binary
    lab.exec("h2", *guard_argv("remove"))
    assert in_ns(lab, "h2", "sha256sum /usr/sbin/lvm") == before["binary"]
    assert in_ns(lab, "h2", "dpkg-divert --list | sort") == before["diversions"]
    assert conf.read_bytes() == before["lvm_conf"]
    assert in_ns(lab, "h2", "ls -d /usr/libexec/fenceless 2>/dev/null || echo gone") == "gone\n"


def test_lab_down_leaves_no_overlay_mount(make_lab):
    lab = make_lab(1)
    mounts = in_ns(lab, "h1", "findmnt -rn -o TARGET,FSTYPE")
    assert "/usr/sbin overlay" in mounts and "/var/lib/dpkg overlay" in mounts
    assert "/usr/libexec overlay" in mounts
    cli("lab", "down", "--dir", str(lab.dir))
    machine_mounts = Path("/proc/self/mountinfo").read_text()
    assert str(lab.dir) not in machine_mounts
    assert " overlay " not in machine_mounts or "fenceless-lab" not in machine_mounts


def test_guard_follows_the_writer_role_with_real_agents(make_lab):
    """h1 writes, h2 is refused; after a handover to h2 it is the other way round."""
    from tests.integration.test_cluster import all_live, wait_until

    lab = make_lab(2, "--agents")
    lab.on("h1", "init")
    lab.on("h2", "join")
    wait_until(lambda: all_live(lab, "h1", lab.hosts), 20, "all live")
    for h in lab.hosts:
        lab.exec(h, "fenceless", "guard", "install")

    def seqno():
        return json.loads(lab.on("h1", "scan", "--json").stdout)["vg"]["seqno"]

    def try_lvcreate(host, name):
        return lab.exec(host, "lvcreate", "-q", "-an", "-Zn", "-L", "4m", "-n", name, "sanvg",
                        check=False)

    # The agents publish their roles at every renewal.
    wait_until(lambda: try_lvcreate("h1", "on-h1").returncode == 0, 10, "h1 may write")
    before = seqno()
    refused = try_lvcreate("h2", "on-h2")
    assert refused.returncode == 5
    assert "not the metadata writer of VG sanvg (h1 is, epoch 1)" in refused.stderr
    assert "fenceless volume create" in refused.stderr
    assert seqno() == before
    # Reports still work on the reader, read-only.
    assert "on-h1" in lab.exec("h2", "lvs", "sanvg").stdout
    assert lab.exec("h2", "vgs", "sanvg").returncode == 0

    lab.on("h1", "writer", "handover", "h2")
    wait_until(lambda: try_lvcreate("h2", "on-h2").returncode == 0, 10, "h2 may write")
    after = seqno()
    refused = wait_until(lambda: (r := try_lvcreate("h1", "again-h1")).returncode == 5
                         and "(h2 is, epoch 2)" in r.stderr and r, 10, "h1 refused, naming h2")
    assert "h2" in refused.stderr
    assert seqno() == after
    # fenceless itself still works through the guard on both hosts.
    lab.on("h1", "volume", "create", "via-fenceless", "4M")
    assert "via-fenceless" in lab.exec("h1", "lvs", "sanvg").stdout
