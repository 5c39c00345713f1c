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
from typing import Any


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
                path = os.path.join(fd_dir, fd)
                # Only what is under /dev is looked at: stat of a file on a hung network
                # mount would hang the fence itself.
                if not os.readlink(path).startswith("/dev/"):
                    continue
                st = os.stat(path)
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


def mapped_path(cfg: Any, vg: str, lv: str) -> str | None:
    """Where this host has ``lv`` mapped, from local knowledge only (no LVM, no LUN I/O):
    device-mapper's name for LVM activation, the recorded loop device in the lab."""
    if getattr(cfg, "activation", "lvm") == "lab":
        import json

        rec = os.path.join(cfg.state_dir, "lab-active", vg, f"{lv}.json")
        try:
            with open(rec) as f:
                device = json.load(f).get("device")
        except (OSError, ValueError):
            return None
        return device if isinstance(device, str) else None
    return "/dev/mapper/" + vg.replace("-", "--") + "-" + lv.replace("-", "--")


def vg_devices(cfg: Any, vg: str) -> list[str]:
    """Every mapping of VG ``vg`` on this host, from local knowledge only."""
    if getattr(cfg, "activation", "lvm") == "lab":
        folder = os.path.join(cfg.state_dir, "lab-active", vg)
        lvs = [n[:-5] for n in os.listdir(folder)] if os.path.isdir(folder) else []
        return [d for d in (mapped_path(cfg, vg, lv) for lv in lvs) if d]
    prefix = vg.replace("-", "--") + "-"
    with contextlib.suppress(OSError):
        return ["/dev/mapper/" + n for n in os.listdir("/dev/mapper")
                if n.startswith(prefix) and not n[len(prefix):].startswith("-")]
    return []
