"""``fenceless repair ledger``: a new ledger, rebuilt from what else is on the LUN, for a
ledger whose two slots both fail to read.

Without a ledger the writer can finish nothing and start nothing (``check`` and every
request say why). What the ledger holds is mostly kept elsewhere too, and that is what
the rebuild reads, each part read-only and fresh:

- the writer (this host, its epoch) from the writer lease;
- the host table from the host lease sectors (each names its holder);
- the VG's metadata seqno from LVM's metadata area on the PV;
- each VM's current definition from the VM store: the version with the highest number
  per name; the audit log tells a VM undefined after that version, which stays out;
- where each VM runs from the claims records: the one host (not free, of its current
  incarnation) that maps a disk of the VM read-write. A claims record that does not
  read, or a VM mapped read-write on two hosts, stops the repair: guessing there could
  let a second host start a running VM.

What is lost, and said so in the plan: journaled intents and request outcomes (a retried
request runs again and meets what the first did), maintenance flags, a handover or a
move under way, and where a definition came from (xml or xl). The plan is shown first;
``--yes`` applies it. The damaged slots are copied to the writer's state dir before
they are written over (``ledger/slots.py``, ``overwrite_ledger``: only while they are
still the bytes the plan saw), and the audit log records the repair before and after.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from fenceless.errors import FencelessError, UserError
from fenceless.hv.domain import DomainSpec
from fenceless.lease.delta import HostRecord
from fenceless.ledger.audit import AuditEntry
from fenceless.ledger.claims import HostClaims
from fenceless.ledger.slots import Damage
from fenceless.ledger.state import (
    HostEntry,
    LedgerState,
    RequestInfo,
    VmDisk,
    VmEntry,
    VmVersion,
    WriterInfo,
)
from fenceless.ledger.vmstore import StoredXml, digest
from fenceless.ondisk.errors import CorruptRecord, UnsupportedVersion
from fenceless.ondisk.layout import Superblock, SuperblockReadable, decode_superblock

DEFINING = ("define", "import", "edit")


class RepairNotWriter(UserError):
    """Refused: host {host} is not the metadata writer ({who}). Run `fenceless repair \
ledger` on the writer, or make this host the writer first (`fenceless writer takeover \
--wait`). Nothing was changed"""


class RepairUnsure(UserError):
    """Refused: {detail}; the ledger cannot be rebuilt safely until it is. Nothing was \
