"""Volume operations: create, extend, rename, remove — run only by the metadata writer.

Each follows the phase contract (ops.base): its arguments are checked as
untrusted data (they may have come through a mailbox on the shared disk),
its prerequisites against a fresh ``--readonly`` report, and its effect is
recognisable afterwards (``effect``), so that a new writer can tell, for a
journaled intent whose outcome was never recorded, whether it happened.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from fenceless.errors import NotFound, UserError
from fenceless.lvm.adapter import Lvm
from fenceless.lvm.parse import LvInfo, VgInfo
from fenceless.ops.cluster import CONTROL_LV
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


def _round_up(n: int, extent: int) -> int:
    return -(-n // extent) * extent


def _name(args: dict[str, Any], key: str) -> str:
    value = args.get(key)
    if not isinstance(value, str):
        raise UserError(detail=f"request field {key!r} must be a string")
    return lv_name(value)


def _size(args: dict[str, Any], key: str) -> int:
    value = args.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise UserError(detail=f"request field {key!r} must be a positive number of bytes")
    return value


def _not_control(name: str) -> None:
    if name == CONTROL_LV:
        raise UserError(detail=f"Refused: {CONTROL_LV} is fenceless's control area; "
                        "no volume operation may touch it")


class VolumeOp:
    """One volume operation on the writer. ``active_on(lv)`` names hosts that have it active."""

    op = "volume"

    def __init__(self, request_id: str, args: dict[str, Any], lvm: Lvm,
                 active_on: Callable[[str], list[str]]) -> None:
        self.id = request_id
        self.args = dict(args)
        self.lvm = lvm
        self.active_on = active_on
        self.vg = lvm.vg.name

    def check_args(self) -> None:
        raise NotImplementedError

    def plan(self, snap: Snapshot) -> dict[str, Any]:
        """Check prerequisites; return the journaled intent (absolute values, LV uuid)."""
        raise NotImplementedError

    def apply(self, intent: dict[str, Any], timeout: float) -> None:
        raise NotImplementedError

    def effect(self, intent: dict[str, Any], snap: Snapshot) -> bool | None:
        """True: done; False: not done (safe to redo); None: cannot be done any more."""
        raise NotImplementedError

    def touches(self, intent: dict[str, Any]) -> tuple[list[str], str | None]:
        """(names the change removes, the name to report afterwards): all it changes."""
        return [], intent["name"]

    def result(self, intent: dict[str, Any], snap: Snapshot) -> dict[str, Any]:
        lv = snap.lvs.get(intent.get("name_after", intent.get("name", "")))
        return {"vg": self.vg, "name": lv.name if lv else intent.get("name"),
                "size_bytes": lv.size if lv else 0,
                "shared_ro": bool(lv and SHARED_RO_TAG in lv.tags)}


class CreateOp(VolumeOp):
    op = "create"

    def check_args(self) -> None:
        _not_control(_name(self.args, "name"))
        _size(self.args, "size_bytes")
        if not isinstance(self.args.get("shared_ro", False), bool):
            raise UserError(detail="request field 'shared_ro' must be true or false")

    def plan(self, snap: Snapshot) -> dict[str, Any]:
        name = self.args["name"]
        if name in snap.lvs:
            raise VolumeExists(name=name, vg=self.vg, size=human(snap.lvs[name].size))
        size = _round_up(self.args["size_bytes"], snap.vg.extent_size)
        if size > snap.vg.free:
            raise NoSpace(vg=self.vg, free=human(snap.vg.free), name=name, need=human(size))
        return {"op": self.op, "name": name, "size_bytes": size,
                "shared_ro": bool(self.args.get("shared_ro", False))}

    def apply(self, intent: dict[str, Any], timeout: float) -> None:
        tags = [REQ_TAG_PREFIX + self.id] + ([SHARED_RO_TAG] if intent["shared_ro"] else [])
        # Contiguous: the lab maps single-segment LVs only; production does not need it.
        self.lvm.lvcreate(intent["name"], intent["size_bytes"], tags, timeout=timeout)

    def effect(self, intent: dict[str, Any], snap: Snapshot) -> bool | None:
        lv = snap.lvs.get(intent["name"])
        if lv is None:
            return False
        return True if REQ_TAG_PREFIX + self.id in lv.tags else None


class ExtendOp(VolumeOp):
    op = "extend"

    def check_args(self) -> None:
        _not_control(_name(self.args, "name"))
        _size(self.args, "size_bytes")
        if not isinstance(self.args.get("relative", False), bool):
            raise UserError(detail="request field 'relative' must be true or false")

    def plan(self, snap: Snapshot) -> dict[str, Any]:
        name = self.args["name"]
        lv = snap.lvs.get(name)
        if lv is None:
            raise NotFound(kind="volume", name=name, where=f" in VG {self.vg}")
        asked = self.args["size_bytes"] + (lv.size if self.args.get("relative") else 0)
        target = _round_up(asked, snap.vg.extent_size)
        if target <= lv.size:
            raise NotShrink(name=name, current=human(lv.size), asked=human(asked))
        if target - lv.size > snap.vg.free:
            raise NoSpace(vg=self.vg, free=human(snap.vg.free), name=name,
                          need=human(target - lv.size))
        return {"op": self.op, "name": name, "uuid": lv.uuid, "from_bytes": lv.size,
                "size_bytes": target}

    def apply(self, intent: dict[str, Any], timeout: float) -> None:
        self.lvm.lvextend(intent["name"], intent["size_bytes"], timeout=timeout)

    def effect(self, intent: dict[str, Any], snap: Snapshot) -> bool | None:
        lv = next((x for x in snap.lvs.values() if x.uuid == intent["uuid"]), None)
        if lv is None:
            return None
        return bool(lv.size >= intent["size_bytes"])


class RenameOp(VolumeOp):
    op = "rename"

    def check_args(self) -> None:
        _not_control(_name(self.args, "name"))
        _not_control(_name(self.args, "new_name"))

    def plan(self, snap: Snapshot) -> dict[str, Any]:
        old, new = self.args["name"], self.args["new_name"]
        lv = snap.lvs.get(old)
        if lv is None:
            raise NotFound(kind="volume", name=old, where=f" in VG {self.vg}")
        if new in snap.lvs:
            raise VolumeExists(name=new, vg=self.vg, size=human(snap.lvs[new].size))
        hosts = self.active_on(old)
        if hosts:
            raise VolumeBusy(name=old, hosts=", ".join(hosts))
        return {"op": self.op, "name": old, "name_after": new, "uuid": lv.uuid}

    def apply(self, intent: dict[str, Any], timeout: float) -> None:
        self.lvm.lvrename(intent["name"], intent["name_after"], timeout=timeout)

    def touches(self, intent: dict[str, Any]) -> tuple[list[str], str | None]:
        return [intent["name"]], intent["name_after"]

    def effect(self, intent: dict[str, Any], snap: Snapshot) -> bool | None:
        after, before = snap.lvs.get(intent["name_after"]), snap.lvs.get(intent["name"])
        if after is not None and after.uuid == intent["uuid"]:
            return True
        if before is not None and before.uuid == intent["uuid"] and after is None:
            return False
        return None


class RemoveOp(VolumeOp):
    op = "remove"

    def check_args(self) -> None:
        _not_control(_name(self.args, "name"))

    def plan(self, snap: Snapshot) -> dict[str, Any]:
        name = self.args["name"]
        lv = snap.lvs.get(name)
        if lv is None:
            raise NotFound(kind="volume", name=name, where=f" in VG {self.vg}")
        hosts = self.active_on(name)
        if hosts:
            raise VolumeBusy(name=name, hosts=", ".join(hosts))
        return {"op": self.op, "name": name, "uuid": lv.uuid, "size_bytes": lv.size}

    def apply(self, intent: dict[str, Any], timeout: float) -> None:
        self.lvm.lvremove(intent["name"], timeout=timeout)

    def touches(self, intent: dict[str, Any]) -> tuple[list[str], str | None]:
        return [intent["name"]], None

    def effect(self, intent: dict[str, Any], snap: Snapshot) -> bool | None:
        lv = snap.lvs.get(intent["name"])
        return lv is None or lv.uuid != intent["uuid"]

    def result(self, intent: dict[str, Any], snap: Snapshot) -> dict[str, Any]:
        return {"vg": self.vg, "name": intent["name"], "removed": True}


OPS: dict[str, type[VolumeOp]] = {c.op: c for c in (CreateOp, ExtendOp, RenameOp, RemoveOp)}


def make(request_id: str, op: str, args: dict[str, Any], lvm: Lvm,
         active_on: Callable[[str], list[str]]) -> VolumeOp:
    cls = OPS.get(op)
    if cls is None:
        raise UserError(detail=f"unknown volume operation {op!r}")
    vop = cls(request_id, args, lvm, active_on)
    vop.check_args()
    return vop


def list_volumes(lvm: Lvm) -> list[dict[str, Any]]:
    """The volumes of a VG, from a ``--readonly`` report (any host)."""
    return [{"name": lv.name, "size_bytes": lv.size, "shared_ro": SHARED_RO_TAG in lv.tags}
            for lv in sorted(lvm.lvs(), key=lambda x: x.name) if lv.name != CONTROL_LV]
