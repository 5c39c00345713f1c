"""The agent's end of the watchdog: arm after every good renewal, disarm when idle.

Messages are one short line each on a local socket; a send that fails means
the watchdog is gone, and the agent must then hold nothing exclusive (no
writer role, no new mappings): a frozen agent would have nobody to stop it.
Every VG thread arms its own VG, so the client is shared and locked.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from collections.abc import Callable
from typing import Protocol

from fenceless.watchdog import protocol as wp


class Fence(Protocol):
    """What the agent needs of a watchdog (the harness gives a fake one)."""

    @property
    def connected(self) -> bool: ...

    def arm(self, vg: str, fire_at: float) -> bool: ...

    def disarm(self, vg: str) -> bool: ...


class WatchdogClient:
    """A connection to this host's ``fenceless watchdog``, made again when it broke."""

    def __init__(self, run_dir: str, log: Callable[[str], None],
                 timeout: float = 0.5) -> None:
        self.path = wp.socket_path(run_dir)
        self.log = log
        self.timeout = timeout
        self.sock: socket.socket | None = None
        self.lock = threading.Lock()
        self.armed: dict[str, float] = {}
        self.warned = False

    @property
    def connected(self) -> bool:
        return self.sock is not None

    def _connect(self) -> bool:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.path)
            pid = os.getpid()
            sock.sendall(wp.encode(wp.Hello(pid, wp.start_time(pid))))
            if sock.recv(16) != b"ok\n":
                raise OSError("the watchdog did not answer")
        except OSError as exc:
            sock.close()
            if not self.warned:
                self.warned = True
                self.log(f"WARNING: no watchdog at {self.path} ({exc}): this host takes no "
                         "exclusive work (writer role, mappings) until one answers")
            return False
        self.sock = sock
        self.warned = False
        self.log(f"watchdog at {self.path}: connected")
        # A new connection starts with nothing armed on the watchdog's side.
        for vg, fire_at in self.armed.items():
            sock.sendall(wp.encode(wp.Arm(vg, fire_at)))
        return True

    def _send(self, msg: wp.Message) -> bool:
        with self.lock:
            if self.sock is None and not self._connect():
                return False
            assert self.sock is not None
            try:
                self.sock.sendall(wp.encode(msg))
            except OSError as exc:
                self.log(f"!!! watchdog connection lost: {exc}")
                self.sock.close()
                self.sock = None
                return False
            return True

    def connect(self) -> bool:
        with self.lock:
            return self.sock is not None or self._connect()

    def arm(self, vg: str, fire_at: float) -> bool:
        self.armed[vg] = fire_at
        return self._send(wp.Arm(vg, fire_at))

    def disarm(self, vg: str) -> bool:
        if vg not in self.armed and self.sock is not None:
            return True
        self.armed.pop(vg, None)
        return self._send(wp.Disarm(vg))

    def bye(self) -> None:
        """A planned stop: only once nothing is armed (else the deadlines stand)."""
        if not self.armed:
            self._send(wp.Bye())
        with self.lock, contextlib.suppress(OSError):
            if self.sock is not None:
                self.sock.close()
            self.sock = None
