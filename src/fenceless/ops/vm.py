"""VM definitions, on the writer: define, edit and undefine, as one ledger write each.

A definition change needs no journaled intent: the new version is written to
a slot nothing names yet (``ledger/vmstore.py``), and the one ledger write
that names it also records the request's outcome. A writer that dies before
that write leaves an unused slot and an unanswered request, which the next
writer runs again from the start (the upload is still in the requester's
slot), so a change is done once or not at all.

Checks, on the writer, on what it reads itself (a requester's checks are a
courtesy; the disk is untrusted):

- the XML parses, and names the VM the request names;
- each disk is a volume of the VG, now;
- no volume is the read-write disk of two VMs, or read-write in one and
  read-only in another (read-only sharing is fine);
- ``define`` needs a free name, ``edit`` an existing VM; ``undefine`` an
  existing, stopped VM.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

from fenceless.errors import UserError
from fenceless.hv.domain import BadDefinition, DomainSpec, parse_domain_xml, vm_name
from fenceless.ledger import vmstore
from fenceless.ledger.state import (
    LedgerState,
    Outcome,
    RequestInfo,
    VmDisk,
    VmEntry,
    VmVersion,
)
from fenceless.ops import hostops

VM_OPS = ("vm-define", "vm-undefine", "vm-place")
PLACE_ACTIONS = ("start", "stop", "recover", "want", "abandon", "adopt")
# A live migration, in steps the target host asks for (``ops/vmlive.py``); ``released``
# is the source's, once it unmapped the disks after the guest moved.
LIVE_ACTIONS = ("migrate-begin", "migrate-done", "migrate-abort", "released")
SOURCES = ("xml", "xl")


class VmExists(UserError):
    """Refused: a VM named {name} is defined already (use `fenceless vm edit {name}` to \
change it); nothing was changed"""


class NoSuchVm(UserError):
    """Refused: no VM named {name} is defined; nothing was changed"""


class MissingVolume(UserError):
    """Refused: VM {name}'s disk {target} names volume {volume}, which VG {vg} does not \
have (create it with `fenceless volume create {volume} SIZE`); nothing was changed"""


class DiskTaken(UserError):
    """Refused: volume {volume} is {theirs} disk of VM {other}; VM {name} cannot have it \
{ours} (only read-only disks are shared); nothing was changed"""


class VmNotStopped(UserError):
    """Refused: VM {name} is {state} on {host}; stop it first (`fenceless vm stop {name}`); \
nothing was changed"""


class VmRunningElsewhere(UserError):
    """Refused: {name}'s disk {volume} is active read-write on {host} since {since} \
(epoch {epoch}); stop it there or migrate it. Nothing was changed"""


class VmAlreadyRunning(UserError):
    """Refused: VM {name} is running on {host} already (since {since}, epoch {epoch})"""


class VmNotRunningThere(UserError):
    """Refused: VM {name} is not running on {host} ({state}{where}); nothing was changed"""


class NoSuchHost(UserError):
    """Refused: {host} is not a host of this cluster (hosts: {hosts}); nothing was changed"""


class NotYourHost(UserError):
    """Refused: {requester} cannot {action} a grant for {host}; only that host takes or \
gives back its own grants. Nothing was changed"""


class DisksOfRunningVm(UserError):
    """Refused: VM {name} runs on {host}; its disks cannot change while it runs (stop it \
first; other changes are fine). Nothing was changed"""


class WantedElsewhere(UserError):
    """Refused: VM {name} is being moved to {host} already; wait for it (`fenceless vm list`) \
or let that finish first. Nothing was changed"""


class HostNotDead(UserError):
    """Refused: VM {name} runs on {host}, whose host lease is {state}, not DEAD; it may \
still be writing. `vm recover` waits for 14N without renewals (the host's watchdog has \
fenced its VMs by then); nothing was changed"""


