"""Scheduling priority for the agent: a busy host must not cost it its leases.

A lease renewal is a few milliseconds of work every 2N, but it must happen on
time. On a host whose CPUs are saturated (a boot storm of VMs, or hundreds of
CLI processes starting at once) a normal-priority daemon can wait longer than
its lease lasts, and the host then loses its leases for no fault of its own.
sanlock answers this by running at real-time round-robin priority; so do we.

SCHED_RESET_ON_FORK keeps LVM and every other child at normal priority. The
kernel applies it to new *threads* too, so the policy is per thread: each
thread that renews leases or does their I/O (the VG threads, the TimedIO
workers) calls ``raise_this_thread`` when it starts. Where the kernel refuses
real-time scheduling (a container without CAP_SYS_NICE, or a cgroup with no
real-time budget) the thread falls back to a high nice value (which its LVM
children inherit: they are its own work).

At the lowest real-time level the agent's threads run ahead of every
normal-priority thread, kernel workers included; the kernel's real-time
throttling (by default 5% of each second is left to the rest) keeps a
runaway from freezing the host. Their work is small and bounded per request.
"""

from __future__ import annotations

import os
from collections.abc import Callable

RT_PRIORITY = 1  # the lowest real-time level
NICE = -10


def raise_this_thread() -> str:
    """Raise the calling thread's priority: "rr", "nice" or "normal" (what it got)."""
    try:
        os.sched_setscheduler(0, os.SCHED_RR | os.SCHED_RESET_ON_FORK,
                              os.sched_param(RT_PRIORITY))
        return "rr"
    except (OSError, AttributeError):
        pass
    try:
        os.setpriority(os.PRIO_PROCESS, 0, NICE)  # on Linux: this thread only
    except OSError:
        return "normal"
    return "nice"


def raise_priority(log: Callable[[str], None]) -> str:
    """``raise_this_thread`` for the agent's first thread, saying what it could not get."""
    got = raise_this_thread()
    if got == "nice":
        log(f"WARNING: real-time scheduling refused; the agent runs at nice {NICE}. "
            "Under heavy CPU load lease renewals may be late")
    elif got == "normal":
        log("WARNING: cannot raise the agent's priority (neither real-time nor nice); "
            "under heavy CPU load its lease renewals may be late")
    return got
