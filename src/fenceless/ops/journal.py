"""The writer's journal engine: every journaled operation goes through here.

For a request from any host (the disk is untrusted input):

1. check args      the request id and the arguments, as data;
2. lock            the writer role (``port.check_write`` before every write);
3. check prereq    against a fresh ``--readonly`` report -> an intent with
                   absolute values (``ops/volume.py``);
4. journal         the intent in the ledger, before any effect;
5. execute         one LVM command, bounded by the time the lease has left;
6. record          the outcome and the VG seqno in the ledger, then the audit
                   log and the metadata history.

The request id is the key: a request already recorded is answered from the
ledger, never applied twice, and an id reused for another operation is
refused. ``reconcile`` finishes or fails every intent a previous writer
journaled but never recorded, against the real VG (done, redo, or failed).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from fenceless.errors import (
    CommandTimeout,
    ExecError,
    FencelessError,
    IntegrityError,
    LeaseLost,
    UserError,
    to_wire,
)
from fenceless.faults import crashpoint
from fenceless.ledger.claims import HostClaims
from fenceless.ledger.state import Intent, LedgerState, Outcome, RequestInfo
from fenceless.lvm.adapter import Lvm, Role
from fenceless.lvm.lvtext import lv_from_text, vg_after
from fenceless.ops import hostops, restore, vm, volume
from fenceless.ops.base import JournaledOp, Snapshot
from fenceless.ops.claims import claims, claims_of_others
from fenceless.ops.port import WriterPort
from fenceless.validate import request_id

ACK_WAIT_N = 15  # an extend waits up to this many N for hosts to refresh
ACK_POLL = 0.05  # seconds between looks at the hosts' published sizes


FIELDS_ROOM = 512  # bytes of JSON for an error's fields in an outcome (ledger, outbox)


def error_fields(exc: FencelessError) -> dict[str, Any]:
    """How an error is recorded in an outcome and sent in a reply: ``to_wire``'s kind,
    fields, message and exit code, so the requester raises the same class.

    Without the module: a reader of the disk never imports by a name it read.
    The fields are kept, smallest first, while they fit ``FIELDS_ROOM`` bytes:
    the ledger holds hundreds of outcomes and an outbox reply must fit a
    sector, and a long field (LVM's stderr) is in the message already, which
    is always kept (the requester shows it as the writer wrote it).
    """
    wire = to_wire(exc)
    fields: dict[str, Any] = {}
    room = FIELDS_ROOM
    for key, value in sorted(wire["fields"].items(), key=lambda kv: len(_dump(kv))):
        size = len(_dump([key, value]))
        if size > room:
            break
        fields[key] = value
        room -= size
    return {"message": wire["message"], "code": wire["code"], "kind": wire["kind"],
            "fields": fields}


def _dump(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def refused(req: RequestInfo, exc: FencelessError, epoch: int) -> Outcome:
    return Outcome("error", req.op, req.args, epoch, error=error_fields(exc))


class ReusedRequestId(UserError):
    """request id {id} was already used for `{op}` with {args}; a retry must repeat the same \
operation, and a new operation needs a new id"""


class NoEffect(ExecError):
    """{op} of {name!r} did not take effect (the VG now shows otherwise)"""


class Interrupted(ExecError):
    """{op} of {name!r} was interrupted when its writer died, and the VG no longer allows it"""


class UnreadableIntent(ExecError):
    """the journaled intent of request {id} could not be read back from the ledger; it was \
not carried out"""


class LocalOnly(UserError):
    """Refused: `{op}` is run on the writer itself, not asked for through a mailbox (from \
{host}); nothing was changed"""


class NoLeaseTime(LeaseLost):
    """no lease time left to run LVM safely"""


class Journal:
    """Runs journaled operations on the writer, through its ``WriterPort``."""

    def __init__(self, port: WriterPort) -> None:
        self.port = port
        self.snap_cache: tuple[object, Snapshot] | None = None
        # When a request asks for a profile (bench/): (step, clock time at its end).
        self.marks: list[tuple[str, float]] | None = None

    def mark(self, step: str) -> None:
        if self.marks is not None:
            self.marks.append((step, self.port.clock.now()))

    def claims(self, lv: str) -> list[str]:
        return claims(self.port, lv)

    def claim_modes(self, lv: str) -> list[tuple[str, str]]:
        """(host, mode) of every live host that has ``lv`` mapped, from fresh reads."""
        return claims_of_others(self.port, lv, 0)

    def make(self, req: RequestInfo, lvm: Lvm) -> JournaledOp:
        if req.op == restore.RestoreApply.op:
            return restore.RestoreApply.make(req, lvm, self.claims, self.port)
        return volume.make(req, lvm, self.claims,
                           lambda name: vm.users_of(name, self.port.ledger().vms))

    # --- one request ------------------------------------------------------------------

    def process(self, host: str, req: RequestInfo) -> Outcome:
        """Carry out (or answer from the record) one request from ``host``."""
        port = self.port
        epoch = port.epoch or 0
        try:
            request_id(req.id)  # from the disk: untrusted, and it becomes an LVM tag
            if req.op in (restore.RestoreApply.op, volume.ProtectOp.op) and host != port.host:
                raise LocalOnly(op=req.op, host=host)
        except UserError as exc:
            port.audit(host, req, "refused", str(exc))
            return refused(req, exc, epoch)
        try:
            state = port.ledger()
        except IntegrityError as exc:
            # The ledger does not read back (both slots damaged, say): nothing can be
            # journaled, so nothing runs, and the requester hears why now instead of
            # waiting out its time limit (docs/runbook.md, "Damage on the LUN").
            port.log(f"refused {req.op} from {host}: {exc}")
            return refused(req, exc, epoch)
        done = state.requests.get(req.id)
        if done is not None:
            if done.same_request(req.op, req.args):
                return done
            reused = ReusedRequestId(id=req.id, op=done.op, args=dict(done.args))
            port.audit(host, req, "refused", str(reused))
            return refused(req, reused, epoch)
        if req.op in vm.VM_OPS:
            return self.vm_change(host, req, state)
        if req.op in hostops.HOST_OPS:
            return self.host_change(host, req, state)
        journaled = state.intents.get(req.id)
        if journaled is not None:
            # Journaled by this writer before it lost and took back its role at the same
            # epoch: finish that intent; planning again would apply "+5G" twice.
            return self.resume(req.id, journaled)
        lvm = port.lvm(Role.WRITER)
        try:
            op = self.make(req, lvm)
            snap = self.snapshot(lvm)
            self.mark("LVM report (plan)")
            intent = op.check_prereq(snap)
        except UserError as exc:
            port.log(f"refused {req.op} {dict(req.args)} from {host}: {exc}")
            port.audit(host, req, "refused", str(exc))
            return refused(req, exc, epoch)
        intent = replace(intent, host=host, user=req.user, argv=req.argv, epoch=epoch)
        port.write_ledger(port.ledger().with_intent(req.id, intent))
        self.mark("journal the intent")
        crashpoint(f"volume.{req.op}.journaled")
        try:
            op.check_claims(intent)  # only now: the intent is on the disk for claimers
        except UserError as exc:
            return self.refuse_journaled(op, intent, exc)
        return self.finish(op, intent, fresh=True)

    def vm_change(self, host: str, req: RequestInfo, state: LedgerState) -> Outcome:
        """A VM definition change: the slot, then one ledger write with its outcome (no
        intent: nothing names the slot until that write, ``ops/vm.py``)."""
        port = self.port
        epoch = port.epoch or 0
        lvm = port.lvm(Role.WRITER)
        seen = _hosts_view(port)  # one fresh read of the host area serves the change
        store = vm.VmStorePort(port.read_stage, port.write_definition, port.vm_slots(),
                               lambda: set(self.snapshot(lvm).lvs), self.claim_modes,
                               lambda name: seen(name).state,
                               lambda name: (seen(name).host_id, seen(name).generation),
                               lambda name: seen(name).runs_vms)
        try:
            new, result = vm.apply(state, req, state.host_id(host), port.vg, epoch, store,
                                   requester=host, writer=port.host)
        except UserError as exc:
            port.log(f"refused {req.op} {dict(req.args)} from {host}: {exc}")
            port.audit(host, req, "refused", str(exc))
            return refused(req, exc, epoch)
        outcome = vm.outcome(req, result, epoch)
        port.write_ledger(new.with_outcome(req.id, outcome))
        port.log(f"{req.op} {result['name']!r} for {host}: done")
        port.audit(host, req, "ok", "")
        if req.op != "vm-place" and not req.args.get("adopted"):
            # (An adopted definition changes no existing LV: adopt adds the control LV
            # and nothing else; the next definition change sets the permissions.)
            self.protect_shared_disks(req.id, new, lvm)
        return outcome

    def host_change(self, host: str, req: RequestInfo, state: LedgerState) -> Outcome:
        """Maintenance on or off, or a host forgotten (``ops/hostops.py``): the ledger
        only, in one write with its outcome."""
        port = self.port
        epoch = port.epoch or 0
        seen = _hosts_view(port)

        def mapped(name: str) -> list[str]:
            hid = seen(name).host_id
            got = port.claims_now().get(hid) if hid else None
            return sorted(got.lvs) if isinstance(got, HostClaims) else []

        try:
            # A host whose sector is free (a planned stop) is not in the host area's view.
            new, result = hostops.change(
                state, req, epoch, lambda n: seen(n).state if seen(n).host_id else "free",
                mapped)
        except UserError as exc:
            port.log(f"refused {req.op} {dict(req.args)} from {host}: {exc}")
            port.audit(host, req, "refused", str(exc))
            return refused(req, exc, epoch)
        outcome = Outcome("ok", req.op, req.args, epoch, result=result)
        port.write_ledger(new.with_outcome(req.id, outcome))
        port.log(f"{req.op} {dict(req.args)} for {host}: done")
        port.audit(host, req, "ok", "")
        return outcome

    def protect_shared_disks(self, rid: str, state: LedgerState, lvm: Lvm) -> None:
        """After a definition change: every volume some VM has read-only gets the LVM
        permission ``r`` (and loses it, if fenceless set it, once none has), each as a
        journaled change of its own. A writer that dies before makes up for it after the
        next definition change; until then the claims keep the disk read-only anyway."""
        shared = {d.volume for v in state.vms.values() for d in v.disks if d.mode == "ro"}
        snap = self.snapshot(lvm)
        # Read-only already (by the admin, say) is left as it is; back to read-write only
        # what fenceless made read-only (its tag).
        changes = [(name, name in shared) for name, lv in sorted(snap.lvs.items())
                   if (name in shared and not volume.read_only(lv))
                   or (name not in shared and volume.VM_RO_TAG in lv.tags)]
        for i, (name, readonly) in enumerate(changes):
            sub = RequestInfo(f"{rid[:54]}.ro{i}", "protect",
                              {"name": name, "readonly": readonly})
            got = self.process(self.port.host, sub)  # the writer's own change
            if not got.ok:
                self.port.log(f"could not set volume {name!r} "
                              f"{'read-only' if readonly else 'read-write'}: {got.error}")

    def refuse_journaled(self, op: JournaledOp, intent: Intent, exc: UserError) -> Outcome:
        """A journaled intent whose prerequisites no longer hold: recorded as refused."""
        port = self.port
        port.log(f"refused {op.op} {intent.name!r} for {intent.host}: {exc}")
        self._fail(intent.request, exc)
        port.audit(intent.host, intent.request, "refused", str(exc))
        return refused(intent.request, exc, port.epoch or 0)

    def finish(self, op: JournaledOp, intent: Intent, fresh: bool = False) -> Outcome:
        """Run the journaled intent (if not already done) and record the outcome."""
        port = self.port
        req = intent.request
        try:
            after = self._apply(op, intent, fresh)
        except LeaseLost:
            raise
        except FencelessError as exc:
            port.log(f"{op.op} {intent.name!r} for {intent.host} failed: {exc}")
            self.record(req, Outcome("error", op.op, req.args, port.epoch or 0,
                                     error=error_fields(exc)))
            port.audit(intent.host, req, "failed", str(exc))
            return refused(req, exc, port.epoch or 0)
        result = op.result(intent, after)
        result.setdefault("seqno", after.vg.seqno)
        result["epoch"] = port.epoch
        if op.op == "extend" and intent.size_bytes is not None:
            result.update(self.wait_for_refresh(intent.name, intent.size_bytes))
        outcome = Outcome("ok", op.op, req.args, port.epoch or 0, result=result)
        self.record(req, outcome, seqno=after.vg.seqno)
        self.mark("record the outcome")
        crashpoint(f"volume.{op.op}.recorded")
        port.log(f"{op.op} {intent.name!r} for {intent.host}: done (seqno {after.vg.seqno})")
        port.audit(intent.host, req, "ok", "")
        self.mark("audit record")
        port.note_metadata_change(req.id, after.vg.seqno)
        self.mark("history entry")
        return outcome

    def _apply(self, op: JournaledOp, intent: Intent, fresh: bool) -> Snapshot:
        """Execute unless already done (recovery looks at the VG first); the VG after."""
        port = self.port
        effect = False if fresh else op.effect(intent, self.snapshot(op.lvm))
        if effect is False:
            if port.lvm_budget() <= 0:
                raise NoLeaseTime()
            port.check_leader()  # a takeover while this host was stopped ends it here
            port.check_write()
            try:
                op.execute(intent)  # the port's LVM keeps the lease, or stops the command
            except CommandTimeout:
                # Killed for running too long: it may have committed before it died.
                if op.effect(intent, self.snapshot(op.lvm)) is not True:
                    raise
                port.log(f"{op.op} {intent.name!r} timed out, but it had taken effect")
            self.mark("LVM change")
            crashpoint(f"volume.{op.op}.applied")
            after = self.snapshot_after(op, intent)
            self.mark("LVM report (after)")
        else:
            after = self.snapshot(op.lvm)
        if op.effect(intent, after) is not True:
            raise NoEffect(op=op.op, name=intent.name)
        return after

    def record(self, req: RequestInfo, outcome: Outcome, *, seqno: int | None = None) -> None:
        port = self.port
        port.write_ledger(port.ledger().with_outcome(req.id, outcome, seqno=seqno))

    # --- after a change of writer ---------------------------------------------------------

    def reconcile(self) -> None:
        """Finish or fail every intent a previous writer journaled but never recorded."""
        port = self.port
        state = port.ledger()
        for rid, raw in sorted(state.unreadable.items()):
            port.log(f"journaled intent {rid} does not read back: {raw!r}; failing it")
            self._fail(RequestInfo(rid, "?", {}), UnreadableIntent(id=rid))
        for rid, intent in sorted(state.intents.items()):
            port.renew_if_due()
            if port.epoch is None:
                return
            self.resume(rid, intent)

    def resume(self, rid: str, intent: Intent) -> Outcome:
        """One journaled intent, against the real VG: done, redone, or failed.

        Redoing re-runs every prerequisite check first (on a fresh report, and the
        claims): the VG and the hosts may have changed since it was journaled.
        """
        port = self.port
        req = replace(intent.request, id=rid)
        intent = replace(intent, request=req)
        try:
            op = self.make(req, port.lvm(Role.WRITER))
        except UserError as exc:
            self._fail(req, exc)
            return refused(req, exc, port.epoch or 0)
        snap = self.snapshot(op.lvm)
        effect = op.effect(intent, snap)
        port.log(f"reconciling {req.op} {intent.name!r} (request {rid}, journaled at "
                 f"epoch {intent.epoch}): "
                 + {True: "it was done", False: "not done: checking it again",
                    None: "cannot be done any more"}[effect])
        if effect is None:
            gone = Interrupted(op=req.op, name=intent.name)
            self._fail(req, gone)
            return refused(req, gone, port.epoch or 0)
        if effect is False:
            try:
                op.check_prereq(snap)
                op.check_claims(intent)
            except UserError as exc:
                return self.refuse_journaled(op, intent, exc)
        return self.finish(op, intent)

    def _fail(self, req: RequestInfo, exc: FencelessError) -> None:
        self.record(req, Outcome("error", req.op, req.args, self.port.epoch or 0,
                                 error=error_fields(exc)))

    # --- reports of the VG ----------------------------------------------------------------

    def snapshot(self, lvm: Lvm) -> Snapshot:
        """A report of the VG, reused while LVM's metadata on the PV is byte-identical.

        The key is LVM's own metadata header (text offset, size, checksum), read
        with one O_DIRECT sector: an unchanged key means unchanged metadata, so the
        report taken after one change serves the checks of the next request.
        """
        key = self.port.metadata_key()
        if key is not None and self.snap_cache is not None and self.snap_cache[0] == key:
            return self.snap_cache[1]
        snap = Snapshot.take(lvm)
        again = self.port.metadata_key()
        self.snap_cache = (key, snap) if key is not None and again == key else None
        return snap

    def snapshot_after(self, op: JournaledOp, intent: Intent) -> Snapshot:
        """The VG right after this writer's change, from a report of only what changed.

        Taken from the snapshot the change was planned on, when LVM's seqno shows
        exactly one commit since (ours) and the metadata header held still across the
        report; otherwise (or if anything is odd) a full report.
        """
        before = self.snap_cache
        gone, name = op.touches(intent)
        if before is not None and not op.broad:
            derived = self._from_text(before[1], gone, name, op.lvm.driver_loaded)
            if derived is not None:
                return derived
            key = self.port.metadata_key()
            try:
                if name is None:
                    vg, lv = op.lvm.vg_info(), None
                else:
                    vg, lv = op.lvm.vg_and_lv(name)
            except FencelessError:
                key = None
            if key is not None and self.port.metadata_key() == key and \
                    vg.seqno == before[1].vg.seqno + 1:
                snap = before[1].changed(vg, gone, lv)
                self.snap_cache = (key, snap)
                return snap
        self.snap_cache = None
        return self.snapshot(op.lvm)

    def _from_text(self, before: Snapshot, gone: list[str], name: str | None,
                   state_known: bool) -> Snapshot | None:
        """The VG after this writer's one change, from LVM's committed text on the PV
        (``lvm/lvtext.py``): no LVM process. None when the text does not show exactly
        one commit since ``before`` and a plain LV, or the header moved meanwhile."""
        port = self.port
        try:
            key = port.metadata_key()
            if key is None:
                return None
            text, seqno = port.read_metadata(scan=False)  # lvtext reads it line by line
            if port.metadata_key() != key or seqno != before.vg.seqno + 1:
                return None
        except FencelessError:
            return None
        lv = None
        if name is not None:
            old = before.lvs.get(name) or next(
                (before.lvs[g] for g in gone if g in before.lvs), None)
            lv = lv_from_text(text, name, before.vg, old.attr if old else None,
                              state_known=state_known)
            if lv is None:
                return None
        vg = vg_after(before.vg, before.lvs, seqno, gone, lv)
        if vg is None:
            return None
        snap = before.changed(vg, gone, lv)
        self.snap_cache = (key, snap)
        return snap

    def wait_for_refresh(self, lv: str, size: int) -> dict[str, Any]:
        """Until every host with ``lv`` active shows the new size (or the bound passes)."""
        port = self.port
        port.refresh_active()
        hosts = [h for h in self.claims(lv) if h != port.host]
        deadline = port.clock.now() + ACK_WAIT_N * port.n
        pending = set(hosts)
        while pending and port.clock.now() < deadline:
            port.renew_if_due()
            for got in port.claims_now().values():
                if isinstance(got, HostClaims) and got.host in pending:
                    claim = got.lvs.get(lv)
                    if claim is not None and claim.size == size:
                        pending.discard(got.host)
            if pending:
                port.clock.sleep(ACK_POLL)
        return {"refreshed": sorted(set(hosts) - pending), "not_refreshed": sorted(pending)}


@dataclass(frozen=True)
class _HostSeen:
    """What a VM change asks of one host, by name: from one fresh read of the host area."""

    state: str = "unknown"
    host_id: int = 0  # 0 and 0: no such host in the area
    generation: int = 0
    runs_vms: bool | None = None  # its agent's "vms" fact (None: it says nothing)


def _hosts_view(port: WriterPort) -> Callable[[str], _HostSeen]:
    """Host name -> what one fresh read of the host area (made at the first question)
    shows of it."""
    seen: dict[str, _HostSeen] = {}
    read = False

    def host(name: str) -> _HostSeen:
        nonlocal read
        if not read:
            for h in port.hosts_now():
                vms = h.facts.get("vms")
                seen[h.name] = _HostSeen(h.state.value, h.host_id, h.generation,
                                         vms if isinstance(vms, bool) else None)
            read = True
        return seen.get(name, _HostSeen())

    return host