class NothingToRecover(UserError):
    """Refused: VM {name} is {state}{where}: nothing to recover (use `fenceless vm start`)"""


class AdoptOnWriterOnly(UserError):
    """Refused: only the metadata writer's own `fenceless adopt` records where an adopted \
VM runs ({requester} asked for {host}); nothing was changed"""


class NoVmsThere(UserError):
    """Refused: {host} runs no VMs (its config has no hypervisor_uri), so it cannot be asked \
to run {name}; nothing was changed"""


class DisksStillMapped(UserError):
    """Refused: {host} has VM {name}'s disks mapped still, from its last live migration; \
its agent unmaps them shortly (see `fenceless vm list`). Nothing was changed"""


class VmBeingMigrated(UserError):
    """Refused: VM {name} is being migrated live from {host} to {target}; {target}'s agent \
finishes it or rolls it back. Nothing was changed"""


class NotAskedHere(UserError):
    """Refused: {host} cannot {action} VM {name} ({detail}); nothing was changed"""


class DiskHeldElsewhere(UserError):
    """Refused: {name}'s disk {volume} is active {mode} on {host} (outside this VM); \
deactivate it there first. Nothing was changed"""


class VmNameMismatch(UserError):
    """Refused: the definition names VM {found}, not {name}; nothing was changed"""


def check_disks(spec: DomainSpec, vg: str, volumes: set[str],
                vms: Mapping[str, VmEntry]) -> None:
    """Every disk a volume of the VG; no read-write disk shared with another VM."""
    for disk in spec.disks:
        if disk.volume not in volumes:
            raise MissingVolume(name=spec.name, target=disk.target, volume=disk.volume, vg=vg)
        for other in vms.values():
            if other.name == spec.name:
                continue
            for theirs in other.disks:
                if theirs.volume == disk.volume and "rw" in (theirs.mode, disk.mode):
                    raise DiskTaken(volume=disk.volume, other=other.name, name=spec.name,
                                    theirs="the read-write" if theirs.mode == "rw"
                                    else "a read-only",
                                    ours="read-write" if disk.mode == "rw" else "read-only")


def users_of(volume: str, vms: Mapping[str, VmEntry]) -> list[str]:
    """The VMs whose definition has ``volume`` as a disk."""
    return sorted(v.name for v in vms.values() if any(d.volume == volume for d in v.disks))


class VmStorePort:
    """What a definition change needs of the writer, besides the ledger: kept apart so
    the change runs in unit tests over a memory device."""

    def __init__(self, read_stage: Callable[[int, str, str], str],
                 write_definition: Callable[[int, str, str, int], None],
                 slots: int, volumes: Callable[[], set[str]],
                 claims: Callable[[str], list[tuple[str, str]]] = lambda _lv: [],
                 host_state: Callable[[str], str] = lambda _host: "live",
                 holder: Callable[[str], tuple[int, int]] = lambda _host: (0, 0),
                 runs_vms: Callable[[str], bool | None] = lambda _host: None) -> None:
        self.read_stage = read_stage
        self.write_definition = write_definition
        self.slots = slots
        self.volumes = volumes
        self.claims = claims  # (host, mode) of every live host that has the volume mapped
        self.host_state = host_state  # a host's lease state from a fresh read ("dead", ...)
        self.holder = holder  # a host's (id, generation) from a fresh read ((0, 0): unknown)
        self.runs_vms = runs_vms  # whether a host's agent says it runs VMs (None: not said)


