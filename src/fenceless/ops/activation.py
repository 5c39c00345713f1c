"""Activation through the agent: a claim on the LUN first, then the mapping.

The writer refuses to remove or rename an LV that any host claims as active,
so the claim (published in this host's lease sector) must be on the disk
before the mapping exists, and the mapping must be gone before the claim is
withdrawn: in between, a remove is refused, never the reverse.
"""

from __future__ import annotations

from typing import Any

from fenceless.errors import UserError
from fenceless.lvm.activation import ActiveLv
from fenceless.ops.base import Operation
from fenceless.ops.port import HostPort
from fenceless.validate import lv_name

ACTIONS = ("activate", "deactivate", "refresh")


class UnknownAction(UserError):
    """unknown activation action {action!r} (one of activate, deactivate, refresh)"""


class BeingChanged(UserError):
    """Refused: volume {lv!r} is being {doing} by the writer (request {rid} from {host}); \
it was not mapped here. Nothing was changed"""


class HeldElsewhere(UserError):
    """Refused: volume {lv!r} is active {their_mode} on {host}; it was not mapped here \
({ours} was asked). Deactivate it there first (a read-only volume may be active read-only \
on many hosts). Nothing was changed"""


class ActivationOp(Operation):
    """``lab activate|deactivate|refresh`` (and, later, a VM start) on this host."""

    name = "activation"

    def __init__(self, port: HostPort, vg: str, action: str, lv: str, *,
                 readonly: bool = False, vm: str | None = None) -> None:
        self.port = port
        self.vg = vg
        self.action = action
        self.lv = lv
        self.readonly = readonly
        self.vm = vm  # the VM this disk is mapped for (a live migration's target names it)

    def check_args(self) -> None:
        lv_name(self.lv)
        if self.action not in ACTIONS:
            raise UnknownAction(action=self.action)

    def execute(self) -> dict[str, Any]:
        activator = self.port.activator()
        if self.action == "deactivate":
            activator.deactivate(self.lv)
            self.port.unclaim(self.lv)  # only once the mapping is gone
            return {"vg": self.vg, "lv": self.lv, "active": False}
        if self.action == "refresh":
            got = activator.refresh(self.lv)
            self.port.settle(self.lv)
            return _described(got)
        held = self.lv in self.port.local_active()  # mapped here already, and claimed
        self.port.claim(self.lv, "ro" if self.readonly else "rw")  # on the disk first
        try:
            self.back_off_from_the_writer()
            self.not_held_elsewhere()
            got = activator.activate(self.lv, readonly=self.readonly)
        except BaseException:
            # Withdraw only what this call added: a mapping that existed before keeps
            # its claim (else it would be mapped with no claim, free for anyone).
            self.port.unclaim(self.lv, keep_mapped=held)
            raise
        self.port.settle(self.lv)
        return _described(got)

    def not_held_elsewhere(self) -> None:
        """With our claim on the disk, look at everyone else's: a read-write claim
        anywhere else (or ours read-write against any other) and we give way.

        Two hosts that claim at once both see the other and both give way; neither
        maps. A claim made after ours was published sees ours. So a read-write
        mapping never exists on two hosts, with no writer involved."""
        source = self.migration_source()
        for host, mode in self.port.others_claim(self.lv):
            if host == source:
                continue  # the one host that may hold it with us: the VM's live source
            if mode == "rw" or not self.readonly:
                raise HeldElsewhere(lv=self.lv, host=host,
                                    their_mode="read-write" if mode == "rw" else "read-only",
                                    ours="read-only" if self.readonly else "read-write")

    def migration_source(self) -> str | None:
        """The host whose claim on this disk is allowed beside ours: the source of a live
        migration of ``self.vm`` to this host, as the writer recorded it (read now). Both
        hosts hold the disk until the guest runs here; its source unmaps it then."""
        if self.vm is None:
            return None
        entry = self.port.vms_now().get(self.vm)
        if entry is None or entry.state != "migrating" or entry.moving_to != self.port.host \
                or not any(d.volume == self.lv for d in entry.disks):
            return None
        return entry.host

    def back_off_from_the_writer(self) -> None:
        """With the claim on the disk, look at the journal: a remove or rename of this LV
        journaled before our claim landed may not have seen it, so we give way."""
        for intent in self.port.pending_intents():
            if intent.name == self.lv and intent.op in ("remove", "rename"):
                raise BeingChanged(lv=self.lv, doing=intent.op + "d", rid=intent.request.id,
                                   host=intent.host or "?")


def _described(got: ActiveLv) -> dict[str, Any]:
    return {"vg": got.vg, "lv": got.lv, "device": got.device, "size_bytes": got.size,
            "readonly": got.readonly}
