"""The agent's VM worker: it does on this host what another host asked for on the LUN.

``vm start NAME --on HOST`` and ``vm migrate NAME --to HOST`` run on any host:
they ask the writer to record that HOST should run the VM (``want`` in the VM
index). Every agent's worker reads the index (from the LUN, every
``POLL_N`` N) and acts on what concerns its host:

- the VM runs here and is wanted elsewhere: stop it here (a shutdown request,
  or destroy when asked with ``--force``), unmap its disks, give the grant
  back; the wanted host then sees it stopped;
- the VM is wanted here and stopped: start it here (the writer's grant, the
  disks, libvirt), exactly as ``vm start`` on this host does;
- the VM is wanted here *live* and runs elsewhere: migrate it here
  (``ops/vmlive.py``; the source's worker does nothing but, once the guest
  left, unmap its disks: ``left``);
- the VM is recorded as migrating here, but no migration runs (this agent
  restarted part-way): finish it or roll it back;
- the VM is granted here, but no domain of it runs and no command here works
  on it (``localstate.vm_lock`` is free): a start or stop died part-way, or the
  guest powered itself off. Its disks are unmapped and its grant returned.

A start that fails is abandoned with its error in the index (the asking CLI
reports it), so no host retries it forever. The worker is a thread of its
own: libvirt and LVM may be slow, and the lease thread must never wait for
them; it reaches the agent through the same request queue as a local CLI.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import suppress
from typing import Any

from fenceless.config import HostConfig
from fenceless.errors import FencelessError
from fenceless.hv.libvirt import LibvirtDriver
from fenceless.ops import vmlife, vmlive, vmquery
from fenceless.ops.requests import vm_request

POLL_N = 5  # the worker reads the VM index every 5N (and at most every POLL_MIN s):
POLL_MIN = 2.0  # each read opens the LUN and parses the ledger, beside the lease thread
STOP_GRACE = 30.0  # seconds a guest gets to shut down before a move gives up
ABORT_EVERY = 30.0  # seconds between a source's calls to end a migration whose target died


class VmWorker:
    def __init__(self, cfg: HostConfig, vg: str, submit: Callable[[dict[str, Any]], Any],
                 n: Callable[[], float], log: Callable[[str], None],
                 ready: Callable[[], bool] = lambda: True) -> None:
        self.cfg, self.vg, self.submit, self.n, self.log = cfg, vg, submit, n, log
        self.ready = ready  # a member with its host lease: before that there is nothing to do
        self.stop = threading.Event()
        self.abort_asked: dict[str, float] = {}  # VM -> when this host last asked
        self.thread = threading.Thread(target=self.loop, name=f"vm-{vg}", daemon=True)

    @contextlib.contextmanager
    def driver(self) -> Iterator[LibvirtDriver]:
        """A connection to this host's libvirtd for one action, closed after it."""
        driver = vmlife.driver_for(self.cfg)
        try:
            yield driver
        finally:
            driver.close()

    def call(self, request: dict[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = self.submit({**request, "vg": self.vg})
        return result

    def loop(self) -> None:
        while not self.stop.wait(max(POLL_N * self.n(), POLL_MIN)):
            if not self.ready():
                continue
            try:
                self.round()
            except FencelessError as exc:
                self.log(f"vm worker: {exc}")
            except Exception as exc:  # the worker must outlive a bug in one round
                self.log(f"vm worker: internal error: {type(exc).__name__}: {exc}")

    def round(self) -> None:
        for vm in vmquery.vm_list(self.cfg, self.vg):
            try:
                self.act_on(vm)
            except FencelessError as exc:  # one VM's trouble does not hold up the others
                self.log(f"vm {vm['name']}: {exc}")

    def act_on(self, vm: dict[str, Any]) -> None:
        """What this host does about one VM of the index this round, if anything."""
        me = self.cfg.host
        want, host = vm.get("want"), vm.get("host")
        if vm.get("left") == me and host != me:
            self.release(vm)
        if vm.get("moving_to") == me:
            self.settle(vm)  # this thread runs every migration here: none runs now
            return
        if host == me and vm.get("moving_to"):
            self.call_off_if_target_dead(vm)
            return
        if host == me and vm["state"] == "running" and want in (None, me):
            self.settle_here(vm)
            return
        if want is None or want == host:
            return
        if host == me and not vm.get("want_live"):
            self.hand_off(vm)
        elif want == me and vm["state"] == "stopped":
            self.take(vm)
        elif want == me and vm["state"] == "running" and vm.get("want_live"):
            self.take_live(vm)

    def hand_off(self, vm: dict[str, Any]) -> None:
        name = vm["name"]
        self.log(f"vm {name}: wanted on {vm['want']}: stopping it here")
        try:
            with self.driver() as driver:
                vmlife.VmStopOp(self.cfg, self.vg, name, self.call, driver,
                                force=bool(vm.get("want_force")), grace=STOP_GRACE).run()
        except FencelessError as exc:
            # It still runs here (it did not shut down, or a step failed): the move is off.
            self.log(f"vm {name}: not handed off: {exc}")
            self.abandon(name, exc)

    def abandon(self, name: str, exc: FencelessError) -> None:
        request = vm_request("vm-place", name, host=self.cfg.host, action="abandon")
        request["args"]["error"] = f"{self.cfg.host}: {exc}"
        self.call({"op": "vm", "request": request})

    def take(self, vm: dict[str, Any]) -> None:
        name = vm["name"]
        self.log(f"vm {name}: wanted here: starting it")
        try:
            with self.driver() as driver:
                vmlife.VmStartOp(self.cfg, self.vg, name, self.call, driver).run()
        except FencelessError as exc:
            self.log(f"vm {name}: not started here: {exc}")
            self.abandon(name, exc)

    def live_op(self, name: str, driver: LibvirtDriver) -> vmlive.LiveMigrateOp:
        return vmlive.LiveMigrateOp(
            self.cfg, self.vg, name, self.call, driver,
            lambda host: LibvirtDriver(self.cfg.peer(host)),
            progress=lambda step: self.log(f"vm {name}: live migration: {step}"))

    def take_live(self, vm: dict[str, Any]) -> None:
        name = vm["name"]
        self.log(f"vm {name}: wanted here live: migrating it from {vm['host']}")
        try:
            with self.driver() as driver:
                self.live_op(name, driver).run()
                self.log(f"vm {name}: migrated here from {vm['host']}")
        except FencelessError as exc:
            self.log(f"vm {name}: not migrated here (it runs on {vm['host']} still): {exc}")
            with suppress(FencelessError):  # refused before it began: the wish is off
                self.abandon(name, exc)

    def settle(self, vm: dict[str, Any]) -> None:
        name = vm["name"]
        with self.driver() as driver:
            how = self.live_op(name, driver).settle(vm["disks"])
            self.log(f"vm {name}: an interrupted live migration here: {how}")

    def release(self, vm: dict[str, Any]) -> None:
        name = vm["name"]
        with self.driver() as driver:
            if vmlive.release(self.cfg, self.vg, name, self.call, driver):
                self.log(f"vm {name}: moved to {vm['host']}: its disks are unmapped here")

    def settle_here(self, vm: dict[str, Any]) -> None:
        if not self.cfg.hypervisor_uri:
            return  # no hypervisor here to ask (an adopted VM of a host not set up yet)
        with self.driver() as driver:
            if vmlife.settle(self.cfg, self.vg, vm, self.call, driver):
                self.log(f"vm {vm['name']}: granted here but not running (a start or stop "
                         "that died part-way, or the guest powered off): its disks are "
                         "unmapped and its grant returned")

    def call_off_if_target_dead(self, vm: dict[str, Any]) -> None:
        """The source's part when a live migration's target never comes back: once the
        target is DEAD (its watchdog fenced whatever ran there), the writer accepts the
        source's call to end the migration (asked at most every ABORT_EVERY seconds; it
        refuses while the target is not DEAD)."""
        name = vm["name"]
        now = time.monotonic()
        # Not at the first sight: a migration under way usually ends within seconds.
        if now - self.abort_asked.setdefault(name, now) < ABORT_EVERY:
            return
        self.abort_asked[name] = now
        request = vm_request("vm-place", name, host=self.cfg.host, action="migrate-abort")
        request["args"]["error"] = f"its target {vm['moving_to']} died during the migration"
        try:
            self.call({"op": "vm", "request": request})
        except FencelessError:
            return  # not DEAD yet: asked again later
        self.log(f"vm {name}: live migration to {vm['moving_to']} called off (it is DEAD)")
