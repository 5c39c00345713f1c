"""The guard's holes from the safety review, each tried for real in a lab host's namespace.

One lab for the module: h1 and h2 see VG sanvg (LVs ``a`` and a stand-in
``fenceless-ctl``) and both have the guard installed; h1 holds a writer line
in its role file, h2 none. Every test checks that each attempt was refused
by the guard (its message, not only LVM's exit code 5, which LVM uses for
its own failures too) and that the VG is unchanged: same seqno, same LVs.
"""

from __future__ import annotations

import hashlib
import os
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from fenceless.guard import role
from tests.conftest import Lab, cli, lab_loops, lab_processes
from tests.integration.test_guard import MACHINE_FILES, guard_argv, lv_names, seqno, sha

pytestmark = pytest.mark.lab

GUARD_NOTE = "(fenceless guard: "


def host_cfg(lab: Lab, host: str) -> dict[str, object]:
    return tomllib.loads(Path(lab.config(host)).read_text())


def role_dir(lab: Lab, host: str) -> str:
    cfg = host_cfg(lab, host)
    return str(cfg.get("run_dir", cfg["state_dir"]))


def make_writer(lab: Lab, host: str) -> None:
    role.write_role_file(role_dir(lab, host), [role.entry("sanvg", "writer", host, 4, 600.0)])


@pytest.fixture(scope="module")
def lab(tmp_path_factory) -> Iterator[Lab]:
    machine = {p: sha(p) for p in MACHINE_FILES}
    path = tmp_path_factory.mktemp("lab")
    cli("lab", "up", "--dir", str(path), "--hosts", "2", "--size", "1G", "--io-timeout", "0.2")
    lab = Lab(path, 2)
    try:
        dev = lab.device("h1")
        lab.exec("h1", "pvcreate", "-q", dev)
        lab.exec("h1", "vgcreate", "-q", "--setautoactivation", "n", "sanvg", dev)
        for lv in ("a", "fenceless-ctl"):
            lab.exec("h1", "lvcreate", "-q", "-an", "-Zn", "-L", "8m", "-n", lv, "sanvg")
        for h in lab.hosts:
            lab.exec(h, *guard_argv("install"))
        make_writer(lab, "h1")  # the writer's own changes pass
        lab.exec("h1", "lvchange", "-q", "--addtag", "vmdisks", "sanvg/a")
        yield lab
    finally:
        cli("lab", "down", "--dir", str(path), "--force", check=False)
    assert lab_loops(path) == [] and lab_processes(path) == []
    assert {p: sha(p) for p in MACHINE_FILES} == machine, "the machine's files changed"


@pytest.fixture(autouse=True)
def unchanged(lab: Lab) -> Iterator[None]:
    """h1 is the writer (a fresh line each test), h2 a reader; the VG must not change."""
    make_writer(lab, "h1")
    before = (seqno(lab), lv_names(lab, "h1"))
    yield
    assert (seqno(lab), lv_names(lab, "h1")) == before, "the VG changed"
    assert lv_names(lab, "h1") == {"a", "fenceless-ctl"}


def refused(lab: Lab, host: str, *argv: str) -> str:
    res = lab.exec(host, *argv, check=False)
    assert res.returncode == 5, (argv, res.stdout, res.stderr)
    assert res.stderr.startswith("Refused: ") and GUARD_NOTE in res.stderr, (argv, res.stderr)
    return res.stderr


def dev_name(lab: Lab, host: str) -> str:
    return os.path.basename(lab.device(host))


# --- 1. a role file from an earlier boot ----------------------------------------------------


def test_a_role_file_from_an_earlier_boot_is_refused(lab):
    args = ("lvcreate", "-q", "-an", "-Zn", "-L", "4m", "-n", "b", "sanvg")
    # Another boot's id: refused although the line is otherwise valid.
    role.write_role_file(role_dir(lab, "h1"), [role.entry("sanvg", "writer", "h1", 4, 600.0)],
                         boot_id="00000000-0000-4000-8000-000000000000")
    assert "from an earlier boot" in refused(lab, "h1", *args)
    # What an earlier fenceless left in the state dir (no boot id at all).
    until = role.boottime_cs() + 360000
    legacy = Path(str(host_cfg(lab, "h1")["state_dir"])) / "guard" / "role"
    legacy.parent.mkdir(parents=True, exist_ok=True)
    legacy.write_text("# fenceless role file v1: VG ROLE WRITER EPOCH VALID_UNTIL "
                      f"(CLOCK_BOOTTIME centiseconds)\nsanvg writer h1 4 {until}\n")
    (Path(role_dir(lab, "h1")) / "guard" / "role").unlink()
    refused(lab, "h1", *args)


