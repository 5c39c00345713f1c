"""The one LVM command policy, and the adapter that follows it."""

import pytest

from fenceless.config import HostConfig, VgConfig
from fenceless.errors import RoleRefused
from fenceless.lvm import policy
from fenceless.lvm.adapter import Lvm, Role
from fenceless.lvm.policy import Kind


class NoProcess:
    """A runner that fails the test if anything is started."""

    def run(self, argv, **kw):
        raise AssertionError(f"a process was started: {argv}")


def lvm(role):
    cfg = HostConfig(path="/c", host="h2", state_dir="/s", io_timeout=1.0,
                     vgs=(VgConfig("sanvg", ("/dev/loop3",)),))
    return Lvm(NoProcess(), cfg, cfg.vgs[0], role=role)


def test_classes_are_disjoint():
    classes = [policy.REPORT_COMMANDS, policy.NEUTRAL_COMMANDS, policy.ACTIVATION_COMMANDS,
               policy.METADATA_COMMANDS]
    names = [c for cls in classes for c in cls]
    assert len(names) == len(set(names))


@pytest.mark.parametrize(("command", "expected"), [
    ("lvs", Kind.REPORT), ("lvscan", Kind.REPORT), ("lvmdiskscan", Kind.REPORT),
    ("help", Kind.NEUTRAL), ("devtypes", Kind.NEUTRAL), ("lvchange", Kind.ACTIVATION),
    ("vgchange", Kind.ACTIVATION), ("lvcreate", Kind.METADATA), ("pvscan", Kind.METADATA),
    ("vgscan", Kind.METADATA),  # rejects --readonly on 2.03.16
    ("lvnew", Kind.METADATA),   # unknown: refused until someone classifies it
    ("", Kind.METADATA),
])
def test_kind(command, expected):
    assert policy.kind(command) is expected


@pytest.mark.parametrize(("args", "expected"), [
    (["-ay", "vg/x"], [("-a", "y")]),
    (["-a", "n", "vg/x"], [("-a", "n")]),
    (["-vay"], [("-v", None), ("-a", "y")]),
    (["--activate=ey", "--sysinit"], [("--activate", "ey"), ("--sysinit", None)]),
    (["--addtag", "t", "--readonly"], [("--addtag", "t"), ("--readonly", None)]),
    (["--unknown", "--readonly"], [("--unknown", "--readonly")]),  # swallows the next word
    (["-ay", "--", "-an"], [("-a", "y")]),
    (["-", "vg"], []),
    (["vg/x", "-a"], [("-a", None)]),
])
def test_options_split_like_the_wrapper(args, expected):
    assert policy.options(args) == expected


@pytest.mark.parametrize(("command", "args", "allowed"), [
    ("lvchange", ["-ay", "vg/x"], True),
    ("lvchange", ["--activate", "n", "--sysinit", "--readonly", "vg/x"], True),
    ("vgchange", ["-aly", "-v", "--select", "lv_name=x"], True),
    ("lvchange", ["--activate=sy", "-K", "vg/x"], True),
    ("lvchange", ["-am", "vg/x"], False),               # not a value a reader may pass
    ("lvchange", ["--sysinit", "--readonly", "vg/x"], False),  # no activation at all
    ("lvchange", ["-ay", "--addtag", "t", "vg/x"], False),
    ("lvchange", ["-ay", "--refresh", "vg/x"], False),
    ("lvchange", ["-ayZn", "vg/x"], False),             # "yZn" is the value of -a
    ("lvchange", ["vg/x", "-a"], False),                # value missing
    ("vgcreate", ["-ay", "vg"], False),
    ("lvs", ["-ay"], False),
])
def test_reader_activation(command, args, allowed):
    assert policy.reader_activation(command, args) is allowed


# --- the adapter follows it ---------------------------------------------------------------


@pytest.mark.parametrize("command", policy.REPORT_COMMANDS)
def test_adapter_runs_every_report_readonly(command):
    for role in Role:
        argv = lvm(role).argv(command, [])
        assert argv[1] == command
        assert argv.count("--readonly") == 1


@pytest.mark.parametrize("command", policy.NEUTRAL_COMMANDS)
def test_adapter_runs_neutral_commands_unchanged_for_a_reader(command):
    argv = lvm(Role.READER).argv(command, ["x"])
    assert argv[1:3] == [command, "x"]
    assert "--readonly" not in argv


@pytest.mark.parametrize("command", policy.METADATA_COMMANDS)
def test_adapter_reader_refuses_every_metadata_command(command):
    with pytest.raises(RoleRefused):
        lvm(Role.READER).argv(command, ["sanvg"])
    assert lvm(Role.WRITER).argv(command, ["sanvg"])[1:3] == [command, "sanvg"]


def test_adapter_reader_activation_must_say_sysinit_readonly():
    ad = lvm(Role.READER)
    for command in policy.ACTIVATION_COMMANDS:
        argv = ad.argv(command, ["-aey", "--sysinit", "--readonly", "sanvg"])
        assert argv[1:6] == [command, "-aey", "--sysinit", "--readonly", "sanvg"]
        with pytest.raises(RoleRefused):
            ad.argv(command, ["-ay", "--sysinit", "sanvg"])
        with pytest.raises(RoleRefused):
            ad.argv(command, ["-ay", "--readonly", "sanvg"])
