"""``fenceless agent``: the per-host daemon that holds this host's leases.

One thread per shared VG (``vg.py``), so that a hung or lost LUN never stops
work on another. Requests from the CLI (init, join, takeover, handover,
activation, restore, volume operations) arrive on the agent's socket
(``ipc.py``) and are carried out by the VG thread itself, between renewals,
so that exactly one thread ever touches a VG's leases.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, NamedTuple

from fenceless import __version__
from fenceless.agent.ipc import RawReply, Server, raw_reply
from fenceless.agent.keeper import Opener
from fenceless.agent.metrics import Metrics
from fenceless.agent.metrics import serve as serve_metrics
from fenceless.agent.priority import raise_priority
from fenceless.agent.vg import VgAgent
from fenceless.blockio import open_device
from fenceless.cgroup import CgroupError, WorkGroup
from fenceless.clock import Clock, SystemClock
from fenceless.config import HostConfig
from fenceless.errors import FencelessError, UserError
from fenceless.guard.role import RoleEntry, write_role_file
from fenceless.guard.role import entry as role_entry
from fenceless.ops.context import Context
from fenceless.runner import SubprocessRunner
from fenceless.watchdog.client import WatchdogClient


def _log_to_stderr(msg: str) -> None:
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    print(f"{stamp} {msg}", file=sys.stderr, flush=True)


def work_group(cfg: HostConfig, log: Callable[[str], None]) -> WorkGroup | None:
    """The host's work cgroup (its ``lvm`` child holds this agent's LVM commands)."""
    try:
        work = WorkGroup.under_root(cfg.cgroup).create()
        work.child("lvm").create()
    except CgroupError as exc:
        log(f"WARNING: no work cgroup ({exc}): LVM commands are killed with the agent "
            "(pdeathsig), but not as a whole, and a handover cannot wait for them")
        return None
    return work


GUARD_EVERY = 30.0  # seconds between two looks at this host's LVM guard


class CliOutput(NamedTuple):
    """The CLI's own printing, lent to the agent (an agent does not import the CLI)."""

    status: Callable[[dict[str, Any]], str]
    volume: Callable[[str, dict[str, Any]], str]
    error: Callable[[BaseException], str]


class NoCliOutput(UserError):
    """This agent was started without the CLI's output (one embedded in a test or a bench):
    the CLI answers by itself"""


class ConfigNotChecked(UserError):
    """The config file {path} changed since this agent started: read and check it anew"""


