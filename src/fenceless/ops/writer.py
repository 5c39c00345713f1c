"""Operations on the writer role: become the writer, hand the role over, take it over.

Each runs in the host's agent (the one process that holds this host's
leases) through a ``RolePort``. The ordering rules, and why:

- **Becoming the writer** publishes the new epoch in *both* ledger slots
  before this host acts as the writer, so no slot is left from an older
  epoch and a stale writer's late write can never roll the ledger back
  (docs/design.md, "The stale writer").
- **A planned handover** records the handover in the ledger *before* the
  old writer releases the lease; a writer that dies in between leaves the
  role to the named host, which finishes the handover.
- **A takeover** is for a dead writer only: refused while the writer's host
  lease is renewing; while it is FAIL or UNKNOWN the request waits.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable
from typing import Any

from fenceless.blockio import IoTimeout
from fenceless.errors import LeaseLost, UserError
from fenceless.faults import crashpoint
from fenceless.lease.delta import HostState
from fenceless.lease.paxos import AcquireResult, Outcome
from fenceless.ledger.slots import LedgerUnreadable
from fenceless.ledger.state import Handover, LedgerState, WriterInfo, merge_hosts
from fenceless.ondisk.errors import CorruptRecord, UnsupportedVersion
from fenceless.ops.port import RolePort

SCRUB_EVERY = 10  # the writer re-reads the whole ledger every this many renewals


class TakeoverRefused(UserError):
    """Refused: the takeover did not happen"""


class TakeoverLost(TakeoverRefused):
    """Refused: {owner} won the writer lease at epoch {epoch} first"""


class WriterAlive(TakeoverRefused):
    """Refused: the writer {owner} (host id {host_id}, epoch {epoch}) is alive: its host \
lease is renewing. Takeover is for a dead writer; for a planned move run \
`fenceless writer handover HOST`."""


class TakeoverGaveUp(TakeoverRefused):
    """Refused: gave up waiting: {waiting}"""


class WriterLeaseTaken(TakeoverRefused):
    """Refused: the writer lease is {outcome} (held by {owner} at epoch {epoch})"""


class NotAHost(UserError):
    """Refused: {to} is not a host of this cluster (hosts: {hosts})"""


class HandoverTargetNotLive(UserError):
    """Refused: {to}'s host lease is {state}; hand over only to a live host"""


class HandoverBusy(UserError):
    """Not yet: an LVM command of this writer is still running (killed, but stuck in I/O?); \
the role moves once it is gone"""


class NoLiveWriter(UserError):
    """Refused: there is no live writer to hand over from (the writer lease names {held}). \
Run `fenceless writer takeover` on {to}."""


def become_writer(port: RolePort, why: str) -> AcquireResult:
    """Run the ballot; if won, publish the new epoch in both ledger slots, then act as writer."""
    port.check_write()
    result = port.acquire_writer()
    if not result.won:
        return result
    crashpoint("agent.writer-acquired")
    port.set_epoch(result.epoch, why)  # a fresh start: the ledger is read anew below
    try:
        state = port.ledger().with_writer(WriterInfo(port.host_id, port.host, result.epoch))
        port.write_ledger(state, both_slots=True)
    except (LedgerUnreadable, CorruptRecord) as exc:
        if (isinstance(exc, UnsupportedVersion) and exc.fields.get("newer")) or \
                exc.fields.get("kind_found") is not None:
            # A newer fenceless's ledger, or another kind of record where a ledger slot
            # should be (this host's layout is not the cluster's): not damage.
            port.set_epoch(None, f"the ledger is not one this host may write ({exc})")
            raise
        # Damage the writer never writes over (no slot reads, or a slot holds foreign
        # bytes): the lease, not the ledger, makes this host the writer. It finishes and
        # starts nothing (the journal cannot reconcile), but it can be repaired now
        # (`fenceless repair ledger`), which needs a writer.
        port.log(f"the ledger cannot be written ({exc}); writer at epoch {result.epoch} "
                 "all the same, for `fenceless repair ledger`")
    except BaseException:
        port.set_epoch(None, "could not publish the new epoch")  # taken back once it can
        raise
    port.read_leader()
    port.announce()  # tell the others (and the guard) at once
    port.log(f"*** this host is the metadata writer at epoch {result.epoch} ({why})")
    return result


def hand_over(port: RolePort, target: int, name: str, nonce: str) -> None:
    """As the writer: record the handover, release the lease, stop acting as writer."""
    epoch = port.epoch
    if epoch is None or target == port.host_id:
        return
    if not port.work_idle():
        raise HandoverBusy()
    port.log(f"handing the writer role over to {name} (id {target}) after epoch {epoch}")
    port.write_ledger(port.ledger().with_handover(Handover(target, name, epoch, nonce)))
    crashpoint("agent.handover-recorded")
    try:
        port.release_writer(epoch)
        port.read_leader()
    finally:
        # Recorded is promised: whether the release landed, failed or hangs, this host
        # is not the writer any more (a hung release may land at any time).
        port.set_epoch(None, f"handed over to {name}")


