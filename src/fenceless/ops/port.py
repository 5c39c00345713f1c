"""The narrow interfaces through which operations reach the agent that runs them.

Operations (``ops/``) own the work; the agent (``agent/``) holds the leases
and runs operations. An operation never sees the agent object: it gets a
*port* with exactly what it may use, so that

- the lease keeper can change without touching any operation;
- operations run in unit tests against a port over memory devices;
- what an operation can do to the shared disk is visible in one place.

``WriterPort`` is what the writer's journaled operations use: the epoch,
the write check that must come right before every shared write
(docs/design.md, "The stale writer"), the ledger, LVM bounded by the lease,
the audit log and metadata history, and fresh views of the other hosts.
``RolePort`` adds what operations on the writer role itself use: the
writer lease and the liveness of its owner.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from fenceless.clock import Clock
from fenceless.lease.delta import HostState
from fenceless.lease.paxos import AcquireResult, Leader
from fenceless.ledger.claims import HostClaims
from fenceless.ledger.state import Intent, LedgerState, RequestInfo, VmEntry
from fenceless.lvm.activation import Activator
from fenceless.lvm.adapter import Lvm, Role
from fenceless.ondisk.errors import CorruptRecord


@dataclass(frozen=True)
class HostView:
    """One host as a fresh read of the host area shows it."""

    host_id: int
    name: str
    generation: int
    state: HostState
    facts: Mapping[str, Any] = field(default_factory=dict)

    def active(self) -> Mapping[str, Any]:
        """The LVs this host publishes as active (name -> mapped size, 0 while mapping)."""
        active = self.facts.get("active", {})
        return active if isinstance(active, dict) else {}


class WriterPort(Protocol):
    """What an operation run by the writer may use."""

    @property
    def host(self) -> str:
        """This host's name."""

    @property
    def vg(self) -> str:
        """The shared VG's name."""

    @property
    def epoch(self) -> int | None:
        """The writer epoch this host acts under, or None when it is not the writer."""

    @property
    def n(self) -> float:
        """N, the io_timeout: every lease time is a multiple of it."""

    @property
    def clock(self) -> Clock: ...

    def log(self, msg: str) -> None: ...

    def check_write(self) -> None:
        """Raise LeaseLost unless a shared write may go out now (call right before it)."""

    def lvm(self, role: Role = Role.READER) -> Lvm:
        """LVM for the VG. The lease is kept while each command runs, and a command is
        stopped (killed) once the lease has N or less left."""

    def lvm_budget(self) -> float:
        """Seconds an LVM change may run from now; <= 0: none may start."""

    def renew_if_due(self) -> None:
        """Between long steps: renew the host lease when it falls due."""

    def ledger(self, fresh: bool = False) -> LedgerState:
        """The ledger's current state: the writer's copy, or (``fresh``) read now."""

    def write_ledger(self, state: LedgerState, *, both_slots: bool = False) -> LedgerState:
        """Publish ``state`` as the next ledger generation at this writer's epoch."""

    def audit(self, host: str, request: RequestInfo, result: str, message: str) -> None:
        """One record in the audit log on the LUN (best effort)."""

    def read_stage(self, host_id: int, name: str, sha: str) -> str:
        """The VM definition host ``host_id`` uploaded for a request (``ledger/vmstore.py``)."""

    def write_definition(self, slot: int, name: str, xml: str, seq: int) -> None:
        """Version ``seq`` of VM ``name`` into a free slot of the VM store."""

    def vm_slots(self) -> int:
        """How many slots the VM store has (0: a cluster made before VMs)."""

    def note_metadata_change(self, request_id: str, seqno: int) -> None:
        """Keep the VG metadata text after a change in the history ring (best effort)."""

    def metadata_key(self) -> object | None:
        """LVM's metadata header on the PV: equal keys mean byte-identical metadata."""

    def read_metadata(self, *, scan: bool = True) -> tuple[str, int]:
        """The VG metadata text and seqno, read from the PV (no LVM process)."""

    def read_history(self, seqno: int) -> str:
        """The VG metadata text the history ring on the LUN keeps for ``seqno``."""

    def check_leader(self) -> None:
        """Raise LeaseLost unless the writer lease still names this host at its epoch."""

    def host_name(self, host_id: int) -> str: ...

    def hosts_now(self) -> list[HostView]:
        """Every host with a lease sector in use, from a fresh read of the host area."""

    def host_state(self, host_id: int) -> HostState:
        """As the last read judged it (``hosts_now`` reads afresh)."""

    def claims_now(self) -> Mapping[int, HostClaims | CorruptRecord]:
        """Every host's claims as on the disk now; a slot that does not read: its error."""

    def local_active(self, force: bool = False) -> Mapping[str, int]:
        """LVs active on this host and their mapped sizes."""

    def refresh_active(self) -> bool:
        """Bring this host's active mappings to the sizes in the metadata."""


class HostPort(Protocol):
    """What a host-local operation (activation) uses: its mappings and its claims."""

    def activator(self) -> Activator: ...

    def claim(self, lv: str, mode: str = "rw") -> None:
        """Publish on the LUN that this host maps ``lv``, before the mapping exists."""

    def settle(self, lv: str) -> None:
        """The mapping exists: keep the claim, now with its size."""

    def unclaim(self, lv: str, *, keep_mapped: bool = False) -> None:
        """Withdraw the claim once the mapping is gone (``keep_mapped``: only the claim
        being made now; the mapping's own claim stays)."""

    def pending_intents(self) -> list[Intent]:
        """The writer's journaled intents, read from the ledger now."""

    def vms_now(self) -> Mapping[str, VmEntry]:
        """The VM index, read from the ledger now."""

    @property
    def host(self) -> str: ...

    def local_active(self, force: bool = False) -> Mapping[str, int]: ...

    def others_claim(self, lv: str) -> list[tuple[str, str]]:
        """(host, mode) of the other hosts that claim ``lv`` now (fresh reads)."""

    def announce(self) -> None:
        """Renew the host lease now, so the others see what changed."""


class RolePort(WriterPort, Protocol):
    """What operations on the writer role use, besides the writer's facilities."""

    @property
    def host_id(self) -> int: ...

    @property
    def generation(self) -> int: ...

    def read_leader(self) -> Leader | None:
        """The writer lease's leader sector, read now."""

    def generation_of(self, host_id: int) -> int | None:
        """The generation in the host's lease sector as last read (None: not seen)."""

    def ledger_epoch(self) -> int:
        """The writer epoch of the ledger record last read (0: none)."""

    def owner_gone(self, host_id: int, generation: int) -> bool:
        """True if that incarnation can no longer hold anything (free, replaced or DEAD)."""

    def acquire_writer(self) -> AcquireResult:
        """Run the writer-lease ballot for this host's incarnation."""

    def release_writer(self, epoch: int) -> None:
        """Mark the writer lease released (a planned handover)."""

    def work_idle(self) -> bool:
        """Wait (a little) until no LVM command of this host is running; False if one is
        left (killed, but stuck in I/O): then the role must not move yet."""

    def set_epoch(self, epoch: int | None, why: str) -> None:
        """Act as the writer at ``epoch`` from now on, or (None) stop at once."""

    def announce(self) -> None:
        """Renew the host lease now, so the others (and the guard) see the change."""

    def request_handover(self, request: dict[str, Any] | None) -> None:
        """Publish (or withdraw) a request that the writer hands its role over."""
