"""Volume requests in the agent: forwarded through mailboxes, run by the writer, journaled.

Requester (any host that is not the writer): a CLI hands its request to the
local agent, which puts it in this host's inbox sector and polls its outbox
for the reply. The request stays in the inbox until answered, so a change of
writer loses nothing: the next writer picks it up.

Writer: polls every inbox, and for each request it has not answered:
  check args (the disk is untrusted input) -> check prerequisites on a fresh
  ``--readonly`` report -> journal the intent in the ledger -> run LVM,
  bounded by the time the lease has left -> record the outcome and the VG
  seqno in the ledger -> reply.
The request id is the key: a request already recorded is answered from the
ledger, never applied twice. An intent found without an outcome (the writer
died) is reconciled against the real VG by the next writer: done, redo, or
failed — never left half-done.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import TYPE_CHECKING, Any

from fenceless.agent.ipc import RemoteError
from fenceless.blockio import SECTOR
from fenceless.errors import ExecError, FencelessError, LeaseLost, UserError
from fenceless.faults import crashpoint
from fenceless.ledger import mailbox as mb
from fenceless.localstate import member
from fenceless.lvm.adapter import Role
from fenceless.ondisk.errors import CorruptRecord
from fenceless.ops import volume as vol
from fenceless.validate import request_id

if TYPE_CHECKING:
    from fenceless.agent.daemon import Pending, VgAgent

POLL = 0.05  # seconds between mailbox polls (the writer's inboxes, a requester's outbox)
IDLE_POLL = 0.2  # the writer's inbox poll when no request came for IDLE_AFTER seconds
IDLE_AFTER = 10.0
KEEP_REQUESTS = 400  # outcomes kept in the ledger for de-duplication
ACK_WAIT_N = 15  # an extend waits up to this many N for hosts to refresh


def _error(exc: FencelessError) -> dict[str, Any]:
    return {"message": exc.message, "code": exc.exit_code, "kind": type(exc).__name__}


def _complete(item: Pending, reply: mb.Reply) -> None:
    """Hand a writer's reply to the CLI waiting for it, as its result or its error."""
    if reply.status == "ok":
        item.result = reply.result
    else:
        item.error = RemoteError(message=str(reply.error.get("message")),
                                 code=int(reply.error.get("code", 3)),
                                 kind=str(reply.error.get("kind")))
    item.done.set()