def apply(state: LedgerState, req: RequestInfo, requester_id: int | None, vg: str,
          epoch: int, store: VmStorePort, *, now_ms: Callable[[], int] | None = None,
          requester: str | None = None, writer: str | None = None
          ) -> tuple[LedgerState, dict[str, Any]]:
    """The state after one definition change (slot written already), and its result.

    Raises a UserError for a refusal; nothing was written then.
    """
    wall = now_ms or (lambda: int(time.time() * 1000))
    args = req.args
    name = vm_name(str(args.get("name", "")))
    current = state.vms.get(name)
    if req.op == "vm-place":
        action = str(args.get("action", ""))
        if action == "adopt":
            # Where a VM of an adopted setup runs is known from its config links on the
            # writer's side; it is recorded once, before that host's agent ever ran.
            if requester is not None and requester != writer:
                raise AdoptOnWriterOnly(requester=requester, host=str(args.get("host"))[:64])
        elif requester is not None and action != "want" and args.get("host") != requester:
            # A live migration's steps come from its target; the source gives back its
            # disks (``released``); either may call off a migration (``migrate-abort``).
            # Only a host itself takes or gives back a grant (a "want" asks another host).
            raise NotYourHost(action=action, host=str(args.get("host"))[:64],
                              requester=requester)
        return place(state, name, current, args, epoch, store, wall())
    if req.op == "vm-undefine":
        if current is None:
            raise NoSuchVm(name=name)
        if current.state != "stopped":
            raise VmNotStopped(name=name, state=current.state, host=current.host or "?")
        if _left_alive(current, store):
            raise DisksStillMapped(name=name, host=current.left or "?")
        vms = {k: v for k, v in state.vms.items() if k != name}
        history = _pushed(state.vm_history, current, "undefine", epoch, wall())
        return replace(state, vms=vms, vm_history=history), {
            "name": name, "undefined": True, "version": current.seq, "epoch": epoch}
    replacing = bool(args.get("replace"))
    if replacing and current is None:
        raise NoSuchVm(name=name)
    if not replacing and current is not None:
        raise VmExists(name=name)
    source = str(args.get("source", "xml"))
    if source not in SOURCES:
        raise BadDefinition(source=f"of VM {name}", detail=f"unknown source {source!r}")
    if requester_id is None:
        raise BadDefinition(source=f"of VM {name}", detail="its requester is not a member")
    sha = str(args.get("sha", ""))
    xml = store.read_stage(requester_id, name, sha)
    spec = parse_domain_xml(xml, vg, source=f"of VM {name}")
    if spec.name != name:
        raise VmNameMismatch(found=spec.name, name=name)
    check_disks(spec, vg, store.volumes(), state.vms)
    if current is not None and {(d.volume, d.mode) for d in spec.disks} != \
            {(d.volume, d.mode) for d in current.disks}:
        if current.state != "stopped":
            raise DisksOfRunningVm(name=name, host=current.host or "?")
        if _left_alive(current, store):
            raise DisksStillMapped(name=name, host=current.left or "?")
    used = [v.slot for v in state.vms.values()]
    slot, dropped = vmstore.free_slot(used, [h.slot for h in state.vm_history], store.slots)
    history = tuple(h for h in state.vm_history if h.slot != slot) if dropped \
        else state.vm_history
    seq = state.vm_seq + 1
    store.write_definition(slot, name, xml, seq)
    fields: dict[str, Any] = dict(
        name=name, slot=slot, seq=seq, sha=sha,
        disks=tuple(VmDisk(d.target, d.volume, d.mode) for d in spec.disks),
        memory_mib=spec.memory_mib, vcpus=spec.vcpus, source=source, epoch=epoch,
        changed_ms=wall())
    # An edit keeps where the VM runs, since when, and any move under way.
    entry = replace(current, **fields) if current is not None else VmEntry(**fields)
    if current is not None:
        history = _pushed(history, current, "edit", epoch, wall())
    new = replace(state, vms={**state.vms, name: entry}, vm_history=history, vm_seq=seq)
    return new, {"name": name, "version": seq, "slot": slot, "epoch": epoch,
                 "disks": [d.to_json() for d in entry.disks], "edited": replacing}


def _clock(ms: int) -> str:
    return time.strftime("%H:%M", time.localtime(ms / 1000)) if ms else "?"


