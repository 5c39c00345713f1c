"""The adapter and the guard's wrapper agree, because both are built from fenceless.lvm.policy.

Each case asks both for one decision on a reader: the adapter's argv (or its
refusal), and the generated wrapper run with dash against a fake real binary
(tests/unit/test_guard_wrapper.py's Host), with no role file, so this host
is the writer of nothing. Where they differ on purpose, the test says so:
the wrapper refuses every activation of a shared VG's LVs (only fenceless
activates them, after a claim on the LUN), while the adapter, which runs
fenceless's own activations, keeps a reader's ``--sysinit --readonly`` one.
"""

from __future__ import annotations

import dataclasses
import re

import pytest

from fenceless.config import HostConfig, VgConfig
from fenceless.errors import RoleRefused
from fenceless.guard import wrapper
from fenceless.lvm import policy
from fenceless.lvm.adapter import Lvm, Role
from tests.unit.test_guard_wrapper import Host


class NoProcess:
    def run(self, argv, **kw):
        raise AssertionError(f"a process was started: {argv}")


def reader() -> Lvm:
    cfg = HostConfig(path="/c", host="h2", state_dir="/s", io_timeout=1.0,
                     vgs=(VgConfig("sanvg", ("/dev/loop3",)),))
    return Lvm(NoProcess(), cfg, cfg.vgs[0], role=Role.READER)


def adapter_allows(command: str, args: list[str]) -> bool:
    try:
        reader().argv(command, args)
    except RoleRefused:
        return False
    return True


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    return Host(tmp_path_factory.mktemp("wrapper"))


@pytest.mark.parametrize("command", policy.REPORT_COMMANDS)
def test_every_report_runs_readonly_in_both(host, command):
    rc, seen, _ = host.run("lvm", command, "sanvg")
    assert (rc, seen) == (0, [command, "--readonly", "sanvg"])
    argv = reader().argv(command, ["sanvg"])
    assert argv[1:3] == [command, "sanvg"]
    assert "--readonly" in argv


@pytest.mark.parametrize("command", policy.NEUTRAL_COMMANDS)
def test_every_neutral_command_runs_unchanged_in_both(host, command):
    rc, seen, _ = host.run("lvm", command, "sanvg")
    assert (rc, seen) == (0, [command, "sanvg"])
    argv = reader().argv(command, ["sanvg"])
    assert argv[1:3] == [command, "sanvg"]
    assert "--readonly" not in argv


@pytest.mark.parametrize("command", policy.METADATA_COMMANDS)
def test_every_metadata_command_is_refused_by_both(host, command):
    rc, seen, _ = host.run("lvm", command, "sanvg")
    assert (rc, seen) == (5, None)
    assert not adapter_allows(command, ["sanvg"])


def test_the_policy_lists_name_known_commands():
    for names in (policy.DEVICE_COMMANDS, policy.PV_AFTER_FIRST_COMMANDS,
                  policy.LONG_RUNNING_COMMANDS, policy.LV_WIDE_COMMANDS,
                  policy.ACTIVATING_COMMANDS, policy.ACTIVATES_BY_DEFAULT,
                  policy.VG_REMOVING_COMMANDS,
                  (policy.LV_REMOVE_COMMAND, policy.UDEV_SCAN_COMMAND)):
        for name in names:
            assert policy.known(name), name
    assert not policy.known("lvnew") and not policy.known("")
    assert set(policy.DEACTIVATION_VALUES) <= set(policy.ACTIVATION_VALUES)
    assert policy.LV_REMOVE_COMMAND in policy.LV_WIDE_COMMANDS
    assert set(policy.ACTIVATES_BY_DEFAULT) <= set(policy.ACTIVATING_COMMANDS)


def activates(args: list[str]) -> bool:
    return any(value not in policy.DEACTIVATION_VALUES
               for name, value in policy.options(args) if name in policy.ACTIVATE_OPTIONS)


@pytest.mark.parametrize(("args", "allowed"), [
    (["-ay", "sanvg"], True),
    (["-a", "n", "sanvg"], True),
    (["--activate=ey", "sanvg"], True),
    (["--activate=en", "sanvg"], True),
    (["-valy", "sanvg"], True),
    (["-valn", "sanvg"], True),
    (["-ay", "-K", "--noudevsync", "sanvg"], True),
    (["-an", "-K", "--noudevsync", "sanvg"], True),
    (["-an", "--select", "lv_name=x"], True),
    (["-am", "sanvg"], False),
    (["-ayZn", "sanvg"], False),
    (["-ay", "--addtag", "t", "sanvg"], False),
    (["-ay", "--refresh", "sanvg"], False),
    (["-ay", "--monitor", "y", "sanvg"], False),
    (["--refresh", "sanvg"], False),
    (["--addtag", "t", "sanvg"], False),
])
@pytest.mark.parametrize("command", policy.ACTIVATION_COMMANDS)
def test_activation_rule_is_the_same_in_both_but_activation_itself(host, command, args,
                                                                   allowed):
    rc, seen, err = host.run("lvm", command, *args)
    # The adapter does not add --sysinit --readonly: its callers say it.
    assert adapter_allows(command, [*args, "--sysinit", "--readonly"]) is allowed
    if allowed and activates(args):
        # Only fenceless activates a shared VG's LVs: the wrapper refuses, on every host.
        assert (rc, seen) == (5, None)
        assert "would activate LVs of the shared VG sanvg" in err
        return
    wrapper_allows = rc == 0 and seen == [command, "--sysinit", "--readonly", *args]
    assert wrapper_allows is allowed
    if not allowed:
        assert (rc, seen) == (5, None)


