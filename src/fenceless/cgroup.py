"""The cgroup (v2) that holds a host's fenceable work: the writer's LVM children, later VMs.

Why a cgroup: a process stuck in a hung write, or an LVM command whose agent
was frozen, must never outlive the lease that allowed it. A cgroup lets the
watchdog (and the agent) kill all of that work in one step (``cgroup.kill``),
children of children included, and tell when it is really gone
(``populated 0`` in ``cgroup.events``). A handover waits for that.

The cgroup v2 hierarchy is found from /proc/self/mountinfo (``/sys/fs/cgroup``
on a unified system, ``/sys/fs/cgroup/unified`` on a hybrid one). A path in
the config is taken relative to that root. Domain code gets a ``WorkGroup``
and never writes cgroup files itself.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

from fenceless.errors import ExecError


class CgroupError(ExecError):
    """cgroup {path}: {detail}"""


def cgroup2_root(mountinfo: str = "/proc/self/mountinfo") -> str | None:
    """Where the cgroup v2 hierarchy is mounted, or None."""
    try:
        lines = Path(mountinfo).read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        left, _, right = line.partition(" - ")
        if right.split(" ", 1)[0] == "cgroup2":
            return left.split()[4]
    return None


class WorkGroup:
    """One cgroup: processes join it at their start; it is killed as a whole."""

    def __init__(self, path: str) -> None:
        self.path = path

    @classmethod
    def under_root(cls, relative: str) -> WorkGroup:
        root = cgroup2_root()
        if root is None:
            raise CgroupError(path=relative, detail="no cgroup v2 hierarchy is mounted")
        return cls(os.path.join(root, relative.strip("/")))

    def create(self) -> WorkGroup:
        try:
            os.makedirs(self.path, exist_ok=True)
        except OSError as exc:
            raise CgroupError(path=self.path, detail=exc.strerror or str(exc)) from exc
        if not os.path.exists(os.path.join(self.path, "cgroup.procs")):
            raise CgroupError(path=self.path, detail="not a cgroup v2 directory")
        return self

    def child(self, name: str) -> WorkGroup:
        return WorkGroup(os.path.join(self.path, name))

    def procs_fd(self) -> int:
        """An fd of ``cgroup.procs``, for a child to move itself in before it execs."""
        try:
            return os.open(os.path.join(self.path, "cgroup.procs"), os.O_WRONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise CgroupError(path=self.path, detail=exc.strerror or str(exc)) from exc

    def add(self, pid: int) -> None:
        try:
            Path(self.path, "cgroup.procs").write_text(str(pid))
        except OSError as exc:
            raise CgroupError(path=self.path, detail=exc.strerror or str(exc)) from exc

    def pids(self) -> list[int]:
        """Every process in the cgroup and below it."""
        out: list[int] = []
        for top, _dirs, files in os.walk(self.path):
            if "cgroup.procs" in files:
                with contextlib.suppress(OSError):
                    out += [int(x) for x in Path(top, "cgroup.procs").read_text().split()]
        return out

    def populated(self) -> bool:
        """Whether any process is left in it (or below it)."""
        try:
            events = Path(self.path, "cgroup.events").read_text()
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise CgroupError(path=self.path, detail=exc.strerror or str(exc)) from exc
        return "populated 1" in events

    def kill(self) -> None:
        """SIGKILL everything in it, now (cgroup.kill, kernels >= 5.14)."""
        if not os.path.isdir(self.path):
            return
        try:
            Path(self.path, "cgroup.kill").write_text("1")
        except OSError as exc:
            raise CgroupError(path=self.path, detail=exc.strerror or str(exc)) from exc

    def wait_empty(self, timeout: float, sleep: float = 0.02) -> bool:
        """True once nothing is left in it; False if something outlives ``timeout``
        (a process in uninterruptible sleep on a hung path survives SIGKILL)."""
        deadline = time.monotonic() + timeout
        while self.populated():
            if time.monotonic() >= deadline:
                return False
            time.sleep(sleep)
        return True
