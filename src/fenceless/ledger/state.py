"""The ledger's payload, typed: the cluster state the writer publishes in the A/B slots.

The slots (``ledger/slots.py``) store a JSON object; this module is the only
place that knows its keys, as Ganeti's ``objects.py`` is for its config. The
writer edits the state through the methods here, which return new values
(nothing is edited in place), and every other module reads attributes.

What the ledger holds, and why each part is there:

- ``writer``: the host that published this state and its epoch (for humans;
  the writer lease is the authority);
- ``hosts``: host id -> name, so that every host can name every other one;
- ``handover``: a planned move of the writer role, recorded before the old
  writer releases, so that a writer dying in between leaves the role to the
  named host;
- ``intents``: operations journaled but not yet recorded (docs/design.md,
  "Crash points"): the next writer finishes or fails each one;
- ``requests``: recorded outcomes by request id, so a retry is answered
  from the record and never applied twice;
- ``vg_seqno``: LVM's metadata seqno after the last recorded change;
- ``vms``: the index of VM definitions: where each one's XML is in the VM
  store (``ledger/vmstore.py``), its version, digest and disks, and where it
  runs; ``vm_history`` says where earlier versions are (while their slots
  last), and ``vm_seq`` numbers the versions.

The JSON is exactly what format version 1 wrote. Keys this version does not
know are kept (``extra``) and written back, so a newer writer's additions
survive an older one. The disk is untrusted input: ``from_json`` checks
every type and raises ``LedgerStateInvalid`` (never KeyError or TypeError);
one intent that does not read is kept aside (``unreadable``) rather than
making the whole state unusable, so the writer can still fail it explicitly.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from fenceless.errors import IntegrityError

KEEP_OUTCOMES = 400  # recorded outcomes kept for de-duplication of retried ids
KEEP_VM_VERSIONS = 256  # earlier VM definitions the index keeps track of
_KNOWN = ("cluster", "vg", "writer", "hosts", "handover", "intents", "requests",
          "request_counter", "vg_seqno", "vms", "vm_history", "vm_seq")


class LedgerStateInvalid(IntegrityError):
    """The ledger's state is not what fenceless writes ({where}: {detail}); refusing to use \
it"""


# --- checked access to untrusted JSON ------------------------------------------------


