"""One shared VG in the agent: a thread that keeps the lease and runs operations.

Every 2N the VG thread renews this host's lease (``keeper.py``), follows the
VG's metadata seqno (``local.py``), decides about the writer role
(``role.py``) and carries the decision out with the operations of
``ops/writer.py``. Between renewals it serves the mailboxes (``mailbox.py``)
and the requests of local CLIs. Exactly one thread touches a VG's leases, so
every operation runs on it, and a renewal never waits behind another thread.
If a renewal is late, the writer role is given up first and questions are
asked after.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from fenceless.agent.keeper import LeaseKeeper, Opener
from fenceless.agent.local import LocalLvs
from fenceless.agent.mailbox import POLL, BadRequest, Mailboxes, Pending
from fenceless.agent.port import AgentPort
from fenceless.agent.priority import raise_this_thread
from fenceless.agent.role import UNREAD, Act, HandoverAsk, RoleView, decide, handover_ask
from fenceless.agent.vmwork import VmWorker
from fenceless.clock import Clock
from fenceless.config import HostConfig, VgConfig
from fenceless.control.anchor import NotInitialized, read_anchor
from fenceless.errors import FencelessError, IntegrityError, LeaseLost, UserError
from fenceless.hv.domain import MAX_XML, vm_name
from fenceless.lease.delta import HostState
from fenceless.lease.paxos import Leader
from fenceless.ledger import vmstore
from fenceless.ledger.state import Handover, RequestInfo
from fenceless.localstate import set_agent_view
from fenceless.lvm.adapter import Lvm, Role
from fenceless.ops.activation import ActivationOp
from fenceless.ops.cluster import InitOp, JoinOp, VgEnv
from fenceless.ops.context import Context
from fenceless.ops.journal import Journal
from fenceless.ops.requests import new_request_id
from fenceless.ops.restore import RestoreOp
from fenceless.ops.writer import (
    SCRUB_EVERY,
    Takeover,
    TakeoverGaveUp,
    become_writer,
    hand_over,
    request_handover,
    upkeep,
)
from fenceless.watchdog.client import Fence

if TYPE_CHECKING:
    from fenceless.guard.role import RoleEntry


class NotMember(UserError):
    """Refused: this host has not joined the cluster on VG {vg}. Run `fenceless join`."""


class AgentBusy(UserError):
    """the agent was busy; {op!r} was not started (nothing was changed)"""


class UnknownRequest(UserError):
    """unknown agent request {op!r}"""


class AgentTimeout(UserError):
    """the agent did not finish {op!r} within {timeout:.1f}s"""


class VgAgent:
    """Everything the agent does for one shared VG."""

    def __init__(self, cfg: HostConfig, vg: VgConfig, ctx: Context, clock: Clock,
                 opener: Opener, log: Callable[[str], None],
                 set_role: Callable[[RoleEntry], None],
                 facts: Callable[[], Mapping[str, Any]], fence: Fence,
                 auto_takeover: bool = False) -> None:
        self.cfg = cfg
        self.vg = vg
        self.ctx = ctx
        self.clock = clock
        self.auto_takeover = auto_takeover
        self.log: Callable[[str], None] = lambda msg: log(f"[{vg.name}] {msg}")
        self.keeper = LeaseKeeper(cfg, vg, clock, opener, self.log)
        self.local = LocalLvs(lambda: ctx.activator(vg.name), self.reader, clock, self.log)
        self.port = AgentPort(cfg, vg, ctx, self.keeper, self.local, clock, self.log,
                              set_role, lambda: {**facts(), **self.writer_facts()}, fence)
        self.journal = Journal(self.port)
        self.mailboxes = Mailboxes(self.keeper, cfg.host, vg.name, lambda: self.port.epoch,
                                   self.journal, self.log, self.writer_epoch)
        self.requests: queue.Queue[Pending] = queue.Queue()
        self.waiting: list[Pending] = []
        self.stop = threading.Event()
        # With a hypervisor, a worker runs the VM moves other hosts ask of this one.
        self.vmwork = VmWorker(cfg, vg.name, lambda req: self.submit(req, 120.0),
                               lambda: self.keeper.n, self.log,
                               lambda: self.keeper.lease is not None) \
            if cfg.hypervisor_uri else None
        self.thread = threading.Thread(target=self.loop, name=f"vg-{vg.name}", daemon=True)
        self.last_error = ""
        self.ticks = 0

    def writer_facts(self) -> dict[str, Any]:
        """As the writer: its recent request time, for every host's `status --watch`."""
        latency = self.mailboxes.recent_latency_ms() if self.port.epoch else None
        return {} if latency is None else {"req_ms": latency}

    def reader(self) -> Lvm:
        return self.port.lvm(Role.READER)

    def writer_epoch(self) -> int:
        leader = self.port.last_leader
        return leader.lver if leader is not None else 0

    def took_host_id(self) -> None:
        """A new incarnation of this host: take over its mailbox and its claims."""
        self.port.inherit_claims()
        self.mailboxes.adopt_inbox()

    # --- the loop ---------------------------------------------------------------------

    def loop(self) -> None:
        raise_this_thread()  # renewals must not wait behind a busy host's other work
        next_tick = 0.0
        while not self.stop.is_set():
            if self.clock.now() >= next_tick:
                delay = self.guarded(self.tick)
                next_tick = self.clock.now() + (delay or self.keeper.timing.renew_interval)
            self.serve_requests()
            self.guarded(self.serve_mailboxes)
            timeout = max(0.0, min(next_tick - self.clock.now(), self.keeper.n / 2, POLL))
            try:
                item = self.requests.get(timeout=timeout)
            except queue.Empty:
                continue
            self.waiting.append(item)
            self.serve_requests()

    def say_once(self, what: str, error: str) -> None:
        """Log ``what: error`` unless the error is the one said last (it repeats each
        round); the error is also published in the agent's view."""
        if error != self.last_error:
            self.log(f"{what}: {error}")
        self.last_error = error

    def guarded(self, fn: Callable[[], float | None]) -> float | None:
        try:
            return fn()
        except FencelessError as exc:
            self.say_once("error", str(exc))
        except Exception as exc:
            self.log(f"internal error: {type(exc).__name__}: {exc}")
        return None

    def tick(self) -> float:
        """One renewal round; returns the delay until the next one."""
        keeper = self.keeper
        had = keeper.lease is not None
        if not keeper.attach() or not keeper.acquire_member(self.port.facts()):
            self.publish()
            return keeper.timing.renew_interval
        if not had:
            self.took_host_id()
        if not self.port.renew():
            return keeper.n / 2
        assert keeper.dev is not None
        if self.local.seqno_changed(keeper.dev, keeper.size):
            self.local.refresh(force=True)
        self.port.publish_claims()  # refreshed sizes, mappings made or gone: an extend waits
        self.role_round()
        self.port.publish_role()  # with the leader as just read
        self.publish()
        return keeper.timing.renew_interval

    def serve_mailboxes(self) -> None:
        mbx = self.mailboxes
        if self.keeper.area is None or self.keeper.lease is None:
            mbx.expire(self.clock.now())
            return
        if self.port.epoch is not None:
            mbx.adopt_own()
            mbx.writer_poll()
            mbx.run_work(self.port.renew_if_due, self.port.host_name,
                         lambda why: self.port.set_epoch(None, why))
        else:
            if mbx.work:  # the role was given up between two passes
                mbx.requeue()
            mbx.publish_inbox()
            mbx.poll_outbox()
            mbx.expire(self.clock.now())

    # --- the writer role --------------------------------------------------------------

    def view(self, leader: Leader | None, *, ask: HandoverAsk | None = None,
             handover: Handover | object | None = UNREAD) -> RoleView:
        keeper, observer = self.keeper, self.keeper.observer
        assert keeper.area is not None and keeper.lease is not None and observer is not None
        now = self.clock.now()
        hosts = range(1, keeper.area.sb.max_hosts + 1)
        records = {h: observer.record(h) for h in hosts}
        return RoleView(
            host_id=keeper.lease.host_id, generation=keeper.lease.generation,
            epoch=self.port.epoch, lease_left=keeper.remaining(), n=keeper.n, leader=leader,
            states={h: observer.state(h, now) for h in hosts},
            generations={h: r.generation for h, r in records.items() if r is not None},
            auto_takeover=self.auto_takeover, handover=handover,  # type: ignore[arg-type]
            ask=ask)

    def role_round(self) -> None:
        port = self.port
        leader = port.read_leader()
        if port.epoch is not None:
            self.writer_round(leader)
            return
        ask = port.handover_ask
        if ask and leader is not None and leader.lver > int(ask.get("from_epoch", 0)):
            port.handover_ask = None  # done (or overtaken): stop asking
        view = self.view(leader)
        if leader is None or leader.free or view.gone(leader.owner_id, leader.owner_generation):
            view = replace(view, ballot_won=port.own_ballot())  # a ballot won, unrecorded?
        decision = decide(view)
        if decision.act is Act.READ_LEDGER and leader is not None:
            handover = port.ledger(fresh=True).handover_from(leader.lver)
            decision = decide(replace(view, handover=handover))
        if decision.act is Act.ACQUIRE:
            become_writer(port, decision.why)

    def writer_round(self, leader: Leader | None) -> None:
        port, observer = self.port, self.keeper.observer
        assert observer is not None and self.keeper.area is not None
        decision = decide(self.view(leader))
        if decision.act is Act.DROP:
            port.set_epoch(None, decision.why)
            return
        try:
            self.ticks += 1
            hosts = range(1, self.keeper.area.sb.max_hosts + 1)
            records = {h: r for h in hosts if (r := observer.record(h)) and not r.free}
            now = self.clock.now()
            live = {h: observer.state(h, now) is HostState.LIVE for h in hosts}
            # Only live hosts join the ledger's table: a dead one that `host remove` took
            # out must not come back with its maintenance forgotten (ops/hostops.py).
            state = upkeep(port, [(h, r.name) for h, r in records.items() if live[h]],
                           scrub=self.ticks % SCRUB_EVERY == 0 or port.cache is None)
            ask = handover_ask({h: r.facts.get("handover_request") for h, r in records.items()},
                               live, {n: h for h, n in state.host_names().items()},
                               port.epoch or 0, state.handover.id if state.handover else None)
            decision = decide(self.view(leader, ask=ask))
            if decision.act is Act.HAND_OVER and decision.ask is not None:
                hand_over(port, decision.ask.to_id, decision.ask.to, decision.ask.id)
        except LeaseLost as exc:
            port.set_epoch(None, str(exc))
        except IntegrityError as exc:
            # Damage in the ledger the writer does not write over (`fenceless repair
            # ledger`): said once; the round goes on, so the view is still published.
            self.say_once("ledger upkeep", str(exc))

    # --- requests from the CLI --------------------------------------------------------

    def submit(self, request: dict[str, Any], timeout: float) -> dict[str, Any]:
        item = Pending(request, deadline=self.clock.now() + timeout)
        self.requests.put(item)
        if not item.done.wait(timeout + 1.0):
            raise AgentTimeout(op=request.get("op"), timeout=timeout)
        if item.error is not None:
            raise item.error
        return item.result or {}

    def serve_requests(self) -> None:
        keep = []
        for item in self.waiting:
            if not item.started and self.clock.now() > item.deadline:
                item.error = AgentBusy(op=item.request.get("op"))
                item.done.set()
                continue
            item.started = True
            self.port.renew_if_due()  # many requests in a row must not cost the lease
            try:
                if item.request.get("op") in ("volume", "host"):
                    self.mailboxes.submit(item)  # completed by the mailboxes
                    continue
                if item.request.get("op") == "vm":
                    self.stage_vm(item.request)
                    self.mailboxes.submit(item)
                    continue
                result = self.handle(item)
            except BaseException as exc:
                item.error = exc
                item.done.set()
                continue
            if result is None:
                if self.clock.now() < item.deadline:
                    keep.append(item)
                    continue
                waiting = item.op.waiting_for if isinstance(item.op, Takeover) else ""
                item.error = TakeoverGaveUp(waiting=waiting)
            item.result = result
            item.done.set()
        self.waiting = keep

    def stage_vm(self, request: dict[str, Any]) -> None:
        """A definition's XML goes to this host's upload slot on the LUN, and the request
        (which travels through a 4 KiB mailbox) names it by digest instead."""
        body = request.get("request")
        args = body.get("args") if isinstance(body, dict) else None
        if not isinstance(args, dict) or "xml" not in args:
            return
        xml, name = args.pop("xml"), args.get("name")
        if not isinstance(xml, str) or not isinstance(name, str) or \
                len(xml.encode("utf-8")) > MAX_XML:
            raise BadRequest(detail=f"a VM definition is a string of at most {MAX_XML} bytes")
        if self.keeper.area is None or not vmstore.has_store(self.keeper.area.layout):
            raise vmstore.NoVmStore()
        args["sha"] = self.port.stage_definition(vm_name(name), xml)

    def handle(self, item: Pending) -> dict[str, Any] | None:
        """Carry out a request; None means "not yet, ask again on the next round"."""
        req = item.request
        op = req.get("op")
        if op in ("init", "join"):
            return self.make_or_join(op, req)
        if op in ("takeover", "handover", "activate", "refresh", "restore") and \
                (self.keeper.area is None or self.keeper.lease is None):
            if not self.keeper.attach():
                raise NotInitialized(vg=self.vg.name, device=self.vg.devices[0])
            raise NotMember(vg=self.vg.name)
        if op == "takeover":
            if item.op is None:
                asked = req.get("seen_epoch")
                item.op = Takeover(self.port, wait=bool(req.get("wait")),
                                   seen_epoch=asked if isinstance(asked, int)
                                   and not isinstance(asked, bool) and asked >= 0 else None)
            step: dict[str, Any] | None = item.op.step()
            return step
        if op == "handover":
            return request_handover(self.port, str(req.get("to")))
        if op == "restore":
            leader = self.port.read_leader()
            who = f"{leader.owner_name} is, epoch {leader.lver}" if leader else "none is"
            argv = req.get("argv")
            return RestoreOp(self.port, self.journal, req.get("seqno"),
                             apply=bool(req.get("apply")), writer=who,
                             rid=str(req.get("id") or new_request_id()),
                             user=str(req.get("user", "")),
                             argv=tuple(str(a) for a in argv) if isinstance(argv, list) else ()
                             ).run()
        if op in ("repair-ledger", "repair-superblock"):
            return self.repair(op, req)
        if op in ("activate", "deactivate", "refresh"):
            vm = req.get("vm")
            return ActivationOp(self.port, self.vg.name, str(op), str(req.get("lv")),
                                readonly=bool(req.get("readonly")),
                                vm=vm_name(vm) if isinstance(vm, str) else None).run()
        raise UnknownRequest(op=op)

    def repair(self, op: str, req: dict[str, Any]) -> dict[str, Any]:
        """``fenceless repair ledger|superblock``, run here, on the writer: a ledger or a
        superblock that does not read, rebuilt (``ops/repair.py``); after a ledger repair
        the journal reconciles on it at once."""
        from fenceless.agent.repairio import RepairIo
        from fenceless.hv.domain import parse_domain_xml
        from fenceless.ops.repair import RepairLedgerOp, RepairSuperblockOp

        if self.keeper.area is None or self.keeper.lease is None:
            raise NotMember(vg=self.vg.name)
        argv = req.get("argv")
        request = RequestInfo(id=str(req.get("id") or new_request_id()), op=op, args={},
                              user=str(req.get("user", "")),
                              argv=tuple(str(a) for a in argv) if isinstance(argv, list)
                              else ("fenceless", "repair", op.split("-")[1]))
        io = RepairIo(self.port, self.keeper, self.cfg.state_dir)
        apply = bool(req.get("apply"))
        plan = req.get("plan") if isinstance(req.get("plan"), str) else None
        if op == "repair-superblock":
            return RepairSuperblockOp(io, apply=apply, request=request, plan=plan).run()
        name = self.vg.name
        result = RepairLedgerOp(io, lambda xml: parse_domain_xml(xml, name, source="in the store"),
                                apply=apply, request=request, plan=plan).run()
        if result.get("applied"):
            self.mailboxes.reconcile_after = 0.0
        return result

    def make_or_join(self, op: str, req: dict[str, Any]) -> dict[str, Any]:
        """``init`` or ``join``: the agent keeps renewing the lease they took."""
        dev = self.keeper.open_device()
        env = VgEnv(self.cfg, self.vg, dev, self.keeper.size, self.clock,
                    lambda role: self.ctx.lvm(self.vg.name, role), self.log)
        if op == "init":
            init = InitOp(env, max_hosts=int(req.get("max_hosts", 16)),
                          adopt=bool(req.get("adopt")))
            result = init.run()
            assert init.area is not None and init.host_lease is not None
            self.keeper.adopt(init.area, read_anchor(dev, self.keeper.size), init.host_lease)
            self.port.set_epoch(init.epoch, "init")
            self.took_host_id()
            self.port.rearm()  # the writer role: fenced from now on
            return result
        join = JoinOp(env)
        result = join.run()
        assert join.area is not None and join.host_lease is not None
        self.keeper.adopt(join.area, join.anchor, join.host_lease)
        self.port.set_epoch(None, "join")
        self.took_host_id()
        return result

    # --- what the CLI reads locally -------------------------------------------------------

    def publish(self) -> None:
        keeper, now = self.keeper, self.clock.now()
        lease = keeper.lease
        view: dict[str, Any] = {"pid": os.getpid(), "mono": now, "vg": self.vg.name,
                                "anchored": keeper.area is not None,
                                "host_id": lease.host_id if lease else None,
                                "generation": lease.generation if lease else None,
                                "writer_epoch": self.port.epoch, "io_timeout": keeper.n,
                                "error": self.last_error, "hosts": {}}
        if keeper.area is not None and keeper.observer is not None:
            for hid in range(1, keeper.area.sb.max_hosts + 1):
                view["hosts"][str(hid)] = {
                    "state": keeper.observer.state(hid, now).value,
                    "changed": keeper.observer.last_change(hid),
                }
        view.update(self.metric_facts())
        with contextlib.suppress(OSError):
            set_agent_view(self.cfg.state_dir, self.vg.name, view)

    def metric_facts(self) -> dict[str, Any]:
        """What the metrics add to the published view (agent/metrics.py): host names, the
        writer's epoch, and as the writer last saw them the VG and its VMs per host."""
        observer, out = self.keeper.observer, dict[str, Any]()
        if observer is not None and self.keeper.area is not None:
            out["names"] = {str(h): r.name for h in range(1, self.keeper.area.sb.max_hosts + 1)
                            if (r := observer.record(h)) is not None and not r.free}
        if self.port.last_leader is not None:
            out["leader_epoch"] = self.port.last_leader.lver
        snap = self.journal.snap_cache
        if self.port.epoch is not None and snap is not None:
            vg = snap[1].vg
            out["vg_report"] = {"free": vg.free, "mda_size": vg.mda_size,
                                "mda_free": vg.mda_free}
        if self.port.epoch is not None and self.port.cache is not None:
            per: dict[str, int] = {}
            for entry in self.port.cache.vms.values():
                if entry.host:
                    per[entry.host] = per.get(entry.host, 0) + 1
            out["vms_per_host"] = per
        return out

    def shutdown(self) -> bool:
        """Planned stop: release the writer lease, then the host lease; True if released.

        The claims stay on the disk: the mappings outlive the agent, and a host that
        released its lease (FREE, not DEAD) still has them counted.
        """
        keeper, port = self.keeper, self.port
        if keeper.area is None or keeper.lease is None:
            return True
        try:
            if port.epoch is not None:
                port.release_writer(port.epoch)
                self.log(f"released the writer lease at epoch {port.epoch}")
            port.set_epoch(None, "shutdown", quiet=True)
            keeper.release()
        except FencelessError as exc:
            self.log(f"planned stop: the leases were not released ({exc}); they expire")
            return False
        return True