def upkeep(port: RolePort, live: Iterable[tuple[int, str]], *, scrub: bool) -> LedgerState:
    """As the writer: every live host in the ledger's host table, and this epoch published.

    The ledger is read again (``scrub``: every SCRUB_EVERY rounds, or when the
    writer has no trusted copy) or when a live host is missing from the table;
    it is written only when something changed. A ledger whose record is of an
    older epoch is written into both slots.
    """
    epoch = port.epoch or 0
    live = list(live)
    if not scrub and merge_hosts(port.ledger(), live, epoch) is None:
        return port.ledger()
    state = port.ledger(fresh=True)
    merged = merge_hosts(state, live, epoch)
    stale = port.ledger_epoch() < epoch
    if merged is None and not stale:
        return state
    written = port.write_ledger(merged or state, both_slots=stale)
    for hid, entry in sorted(written.hosts.items()):
        if hid not in state.hosts or state.hosts[hid].name != entry.name:
            port.log(f"recorded host {entry.name} as id {hid}")
    return written


class Takeover:
    """``fenceless writer takeover``: become the writer once the old one is dead.

    ``step`` is called once per renewal round until it returns a result:
    None means "not yet" (the writer's lease is FAIL or UNKNOWN; wait for DEAD).
    """

    def __init__(self, port: RolePort, *, wait: bool = False,
                 seen_epoch: int | None = None) -> None:
        self.port = port
        self.wait = wait
        # The writer epoch when the admin asked: ``seen_epoch``, as the CLI read it, else
        # the first read here that succeeds.
        self.seen_epoch: int | None = seen_epoch
        self.waiting_for = ""

    def step(self) -> dict[str, Any] | None:
        try:
            return self._step()
        except (IoTimeout, LeaseLost) as e:
            # With --wait the admin asked for the role once it can be had: one I/O that
            # did not finish in time (a busy path), or one still hung, which stops every
            # shared write until it returns, is a round without an answer, as a FAIL
            # lease is. A ballot cut short is safe to run again at a higher ballot.
            if not self.wait:
                raise
            self.waiting_for = f"trying again after: {e}"
            return None

    def _step(self) -> dict[str, Any] | None:
        port = self.port
        if port.epoch is not None:
            return {"outcome": "already", "epoch": port.epoch, "host": port.host}
        leader = port.read_leader()
        if leader is not None and not leader.free and leader.owner_id == port.host_id and \
                leader.owner_generation == port.generation:
            # This incarnation's own ballot (won, then cut short before the role was
            # taken up): the agent's next round finishes it (agent/role.py).
            self.waiting_for = "this host won the ballot; the agent is taking the role up"
            return None
        if self.seen_epoch is None:
            self.seen_epoch = leader.lver if leader is not None else 0
        elif leader is not None and leader.lver > self.seen_epoch and not leader.free:
            raise TakeoverLost(owner=leader.owner_name, epoch=leader.lver)
        if leader is not None and not leader.free and \
                not port.owner_gone(leader.owner_id, leader.owner_generation):
            state = port.host_state(leader.owner_id)
            if state is HostState.LIVE and not self.wait:
                raise WriterAlive(owner=leader.owner_name, host_id=leader.owner_id,
                                  epoch=leader.lver)
            self.waiting_for = (f"the writer {leader.owner_name}'s host lease is "
                                f"{state.value}, not yet dead")
            return None
        result = become_writer(port, "takeover requested")
        if result.outcome is Outcome.WON:
            return {"outcome": "won", "epoch": result.epoch, "host": port.host}
        owner = port.host_name(result.owner_id)
        if result.outcome in (Outcome.LOST, Outcome.BUSY) and result.epoch > self.seen_epoch:
            raise TakeoverLost(owner=owner, epoch=result.epoch)
        raise WriterLeaseTaken(outcome=result.outcome.value, owner=owner, epoch=result.epoch)


def request_handover(port: RolePort, to: str) -> dict[str, Any]:
    """``fenceless writer handover HOST``, on any host: the writer hands over, or is asked to."""
    state = port.ledger(fresh=True)
    target = state.host_id(to)
    if target is None:
        raise NotAHost(to=to, hosts=", ".join(sorted(state.host_names().values())))
    if target != port.host_id and port.host_state(target) is not HostState.LIVE:
        raise HandoverTargetNotLive(to=to, state=port.host_state(target).value)
    leader = port.read_leader()
    if leader is not None and not leader.released and leader.owner_id == target and \
            port.generation_of(target) == leader.owner_generation:
        return {"outcome": "already", "epoch": leader.lver, "host": to}
    if leader is None or leader.free or port.owner_gone(leader.owner_id,
                                                        leader.owner_generation):
        held = "nobody" if leader is None else \
            f"{leader.owner_name} generation {leader.owner_generation}, which is gone"
        raise NoLiveWriter(held=held, to=to)
    nonce = secrets.token_hex(6)
    if port.epoch is not None:
        hand_over(port, target, to, nonce)
    else:
        port.request_handover({"to": to, "id": nonce, "from_epoch": leader.lver})
    return {"outcome": "requested", "from_epoch": leader.lver, "to": to, "id": nonce}