# --- 2. relative device paths on a reader ---------------------------------------------------


def test_relative_device_paths_are_devices(lab):
    mine = dev_name(lab, "h2")
    refused(lab, "h2", "sh", "-c", f"cd /dev && exec pvcreate -ff -y {mine}")
    refused(lab, "h2", "sh", "-c", f"cd /dev && exec pvremove -ff -y {mine}")
    refused(lab, "h2", "vgextend", "localvg", "mapper/mpatha")
    refused(lab, "h2", "sh", "-c", f"cd /dev && exec vgcreate localvg {mine}")


# --- 3. pvscan ----------------------------------------------------------------------------------


def test_only_udevs_pvscan_passes(lab):
    refused(lab, "h2", "pvscan", "--cache", "-aay")
    refused(lab, "h2", "pvscan", "--cache", "--activate", "ay", lab.device("h2"))
    res = lab.exec("h2", "lvm", "pvscan", "--cache", "--listvg", "--checkcomplete", "--vgonline",
                   "--autoactivation", "event", "--udevoutput", "--journal=output",
                   lab.device("h2"))
    assert "LVM_VG_NAME_COMPLETE='sanvg'" in res.stdout


# --- 4. long-running commands and the shell, on the writer -------------------------------------


def test_long_running_commands_and_the_shell_are_refused_on_the_writer(lab):
    refused(lab, "h1", "pvmove", lab.device("h1"))
    refused(lab, "h1", "lvconvert", "-y", "--type", "raid1", "-m1", "sanvg/a")
    refused(lab, "h1", "lvm", "lvpoll", "--polloperation", "pvmove", "sanvg/a")
    assert "the lvm shell" in refused(lab, "h1", "sh", "-c", "echo lvs | lvm")


# --- 6. the control LV and whole VGs, on the writer ---------------------------------------------


def test_the_control_lv_and_whole_vgs_are_refused_on_the_writer(lab):
    refused(lab, "h1", "lvremove", "-y", "sanvg/fenceless-ctl")
    refused(lab, "h1", "lvresize", "-L", "+4m", "sanvg/fenceless-ctl")
    refused(lab, "h1", "lvrename", "sanvg", "fenceless-ctl", "x")
    refused(lab, "h1", "vgremove", "-ff", "-y", "sanvg")
    refused(lab, "h1", "lvremove", "-y", "sanvg")
    refused(lab, "h1", "lvremove", "-y", "-S", "lv_size>0")


# --- 7. activation, on the writer and a reader --------------------------------------------------


def test_activation_of_shared_lvs_is_refused_everywhere(lab):
    for host in lab.hosts:
        refused(lab, host, "lvchange", "-ay", "sanvg/a")
        refused(lab, host, "vgchange", "-aay", "sanvg")
    refused(lab, "h1", "lvcreate", "-L", "4m", "-n", "b", "sanvg")  # activates by default
    lab.exec("h2", "lvchange", "-an", "sanvg/a")  # deactivation: --sysinit --readonly
    lab.exec("h1", "lvchange", "-an", "sanvg/a")


def test_options_are_split_as_lvm_splits_them(lab):
    """A flag of this command does not hide the next word; an abbreviation counts."""
    refused(lab, "h2", "lvremove", "-y", "localvg/x", "-f", "@vmdisks")  # tags sanvg/a
    refused(lab, "h2", "vgextend", "-y", "localvg", "-f", lab.device("h2"), "-f")
    refused(lab, "h1", "pvscan", "--cache", "--activ", "ay", lab.device("h1"))
    refused(lab, "h1", "vgsplit", "sanvg", "newvg", lab.device("h1"))


def test_the_machines_own_libexec_is_untouched(lab):
    assert not os.path.exists("/usr/libexec/fenceless")
    digest = hashlib.sha256(Path("/usr/sbin/lvm").read_bytes()).hexdigest()
    assert digest in lab.exec("h1", "sha256sum", "/usr/libexec/fenceless/lvm").stdout