changed"""


@dataclass
class Found:
    """What the rebuild read, each part from its own place on the LUN."""

    cluster: str
    vg: str
    writer: WriterInfo
    hosts: list[HostRecord]
    claims: Mapping[int, HostClaims | CorruptRecord]
    definitions: list[tuple[int, StoredXml | FencelessError]]
    audit: list[AuditEntry]
    vg_seqno: int | None
    wall_ms: int
    dead: frozenset[int] = frozenset()  # host ids whose lease is DEAD now: claims void


@dataclass
class Plan:
    state: LedgerState
    vms: list[dict[str, Any]] = field(default_factory=list)
    left_out: list[str] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)


def _undefined(audit: Iterable[AuditEntry]) -> dict[str, int]:
    """VM name -> the audit sequence number of an undefine that no later define, import
    or edit of the same name followed (as far as the audit log reaches back)."""
    last: dict[str, tuple[int, str]] = {}
    for e in sorted(audit, key=lambda e: e.seq):
        rec = e.record
        if rec is None or rec.result != "ok" or rec.argv[1:2] != ("vm",) or len(rec.argv) < 4:
            continue
        action = rec.argv[2]
        if action in (*DEFINING, "undefine"):
            for word in rec.argv[3:]:
                if not word.startswith("-"):
                    last[word] = (e.seq, action)
    return {name: seq for name, (seq, action) in last.items() if action == "undefine"}


def _vms(found: Found, parse: Callable[[str], DomainSpec], plan: Plan
         ) -> tuple[dict[str, VmEntry], list[VmVersion], int]:
    """The current version of each VM in the store, and the older ones as its history."""
    versions: dict[str, list[tuple[int, StoredXml]]] = {}
    vm_seq = 0
    for slot, got in found.definitions:
        if isinstance(got, FencelessError):
            plan.left_out.append(f"VM store slot {slot}: {got}")
            continue
        vm_seq = max(vm_seq, got.seq)
        versions.setdefault(got.name, []).append((slot, got))
    undefined = _undefined(found.audit)
    vms: dict[str, VmEntry] = {}
    history: list[VmVersion] = []
    for name, kept in sorted(versions.items()):
        kept.sort(key=lambda x: x[1].seq)
        slot, cur = kept[-1]
        if name in undefined:
            plan.left_out.append(f"VM {name} (version {cur.seq}): undefined, audit record "
                                 f"{undefined[name]}")
            continue
        try:
            spec = parse(cur.xml)
            if spec.name != name:
                raise ValueError(f"its XML names {spec.name!r}")
        except (FencelessError, ValueError) as exc:
            plan.left_out.append(f"VM {name} (version {cur.seq}, slot {slot}): {exc}")
            continue
        vms[name] = VmEntry(
            name=name, slot=slot, seq=cur.seq, sha=digest(cur.xml),
            disks=tuple(VmDisk(d.target, d.volume, d.mode) for d in spec.disks),
            memory_mib=spec.memory_mib, vcpus=spec.vcpus, source="xml", epoch=cur.epoch,
            changed_ms=found.wall_ms)
        history += [VmVersion(name=name, seq=old.seq, slot=s, sha=digest(old.xml),
                              action="edit", epoch=old.epoch, changed_ms=found.wall_ms)
                    for s, old in kept[:-1]]
    return vms, history, vm_seq


def _placed(found: Found, vms: dict[str, VmEntry], plan: Plan) -> dict[str, VmEntry]:
    """Each VM on the one host that maps a disk of it read-write; stopped where none does.

    Claims are read as the writer reads them (``ops/claims.py``): they count until they
    are withdrawn, also while an agent restarts (its lease FREE), and only a DEAD host's
    are void; a claims record that does not read stops the repair."""
    held: dict[str, dict[int, tuple[str, int]]] = {}
    for hid, got in sorted(found.claims.items()):
        if hid in found.dead:
            continue
        if isinstance(got, CorruptRecord):
            raise RepairUnsure(detail=f"the claims record of host id {hid} does not read "
                               f"({got}), so what it maps is not known: restart its agent, "
                               "which rewrites it (or wait until its lease is DEAD)")
        for lv, claim in got.lvs.items():
            if claim.mode == "rw":
                held.setdefault(lv, {})[hid] = (got.host, got.generation)
    out = {}
    for name, stored in vms.items():
        holders = {hid: who for d in stored.disks if d.mode == "rw"
                   for hid, who in held.get(d.volume, {}).items()}
        if len(holders) > 1:
            where = ", ".join(sorted(h for h, _g in holders.values()))
            raise RepairUnsure(detail=f"VM {name}'s disks are mapped read-write on {where} "
                               "(a live migration under way, or one whose source has not "
                               "unmapped yet). Find where it runs (virsh list), and on the "
                               "other host(s) unmap its disks by hand (lvchange -an VG/LV)")
        vm = stored
        if holders:
            (hid, (host, gen)), = holders.items()
            vm = replace(stored, host=host, state="running", since_ms=found.wall_ms,
                         since_epoch=found.writer.epoch, holder_id=hid, holder_gen=gen)
        elif not any(d.mode == "rw" for d in stored.disks):
            plan.left_out.append(f"VM {name}: recorded as stopped, but no read-write disk "
                                 "tells where it runs; if it runs (virsh list), `fenceless "
                                 "vm stop` it there before it is started anywhere")
        out[name] = vm
        plan.vms.append({"name": name, "version": vm.seq, "host": vm.host,
                         "state": vm.state})
    return out


def rebuild(found: Found, parse: Callable[[str], DomainSpec]) -> Plan:
    """The ledger the repair would write, and what it says about it (no I/O)."""
    plan = Plan(LedgerState())
    hosts = {r.host_id: HostEntry(r.name, since_epoch=found.writer.epoch)
             for r in found.hosts if not r.free and r.name}
    for r in found.hosts:
        if r.free and r.name:
            plan.left_out.append(f"host {r.name} (id {r.host_id}): its host sector is free "
                                 "(stopped or removed); a stopped host is recorded again "
                                 "when it starts")
    vms, history, vm_seq = _vms(found, parse, plan)
    vms = _placed(found, vms, plan)
    plan.lost = ["journaled intents and request outcomes: a request retried by id runs "
                 "again, and meets what it did the first time",
                 "maintenance flags (`fenceless host drain` again where one was set)",
                 "a handover, VM start or move asked for and not yet done",
                 "whether a definition came from libvirt XML or an xl config"]
    plan.state = LedgerState(cluster=found.cluster, vg=found.vg, writer=found.writer,
                             hosts=hosts, vg_seqno=found.vg_seqno, vms=vms,
                             vm_history=tuple(sorted(history, key=lambda h: h.seq)),
                             vm_seq=vm_seq)
    return plan


class RepairPort(Protocol):
    """What the repair reads and writes (``agent/repairio.py``)."""

    host: str

    def writer(self) -> WriterInfo:
        """This host as the writer, or RepairNotWriter."""

    def check_write(self) -> None: ...

    def slot_bytes(self) -> tuple[bytes, bytes]: ...

    def damage(self, raw: tuple[bytes, bytes]) -> Damage:
        """What a repair may write over in ``raw`` (``slots.damage``); raises if nothing."""

    def find(self, writer: WriterInfo) -> Found: ...

    def keep_damaged(self, raw: tuple[bytes, bytes]) -> str:
        """Copy the damaged slots to this host's state dir; the file's path."""

    def overwrite(self, state: LedgerState, expect: tuple[bytes, bytes]) -> int:
        """Write ``state`` over both slots (``slots.overwrite_ledger``); its generation."""

    def audit(self, host: str, request: RequestInfo, result: str, message: str) -> None: ...

    def log(self, msg: str) -> None: ...

    def superblock_bytes(self) -> bytes: ...

    def superblock_copy(self) -> Superblock:
        """The superblock as this agent read it when it attached, checked against the
        anchor on the LUN now (RepairUnsure if they do not agree)."""

    def rewrite_superblock(self, sb: Superblock, expect: bytes) -> None: ...


class PlanNeeded(UserError):
    """Refused: `--yes` writes only the plan you checked: run `fenceless repair {what}` \
