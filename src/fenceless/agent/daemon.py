"""``fenceless agent``: the per-host daemon that holds this host's leases.

One thread per shared VG, so that a hung or lost LUN never stops work on
another. Each VG thread, every 2N:
- renews this host's delta lease (reading the whole host area, which also
  feeds the observer that judges the other hosts LIVE/FAIL/DEAD);
- as the writer: checks the leader still names it, publishes its epoch in
  the ledger, records new hosts, and carries out handover requests;
- as another host: takes the writer lease when it is handed over to it, or
  (with --auto-takeover) when the writer is DEAD and this host is the
  lowest-numbered live one;
- writes what it saw into the local state dir for ``fenceless status``.
If a renewal is late, the writer role is given up first and questions are
asked after. All control-area I/O goes through TimedIO: the loop never
blocks on storage longer than N.

Requests from the CLI (init, join, takeover, handover) arrive on the agent's
socket and are carried out by the VG thread itself, between renewals, so
that exactly one thread ever touches a VG's leases.
"""

from __future__ import annotations

import contextlib
import queue
import secrets
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fenceless import __version__
from fenceless.agent.ipc import Server
from fenceless.agent.priority import raise_priority, raise_this_thread
from fenceless.agent.volumes import POLL, VolumeService
from fenceless.blockio import BlockDevice, IoError, TimedIO, device_size, open_device
from fenceless.clock import Clock, SystemClock
from fenceless.config import HostConfig, VgConfig
from fenceless.control.anchor import Anchor, NotInitialized, read_anchor
from fenceless.control.area import ControlArea
from fenceless.errors import ExecError, FencelessError, LeaseLost, UserError
from fenceless.faults import crashpoint
from fenceless.guard.role import RoleEntry, write_role_file
from fenceless.guard.role import entry as role_entry
from fenceless.lease.delta import DeltaLease, HostObserver, HostState, LeaseTiming
from fenceless.lease.paxos import AcquireResult, Leader, Outcome
from fenceless.ledger import audit, history
from fenceless.ledger import mailbox as mb
from fenceless.ledger.slots import write_ledger
from fenceless.ledger.state import ledger_hosts
from fenceless.localstate import member, set_agent_view
from fenceless.lvm import mda
from fenceless.lvm.adapter import Lvm, Role
from fenceless.ops.cluster import InitOp, JoinOp, VgEnv
from fenceless.ops.context import Context

ACTIVE_EVERY = 2.0  # seconds between looks at which LVs are active here
SCRUB_EVERY = 10  # the writer re-reads the whole ledger every this many renewals


class NotMember(UserError):
    """Refused: this host has not joined the cluster on VG {vg}. Run `fenceless join`."""


class TakeoverRefused(UserError):
    """Refused: {detail}"""


@dataclass
class Pending:
    request: dict[str, Any]
    done: threading.Event = field(default_factory=threading.Event)
    result: dict[str, Any] | None = None
    error: BaseException | None = None
    deadline: float = 0.0
    seen_epoch: int | None = None  # the writer epoch when the request arrived
    started: bool = False


def _log_to_stderr(msg: str) -> None:
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    print(f"{stamp} {msg}", file=sys.stderr, flush=True)


