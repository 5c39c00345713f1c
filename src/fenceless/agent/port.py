"""The agent's side of the ports: what operations may use of one VG's agent.

``AgentPort`` implements ``ops.port.RolePort`` and ``HostPort`` over the lease keeper and
the host's mappings, and keeps the writer role's own state: the epoch this host acts under,
its copy of the ledger, and the leader as last read. Operations get this object typed as a
port and never see the agent that runs them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

from fenceless import __version__
from fenceless.agent.keeper import LeaseKeeper, NoHostLease
from fenceless.agent.local import LocalLvs
from fenceless.cgroup import WorkGroup
from fenceless.clock import Clock
from fenceless.config import HostConfig, VgConfig
from fenceless.errors import ExecError, FencelessError, LeaseLost, UserError
from fenceless.faults import crashpoint
from fenceless.guard.role import RoleEntry
from fenceless.guard.role import entry as role_entry
from fenceless.holders import kill_holders, mapped_path
from fenceless.lease.delta import HostState
from fenceless.lease.paxos import AcquireResult, Leader
from fenceless.ledger import audit, history, vmstore
from fenceless.ledger.claims import (
    Claim,
    HostClaims,
    has_claims,
    read_all_claims,
    read_claims,
    write_claims,
)
from fenceless.ledger.slots import write_ledger
from fenceless.ledger.state import Intent, LedgerState, RequestInfo, VmEntry
from fenceless.localstate import write_metadata_copy
from fenceless.lvm import mda
from fenceless.lvm.activation import Activator
from fenceless.lvm.adapter import Lvm, Role
from fenceless.lvm.shell import ShellSlot
from fenceless.ondisk.errors import CorruptRecord
from fenceless.ops.claims import claims_of_others
from fenceless.ops.context import Context
from fenceless.ops.journal import NoLeaseTime
from fenceless.ops.port import HostView
from fenceless.watchdog.client import Fence


class NoWatchdog(UserError):
    """Refused: no watchdog guards this host (none answers on its socket in {run_dir}); \
without one a frozen agent could not be stopped, so this host takes no exclusive work. \
Start it: `fenceless watchdog` (systemd: fenceless-watchdog.service)."""


class StateNotPublished(LeaseLost):
    """could not publish this host's state on the LUN"""


class WriterLeaseMoved(LeaseLost):
    """the writer lease now names {held}, not this host at epoch {epoch}; no LVM change was \
started"""


class SeqnoBehind(ExecError):
    """the PV shows seqno {got}, expected {seqno}"""


class NoLeaseForClaim(LeaseLost):
    """no host lease: a claim cannot be published"""


class ClaimNotPublished(LeaseLost):
    """could not publish the claim on disk"""


