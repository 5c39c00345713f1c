"""``fenceless watchdog``: the per-host daemon that fences a host's work when its leases lapse.

``Watch`` is the decision (pure, on an injected clock): who is armed until
when, and who is overdue. ``Watchdog`` is the process around it: a Unix
socket for the agent, a check every ``TICK`` seconds, the kill, the record,
and (when there is one) the hardware watchdog device.

When it fires it does what a reset would, in this order: SIGKILL the agent
(only the very process that armed it: pid and start time must match), kill
the host's work cgroup as a whole (LVM children, later VMs), run the host's
extra reset steps (the lab unmaps the host's LVs), and record it. A
hardware device is petted only while nothing is left overdue: if the work
does not die (a process stuck in a hung write survives SIGKILL), the device
is left alone and the hardware resets the host before 14N.
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fenceless.cgroup import WorkGroup
from fenceless.clock import Clock
from fenceless.watchdog import protocol as wp

TICK = 0.05  # seconds between checks
KILL_GRACE = 2.0  # seconds the killed work has to be gone before the hardware may reset


@dataclass
class Client:
    """One agent, as it registered: its deadlines per VG."""

    pid: int = 0
    start: int = 0
    arms: dict[str, float] = field(default_factory=dict)
    connected: bool = True
    fired: bool = False


@dataclass(frozen=True)
class Firing:
    client: Client
    vgs: tuple[str, ...]
    at: float


class Watch:
    """The watchdog's decision, with no I/O: tested on a fake clock."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.clients: list[Client] = []

    def receive(self, client: Client, msg: wp.Message) -> None:
        if isinstance(msg, wp.Hello):
            client.pid, client.start = msg.pid, msg.start
        elif isinstance(msg, wp.Arm):
            client.arms[msg.vg] = msg.fire_at
        elif isinstance(msg, wp.Disarm):
            client.arms.pop(msg.vg, None)
        elif client.arms:
            client.connected = False  # a bye while armed: keep watching the deadlines
        else:
            self.forget(client)

    def forget(self, client: Client) -> None:
        if client in self.clients:
            self.clients.remove(client)

    def due(self) -> list[Firing]:
        """Clients past a deadline, once each."""
        now = self.clock.now()
        out = []
        for c in self.clients:
            late = tuple(sorted(vg for vg, t in c.arms.items() if t <= now))
            if late and not c.fired:
                c.fired = True
                c.arms.clear()
                out.append(Firing(c, late, now))
        return out

    def closed(self, client: Client) -> None:
        """The connection went away: deadlines stand; a disarmed client is forgotten."""
        client.connected = False
        if not client.arms:
            self.forget(client)


class Watchdog:
    """The daemon: socket, ticks, kills, records, and the hardware device if any."""

    def __init__(self, state_dir: str, workgroup: WorkGroup | None, clock: Clock,
                 log: Callable[[str], None], device: Any = None,
                 reset_extra: Callable[[], None] | None = None,
                 run_dir: str | None = None) -> None:
        self.state_dir = state_dir  # the record of firings (it must outlive a reset)
        self.run_dir = run_dir or state_dir  # the socket
        self.workgroup = workgroup
        self.watch = Watch(clock)
        self.log = log
        self.device = device  # a HardwareWatchdog, or None (the lab's stand-in)
        self.reset_extra = reset_extra
        self.record_path = os.path.join(state_dir, "watchdog-fired.jsonl")
        self.unresolved = 0.0  # when work survived a kill (0: none)
        self.stop = False

    # --- firing -------------------------------------------------------------------

    def fire(self, firing: Firing) -> dict[str, Any]:
        c = firing.client
        self.log(f"!!! WATCHDOG FIRES: the agent (pid {c.pid}) did not re-arm "
                 f"{', '.join(firing.vgs)} in time; killing its work as a reset would")
        killed_agent = False
        if c.pid and wp.start_time(c.pid) == c.start:
            with contextlib.suppress(ProcessLookupError):
                os.kill(c.pid, signal.SIGKILL)
                killed_agent = True
        errors = []
        if self.workgroup is not None:
            try:
                self.workgroup.kill()
            except OSError as exc:
                errors.append(str(exc))
        extra_ok = True
        if self.reset_extra is not None:
            try:
                self.reset_extra()
            except Exception as exc:  # a reset step that fails must not stop the others
                errors.append(f"{type(exc).__name__}: {exc}")
                extra_ok = False  # e.g. a VM that survived its kill: as work that survived
        gone = (self.workgroup is None or self.workgroup.wait_empty(KILL_GRACE)) and extra_ok
        if not gone:
            self.unresolved = self.watch.clock.now()
            self.log("!!! work survived the kill (stuck in I/O?): not petting the hardware "
                     "watchdog any more" if self.device else "!!! work survived the kill")
        record = {"fired_at": firing.at, "wall": time.time(), "pid": c.pid,
                  "agent_killed": killed_agent, "vgs": list(firing.vgs),
                  "work_gone": gone, "errors": errors}
        with open(self.record_path, "a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
        return record

    def check(self) -> None:
        for firing in self.watch.due():
            self.fire(firing)
        if self.device is not None and not self.unresolved:
            self.device.pet()

    # --- the socket ---------------------------------------------------------------

    def serve(self, ready: Callable[[], None] | None = None) -> None:
        path = wp.socket_path(self.run_dir)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.makedirs(self.run_dir, exist_ok=True)
        os.makedirs(self.state_dir, exist_ok=True)
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o077)
        try:
            server.bind(path)
        finally:
            os.umask(old)
        server.listen(8)
        sel = selectors.DefaultSelector()
        sel.register(server, selectors.EVENT_READ, None)
        buffers: dict[socket.socket, tuple[Client, bytearray]] = {}
        if ready is not None:
            ready()
        try:
            while not self.stop:
                for key, _ev in sel.select(TICK):
                    if key.data is None:
                        conn, _ = server.accept()
                        client = Client()
                        self.watch.clients.append(client)
                        buffers[conn] = (client, bytearray())
                        sel.register(conn, selectors.EVENT_READ, client)
                    else:
                        self._read(sel, key.fileobj, buffers)  # type: ignore[arg-type]
                self.check()
        finally:
            for conn in list(buffers):
                conn.close()
            server.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    def _read(self, sel: selectors.BaseSelector, conn: socket.socket,
              buffers: dict[socket.socket, tuple[Client, bytearray]]) -> None:
        client, buf = buffers[conn]
        try:
            data = conn.recv(4096)
        except OSError:
            data = b""
        if not data:
            sel.unregister(conn)
            conn.close()
            del buffers[conn]
            self.watch.closed(client)
            return
        buf += data
        while b"\n" in buf:
            line, _, rest = bytes(buf).partition(b"\n")
            buf[:] = rest
            try:
                msg = wp.parse(line.decode("ascii", "replace"))
            except wp.BadMessage as exc:
                self.log(f"watchdog: {exc}")
                continue
            self.watch.receive(client, msg)
            if isinstance(msg, wp.Hello):
                with contextlib.suppress(OSError):
                    conn.sendall(b"ok\n")
        if len(buf) > wp.MAX_LINE:
            buf.clear()


def read_fired(state_dir: str) -> list[dict[str, Any]]:
    """What this host's watchdog recorded when it fired, oldest first."""
    try:
        with open(os.path.join(state_dir, "watchdog-fired.jsonl")) as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        return []
    out = []
    for line in lines:
        with contextlib.suppress(ValueError):
            out.append(json.loads(line))
    return out