class VgAgent:
    """Everything the agent does for one shared VG."""

    def __init__(self, agent: Agent, vg: VgConfig) -> None:
        self.agent = agent
        self.cfg = agent.cfg
        self.vg = vg
        self.clock = agent.clock
        self.log: Callable[[str], None] = lambda msg: agent.log(f"[{vg.name}] {msg}")
        self.dev: BlockDevice | None = None
        self.size = 0
        self.anchor: Anchor | None = None
        self.area: ControlArea | None = None
        self.observer: HostObserver | None = None
        self.lease: DeltaLease | None = None
        self.epoch: int | None = None
        self.handover_request: dict[str, Any] | None = None
        self.requests: queue.Queue[Pending] = queue.Queue()
        self.waiting: list[Pending] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.loop, name=f"vg-{vg.name}", daemon=True)
        self.last_error = ""
        self.ledger_cache: dict[str, Any] | None = None  # the writer's last ledger state
        self.history_heads = history.Heads()  # the history ring as this writer left it
        self.active_checked = -ACTIVE_EVERY
        self.ticks = 0
        self.logged: set[str] = set()
        self.announce: dict[str, bool] = {}  # LVs being activated here (published first)
        self.last_leader: Leader | None = None
        self.seqno: int | None = None
        self.mda_location: Any = None
        self.mda_key: Any = None
        self.volumes = VolumeService(self)
        self.active_cache: dict[str, int] = {}
        self.logged_hosts: set[str] = set()

    # --- plumbing ---------------------------------------------------------------

    @property
    def n(self) -> float:
        return self.area.io_timeout if self.area is not None else self.cfg.io_timeout

    @property
    def timing(self) -> LeaseTiming:
        return LeaseTiming(self.n)

    def env(self) -> VgEnv:
        assert self.dev is not None

        def lvm(role: Role) -> Lvm:
            return self.agent.ctx.lvm(self.vg.name, role)

        return VgEnv(self.cfg, self.vg, self.dev, self.size, self.clock, lvm, self.log)

    def active_lvs(self, force: bool = False) -> dict[str, int]:
        """LVs active on this host and their mapped sizes (looked up every ACTIVE_EVERY s)."""
        now = self.clock.monotonic()
        if force or now - self.active_checked >= ACTIVE_EVERY:
            self.active_checked = now
            try:
                self.active_cache = {a.lv: a.size for a in
                                     self.agent.ctx.activator(self.vg.name).active()}
            except FencelessError as exc:
                self.log_once(f"cannot list active LVs: {exc}")
        return self.active_cache

    def check_seqno(self) -> None:
        """A new VG metadata seqno: refresh every LV active here to its new size.

        The change is noticed from LVM's own metadata header on the PV (one 4 KiB
        O_DIRECT read, no LVM process, nothing that could "repair" metadata).
        """
        assert self.dev is not None
        try:
            info = mda.read_mda_header(self.dev, location=self.mda_location, size=self.size)
            self.mda_location = info.location
            if info.key == self.mda_key:
                return
            _text, seqno = mda.read_metadata_text(self.dev, location=info.location,
                                                  size=self.size)
            self.mda_key = info.key
        except FencelessError as exc:
            self.mda_location = None
            self.log_once(f"cannot read the VG metadata header: {exc}")
            return
        if seqno != self.seqno:
            self.seqno = seqno
            if self.refresh_active(force=True) and self.lease is not None:
                self.renew()  # publish the refreshed sizes now: an extend waits for them

    def metadata_key(self) -> Any:
        """LVM's metadata header on the PV (offset, size, checksum of the text), or None
        if it cannot be read: equal keys mean byte-identical VG metadata."""
        assert self.dev is not None
        try:
            return mda.read_mda_header(self.dev, location=self.mda_location, size=self.size).key
        except FencelessError:
            return None

    def lvm(self, role: Role = Role.READER) -> Lvm:
        """LVM for this VG, each command bounded by the time the lease has left."""
        lvm = self.agent.ctx.lvm(self.vg.name, role)
        if self.lease is not None:
            lvm.timeout = max(0.5, min(lvm.timeout, self.lease.remaining() - self.n))
        return lvm

    def refresh_active(self, force: bool = False) -> bool:
        """Bring every active mapping to the size in the metadata; True if any changed."""
        active = self.active_lvs(force=force)
        if not active:
            return False
        changed = False
        try:
            sizes = {lv.name: lv.size for lv in self.lvm().lvs()}
            activator = self.agent.ctx.activator(self.vg.name)
            for lv, size in active.items():
                if lv in sizes and sizes[lv] != size:
                    got = activator.refresh(lv)
                    self.log(f"refreshed {lv}: {size} -> {got.size} bytes")
                    changed = True
        except FencelessError as exc:
            self.log(f"refresh failed: {exc}")
        if changed:
            self.active_lvs(force=True)
        return changed

    def facts(self) -> dict[str, Any]:
        facts: dict[str, Any] = {
            "version": __version__,
            "lvm_role": "writer" if self.epoch else "reader",
            "lvm_version": self.agent.lvm_version,
            "active": {**{lv: 0 for lv in self.announce}, **self.active_lvs()},
            "seqno": self.seqno,
            "priority": self.agent.priority,
        }
        if self.handover_request:
            facts["handover_request"] = self.handover_request
        return facts

    def open_device(self) -> None:
        if self.dev is None:
            path = self.vg.devices[0]
            self.size = device_size(path)
            self.dev = TimedIO(self.agent.opener(path, True), timeout=self.cfg.io_timeout,
                               thread_init=raise_this_thread)

    def attach(self) -> bool:
        """Find the control area through the anchor; False while there is none."""
        self.open_device()
        assert self.dev is not None
        if self.area is not None:
            return True
        anchor = read_anchor(self.dev, self.size)
        if anchor is None:
            return False
        self.anchor = anchor
        self.area = ControlArea.open(self.dev, anchor, self.clock)
        # From now on N is the cluster's, from the superblock.
        self.dev.close()
        self.dev = TimedIO(self.agent.opener(self.vg.devices[0], True),
                           timeout=self.area.io_timeout, thread_init=raise_this_thread)
        self.area = ControlArea.open(self.dev, anchor, self.clock)
        self.observer = HostObserver(self.area.hosts())
        self.log(f"found cluster {anchor.cluster_uuid} (control LV {anchor.lv_name}, "
                 f"io_timeout {self.area.io_timeout}s)")
        return True

    def adopt(self, area: ControlArea, anchor: Anchor | None, lease: DeltaLease,
              epoch: int | None) -> None:
        same = anchor is not None and self.anchor is not None and \
            anchor.cluster_uuid == self.anchor.cluster_uuid
        self.area, self.lease, self.epoch = area, lease, epoch
        if anchor is not None:
            self.anchor = anchor
        if self.observer is None or not same:
            self.observer = HostObserver(area.hosts())  # else keep what it has watched

    # --- the loop ---------------------------------------------------------------

    def loop(self) -> None:
        raise_this_thread()  # renewals must not wait behind a busy host's other work
        next_tick = 0.0
        while not self.stop.is_set():
            now = self.clock.monotonic()
            if now >= next_tick:
                delay = self.guarded(self.tick)
                next_tick = self.clock.monotonic() + (delay or self.timing.renew_interval)
            self.serve_requests()
            self.guarded(self.mailboxes)
            timeout = max(0.0, min(next_tick - self.clock.monotonic(), self.n / 2, POLL))
            try:
                item = self.requests.get(timeout=timeout)
            except queue.Empty:
                continue
            self.waiting.append(item)
            self.serve_requests()

    def guarded(self, fn: Callable[[], float | None]) -> float | None:
        try:
            return fn()
        except FencelessError as exc:
            if str(exc) != self.last_error:
                self.log(f"error: {exc}")
            self.last_error = str(exc)
        except Exception as exc:
            self.log(f"internal error: {type(exc).__name__}: {exc}")
        return None

    def mailboxes(self) -> None:
        if self.area is None or self.lease is None:
            self.volumes.expire(self.clock.monotonic())
            return
        if self.epoch is not None:
            self.volumes.adopt_own()
            self.volumes.writer_poll()
            self.volumes.run_work()
        else:
            if self.volumes.work:  # the role was given up between two passes
                self.volumes.requeue()
            self.volumes.publish_inbox()
            self.volumes.poll_outbox()
            self.volumes.expire(self.clock.monotonic())

    def tick(self) -> float:
        """One renewal round; returns the delay until the next one."""
        if not self.attach():
            self.publish()
            return self.timing.renew_interval
        assert self.area is not None and self.anchor is not None
        if self.lease is None:
            known = member(self.cfg.state_dir, self.vg.name)
            if not known or known.get("cluster") != str(self.anchor.cluster_uuid):
                # Not a member yet: still watch the others, so liveness is known on joining.
                assert self.observer is not None
                self.observer.observe(self.area.hosts().read_area(), self.clock.monotonic())
                self.publish()
                return self.timing.renew_interval
            self.log(f"acquiring host id {known['host_id']} (waits out any earlier holder)")
            self.lease = self.area.hosts().acquire(int(known["host_id"]), self.cfg.host,
                                                   self.facts())
            self.log(f"host id {self.lease.host_id} generation {self.lease.generation}")
        if not self.renew():
            return self.n / 2
        self.check_seqno()
        if self.epoch is not None:
            self.writer_duties()
        else:
            self.reader_duties()
        self.publish_role()  # with the leader as just read
        self.publish()
        return self.timing.renew_interval

    def renew(self) -> bool:
        """Renew the host lease and feed the observer; False if this renewal failed."""
        lease = self.lease
        if lease is None:
            return False
        late = lease.clock.monotonic() - lease.last_renewal
        if late > self.timing.warn_after:
            self.log(f"WARNING: renewal is late ({late:.2f}s since the last one)")
        try:
            raw = lease.renew(self.facts())
        except LeaseLost as exc:
            self.lose_host(str(exc))
            return False
        except IoError as exc:
            if lease.remaining() <= 0:
                self.lose_host(f"renewal I/O failing past the lease time: {exc}")
            else:
                self.drop_if_late()
                self.log(f"WARNING: renewal failed ({exc}); retrying")
            return False
        crashpoint("agent.renewed")
        assert self.observer is not None
        self.observer.observe(raw, self.clock.monotonic())
        self.publish_role()
        return True

    def renew_if_due(self) -> None:
        """Between long steps (LVM calls, batches of requests): renew when it falls due."""
        if self.lease is not None and \
                self.clock.monotonic() - self.lease.last_renewal >= self.timing.renew_interval:
            self.renew()

    def log_once(self, msg: str) -> None:
        if msg not in self.logged:
            self.logged.add(msg)
            self.log(msg)

    def drop_if_late(self) -> None:
        if self.epoch is not None and self.lease is not None and \
                self.lease.clock.monotonic() - self.lease.last_renewal > self.timing.warn_after:
            self.drop_writer("host lease renewals are failing")

    def check_write(self) -> None:
        """Right before every shared write: the lease must have at least N to spare."""
        if self.lease is None:
            raise LeaseLost(detail="no host lease")
        self.lease.check(margin=self.n)
        if isinstance(self.dev, TimedIO) and self.dev.abandoned:
            # A timed-out write may still land: writing again could be overtaken by it.
            raise LeaseLost(detail=f"{self.dev.abandoned} I/O request(s) to the LUN are still "
                            "hung; no shared write until they complete")

    def drop_writer(self, why: str) -> None:
        self.ledger_cache = None
        if self.epoch is not None:
            self.log(f"!!! GIVING UP THE WRITER ROLE (epoch {self.epoch}): {why}. "
                     "This host writes nothing shared from now on.")
        self.epoch = None
        with contextlib.suppress(FencelessError, OSError):
            self.publish_role()

    def lose_host(self, why: str) -> None:
        self.drop_writer(why)
        if self.lease is not None:
            self.log(f"!!! HOST LEASE LOST: {why}")
        self.lease = None

    # --- writer and reader duties --------------------------------------------------

    def read_leader(self) -> Leader | None:
        assert self.area is not None
        self.last_leader = self.area.writer().read_leader()
        return self.last_leader

    def publish_role(self) -> None:
        """Tell the local LVM guard whether this host may change this VG's metadata.

        Valid only for the time the lease has left (less a margin of N): if the
        agent stops renewing, the guard falls back to "reader" by itself.
        """
        leader = self.last_leader
        writer = leader.owner_name if leader is not None and not leader.released else None
        epoch = leader.lver if leader is not None else 0
        left = self.lease.remaining() - self.n if self.lease is not None else 0.0
        writing = self.epoch is not None and left > 0
        if writing:
            writer, epoch = self.cfg.host, self.epoch or 0
        # A reader's line is valid for as long as its view (who the writer is) is fresh.
        self.agent.set_role(role_entry(self.vg.name, "writer" if writing else "reader",
                                       writer, epoch, max(left, 0.0)))

    def writer_duties(self) -> None:
        assert self.area is not None and self.lease is not None and self.observer is not None
        leader = self.read_leader()
        me = (self.lease.host_id, self.lease.generation, self.epoch)
        if leader is None or leader.released or \
                (leader.owner_id, leader.owner_generation, leader.lver) != me:
            held = "nobody" if leader is None else \
                f"host id {leader.owner_id} at epoch {leader.lver}"
            self.drop_writer(f"the writer lease now names {held}")
            return
        try:
            # The ledger is read again only when something seems to need writing
            # (write_ledger re-reads it anyway before deciding where to write).
            self.ticks += 1
            if self.ledger_cache is None or self.ticks % SCRUB_EVERY == 0 or \
                    self.wanted_hosts(self.ledger_cache) is not None:
                view = self.area.ledger()
                state = dict(view.current.state) if view.current else {}
                stale_epoch = view.current is None or view.current.epoch < (self.epoch or 0)
                hosts = self.wanted_hosts(state)
                if hosts is not None or stale_epoch:
                    if hosts is not None:
                        state["hosts"] = hosts
                    self.write_ledger(state, both_slots=stale_epoch)
                self.ledger_cache = state
            request = self.pending_handover(self.ledger_cache)
            if request is not None:
                self.hand_over(self.ledger_cache, *request)
        except LeaseLost as exc:
            self.drop_writer(str(exc))

    def wanted_hosts(self, state: dict[str, Any]) -> dict[str, Any] | None:
        """The ledger's host table with every live host in it, or None if it has them all."""
        assert self.area is not None and self.observer is not None
        hosts = {str(k): v for k, v in dict(state.get("hosts", {})).items()}
        changed = False
        for hid in range(1, self.area.sb.max_hosts + 1):
            rec = self.observer.record(hid)
            if rec is None or rec.free:
                continue
            entry = hosts.get(str(hid))
            if not isinstance(entry, dict) or entry.get("name") != rec.name:
                hosts[str(hid)] = {"name": rec.name, "since_epoch": self.epoch}
                changed = True
        return hosts if changed else None

    def write_ledger(self, state: dict[str, Any], *, both_slots: bool = False) -> None:
        assert self.area is not None and self.lease is not None and self.epoch is not None
        crashpoint("agent.before-ledger-write")
        self.ledger_cache = None  # whatever happens next, re-read before trusting it
        rec = write_ledger(self.area.dev, self.area.layout, self.epoch, state,
                               writer_host_id=self.lease.host_id, both_slots=both_slots,
                               before_write=self.check_write)
        self.ledger_cache = dict(rec.state)
        for hid, entry in sorted(dict(state.get("hosts", {})).items()):
            if isinstance(entry, dict) and entry.get("since_epoch") == self.epoch and \
                    hid not in self.logged_hosts:
                self.logged_hosts.add(hid)
                self.log(f"recorded host {entry.get('name')} as id {hid} "
                         f"(ledger generation {rec.generation})")

    def pending_handover(self, state: dict[str, Any]) -> tuple[int, str, str] | None:
        """A live host's request to hand the writer role to a live host: (id, name, nonce)."""
        assert self.area is not None and self.observer is not None
        done = (state.get("handover") or {}).get("id")
        names = {v: int(k) for k, v in ledger_hosts(state).items()}
        now = self.clock.monotonic()
        for hid in range(1, self.area.sb.max_hosts + 1):
            rec = self.observer.record(hid)
            req = rec.facts.get("handover_request") if rec else None
            if not isinstance(req, dict) or req.get("id") == done or \
                    self.observer.state(hid, now) is not HostState.LIVE or \
                    int(req.get("from_epoch", -1)) != self.epoch:
                continue
            target = names.get(str(req.get("to")))
            if target is None or self.observer.state(target, now) is not HostState.LIVE:
                continue
            return target, str(req.get("to")), str(req.get("id"))
        return None

    def hand_over(self, state: dict[str, Any], target: int, name: str, nonce: str) -> None:
        assert self.area is not None and self.lease is not None and self.epoch is not None
        if target == self.lease.host_id:
            return
        epoch = self.epoch
        state = dict(state)
        state["handover"] = {"to_id": target, "to": name, "from_epoch": epoch, "id": nonce}
        self.log(f"handing the writer role over to {name} (id {target}) after epoch {epoch}")
        self.write_ledger(state)
        crashpoint("agent.handover-recorded")
        self.area.writer().release(self.lease.host_id, self.lease.generation, epoch,
                                   before_write=self.check_write)
        self.read_leader()
        self.drop_writer(f"handed over to {name}")

    def reader_duties(self) -> None:
        assert self.area is not None and self.lease is not None and self.observer is not None
        leader = self.read_leader()
        if leader is not None and not leader.released and \
                (leader.owner_id, leader.owner_generation) == \
                (self.lease.host_id, self.lease.generation):
            # We gave the role up (late renewals) but still hold it on disk, and the
            # lease is healthy again: take it back, or nobody could.
            if self.lease.remaining() > 2 * self.n:
                self.acquire("the lease is healthy again")
            return
        if self.handover_request and leader is not None and \
                leader.lver > int(self.handover_request.get("from_epoch", 0)):
            self.handover_request = None  # done (or overtaken): stop asking
        if leader is None or leader.owner_id == 0:
            pass
        elif leader.released:
            if self.handover_to(leader).get("to_id") == self.lease.host_id:
                self.acquire("planned handover")
                return
        elif self.observer.owner_gone(leader.owner_id, leader.owner_generation,
                                      self.clock.monotonic()):
            # The writer's incarnation is gone without releasing the role.
            ho = self.handover_to(leader)
            target = ho.get("to_id")
            if target == self.lease.host_id:
                # It died between recording a handover to us and releasing: finish it.
                self.acquire(f"completing the handover {ho.get('to')} was promised")
                return
            if leader.owner_id == self.lease.host_id and not self.may_still_take(target):
                # The writer was this host's previous incarnation (its lease ran out, or
                # the agent restarted): it writes nothing any more, and nobody else was
                # made writer since. Take the role back at a new epoch rather than leave
                # the cluster without a writer until an admin notices (unless it had
                # named a live successor, which takes it); a racing takeover from another
                # host is settled by the ballot.
                self.acquire("this host was the writer before its host lease was "
                             "renewed anew")
                return
        if self.agent.auto_takeover and self.is_candidate(leader):
            self.acquire("automatic takeover")

    def may_still_take(self, target: Any) -> bool:
        """A named successor (another host) that is not known to be gone may yet take the
        role: UNKNOWN (a fresh view after a restart) and FAIL count as maybe alive."""
        assert self.lease is not None and self.observer is not None
        return isinstance(target, int) and target != self.lease.host_id and \
            self.observer.state(target, self.clock.monotonic()) not in (HostState.DEAD,
                                                                      HostState.FREE)

    def handover_to(self, leader: Leader) -> dict[str, Any]:
        """The handover the ledger records away from ``leader``'s epoch, or {}."""
        assert self.area is not None
        view = self.area.ledger()
        ho = (view.current.state.get("handover") if view.current else None) or {}
        return ho if isinstance(ho, dict) and ho.get("from_epoch") == leader.lver else {}

    def is_candidate(self, leader: Leader | None) -> bool:
        """The writer is gone, and this is the lowest-numbered live host."""
        assert self.area is not None and self.lease is not None and self.observer is not None
        now = self.clock.monotonic()
        if leader is not None and not leader.free and \
                not self.observer.owner_gone(leader.owner_id, leader.owner_generation, now):
            return False
        if leader is not None and leader.owner_id != 0 and \
                self.may_still_take(self.handover_to(leader).get("to_id")):
            return False  # a named successor takes it (released or not): let it
        live = [h for h in range(1, self.area.sb.max_hosts + 1)
                if h == self.lease.host_id or self.observer.state(h, now) is HostState.LIVE]
        return min(live) == self.lease.host_id

    def acquire(self, why: str) -> AcquireResult:
        assert self.area is not None and self.lease is not None and self.observer is not None
        observer, clock = self.observer, self.clock

        def gone(host_id: int, generation: int) -> bool:
            return observer.owner_gone(host_id, generation, clock.monotonic())

        self.check_write()
        result = self.area.writer().acquire(
            self.lease.host_id, self.lease.generation, gone, name=self.cfg.host,
            max_ballots=6, before_write=self.check_write)
        if result.won:
            crashpoint("agent.writer-acquired")
            view = self.area.ledger()
            state = dict(view.current.state) if view.current else {}
            state["writer"] = {"host_id": self.lease.host_id, "name": self.cfg.host,
                               "epoch": result.epoch}
            # A takeover publishes its epoch first, in both slots, so no stale writer
            # can roll the ledger back; only then does this host act as the writer.
            self.epoch = result.epoch
            try:
                self.write_ledger(state, both_slots=True)
            except BaseException:
                self.epoch = None  # reader_duties takes it back once it can publish
                raise
            self.read_leader()
            self.lease.renew(self.facts())  # tell the others (and the guard) at once
            self.publish_role()
            self.log(f"*** this host is the metadata writer at epoch {result.epoch} ({why})")
        return result

    # --- requests from the CLI ----------------------------------------------------

    def submit(self, request: dict[str, Any], timeout: float) -> dict[str, Any]:
        item = Pending(request, deadline=self.clock.monotonic() + timeout)
        self.requests.put(item)
        if not item.done.wait(timeout + 1.0):
            raise UserError(detail=f"the agent did not finish {request.get('op')!r} "
                            f"within {timeout:.1f}s")
        if item.error is not None:
            raise item.error
        return item.result or {}

    def serve_requests(self) -> None:
        keep = []
        for item in self.waiting:
            if not item.started and self.clock.monotonic() > item.deadline:
                item.error = UserError(detail=f"the agent was busy; {item.request.get('op')!r} "
                                       "was not started (nothing was changed)")
                item.done.set()
                continue
            item.started = True
            if item.request.get("op") == "volume":
                try:
                    self.volumes.submit(item)  # completed by the volume service
                except BaseException as exc:
                    item.error = exc
                    item.done.set()
                continue
            try:
                result = self.handle(item)
            except BaseException as exc:
                item.error = exc
                item.done.set()
                continue
            if result is None:
                if self.clock.monotonic() < item.deadline:
                    keep.append(item)
                    continue
                item.error = TakeoverRefused(detail="gave up waiting: " + self.last_error)
            item.result = result
            item.done.set()
        self.waiting = keep

    def handle(self, item: Pending) -> dict[str, Any] | None:
        """Carry out a request; None means "not yet, ask again on the next round"."""
        op = item.request.get("op")
        if op == "init":
            self.open_device()
            init = InitOp(self.env(), max_hosts=int(item.request.get("max_hosts", 16)),
                          adopt=bool(item.request.get("adopt")))
            result = init.run()
            assert init.area is not None and init.host_lease is not None
            self.adopt(init.area, read_anchor(self.env().dev, self.size), init.host_lease,
                       init.epoch)
            return result
        if op == "join":
            self.open_device()
            join = JoinOp(self.env())
            result = join.run()
            assert join.area is not None and join.host_lease is not None
            self.adopt(join.area, join.anchor, join.host_lease, None)
            return result
        if op in ("takeover", "handover", "activate", "refresh", "restore") and \
                (self.area is None or self.lease is None):
            if not self.attach():
                raise NotInitialized(vg=self.vg.name, device=self.vg.devices[0])
            raise NotMember(vg=self.vg.name)
        if op == "takeover":
            return self.handle_takeover(item, wait=bool(item.request.get("wait")))
        if op == "restore":
            return self.handle_restore(int(item.request.get("seqno", 0)),
                                       bool(item.request.get("apply")))
        if op in ("activate", "deactivate", "refresh"):
            return self.handle_activation(op, str(item.request.get("lv")),
                                          bool(item.request.get("readonly")))
        if op == "handover":
            return self.handle_handover(str(item.request.get("to")))
        raise UserError(detail=f"unknown agent request {op!r}")

    def handle_restore(self, seqno: int, apply: bool) -> dict[str, Any]:
        """Restore the VG metadata from the history ring: on the writer only, dry run first."""
        import os
        import tempfile

        from fenceless.ops.metadata import changed_lvs, with_seqno

        assert self.area is not None and self.dev is not None and self.lease is not None
        if self.epoch is None:
            leader = self.read_leader()
            who = f"{leader.owner_name} is, epoch {leader.lver}" if leader else "none is"
            raise UserError(detail=f"Refused: host {self.cfg.host} is not the metadata writer "
                            f"({who}). Run `fenceless metadata restore` on the writer.")
        target = history.read_entry(self.area.dev, self.area.layout, seqno,
                                    parse=mda.vg_identity)
        current, cur_seq = mda.read_metadata_text(self.dev, size=self.size)
        changes = changed_lvs(current, target)
        busy = {lv: hosts for lv in changes if (hosts := self.volumes.active_on(lv))}
        result: dict[str, Any] = {
            "seqno": seqno, "current_seqno": cur_seq, "changes": changes,
            "busy": busy, "diff": history.diff(current, target, label_a=f"seqno {cur_seq}",
                                               label_b=f"seqno {seqno}"),
            "applied": False}
        if busy:
            where = "; ".join(f"{lv} is active on {', '.join(h)}" for lv, h in busy.items())
            raise UserError(detail=f"Refused: restoring seqno {seqno} would change LVs that "
                            f"are in use ({where}); deactivate them first. Nothing was changed")
        if not apply:
            return result
        fd, path = tempfile.mkstemp(prefix="fenceless-restore-", suffix=".vg")
        try:
            with os.fdopen(fd, "w") as f:
                # Keep the seqno rising: the restore becomes current seqno + 1.
                f.write(with_seqno(target, cur_seq))
            self.check_write()
            lvm = self.lvm(Role.WRITER)
            lvm.run("vgcfgrestore", "--force", "--file", path, self.vg.name,
                    timeout=max(0.5, self.lease.remaining() - self.n))
        finally:
            os.unlink(path)
        _text, new_seq = mda.read_metadata_text(self.dev, size=self.size)
        self.note_metadata_change(f"restore-{seqno}", new_seq)
        req = mb.Request(id=f"restore-{seqno}-{new_seq}", op="restore", args={},
                         user="-", argv=("fenceless", "metadata", "restore", str(seqno)))
        self.audit(self.cfg.host, req, "ok", f"restored seqno {seqno} as seqno {new_seq}")
        result.update(applied=True, new_seqno=new_seq)
        return result

    def handle_activation(self, op: str, lv: str, readonly: bool) -> dict[str, Any]:
        """Activation through the agent: announce it on disk first, then map it.

        The writer refuses to remove or rename an LV that any host's lease sector
        lists as active, so the announcement (a renewal carrying the LV in this
        host's facts) must land before the mapping exists, and the mapping must be
        gone before the announcement is withdrawn.
        """
        from fenceless.validate import lv_name

        lv_name(lv)
        activator = self.agent.ctx.activator(self.vg.name)
        if op == "activate":
            self.announce[lv] = True
            if self.lease is not None and not self.renew():
                raise LeaseLost(detail="could not announce the activation on disk")
            got = activator.activate(lv, readonly=readonly)
        elif op == "refresh":
            got = activator.refresh(lv)
        else:
            activator.deactivate(lv)
            self.announce.pop(lv, None)
            self.active_lvs(force=True)
            if self.lease is not None:
                self.renew()
            return {"vg": self.vg.name, "lv": lv, "active": False}
        self.active_lvs(force=True)
        if self.lease is not None:
            self.renew()
        return {"vg": got.vg, "lv": got.lv, "device": got.device, "size_bytes": got.size,
                "readonly": got.readonly}

    def handle_takeover(self, item: Pending, *, wait: bool = False) -> dict[str, Any] | None:
        assert self.area is not None and self.lease is not None and self.observer is not None
        if self.epoch is not None:
            return {"outcome": "already", "epoch": self.epoch, "host": self.cfg.host}
        leader = self.read_leader()
        now = self.clock.monotonic()
        if item.seen_epoch is None:
            item.seen_epoch = leader.lver if leader is not None else 0
        elif leader is not None and leader.lver > item.seen_epoch and not leader.free:
            raise TakeoverRefused(detail=f"{leader.owner_name} won the writer lease at epoch "
                                  f"{leader.lver} first")
        if leader is not None and not leader.free and \
                not self.observer.owner_gone(leader.owner_id, leader.owner_generation, now):
            state = self.observer.state(leader.owner_id, now)
            if state is HostState.LIVE and not wait:
                raise TakeoverRefused(detail=(
                    f"the writer {leader.owner_name} (host id {leader.owner_id}, epoch "
                    f"{leader.lver}) is alive: its host lease is renewing. Takeover is for a "
                    "dead writer; for a planned move run `fenceless writer handover HOST`."))
            self.last_error = (f"the writer {leader.owner_name}'s host lease is "
                               f"{state.value}, not yet dead")
            return None  # FAIL or UNKNOWN: wait for DEAD (or for it to come back)
        result = self.acquire("takeover requested")
        owner = self.ledger_name(result.owner_id)
        if result.outcome is Outcome.WON:
            return {"outcome": "won", "epoch": result.epoch, "host": self.cfg.host}
        if result.outcome in (Outcome.LOST, Outcome.BUSY) and \
                result.epoch > (item.seen_epoch or 0):
            raise TakeoverRefused(detail=f"{owner} won the writer lease at epoch "
                                  f"{result.epoch} first")
        raise TakeoverRefused(detail=f"the writer lease is {result.outcome.value} (held by "
                              f"{owner} at epoch {result.epoch})")

    def ledger_name(self, host_id: int) -> str:
        assert self.area is not None
        with contextlib.suppress(FencelessError):
            view = self.area.ledger()
            if view.current:
                return ledger_hosts(view.current.state).get(host_id, f"host id {host_id}")
        return f"host id {host_id}"

    def handle_handover(self, to: str) -> dict[str, Any]:
        assert self.area is not None and self.lease is not None and self.observer is not None
        view = self.area.ledger()
        names = {v: k for k, v in ledger_hosts(view.current.state).items()} \
            if view.current else {}
        if to not in names:
            raise UserError(detail=f"Refused: {to} is not a host of this cluster (hosts: "
                            f"{', '.join(sorted(names))})")
        target = names[to]
        now = self.clock.monotonic()
        if target != self.lease.host_id and \
                self.observer.state(target, now) is not HostState.LIVE:
            raise UserError(detail=f"Refused: {to}'s host lease is "
                            f"{self.observer.state(target, now).value}; hand over only to a "
                            "live host")
        leader = self.read_leader()
        target_rec = self.observer.record(target)
        if leader is not None and not leader.released and leader.owner_id == target and \
                target_rec is not None and target_rec.generation == leader.owner_generation:
            return {"outcome": "already", "epoch": leader.lver, "host": to}
        if leader is None or leader.free or \
                self.observer.owner_gone(leader.owner_id, leader.owner_generation, now):
            raise UserError(detail=(
                "Refused: there is no live writer to hand over from (the writer lease names "
                + ("nobody" if leader is None else
                   f"{leader.owner_name} generation {leader.owner_generation}, which is gone")
                + f"). Run `fenceless writer takeover` on {to}."))
        nonce = secrets.token_hex(6)
        if self.epoch is not None:
            state = dict(view.current.state) if view.current else {}
            self.hand_over(state, target, to, nonce)
        else:
            self.handover_request = {"to": to, "id": nonce,
                                     "from_epoch": leader.lver if leader else 0}
            self.lease.renew(self.facts())  # publish the request now
        return {"outcome": "requested", "from_epoch": leader.lver if leader else 0,
                "to": to, "id": nonce}

    def note_metadata_change(self, request_id: str, seqno: int) -> None:
        """After a change by this writer: keep the VG metadata text in the history ring."""
        assert self.area is not None and self.dev is not None and self.lease is not None
        self.mda_key = None  # the next check_seqno() looks again
        try:
            text, got = mda.read_metadata_text(self.dev, size=self.size)
            if got < seqno:
                raise ExecError(detail=f"the PV shows seqno {got}, expected {seqno}")
            history.append(self.area.dev, self.area.layout,
                           history.HistoryEntry(text, got, request_id, self.lease.host_id),
                           epoch=self.epoch or 0, parse=mda.vg_identity,
                           before_write=self.check_write, known=self.history_heads)
        except LeaseLost:
            raise
        except FencelessError as exc:
            self.log(f"metadata history: seqno {seqno} not recorded: {exc}")

    def audit(self, host: str, req: Any, result: str, message: str) -> None:
        """One record per request in the audit log on the LUN (best effort, never fatal)."""
        assert self.area is not None
        try:
            audit.append(self.area.dev, self.area.layout, audit.audit_record(
                host=host, user=req.user or "-", argv=req.argv or (req.op,),
                request_id=req.id, result=result, message=message),
                epoch=self.epoch or 0, before_write=self.check_write)
        except LeaseLost:
            raise
        except FencelessError as exc:
            self.log(f"audit log: request {req.id} not recorded: {exc}")
        self.log(f"audit: {host} {req.user or '-'} {' '.join(req.argv) or req.op} -> {result}"
                 + (f": {message}" if message else ""))

    # --- what the CLI reads locally -------------------------------------------------

    def publish(self) -> None:
        now = self.clock.monotonic()
        view: dict[str, Any] = {"pid": self.agent.pid, "mono": now, "vg": self.vg.name,
                                "anchored": self.area is not None,
                                "host_id": self.lease.host_id if self.lease else None,
                                "generation": self.lease.generation if self.lease else None,
                                "writer_epoch": self.epoch, "io_timeout": self.n,
                                "error": self.last_error, "hosts": {}}
        if self.area is not None and self.observer is not None:
            for hid in range(1, self.area.sb.max_hosts + 1):
                view["hosts"][str(hid)] = {
                    "state": self.observer.state(hid, now).value,
                    "changed": self.observer.last_change(hid),
                }
        with contextlib.suppress(OSError):
            set_agent_view(self.cfg.state_dir, self.vg.name, view)

    def shutdown(self) -> None:
        """Planned stop: release the writer lease, then the host lease."""
        if self.area is not None and self.lease is not None:
            with contextlib.suppress(FencelessError):
                if self.epoch is not None:
                    self.area.writer().release(self.lease.host_id, self.lease.generation,
                                               self.epoch, before_write=self.check_write)
                    self.log(f"released the writer lease at epoch {self.epoch}")
                self.epoch = None
                self.lease.release()
                self.log("released the host lease")


