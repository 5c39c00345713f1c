"""The lab's per-host daemons: each host's agent, and its watchdog stand-in.

A lab host's agent runs inside the host's mount namespace like any command of
that host. Its watchdog runs there too, but as a process of its own, so a
test that freezes the agent (SIGSTOP) does not freeze the watchdog: when the
agent stops re-arming it, the watchdog kills the agent and the host's work
cgroup and unmaps the host's LVs, as a hardware reset would, and records
when (``watchdog-fired.jsonl`` in the host's state dir). The agent is started
only once its watchdog answers: without one it would take no exclusive work.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from fenceless.errors import LabError
from fenceless.lab.cluster import (
    _alive,
    _enter_argv,
    _lab_env,
    _proc_start_time,
    _write_state,
    find_host,
    host_dir,
    lab_dir,
    read_state,
)
from fenceless.runner import spawn_logged


def _start(path: str, name: str, kind: str, argv_tail: list[str], sock: str,
           extra: dict[str, Any]) -> int:
    d = lab_dir(path)
    state = read_state(d)
    h = find_host(d, state, name)
    if _daemon_alive(h, kind):
        raise LabError(dir=str(d), detail=f"the {kind} of {name} is already running "
                       f"(pid {h[kind + '_pid']})")
    argv = [*_enter_argv(d, state, name), sys.executable, "-m", "fenceless.cli.main",
            *argv_tail]
    pid = spawn_logged(argv, env=_lab_env(d, name),
                       log_path=str(host_dir(d, name) / f"{kind}.log"))
    _wait_for_socket(host_dir(d, name) / sock, pid, kind)
    for entry in state["hosts"]:
        if entry["name"] == name:
            entry[kind + "_pid"] = pid
            entry[kind + "_start"] = _proc_start_time(pid)
            entry.update(extra)
    _write_state(d, state)
    return pid


def start_watchdog(path: str, name: str) -> int:
    """The host's watchdog stand-in (no hardware device in a lab)."""
    return _start(path, name, "watchdog", ["watchdog"], "run/watchdog.sock", {})


def start_agent(path: str, name: str, extra: list[str] | None = None) -> int:
    """Start ``fenceless agent`` inside the host's namespace (its watchdog first)."""
    if watchdog_pid(path, name) is None:
        start_watchdog(path, name)
    return _start(path, name, "agent", ["agent", *(extra or [])], "state/agent.sock",
                  {"agent_args": list(extra or [])})


def _daemon_alive(entry: dict[str, Any], kind: str) -> bool:
    pid = entry.get(kind + "_pid")
    return isinstance(pid, int) and _proc_start_time(pid) == entry.get(kind + "_start") \
        and _alive(pid)


def _pid(path: str, name: str, kind: str) -> int | None:
    d = lab_dir(path)
    h = find_host(d, read_state(d), name)
    return int(h[kind + "_pid"]) if _daemon_alive(h, kind) else None


def agent_pid(path: str, name: str) -> int | None:
    return _pid(path, name, "agent")


def watchdog_pid(path: str, name: str) -> int | None:
    return _pid(path, name, "watchdog")


def signal_agent(path: str, name: str, sig: int, *, wait: float = 0.0,
                 kind: str = "agent") -> int:
    """Send a signal to a host's agent (stop, kill, SIGSTOP/SIGCONT in tests)."""
    d = lab_dir(path)
    pid = _pid(path, name, kind)
    if pid is None:
        raise LabError(dir=str(d), detail=f"the {kind} of {name} is not running")
    os.kill(pid, sig)
    deadline = time.monotonic() + wait
    while wait and time.monotonic() < deadline and _alive(pid):
        time.sleep(0.02)
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)
    return pid


def _wait_for_socket(path: Path, pid: int, kind: str, timeout: float = 15.0) -> None:
    """Return once the daemon answers on its socket (a stale socket file refuses)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(pid):
            raise LabError(dir=str(path.parents[2]), detail=f"the {kind} (pid {pid}) exited "
                           f"at start; see {path.parents[1] / (kind + '.log')}")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            try:
                sock.connect(str(path))
                return
            except OSError:
                time.sleep(0.02)
    raise LabError(dir=str(path.parents[2]), detail=f"the {kind} (pid {pid}) did not open "
                   f"{path} within {timeout:.0f}s")
