"""What the agent tells the watchdog: one line per message, on a local Unix socket.

======================  ====================================================
``hello PID START``     this agent (its pid, and the pid's start time from
                        /proc/PID/stat, so a reused pid is never killed)
``arm VG FIRE_AT``      fire at CLOCK_BOOTTIME ``FIRE_AT`` unless re-armed
``disarm VG``           nothing exclusive held in VG any more
``bye``                 a planned stop with nothing armed: forget this agent
======================  ====================================================

The watchdog answers ``hello`` with ``ok`` and nothing else. A connection
that closes without ``bye`` leaves its deadlines standing: an agent that
died may have left work behind. Only the local agent talks here (the socket
is root's, in the host's run dir); lines are still parsed strictly.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

MAX_LINE = 512


class BadMessage(ValueError):
    """A line that is not one of the messages above."""


@dataclass(frozen=True)
class Hello:
    pid: int
    start: int


@dataclass(frozen=True)
class Arm:
    vg: str
    fire_at: float


@dataclass(frozen=True)
class Disarm:
    vg: str


@dataclass(frozen=True)
class Bye:
    pass


Message = Hello | Arm | Disarm | Bye


def socket_path(run_dir: str) -> str:
    """On the host's tmpfs (``run_dir``): nothing of it outlives a boot."""
    return os.path.join(run_dir, "watchdog.sock")


def encode(msg: Message) -> bytes:
    if isinstance(msg, Hello):
        text = f"hello {msg.pid} {msg.start}"
    elif isinstance(msg, Arm):
        text = f"arm {msg.vg} {msg.fire_at:.3f}"
    elif isinstance(msg, Disarm):
        text = f"disarm {msg.vg}"
    else:
        text = "bye"
    return (text + "\n").encode()


def parse(line: str) -> Message:
    words = line.split()
    try:
        if words[0] == "hello" and len(words) == 3:
            return Hello(int(words[1]), int(words[2]))
        if words[0] == "arm" and len(words) == 3:
            return Arm(words[1], float(words[2]))
        if words[0] == "disarm" and len(words) == 2:
            return Disarm(words[1])
        if words == ["bye"]:
            return Bye()
    except (IndexError, ValueError) as exc:
        raise BadMessage(f"not a watchdog message: {line!r}") from exc
    raise BadMessage(f"not a watchdog message: {line!r}")


def start_time(pid: int) -> int:
    """The process's start time (clock ticks after boot), 0 if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return 0
