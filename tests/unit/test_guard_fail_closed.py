"""The holes a safety review found in the guard's wrapper, each tried against the generated sh.

Run with dash against a fake real binary, as in test_guard_wrapper.py: a
refusal is exit 5 with nothing run. Each group below failed on the wrapper
before its fix (the real binary ran).
"""

from __future__ import annotations

import pytest

from fenceless.guard import role
from tests.unit.test_guard_wrapper import Host

REFUSED = (5, None)
WRITER_OF_BOTH = (("sanvg", "writer", "h2", 7, 60.0), ("vg2", "writer", "h2", 3, 60.0))


@pytest.fixture
def host(tmp_path):
    return Host(tmp_path)


@pytest.fixture
def writer(tmp_path):
    h = Host(tmp_path)
    h.role(*WRITER_OF_BOTH)
    return h


# --- 1. a role file from an earlier boot -------------------------------------------------


def test_a_role_file_left_from_before_a_reboot_is_not_the_writer(host):
    """What an agent of the previous boot left: no boot id, and its VALID_UNTIL
    (CLOCK_BOOTTIME, which restarted at 0) lies far ahead of the new uptime."""
    until = role.boottime_cs() + 360000
    path = host.role_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("# fenceless role file v1: VG ROLE WRITER EPOCH VALID_UNTIL "
                    f"(CLOCK_BOOTTIME centiseconds)\nsanvg writer h2 7 {until}\n")
    assert host.run("lvcreate", "-an", "-L1G", "-n", "x", "sanvg")[:2] == REFUSED


def test_a_role_file_of_another_boot_id_is_not_the_writer(host):
    host.role(("sanvg", "writer", "h2", 7, 60.0), boot_id="0" * 8 + "-0000-4000-8000-" + "0" * 12)
    rc, seen, err = host.run("lvcreate", "-an", "-L1G", "-n", "x", "sanvg")
    assert (rc, seen) == REFUSED
    assert "the local agent's role file is from an earlier boot" in err
    host.role(("sanvg", "writer", "h2", 7, 60.0))  # this boot's: the writer
    assert host.run("lvcreate", "-an", "-L1G", "-n", "x", "sanvg")[0] == 0


def test_no_boot_id_to_compare_with_is_not_the_writer(host):
    host.role(("sanvg", "writer", "h2", 7, 60.0))
    host.boot_id_file.unlink()
    rc, seen, err = host.run("lvcreate", "-an", "-L1G", "-n", "x", "sanvg")
    assert (rc, seen) == REFUSED
    assert "boot id" in err
    host.boot_id_file.write_text("not a boot id\n")
    assert host.run("lvcreate", "-an", "-L1G", "-n", "x", "sanvg")[:2] == REFUSED


def test_the_role_file_lives_in_the_run_dir(host):
    assert str(host.role_file()).startswith(host.run_dir + "/")


# --- 2. relative device paths ---------------------------------------------------------------


@pytest.mark.parametrize(("name", "args"), [
    ("pvcreate", ["-ff", "sdc"]),                   # cd /dev first
    ("pvcreate", ["-ff", "disk/by-id/wwn-0x6001"]),
    ("pvremove", ["-ff", "sdc"]),
    ("pvchange", ["-x", "n", "sdc"]),
    ("pvresize", ["sdc"]),
    ("vgextend", ["localvg", "mapper/mpatha"]),
    ("vgextend", ["localvg", "sdc"]),
    ("vgcreate", ["newvg", "sdc"]),
    ("vgreduce", ["localvg", "sdc"]),
    ("vgsplit", ["localvg", "newvg", "sdc"]),
    ("vgimportclone", ["sdc"]),
    ("lvcreate", ["-an", "-L1G", "-n", "x", "localvg", "sdc"]),
    ("lvextend", ["-L+1G", "localvg/x", "sdc"]),
    ("lvresize", ["-L+1G", "localvg/x", "mapper/mpatha"]),
    ("lvreduce", ["-L-1G", "localvg/x", "sdc"]),
    ("lvchange", ["--addtag", "t", "./x"]),          # not a plain VG or VG/LV name
    ("lvremove", ["localvg/x/y"]),
    ("vgchange", ["--addtag", "t", "../dev/sdc"]),
])
def test_device_paths_concern_every_shared_vg(host, name, args):
    rc, seen, err = host.run(name, *args)
    assert (rc, seen) == REFUSED, seen
    assert err.startswith("Refused: ") and "VG sanvg" in err


@pytest.mark.parametrize(("name", "args"), [
    ("lvcreate", ["-an", "-L1G", "-n", "x", "localvg"]),
    ("lvextend", ["-L+1G", "localvg/x"]),
    ("lvremove", ["-y", "localvg/x"]),
    ("lvrename", ["localvg", "a", "b"]),
])
def test_plain_names_of_local_vgs_still_pass(host, name, args):
    rc, seen, _ = host.run(name, *args)
    assert rc == 0 and seen is not None and seen[0] == name


# --- 3. pvscan only in udev's exact form ----------------------------------------------------

UDEV = ["--cache", "--listvg", "--checkcomplete", "--vgonline", "--autoactivation", "event",
        "--udevoutput", "--journal=output"]


def test_udevs_exact_pvscan_passes_unchanged(host):
    assert host.run("pvscan", *UDEV, "/dev/sdb")[:2] == (0, ["pvscan", *UDEV, "/dev/sdb"])
    assert host.run("lvm", "pvscan", *UDEV, "/dev/sdb")[:2] == (0, ["pvscan", *UDEV,
                                                                     "/dev/sdb"])


@pytest.mark.parametrize("args", [
    ["--cache", "-aay"],
    ["--cache", "-aay", "/dev/sdb"],
    ["--cache", "--activate", "ay", "/dev/sdb"],
    ["--cache", "/dev/sdb"],
    ["--cache", "--listvg", "--checkcomplete", "/dev/sdb"],
    [*UDEV, "/dev/sdb", "/dev/sdc"],
    [*UDEV, "-aay", "/dev/sdb"],
    [*UDEV[1:], "--cache", "/dev/sdb"],
    [*UDEV],
    [*UDEV, "sanvg"],
    [*UDEV[:-1], "--journal", "output", "/dev/sdb"],
])
def test_every_other_pvscan_is_an_ordinary_command(host, args):
    assert host.run("pvscan", *args)[:2] == REFUSED