class Agent:
    def __init__(self, cfg: HostConfig, *, auto_takeover: bool = False,
                 clock: Clock | None = None,
                 opener: Callable[[str, bool], BlockDevice] = open_device,
                 log: Callable[[str], None] = _log_to_stderr) -> None:
        import os

        self.cfg = cfg
        self.ctx = Context(cfg)
        self.clock = clock or SystemClock()
        self.opener = opener
        self.log = log
        self.auto_takeover = auto_takeover
        self.pid = os.getpid()
        self.lvm_version = "unknown"
        self.priority = "normal"
        self.roles: dict[str, RoleEntry] = {}
        self.role_lock = threading.Lock()
        self.vgs = {vg.name: VgAgent(self, vg) for vg in cfg.vgs}
        self.server: Server | None = None

    def set_role(self, entry: RoleEntry) -> None:
        """Rewrite the guard's role file with this VG's new entry (all VGs in one file)."""
        with self.role_lock:
            self.roles[entry.vg] = entry
            try:
                write_role_file(self.cfg.state_dir, list(self.roles.values()))
            except OSError as exc:
                self.log(f"cannot write the guard's role file: {exc}")

    def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        vg = self.cfg.vg(request.get("vg"))
        timeout = float(request.get("timeout", 60.0))
        return self.vgs[vg.name].submit(request, timeout)

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
        self.server = Server(self.cfg.state_dir, self.handle)
        self.server.start()
        for v in self.vgs.values():
            v.thread.start()
        stop.wait()
        self.server.close()
        for v in self.vgs.values():
            v.stop.set()
        for v in self.vgs.values():
            self.set_role(role_entry(v.vg.name, "reader", None, 0, 0.0))
            v.thread.join(timeout=30)
            if v.thread.is_alive() or (isinstance(v.dev, TimedIO) and v.dev.abandoned):
                # Something may still be writing: releasing now would let others take
                # over at once. Leave the leases to run out (the dead time covers it).
                self.log(f"[{v.vg.name}] still busy: NOT releasing the leases; they "
                         "expire by themselves")
                continue
            v.shutdown()
        self.log("agent stopped")
        return 0
