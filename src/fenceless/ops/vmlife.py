"""Starting and stopping a VM on this host: the grant, the disks, the domain, in order.

``vm start``: the writer grants the VM to this host (``vm-place``, recorded
with its epoch: from then on every other host's start is refused), then each
disk is mapped through the agent (a claim on the LUN first, read-write or
read-only), then libvirt starts the domain from the definition on the LUN
with the disks' paths on this host. Whatever fails undoes what was done, in
reverse: no disk stays mapped and no grant stays for a VM that did not start.

``vm stop``: the domain stops (shut down, or destroyed with ``--force``),
its disks are unmapped, and only then is the grant given back.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from contextlib import suppress
from typing import Any

from fenceless.config import HostConfig
from fenceless.errors import ExecError, FencelessError, UserError
from fenceless.faults import crashpoint
from fenceless.hv.domain import vm_name, with_disk_paths
from fenceless.hv.libvirt import LibvirtDriver, NoHypervisor
from fenceless.localstate import VmBusyHere, vm_lock
from fenceless.ops import vmquery
from fenceless.ops.activation import HeldElsewhere
from fenceless.ops.base import Operation
from fenceless.ops.requests import vm_request

Call = Callable[[dict[str, Any]], dict[str, Any]]


class NotHere(UserError):
    """Refused: VM {name} {what} on {host}, not here ({me}); run this there \
(`fenceless -c ... vm {verb} {name}` on {host})"""


def driver_for(cfg: HostConfig) -> LibvirtDriver:
    if not cfg.hypervisor_uri:
        raise NoHypervisor(config=cfg.path)
    return LibvirtDriver(cfg.hypervisor_uri)


class VmBusy(UserError):
    """Refused: another command on this host ({host}) is starting, stopping or migrating \
VM {name} right now; wait for it. Nothing was changed"""


LOCK_WAIT = 5.0  # seconds a command tries for the VM's lock: the agent's look is brief


class VmLifecycleOp(Operation):
    """A start, stop or migration on this host, in the phases of every operation: the
    name checked, this host's lock on the VM taken (``localstate.vm_lock``: a second
    command on the same VM here is refused, and the agent leaves a step alone while
    its process lives), the VM read from the LUN, the steps, each recorded by the writer
    (the grant before the disks are mapped, its return after they are unmapped). A step
    whose process died part-way is settled by this host's agent (``settle``)."""

    cfg: HostConfig
    name: str  # the VM's (Operation's class-level name is not used for these)

    def check_args(self) -> None:
        vm_name(self.name)

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        try:
            with vm_lock(self.cfg.run_dir, self.name, wait=LOCK_WAIT):
                yield
        except VmBusyHere as exc:
            raise VmBusy(name=self.name, host=self.cfg.host) from exc


class VmStartOp(VmLifecycleOp):
    """``vm start``, or (``recover``) ``vm recover``: the same, once the writer has seen
    the VM's host DEAD (its watchdog fenced the VM by then)."""

    def __init__(self, cfg: HostConfig, vg: str | None, name: str, call: Call,
                 driver: LibvirtDriver, *, recover: bool = False) -> None:
        self.cfg, self.vg, self.name, self.call, self.driver = cfg, vg, name, call, driver
        self.action = "recover" if recover else "start"
        self.readonly: set[str] = set()

    def check_prereq(self) -> None:
        vmquery.vm_show(self.cfg, self.vg, self.name)  # defined (the grant decides the rest)

    def execute(self) -> dict[str, Any]:
        vg = self.cfg.vg(self.vg).name
        mapped: list[str] = []
        granted: dict[str, Any] = {}
        try:
            granted = self.call({"op": "vm", "vg": self.vg, "request": vm_request(
                "vm-place", self.name, host=self.cfg.host, action=self.action)})
            # Read after the grant: an edit in between cannot have us map old disks.
            shown = vmquery.vm_show(self.cfg, self.vg, self.name)
            paths = {}
            for disk in shown["disks"]:
                if disk["mode"] == "ro":
                    self.readonly.add(disk["volume"])
                got = self.activate(disk)
                mapped.append(disk["volume"])
                paths[disk["volume"]] = str(got["device"])
            crashpoint("vm.start.mapped")
            self.driver.start(self.name, with_disk_paths(shown["xml"], vg, paths))
        except BaseException:
            self.undo(mapped)
            raise
        return {"name": self.name, "host": self.cfg.host, "state": "running",
                "epoch": granted.get("epoch"), "disks": paths,
                "version": granted.get("version", shown["version"])}

    def activate(self, disk: dict[str, Any]) -> dict[str, Any]:
        """Map one disk. For a recovery, the dead host's claim may still count here for a
        while: the writer saw it DEAD, and this host's own view of it follows within its
        next observations, so the mapping is tried again for up to 14N more."""
        request = {"op": "activate", "vg": self.vg, "lv": disk["volume"],
                   "readonly": disk["mode"] == "ro"}
        deadline = time.monotonic() + 14 * self.cfg.io_timeout + 2.0
        while True:
            try:
                return self.call(request)
            except HeldElsewhere:
                if self.action != "recover" or time.monotonic() > deadline:
                    raise
                time.sleep(self.cfg.io_timeout)

    def undo(self, mapped: list[str]) -> None:
        """Unmap what was mapped; give the grant back only if every disk is unmapped (a
        domain that started after all keeps its disk, and its grant says so)."""
        shown = [{"volume": v, "mode": "ro" if v in self.readonly else "rw"} for v in mapped]
        release_grant(self.cfg, self.vg, self.name, self.call,
                      own_disks(self.cfg, self.vg, self.name, shown))


