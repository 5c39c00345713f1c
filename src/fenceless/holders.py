"""The processes that hold a block device open: how a fence finds a host's VMs.

A VM's QEMU is not in the agent's work cgroup (libvirt starts it), and a
hung libvirtd must not keep it alive. What makes a process dangerous after
the lease is gone is the open disk: so the fence looks for every process with
a file descriptor on one of the host's mapped shared volumes (``/proc/PID/fd``,
by device number) and kills it. This is the VM fence: the host itself stays.
"""

from __future__ import annotations

import contextlib
import os
import signal
import stat
from collections.abc import Iterable


def _rdevs(devices: Iterable[str]) -> set[int]:
    out = set()
    for path in devices:
        with contextlib.suppress(OSError):
            st = os.stat(path)
            if stat.S_ISBLK(st.st_mode):
                out.add(st.st_rdev)
    return out


def holders(devices: Iterable[str], proc: str = "/proc") -> list[int]:
    """Pids of the processes with one of ``devices`` open (not this process)."""
    wanted = _rdevs(devices)
    found: list[int] = []
    if not wanted:
        return found
    me = os.getpid()
    for entry in os.listdir(proc):
        if not entry.isdigit() or int(entry) == me:
            continue
        fd_dir = os.path.join(proc, entry, "fd")
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue
        for fd in fds:
            with contextlib.suppress(OSError):
                st = os.stat(os.path.join(fd_dir, fd))
                if stat.S_ISBLK(st.st_mode) and st.st_rdev in wanted:
                    found.append(int(entry))
                    break
    return sorted(found)


def kill_holders(devices: Iterable[str]) -> list[int]:
    """SIGKILL every process holding one of ``devices``; the pids signalled."""
    killed = []
    for pid in holders(list(devices)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
    return killed