first, then `fenceless repair {what} --yes --plan ID` with the ID it shows. Nothing was \
changed"""


class PlanChanged(UserError):
    """Refused: the repair's plan is {now} now, not {given}: something changed since (a \
host, a claim, the damage). Run `fenceless repair {what}` again and check it. Nothing \
was changed"""


def plan_id(out: Mapping[str, Any]) -> str:
    """A short digest of what a plan shows (not of its wall-clock times): ``--yes`` must
    name it, so what is written is what the admin checked."""
    shown = {k: v for k, v in out.items() if k not in ("applied", "lost")}
    return hashlib.sha256(json.dumps(shown, sort_keys=True).encode()).hexdigest()[:12]


def _check_plan(out: dict[str, Any], given: str | None, what: str) -> None:
    if not given:
        raise PlanNeeded(what=what)
    if given != out["plan"]:
        raise PlanChanged(now=out["plan"], given=given, what=what)


class RepairLedgerOp:
    """The phases: refuse unless this host is the writer and a slot holds damage a repair
    may write over; read everything; plan; then (``apply``, naming the plan) keep the
    damaged bytes, audit, write, audit.

    With one slot still valid (the other damaged by foreign bytes, say, which the writer
    never writes over; or a repair cut short), its state is copied into the damaged one;
    with none, the ledger is rebuilt (``rebuild``)."""

    def __init__(self, port: RepairPort, parse: Callable[[str], DomainSpec], *,
                 apply: bool, request: RequestInfo, plan: str | None = None) -> None:
        self.port, self.parse, self.apply, self.request = port, parse, apply, request
        self.plan = plan

    def run(self) -> dict[str, Any]:
        port = self.port
        writer = port.writer()
        raw = port.slot_bytes()
        damage = port.damage(raw)
        found = port.find(writer)
        if damage.valid is not None:
            state = LedgerState.from_json(damage.valid.state).with_writer(writer)
            plan = Plan(state, vms=[{"name": n, "version": v.seq, "host": v.host,
                                     "state": v.state} for n, v in sorted(state.vms.items())],
                        lost=["if the damaged slot held the newer state, the last change "
                              "recorded there (a request's outcome or intent, a VM's "
                              "placement or definition, a maintenance flag): compare with "
                              "`fenceless log`"])
        else:
            plan = rebuild(found, self.parse)
        out: dict[str, Any] = {
            "vg": found.vg, "epoch": writer.epoch, "damage": list(damage.problems),
            "mode": "copy" if damage.valid is not None else "rebuild",
            "slots_sha256": [hashlib.sha256(b).hexdigest() for b in raw],
            "hosts": {str(k): v.name for k, v in sorted(plan.state.hosts.items())},
            "vms": plan.vms, "left_out": plan.left_out, "lost": plan.lost,
            "vg_seqno": plan.state.vg_seqno}
        out = {**out, "plan": plan_id(out), "applied": False}
        if not self.apply:
            return out
        _check_plan(out, self.plan, "ledger")
        kept = port.keep_damaged(raw)
        port.audit(port.host, self.request, "started", f"damaged slots kept in {kept}")
        try:
            generation = port.overwrite(plan.state, raw)
        except FencelessError as exc:
            port.audit(port.host, self.request, "failed", str(exc))
            raise
        port.audit(port.host, self.request, "ok", f"ledger {out['mode']} at epoch "
                   f"{writer.epoch}")
        port.log(f"repaired the ledger ({out['mode']}) at epoch {writer.epoch}, generation "
                 f"{generation}; the damaged slots are kept in {kept}")
        return {**out, "applied": True, "generation": generation, "kept": kept}


