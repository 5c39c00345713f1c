"""Activation behind one interface: device-mapper in production, loop devices in the lab.

A reader host must never run ``lvchange --refresh`` (it takes no ``--readonly``
and may rewrite metadata), so a reader refreshes an active LV by reloading
its device-mapper table, built from metadata it read with ``--readonly``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from fenceless.lvm.adapter import Lvm, Role
from fenceless.lvm.mapping import dm_name, dm_table
from fenceless.runner import Runner


@dataclass(frozen=True)
class ActiveLv:
    vg: str
    lv: str
    device: str
    size: int
    readonly: bool


class Activator(Protocol):
    def activate(self, lv: str, *, readonly: bool) -> ActiveLv: ...

    def deactivate(self, lv: str) -> None: ...

    def refresh(self, lv: str) -> ActiveLv: ...

    def active(self) -> list[ActiveLv]: ...


def _devnum(path: str) -> str:
    st = os.stat(path)
    return f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"


@dataclass
class LvmActivator:
    """Production activation through LVM and device-mapper."""

    lvm: Lvm
    runner: Runner
    devnum: Callable[[str], str] = field(default=_devnum)

    def _info(self, lv: str, readonly: bool) -> ActiveLv:
        size = next((x.size for x in self.lvm.lvs() if x.name == lv), 0)
        return ActiveLv(self.lvm.vg.name, lv, f"/dev/{self.lvm.vg.name}/{lv}", size, readonly)

    def activate(self, lv: str, *, readonly: bool) -> ActiveLv:
        self.lvm.activate(lv)
        return self._info(lv, readonly or self.lvm.role is Role.READER)

    def deactivate(self, lv: str) -> None:
        self.lvm.deactivate(lv)

    def refresh(self, lv: str) -> ActiveLv:
        if self.lvm.role is Role.WRITER:
            self.lvm.run("lvchange", "--refresh", f"{self.lvm.vg.name}/{lv}")
        else:
            table = self.reader_table(lv)
            name = dm_name(self.lvm.vg.name, lv)
            self.runner.run(["dmsetup", "reload", name], input=table, timeout=self.lvm.timeout)
            self.runner.run(["dmsetup", "resume", name], timeout=self.lvm.timeout)
        return self._info(lv, self.lvm.role is Role.READER)

    def reader_table(self, lv: str) -> str:
        """The table a reader loads, from ``--readonly`` metadata only."""
        pvs = {p.name: p for p in self.lvm.pvs()}
        vg = self.lvm.vg_info()
        devnums = {name: self.devnum(name) for name in pvs}
        return dm_table(self.lvm.segments(lv), pvs, vg.extent_size, vg.name, lv, devnums)

    def active(self) -> list[ActiveLv]:
        out = self.runner.run(["dmsetup", "ls"], timeout=self.lvm.timeout, check=False).stdout
        prefix = dm_name(self.lvm.vg.name, "")
        names = {line.split()[0] for line in out.splitlines() if line.strip()}
        lvs = {dm_name(self.lvm.vg.name, x.name): x for x in self.lvm.lvs()}
        return [ActiveLv(x.vg_name, x.name, f"/dev/{x.vg_name}/{x.name}", x.size, False)
                for n, x in lvs.items() if n in names and n.startswith(prefix)]
