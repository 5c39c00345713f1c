"""``fenceless metadata restore SEQNO``: put back a VG metadata version from the history ring.

Only the writer restores, and only after a dry run that shows the diff
(``--yes`` applies it). A restore that would change an LV some host has
active is refused: its mapping would no longer match the metadata. The
restored text gets the current seqno, so that LVM's seqno keeps rising and
every host notices the change (and refreshes what it has active).

Applying is a journaled operation like a volume change (``RestoreApply``,
run by ``ops/journal.py``): the intent names the seqno it was planned on and
a digest of the text it puts back, so a writer that dies around
``vgcfgrestore`` leaves something the next writer can judge from the VG's
seqno and text: done (recorded), not done (checked again and redone), or
overtaken (failed).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from typing import Any, Protocol

from fenceless.errors import ExecError, FencelessError, UserError
from fenceless.ledger import history
from fenceless.ledger.state import Intent, Outcome, RequestInfo
from fenceless.lvm.adapter import Lvm, Role
from fenceless.lvm.policy import CONTROL_LV
from fenceless.ops.base import Claims, JournaledOp, Operation, Snapshot, outcome_error
from fenceless.ops.metadata import changed_lvs, with_seqno
from fenceless.ops.port import WriterPort
from fenceless.validate import request_id


class Journal(Protocol):
    """What a restore needs of the journal engine (``ops/journal.py``, which imports us)."""

    def make(self, req: RequestInfo, lvm: Lvm) -> JournaledOp: ...

    def snapshot(self, lvm: Lvm) -> Snapshot: ...

    def process(self, host: str, req: RequestInfo) -> Outcome: ...


class RestoreNotWriter(UserError):
    """Refused: host {host} is not the metadata writer ({who}). Run `fenceless metadata \
restore` on the writer."""


class RestoreBusy(UserError):
    """Refused: restoring seqno {seqno} would change LVs that are in use ({where}); \
deactivate them first. Nothing was changed"""


class RestoreControl(UserError):
    """Refused: restoring seqno {seqno} would change {lv}, fenceless's control area, under \
the running agents. Nothing was changed"""


class RestoreBadSeqno(UserError):
    """Refused: {value!r} is not a metadata seqno (a positive whole number); nothing was \
changed"""


class HistoryChanged(ExecError):
    """The stored version seqno {seqno} no longer reads back as the text this restore \
planned to put back ({detail}); it was not carried out"""


def digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _seqno(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise RestoreBadSeqno(value=value)
    return value


class RestoreApply(JournaledOp):
    """The journaled restore itself: ``vgcfgrestore`` of a stored version."""

    op = "restore"
    broad = True  # any number of LVs change: the VG is reported in full afterwards

    def __init__(self, request: RequestInfo, lvm: Lvm, claims: Claims,
                 port: WriterPort) -> None:
        super().__init__(request, lvm, claims)
        self.port = port
        self.seqno = 0
        self.current = ""
        self.target = ""
        self.changes: list[str] = []

    @classmethod
    def make(cls, request: RequestInfo, lvm: Lvm, claims: Claims,
             port: WriterPort) -> RestoreApply:
        op = cls(request, lvm, claims, port)
        op.check_args()
        return op

    def check_args(self) -> None:
        self.seqno = _seqno(self.args.get("seqno"))

    def check_prereq(self, snap: Snapshot) -> Intent:
        self.target = self.port.read_history(self.seqno)
        self.current, cur_seq = self.port.read_metadata()
        self.changes = changed_lvs(self.current, self.target)
        if CONTROL_LV in self.changes:
            raise RestoreControl(seqno=self.seqno, lv=CONTROL_LV)
        return Intent(op=self.op, name=f"seqno {self.seqno}", request=self.request,
                      from_seqno=cur_seq, digest=digest(self.target))

    def check_claims(self, intent: Intent) -> None:
        busy = {lv: hosts for lv in self.changes if (hosts := self.claims(lv))}
        if busy:
            where = "; ".join(f"{lv} is active on {', '.join(h)}" for lv, h in busy.items())
            raise RestoreBusy(seqno=self.seqno, where=where)

    def _target(self, intent: Intent) -> str:
        """The stored text, checked against the journaled digest (the ring may move on)."""
        try:
            text = self.port.read_history(self.seqno)
        except FencelessError as exc:
            raise HistoryChanged(seqno=self.seqno, detail=str(exc)) from exc
        if digest(text) != intent.digest:
            raise HistoryChanged(seqno=self.seqno, detail="its digest differs")
        return text

    def execute(self, intent: Intent) -> None:
        assert intent.from_seqno is not None
        text = self._target(intent)
        fd, path = tempfile.mkstemp(prefix="fenceless-restore-", suffix=".vg")
        try:
            with os.fdopen(fd, "w") as f:
                # Keep the seqno rising: the restore becomes the planned-on seqno + 1.
                f.write(with_seqno(text, intent.from_seqno))
            self.lvm.run("vgcfgrestore", "--force", "--file", path, self.vg)
        finally:
            os.unlink(path)

    def effect(self, intent: Intent, snap: Snapshot) -> bool | None:
        """Not done while the VG is still at the planned-on seqno; done if the next seqno
        holds the stored text's LVs; anything else means the VG moved on without it."""
        if intent.from_seqno is None:
            return None
        if snap.vg.seqno == intent.from_seqno:
            return False
        if snap.vg.seqno != intent.from_seqno + 1:
            return None
        try:
            target = self._target(intent)
        except HistoryChanged:
            return None
        now, _seq = self.port.read_metadata()
        return True if changed_lvs(now, target) == [] else None

    def result(self, intent: Intent, snap: Snapshot) -> dict[str, Any]:
        return {"vg": self.vg, "seqno": self.seqno, "current_seqno": intent.from_seqno,
                "new_seqno": snap.vg.seqno, "applied": True}


class RestoreOp(Operation):
    """The command on the writer: a dry run (the diff), or the journaled restore."""

    name = "restore"

    def __init__(self, port: WriterPort, journal: Journal, seqno: Any, *, apply: bool,
                 writer: str, rid: str, user: str = "", argv: tuple[str, ...] = ()) -> None:
        self.port = port
        self.journal = journal
        self.seqno = seqno
        self.apply = apply
        self.writer = writer  # who is the writer, as this host last read the lease
        self.request = RequestInfo(rid, RestoreApply.op, {"seqno": seqno}, user,
                                   argv or ("fenceless", "metadata", "restore", str(seqno)))
        self.plan: dict[str, Any] = {}

    def check_args(self) -> None:
        _seqno(self.seqno)
        request_id(self.request.id)

    def check_prereq(self) -> None:
        port = self.port
        if port.epoch is None:
            raise RestoreNotWriter(host=port.host, who=self.writer)
        op = self.journal.make(self.request, port.lvm(Role.WRITER))
        assert isinstance(op, RestoreApply)
        intent = op.check_prereq(self.journal.snapshot(op.lvm))
        self.plan = {"vg": op.vg, "seqno": self.seqno, "current_seqno": intent.from_seqno,
                     "changes": op.changes, "applied": False, "request_id": self.request.id,
                     "diff": history.diff(op.current, op.target,
                                          label_a=f"seqno {intent.from_seqno}",
                                          label_b=f"seqno {self.seqno}")}
        # Refused early with the hosts named; checked again once journaled.
        op.check_claims(intent)

    def execute(self) -> dict[str, Any]:
        if not self.apply:
            return self.plan
        outcome = self.journal.process(self.port.host, self.request)
        if not outcome.ok:
            raise outcome_error(outcome)
        return {**self.plan, **outcome.result}