class RepairSuperblockOp:
    """``fenceless repair superblock``: the writer puts back the superblock its agent read
    when it attached (it is written once, at init, and never changes), over a sector
    that does not decode. A plan first; with ``apply``: keep the damaged sector, audit,
    write (only over the bytes the plan saw), audit. An agent started after the damage
    holds no copy: docs/runbook.md says what then."""

    def __init__(self, port: RepairPort, *, apply: bool, request: RequestInfo,
                 plan: str | None = None) -> None:
        self.port, self.apply, self.request, self.plan = port, apply, request, plan

    def run(self) -> dict[str, Any]:
        port = self.port
        writer = port.writer()
        raw = port.superblock_bytes()
        try:
            found = decode_superblock(raw)
        except UnsupportedVersion as exc:
            if exc.fields.get("newer"):
                raise  # a newer fenceless's superblock is not damage
            damage = str(exc)
        except CorruptRecord as exc:
            damage = str(exc)
        else:
            if found is not None:
                raise SuperblockReadable(cluster=str(found.cluster_uuid))
            damage = "the sector is empty (zeroed)"
        sb = port.superblock_copy()
        out: dict[str, Any] = {
            "damage": damage, "epoch": writer.epoch, "cluster": str(sb.cluster_uuid),
            "vg_uuid": sb.vg_uuid, "io_timeout": sb.io_timeout, "max_hosts": sb.max_hosts,
            "regions": [r.name for r in sb.layout.regions],
            "sector_sha256": hashlib.sha256(raw).hexdigest()}
        out = {**out, "plan": plan_id(out), "applied": False}
        if not self.apply:
            return out
        _check_plan(out, self.plan, "superblock")
        kept = port.keep_damaged((raw, b""))
        port.audit(port.host, self.request, "started", f"damaged sector kept in {kept}")
        try:
            port.rewrite_superblock(sb, raw)
        except FencelessError as exc:
            port.audit(port.host, self.request, "failed", str(exc))
            raise
        port.audit(port.host, self.request, "ok", "superblock written back")
        port.log(f"repaired the superblock from this agent's copy; the damaged sector is "
                 f"kept in {kept}")
        return {**out, "applied": True, "kept": kept}
