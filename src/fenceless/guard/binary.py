"""Which LVM binary fenceless itself runs: the real one, past this host's guard.

fenceless's adapter already enforces the reader role before any process
starts, and the writer's agent must not depend on the role file it writes,
so the adapter bypasses the wrapper. The guard diverts the distribution's
binary to :data:`GUARDED_BINARY`: in a directory that is on no one's PATH
(mode 0700), so an admin cannot reach it by accident, and still named
``lvm``, because LVM takes its command from argv[0] unless that is ``lvm``.
"""

from __future__ import annotations

import os

from fenceless.config import HostConfig

# The distribution's path, as a config names it; /sbin links to /usr/sbin.
GUARDED_PATHS = ("/usr/sbin/lvm", "/sbin/lvm")
# Where the guard diverts the real binary to.
GUARDED_DIR = "/usr/libexec/fenceless"
GUARDED_BINARY = GUARDED_DIR + "/lvm"


def resolve_lvm_binary(cfg: HostConfig, guarded: str = GUARDED_BINARY) -> str:
    """The real binary when the guard is installed, else the configured one.

    A configured non-default binary is the admin's choice and is kept. When
    the diverted binary is missing the configured path (the wrapper, or the
    distribution's binary without the guard) is used: slower with the guard,
    and it enforces the same role, so it is safe.
    """
    if cfg.lvm_binary not in GUARDED_PATHS:
        return cfg.lvm_binary
    if os.path.isfile(guarded) and os.access(guarded, os.X_OK):
        return guarded
    return cfg.lvm_binary
