"""Volume operations: create, extend, rename, remove — run only by the metadata writer.

Each follows the phase contract (ops.base): its arguments are checked as
untrusted data (they may have come through a mailbox on the shared disk),
its prerequisites against a fresh ``--readonly`` report, and its effect is
recognisable afterwards (``effect``), so that a new writer can tell, for a
journaled intent whose outcome was never recorded, whether it happened.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from fenceless.errors import NotFound, UserError
from fenceless.ledger.state import Intent, RequestInfo
from fenceless.lvm.adapter import Lvm
from fenceless.lvm.parse import LvInfo
from fenceless.lvm.policy import CONTROL_LV
from fenceless.ops.base import Claims, JournaledOp, Snapshot
from fenceless.ops.requests import UnknownVolumeOp
from fenceless.validate import human, lv_name

SHARED_RO_TAG = "fenceless_shared_ro"
REQ_TAG_PREFIX = "fenceless_req_"


class VolumeExists(UserError):
    """Refused: volume {name!r} already exists in VG {vg} ({size}); nothing was changed"""


class NoSpace(UserError):
    """Refused: VG {vg} has {free} free, {name!r} needs {need} more; nothing was changed"""


class VolumeBusy(UserError):
    """Refused: volume {name!r} is active on {hosts}; deactivate it there first. Nothing was \
changed"""


class NotShrink(UserError):
    """Refused: {name!r} is {current}; `volume extend` only grows a volume (asked for \
{asked}). Nothing was changed"""


class BadRequestField(UserError):
    """request field {key!r} must be {expected}"""


class VolumeOfVm(UserError):
    """Refused: volume {name!r} is a disk of VM {vms}; change or undefine the VM's \
definition first (`fenceless vm edit`, `fenceless vm undefine`). Nothing was changed"""


class ControlLvRefused(UserError):
    """Refused: {lv} is fenceless's control area; no volume operation may touch it"""


