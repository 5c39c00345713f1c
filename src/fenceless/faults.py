"""Named crash points ("fist points"), so tests can kill a process exactly there.

``FENCELESS_CRASHPOINT=name`` makes the process SIGKILL itself when it reaches
that point: the nearest thing to pulling the plug at a chosen instant.
"""

from __future__ import annotations

import os
import signal

ENV = "FENCELESS_CRASHPOINT"


def crashpoint(name: str) -> None:
    wanted = os.environ.get(ENV)
    if wanted and wanted == name:
        os.kill(os.getpid(), signal.SIGKILL)
