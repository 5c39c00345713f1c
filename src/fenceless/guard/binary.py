"""Which LVM binary fenceless itself runs: the real one, past this host's guard.

fenceless's adapter already enforces the reader role before any process
starts, and the writer's agent must not depend on the role file it writes,
so the adapter bypasses the wrapper. LVM takes its command from argv[0]
unless that is ``lvm``, so the diverted ``lvm.distrib`` cannot be run by that
name: the guard keeps a link named ``lvm`` to it in the state dir.
"""

from __future__ import annotations

import os
from pathlib import Path

from fenceless.config import HostConfig

# The distribution's path, as a config names it; /sbin links to /usr/sbin.
GUARDED_PATHS = ("/usr/sbin/lvm", "/sbin/lvm")
LINK = "guard/lvm"


def lvm_link(state_dir: str) -> Path:
    """The guard's link named ``lvm`` to the diverted real binary."""
    return Path(state_dir) / LINK


def resolve_lvm_binary(cfg: HostConfig) -> str:
    """The real binary when the guard is installed, else the configured one.

    A configured non-default binary is the admin's choice and is kept. If the
    link is missing or dangling the configured path (the wrapper) is used:
    slower, and it enforces the same role, so it is safe.
    """
    if cfg.lvm_binary not in GUARDED_PATHS:
        return cfg.lvm_binary
    link = lvm_link(cfg.state_dir)
    if os.path.isfile(link) and os.access(link, os.X_OK):
        return str(link)
    return cfg.lvm_binary