def place(state: LedgerState, name: str, current: VmEntry | None, args: Mapping[str, Any],
          epoch: int, store: VmStorePort, now: int) -> tuple[LedgerState, dict[str, Any]]:
    """Grant VM ``name`` to a host (``start``), or take the grant back (``stop``).

    The grant is the VM's lease: recorded by the writer with its epoch, it is what
    every other host's start of the VM is refused by. Its disks are checked against
    every live host's claims too, so a disk mapped by hand elsewhere also refuses."""
    if current is None:
        raise NoSuchVm(name=name)
    host, action = str(args.get("host", "")), str(args.get("action", ""))
    if action not in PLACE_ACTIONS + LIVE_ACTIONS or not host:
        raise BadDefinition(source=f"of VM {name}", detail=f"bad placement {action!r}")
    since = _clock(current.since_ms)
    if action in ("want", "start", "recover", "migrate-begin"):
        hostops.refuse_maintenance(state, host)  # nothing new goes to a host being drained
    if action in LIVE_ACTIONS:
        entry, result = _live(current, host, action, args, epoch, store, now)
        return replace(state, vms={**state.vms, name: entry}), result
    if current.moving_to is not None and action != "abandon":
        raise VmBeingMigrated(name=name, host=current.host or "?", target=current.moving_to)
    if action == "want":
        return _want(state, current, host, bool(args.get("force")), bool(args.get("move")),
                     epoch, store, live=bool(args.get("live")))
    if action == "adopt":
        return _adopt(state, current, host, epoch, store, now)
    if action == "abandon":
        if host not in (current.want, current.host):  # a late abandon of an older move
            raise NothingToRecover(name=name, state="no longer being moved by",
                                   where=f" {host}")
        if current.moving_to is not None:
            raise VmBeingMigrated(name=name, host=current.host or "?",
                                  target=current.moving_to)
        entry = replace(current, want=None, want_force=False, want_live=False,
                        error=str(args.get("error", ""))[:300])
        return replace(state, vms={**state.vms, name: entry}), {
            "name": name, "state": entry.state, "epoch": epoch}
    if action == "stop":
        if current.state == "stopped" or current.host != host:
            raise VmNotRunningThere(name=name, host=host, state=current.state,
                                    where=f" on {current.host}" if current.host else "")
        entry = replace(current, host=None, state="stopped", since_ms=now, since_epoch=epoch,
                        holder_id=0, holder_gen=0)
        return replace(state, vms={**state.vms, name: entry}), {
            "name": name, "host": host, "state": "stopped", "epoch": epoch}
    if action == "recover":
        if current.state == "stopped" or current.host is None or current.host == host:
            raise NothingToRecover(name=name, state=current.state,
                                   where=f" on {current.host}" if current.host else "")
        state_now = store.host_state(current.host)
        if state_now != "dead":
            raise HostNotDead(name=name, host=current.host, state=state_now)
        current = replace(current, host=None, state="stopped")  # fenced with its host
    if current.state != "stopped" and current.host is not None:
        if current.host == host:
            raise VmAlreadyRunning(name=name, host=host, since=since,
                                   epoch=current.since_epoch)
        rw = next((d.volume for d in current.disks if d.mode == "rw"), None)
        raise VmRunningElsewhere(name=name, volume=rw or current.disks[0].volume
                                 if current.disks else "-", host=current.host, since=since,
                                 epoch=current.since_epoch)
    for disk in current.disks:
        for other, mode in store.claims(disk.volume):
            if other != host and "rw" in (mode, disk.mode):
                raise DiskHeldElsewhere(name=name, volume=disk.volume, host=other,
                                        mode="read-write" if mode == "rw" else "read-only")
    if current.want not in (None, host) and action != "recover" and \
            store.host_state(current.want) == "live":
        raise WantedElsewhere(name=name, host=current.want)
    # A start on the source of the last live migration finds its disks mapped there
    # already: they are this grant's now, and nothing is left to release.
    hid, gen = store.holder(host)
    entry = replace(current, host=host, state="running", since_ms=now, since_epoch=epoch,
                    want=None, want_force=False, want_live=False, error="",
                    left=None if current.left == host else current.left,
                    holder_id=hid, holder_gen=gen)
    return replace(state, vms={**state.vms, name: entry}), {
        "name": name, "host": host, "state": "running", "epoch": epoch,
        "disks": [d.to_json() for d in current.disks]}


