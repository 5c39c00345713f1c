"""What an operation works with: this host's config, a runner, and LVM in a role.

Built once by the CLI (or the agent) and passed down, so operations never
reach for global state, subprocess or devices themselves.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field

from fenceless.config import HostConfig
from fenceless.guard.binary import resolve_lvm_binary
from fenceless.lvm.activation import Activator, LvmActivator
from fenceless.lvm.adapter import Lvm, Role
from fenceless.runner import Runner, SubprocessRunner


def dm_available() -> bool:
    """Whether this kernel has device-mapper; without it LVM runs metadata-only.

    The node /dev/mapper/control can exist (made by the lvm2 package) while the
    kernel has no driver behind it, so only a successful open counts.
    """
    try:
        fd = os.open("/dev/mapper/control", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    os.close(fd)
    return True


@dataclass
class Context:
    cfg: HostConfig
    runner: Runner = field(default_factory=SubprocessRunner)
    driver_loaded: Callable[[], bool] = dm_available

    def lvm(self, vg: str | None = None, role: Role = Role.READER) -> Lvm:
        return Lvm(self.runner, self.cfg, self.cfg.vg(vg), role=role,
                   driver_loaded=self.driver_loaded(), binary=resolve_lvm_binary(self.cfg))

    def activator(self, vg: str | None = None, role: Role = Role.READER) -> Activator:
        lvm = self.lvm(vg, role)
        if self.cfg.activation == "lab":
            from fenceless.lab.activation import LabActivator

            return LabActivator(lvm, self.runner, self.cfg.state_dir)
        return LvmActivator(lvm, self.runner)
