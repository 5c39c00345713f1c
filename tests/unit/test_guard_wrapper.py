"""The generated LVM wrapper, run with sh (dash) against a fake "real binary" that records argv.

This tests the wrapper's decisions, not LVM: the fake prints its argv, one
argument a line, so a test sees exactly what would have run (or that nothing
did).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from fenceless.guard import role
from fenceless.guard.wrapper import RO_OFF, WrapperSettings, generate
from fenceless.lvm import policy

SH = shutil.which("dash") or "/bin/sh"
FAKE = '#!/bin/sh\nprintf "%s\\n" "$0" "$@" > "$FAKE_OUT"\nexit 0\n'


class Host:
    """A temp dir with a wrapper named lvm (and its command links), a fake real binary,
    a run dir for the role file and a boot id file of its own."""

    BOOT_ID = "1b2c3d4e-0000-4f2e-9a0a-5d6f2c2e3a5b"

    def __init__(self, tmp: Path, shared=("sanvg", "vg2")):
        self.tmp = tmp
        fake = tmp / "libexec" / "fenceless" / "lvm"
        fake.parent.mkdir(parents=True)
        fake.write_text(FAKE)
        fake.chmod(0o755)
        self.real = fake
        self.run_dir = str(tmp / "run")
        self.boot_id_file = tmp / "boot_id"
        self.boot_id_file.write_text(self.BOOT_ID + "\n")
        self.settings = WrapperSettings(
            host="h2", shared_vgs=tuple(shared), real_binary=str(fake),
            role_file=str(role.role_path(self.run_dir)), version="test",
            boot_id_file=str(self.boot_id_file))
        self.bin = tmp / "sbin"
        self.bin.mkdir()
        wrapper = self.bin / "lvm"
        wrapper.write_text(generate(self.settings))
        wrapper.chmod(0o755)
        for name in (*policy.REPORT_COMMANDS, *policy.NEUTRAL_COMMANDS,
                     *policy.ACTIVATION_COMMANDS, *policy.METADATA_COMMANDS):
            os.symlink("lvm", self.bin / name)
        self.out = tmp / "argv"

    def run(self, name: str, *args: str, env: dict[str, str] | None = None):
        """Run the wrapper as ``name``; returns (rc, argv the fake saw or None, stderr)."""
        if self.out.exists():
            self.out.unlink()
        full_env = {"PATH": "/usr/bin:/bin", "FAKE_OUT": str(self.out), **(env or {})}
        proc = subprocess.run([SH, str(self.bin / name), *args], capture_output=True, text=True,
                              env=full_env, timeout=10, check=False)
        seen = self.out.read_text().splitlines() if self.out.exists() else None
        if seen is not None:
            assert seen[0] == str(self.real), "the real binary must run by the name lvm"
            seen = seen[1:]
        return proc.returncode, seen, proc.stderr

    def role(self, *lines: tuple[str, str, str | None, int, float],
             boot_id: str | None = None) -> None:
        role.write_role_file(self.run_dir, [role.entry(*x) for x in lines],
                             boot_id=boot_id or self.BOOT_ID)

    def role_file(self) -> Path:
        return Path(self.settings.role_file)


@pytest.fixture
def host(tmp_path):
    return Host(tmp_path)


# --- reader (no role file) ------------------------------------------------------------


@pytest.mark.parametrize(("name", "args"), [
    ("lvcreate", ["-an", "-Zn", "-L", "8m", "-n", "x", "sanvg"]),
    ("lvm", ["lvcreate", "-an", "-L8m", "-nx", "sanvg"]),
    ("lvremove", ["-y", "sanvg/x"]),
    ("lvremove", ["/dev/vg2/x"]),
    ("lvextend", ["-r", "-L", "+1G", "sanvg/x"]),
    ("lvchange", ["--addtag", "t", "sanvg/x"]),
    ("lvchange", ["--refresh", "sanvg/x"]),
    ("vgchange", ["--addtag", "foo"]),          # no VG named: every VG
    ("vgchange", ["--setautoactivation", "y"]),
    ("pvremove", ["/dev/sdb"]),                 # a device could be the LUN
    ("lvcreate", ["-an", "-L1G", "-n", "x", "localvg", "/dev/sdc"]),
    ("vgrename", ["Xy12ab-cdef-ghij-klmn-opqr-stuv-wxyzAB", "newname"]),  # by UUID
    ("lvm", ["pvscan"]),
    ("lvcreate", ["-an", "--name", "sanvg/x", "-L1G"]),  # VG in an option value
    ("lvcreate", ["-an", "-L1G", "-n", "x", "--", "sanvg"]),
])
def test_metadata_changes_are_refused_on_a_reader(host, name, args):
    rc, seen, err = host.run(name, *args)
    assert rc == 5
    assert seen is None, "the real binary must not run"
    assert err.startswith("Refused: this host (h2) is not the metadata writer of VG ")
    assert "is `fenceless agent` running?" in err


@pytest.mark.parametrize(("name", "args"), [
    ("vgremove", ["sanvg"]),
    ("lvchange", ["-ay", "--addtag", "t", "sanvg/x"]),
    ("lvremove", ["@vmdisks"]),                 # a tag
    ("lvremove", ["-S", "vg_name=sanvg"]),     # a selection
    ("lvremove", ["--select=lv_name=x"]),
    ("lvremove", ["-S", "vg_name=sanvg", "localvg"]),
    ("lvremove", ["/dev/mapper/sanvg-x"]),
    ("lvm", []),                                 # the shell
    ("lvm", ["/root/script.lvm"]),
    ("lvcreate", ["-L1G", "-n", "x", "sanvg"]),  # activates the new LV
])
def test_some_are_refused_on_every_host(host, name, args):
    rc, seen, err = host.run(name, *args)
    assert (rc, seen) == (5, None)
    assert err.startswith("Refused: ")
    assert "the guard refuses it on every host, the writer too" in err
    assert err.endswith("was not run; nothing was changed.)\n")


def test_lv_name_from_environment_counts(host):
    rc, seen, _ = host.run("lvremove", "x", env={"LVM_VG_NAME": "sanvg"})
    assert (rc, seen) == (5, None)


@pytest.mark.parametrize(("name", "args", "expected"), [
    ("lvs", [], ["lvs", "--readonly"]),
    ("lvs", ["-a", "-o", "+devices", "sanvg"], ["lvs", "--readonly", "-a", "-o", "+devices",
                                                "sanvg"]),
    ("lvs", ["--readonly", "sanvg"], ["lvs", "--readonly", "sanvg"]),
    ("vgs", ["--", "sanvg"], ["vgs", "--readonly", "--", "sanvg"]),
    ("lvm", ["fullreport"], ["fullreport", "--readonly"]),
    ("lvm", ["vgcfgbackup", "-f", "/tmp/x", "sanvg"],
     ["vgcfgbackup", "--readonly", "-f", "/tmp/x", "sanvg"]),
    ("pvs", ["/dev/sdb"], ["pvs", "--readonly", "/dev/sdb"]),
])
def test_reports_run_readonly_on_a_reader(host, name, args, expected):
    rc, seen, _ = host.run(name, *args)
    assert rc == 0
    assert seen == expected


@pytest.mark.parametrize(("name", "args", "expected"), [
    ("lvchange", ["-an", "sanvg/x"], ["lvchange", "--sysinit", "--readonly", "-an", "sanvg/x"]),
    ("lvchange", ["-a", "n", "sanvg/x"],
     ["lvchange", "--sysinit", "--readonly", "-a", "n", "sanvg/x"]),
    ("lvchange", ["--activate=n", "--sysinit", "--readonly", "sanvg/x"],
     ["lvchange", "--activate=n", "--sysinit", "--readonly", "sanvg/x"]),
    ("vgchange", ["-an"], ["vgchange", "--sysinit", "--readonly", "-an"]),
    ("lvm", ["vgchange", "-aln", "-v", "sanvg"],
     ["vgchange", "--sysinit", "--readonly", "-aln", "-v", "sanvg"]),
])
def test_deactivation_runs_sysinit_readonly_on_a_reader(host, name, args, expected):
    rc, seen, _ = host.run(name, *args)
    assert rc == 0
    assert seen == expected


@pytest.mark.parametrize(("name", "args"), [
    ("lvm", ["version"]), ("lvm", ["help", "lvcreate"]), ("lvmconfig", ["--type", "diff"]),
    ("lvm", ["segtypes"]), ("lvm", ["devtypes"]), ("lvm", ["--version"]),
    ("pvscan", [*policy.UDEV_SCAN_ARGS, "/dev/sdb"]),
])
def test_neutral_commands_pass_unchanged(host, name, args):
    rc, seen, _ = host.run(name, *args)
    assert rc == 0
    cmd = [] if name == "lvm" else [name]
    assert seen == cmd + args


@pytest.mark.parametrize("args", [
    ["-L", "1G", "-n", "root2", "localvg"],
    ["-L1G", "-nroot2", "localvg/pool"],
    ["-L", "1G", "-n", "x", "/dev/localvg/x"],
])
def test_commands_on_local_vgs_pass_with_the_lvmconf_block_undone(host, args):
    rc, seen, _ = host.run("lvcreate", *args)
    assert rc == 0
    assert seen == ["lvcreate", "--config", RO_OFF, *args]


def test_a_local_vg_with_a_config_option_gets_one_merged_config(host):
    rc, seen, _ = host.run("lvcreate", "--config", "devices{x=1}", "-L1G", "localvg")
    assert rc == 0
    assert seen == ["lvcreate", "--config", f"{RO_OFF} devices{{x=1}}", "-L1G", "localvg"]
    rc, seen, _ = host.run("lvcreate", "--config=devices{x=1}", "-L1G", "localvg")
    assert seen == ["lvcreate", f"--config={RO_OFF} devices{{x=1}}", "-L1G", "localvg"]


# --- with a role file -------------------------------------------------------------------


def test_writer_of_the_vg_runs_metadata_changes(host):
    host.role(("sanvg", "writer", "h2", 7, 60.0), ("vg2", "reader", "h1", 3, 60.0))
    rc, seen, _ = host.run("lvcreate", "-an", "-L", "1G", "-n", "x", "sanvg")
    assert (rc, seen) == (0, ["lvcreate", "--config", RO_OFF, "-an", "-L", "1G", "-n", "x",
                              "sanvg"])
    # Not the writer of vg2: refused, naming the writer and the forwarding command.
    rc, seen, err = host.run("lvcreate", "-an", "-L", "1G", "-n", "x", "vg2")
    assert (rc, seen) == (5, None)
    assert err.splitlines()[0] == (
        "Refused: this host (h2) is not the metadata writer of VG vg2 (h1 is, epoch 3). "
        "Use `fenceless volume create NAME SIZE`, which forwards the request to h1.")
    # A command on every VG needs the writer role of every VG.
    rc, seen, _ = host.run("vgchange", "--addtag", "x")
    assert (rc, seen) == (5, None)
    rc, seen, _ = host.run("lvs")
    assert seen == ["lvs", "--readonly"]
    rc, seen, _ = host.run("lvs", "sanvg")
    assert seen == ["lvs", "--config", RO_OFF, "sanvg"]


def test_writer_of_every_vg_changes_every_vg_but_not_with_the_shell(host):
    host.role(("sanvg", "writer", "h2", 7, 60.0), ("vg2", "writer", "h2", 3, 60.0))
    rc, seen, _ = host.run("lvm")
    assert (rc, seen) == (5, None)
    rc, seen, _ = host.run("vgchange", "--addtag", "x")
    assert (rc, seen) == (0, ["vgchange", "--config", RO_OFF, "--addtag", "x"])


@pytest.mark.parametrize(("cmd", "hint"), [
    ("lvextend", "volume extend NAME +SIZE"), ("lvresize", "volume extend NAME +SIZE"),
    ("lvrename", "volume rename OLD NEW"), ("lvremove", "volume remove NAME"),
])
def test_refusal_names_the_matching_fenceless_command(host, cmd, hint):
    host.role(("sanvg", "reader", "h1", 9, 60.0))
    rc, _, err = host.run(cmd, "sanvg/x")
    assert rc == 5
    assert f"(h1 is, epoch 9). Use `fenceless {hint}`, which forwards the request to h1." in err


def test_other_refusals_give_the_generic_hint(host):
    host.role(("sanvg", "reader", "h1", 9, 60.0))
    _, _, err = host.run("lvchange", "--addtag", "t", "sanvg/x")
    assert "run it on h1, or move the role here first with `fenceless writer handover h2`" in err


def test_expired_writer_line_is_a_reader(host):
    now = role.boottime_cs()
    role.write_role_file(host.run_dir, [role.RoleEntry("sanvg", "writer", "h2", 7, now - 1)],
                         boot_id=host.BOOT_ID)
    rc, seen, err = host.run("lvcreate", "-an", "-L1G", "-n", "x", "sanvg")
    assert (rc, seen) == (5, None)
    assert "the local agent's role file is stale: is `fenceless agent` running?" in err


def test_writer_line_expires_while_the_file_stays(host):
    host.role(("sanvg", "writer", "h2", 7, 1.0))  # a loaded machine starts dash slowly
    assert host.run("lvcreate", "-an", "-L1G", "-n", "x", "sanvg")[0] == 0
    time.sleep(1.1)
    assert host.run("lvcreate", "-an", "-L1G", "-n", "x", "sanvg")[0] == 5


GOOD_HEAD = f"{role.HEADER}\nboot {Host.BOOT_ID}\n"


@pytest.mark.parametrize("text", [
    GOOD_HEAD + "sanvg writer h2 7\n",                 # a field missing
    GOOD_HEAD + "sanvg writer h2 7 99999999999 extra\n",
    GOOD_HEAD + "sanvg owner h2 7 99999999999\n",
    GOOD_HEAD + "sanvg writer h2 x 99999999999\n",
    GOOD_HEAD + "sanvg writer h2 7 -5\n",
    GOOD_HEAD + "sanvg writer h2 7 1e99\n",
    GOOD_HEAD,
    "",
    "sanvg writer h2 7 99999999999\n",                 # no header, no boot line
    f"{role.HEADER}\nsanvg writer h2 7 99999999999\n",  # no boot line
    f"{role.HEADER} \nboot {Host.BOOT_ID}\nsanvg writer h2 7 99999999999\n",
    f"{role.HEADER}\nboot {Host.BOOT_ID} x\nsanvg writer h2 7 99999999999\n",
    f"{role.HEADER}\nBOOT {Host.BOOT_ID}\nsanvg writer h2 7 99999999999\n",
    f"{role.HEADER.replace('v2', 'v3')}\nboot {Host.BOOT_ID}\nsanvg writer h2 7 99999999999\n",
])
def test_malformed_role_lines_are_not_the_writer(host, text):
    path = host.role_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    rc, seen, err = host.run("lvcreate", "-an", "-L1G", "-n", "x", "sanvg")
    assert (rc, seen) == (5, None)
    assert "has no valid line for it" in err
    assert role.read_role_file(host.run_dir).entries.get("sanvg") is None


def test_unreadable_role_file_is_not_the_writer(host):
    host.role(("sanvg", "writer", "h2", 7, 60.0))
    path = host.role_file()
    path.unlink()
    path.mkdir()  # a directory is present but cannot be read as lines
    rc, seen, err = host.run("lvcreate", "-an", "-L1G", "-n", "x", "sanvg")
    assert (rc, seen) == (5, None)
    assert err.startswith("Refused: ")


def test_missing_real_binary_is_an_error_not_a_bypass(host):
    host.real.unlink()
    rc, seen, err = host.run("lvs")
    assert (rc, seen) == (5, None)
    assert "the real LVM binary" in err and "is missing" in err


def test_generate_is_pure_and_embeds_its_settings(host):
    text = generate(host.settings)
    assert text == generate(host.settings)
    assert text.startswith("#!/bin/sh\n# fenceless LVM guard")
    assert "FL_SHARED=' sanvg vg2 '" in text
    assert f"FL_ROLE={host.settings.role_file}" in text
    assert "python" not in text.lower()


def test_wrapper_is_posix_sh(host):
    # dash is Debian's /bin/sh; -n parses without running.
    subprocess.run([SH, "-n", str(host.bin / "lvm")], check=True)
