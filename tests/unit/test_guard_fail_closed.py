"""The holes a safety review found in the guard's wrapper, each tried against the generated sh.

Run with dash against a fake real binary, as in test_guard_wrapper.py: a
refusal is exit 5 with nothing run. Each group below failed on the wrapper
before its fix (the real binary ran).
"""

from __future__ import annotations

import pytest

from fenceless.guard import role
from fenceless.guard.wrapper import RO_OFF
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


# --- 4. long-running commands and the shell ---------------------------------------------------


@pytest.mark.parametrize(("name", "args"), [
    ("lvm", []),
    ("lvm", ["/root/commands.lvm"]),
    ("lvm", ["nosuchcommand", "localvg"]),
    ("lvm", ["pvmove", "/dev/sdc"]),
    ("lvm", ["pvmove", "-b", "/dev/sdc", "/dev/sdd"]),
    ("lvm", ["lvconvert", "--type", "raid1", "-m1", "sanvg/x"]),
    ("lvm", ["lvconvert", "--merge", "sanvg/snap"]),
    ("lvm", ["lvpoll", "--polloperation", "pvmove", "sanvg/pvmove0"]),
])
def test_long_running_commands_and_the_shell_are_refused_on_the_writer_too(writer, name, args):
    rc, seen, err = writer.run(name, *args)
    assert (rc, seen) == REFUSED
    assert err.startswith("Refused: ")
    assert "every host, the writer too" in err


def test_the_shell_says_why_and_what_to_do(writer):
    _, _, err = writer.run("lvm")
    assert "the lvm shell" in err
    assert "one command at a time" in err


def test_a_long_running_command_on_a_local_vg_passes(host):
    rc, seen, _ = host.run("lvm", "lvconvert", "--type", "raid1", "-m1", "localvg/x")
    assert (rc, seen) == (0, ["lvconvert", "--config", RO_OFF, "--type", "raid1", "-m1",
                              "localvg/x"])


# --- 6. the control LV, vgremove, and lvremove of many -----------------------------------------


@pytest.mark.parametrize(("name", "args"), [
    ("lvremove", ["-y", "sanvg/fenceless-ctl"]),
    ("lvremove", ["/dev/sanvg/fenceless-ctl"]),
    ("lvremove", ["/dev/mapper/sanvg-fenceless--ctl"]),
    ("lvresize", ["-L+1G", "sanvg/fenceless-ctl"]),
    ("lvextend", ["-l+1", "vg2/fenceless-ctl"]),
    ("lvreduce", ["-L-4m", "-f", "sanvg/fenceless-ctl"]),
    ("lvrename", ["sanvg", "fenceless-ctl", "old-ctl"]),
    ("lvrename", ["sanvg/fenceless-ctl", "sanvg/old-ctl"]),
    ("lvchange", ["--deltag", "fenceless-control", "sanvg/fenceless-ctl"]),
    ("lvchange", ["-an", "sanvg/fenceless-ctl"]),
    ("vgremove", ["sanvg"]),
    ("vgremove", ["-ff", "vg2"]),
    ("vgremove", ["-S", "vg_name=sanvg"]),
    ("vgremove", ["@fenceless"]),
    ("vgremove", ["/dev/sanvg"]),
    ("vgsplit", ["sanvg", "newvg", "/dev/sdc"]),
    ("vgmerge", ["localvg", "sanvg"]),
    ("vgmerge", ["sanvg", "localvg"]),
    ("lvremove", ["-y", "sanvg"]),
    ("lvremove", ["-y", "/dev/sanvg"]),
    ("lvremove", ["-y", "sanvg", "localvg"]),
    ("lvremove", ["@vmdisks"]),
    ("lvremove", ["-S", "lv_name=x"]),
    ("lvremove", ["--select=vg_name=sanvg"]),
])
def test_the_control_lv_and_whole_vgs_are_refused_on_the_writer_too(writer, name, args):
    rc, seen, err = writer.run(name, *args)
    assert (rc, seen) == REFUSED
    assert err.startswith("Refused: ")
    assert "every host, the writer too" in err


def test_the_writer_still_removes_one_named_lv_and_reports_the_control_lv(writer):
    assert writer.run("lvremove", "-y", "sanvg/x")[:2] == (0, ["lvremove", "--config", RO_OFF,
                                                               "-y", "sanvg/x"])
    assert writer.run("lvs", "sanvg/fenceless-ctl")[:2] == (0, ["lvs", "--config", RO_OFF,
                                                                "sanvg/fenceless-ctl"])
    assert writer.run("lvremove", "localvg")[0] == 0
    assert writer.run("vgremove", "localvg")[0] == 0
    assert writer.run("vgsplit", "localvg", "newvg", "/dev/sdb")[0] == 0


# --- 7. only fenceless activates shared LVs ---------------------------------------------------


