"""``fenceless metadata restore SEQNO``: put back a VG metadata version from the history ring.

Only the writer restores, and only after a dry run that shows the diff
(``--yes`` applies it). A restore that would change an LV some host has
active is refused: its mapping would no longer match the metadata. The
restored text gets the current seqno, so that LVM's seqno keeps rising and
every host notices the change (and refreshes what it has active).
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

from fenceless.errors import UserError
from fenceless.ledger import history
from fenceless.ledger.state import RequestInfo
from fenceless.lvm.adapter import Role
from fenceless.ops.base import Operation
from fenceless.ops.journal import NoLeaseTime, claims
from fenceless.ops.metadata import changed_lvs, with_seqno
from fenceless.ops.port import WriterPort


class RestoreNotWriter(UserError):
    """Refused: host {host} is not the metadata writer ({who}). Run `fenceless metadata \
restore` on the writer."""


class RestoreBusy(UserError):
    """Refused: restoring seqno {seqno} would change LVs that are in use ({where}); \
deactivate them first. Nothing was changed"""


class RestoreOp(Operation):
    name = "restore"

    def __init__(self, port: WriterPort, seqno: int, *, apply: bool, writer: str) -> None:
        self.port = port
        self.seqno = seqno
        self.apply = apply
        self.writer = writer  # who is the writer, as this host last read the lease
        self.plan: dict[str, Any] = {}
        self.target = ""

    def check_prereq(self) -> None:
        port = self.port
        if port.epoch is None:
            raise RestoreNotWriter(host=port.host, who=self.writer)
        self.target = port.read_history(self.seqno)
        current, cur_seq = port.read_metadata()
        changes = changed_lvs(current, self.target)
        busy = {lv: hosts for lv in changes if (hosts := claims(port, lv))}
        self.plan = {"seqno": self.seqno, "current_seqno": cur_seq, "changes": changes,
                     "busy": busy, "applied": False,
                     "diff": history.diff(current, self.target, label_a=f"seqno {cur_seq}",
                                          label_b=f"seqno {self.seqno}")}
        if busy:
            where = "; ".join(f"{lv} is active on {', '.join(h)}" for lv, h in busy.items())
            raise RestoreBusy(seqno=self.seqno, where=where)

    def execute(self) -> dict[str, Any]:
        if not self.apply:
            return self.plan
        port = self.port
        fd, path = tempfile.mkstemp(prefix="fenceless-restore-", suffix=".vg")
        try:
            with os.fdopen(fd, "w") as f:
                # Keep the seqno rising: the restore becomes current seqno + 1.
                f.write(with_seqno(self.target, self.plan["current_seqno"]))
            budget = port.lvm_budget()
            if budget <= 0:
                raise NoLeaseTime()
            port.check_write()
            port.lvm(Role.WRITER).run("vgcfgrestore", "--force", "--file", path, port.vg,
                                      timeout=budget)
        finally:
            os.unlink(path)
        _text, new_seq = port.read_metadata()
        return {**self.plan, "applied": True, "new_seqno": new_seq}

    def record(self, result: dict[str, Any]) -> None:
        if not result["applied"]:
            return
        port = self.port
        rid = f"restore-{self.seqno}-{result['new_seqno']}"
        port.note_metadata_change(f"restore-{self.seqno}", result["new_seqno"])
        port.audit(port.host, RequestInfo(rid, "restore", {}, "-",
                                          ("fenceless", "metadata", "restore", str(self.seqno))),
                   "ok", f"restored seqno {self.seqno} as seqno {result['new_seqno']}")