def _adopt(state: LedgerState, current: VmEntry, host: str, epoch: int, store: VmStorePort,
           now: int) -> tuple[LedgerState, dict[str, Any]]:
    """Record where a VM of an adopted setup runs (once: a second adopt run is a no-op)."""
    name = current.name
    if current.host == host and current.state == "running":
        return state, {"name": name, "host": host, "state": "running", "epoch": epoch}
    if current.state != "stopped" or current.host is not None:
        raise VmAlreadyRunning(name=name, host=current.host or "?",
                               since=_clock(current.since_ms), epoch=current.since_epoch)
    hid, gen = store.holder(host)
    entry = replace(current, host=host, state="running", since_ms=now, since_epoch=epoch,
                    holder_id=hid, holder_gen=gen)
    return replace(state, vms={**state.vms, name: entry}), {
        "name": name, "host": host, "state": "running", "epoch": epoch, "adopted": True}


def _live(current: VmEntry, host: str, action: str, args: Mapping[str, Any], epoch: int,
          store: VmStorePort, now: int) -> tuple[VmEntry, dict[str, Any]]:
    """One step of a live migration of ``current`` to ``host`` (or, ``released``, the
    source's last). Recorded before the step it allows (``migrate-begin``: the target may
    map the disks beside the source) or after the step it records (``migrate-done``: the
    guest runs on the target), so a writer or agent that dies in between leaves the index
    saying who must finish or undo what."""
    name = current.name
    result: dict[str, Any] = {"name": name, "epoch": epoch}
    if action == "released":
        if current.left != host:
            raise NotAskedHere(host=host, action="release", name=name,
                               detail="it is not the source of its last live migration")
        return replace(current, left=None), {**result, "released": host}
    if action == "migrate-abort":
        if current.moving_to is None or host not in (current.host, current.moving_to):
            raise NotAskedHere(host=host, action="call off a migration of", name=name,
                               detail="no live migration of it involves this host")
        target_state = store.host_state(current.moving_to)
        if host != current.moving_to and target_state != "dead":
            # The target drives the migration and may have the guest running by now;
            # the source calls it off only once the target is DEAD (fenced with it).
            raise NotAskedHere(host=host, action="call off the migration of", name=name,
                               detail=f"its target {current.moving_to} is {target_state}, "
                               "not DEAD; it finishes or rolls back the migration itself")
        entry = replace(current, state="running", moving_to=None, want=None, want_live=False,
                        want_force=False, error=str(args.get("error", ""))[:300])
        return entry, {**result, "host": entry.host, "state": "running"}
    if action == "migrate-done":
        if current.moving_to != host:
            raise NotAskedHere(host=host, action="finish a migration of", name=name,
                               detail="it is not being migrated to this host")
        hid, gen = store.holder(host)
        entry = replace(current, host=host, state="running", since_ms=now, since_epoch=epoch,
                        moving_to=None, want=None, want_live=False, want_force=False,
                        error="", left=current.host, holder_id=hid, holder_gen=gen)
        return entry, {**result, "host": host, "from": current.host, "state": "running"}
    # migrate-begin
    if current.moving_to is not None:
        raise VmBeingMigrated(name=name, host=current.host or "?", target=current.moving_to)
    if current.want != host or not current.want_live:
        raise NotAskedHere(host=host, action="begin a live migration of", name=name,
                           detail="no live migration to this host was asked for")
    if current.state != "running" or current.host is None or current.host == host:
        raise VmNotRunningThere(name=name, host="another host", state=current.state,
                                where=f" on {current.host}" if current.host else "")
    source_state = store.host_state(current.host)
    if source_state != "live":
        raise NotAskedHere(host=host, action="migrate", name=name,
                           detail=f"its host {current.host} is {source_state}; a live "
                           "migration needs it live (a DEAD host's VM is recovered)")
    if _left_alive(current, store) and current.left != host:
        raise NotAskedHere(host=host, action="migrate", name=name,
                           detail=f"{current.left} has not yet unmapped its disks after "
                           "its last migration")
    for disk in current.disks:
        for other, mode in store.claims(disk.volume):
            if other not in (host, current.host) and "rw" in (mode, disk.mode):
                raise DiskHeldElsewhere(name=name, volume=disk.volume, host=other,
                                        mode="read-write" if mode == "rw" else "read-only")
    entry = replace(current, state="migrating", moving_to=host, error="")
    return entry, {**result, "host": current.host, "to": host, "state": "migrating",
                   "disks": [d.to_json() for d in current.disks]}