def _round_up(n: int, extent: int) -> int:
    return -(-n // extent) * extent


def _name(args: Mapping[str, Any], key: str) -> str:
    value = args.get(key)
    if not isinstance(value, str):
        raise BadRequestField(key=key, expected="a string")
    return lv_name(value)


def _size(args: Mapping[str, Any], key: str) -> int:
    value = args.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise BadRequestField(key=key, expected="a positive number of bytes")
    return value


def _not_control(name: str) -> None:
    if name == CONTROL_LV:
        raise ControlLvRefused(lv=CONTROL_LV)


def _flag(args: Mapping[str, Any], key: str) -> None:
    if not isinstance(args.get(key, False), bool):
        raise BadRequestField(key=key, expected="true or false")


class VolumeOp(JournaledOp):
    """A volume operation on the writer; ``claims(lv)`` names hosts that have it active."""

    op = "volume"

    def intent(self, name: str, **plan: Any) -> Intent:
        return Intent(op=self.op, name=name, request=self.request, **plan)

    def result(self, intent: Intent, snap: Snapshot) -> dict[str, Any]:
        lv = snap.lvs.get(intent.name_after or intent.name)
        return {"vg": self.vg, "name": lv.name if lv else intent.name,
                "size_bytes": lv.size if lv else 0,
                "shared_ro": bool(lv and SHARED_RO_TAG in lv.tags)}

    def _existing(self, snap: Snapshot, name: str) -> LvInfo:
        """The LV ``name`` as the snapshot has it; refused if the VG has none."""
        lv = snap.lvs.get(name)
        if lv is None:
            raise NotFound(kind="volume", name=name, where=f" in VG {self.vg}")
        return lv

    def _busy(self, name: str) -> None:
        hosts = self.claims(name)
        if hosts:
            raise VolumeBusy(name=name, hosts=", ".join(hosts))

    def check_claims(self, intent: Intent) -> None:
        if self.takes_away:
            self._busy(intent.name)

    takes_away = False  # the change removes or renames a volume a host may have mapped
    # The VMs whose definitions name a volume (the writer's ledger; none by default).
    vm_users: Callable[[str], list[str]] = staticmethod(lambda _name: [])

    def _not_a_vm_disk(self, name: str) -> None:
        users = self.vm_users(name)
        if users:
            raise VolumeOfVm(name=name, vms=", ".join(users))


class CreateOp(VolumeOp):
    op = "create"

    def check_args(self) -> None:
        _not_control(_name(self.args, "name"))
        _size(self.args, "size_bytes")
        _flag(self.args, "shared_ro")

    def check_prereq(self, snap: Snapshot) -> Intent:
        name = str(self.args["name"])
        if name in snap.lvs:
            raise VolumeExists(name=name, vg=self.vg, size=human(snap.lvs[name].size))
        size = _round_up(int(self.args["size_bytes"]), snap.vg.extent_size)
        if size > snap.vg.free:
            raise NoSpace(vg=self.vg, free=human(snap.vg.free), name=name, need=human(size))
        return self.intent(name, size_bytes=size,
                           shared_ro=bool(self.args.get("shared_ro", False)))

    def execute(self, intent: Intent) -> None:
        assert intent.size_bytes is not None
        tags = [REQ_TAG_PREFIX + self.id] + ([SHARED_RO_TAG] if intent.shared_ro else [])
        self.lvm.lvcreate(intent.name, intent.size_bytes, tags)

    def effect(self, intent: Intent, snap: Snapshot) -> bool | None:
        lv = snap.lvs.get(intent.name)
        if lv is None:
            return False
        return True if REQ_TAG_PREFIX + self.id in lv.tags else None


class ExtendOp(VolumeOp):
    op = "extend"

    def check_args(self) -> None:
        _not_control(_name(self.args, "name"))
        _size(self.args, "size_bytes")
        _flag(self.args, "relative")

    def check_prereq(self, snap: Snapshot) -> Intent:
        name = str(self.args["name"])
        lv = self._existing(snap, name)
        asked = int(self.args["size_bytes"]) + (lv.size if self.args.get("relative") else 0)
        target = _round_up(asked, snap.vg.extent_size)
        if target <= lv.size:
            raise NotShrink(name=name, current=human(lv.size), asked=human(asked))
        if target - lv.size > snap.vg.free:
            raise NoSpace(vg=self.vg, free=human(snap.vg.free), name=name,
                          need=human(target - lv.size))
        return self.intent(name, uuid=lv.uuid, from_bytes=lv.size, size_bytes=target)

    def execute(self, intent: Intent) -> None:
        assert intent.size_bytes is not None
        self.lvm.lvextend(intent.name, intent.size_bytes)

    def effect(self, intent: Intent, snap: Snapshot) -> bool | None:
        lv = next((x for x in snap.lvs.values() if x.uuid == intent.uuid), None)
        if lv is None:
            return None
        return lv.size >= (intent.size_bytes or 0)


class RenameOp(VolumeOp):
    op = "rename"
    takes_away = True

    def check_args(self) -> None:
        _not_control(_name(self.args, "name"))
        _not_control(_name(self.args, "new_name"))

    def check_prereq(self, snap: Snapshot) -> Intent:
        old, new = str(self.args["name"]), str(self.args["new_name"])
        lv = self._existing(snap, old)
        self._not_a_vm_disk(old)
        if new in snap.lvs:
            raise VolumeExists(name=new, vg=self.vg, size=human(snap.lvs[new].size))
        return self.intent(old, name_after=new, uuid=lv.uuid)

    def execute(self, intent: Intent) -> None:
        assert intent.name_after is not None
        self.lvm.lvrename(intent.name, intent.name_after)

    def touches(self, intent: Intent) -> tuple[list[str], str | None]:
        return [intent.name], intent.name_after

    def effect(self, intent: Intent, snap: Snapshot) -> bool | None:
        after, before = snap.lvs.get(intent.name_after or ""), snap.lvs.get(intent.name)
        if after is not None and after.uuid == intent.uuid:
            return True
        if before is not None and before.uuid == intent.uuid and after is None:
            return False
        return None


class RemoveOp(VolumeOp):
    op = "remove"
    takes_away = True

    def check_args(self) -> None:
        _not_control(_name(self.args, "name"))

    def check_prereq(self, snap: Snapshot) -> Intent:
        name = str(self.args["name"])
        lv = self._existing(snap, name)
        self._not_a_vm_disk(name)
        return self.intent(name, uuid=lv.uuid, size_bytes=lv.size)

    def execute(self, intent: Intent) -> None:
        self.lvm.lvremove(intent.name)

    def touches(self, intent: Intent) -> tuple[list[str], str | None]:
        return [intent.name], None

    def effect(self, intent: Intent, snap: Snapshot) -> bool | None:
        lv = snap.lvs.get(intent.name)
        return lv is None or lv.uuid != intent.uuid

    def result(self, intent: Intent, snap: Snapshot) -> dict[str, Any]:
        return {"vg": self.vg, "name": intent.name, "removed": True}


VM_RO_TAG = "fenceless_vm_ro"  # fenceless made the LV read-only: a VM's shared disk


class ProtectOp(VolumeOp):
    """The LVM permission of a VM's read-only disk: ``r`` while a definition has it
    read-only, so that even an activation outside fenceless maps it read-only; back to
    ``rw`` (only if fenceless set it: ``VM_RO_TAG``) once none has. Asked by the writer
    itself after a definition change (``ops/journal.py``), journaled like any change."""

    op = "protect"

    def check_args(self) -> None:
        _not_control(_name(self.args, "name"))
        _flag(self.args, "readonly")

    def check_prereq(self, snap: Snapshot) -> Intent:
        name = str(self.args["name"])
        lv = self._existing(snap, name)
        # The intent's shared_ro field carries the permission asked for: read-only or not.
        return self.intent(name, uuid=lv.uuid, shared_ro=bool(self.args.get("readonly")))

    def execute(self, intent: Intent) -> None:
        self.lvm.lvpermission(intent.name, readonly=bool(intent.shared_ro), tag=VM_RO_TAG)

    def effect(self, intent: Intent, snap: Snapshot) -> bool | None:
        lv = next((x for x in snap.lvs.values() if x.uuid == intent.uuid), None)
        if lv is None:
            return None
        if intent.shared_ro:
            return read_only(lv)
        return not read_only(lv) and VM_RO_TAG not in lv.tags

    def result(self, intent: Intent, snap: Snapshot) -> dict[str, Any]:
        return {"vg": self.vg, "name": intent.name, "readonly": intent.shared_ro}


def read_only(lv: Any) -> bool:
    """Whether the LV's LVM permission is read-only (its attr's second letter)."""
    return str(lv.attr)[1:2] == "r"


OPS: dict[str, type[VolumeOp]] = {c.op: c for c in (CreateOp, ExtendOp, RenameOp, RemoveOp,
                                                    ProtectOp)}


def make(request: RequestInfo, lvm: Lvm, claims: Claims,
         vm_users: Callable[[str], list[str]] | None = None) -> VolumeOp:
    """The operation a request asks for, its arguments checked (UserError if they are bad)."""
    cls = OPS.get(request.op)
    if cls is None:
        raise UnknownVolumeOp(op=request.op)
    vop = cls(request, lvm, claims)
    if vm_users is not None:
        vop.vm_users = vm_users
    vop.check_args()
    return vop


def list_volumes(lvm: Lvm) -> list[dict[str, Any]]:
    """The volumes of a VG, from a ``--readonly`` report (any host)."""
    return [{"name": lv.name, "size_bytes": lv.size, "shared_ro": SHARED_RO_TAG in lv.tags}
            for lv in sorted(lvm.lvs(), key=lambda x: x.name) if lv.name != CONTROL_LV]
