"""Who should be the writer: the agent's decision about the writer role, as a pure function.

Every renewal round the agent looks at the writer lease's leader sector, its
own incarnation and epoch, what it observes of the other hosts, and (when it
matters) the handover the ledger records; ``decide`` turns that into one
action. Nothing here does I/O, so the tests can drive every combination, as
they drive the Paxos steps (tests/unit/test_agent_role.py).

The rules, as the writer:
- the leader no longer names this incarnation at this epoch (taken over,
  released): stop acting as the writer at once;
- a live host asked that the role move to a live host: hand it over.
As any other host:
- the leader still names this incarnation (the role was given up after late
  renewals) and the lease is healthy again: take it back, or nobody could;
- a ballot chose this incarnation but the leader does not say so yet (its
  leader write failed): finish the acquire, or the others lose to it forever;
- the leader was released or its owner is gone, and the ledger records a
  handover to this host: take it;
- the owner is gone and was this host's previous incarnation, and no live
  successor was named: take the role back at a new epoch;
- ``--auto-takeover``: the owner is gone (and no live successor was named),
  and this is the lowest-numbered live host: take over.
A ballot settles any race between hosts that decide to acquire at once.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field

from fenceless.lease.delta import HostState
from fenceless.lease.paxos import Leader
from fenceless.ledger.state import Handover


class Act(enum.Enum):
    NOTHING = "nothing"
    DROP = "drop"  # stop acting as the writer now
    ACQUIRE = "acquire"  # run the writer-lease ballot
    HAND_OVER = "hand over"  # record the handover, release the lease
    READ_LEDGER = "read ledger"  # the decision needs the ledger's handover record


@dataclass(frozen=True)
class HandoverAsk:
    """A live host's request that the writer at ``from_epoch`` hand over to ``to_id``."""

    to_id: int
    to: str
    id: str


@dataclass(frozen=True)
class Decision:
    act: Act
    why: str = ""
    ask: HandoverAsk | None = None


class _Unread:
    """The ledger was not read for this decision (reading it costs 512 KiB)."""

    def __repr__(self) -> str:
        return "UNREAD"


UNREAD = _Unread()


@dataclass(frozen=True)
class RoleView:
    """Everything the decision rests on, as this host sees it now."""

    host_id: int
    generation: int
    epoch: int | None  # the writer epoch this host acts under, or None
    lease_left: float  # seconds before this host's lease expires
    n: float  # the io_timeout
    leader: Leader | None
    states: Mapping[int, HostState] = field(default_factory=dict)
    generations: Mapping[int, int] = field(default_factory=dict)  # as last read, per host
    auto_takeover: bool = False
    handover: Handover | _Unread | None = UNREAD  # the ledger's, from the leader's epoch
    ask: HandoverAsk | None = None  # a pending request to hand over (writer only)
    ballot_won: int = 0  # an epoch whose ballot accepted this incarnation (own dblock)

    def state(self, host_id: int) -> HostState:
        return self.states.get(host_id, HostState.UNKNOWN)

    def gone(self, host_id: int, generation: int) -> bool:
        """That incarnation can hold nothing any more: free, replaced, or DEAD."""
        if self.state(host_id) in (HostState.FREE, HostState.DEAD):
            return True
        seen = self.generations.get(host_id)
        return seen is not None and seen != generation

    def may_still_take(self, target: int | None) -> bool:
        """A named successor (another host) not known to be gone may yet take the role:
        UNKNOWN (a fresh view after a restart) and FAIL count as maybe alive."""
        return target is not None and target != self.host_id and \
            self.state(target) not in (HostState.DEAD, HostState.FREE)


def _held(leader: Leader | None) -> str:
    return "nobody" if leader is None else f"host id {leader.owner_id} at epoch {leader.lver}"


def decide(v: RoleView) -> Decision:
    """The one action this host takes about the writer role now."""
    if v.epoch is not None:
        return _as_writer(v)
    return _as_reader(v)


def _as_writer(v: RoleView) -> Decision:
    ld = v.leader
    if ld is None or ld.released or \
            (ld.owner_id, ld.owner_generation, ld.lver) != (v.host_id, v.generation, v.epoch):
        return Decision(Act.DROP, f"the writer lease now names {_held(ld)}")
    if v.ask is not None and v.ask.to_id != v.host_id:
        return Decision(Act.HAND_OVER, f"{v.ask.to} asked for the writer role", v.ask)
    return Decision(Act.NOTHING)


def _as_reader(v: RoleView) -> Decision:
    ld = v.leader
    if ld is not None and not ld.released and \
            (ld.owner_id, ld.owner_generation) == (v.host_id, v.generation):
        if v.lease_left > 2 * v.n:
            return Decision(Act.ACQUIRE, "the lease is healthy again")
        return Decision(Act.NOTHING)
    if v.ballot_won > (ld.lver if ld is not None else 0) and v.lease_left > 2 * v.n:
        # A ballot chose this host but its leader write failed: until it is written,
        # the others lose to this host. Only this host writes it (docs/design.md,
        # "The writer lease"), so it must finish the acquire.
        return Decision(Act.ACQUIRE, f"finishing the ballot this host won at epoch "
                        f"{v.ballot_won}")
    if ld is not None and ld.owner_id != 0 and (ld.released or
                                                v.gone(ld.owner_id, ld.owner_generation)):
        if isinstance(v.handover, _Unread):
            return Decision(Act.READ_LEDGER)
        target = v.handover.to_id if v.handover is not None else None
        if target == v.host_id:
            if ld.released:
                return Decision(Act.ACQUIRE, "planned handover")
            assert v.handover is not None
            return Decision(Act.ACQUIRE,
                            f"completing the handover {v.handover.to} was promised")
        if not ld.released and ld.owner_id == v.host_id and not v.may_still_take(target):
            # The writer was this host's previous incarnation (its lease ran out, or the
            # agent restarted): it writes nothing any more, and nobody else was made
            # writer since. Take the role back rather than leave the cluster without one.
            return Decision(Act.ACQUIRE, "this host was the writer before its host lease "
                            "was renewed anew")
        if v.may_still_take(target):
            return Decision(Act.NOTHING)  # a named successor takes it: let it
    if v.auto_takeover and _lowest_live(v):
        if ld is not None and not ld.free and not v.gone(ld.owner_id, ld.owner_generation):
            return Decision(Act.NOTHING)
        return Decision(Act.ACQUIRE, "automatic takeover")
    return Decision(Act.NOTHING)


def _lowest_live(v: RoleView) -> bool:
    live = [h for h, s in v.states.items() if h != v.host_id and s is HostState.LIVE]
    return all(h > v.host_id for h in live)


def handover_ask(asks: Mapping[int, object], live: Mapping[int, bool], names: Mapping[str, int],
                 epoch: int, done: str | None) -> HandoverAsk | None:
    """The first live host's request to hand the role at ``epoch`` over to a live host.

    ``asks`` maps host ids to what they publish as ``handover_request`` in their
    lease sector (untrusted: checked here); ``done`` is the id of the handover the
    ledger already records, which is never carried out twice.
    """
    for hid in sorted(asks):
        req = asks[hid]
        if not isinstance(req, dict) or not live.get(hid):
            continue
        rid, to, from_epoch = req.get("id"), req.get("to"), req.get("from_epoch")
        if not isinstance(rid, str) or rid == done or not isinstance(to, str) or \
                not isinstance(from_epoch, int) or from_epoch != epoch:
            continue
        target = names.get(to)
        if target is None or not live.get(target):
            continue
        return HandoverAsk(target, to, rid)
    return None