class AgentPort:
    """One VG's facilities for operations, and the writer role's state on this host."""

    def __init__(self, cfg: HostConfig, vg: VgConfig, ctx: Context, keeper: LeaseKeeper,
                 local: LocalLvs, clock: Clock, log: Callable[[str], None],
                 set_role: Callable[[RoleEntry], None],
                 extra_facts: Callable[[], Mapping[str, Any]], fence: Fence) -> None:
        self.cfg = cfg
        self.vg_cfg = vg
        self.ctx = ctx
        self.keeper = keeper
        self.local = local
        self._clock = clock
        self._log = log
        self.set_role = set_role
        self.extra_facts = extra_facts
        self.fence = fence
        self.work: WorkGroup | None = None  # where this agent's LVM commands run
        spawn = getattr(ctx.runner, "spawn_lines", None)  # the writer's lvm shell, if any
        self.shell = ShellSlot(spawn if cfg.lvm_shell else None, log)
        self.observe_lvm: Callable[[str, float], None] | None = None  # (agent/metrics.py)
        self._epoch: int | None = None
        self.cache: LedgerState | None = None  # the writer's copy of the ledger
        self.last_ledger_epoch = 0
        self.last_leader: Leader | None = None
        self.history_heads, self.audit_heads = history.Heads(), history.Heads()  # as left
        self.last_text: tuple[str, int] = ("", -1)  # the metadata text read last
        self.handover_ask: dict[str, Any] | None = None  # this host's request, published
        self.written_claims: HostClaims | None = None
        self.claims_seq = 0
        keeper.on_late = self.late
        keeper.on_lost = self.lost

    def lost(self, why: str) -> None:
        self.set_epoch(None, why)
        self.fence_vms(why)

    def late(self, why: str) -> None:
        """Renewals are failing past 6N: stop exclusive work before anyone may take it."""
        if self._epoch is not None:
            self.set_epoch(None, why)
        self.fence_vms(why)

    def fence_vms(self, why: str) -> None:
        """Kill whatever holds this host's read-write mappings open (its VMs): at 6N, well
        before another host may take them at 14N (docs/design.md, "VMs"). The watchdog does
        the same at 10N if this agent cannot (frozen). The devices come from what this
        agent knows, with no LVM command and no read of the LUN: the path just failed."""
        rw = [lv for lv, c in self.local.claims().items() if c.mode == "rw"]
        devices = [mapped_path(self.cfg, self.vg, lv) for lv in rw]
        killed = kill_holders(d for d in devices if d)
        if killed:
            self.log(f"!!! FENCING THIS HOST'S VMs ({why}): killed pid(s) "
                     f"{', '.join(map(str, killed))}, which held {', '.join(rw)} open")

    # --- identity and time ------------------------------------------------------------

    @property
    def host(self) -> str:
        return self.cfg.host

    @property
    def vg(self) -> str:
        return self.vg_cfg.name

    @property
    def epoch(self) -> int | None:
        return self._epoch

    @property
    def n(self) -> float:
        return self.keeper.n

    @property
    def clock(self) -> Clock:
        return self._clock

    @property
    def host_id(self) -> int:
        assert self.keeper.lease is not None
        return self.keeper.lease.host_id

    @property
    def generation(self) -> int:
        assert self.keeper.lease is not None
        return self.keeper.lease.generation

    def log(self, msg: str) -> None:
        self._log(msg)

    # --- the lease ----------------------------------------------------------------------

    def facts(self) -> dict[str, Any]:
        facts: dict[str, Any] = {
            "version": __version__,
            "lvm_role": "writer" if self._epoch else "reader",
            "seqno": self.local.seqno,
            **self.extra_facts(),
        }
        if not self.claims_region():
            # A cluster made before claims had a region of their own: they ride here.
            facts["active"] = {lv: c.size for lv, c in self.local.claims().items()}
        if self.handover_ask:
            facts["handover_request"] = self.handover_ask
        return facts

    def renew(self) -> bool:
        ok = self.keeper.renew(self.facts())
        if ok:
            self.rearm()
            self.publish_role()
        return ok

    def exclusive(self) -> bool:
        """Whether this host holds exclusive work in the VG: the writer role, or mappings
        (a host that lost its lease with LVs mapped must be fenced before it is DEAD)."""
        return self._epoch is not None or bool(self.local.claims())

    def rearm(self) -> None:
        """After a good renewal: the watchdog fires 10N after it, unless re-armed again."""
        lease = self.keeper.lease
        if lease is None:
            return
        if not self.exclusive():
            self.fence.disarm(self.vg)
            return
        armed = self.fence.arm(self.vg, lease.last_renewal + self.keeper.timing.watchdog_fire)
        if not armed and self._epoch is not None:
            self.set_epoch(None, "no watchdog guards this host")

    def arm_now(self) -> None:
        """Before exclusive work starts (the writer role, a mapping): armed, or refused."""
        lease = self.keeper.lease
        if lease is None:
            raise NoHostLease()
        if not self.fence.arm(self.vg, lease.last_renewal + self.keeper.timing.watchdog_fire):
            raise NoWatchdog(run_dir=self.cfg.run_dir)

    def renew_if_due(self) -> None:
        if self.keeper.due():
            self.renew()

    def announce(self) -> None:
        if self.keeper.lease is not None and not self.renew():
            raise StateNotPublished()

    def check_write(self) -> None:
        self.keeper.check_write()

    # --- the writer role ---------------------------------------------------------------

    def set_epoch(self, epoch: int | None, why: str, *, quiet: bool = False) -> None:
        self.cache = None  # a new role starts from the disk, a dropped one trusts nothing
        if epoch is None and self._epoch is not None and not quiet:
            self.log(f"!!! GIVING UP THE WRITER ROLE (epoch {self._epoch}): {why}. "
                     "This host writes nothing shared from now on.")
        self._epoch = epoch
        if epoch is None:
            self.shell.close()  # the shell is the writer's: it goes with the role
            try:
                self.publish_role()
            except (FencelessError, OSError) as exc:
                self.log(f"cannot publish the role: {exc}")

    def read_leader(self) -> Leader | None:
        assert self.keeper.area is not None
        self.last_leader = self.keeper.area.writer().read_leader()
        return self.last_leader

    def check_leader(self) -> None:
        """Right before an LVM change: the writer lease must still name this incarnation
        at this epoch (a takeover may have happened while this host was stopped)."""
        leader = self.read_leader()
        lease = self.keeper.lease
        if lease is None or leader is None or leader.released or \
                (leader.owner_id, leader.owner_generation, leader.lver) != \
                (lease.host_id, lease.generation, self._epoch):
            held = "nobody" if leader is None else \
                f"{leader.owner_name or leader.owner_id} at epoch {leader.lver}"
            raise WriterLeaseMoved(held=held, epoch=self._epoch)

    def own_ballot(self) -> int:
        """The epoch of a ballot in which this incarnation's own dblock accepted itself."""
        area, lease = self.keeper.area, self.keeper.lease
        assert area is not None and lease is not None
        try:
            mine = area.writer().read_dblocks_of(lease.host_id)
        except CorruptRecord:
            return 0
        if mine is None or mine.bal == 0 or \
                (mine.inp.host_id, mine.inp.generation) != (lease.host_id, lease.generation):
            return 0
        return mine.lver

    def acquire_writer(self) -> AcquireResult:
        area, lease = self.keeper.area, self.keeper.lease
        assert area is not None and lease is not None
        self.arm_now()  # armed before the role: a frozen writer must be fenced
        return area.writer().acquire(lease.host_id, lease.generation, self.owner_gone,
                                     name=self.host, max_ballots=6,
                                     before_write=self.check_write)

    def release_writer(self, epoch: int) -> None:
        assert self.keeper.area is not None
        self.keeper.area.writer().release(self.host_id, self.generation, epoch,
                                          before_write=self.check_write)

    def work_idle(self) -> bool:
        """No LVM command of this agent is left running (a killed one may hang in I/O)."""
        self.shell.close()  # an idle shell is not work, but it lives in the work cgroup
        return self.work is None or self.work.wait_empty(self.n)

    def request_handover(self, request: dict[str, Any] | None) -> None:
        self.handover_ask = request
        if request is not None and self.keeper.lease is not None:
            self.keeper.lease.renew(self.facts())  # publish the request now

    def publish_role(self) -> None:
        """Tell the local LVM guard whether this host may change this VG's metadata.

        Valid only for the time the lease has left (less a margin of N): if the
        agent stops renewing, the guard falls back to "reader" by itself.
        """
        leader = self.last_leader
        writer = leader.owner_name if leader is not None and not leader.released else None
        epoch = leader.lver if leader is not None else 0
        left = self.keeper.remaining() - self.n if self.keeper.lease is not None else 0.0
        writing = self._epoch is not None and left > 0
        if writing:
            writer, epoch = self.host, self._epoch or 0
        self.set_role(role_entry(self.vg, "writer" if writing else "reader", writer, epoch,
                                 max(left, 0.0)))

    # --- other hosts ----------------------------------------------------------------------

    def host_state(self, host_id: int) -> HostState:
        assert self.keeper.observer is not None
        return self.keeper.observer.state(host_id, self.clock.now())

    def generation_of(self, host_id: int) -> int | None:
        assert self.keeper.observer is not None
        rec = self.keeper.observer.record(host_id)
        return rec.generation if rec is not None else None

    def observe_now(self) -> None:
        """Read the host area now and feed the observer: "dead" is never decided from an
        earlier read, which may be several N old (docs/design.md, "Caches")."""
        area, observer = self.keeper.area, self.keeper.observer
        assert area is not None and observer is not None
        observer.observe(area.hosts().read_area(), self.clock.now())

    def owner_gone(self, host_id: int, generation: int) -> bool:
        assert self.keeper.observer is not None
        self.observe_now()
        return self.keeper.observer.owner_gone(host_id, generation, self.clock.now())

    def hosts_now(self) -> list[HostView]:
        area = self.keeper.area
        assert area is not None
        hosts = area.hosts()
        raw = hosts.read_area()  # fresh: a decision must not rest on an old read
        assert self.keeper.observer is not None
        self.keeper.observer.observe(raw, self.clock.now())
        out = []
        for hid in range(1, area.sb.max_hosts + 1):
            try:
                rec = hosts.decode(raw, hid)
            except CorruptRecord:
                continue
            if rec is None or rec.free:
                continue
            out.append(HostView(hid, rec.name, rec.generation, self.host_state(hid),
                                dict(rec.facts)))
        return out

    def host_name(self, host_id: int) -> str:
        try:
            return self.ledger(fresh=self.cache is None).host_name(host_id)
        except FencelessError:
            return f"host id {host_id}"

    # --- the ledger -----------------------------------------------------------------------

    def ledger(self, fresh: bool = False) -> LedgerState:
        if self.cache is not None and not fresh:
            return self.cache
        assert self.keeper.area is not None
        view = self.keeper.area.ledger()
        self.last_ledger_epoch = view.current.epoch if view.current else 0
        state = LedgerState.from_json(view.current.state) if view.current else LedgerState()
        if self._epoch is not None:
            self.cache = state
        return state

    def ledger_epoch(self) -> int:
        return self.last_ledger_epoch

    def write_ledger(self, state: LedgerState, *, both_slots: bool = False) -> LedgerState:
        area, lease = self.keeper.area, self.keeper.lease
        assert area is not None and lease is not None and self._epoch is not None
        crashpoint("agent.before-ledger-write")
        self.cache = None  # whatever happens next, re-read before trusting it
        rec = write_ledger(area.dev, area.layout, self._epoch, state.to_json(),
                           writer_host_id=lease.host_id, both_slots=both_slots,
                           before_write=self.check_write, confirm=self.check_leader)
        self.last_ledger_epoch = rec.epoch
        self.cache = state
        return state

    # --- LVM, history and audit ---------------------------------------------------------

    def lvm(self, role: Role = Role.READER) -> Lvm:
        lvm = self.ctx.lvm(self.vg, role)
        if self.keeper.lease is not None:
            lvm.between = self.keep_lease
        if role is Role.WRITER and self._epoch is not None:
            self.shell.wrap(lvm)
        lvm.observe = self.observe_lvm
        return lvm

    def keep_lease(self) -> None:
        """While an LVM command runs: renew the lease as it falls due, and stop the
        command (what this raises kills it) once the lease has N or less left.

        An LVM command on a loaded host or a slow path can take longer than a
        lease; renewing only between commands would lose the lease (and have the
        watchdog fence this host) for no fault. A frozen agent renews nothing,
        and its watchdog fires as before."""
        self.renew_if_due()
        if self.lvm_budget() <= 0:
            raise NoLeaseTime()

    def lvm_budget(self) -> float:
        return self.keeper.remaining() - self.n

    def metadata_key(self) -> object | None:
        assert self.keeper.dev is not None
        return self.local.metadata_key(self.keeper.dev, self.keeper.size)

    def read_metadata(self, *, scan: bool = True) -> tuple[str, int]:
        assert self.keeper.dev is not None
        got = mda.read_metadata_text(self.keeper.dev, size=self.keeper.size, scan=scan)
        self.last_text = got  # a seqno names one commit: the history entry reuses it
        return got

    def read_history(self, seqno: int) -> str:
        area = self.keeper.area
        assert area is not None
        return history.read_entry(area.dev, area.layout, seqno, parse=mda.vg_identity)

    def note_metadata_change(self, request_id: str, seqno: int) -> None:
        area, lease = self.keeper.area, self.keeper.lease
        assert area is not None and lease is not None
        self.local.forget_metadata()  # the next seqno check looks again
        try:
            text, got = self.last_text if self.last_text[1] == seqno else self.read_metadata()
            if got < seqno:
                raise SeqnoBehind(got=got, seqno=seqno)
            history.append(area.dev, area.layout,
                           history.HistoryEntry(text, got, request_id, lease.host_id),
                           epoch=self._epoch or 0, parse=mda.committed_identity,
                           before_write=self.check_write, known=self.history_heads)
        except LeaseLost:
            raise
        except FencelessError as exc:
            self.log(f"metadata history: seqno {seqno} not recorded: {exc}")
        if self.last_text[1] >= seqno:  # LVM's backup is off: ours, and LVM's file too
            try:
                write_metadata_copy(self.cfg.state_dir, self.vg, self.last_text[0],
                                    self.local.backup_dir())
            except OSError as exc:
                self.log(f"local copy of the VG metadata not written: {exc}")

    def read_stage(self, host_id: int, name: str, sha: str) -> str:
        area = self.keeper.area
        assert area is not None
        return vmstore.read_stage(area.dev, area.layout, host_id, name=name, sha=sha)

    def write_definition(self, slot: int, name: str, xml: str, seq: int) -> None:
        area = self.keeper.area
        assert area is not None and self._epoch is not None
        vmstore.write_definition(area.dev, area.layout, slot, name, xml, seq=seq,
                                 epoch=self._epoch, before_write=self.check_write)

    def vm_slots(self) -> int:
        area = self.keeper.area
        return vmstore.slot_count(area.layout) if area is not None else 0

    def stage_definition(self, name: str, xml: str) -> str:
        """Upload a definition to this host's own slot for the writer; its digest."""
        area, lease = self.keeper.area, self.keeper.lease
        if area is None or lease is None:
            raise NoHostLease()
        seq = vmstore.stage_seq(area.dev, area.layout, lease.host_id) + 1
        vmstore.write_stage(area.dev, area.layout, lease.host_id, name, xml, seq=seq,
                            generation=lease.generation, before_write=self.check_write)
        return vmstore.digest(xml)

    def audit(self, host: str, request: RequestInfo, result: str, message: str) -> None:
        area = self.keeper.area
        assert area is not None
        try:
            audit.append(area.dev, area.layout, audit.audit_record(
                host=host, user=request.user or "-", argv=request.argv or (request.op,),
                request_id=request.id, result=result, message=message),
                epoch=self._epoch or 0, before_write=self.check_write, known=self.audit_heads)
        except LeaseLost:
            raise
        except FencelessError as exc:
            self.log(f"audit log: request {request.id} not recorded: {exc}")
        self.log(f"audit: {host} {request.user or '-'} "
                 f"{' '.join(request.argv) or request.op} -> {result}"
                 + (f": {message}" if message else ""))

    # --- this host's mappings -----------------------------------------------------------

    def activator(self) -> Activator:
        return self.ctx.activator(self.vg)

    def local_active(self, force: bool = False) -> Mapping[str, int]:
        return self.local.active(force=force)

    def refresh_active(self) -> bool:
        return self.local.refresh(force=True)

    def claims_region(self) -> bool:
        area = self.keeper.area
        return area is not None and has_claims(area.layout)

    def claim(self, lv: str, mode: str = "rw") -> None:
        self.arm_now()  # a mapping is exclusive work: fenced if this host freezes
        self.local.mapping[lv] = mode
        try:
            self.publish_claims(force=True)
        except BaseException:
            self.local.mapping.pop(lv, None)
            raise

    def settle(self, lv: str) -> None:
        """The mapping of ``lv`` exists now: its claim stays, with its size."""
        mode = self.local.mapping.pop(lv, None)
        if mode is not None:
            self.local.modes[lv] = mode
        self.local.active(force=True)
        self.publish_claims()

    def unclaim(self, lv: str, *, keep_mapped: bool = False) -> None:
        self.local.mapping.pop(lv, None)
        if keep_mapped:
            self.publish_claims()
            return
        self.local.modes.pop(lv, None)
        self.local.active(force=True)
        self.publish_claims()

    def publish_claims(self, force: bool = False) -> None:
        """Write this host's claims if they changed (``force``: write and wait for it)."""
        area, lease = self.keeper.area, self.keeper.lease
        if area is None or lease is None:
            if force:
                raise NoLeaseForClaim()
            return
        if not has_claims(area.layout):  # they ride in the lease facts: renew to publish
            if force and not self.renew():
                raise ClaimNotPublished()
            return
        current = HostClaims(self.host, lease.generation, self.local.claims())
        if not force and self.written_claims is not None and \
                (self.written_claims.lvs, self.written_claims.generation) == \
                (current.lvs, current.generation):
            return
        self.claims_seq += 1
        lease.check()  # our own slot, but only while we hold the host id
        write_claims(area.dev, area.layout, lease.host_id,
                     replace(current, seq=self.claims_seq), before_write=lease.check)
        self.written_claims = current

    def inherit_claims(self) -> None:
        """On taking the host id: this host's claims as its predecessor left them stay
        claimed until the mappings are listed (an agent restart keeps its claims)."""
        area, lease = self.keeper.area, self.keeper.lease
        if area is None or lease is None or not has_claims(area.layout):
            return
        try:
            old = read_claims(area.dev, area.layout, lease.host_id)
        except CorruptRecord as exc:
            self.log(f"own claims do not read ({exc}); writing them anew")
            old = None
        if old is not None:
            self.local.inherited = dict(old.lvs)
            self.local.modes.update({lv: c.mode for lv, c in old.lvs.items()})
        self.written_claims = None
        self.publish_claims()

    def others_claim(self, lv: str) -> list[tuple[str, str]]:
        lease = self.keeper.lease
        return claims_of_others(self, lv, lease.host_id if lease is not None else 0)

    def claims_now(self) -> dict[int, HostClaims | CorruptRecord]:
        """Every host's claims as on the disk now (a slot that does not read: the error)."""
        area = self.keeper.area
        assert area is not None
        if not has_claims(area.layout):
            return {h.host_id: HostClaims(h.name, h.generation, {
                lv: Claim(int(size) if isinstance(size, int) else 0)
                for lv, size in h.active().items()}) for h in self.hosts_now()}
        return read_all_claims(area.dev, area.layout, area.sb.max_hosts)

    def ledger_now(self) -> LedgerState:
        """The ledger as on the disk now (for a claiming host)."""
        assert self.keeper.area is not None
        view = self.keeper.area.ledger()
        return LedgerState.from_json(view.current.state) if view.current else LedgerState()

    def pending_intents(self) -> list[Intent]:
        """The journaled intents of the ledger as on the disk now (for a claiming host)."""
        return list(self.ledger_now().intents.values())

    def vms_now(self) -> Mapping[str, VmEntry]:
        """The VM index as on the disk now (a live migration's target reads it)."""
        return self.ledger_now().vms
