"""Read-only questions about a cluster's volumes, answered on any host without the agent.

``volume list`` is this host's ``--readonly`` LVM report of the VG.
``volume show`` adds where the volume is active: every host publishes what it
has mapped as its claims on the control area, so the answer comes from the
same read ``status`` makes, not from asking each host.
That part is best effort: the volume's size does not depend on it, so an
unreadable control area (or a VG that is not yet a cluster) leaves
``active_on`` out instead of failing the command.

Each function takes what it reads as callables (``report``, ``read_status``),
defaulting to the real readers, so the logic here runs in tests without LVM
or a LUN.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import suppress
from typing import Any

from fenceless.config import HostConfig
from fenceless.errors import FencelessError, NotFound

Report = Callable[[], list[dict[str, Any]]]
StatusReader = Callable[[], dict[str, Any]]


def lvm_report(cfg: HostConfig, vg_name: str | None) -> Report:
    """The real volume report: ``lvs --readonly`` of the VG on this host, as ops.volume lists it."""
    from fenceless.ops.context import Context
    from fenceless.ops.volume import list_volumes

    ctx = Context(cfg)
    return lambda: list_volumes(ctx.lvm(vg_name))


def status_reader(cfg: HostConfig, vg_name: str | None) -> StatusReader:
    """The real status read of the VG's control area (as ``fenceless status`` shows it)."""

    def read() -> dict[str, Any]:
        # Imported when called: it brings the control-area, lease and ledger code,
        # which `volume list` never needs.
        from fenceless.ops.status import read_status

        return read_status(cfg, vg_name, with_claims=True)

    return read


def volume_list(cfg: HostConfig, vg_name: str | None, *,
                report: Report | None = None) -> list[dict[str, Any]]:
    """The volumes of the VG, sorted by name (name, size_bytes, shared_ro)."""
    return (report or lvm_report(cfg, vg_name))()


def active_on(status: Mapping[str, Any], name: str) -> list[str]:
    """The hosts that claim volume ``name`` (it is mapped there), in host id order.

    Clusters made before claims had a region of their own publish them in the
    host facts (``active``). A DEAD host's claims are void: its watchdog fired.
    """
    return [h["name"] for h in status["hosts"] if h.get("lease") != "dead" and
            name in (h.get("claims") or h["facts"].get("active") or {})]


def volume_show(cfg: HostConfig, vg_name: str | None, name: str, *,
                report: Report | None = None,
                read_status: StatusReader | None = None) -> dict[str, Any]:
    """One volume as ``volume list`` has it, plus ``active_on`` when the status can be read.

    NotFound (a UserError) if the VG has no such volume.
    """
    found = next((v for v in volume_list(cfg, vg_name, report=report) if v["name"] == name),
                 None)
    if found is None:
        raise NotFound(kind="volume", name=name, where=f" in VG {cfg.vg(vg_name).name}")
    with suppress(FencelessError):
        status = (read_status or status_reader(cfg, vg_name))()
        found["active_on"] = active_on(status, name)
    return found