@pytest.mark.parametrize(("name", "args"), [
    ("lvchange", ["-ay", "sanvg/x"]),
    ("lvchange", ["-a", "y", "sanvg/x"]),
    ("lvchange", ["--activate=ey", "sanvg/x"]),
    ("lvchange", ["-a", "e", "sanvg/x"]),
    ("lvchange", ["-ay", "--sysinit", "--readonly", "sanvg/x"]),
    ("vgchange", ["-ay", "sanvg"]),
    ("vgchange", ["-aay", "sanvg"]),
    ("vgchange", ["-aey", "vg2"]),
    ("vgchange", ["-asy", "sanvg"]),
    ("vgchange", ["-aly", "sanvg"]),
    ("vgchange", ["-aay", "--autoactivation", "event", "sanvg"]),
    ("vgchange", ["-ay"]),                           # every VG
    ("lvchange", ["-ay", "@vmdisks"]),
    ("lvm", ["pvscan", "-aay", "/dev/sdb"]),
    ("lvcreate", ["-L1G", "-n", "x", "sanvg"]),      # lvcreate activates unless told -an
    ("lvcreate", ["-ay", "-L1G", "-n", "x", "sanvg"]),
])
@pytest.mark.parametrize("as_writer", [False, True])
def test_activation_of_shared_lvs_is_refused_on_every_host(tmp_path, name, args, as_writer):
    h = Host(tmp_path)
    if as_writer:
        h.role(*WRITER_OF_BOTH)
    rc, seen, err = h.run(name, *args)
    assert (rc, seen) == REFUSED
    assert "activat" in err.split("\n")[0]
    assert "fenceless" in err


@pytest.mark.parametrize(("name", "args"), [
    ("lvchange", ["-an", "sanvg/x"]),
    ("vgchange", ["-a", "n", "sanvg"]),
    ("vgchange", ["-aln"]),
])
def test_deactivation_stays_allowed(tmp_path, name, args):
    h = Host(tmp_path)
    assert h.run(name, *args)[:2] == (0, [name, "--sysinit", "--readonly", *args])
    h.role(*WRITER_OF_BOTH)
    assert h.run(name, *args)[:2] == (0, [name, "--config", RO_OFF, *args])


def test_local_vgs_activate_as_before(host):
    assert host.run("vgchange", "-ay", "localvg")[:2] == (0, ["vgchange", "--config", RO_OFF,
                                                              "-ay", "localvg"])
    assert host.run("lvcreate", "-L1G", "-n", "x", "localvg")[0] == 0


# --- abbreviated long options (getopt_long takes any unambiguous prefix) ---------------------


@pytest.mark.parametrize(("name", "args"), [
    ("pvscan", ["--cache", "--activ", "ay", "/dev/sdb"]),   # LVM reads it as --activate
    ("pvscan", ["--cache", "--act=ay"]),
    ("lvcreate", ["--activat", "y", "-L1G", "-n", "x", "sanvg"]),
    ("lvremove", ["--sel", "lv_name=x"]),
])
def test_an_abbreviated_option_counts_as_the_option(writer, name, args):
    rc, seen, err = writer.run(name, *args)
    assert (rc, seen) == REFUSED
    assert "every host, the writer too" in err


def test_an_abbreviated_deactivation_passes(writer):
    args = ["--activ", "n", "-L1G", "-n", "x", "sanvg"]
    assert writer.run("lvcreate", *args)[:2] == (0, ["lvcreate", "--config", RO_OFF, *args])


# --- options of each command's own arity ------------------------------------------------------


@pytest.mark.parametrize(("name", "args"), [
    ("vgextend", ["-y", "localvg", "-f", "sdc", "-f"]),   # -f is a flag of vgextend
    ("lvremove", ["localvg/x", "-f", "@vmdisks"]),        # and of lvremove: @vmdisks is an LV
    ("lvextend", ["-L+1G", "-r", "localvg/x", "sdc"]),    # -r is --resizefs here
    ("lvremove", ["localvg/x", "--forc", "@vmdisks"]),    # --force, abbreviated
    ("vgextend", ["--forc", "localvg", "sdc"]),
    ("vgextend", ["-X", "localvg", "sdc"]),               # no option of vgextend
])
def test_a_word_an_option_did_not_take_is_a_positional(host, name, args):
    assert host.run(name, *args)[:2] == REFUSED


@pytest.mark.parametrize("args", [
    ["--forc", "-ay", "sanvg"],
    ["--forc", "--", "-ay", "sanvg"],
    ["-X", "-ay", "sanvg"],
    ["-Xay", "sanvg"],
])
def test_a_word_an_unknown_option_may_take_is_read_as_options_too(writer, args):
    rc, seen, err = writer.run("vgchange", *args)
    assert (rc, seen) == REFUSED
    assert "would activate" in err


@pytest.mark.parametrize(("name", "args"), [
    ("lvextend", ["-r", "-L+1G", "localvg/x"]),
    ("lvcreate", ["-an", "-s", "-L", "1G", "-n", "snap", "localvg/x"]),
    ("vgchange", ["-u", "localvg"]),
    ("lvs", ["-a", "localvg"]),
])
def test_each_commands_own_flags_and_values(host, name, args):
    assert host.run(name, *args)[:2] == (0, [name, "--config", RO_OFF, *args])
