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


class ActivationOp(Operation):
    """``lab activate|deactivate|refresh`` (and, later, a VM start) on this host."""

    name = "activation"

    def __init__(self, port: HostPort, vg: str, action: str, lv: str, *,
                 readonly: bool = False) -> None:
        self.port = port
        self.vg = vg
        self.action = action
        self.lv = lv
        self.readonly = readonly

    def check_args(self) -> None:
        lv_name(self.lv)
        if self.action not in ACTIONS:
            raise UnknownAction(action=self.action)

    def execute(self) -> dict[str, Any]:
        activator = self.port.activator()
        if self.action == "deactivate":
            activator.deactivate(self.lv)
            self.port.unclaim(self.lv)
            return {"vg": self.vg, "lv": self.lv, "active": False}
        if self.action == "activate":
            self.port.claim(self.lv)  # raises LeaseLost if it cannot be published
            got = activator.activate(self.lv, readonly=self.readonly)
        else:
            got = activator.refresh(self.lv)
        return _described(got)

    def record(self, result: dict[str, Any]) -> None:
        self.port.local_active(force=True)
        self.port.announce()


def _described(got: ActiveLv) -> dict[str, Any]:
    return {"vg": got.vg, "lv": got.lv, "device": got.device, "size_bytes": got.size,
            "readonly": got.readonly}
