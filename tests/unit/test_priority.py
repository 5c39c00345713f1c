"""The agent's scheduling priority: real-time for itself, normal for its children."""

import os
import subprocess
import sys

CHILD = r"""
import os, subprocess, sys
from fenceless.agent.priority import raise_priority
got = raise_priority(lambda m: print("log:", m, file=sys.stderr))
mine = os.sched_getscheduler(0) & ~os.SCHED_RESET_ON_FORK
probe = "import os; print(os.sched_getscheduler(0), os.getpriority(os.PRIO_PROCESS, 0))"
child = subprocess.run([sys.executable, "-c", probe],
                       capture_output=True, text=True, check=True).stdout.split()
print(got, mine, *child)
"""


def test_agent_runs_round_robin_and_its_children_do_not():
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True,
                         check=True).stdout.split()
    got, mine, child_policy, child_nice = out[0], int(out[1]), int(out[2]), int(out[3])
    if os.geteuid() != 0:
        assert got in ("nice", "normal")
        return
    assert got == "rr"
    assert mine == os.SCHED_RR
    assert child_policy == os.SCHED_OTHER and child_nice == 0  # LVM is not real-time
