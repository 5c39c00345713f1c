"""A live migration, run by the target host's agent: both hosts hold the disks for the
handoff only.

``vm migrate NAME --to HOST --live`` records the wish (``want``, live) with the
writer. HOST's VM worker then runs ``LiveMigrateOp``, in named steps, each
one recorded on the LUN before it is taken or after it is done:

1. ``begin``: the writer records the VM as *migrating* to this host. From then
   on, and only for this VM's disks, the source's read-write claim does not
   keep this host from mapping them (``ops/activation.py``); every third
   host is still refused.
2. ``map``: this host maps the disks, claims first, as for a start.
3. ``transfer``: libvirt moves the running guest (the source keeps it until the
   very end, and resumes it if anything fails).
4. ``done``: the writer records the VM on this host and names the source as
   still holding the disks (``left``); the source's worker unmaps them and
   says so (``released``): exclusivity is back.

If a step fails, the guest runs on the source still: this host unmaps what it
mapped and the writer records the migration as called off, with its reason.
An agent that dies part-way finds its VM *migrating* here when it comes back
(``settle``): a guest running here is finished (``done``), anything else is
rolled back. The source's watchdog and lease timer cover a dead source: its
guest is destroyed with it, and the migration fails here.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import suppress
from typing import Any

from fenceless.config import HostConfig
from fenceless.errors import FencelessError
from fenceless.hv.libvirt import LibvirtDriver
from fenceless.localstate import VmBusyHere, vm_lock
from fenceless.ops import vmquery
from fenceless.ops.requests import vm_request
from fenceless.ops.vmlife import VmLifecycleOp, own_disks

Call = Callable[[dict[str, Any]], dict[str, Any]]
STEPS = ("begin", "map", "transfer", "done")
TRANSFER_TIMEOUT = 300.0  # seconds before a migration that does not converge is aborted


class LiveMigrateOp(VmLifecycleOp):
    """On the target host, under its lock on the VM (a ``vm stop`` or ``vm start`` of it
    here waits its turn; the agent settles it only if this process died)."""

    def __init__(self, cfg: HostConfig, vg: str | None, name: str, call: Call,
                 here: LibvirtDriver, source_driver: Callable[[str], LibvirtDriver], *,
                 progress: Callable[[str], None] = lambda _step: None,
                 timeout: float = TRANSFER_TIMEOUT) -> None:
        self.cfg, self.vg, self.name, self.call = cfg, vg, name, call
        self.here = here
        self.source_driver = source_driver  # host name -> a driver of its libvirtd
        self.progress = progress
        self.timeout = timeout
        self.modes: dict[str, str] = {}  # volume -> "rw" | "ro", once begun

    def place(self, action: str, **extra: Any) -> dict[str, Any]:
        request = vm_request("vm-place", self.name, host=self.cfg.host, action=action)
        request["args"].update(extra)
        return self.call({"op": "vm", "vg": self.vg, "request": request})

    def execute(self) -> dict[str, Any]:
        self.progress("begin")
        begun = self.place("migrate-begin")
        source = str(begun["host"])
        self.modes = {d[1]: d[2] for d in begun["disks"]}
        mapped: list[str] = []
        try:
            self.progress("map")
            paths: dict[str, str] = {}
            for disk in begun["disks"]:
                volume, target, mode = disk[1], disk[0], disk[2]
                got = self.call({"op": "activate", "vg": self.vg, "lv": volume,
                                 "readonly": mode == "ro", "vm": self.name})
                mapped.append(volume)
                paths[target] = str(got["device"])
            self.progress("transfer")
            src = self.source_driver(source)
            try:
                src.migrate_live(self.name, self.here, paths,
                                 uri=self.cfg.migration_to(self.cfg.host),
                                 timeout=self.timeout)
            finally:
                src.close()
        except BaseException as exc:
            here = self._runs_here()
            if here is None:
                raise  # cannot tell: the migration stays recorded, settle decides later
            if not here:
                # Every disk of the VM, also one whose mapping's reply was lost.
                self.roll_back([d[1] for d in begun["disks"]], exc)
                raise
            # The transfer reported a failure, but the guest runs here: it moved.
        self.progress("done")
        done = self.place("migrate-done")
        return {"name": self.name, "host": self.cfg.host, "from": source, "state": "running",
                "epoch": done.get("epoch"), "live": True}

    def _runs_here(self) -> bool | None:
        """Whether the guest runs here now (None: libvirt cannot tell; then nothing is
        undone, since unmapping under a running guest is the one thing not to do)."""
        try:
            return self.here.is_running(self.name)
        except FencelessError:
            return None

    def roll_back(self, volumes: list[str], exc: BaseException) -> None:
        """Unmap the VM's disks here, then tell the writer the migration is off. A disk
        that does not unmap keeps the migration recorded as under way: the next
        ``settle`` tries again, and no other host may take the disk meanwhile. A
        read-only disk another VM here uses stays mapped."""
        disks = [{"volume": v, "mode": self.modes.get(v, "rw")} for v in volumes]
        for volume in reversed(own_disks(self.cfg, self.vg, self.name, disks)):
            try:
                self.call({"op": "deactivate", "vg": self.vg, "lv": volume})
            except FencelessError:
                return
        with suppress(FencelessError):
            self.place("migrate-abort", error=f"{self.cfg.host}: {exc}"[:300])

    def settle(self, disks: list[dict[str, Any]]) -> str:
        """For an agent that finds the VM *migrating* here with no migration running:
        finish it if the guest runs here, roll it back otherwise."""
        here = self._runs_here()
        if here is None:
            return "left as it is (libvirt here does not answer)"
        if here and not self.here.paused_by_migration(self.name):
            self.place("migrate-done")
            return "finished"
        if here:  # the incoming guest never got going here: the source still has it
            self.here.stop(self.name, force=True)
        self.modes = {d["volume"]: d["mode"] for d in disks}
        self.roll_back([d["volume"] for d in disks],
                       RuntimeError("the migration was interrupted (agent restart)"))
        return "rolled back"


def release(cfg: HostConfig, vg: str | None, name: str, call: Call,
            here: LibvirtDriver) -> bool:
    """On the source, after the guest moved: unmap its disks and tell the writer. False
    (and nothing done) while the guest still runs here, or a command here works on it.

    The writer recorded the guest on the target only once it ran there, so a copy
    left here paused by the migration is a stale one: it is destroyed first (resumed,
    it would be a second writer of the disks)."""
    try:
        with vm_lock(cfg.run_dir, name, wait=False):
            shown = vmquery.vm_show(cfg, vg, name)  # again, under the lock
            if shown.get("left") != cfg.host or shown["host"] == cfg.host:
                return False  # started here again meanwhile: its disks are its own
            if here.is_running(name):
                if not here.paused_by_migration(name):
                    return False
                here.stop(name, force=True)
            for volume in reversed(own_disks(cfg, vg, name, shown["disks"])):
                call({"op": "deactivate", "vg": vg, "lv": volume})
            request = vm_request("vm-place", name, host=cfg.host, action="released")
            call({"op": "vm", "vg": vg, "request": request})
            return True
    except VmBusyHere:
        return False