def _obj(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise LedgerStateInvalid(where=where, detail="not a JSON object")
    return value


def _str(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise LedgerStateInvalid(where=where, detail="not a string")
    return value


def _int(value: Any, where: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise LedgerStateInvalid(where=where, detail="not an integer")
    return value


def _opt_int(value: Any, where: str) -> int | None:
    return None if value is None else _int(value, where)


def _opt_str(value: Any, where: str) -> str | None:
    return None if value is None else _str(value, where)


def _strs(value: Any, where: str) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise LedgerStateInvalid(where=where, detail="not a list")
    return tuple(_str(v, where) for v in value)


# --- the parts ---------------------------------------------------------------------------


@dataclass(frozen=True)
class WriterInfo:
    host_id: int
    name: str
    epoch: int

    def to_json(self) -> dict[str, Any]:
        return {"host_id": self.host_id, "name": self.name, "epoch": self.epoch}

    @classmethod
    def from_json(cls, data: Any) -> WriterInfo:
        d = _obj(data, "writer")
        return cls(_int(d.get("host_id"), "writer.host_id"), _str(d.get("name"), "writer.name"),
                   _int(d.get("epoch"), "writer.epoch"))


@dataclass(frozen=True)
class HostEntry:
    name: str
    since_epoch: int | None = None
    # In maintenance (``fenceless host drain``): no VM is started or moved there.
    maintenance: bool = False

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "since_epoch": self.since_epoch}
        if self.maintenance:
            out["maintenance"] = True
        return out

    @classmethod
    def from_json(cls, data: Any, where: str) -> HostEntry:
        d = _obj(data, where)
        flag = d.get("maintenance", False)
        if not isinstance(flag, bool):
            raise LedgerStateInvalid(where=f"{where}.maintenance", detail="not true or false")
        return cls(_str(d.get("name"), f"{where}.name"),
                   _opt_int(d.get("since_epoch"), f"{where}.since_epoch"), flag)


@dataclass(frozen=True)
class Handover:
    """A planned move of the writer role away from epoch ``from_epoch`` to host ``to_id``."""

    to_id: int
    to: str
    from_epoch: int
    id: str

    def to_json(self) -> dict[str, Any]:
        return {"to_id": self.to_id, "to": self.to, "from_epoch": self.from_epoch, "id": self.id}

    @classmethod
    def from_json(cls, data: Any) -> Handover:
        d = _obj(data, "handover")
        return cls(_int(d.get("to_id"), "handover.to_id"), _str(d.get("to"), "handover.to"),
                   _int(d.get("from_epoch"), "handover.from_epoch"),
                   _str(d.get("id"), "handover.id"))


@dataclass(frozen=True)
class RequestInfo:
    """A request as it was asked (id, operation, arguments, who and with which command)."""

    id: str
    op: str
    args: Mapping[str, Any]
    user: str = ""
    argv: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "op": self.op, "args": dict(self.args), "user": self.user,
                "argv": list(self.argv)}

    @classmethod
    def from_json(cls, data: Any, where: str) -> RequestInfo:
        d = _obj(data, where)
        return cls(_str(d.get("id"), f"{where}.id"), _str(d.get("op"), f"{where}.op"),
                   dict(_obj(d.get("args", {}), f"{where}.args")),
                   _str(d.get("user", ""), f"{where}.user"),
                   _strs(d.get("argv", []), f"{where}.argv"))


# Fields of an intent that name absolute values the operation planned (the plan must
# never be re-derived from a changed VG: "+5G" is journaled as the size it led to).
_PLAN_INT = ("size_bytes", "from_bytes", "from_seqno")
_PLAN_STR = ("uuid", "name_after", "digest")


@dataclass(frozen=True)
class Intent:
    """An operation journaled by the writer before its first effect."""

    op: str
    name: str
    request: RequestInfo
    host: str = ""
    user: str = ""
    argv: tuple[str, ...] = ()
    epoch: int = 0
    uuid: str | None = None
    size_bytes: int | None = None
    from_bytes: int | None = None
    name_after: str | None = None
    shared_ro: bool | None = None
    from_seqno: int | None = None  # a restore: the VG's seqno it was planned on
    digest: str | None = None  # a restore: sha256 of the metadata text it puts back

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"op": self.op, "name": self.name, "host": self.host,
                               "user": self.user, "argv": list(self.argv),
                               "epoch": self.epoch, "request": self.request.to_json()}
        for key in (*_PLAN_INT, *_PLAN_STR, "shared_ro"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        return out

    @classmethod
    def from_json(cls, data: Any, where: str) -> Intent:
        d = _obj(data, where)
        shared = d.get("shared_ro")
        if shared is not None and not isinstance(shared, bool):
            raise LedgerStateInvalid(where=f"{where}.shared_ro", detail="not true or false")
        plan: dict[str, Any] = {k: _opt_int(d.get(k), f"{where}.{k}") for k in _PLAN_INT}
        plan.update({k: _opt_str(d.get(k), f"{where}.{k}") for k in _PLAN_STR})
        return cls(op=_str(d.get("op"), f"{where}.op"), name=_str(d.get("name"), f"{where}.name"),
                   request=RequestInfo.from_json(d.get("request", {}), f"{where}.request"),
                   host=_str(d.get("host", ""), f"{where}.host"),
                   user=_str(d.get("user", ""), f"{where}.user"),
                   argv=_strs(d.get("argv", []), f"{where}.argv"),
                   epoch=_int(d.get("epoch", 0), f"{where}.epoch"), shared_ro=shared, **plan)


@dataclass(frozen=True)
class Outcome:
    """What became of a request: recorded once, answered from here on every retry."""

    status: str  # "ok" | "error"
    op: str
    args: Mapping[str, Any]
    epoch: int
    result: Mapping[str, Any] = field(default_factory=dict)
    error: Mapping[str, Any] = field(default_factory=dict)
    n: int = 0  # the ledger's request counter when recorded (oldest outcomes go first)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def same_request(self, op: str, args: Mapping[str, Any]) -> bool:
        return (self.op, dict(self.args)) == (op, dict(args))

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"status": self.status, "op": self.op, "args": dict(self.args),
                               "epoch": self.epoch, "n": self.n}
        if self.ok:
            out["result"] = dict(self.result)
        else:
            out["error"] = dict(self.error)
        return out

    @classmethod
    def from_json(cls, data: Any, where: str) -> Outcome:
        d = _obj(data, where)
        status = _str(d.get("status"), f"{where}.status")
        if status not in ("ok", "error"):
            raise LedgerStateInvalid(where=f"{where}.status", detail=f"unknown {status!r}")
        return cls(status=status, op=_str(d.get("op", ""), f"{where}.op"),
                   args=dict(_obj(d.get("args", {}), f"{where}.args")),
                   epoch=_int(d.get("epoch", 0), f"{where}.epoch"),
                   result=dict(_obj(d.get("result", {}), f"{where}.result")),
                   error=dict(_obj(d.get("error", {}), f"{where}.error")),
                   n=_int(d.get("n", 0), f"{where}.n"))


