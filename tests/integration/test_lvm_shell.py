"""The writer's lvm shell against real LVM 2.03 on a loop device.

It must give the adapter the same answers as one process per command, start
once, say why a command failed, and keep the host's own lvm.conf (the profile
only adds the command log).
"""

from __future__ import annotations

import os

import pytest

from fenceless.config import HostConfig, VgConfig
from fenceless.errors import LvmError
from fenceless.lvm.adapter import Lvm, Role
from fenceless.lvm.shell import PROFILE_NAME, LvmShell, ShellRunner
from fenceless.runner import RecordingRunner, SubprocessRunner
from tests.integration.test_mda import Pv, pv  # noqa: F401  (the loop-device fixture)
from tests.unit.test_lvm_shell import gone

pytestmark = pytest.mark.lab


def adapters(pv: Pv) -> tuple[Lvm, Lvm, LvmShell, RecordingRunner]:  # noqa: F811
    host = HostConfig(path="-", host="h1", state_dir=str(pv.root / "state"), io_timeout=1.0,
                      vgs=(VgConfig(name="fx", devices=(pv.dev,)),),
                      lvm_system_dir=pv.env["LVM_SYSTEM_DIR"])
    vg = host.vgs[0]
    runner = SubprocessRunner()
    plain = Lvm(runner, host, vg, role=Role.WRITER, driver_loaded=False)
    shell = LvmShell(lambda argv, env: runner.spawn_lines(argv, env=env), host.lvm_binary,
                     plain.env())
    processes = RecordingRunner(runner)
    shelled = Lvm(ShellRunner(processes, shell), host, vg, role=Role.WRITER,
                  driver_loaded=False)
    return plain, shelled, shell, processes


def test_the_shell_answers_as_processes_do(pv):  # noqa: F811
    pv.lvm("pvcreate", "-q", pv.dev)
    pv.lvm("vgcreate", "-q", "fx", pv.dev)
    plain, shelled, shell, processes = adapters(pv)
    try:
        shelled.lvcreate("a", 8 << 20, ["fenceless_req_1"])
        shelled.lvcreate("b", 4 << 20)
        shelled.lvextend("b", 12 << 20)
        shelled.lvrename("a", "c")
        assert shelled.vg_and_lvs() == plain.vg_and_lvs()
        assert shelled.vg_and_lv("c") == plain.vg_and_lv("c")
        _vg, lvs = plain.vg_and_lvs()
        assert {lv.name: lv.size for lv in lvs} == {"b": 12 << 20, "c": 8 << 20}
        assert "fenceless_req_1" in plain.vg_and_lv("c")[1].tags
        with pytest.raises(LvmError, match='"b" already exists'):
            shelled.lvcreate("b", 4 << 20)
        shelled.lvremove("b")
        assert [lv.name for lv in plain.lvs()] == ["c"]
        assert shell.child is not None
        pid = shell.child.pid
        assert processes.calls == []  # every command went through the one shell
        assert shell.commands == 8  # 4 changes, 2 reports, 1 refused create, 1 remove
    finally:
        shell.close()
    assert gone(pid)
    # The profile sits in LVM's profile directory of this host's LVM_SYSTEM_DIR.
    assert os.path.exists(os.path.join(pv.env["LVM_SYSTEM_DIR"], "profile",
                                       PROFILE_NAME + ".profile"))


def test_a_change_writes_neither_lvms_archive_nor_its_backup(pv):  # noqa: F811
    """The history ring on the LUN and the agent's own copy take their place
    (localstate.write_metadata_copy): LVM's sync of two whole files was a third of a
    change's time."""
    pv.lvm("pvcreate", "-q", pv.dev)
    pv.lvm("vgcreate", "-q", "fx", pv.dev)
    lvm_dir = pv.root / "lvm"
    before = {d: set(os.listdir(lvm_dir / d)) for d in ("archive", "backup")}
    backup = (lvm_dir / "backup" / "fx").read_text()
    plain, shelled, shell, _ = adapters(pv)
    try:
        shelled.lvcreate("a", 4 << 20)
        plain.lvcreate("b", 4 << 20)
    finally:
        shell.close()
    assert {d: set(os.listdir(lvm_dir / d)) for d in ("archive", "backup")} == before
    assert (lvm_dir / "backup" / "fx").read_text() == backup
    assert [lv.name for lv in plain.lvs()] == ["a", "b"]


def test_the_vg_after_a_change_read_from_the_text_is_what_lvm_reports(pv):  # noqa: F811
    """lvm/lvtext.py against LVM's own report, after each kind of change fenceless makes."""
    from dataclasses import replace

    from fenceless.blockio import open_device
    from fenceless.lvm import mda
    from fenceless.lvm.lvtext import lv_from_text, vg_after

    pv.lvm("pvcreate", "-q", pv.dev)
    pv.lvm("vgcreate", "-q", "fx", pv.dev)
    plain, shelled, shell, _ = adapters(pv)
    dev = open_device(pv.dev)

    def report() -> tuple:
        vg, lvs = plain.vg_and_lvs()
        return replace(vg, mda_free=0), {lv.name: lv for lv in lvs}

    def after(before: tuple, gone: list[str], name: str | None) -> tuple:
        text, seqno = mda.read_metadata_text(dev)
        vg0, lvs0 = before
        old = lvs0.get(name) or next((lvs0[g] for g in gone if g in lvs0), None)
        lv = lv_from_text(text, name, vg0, old.attr if old else None,
                          state_known=False) if name else None
        vg = vg_after(vg0, lvs0, seqno, gone, lv)
        assert vg is not None and vg.mda_free == -1  # unknown until the next full report
        vg = replace(vg, mda_free=0)
        lvs = {k: v for k, v in lvs0.items() if k not in gone}
        if lv is not None:
            lvs[lv.name] = lv
        return vg, lvs

    try:
        shelled.lvcreate("keep", 8 << 20)
        steps = [
            (lambda: shelled.lvcreate("a", 8 << 20, ["fenceless_req_1", "fenceless_x"]),
             [], "a"),
            (lambda: shelled.lvextend("a", 20 << 20), [], "a"),
            (lambda: shelled.lvrename("a", "b"), ["a"], "b"),
            (lambda: shelled.lvpermission("b", readonly=True, tag="fenceless_vm_ro"), [], "b"),
            (lambda: shelled.lvremove("b"), ["b"], None),
        ]
        for change, gone, name in steps:
            before = report()
            change()
            assert after(before, gone, name) == report()
    finally:
        shell.close()
        dev.close()