class VmStopOp(VmLifecycleOp):
    def __init__(self, cfg: HostConfig, vg: str | None, name: str, call: Call,
                 driver: LibvirtDriver, *, force: bool, grace: float = 60.0) -> None:
        self.cfg, self.vg, self.name, self.call, self.driver = cfg, vg, name, call, driver
        self.force = force
        self.grace = grace  # seconds the guest has to shut down (without ``force``)
        self.shown: dict[str, Any] = {}

    def check_prereq(self) -> None:
        shown = self.shown = vmquery.vm_show(self.cfg, self.vg, self.name)
        if shown.get("moving_to"):
            from fenceless.ops.vm import VmBeingMigrated

            raise VmBeingMigrated(name=self.name, host=shown["host"],
                                  target=shown["moving_to"])
        if shown["host"] != self.cfg.host:
            raise NotHere(name=self.name, what="runs" if shown["host"] else "is stopped",
                          host=shown["host"] or "no host", me=self.cfg.host, verb="stop")

    def execute(self) -> dict[str, Any]:
        was_running = self.driver.stop(self.name, force=self.force, timeout=self.grace)
        crashpoint("vm.stop.domain-stopped")
        volumes = own_disks(self.cfg, self.vg, self.name, self.shown["disks"])
        for volume in reversed(volumes):
            self.call({"op": "deactivate", "vg": self.vg, "lv": volume})
        done = self.call({"op": "vm", "vg": self.vg, "request": vm_request(
            "vm-place", self.name, host=self.cfg.host, action="stop")})
        return {"name": self.name, "host": self.cfg.host, "state": "stopped",
                "was_running": was_running, "epoch": done.get("epoch")}


def own_disks(cfg: HostConfig, vg: str | None, name: str,
              disks: list[dict[str, Any]]) -> list[str]:
    """The volumes of VM ``name`` this host may unmap for it: all its disks, but a
    read-only one that another VM on this host has too (running or being migrated here)
    stays mapped for that VM."""
    me = cfg.host
    others = [v for v in vmquery.vm_list(cfg, vg) if v["name"] != name and
              ((v["host"] == me and v["state"] != "stopped") or v.get("moving_to") == me)]
    shared = {d["volume"] for v in others for d in v["disks"]}
    return [d["volume"] for d in disks if not (d["mode"] == "ro" and d["volume"] in shared)]


def release_grant(cfg: HostConfig, vg: str | None, name: str, call: Call,
                  volumes: list[str]) -> bool:
    """Unmap ``volumes`` (in reverse), then give the VM's grant back; the grant stays if a
    disk does not unmap (the grant is what says this host may still be writing it)."""
    for volume in reversed(volumes):
        try:
            call({"op": "deactivate", "vg": vg, "lv": volume})
        except FencelessError:
            return False
    with suppress(FencelessError):
        call({"op": "vm", "vg": vg, "request": vm_request(
            "vm-place", name, host=cfg.host, action="stop")})
    return True


def settle(cfg: HostConfig, vg: str | None, vm: dict[str, Any], call: Call,
           driver: LibvirtDriver) -> bool:
    """For the agent: VM ``vm`` is granted to this host, but no domain of it runs here and
    no command here works on it (its lock is free). A start or stop died part-way, or the
    guest powered itself off: unmap its disks and give the grant back (the step's
    roll-back, or the stop's end). False when there is nothing to settle."""
    try:
        with vm_lock(cfg.run_dir, vm["name"], wait=False):
            if driver.is_running(vm["name"]):
                if not vm.get("moving_to") and driver.paused_by_migration(vm["name"]):
                    # A live migration that was called off, its guest still paused here.
                    driver.resume(vm["name"])
                return False
            return release_grant(cfg, vg, vm["name"], call,
                                 own_disks(cfg, vg, vm["name"], vm["disks"]))
    except VmBusyHere:
        return False  # a command here works on it now


class MoveFailed(ExecError):
    """VM {name} was not {moved} {host}{still}: {error}"""


class MoveTimedOut(ExecError):
    """VM {name} is not running on {host} after {timeout:.0f}s (now: {now}); the request \
stands, and {host}'s agent acts on it when it can (see `fenceless vm list`)"""


def ask_move(cfg: HostConfig, vg: str | None, name: str, target: str, call: Call, *,
             force: bool, move: bool, timeout: float, poll: float = 0.3,
             live: bool = False,
             progress: Callable[[dict[str, Any]], None] = lambda _vm: None) -> dict[str, Any]:
    """``vm start --on HOST`` and ``vm migrate --to HOST``: the writer records that
    ``target`` should run the VM; the agents of the hosts concerned act on it
    (``agent/vmwork.py``). Waits until it runs there, or its start was abandoned."""
    request = vm_request("vm-place", name, host=target, action="want")
    request["args"].update(force=force, move=move, live=live)
    asked = call({"op": "vm", "vg": vg, "request": request})
    deadline = time.monotonic() + timeout
    while True:
        vm = next((v for v in vmquery.vm_list(cfg, vg) if v["name"] == name), None)
        if vm is None:
            raise vmquery.UnknownVm(name=name, vg=cfg.vg(vg).name, hint=" (undefined meanwhile)")
        progress(vm)
        if vm["host"] == target and vm["state"] == "running":
            return {"name": name, "host": target, "state": "running", "from": asked.get("from"),
                    "epoch": asked.get("epoch"), "live": live}
        if vm["want"] is None and vm["error"]:
            raise MoveFailed(name=name, host=target, error=vm["error"],
                             moved="migrated live to" if live else "started on",
                             still=f" (it runs on {vm['host']} still)"
                             if vm["host"] and vm["state"] == "running" else "")
        if time.monotonic() > deadline:
            raise MoveTimedOut(name=name, host=target, timeout=timeout,
                               now=f"{vm['state']} on {vm['host'] or 'no host'}")
        time.sleep(poll)