# --- the whole state ----------------------------------------------------------------------


@dataclass(frozen=True)
class VmDisk:
    target: str
    volume: str
    mode: str  # "rw" | "ro"

    def to_json(self) -> list[str]:
        return [self.target, self.volume, self.mode]

    @classmethod
    def from_json(cls, data: Any, where: str) -> VmDisk:
        if not isinstance(data, list) or len(data) != 3 or \
                not all(isinstance(x, str) for x in data) or data[2] not in ("rw", "ro"):
            raise LedgerStateInvalid(where=where, detail="not [target, volume, mode]")
        return cls(data[0], data[1], data[2])


@dataclass(frozen=True)
class VmEntry:
    """One VM in the index: where its definition is, and what the writer checked of it."""

    name: str
    slot: int  # in the VM store
    seq: int  # the definition's version (cluster-wide numbering)
    sha: str  # SHA-256 of the XML, hex
    disks: tuple[VmDisk, ...]
    memory_mib: int
    vcpus: int
    source: str  # "xml" | "xl"
    epoch: int  # the writer epoch that recorded this version
    changed_ms: int  # wall clock, for humans
    host: str | None = None  # where it runs (None: nowhere)
    state: str = "stopped"
    since_ms: int = 0  # when the writer granted it to ``host`` (wall clock, for humans)
    since_epoch: int = 0  # the writer epoch of that grant
    want: str | None = None  # a host asked to run it (start --on, migrate): its agent acts
    want_force: bool = False  # the running copy may be destroyed, not shut down
    error: str = ""  # why the last asked-for move did not happen
    want_live: bool = False  # the move asked for is a live migration
    # A live migration under way to this host: it and ``host`` both hold the disks.
    moving_to: str | None = None
    left: str | None = None  # the source of a finished live migration, still to unmap
    # The grant's holder as the writer read it at the grant: host id and generation (its
    # lease incarnation; 0: not known, as for a VM adopted on a host not joined yet).
    holder_id: int = 0
    holder_gen: int = 0

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "slot": self.slot, "seq": self.seq, "sha": self.sha,
            "disks": [d.to_json() for d in self.disks], "mem": self.memory_mib,
            "vcpus": self.vcpus, "src": self.source, "epoch": self.epoch,
            "ms": self.changed_ms, "state": self.state}
        if self.host is not None:
            out.update(host=self.host, at=self.since_ms, pe=self.since_epoch)
        if self.want is not None:
            out.update(want=self.want, wf=self.want_force)
        if self.error:
            out["err"] = self.error
        if self.want_live:
            out["wl"] = True
        if self.moving_to is not None:
            out["mv"] = self.moving_to
        if self.left is not None:
            out["left"] = self.left
        if self.holder_id:
            out.update(hid=self.holder_id, hg=self.holder_gen)
        return out

    @classmethod
    def from_json(cls, name: str, data: Any, where: str) -> VmEntry:
        d = _obj(data, where)
        disks = d.get("disks", [])
        if not isinstance(disks, list):
            raise LedgerStateInvalid(where=f"{where}.disks", detail="not a list")
        return cls(
            name=name, slot=_int(d.get("slot"), f"{where}.slot"),
            seq=_int(d.get("seq"), f"{where}.seq"), sha=_str(d.get("sha"), f"{where}.sha"),
            disks=tuple(VmDisk.from_json(x, f"{where}.disks") for x in disks),
            memory_mib=_int(d.get("mem"), f"{where}.mem"),
            vcpus=_int(d.get("vcpus"), f"{where}.vcpus"),
            source=_str(d.get("src", "xml"), f"{where}.src"),
            epoch=_int(d.get("epoch"), f"{where}.epoch"),
            changed_ms=_int(d.get("ms", 0), f"{where}.ms"),
            host=_opt_str(d.get("host"), f"{where}.host"),
            state=_str(d.get("state", "stopped"), f"{where}.state"),
            since_ms=_int(d.get("at", 0), f"{where}.at"),
            since_epoch=_int(d.get("pe", 0), f"{where}.pe"),
            want=_opt_str(d.get("want"), f"{where}.want"),
            want_force=d.get("wf") is True,
            error=_str(d.get("err", ""), f"{where}.err"),
            want_live=d.get("wl") is True,
            moving_to=_opt_str(d.get("mv"), f"{where}.mv"),
            left=_opt_str(d.get("left"), f"{where}.left"),
            holder_id=_int(d.get("hid", 0), f"{where}.hid"),
            holder_gen=_int(d.get("hg", 0), f"{where}.hg"))


