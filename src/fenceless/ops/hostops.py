"""Host maintenance on the writer: ``host-maintenance`` and ``host-forget`` requests.

A host in maintenance (``fenceless host drain``) is recorded in the ledger's host
table, where the writer looks when it places a VM (``ops/vm.py``): nothing is started
or moved there until ``fenceless host resume``. ``host-forget`` (``fenceless host
remove``) takes a host out of the table once nothing can be its any more: it is in
maintenance, runs no VM, maps nothing, and its lease is free or dead. These change
only the ledger, in one write with their outcome, like a VM definition change.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

from fenceless.config import host_name
from fenceless.errors import UserError
from fenceless.ledger.state import LedgerState, RequestInfo

HOST_OPS = ("host-maintenance", "host-forget")


class UnknownHost(UserError):
    """Refused: no host {host!r} in the cluster (hosts: {hosts}); nothing was changed"""


class HostInMaintenance(UserError):
    """Refused: host {host} is in maintenance (`fenceless host drain`): no VM is started or \
moved there. `fenceless host resume {host}` ends it. Nothing was changed"""


class HostStillInUse(UserError):
    """Refused: host {host} cannot be removed: {why}. Nothing was changed"""


def change(state: LedgerState, req: RequestInfo, epoch: int,
           lease_state: Callable[[str], str], mapped: Callable[[str], list[str]]
           ) -> tuple[LedgerState, dict[str, Any]]:
    """The state after one host request, and its result; a UserError for a refusal."""
    name = host_name(str(req.args.get("host", "")))
    hid = state.host_id(name)
    if hid is None:
        raise UnknownHost(host=name, hosts=", ".join(sorted(state.host_names().values()))
                          or "none")
    entry = state.hosts[hid]
    if req.op == "host-maintenance":
        on = req.args.get("on") is True
        hosts = {**state.hosts, hid: replace(entry, maintenance=on)}
        new = state.with_hosts(hosts)
        cancelled = sorted(v.name for v in state.vms.values() if on and v.want == name
                           and v.moving_to != name)
        if cancelled:
            # A start or move to this host asked for before: it would be refused there
            # from now on, so it is withdrawn, with the reason (a live migration already
            # under way finishes; `host drain` then moves the VM on).
            why = f"not started or moved to {name}: it went into maintenance"
            new = replace(new, vms={**state.vms, **{
                n: replace(state.vms[n], want=None, want_force=False, want_live=False,
                           error=why) for n in cancelled}})
        return new, {"host": name, "maintenance": on, "epoch": epoch,
                     "cancelled": cancelled}
    running = sorted(v.name for v in state.vms.values()
                     if name in (v.host, v.moving_to, v.want, v.left))
    lease = lease_state(name)
    why = ("it is not in maintenance (`fenceless host drain` first)" if not entry.maintenance
           else f"VMs {', '.join(running)} are placed there or moving" if running
           else f"its lease is {lease} (stop its agent first)" if lease not in ("free", "dead")
           else f"it maps {', '.join(mapped(name))}" if mapped(name) else "")
    if why:
        raise HostStillInUse(host=name, why=why)
    hosts = {k: v for k, v in state.hosts.items() if k != hid}
    return state.with_hosts(hosts), {"host": name, "removed": True, "host_id": hid,
                                     "epoch": epoch}


def refuse_maintenance(state: LedgerState, host: str) -> None:
    """For a VM placement: refused if ``host`` is in maintenance."""
    if state.in_maintenance(host):
        raise HostInMaintenance(host=host)