class VolumeService:
    def __init__(self, agent: VgAgent) -> None:
        self.a = agent
        # requester side
        self.outgoing: dict[str, Pending] = {}
        self.queued: list[mb.Request] = []  # waiting for room in the inbox
        self.inbox: list[mb.Request] = []
        self.inbox_seq = 0
        self.last_outbox = b""
        # writer side
        self.work: list[tuple[int | None, mb.Request, Pending | None]] = []
        self.in_work: set[str] = set()
        self.replies: dict[int, list[mb.Reply]] = {}
        self.last_inboxes = b""
        self.reconciled_epoch: int | None = None
        self.last_poll = 0.0
        self.last_activity = 0.0
        self.snap_cache: tuple[Any, vol.Snapshot] | None = None
        self.retry_after: dict[str, float] = {}  # request id -> not before (after a failure)

    # --- entry from the CLI ----------------------------------------------------------

    def submit(self, item: Pending) -> None:
        req = item.request.get("request")
        if not isinstance(req, dict):
            raise UserError(detail="volume request without a body")
        request = mb.Request(id=str(req["id"]), op=str(req["op"]), args=dict(req["args"]),
                             user=str(req.get("user", "")),
                             argv=tuple(str(x) for x in req.get("argv", [])))
        if request.id in self.outgoing or request.id in self.in_work:
            raise UserError(detail=f"request {request.id} is already in flight")
        a = self.a
        queued = self.own_pending().get(request.id)
        if queued is not None:
            # Still in this host's mailbox from an earlier try whose CLI gave up.
            if queued.fingerprint != request.fingerprint:
                raise UserError(detail=(
                    f"request id {request.id} is already queued here for `{queued.op}` with "
                    f"{queued.args}; a retry must repeat the same operation, and a new "
                    "operation needs a new id"))
            self.outgoing[request.id] = item  # wait for that one's reply
            self.last_outbox = b""
            return
        if a.epoch is not None:
            self.work.append((None, request, item))
            self.in_work.add(request.id)
        else:
            if a.area is None or (a.lease is None and
                                  not member(a.cfg.state_dir, a.vg.name)):
                raise UserError(detail=f"this host has no lease in the cluster on VG "
                                f"{a.vg.name}; run `fenceless join`")
            # Without a lease right now (it is being acquired again), the request waits
            # here and goes into the mailbox once the lease is back.
            self.outgoing[request.id] = item
            self.queued.append(request)
            # A retried id may find its reply already in the outbox, left there from the
            # first try: read the outbox afresh rather than wait for it to change.
            self.last_outbox = b""
            self.publish_inbox()

    # --- the requester --------------------------------------------------------------

    def own_pending(self) -> dict[str, mb.Request]:
        """This host's requests not yet answered: in its inbox, or waiting for room there."""
        return {r.id: r for r in [*self.inbox, *self.queued]}

    def adopt_own(self) -> None:
        """As the writer, carry out this host's own requests still waiting in its mailbox.

        Also those whose CLI stopped waiting: they were promised to run. They stay
        in the inbox (on disk too) until their outcome is recorded, so a crash or a
        lost role in between loses none of them.
        """
        now = self.a.clock.monotonic()
        for req in self.own_pending().values():
            if req.id not in self.in_work and self.retry_after.get(req.id, 0.0) <= now:
                self.work.append((None, req, self.outgoing.pop(req.id, None)))
                self.in_work.add(req.id)

    def forget_own(self, rid: str) -> None:
        """An own request has its outcome (recorded by this writer): out of the mailbox."""
        if rid not in self.own_pending():
            return
        self.inbox = [r for r in self.inbox if r.id != rid]
        self.queued = [r for r in self.queued if r.id != rid]
        self._dirty = True
        with contextlib.suppress(FencelessError):
            self.publish_inbox()  # if this fails, the next publish carries it

    def requeue(self) -> None:
        """No longer the writer: this host's own requests go through the mailbox again."""
        pending = self.own_pending()
        for hid, req, item in self.work:
            if hid is None:
                if item is not None:
                    self.outgoing[req.id] = item
                if req.id not in pending:
                    self.queued.append(req)
        self.work = []
        self.in_work.clear()  # nothing runs now (also ids an unexpected error left behind)
        self.last_inboxes = b""  # as writer again, look at every inbox afresh
        with contextlib.suppress(FencelessError):
            self.publish_inbox()

    def publish_inbox(self) -> None:
        a = self.a
        if a.lease is None or a.area is None:
            return
        changed = False
        while self.queued and mb.fits_inbox(a.cfg.host, a.lease.generation,
                                            [*self.inbox, self.queued[0]]):
            self.inbox.append(self.queued.pop(0))
            changed = True
        if not changed and not self._dirty:
            return
        a.lease.check()  # our own sector, but only while we are a live member
        self.inbox_seq += 1
        mb.write_inbox(a.area.dev, a.area.layout, a.lease.host_id,
                       mb.Inbox(self.inbox_seq, a.cfg.host, a.lease.generation,
                                tuple(self.inbox)))
        self._dirty = False

    _dirty = False

    def poll_outbox(self) -> None:
        a = self.a
        if not self.inbox or a.lease is None or a.area is None:
            return
        off = mb.offsets(a.area.layout, a.lease.host_id)[1]
        raw = a.area.dev.read(off, SECTOR)
        if raw == self.last_outbox:
            return
        self.last_outbox = raw
        box = mb.decode_outbox(raw, off)
        if box is None:
            return
        asked = self.own_pending()
        done = [r for r in box.replies if r.id in asked and r.answers(asked[r.id])]
        for reply in done:
            item = self.outgoing.pop(reply.id, None)
            if item is not None:
                _complete(item, reply)
        if done:
            # Answered requests leave the inbox, also those nobody waits for any more.
            ids = {r.id for r in done}
            self.inbox = [r for r in self.inbox if r.id not in ids]
            self.queued = [r for r in self.queued if r.id not in ids]
            self._dirty = True
            self.publish_inbox()

    def expire(self, now: float) -> None:
        """Tell CLIs that waited too long; their requests stay queued for the writer."""
        for rid, item in list(self.outgoing.items()):
            if now > item.deadline:
                del self.outgoing[rid]
                item.error = ExecError(detail=(
                    f"no answer from the writer within the time limit; request {rid} stays "
                    f"queued in this host's mailbox and will run when a writer picks it up "
                    f"(see `fenceless log`)"))
                item.done.set()

    # --- the writer -----------------------------------------------------------------

    def writer_poll(self) -> None:
        a = self.a
        assert a.area is not None and a.lease is not None and a.observer is not None
        if self.reconciled_epoch != a.epoch:
            self.reconcile()
            self.reconciled_epoch = a.epoch
        now = a.clock.monotonic()
        # Poll fast while requests come in, slower when idle: one contiguous read of the
        # inboxes up to the highest host id that holds a lease.
        interval = POLL if now - self.last_activity < IDLE_AFTER else IDLE_POLL
        if now - self.last_poll < interval:
            return
        self.last_poll = now
        upto = max([h for h in range(1, a.area.sb.max_hosts + 1)
                    if (r := a.observer.record(h)) is not None and not r.free] or [1])
        raw = mb.read_inboxes(a.area.dev, a.area.layout, upto)
        if raw == self.last_inboxes:
            return
        self.last_activity = now
        self.last_inboxes = raw
        self.retry_after = {k: t for k, t in self.retry_after.items() if t > now}
        for hid in range(1, a.area.sb.max_hosts + 1):
            if hid == a.lease.host_id:
                continue
            try:
                box = mb.inbox_from(raw, a.area.layout, hid)
            except CorruptRecord as exc:
                a.log_once(f"mailbox of host id {hid}: {exc}")
                continue
            if box is None:
                continue
            wanted = {r.id for r in box.requests}
            # Forget replies the host no longer waits for.
            self.replies[hid] = [r for r in self.replies.get(hid, []) if r.id in wanted]
            answered = {r.id: r for r in self.replies[hid]}
            for req in box.requests:
                if (req.id in answered and answered[req.id].answers(req)) or \
                        req.id in self.in_work:
                    continue
                if req.id in self.retry_after:  # it failed a moment ago: not yet again
                    self.last_inboxes = b""  # so the next poll looks at it again
                    continue
                # Also a retry of a finished request: process() answers it from the ledger.
                self.work.append((hid, req, None))
                self.in_work.add(req.id)

    def run_work(self) -> None:
        """Carry out queued requests, renewing the lease between them as it falls due."""
        a = self.a
        while self.work and a.epoch is not None:
            a.renew_if_due()
            if a.epoch is None:
                break
            hid, req, item = self.work.pop(0)
            queued_here = hid is None and req.id in self.own_pending()
            try:
                reply = self.process(hid, req)
            except LeaseLost as exc:
                a.drop_writer(str(exc))
                self.in_work.discard(req.id)
                if queued_here and item is not None:
                    self.outgoing[req.id] = item  # still in the mailbox: it will run
                elif item is not None:
                    item.error = exc
                    item.done.set()
                break
            except FencelessError as exc:
                # E.g. the control area's I/O timed out: the intent (if journaled) stays
                # for reconciliation; the requester hears of it and may retry by id.
                a.log(f"request {req.id} ({req.op}) interrupted: {exc}")
                self.in_work.discard(req.id)
                self.last_inboxes = b""  # look at the inboxes again
                self.retry_after[req.id] = a.clock.monotonic() + 2 * a.n
                if queued_here and item is not None:
                    self.outgoing[req.id] = item  # still in the mailbox: it will run
                elif item is not None:
                    item.error = ExecError(detail=(
                        f"request {req.id} was interrupted ({exc}); if it was journaled the "
                        f"writer finishes it: run it again with --request-id {req.id} to "
                        "learn the outcome (it is never applied twice)"))
                    item.done.set()
                self.reconciled_epoch = None  # finish any journaled intent first
                break
            self.in_work.discard(req.id)
            self.retry_after.pop(req.id, None)
            if item is not None:
                _complete(item, reply)
            if hid is not None:
                self.reply(hid, dataclasses.replace(reply, fp=req.fingerprint))
            else:
                self.forget_own(req.id)
        if a.epoch is None:
            self.requeue()

    def reply(self, hid: int, reply: mb.Reply) -> None:
        a = self.a
        assert a.area is not None and a.epoch is not None
        replies = [r for r in self.replies.get(hid, []) if r.id != reply.id] + [reply]
        while len(replies) > 1 and not mb.fits_outbox(replies):
            replies.pop(0)
        self.replies[hid] = replies
        a.check_write()
        mb.write_outbox(a.area.dev, a.area.layout, hid,
                        mb.Outbox(seq=int(time.time() * 1000), epoch=a.epoch,
                                  replies=tuple(replies)))

    @staticmethod
    def reply_from_record(rid: str, rec: dict[str, Any]) -> mb.Reply:
        if rec.get("status") == "ok":
            return mb.Reply(rid, "ok", result=dict(rec.get("result", {})))
        return mb.Reply(rid, "error", error=dict(rec.get("error", {})))

    def snapshot(self, lvm: Any) -> vol.Snapshot:
        """A report of the VG, reused while LVM's metadata on the PV is byte-identical.

        The key is LVM's own metadata header (text offset, size, checksum), read
        with one O_DIRECT sector: an unchanged key means unchanged metadata, so the
        report taken after one change serves the checks of the next request.
        """
        key = self.a.metadata_key()
        if key is not None and self.snap_cache is not None and self.snap_cache[0] == key:
            return self.snap_cache[1]
        snap = vol.Snapshot.take(lvm)
        again = self.a.metadata_key()
        self.snap_cache = (key, snap) if key is not None and again == key else None
        return snap

    def snapshot_after(self, vop: vol.VolumeOp, intent: dict[str, Any]) -> vol.Snapshot:
        """The VG right after this writer's change, from a report of only what changed.

        Taken from the snapshot the change was planned on, when LVM's seqno shows
        exactly one commit since (ours) and the metadata header held still across the
        report; otherwise (or if anything is odd) a full report, as before.
        """
        before = self.snap_cache
        gone, name = vop.touches(intent)
        if before is not None:
            key = self.a.metadata_key()
            try:
                if name is None:
                    vg, lv = vop.lvm.vg_info(), None
                else:
                    vg, lv = vop.lvm.vg_and_lv(name)
            except FencelessError:
                key = None
            if key is not None and self.a.metadata_key() == key and \
                    vg.seqno == before[1].vg.seqno + 1:
                snap = before[1].changed(vg, gone, lv)
                self.snap_cache = (key, snap)
                return snap
        self.snap_cache = None
        return self.snapshot(vop.lvm)

    def ledger_state(self) -> dict[str, Any]:
        a = self.a
        assert a.area is not None
        if a.ledger_cache is None:
            view = a.area.ledger()
            a.ledger_cache = dict(view.current.state) if view.current else {}
        return dict(a.ledger_cache)

    def active_on(self, lv: str) -> list[str]:
        """Hosts (other than dead ones) whose published facts list ``lv`` as active."""
        a = self.a
        assert a.area is not None and a.observer is not None
        from fenceless.lease.delta import HostState

        now = a.clock.monotonic()
        hosts = a.area.hosts()
        raw = hosts.read_area()  # fresh: a decision to remove must not rest on an old read
        out = []
        for hid in range(1, a.area.sb.max_hosts + 1):
            try:
                rec = hosts.decode(raw, hid)
            except CorruptRecord:
                continue
            if rec is None or rec.free or a.observer.state(hid, now) is HostState.DEAD:
                continue
            active = rec.facts.get("active", {})
            if isinstance(active, dict) and lv in active:
                out.append(rec.name)
        if a.lease is not None and lv in a.active_lvs(force=True):
            out = sorted(set(out) | {a.cfg.host})
        return out

    def record(self, rid: str, outcome: dict[str, Any], *, intent_done: bool,
               seqno: int | None = None) -> None:
        state = self.ledger_state()
        intents = dict(state.get("intents", {}))
        if intent_done:
            intents.pop(rid, None)
        requests = dict(state.get("requests", {}))
        counter = int(state.get("request_counter", 0)) + 1
        requests[rid] = {**outcome, "n": counter}
        if len(requests) > KEEP_REQUESTS:
            for old in sorted(requests, key=lambda k: int(requests[k].get("n", 0)))[
                    : len(requests) - KEEP_REQUESTS]:
                del requests[old]
        state.update(intents=intents, requests=requests, request_counter=counter)
        if seqno is not None:
            state["vg_seqno"] = seqno
        self.a.write_ledger(state)

    def process(self, hid: int | None, req: mb.Request) -> mb.Reply:
        a = self.a
        assert a.area is not None and a.lease is not None and a.epoch is not None
        state = self.ledger_state()
        host = a.cfg.host if hid is None else a.ledger_name(hid)
        try:
            request_id(req.id)  # from the disk: untrusted, and it becomes an LVM tag
        except UserError as exc:
            self.audit(host, req, "refused", str(exc))
            return mb.Reply(req.id, "error", error=_error(exc))
        done = state.get("requests", {}).get(req.id)
        if done is not None:
            if (done.get("op"), done.get("args", req.args)) == (req.op, req.args):
                return self.reply_from_record(req.id, done)
            reused = UserError(detail=(
                f"request id {req.id} was already used for `{done.get('op')}` with "
                f"{done.get('args')}; a retry must repeat the same operation, and a new "
                "operation needs a new id"))
            self.audit(host, req, "refused", str(reused))
            return mb.Reply(req.id, "error", error=_error(reused))
        lvm = a.lvm(Role.WRITER)
        try:
            vop = vol.make(req.id, req.op, req.args, lvm, self.active_on)
            snap = self.snapshot(lvm)
            intent = vop.plan(snap)
        except UserError as exc:
            a.log(f"refused {req.op} {req.args} from {host}: {exc}")
            self.audit(host, req, "refused", str(exc))
            return mb.Reply(req.id, "error", error=_error(exc))
        intent.update(host=host, user=req.user, argv=list(req.argv), epoch=a.epoch,
                      request=req.as_json())
        state = self.ledger_state()
        state["intents"] = {**state.get("intents", {}), req.id: intent}
        a.write_ledger(state)
        crashpoint(f"volume.{req.op}.journaled")
        return self.finish(vop, req.id, intent, fresh=True)

    def finish(self, vop: vol.VolumeOp, rid: str, intent: dict[str, Any],
               fresh: bool = False) -> mb.Reply:
        """Run the journaled intent (if not already done) and record the outcome."""
        a = self.a
        assert a.lease is not None
        lvm = vop.lvm
        host = str(intent.get("host", "?"))
        req = mb.Request(rid, vop.op, dict(intent.get("request", {}).get("args", {})),
                         str(intent.get("user", "")), tuple(intent.get("argv", [])))
        try:
            # Just journaled: not done yet. Otherwise (recovery) look at the VG first.
            effect = False if fresh else vop.effect(intent, self.snapshot(lvm))
            if effect is False:
                budget = a.lease.remaining() - a.n
                if budget <= 0:
                    raise LeaseLost(detail="no lease time left to run LVM safely")
                a.check_write()
                vop.apply(intent, timeout=budget)
                crashpoint(f"volume.{vop.op}.applied")
                after = self.snapshot_after(vop, intent)
            else:
                after = self.snapshot(lvm)
            effect = vop.effect(intent, after)
            if effect is not True:
                raise ExecError(detail=f"{vop.op} of {intent.get('name')!r} did not take "
                                "effect (the VG now shows otherwise)")
        except LeaseLost:
            raise
        except FencelessError as exc:
            a.log(f"{vop.op} {intent.get('name')!r} for {host} failed: {exc}")
            outcome = {"status": "error", "error": _error(exc), "op": vop.op,
                       "args": req.args, "epoch": a.epoch}
            self.record(rid, outcome, intent_done=True)
            self.audit(host, req, "failed", str(exc))
            return mb.Reply(rid, "error", error=_error(exc))
        result = vop.result(intent, after)
        result["seqno"] = after.vg.seqno
        result["epoch"] = a.epoch
        if vop.op == "extend":
            result.update(self.wait_for_refresh(intent["name"], after.vg.seqno,
                                                intent["size_bytes"]))
        self.record(rid, {"status": "ok", "result": result, "op": vop.op, "args": req.args,
                          "epoch": a.epoch},
                    intent_done=True, seqno=after.vg.seqno)
        crashpoint(f"volume.{vop.op}.recorded")
        a.log(f"{vop.op} {intent.get('name')!r} for {host}: done (seqno {after.vg.seqno})")
        self.audit(host, req, "ok", "")
        a.note_metadata_change(rid, after.vg.seqno)
        return mb.Reply(rid, "ok", result=result)

    def reconcile(self) -> None:
        """Finish or fail every intent a previous writer journaled but never recorded."""
        a = self.a
        view = a.area.ledger() if a.area is not None else None
        if view is None or view.current is None:
            return
        a.ledger_cache = dict(view.current.state)
        intents = dict(view.current.state.get("intents", {}))
        for rid, intent in sorted(intents.items()):
            a.renew_if_due()
            if a.epoch is None:
                return
            lvm = a.lvm(Role.WRITER)
            op = str(intent.get("op"))
            args = dict(intent.get("request", {}).get("args", {}))
            try:
                vop = vol.make(rid, op, args, lvm, self.active_on)
            except UserError as exc:
                self.record(rid, {"status": "error", "error": _error(exc), "op": op,
                                  "args": args, "epoch": a.epoch}, intent_done=True)
                continue
            snap = self.snapshot(lvm)
            effect = vop.effect(intent, snap)
            a.log(f"reconciling {op} {intent.get('name')!r} (request {rid}, journaled at "
                  f"epoch {intent.get('epoch')}): "
                  + {True: "it was done", False: "not done: doing it now",
                     None: "cannot be done any more"}[effect])
            if effect is None:
                gone = ExecError(detail=f"{op} of {intent.get('name')!r} was interrupted when "
                                 "its writer died, and the VG no longer allows it")
                self.record(rid, {"status": "error", "error": _error(gone), "op": op,
                                  "args": args, "epoch": a.epoch}, intent_done=True)
                continue
            self.finish(vop, rid, intent)

    def wait_for_refresh(self, lv: str, seqno: int, size: int) -> dict[str, Any]:
        """Until every host with ``lv`` active shows the new size (or the bound passes)."""
        a = self.a
        assert a.area is not None
        a.refresh_active(force=True)
        hosts = [h for h in self.active_on(lv) if h != a.cfg.host]
        deadline = a.clock.monotonic() + ACK_WAIT_N * a.n
        pending = set(hosts)
        while pending and a.clock.monotonic() < deadline:
            a.renew_if_due()
            raw = a.area.hosts().read_area()
            for hid in range(1, a.area.sb.max_hosts + 1):
                with contextlib.suppress(CorruptRecord):
                    rec = a.area.hosts().decode(raw, hid)
                    if rec is not None and rec.name in pending:
                        active = rec.facts.get("active", {})
                        if isinstance(active, dict) and active.get(lv) == size:
                            pending.discard(rec.name)
            if pending:
                time.sleep(POLL)
        return {"refreshed": sorted(set(hosts) - pending), "not_refreshed": sorted(pending)}

    def audit(self, host: str, req: mb.Request, result: str, message: str) -> None:
        self.a.audit(host, req, result, message)
