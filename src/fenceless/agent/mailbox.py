"""Requests between hosts through the mailboxes on the LUN: the agent's two desks.

Requester (any host that is not the writer): a CLI hands its request to the
local agent, which puts it in this host's inbox sector and polls its outbox
for the reply. The request stays in the inbox until answered, so a change of
writer loses nothing: the next writer picks it up.

Writer: polls every inbox, queues each request it has not answered, runs
the queue through the journal engine (``ops/journal.py``) between lease
renewals, and answers in the requester's outbox. Its own host's requests go
the same way, through its own inbox, so a lost role re-queues none twice.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fenceless.agent.keeper import LeaseKeeper
from fenceless.blockio import SECTOR
from fenceless.errors import (
    ExecError,
    FencelessError,
    IntegrityError,
    LeaseLost,
    UserError,
    from_wire,
)
from fenceless.ledger import mailbox as mb
from fenceless.ledger.state import Outcome, RequestInfo
from fenceless.localstate import member
from fenceless.ondisk.errors import CorruptRecord
from fenceless.ops.journal import Journal, refused

POLL = 0.01  # seconds between mailbox polls (the writer's inboxes, a requester's outbox)
IDLE_POLL = 0.2  # the writer's inbox poll when no request came for IDLE_AFTER seconds
IDLE_AFTER = 10.0


@dataclass
class Pending:
    """A CLI's request to the local agent, and where its answer goes."""

    request: dict[str, Any]
    done: threading.Event = field(default_factory=threading.Event)
    result: dict[str, Any] | None = None
    error: BaseException | None = None
    deadline: float = 0.0
    started: bool = False
    op: Any = None  # a multi-round operation in progress (a takeover that waits)


class QueuedAlready(UserError):
    """request id {id} is already queued here for `{op}` with {args}; a retry must repeat \
the same operation, and a new operation needs a new id"""


class InFlight(UserError):
    """request {id} is already in flight"""


class NotJoined(UserError):
    """this host has no lease in the cluster on VG {vg}; run `fenceless join`"""


class NoAnswer(ExecError):
    """no answer from the writer within the time limit; request {id} stays queued in this \
host's mailbox and will run when a writer picks it up (see `fenceless log`)"""


class RequestInterrupted(ExecError):
    """request {id} was interrupted ({why}); if it was journaled the writer finishes it: run \
it again with --request-id {id} to learn the outcome (it is never applied twice)"""


class BadRequest(UserError):
    """volume request without a valid body: {detail}"""


def reply_of(req: mb.Request, outcome: Outcome) -> mb.Reply:
    if outcome.ok:
        return mb.Reply(req.id, "ok", result=dict(outcome.result), fp=req.fingerprint)
    return mb.Reply(req.id, "error", error=dict(outcome.error), fp=req.fingerprint)


def steps(marks: list[tuple[str, float]]) -> list[tuple[str, float]]:
    """(step, milliseconds) from the marks of one request (its first mark is its start)."""
    return [(name, round((t - marks[i][1]) * 1000, 2))
            for i, (name, t) in enumerate(marks[1:])]


def complete(item: Pending, reply: mb.Reply) -> None:
    """Hand a writer's reply to the CLI waiting for it, as its result or its error.

    The error is raised here as the class the writer raised, from its kind, if
    this process knows that class already; the reply came from the disk, so no
    module is imported by a name in it, and the message is the writer's own.
    An unknown kind is a ``RemoteError`` (exit code 3 if none came: the
    request may have done something).
    """
    if reply.status == "ok":
        item.result = reply.result
    else:
        item.error = from_wire(reply.error, default_code=3)
    item.done.set()


def info(req: mb.Request) -> RequestInfo:
    return RequestInfo(req.id, req.op, dict(req.args), req.user, req.argv)


def parse_request(body: Any) -> mb.Request:
    """A CLI's request body (local, but checked: it becomes a record on the LUN)."""
    if not isinstance(body, dict) or not isinstance(body.get("args"), dict) or \
            not isinstance(body.get("id"), str) or not isinstance(body.get("op"), str):
        raise BadRequest(detail="expected an object with id, op and args")
    return mb.Request(id=body["id"], op=body["op"], args=dict(body["args"]),
                      user=str(body.get("user", "")),
                      argv=tuple(str(x) for x in body.get("argv", [])))


