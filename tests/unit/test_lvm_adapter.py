"""The adapter's argv and role rules. The reader refusal must happen before any process."""

import pytest

from fenceless.config import HostConfig, VgConfig
from fenceless.errors import RoleRefused
from fenceless.lvm.adapter import Lvm, Role
from fenceless.runner import Runner


class NoProcess(Runner):
    """A runner that fails the test if anything is started."""

    def run(self, argv, **kw):
        raise AssertionError(f"a process was started: {argv}")


def lvm(role, driver_loaded=True):
    cfg = HostConfig(path="/c", host="h2", state_dir="/s", io_timeout=1.0,
                     vgs=(VgConfig("sanvg", ("/dev/loop3",)),), lvm_system_dir="/lab/h2/lvm")
    return Lvm(NoProcess(), cfg, cfg.vgs[0], role=role, driver_loaded=driver_loaded)


def test_reports_are_readonly_in_every_role():
    for role in Role:
        argv = lvm(role).argv("lvs", ["sanvg"])
        assert "--readonly" in argv


def test_filter_admits_only_this_vgs_device():
    text = lvm(Role.READER).config_text()
    assert '"a|^/dev/loop3$|", "r|.*|"' in text
    assert 'hints = "none"' in text
    assert "obtain_device_list_from_udev = 0" in text
    assert "activation = 0" not in text
    assert "activation = 0" in lvm(Role.READER, driver_loaded=False).config_text()


@pytest.mark.parametrize("command", [
    "lvcreate", "lvextend", "lvremove", "lvrename", "vgcreate", "pvcreate", "vgck",
    "vgchange", "lvconvert", "vgcfgrestore",
])
def test_reader_refuses_metadata_changes_before_any_process(command):
    ad = lvm(Role.READER)
    with pytest.raises(RoleRefused, match=f"`lvm {command}` changes VG metadata"):
        ad.run(command, "sanvg")


def test_reader_refuses_refresh_and_plain_activation():
    ad = lvm(Role.READER)
    with pytest.raises(RoleRefused):
        ad.argv("lvchange", ["--refresh", "sanvg/x"])
    with pytest.raises(RoleRefused):
        ad.argv("lvchange", ["-ay", "sanvg/x"])
    with pytest.raises(RoleRefused):
        ad.argv("lvchange", ["-ay", "--sysinit", "--readonly", "--addtag", "t", "sanvg/x"])


def test_reader_activation_is_sysinit_readonly():
    argv = lvm(Role.READER).argv("lvchange", ["--activate", "y", "--sysinit", "--readonly",
                                              "sanvg/x"])
    assert argv[:2] == ["/usr/sbin/lvm", "lvchange"]


def test_writer_runs_changes_without_readonly():
    argv = lvm(Role.WRITER).argv("lvcreate", ["-n", "x", "sanvg"])
    assert "--readonly" not in argv
    assert argv[-2] == "--config"


def test_env_selects_system_dir():
    env = lvm(Role.READER).env()
    assert env["LVM_SYSTEM_DIR"] == "/lab/h2/lvm"