def _left_alive(current: VmEntry, store: VmStorePort) -> bool:
    """Whether the source of the VM's last live migration may still have its disks mapped
    (a DEAD host's claims are void: it cannot)."""
    return current.left is not None and store.host_state(current.left) != "dead"


def _want(state: LedgerState, current: VmEntry, host: str, force: bool, move: bool,
          epoch: int, store: VmStorePort, *, live: bool = False
          ) -> tuple[LedgerState, dict[str, Any]]:
    """Ask ``host`` to run the VM: its agent starts it once it is stopped (and the host it
    runs on now stops it first: a cold migration; or, ``live``, the asked host's agent
    migrates it while it runs)."""
    if state.host_id(host) is None:
        raise NoSuchHost(host=host, hosts=", ".join(sorted(state.host_names().values())))
    if current.host == host and current.state == "running":
        raise VmAlreadyRunning(name=current.name, host=host, since=_clock(current.since_ms),
                               epoch=current.since_epoch)
    if current.want not in (None, host) and store.host_state(current.want) == "live":
        raise WantedElsewhere(name=current.name, host=current.want)
    if current.state != "stopped" and current.host is not None and not move:
        rw = next((d.volume for d in current.disks if d.mode == "rw"), "-")
        raise VmRunningElsewhere(name=current.name, volume=rw, host=current.host,
                                 since=_clock(current.since_ms), epoch=current.since_epoch)
    if store.runs_vms(host) is False:
        raise NoVmsThere(host=host, name=current.name)
    if move and (current.state == "stopped" or current.host is None):
        raise VmNotRunningThere(name=current.name, host="any host", state=current.state,
                                where=" (start it with `fenceless vm start --on HOST`)")
    if live and _left_alive(current, store) and current.left != host:
        raise NotAskedHere(host=host, action="migrate", name=current.name,
                           detail=f"{current.left} has not yet unmapped its disks after "
                           "its last migration")
    entry = replace(current, want=host, want_force=force, want_live=live and move, error="")
    return replace(state, vms={**state.vms, current.name: entry}), {
        "name": current.name, "want": host, "from": current.host, "epoch": epoch,
        "live": entry.want_live}


def _pushed(history: tuple[VmVersion, ...], old: VmEntry, action: str, epoch: int,
            ms: int) -> tuple[VmVersion, ...]:
    """The history with ``old`` as the newest earlier version, at most KEEP_VERSIONS."""
    from fenceless.ledger.state import KEEP_VM_VERSIONS

    item = VmVersion(old.name, old.seq, old.slot, old.sha, action, epoch, ms)
    return (*history, item)[-KEEP_VM_VERSIONS:]


def outcome(req: RequestInfo, result: dict[str, Any], epoch: int) -> Outcome:
    return Outcome("ok", req.op, req.args, epoch, result=result)