@dataclass(frozen=True)
class VmVersion:
    """An earlier version of a definition, readable while its slot is not reused."""

    name: str
    seq: int
    slot: int
    sha: str
    action: str  # what replaced it: "edit" | "undefine"
    epoch: int
    changed_ms: int

    def to_json(self) -> list[Any]:
        return [self.name, self.seq, self.slot, self.sha, self.action, self.epoch,
                self.changed_ms]

    @classmethod
    def from_json(cls, data: Any, where: str) -> VmVersion:
        if not isinstance(data, list) or len(data) != 7:
            raise LedgerStateInvalid(where=where, detail="not a VM version")
        name, seq, slot, sha, action, epoch, ms = data
        return cls(_str(name, where), _int(seq, where), _int(slot, where), _str(sha, where),
                   _str(action, where), _int(epoch, where), _int(ms, where))


@dataclass(frozen=True)
class LedgerState:
    cluster: str = ""
    vg: str = ""
    writer: WriterInfo | None = None
    hosts: Mapping[int, HostEntry] = field(default_factory=dict)
    handover: Handover | None = None
    intents: Mapping[str, Intent] = field(default_factory=dict)
    unreadable: Mapping[str, Any] = field(default_factory=dict)  # intents that did not read
    requests: Mapping[str, Outcome] = field(default_factory=dict)
    request_counter: int = 0
    vg_seqno: int | None = None
    vms: Mapping[str, VmEntry] = field(default_factory=dict)
    vm_history: tuple[VmVersion, ...] = ()
    vm_seq: int = 0
    extra: Mapping[str, Any] = field(default_factory=dict)  # keys of a newer version

    # --- reading ------------------------------------------------------------------

    def host_names(self) -> dict[int, str]:
        return {hid: h.name for hid, h in self.hosts.items()}

    def host_name(self, host_id: int) -> str:
        entry = self.hosts.get(host_id)
        return entry.name if entry is not None else f"host id {host_id}"

    def host_id(self, name: str) -> int | None:
        return next((hid for hid, h in self.hosts.items() if h.name == name), None)

    def in_maintenance(self, name: str) -> bool:
        return any(h.name == name and h.maintenance for h in self.hosts.values())

    def handover_from(self, epoch: int) -> Handover | None:
        """The handover recorded away from writer epoch ``epoch``, if any."""
        ho = self.handover
        return ho if ho is not None and ho.from_epoch == epoch else None

    # --- changes (each returns a new state) -----------------------------------------------

    def with_writer(self, writer: WriterInfo) -> LedgerState:
        return replace(self, writer=writer)

    def with_hosts(self, hosts: Mapping[int, HostEntry]) -> LedgerState:
        return replace(self, hosts=dict(hosts))

    def with_handover(self, handover: Handover) -> LedgerState:
        return replace(self, handover=handover)

    def with_intent(self, rid: str, intent: Intent) -> LedgerState:
        return replace(self, intents={**self.intents, rid: intent})

    def with_outcome(self, rid: str, outcome: Outcome, *,
                     seqno: int | None = None) -> LedgerState:
        """Record ``rid``'s outcome and close its intent; keep the newest KEEP_OUTCOMES."""
        counter = self.request_counter + 1
        requests = {**self.requests, rid: replace(outcome, n=counter)}
        if len(requests) > KEEP_OUTCOMES:
            for old in sorted(requests, key=lambda k: requests[k].n)[
                    : len(requests) - KEEP_OUTCOMES]:
                del requests[old]
        intents = {k: v for k, v in self.intents.items() if k != rid}
        unreadable = {k: v for k, v in self.unreadable.items() if k != rid}
        return replace(self, intents=intents, unreadable=unreadable, requests=requests,
                       request_counter=counter,
                       vg_seqno=self.vg_seqno if seqno is None else seqno)

    # --- JSON -------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.extra)
        if self.cluster:
            out["cluster"] = self.cluster
        if self.vg:
            out["vg"] = self.vg
        if self.writer is not None:
            out["writer"] = self.writer.to_json()
        if self.hosts:
            out["hosts"] = {str(k): v.to_json() for k, v in sorted(self.hosts.items())}
        if self.handover is not None:
            out["handover"] = self.handover.to_json()
        if self.intents or self.unreadable or self.requests or self.request_counter:
            # Once the journal was used, its three keys are always there (as version 1
            # has always written them).
            out["intents"] = {**dict(self.unreadable),
                              **{k: v.to_json() for k, v in self.intents.items()}}
            out["requests"] = {k: v.to_json() for k, v in self.requests.items()}
            out["request_counter"] = self.request_counter
        if self.vg_seqno is not None:
            out["vg_seqno"] = self.vg_seqno
        if self.vms or self.vm_history or self.vm_seq:
            out["vms"] = {k: v.to_json() for k, v in sorted(self.vms.items())}
            out["vm_history"] = [v.to_json() for v in self.vm_history]
            out["vm_seq"] = self.vm_seq
        return out

    @classmethod
    def from_json(cls, data: Any) -> LedgerState:
        d = _obj(data, "state")
        hosts: dict[int, HostEntry] = {}
        for key, value in _obj(d.get("hosts", {}), "hosts").items():
            if not key.isdigit():
                raise LedgerStateInvalid(where="hosts", detail=f"host id {key!r}")
            hosts[int(key)] = HostEntry.from_json(value, f"hosts.{key}")
        intents: dict[str, Intent] = {}
        unreadable: dict[str, Any] = {}
        for rid, value in _obj(d.get("intents", {}), "intents").items():
            try:
                intents[rid] = Intent.from_json(value, f"intents.{rid}")
            except LedgerStateInvalid:
                unreadable[rid] = value
        requests = {rid: Outcome.from_json(v, f"requests.{rid}")
                    for rid, v in _obj(d.get("requests", {}), "requests").items()}
        vms = {name: VmEntry.from_json(name, v, f"vms.{name}")
               for name, v in _obj(d.get("vms", {}), "vms").items()}
        history = d.get("vm_history", [])
        if not isinstance(history, list):
            raise LedgerStateInvalid(where="vm_history", detail="not a list")
        return cls(
            cluster=_str(d.get("cluster", ""), "cluster"), vg=_str(d.get("vg", ""), "vg"),
            writer=WriterInfo.from_json(d["writer"]) if d.get("writer") is not None else None,
            hosts=hosts,
            handover=Handover.from_json(d["handover"]) if d.get("handover") else None,
            intents=intents, unreadable=unreadable, requests=requests,
            request_counter=_int(d.get("request_counter", 0), "request_counter"),
            vg_seqno=_opt_int(d.get("vg_seqno"), "vg_seqno"),
            vms=vms,
            vm_history=tuple(VmVersion.from_json(v, "vm_history") for v in history),
            vm_seq=_int(d.get("vm_seq", 0), "vm_seq"),
            extra={k: v for k, v in d.items() if k not in _KNOWN})


def ledger_hosts(state: LedgerState | None) -> dict[int, str]:
    """Host id -> name from a state (empty without one)."""
    return state.host_names() if state is not None else {}


def merge_hosts(state: LedgerState, live: Iterable[tuple[int, str]],
                epoch: int) -> LedgerState | None:
    """The state with every live host in its table, or None if it has them all already."""
    hosts = dict(state.hosts)
    changed = False
    for hid, name in live:
        entry = hosts.get(hid)
        if entry is None or entry.name != name:
            hosts[hid] = HostEntry(name, epoch)
            changed = True
    return state.with_hosts(hosts) if changed else None