def config_key(path: str) -> list[int] | None:
    """(inode, size, mtime) of the config file, as ``cli/fast.py`` sends them."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_ino, st.st_size, st.st_mtime_ns]


class Agent:
    def __init__(self, cfg: HostConfig, *, auto_takeover: bool = False,
                 clock: Clock | None = None, opener: Opener = open_device,
                 log: Callable[[str], None] = _log_to_stderr,
                 ctx: Context | None = None, render: CliOutput | None = None) -> None:
        self.cfg = cfg
        self.render = render  # how the CLI prints what the agent answers for it
        # The config file as this agent checked it: a client that finds the same one
        # may skip checking it again (cli/fast.py).
        self.config_key = config_key(cfg.path)
        self.work = work_group(cfg, log)
        self.ctx = ctx or Context(cfg, runner=SubprocessRunner(
            workgroup=self.work.child("lvm") if self.work is not None else None))
        self.clock = clock or SystemClock()
        self.log = log
        self.auto_takeover = auto_takeover
        self.pid = os.getpid()
        self.lvm_version = "unknown"
        self.priority = "normal"
        self.roles: dict[str, RoleEntry] = {}
        self.role_lock = threading.Lock()
        self.watchdog = WatchdogClient(cfg.run_dir, log)
        self.vgs = {vg.name: VgAgent(cfg, vg, self.ctx, self.clock, opener, log,
                                     self.set_role, self.facts, self.watchdog, auto_takeover)
                    for vg in cfg.vgs}
        for v in self.vgs.values():
            v.port.work = self.work.child("lvm") if self.work is not None else None
        self.metrics: Metrics | None = None
        if cfg.metrics_listen or cfg.metrics_textfile:
            self.metrics = Metrics(cfg)
            for v in self.vgs.values():
                v.port.observe_lvm = self.metrics.observe_lvm
                v.mailboxes.on_request = self.metrics.request_observer(v.vg.name)
        self.server: Server | None = None
        self.guard_state = "unknown"  # published in the facts (watch_guard)
        self.guard_look = threading.Event()  # look at the guard now

    def facts(self) -> dict[str, Any]:
        """What every VG's lease sector says about this host besides its LVs."""
        # "vms": whether this host's agent runs VMs (a hypervisor is configured), so that
        # the writer refuses to ask it to start one.
        # "guard" and "io_timeout" are for `fenceless check` on any host (ops/check.py).
        return {"lvm_version": self.lvm_version, "priority": self.priority,
                "vms": bool(self.cfg.hypervisor_uri), "guard": self.guard_state,
                "io_timeout": self.cfg.io_timeout}

    def watch_guard(self, stop: threading.Event) -> None:
        """Look at this host's LVM guard now and every GUARD_EVERY seconds, in a thread of
        its own: it may run dpkg-divert, never on a thread that renews leases."""
        from fenceless.guard import install

        while True:
            try:
                st = install.status(self.cfg, self.ctx.runner, lvm_report=False)
                self.guard_state = str(st["state"])
            except (FencelessError, OSError) as exc:
                self.guard_state = "unknown"
                self.log(f"cannot look at the LVM guard: {exc}")
            self.guard_look.wait(GUARD_EVERY)
            self.guard_look.clear()
            if stop.is_set():
                return

    def set_role(self, entry: RoleEntry) -> None:
        """Rewrite the guard's role file with this VG's new entry (all VGs in one file)."""
        with self.role_lock:
            self.roles[entry.vg] = entry
            try:
                write_role_file(self.cfg.run_dir, list(self.roles.values()))
            except OSError as exc:
                self.log(f"cannot write the guard's role file: {exc}")

    def handle(self, request: dict[str, Any]) -> dict[str, Any] | RawReply:
        if request.get("op") == "status":
            # Answered here, in the socket's thread: a fresh read of the control area
            # (about 2 ms), never queued behind the VG thread's LVM work.
            from fenceless.ops.status import read_status

            vg_name = request.get("vg")
            render = request.get("render")
            if render is not None:
                self.check_renderable(request)
            result = read_status(self.cfg, vg_name if isinstance(vg_name, str) else None)
            if render == "json":
                return raw_reply("T", 0, json.dumps(result, indent=2, sort_keys=True) + "\n")
            if render == "text" and self.render is not None:
                return raw_reply("T", 0, self.render.status(result) + "\n")
            return result
        if request.get("op") == "volume-cli":
            return self.volume_cli(request)
        if request.get("op") == "guard-changed":
            self.guard_look.set()  # `fenceless guard install|remove` ran here
            return {}
        vg = self.cfg.vg(request.get("vg"))
        timeout = float(request.get("timeout", 60.0))
        return self.vgs[vg.name].submit(request, timeout)

    def check_renderable(self, request: dict[str, Any]) -> CliOutput:
        """Before any work for ``cli/fast.py``: refused (the CLI then does it all itself)
        unless its config is the one this agent checked and the CLI's output is here."""
        if request.get("config_key") != self.config_key:
            raise ConfigNotChecked(path=self.cfg.path)
        if self.render is None:
            raise NoCliOutput()
        return self.render

    def volume_cli(self, request: dict[str, Any]) -> RawReply:
        """A volume change from ``cli/fast.py``: checked here as the CLI checks it, then
        run as any request; the output (or the error) goes back ready to print."""
        cli_out = self.check_renderable(request)
        from fenceless.ops.requests import volume_request

        def text(field: str) -> str | None:
            value = request.get(field)
            return value if isinstance(value, str) else None

        sub = text("sub") or ""
        try:
            vg = self.cfg.vg(text("vg"))
            body = volume_request(sub, text("name") or "", size=text("size"),
                                  new_name=text("new_name"),
                                  shared_ro=request.get("shared_ro") is True,
                                  rid=text("rid"), user=lambda: text("user") or "-")
            timeout = float(request.get("timeout", 120.0))
            res = self.vgs[vg.name].submit({"op": "volume", "vg": vg.name, "request": body,
                                            "timeout": timeout}, timeout)
        except FencelessError as exc:
            return raw_reply("E", exc.exit_code, cli_out.error(exc))
        rc = 3 if res.get("not_refreshed") else 0
        out = json.dumps(res, indent=2, sort_keys=True) if request.get("render") == "json" \
            else cli_out.volume(sub, res)
        return raw_reply("T", rc, f"{out}\n")

    def run(self) -> int:
        self.priority = raise_priority(self.log)  # each lease thread raises its own too
        with contextlib.suppress(FencelessError):
            self.lvm_version = self.ctx.lvm().version()
        self.log(f"fenceless agent {__version__} on host {self.cfg.host} (pid {self.pid}), "
                 f"VGs: {', '.join(self.vgs)}; auto-takeover "
                 f"{'on' if self.auto_takeover else 'off'}; scheduling {self.priority}")
        stop = threading.Event()

        def on_signal(signum: int, _frame: Any) -> None:
            self.log(f"signal {signal.Signals(signum).name}: stopping")
            stop.set()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        for vg in self.vgs:
            self.set_role(role_entry(vg, "reader", None, 0, 0.0))
        self.watchdog.connect()  # or later: without it this host takes no exclusive work
        self.server = Server(self.cfg.state_dir, self.handle)
        self.server.start()
        threading.Thread(target=self.watch_guard, args=(stop,), name="guard",
                         daemon=True).start()
        if self.metrics is not None:
            threading.Thread(target=serve_metrics, args=(self.metrics, stop, self.log),
                             name="metrics", daemon=True).start()
        for v in self.vgs.values():
            v.thread.start()
            if v.vmwork is not None:
                v.vmwork.thread.start()
        stop.wait()
        self.server.close()
        self.stop()
        self.log("agent stopped")
        return 0

    def stop(self) -> None:
        """Stop every VG thread; release the leases of those that are idle."""
        for v in self.vgs.values():
            v.stop.set()
            if v.vmwork is not None:
                v.vmwork.stop.set()
        for v in self.vgs.values():
            self.set_role(role_entry(v.vg.name, "reader", None, 0, 0.0))
            v.thread.join(timeout=30)
            dev = v.keeper.dev
            if v.thread.is_alive() or (dev is not None and dev.abandoned):
                # Something may still be writing: releasing now would let others take
                # over at once. Leave the leases to run out (the dead time covers it).
                self.log(f"[{v.vg.name}] still busy: NOT releasing the leases; they "
                         "expire by themselves")
                continue
            if v.shutdown():
                self.watchdog.disarm(v.vg.name)  # released: FREE, its claims still count
        self.watchdog.bye()