def test_both_follow_a_change_of_the_policy(tmp_path, monkeypatch):
    """A made-up policy change reaches both: neither keeps a list of its own."""
    monkeypatch.setattr(policy, "REPORT_COMMANDS", (*policy.REPORT_COMMANDS, "lvfoo"))
    monkeypatch.setattr(policy, "ACTIVATION_VALUES",
                        tuple(v for v in policy.ACTIVATION_VALUES if v != "ln"))
    monkeypatch.setattr(policy, "FLAG_LONG", (*policy.FLAG_LONG, "--monitor"))
    monkeypatch.setattr(policy, "ACTIVATION_FLAGS", (*policy.ACTIVATION_FLAGS, "--monitor"))
    host = Host(tmp_path)
    assert host.run("lvm", "lvfoo", "sanvg")[:2] == (0, ["lvfoo", "--readonly", "sanvg"])
    assert "--readonly" in reader().argv("lvfoo", ["sanvg"])
    assert host.run("lvchange", "-aln", "sanvg/x")[:2] == (5, None)
    assert not adapter_allows("lvchange", ["-aln", "--sysinit", "--readonly", "sanvg/x"])
    # --monitor became a flag a reader may pass: "sanvg/x" is a positional, not its value.
    rc, seen, _ = host.run("lvchange", "-an", "--monitor", "sanvg/x")
    assert (rc, seen) == (0, ["lvchange", "--sysinit", "--readonly", "-an", "--monitor",
                              "sanvg/x"])
    assert policy.options(["-an", "--monitor", "sanvg/x"]) == [("-a", "n"), ("--monitor", None)]
    assert adapter_allows("lvchange", ["-an", "--monitor", "--sysinit", "--readonly", "sanvg/x"])


def test_the_wrapper_follows_the_policys_guard_lists(tmp_path, monkeypatch):
    """The guard's own lists reach the wrapper too: none is kept in the sh."""
    monkeypatch.setattr(policy, "CONTROL_LV", "ctl-lv")
    monkeypatch.setattr(policy, "LONG_RUNNING_COMMANDS", ("lvrename",))
    monkeypatch.setattr(policy, "DEVICE_COMMANDS", ("lvs",))
    host = Host(tmp_path)
    host.role(("sanvg", "writer", "h2", 7, 60.0), ("vg2", "writer", "h2", 3, 60.0))
    assert host.run("lvchange", "--addtag", "t", "sanvg/ctl-lv")[:2] == (5, None)
    assert host.run("lvchange", "--addtag", "t", "sanvg/fenceless-ctl")[0] == 0
    assert host.run("lvrename", "sanvg/a", "sanvg/b")[:2] == (5, None)
    assert host.run("pvmove", "/dev/sdc")[0] == 0
    assert host.run("lvs", "x")[1] == ["lvs", "--config", wrapper.RO_OFF, "x"]
    host.role(("sanvg", "writer", "h2", 7, 60.0))
    assert host.run("lvs", "x")[1] == ["lvs", "--readonly", "x"]  # a device: every VG


def test_forwarding_hints_are_for_metadata_commands():
    for command in wrapper.FORWARDED:
        assert policy.kind(command) is policy.Kind.METADATA


def test_every_placeholder_is_filled(host):
    found = set(re.findall(r"@([A-Z][A-Z0-9_]*)@", wrapper.template()))
    assert {"REPORT_COMMANDS", "NEUTRAL_COMMANDS", "ACTIVATION_COMMANDS", "METADATA_COMMANDS",
            "ACTIVATION_FLAGS", "ACTIVATION_VALUES", "FLAG_LONG", "VALUE_LONG", "SHORT_OPTIONS",
            "UDEV_SCAN_TEST", "DEVICE_COMMANDS", "PV_AFTER_FIRST_COMMANDS",
            "LONG_RUNNING_COMMANDS", "LV_WIDE_COMMANDS", "LV_REMOVE_COMMAND",
            "VG_REMOVING_COMMANDS", "ACTIVATING_COMMANDS", "ACTIVATES_BY_DEFAULT",
            "DEACTIVATION_VALUES", "ABBREVIABLE_OPTIONS", "FL_CTL", "FL_ROLE_HEADER",
            "FL_BOOT_ID"} <= found
    assert not re.search(r"@[A-Z][A-Z0-9_]*@", wrapper.generate(host.settings))


def test_an_unknown_placeholder_is_an_error(host, monkeypatch):
    monkeypatch.setattr(wrapper, "template", lambda: "#!/bin/sh\n@NO_SUCH_THING@\n")
    with pytest.raises(ValueError, match="@NO_SUCH_THING@"):
        wrapper.generate(host.settings)


def test_a_value_is_never_filled_in_again(tmp_path):
    host = Host(tmp_path)
    settings = dataclasses.replace(host.settings, host="@FL_REAL@")
    text = wrapper.generate(settings)
    assert "FL_HOST=@FL_REAL@\n" in text
    assert "guard for host @FL_REAL@," in text


def test_the_option_tables_cover_every_command():
    assert not set(policy.FLAG_LONG) & set(policy.VALUE_LONG)
    assert {"--activate", "--select", "--config", "--size", "--name"} <= set(policy.VALUE_LONG)
    commands = (*policy.REPORT_COMMANDS, *policy.NEUTRAL_COMMANDS, *policy.ACTIVATION_COMMANDS,
                *policy.METADATA_COMMANDS)
    for command in commands:
        if command in ("version", "types"):  # no options of their own
            continue
        flags, values = policy.SHORT_OPTIONS[command]
        assert not set(flags) & set(values), command
        assert set(flags) >= set("dhqtvy") - set(values), command  # LVM's common options
    assert "a" in policy.SHORT_OPTIONS["lvchange"][1] and "a" in policy.SHORT_OPTIONS["lvs"][0]
    assert "f" in policy.SHORT_OPTIONS["vgextend"][0]
