"""The phase contract every operation follows (after Ganeti's logical units).

check_args    pure: refuse bad input before touching anything
lock          take the lease or lock that makes us the only actor
check_prereq  read-only: refuse if the world is not as required
execute       make the change (crash points are named inside)
record        write down what was done

A refusal in the first three phases is a UserError: nothing was changed.

Operations run by the metadata writer on behalf of any host are *journaled*
(``JournaledOp``): their prerequisites are checked on a fresh report and
turned into an intent with absolute values, the intent is journaled in the
ledger before the first effect, and the effect is recognisable afterwards,
so that a writer that dies in between leaves something the next one can
finish or fail (docs/design.md, "Crash points"). ``ops/journal.py`` drives
them through the same five phases.
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from fenceless.errors import FencelessError, from_wire
from fenceless.ledger.state import Intent, Outcome, RequestInfo
from fenceless.lvm.adapter import Lvm
from fenceless.lvm.parse import LvInfo, VgInfo


class Operation:
    name = "operation"

    def check_args(self) -> None:
        """Pure checks of the arguments."""

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        yield

    def check_prereq(self) -> None:
        """Read-only checks against the disk and LVM."""

    def execute(self) -> dict[str, Any]:
        raise NotImplementedError

    def record(self, result: dict[str, Any]) -> None:
        """Record the outcome."""

    def run(self) -> dict[str, Any]:
        self.check_args()
        with self.lock():
            self.check_prereq()
            result = self.execute()
            self.record(result)
        return result


@dataclass
class Snapshot:
    """One fresh look at the VG (``--readonly``) that the checks and the effect test use."""

    vg: VgInfo
    lvs: dict[str, LvInfo]

    @classmethod
    def take(cls, lvm: Lvm) -> Snapshot:
        vg, lvs = lvm.vg_and_lvs()
        return cls(vg, {lv.name: lv for lv in lvs})

    def changed(self, vg: VgInfo, gone: Sequence[str], lv: LvInfo | None) -> Snapshot:
        """This snapshot after one change: ``gone`` names left, ``lv`` is new or changed."""
        lvs = {name: x for name, x in self.lvs.items() if name not in gone}
        if lv is not None:
            lvs[lv.name] = lv
        return Snapshot(vg, lvs)


# Who has an LV active: host names (fresh; the claims that protect a mapped LV).
Claims = Callable[[str], list[str]]


class JournaledOp(abc.ABC):
    """One operation run by the writer, journaled before its first effect."""

    op: ClassVar[str] = "journaled"
    # The change reaches beyond what ``touches`` names (a metadata restore): the VG is
    # reported in full afterwards.
    broad: ClassVar[bool] = False

    def __init__(self, request: RequestInfo, lvm: Lvm, claims: Claims) -> None:
        self.request = request
        self.id = request.id
        self.args: Mapping[str, Any] = dict(request.args)
        self.lvm = lvm
        self.claims = claims
        self.vg = lvm.vg.name

    @abc.abstractmethod
    def check_args(self) -> None:
        """The arguments as untrusted data (they may have come through the shared disk)."""

    @abc.abstractmethod
    def check_prereq(self, snap: Snapshot) -> Intent:
        """Refuse, or plan: the intent to journal, with absolute values and LV uuids."""

    def check_claims(self, intent: Intent) -> None:
        """Refuse if a host claims what the change would take away (UserError).

        Run only once the intent is journaled: a host claims an LV before it maps
        it and then reads the journal, the writer journals before it reads the
        claims, so whatever the interleaving one of them sees the other. Most
        changes take nothing away from a host: they have no check here.
        """
        del intent

    @abc.abstractmethod
    def execute(self, intent: Intent) -> None:
        """The change itself (one LVM command; the port's LVM keeps the lease while it
        runs, and stops it if the lease runs short)."""

    @abc.abstractmethod
    def effect(self, intent: Intent, snap: Snapshot) -> bool | None:
        """True: done; False: not done (safe to redo); None: cannot be done any more."""

    def touches(self, intent: Intent) -> tuple[list[str], str | None]:
        """(names the change removes, the name to report afterwards): all it changes."""
        return [], intent.name

    def result(self, intent: Intent, snap: Snapshot) -> dict[str, Any]:
        raise NotImplementedError


def outcome_error(outcome: Outcome) -> FencelessError:
    """The error an outcome records, raised again on this host as its own class."""
    return from_wire(outcome.error)
