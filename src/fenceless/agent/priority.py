"""Scheduling priority for the agent: a busy host must not cost it its leases.

A lease renewal is a few milliseconds of work every 2N, but it must happen on
time. On a host whose CPUs are saturated (a boot storm of VMs, or hundreds of
CLI processes starting at once) a normal-priority daemon can wait longer than
its lease lasts, and the host then loses its leases for no fault of its own.
sanlock answers this by running at real-time round-robin priority; so do we.

SCHED_RESET_ON_FORK keeps LVM and every other child at normal priority: only
the agent's own, short, renewal-bound work runs ahead of the rest. Where the
kernel refuses real-time scheduling (a container without CAP_SYS_NICE, or a
cgroup with no real-time budget) the agent falls back to a high nice value and
says so.
"""

from __future__ import annotations

import os
from collections.abc import Callable

RT_PRIORITY = 1  # the lowest real-time level: above every normal process, below kernel threads
NICE = -10


def raise_priority(log: Callable[[str], None]) -> str:
    """Raise this process's priority before its threads start (they inherit it).

    Returns what was obtained: "rr", "nice" or "normal".
    """
    try:
        os.sched_setscheduler(0, os.SCHED_RR | os.SCHED_RESET_ON_FORK,
                              os.sched_param(RT_PRIORITY))
        return "rr"
    except (OSError, AttributeError) as exc:
        rr_error = exc
    try:
        os.setpriority(os.PRIO_PROCESS, 0, NICE)
    except OSError as exc:
        log(f"WARNING: cannot raise the agent's priority (real-time: {rr_error}; "
            f"nice: {exc}); under heavy CPU load its lease renewals may be late")
        return "normal"
    log(f"WARNING: real-time scheduling refused ({rr_error}); running at nice {NICE}. "
        "Under heavy CPU load lease renewals may be late")
    return "nice"