class Mailboxes:
    """Both desks for one VG: this host's requests, and (as writer) everyone's."""

    def __init__(self, keeper: LeaseKeeper, host: str, vg: str,
                 epoch: Callable[[], int | None], journal: Journal,
                 log: Callable[[str], None],
                 writer_epoch: Callable[[], int] = lambda: 0) -> None:
        self.keeper = keeper
        self.host = host
        self.vg = vg
        self.epoch = epoch  # this host's writer epoch, None when it is not the writer
        self.writer_epoch = writer_epoch  # the writer lease's epoch as last read
        self.journal = journal
        self.log = log
        self.clock = keeper.clock
        # requester side
        self.outgoing: dict[str, Pending] = {}
        self.queued: list[mb.Request] = []  # waiting for room in the inbox
        self.inbox: list[mb.Request] = []
        self.inbox_seq = 0
        self.last_outbox = b""
        self.dirty = False
        # writer side
        self.work: list[tuple[int | None, mb.Request, Pending | None]] = []
        self.in_work: set[str] = set()
        self.replies: dict[int, list[mb.Reply]] = {}
        self.last_inboxes = b""
        self.reconciled_epoch: int | None = None
        self.unreconciled: IntegrityError | None = None  # why reconciling failed last
        self.reconcile_after = 0.0  # not before (lease clock): a failed try waits 2N
        self.last_poll = 0.0
        self.last_activity = 0.0
        self.retry_after: dict[str, float] = {}  # request id -> not before (after a failure)
        self.logged: set[str] = set()
        # Told (op, seconds) of each request carried out here (agent/metrics.py).
        self.on_request: Callable[[str, float], None] | None = None
        self.latencies: deque[float] = deque(maxlen=20)  # the last requests' times

    def recent_latency_ms(self) -> float | None:
        """The median time of the last requests carried out here (the writer's), in ms."""
        if not self.latencies:
            return None
        ordered = sorted(self.latencies)
        return round(ordered[len(ordered) // 2] * 1000, 1)

    # --- entry from the CLI ----------------------------------------------------------

    def submit(self, item: Pending) -> None:
        request = parse_request(item.request.get("request"))
        if request.id in self.outgoing or request.id in self.in_work:
            raise InFlight(id=request.id)
        queued = self.own_pending().get(request.id)
        if queued is not None:
            # Still in this host's mailbox from an earlier try whose CLI gave up.
            if queued.fingerprint != request.fingerprint:
                raise QueuedAlready(id=request.id, op=queued.op, args=queued.args)
            self.outgoing[request.id] = item  # wait for that one's reply
            self.last_outbox = b""
            return
        if self.epoch() is not None:
            self.work.append((None, request, item))
            self.in_work.add(request.id)
            return
        if self.keeper.area is None or (self.keeper.lease is None and
                                        not member(self.keeper.cfg.state_dir, self.vg)):
            raise NotJoined(vg=self.vg)
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
        now = self.clock.now()
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
        self.dirty = True
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
        # As writer again, even at the same epoch (a lease that was late, then renewed
        # anew), finish what is journaled before anything else.
        self.reconciled_epoch = None
        with contextlib.suppress(FencelessError):
            self.publish_inbox()

    def publish_inbox(self) -> None:
        lease, area = self.keeper.lease, self.keeper.area
        if lease is None or area is None:
            return
        changed = False
        while self.queued and mb.fits_inbox(self.host, lease.generation,
                                            [*self.inbox, self.queued[0]]):
            self.inbox.append(self.queued.pop(0))
            changed = True
        if not changed and not self.dirty:
            return
        self.dirty = True  # until the write has succeeded: a failed one is done again
        lease.check()  # our own sector, but only while we are a live member
        self.inbox_seq += 1
        mb.write_inbox(area.dev, area.layout, lease.host_id,
                       mb.Inbox(self.inbox_seq, self.host, lease.generation, tuple(self.inbox)))
        self.dirty = False

    def adopt_inbox(self) -> None:
        """A new incarnation of this host takes over what its predecessor asked for.

        Requests the outbox already answers are done (their CLI is gone): they
        leave the inbox, so no writer that has forgotten their ids runs them
        again. The others were promised to run: they are asked again, under
        this incarnation's generation (a writer ignores a dead generation's).
        """
        lease, area = self.keeper.lease, self.keeper.area
        if lease is None or area is None:
            return
        try:
            old = mb.read_inbox(area.dev, area.layout, lease.host_id)
            box = mb.read_outbox(area.dev, area.layout, lease.host_id)
        except CorruptRecord as exc:
            self.log(f"own mailbox does not read ({exc}); starting with an empty one")
            old, box = None, None
        if old is None:
            return
        answered = {r.id for r in box.replies} if box is not None else set()
        known = self.own_pending()
        for req in old.requests:
            if req.id not in answered and req.id not in known:
                self.queued.append(req)
        self.inbox = [r for r in self.inbox if r.id not in answered]
        self.dirty = True
        self.publish_inbox()

    def poll_outbox(self) -> None:
        lease, area = self.keeper.lease, self.keeper.area
        if not self.inbox or lease is None or area is None:
            return
        off = mb.offsets(area.layout, lease.host_id)[1]
        raw = area.dev.read(off, SECTOR)
        if raw == self.last_outbox:
            return
        self.last_outbox = raw
        box = mb.decode_outbox(raw, off)
        if box is None or box.epoch < self.writer_epoch():
            return  # nothing, or written by a writer older than the lease: not an answer
        asked = self.own_pending()
        done = [r for r in box.replies if r.id in asked and r.answers(asked[r.id])]
        for reply in done:
            item = self.outgoing.pop(reply.id, None)
            if item is not None:
                complete(item, reply)
        if done:
            # Answered requests leave the inbox, also those nobody waits for any more.
            ids = {r.id for r in done}
            self.inbox = [r for r in self.inbox if r.id not in ids]
            self.queued = [r for r in self.queued if r.id not in ids]
            self.dirty = True
            self.publish_inbox()

    def expire(self, now: float) -> None:
        """Tell CLIs that waited too long; their requests stay queued for the writer."""
        for rid, item in list(self.outgoing.items()):
            if now > item.deadline:
                del self.outgoing[rid]
                item.error = NoAnswer(id=rid)
                item.done.set()

    # --- the writer -----------------------------------------------------------------

    def writer_poll(self) -> None:
        """Look at every inbox (fast while requests come in) and queue what is new."""
        area, lease, observer = self.keeper.area, self.keeper.lease, self.keeper.observer
        assert area is not None and lease is not None and observer is not None
        now = self.clock.now()
        if self.reconciled_epoch != self.epoch() and now >= self.reconcile_after:
            try:
                self.journal.reconcile()
                self.reconciled_epoch, self.unreconciled = self.epoch(), None
            except IntegrityError as exc:
                # Nothing can be finished, and nothing new may run before: the requests
                # are answered with this reason (run_work) until it is repaired, and
                # reconciling is tried again every 2N (each try reads both ledger slots).
                self.unreconciled = exc
                self.reconcile_after = now + 2 * self.keeper.n
                msg = f"cannot reconcile: {exc}"
                if msg not in self.logged:
                    self.logged.add(msg)
                    self.log(msg)
        interval = POLL if now - self.last_activity < IDLE_AFTER else IDLE_POLL
        if now - self.last_poll < interval:
            return
        self.last_poll = now
        # One contiguous read of the inboxes up to the highest host id that holds a lease.
        upto = max([h for h in range(1, area.sb.max_hosts + 1)
                    if (r := observer.record(h)) is not None and not r.free] or [1])
        raw = mb.read_inboxes(area.dev, area.layout, upto)
        if raw == self.last_inboxes:
            return
        self.last_activity = now
        self.last_inboxes = raw
        self.retry_after = {k: t for k, t in self.retry_after.items() if t > now}
        for hid in range(1, area.sb.max_hosts + 1):
            if hid != lease.host_id:
                self._queue_inbox(hid, raw)

    def _queue_inbox(self, hid: int, raw: bytes) -> None:
        area = self.keeper.area
        assert area is not None
        try:
            box = mb.inbox_from(raw, area.layout, hid)
        except CorruptRecord as exc:
            msg = f"mailbox of host id {hid}: {exc}"
            if msg not in self.logged:
                self.logged.add(msg)
                self.log(msg)
            return
        if box is None:
            return
        rec = self.keeper.observer.record(hid) if self.keeper.observer else None
        if rec is None or rec.free or box.generation != rec.generation:
            # Asked by another incarnation than the one that holds the host id now: a
            # dead one's requests are not run (its successor adopts what it wants); a
            # newer one than we have seen is looked at again on the next poll.
            if rec is not None and box.generation > rec.generation:
                self.last_inboxes = b""
            return
        wanted = {r.id for r in box.requests}
        # Forget replies the host no longer waits for.
        self.replies[hid] = [r for r in self.replies.get(hid, []) if r.id in wanted]
        answered = {r.id: r for r in self.replies[hid]}
        for req in box.requests:
            if (req.id in answered and answered[req.id].answers(req)) or req.id in self.in_work:
                continue
            if req.id in self.retry_after:  # it failed a moment ago: not yet again
                self.last_inboxes = b""  # so the next poll looks at it again
                continue
            # Also a retry of a finished request: the journal answers it from the ledger.
            self.work.append((hid, req, None))
            self.in_work.add(req.id)

    def run_work(self, renew_if_due: Callable[[], None],
                 host_name: Callable[[int], str], drop: Callable[[str], None]) -> None:
        """Carry out queued requests, renewing the lease between them as it falls due."""
        while self.work and self.epoch() is not None:
            renew_if_due()
            if self.epoch() is None:
                break
            if self.reconciled_epoch != self.epoch():
                if self.unreconciled is None:
                    break  # not reconciled yet: the work waits for it
                self.answer_unreconciled()
                break
            hid, req, item = self.work.pop(0)
            queued_here = hid is None and req.id in self.own_pending()
            host = self.host if hid is None else host_name(hid)
            profile = item is not None and item.request.get("profile") is True
            started = self.clock.now()
            self.journal.marks = [("start", started)] if profile else None
            try:
                outcome = self.journal.process(host, info(req))
            except LeaseLost as exc:
                drop(str(exc))
                self.in_work.discard(req.id)
                self._keep_or_fail(req, item, queued_here, exc)
                break
            except FencelessError as exc:
                # E.g. the control area's I/O timed out: the intent (if journaled) stays
                # for reconciliation; the requester hears of it and may retry by id.
                self.log(f"request {req.id} ({req.op}) interrupted: {exc}")
                self.in_work.discard(req.id)
                self.last_inboxes = b""  # look at the inboxes again
                self.retry_after[req.id] = self.clock.now() + 2 * self.keeper.n
                self._keep_or_fail(req, item, queued_here,
                                   RequestInterrupted(id=req.id, why=str(exc)))
                self.reconciled_epoch = None  # finish any journaled intent first
                break
            self.in_work.discard(req.id)
            self.retry_after.pop(req.id, None)
            took = self.clock.now() - started
            self.latencies.append(took)
            if self.on_request is not None:
                self.on_request(req.op, took)
            reply = reply_of(req, outcome)
            if profile and reply.result is not None:
                reply.result["profile"] = steps(self.journal.marks or [])
            self.journal.marks = None
            if item is not None:
                complete(item, reply)
            if hid is not None:
                self.reply(hid, reply)
            else:
                self.forget_own(req.id)
        if self.epoch() is None:
            self.requeue()

    def answer_unreconciled(self) -> None:
        """What a previous writer journaled cannot be finished (the ledger does not read
        back): every queued request is answered with that reason, and runs nowhere."""
        exc, epoch = self.unreconciled, self.epoch() or 0
        assert exc is not None
        for hid, req, item in self.work:
            self.in_work.discard(req.id)
            self.retry_after[req.id] = self.clock.now() + 2 * self.keeper.n
            reply = reply_of(req, refused(info(req), exc, epoch))
            if item is not None:
                complete(item, reply)
            if hid is not None:
                self.reply(hid, reply)
        self.work = []

    def _keep_or_fail(self, req: mb.Request, item: Pending | None, queued_here: bool,
                      exc: BaseException) -> None:
        if queued_here and item is not None:
            self.outgoing[req.id] = item  # still in the mailbox: it will run
        elif item is not None:
            item.error = exc
            item.done.set()

    def reply(self, hid: int, reply: mb.Reply) -> None:
        area, epoch = self.keeper.area, self.epoch()
        assert area is not None and epoch is not None
        replies = [r for r in self.replies.get(hid, []) if r.id != reply.id] + [reply]
        while len(replies) > 1 and not mb.fits_outbox(replies):
            replies.pop(0)
        self.replies[hid] = replies
        self.keeper.check_write()
        mb.write_outbox(area.dev, area.layout, hid,
                        mb.Outbox(seq=int(time.time() * 1000), epoch=epoch,
                                  replies=tuple(replies)))

