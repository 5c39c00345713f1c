"""The writer-role decision, driven over every combination of a small cluster.

``decide`` is pure, so the test enumerates, for three hosts, every leader
(none, each host's incarnation, released or not), every liveness each host
may be seen in, every handover record (none, to each host, not read), with
and without ``--auto-takeover``, a healthy and a failing lease, and checks
the properties the agent's safety rests on.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

from fenceless.agent.role import UNREAD, Act, HandoverAsk, RoleView, decide, handover_ask
from fenceless.lease.delta import HostState
from fenceless.lease.paxos import Leader
from fenceless.ledger.state import Handover

HOSTS = (1, 2, 3)
N = 0.1
STATES = tuple(HostState)


def leaders() -> Iterator[Leader | None]:
    yield None
    for owner, gen, released in itertools.product(HOSTS, (1, 2), (False, True)):
        yield Leader(owner, gen, 5, released=released, owner_name=f"h{owner}")


def handovers() -> Iterator[Handover | object | None]:
    yield UNREAD
    yield None
    for to in HOSTS:
        yield Handover(to, f"h{to}", 5, "x")


def views() -> Iterator[RoleView]:
    """Every reader view: this host is ``me`` (generation 2), all others generation 1."""
    for me, leader, states, handover, auto, left in itertools.product(
            HOSTS, leaders(), itertools.product(STATES, repeat=3), handovers(),
            (False, True), (N, 10 * N)):
        st = dict(zip(HOSTS, states, strict=True))
        st[me] = HostState.LIVE
        gens = {h: (2 if h == me else 1) for h in HOSTS if st[h] is not HostState.FREE}
        yield RoleView(host_id=me, generation=2, epoch=None, lease_left=left, n=N,
                       leader=leader, states=st, generations=gens, auto_takeover=auto,
                       handover=handover)  # type: ignore[arg-type]


def is_me(v: RoleView, ld: Leader) -> bool:
    return (ld.owner_id, ld.owner_generation) == (v.host_id, v.generation)


def test_a_reader_never_takes_the_role_from_a_writer_that_may_be_alive() -> None:
    for v in views():
        d = decide(v)
        ld = v.leader
        if d.act is Act.ACQUIRE and ld is not None and not ld.released and not is_me(v, ld):
            assert v.gone(ld.owner_id, ld.owner_generation), (v, d)


def test_the_ledger_is_read_only_when_the_decision_needs_it() -> None:
    for v in views():
        d = decide(v)
        if d.act is Act.READ_LEDGER:
            assert v.handover is UNREAD
            ld = v.leader
            assert ld is not None and (ld.released or v.gone(ld.owner_id, ld.owner_generation))
        if v.handover is not UNREAD:
            assert d.act is not Act.READ_LEDGER


def test_a_named_successor_that_may_be_alive_is_left_to_take_the_role() -> None:
    for v in views():
        ho = v.handover
        ld = v.leader
        if not isinstance(ho, Handover) or ld is None or is_me(v, ld):
            continue
        if ho.to_id != v.host_id and v.may_still_take(ho.to_id):
            assert decide(v).act is Act.NOTHING, v


def test_without_auto_takeover_a_reader_acquires_only_what_is_its_own() -> None:
    """A handover to it, or the role of its own earlier incarnation: nothing else."""
    for v in views():
        if v.auto_takeover or decide(v).act is not Act.ACQUIRE:
            continue
        ld = v.leader
        assert ld is not None
        own = ld.owner_id == v.host_id
        handed = isinstance(v.handover, Handover) and v.handover.to_id == v.host_id
        assert own or handed, v


def test_a_healthy_lease_takes_back_its_own_role_and_a_failing_one_does_not() -> None:
    for v in views():
        ld = v.leader
        if ld is not None and not ld.released and is_me(v, ld):
            want = Act.ACQUIRE if v.lease_left > 2 * N else Act.NOTHING
            assert decide(v).act is want


def test_one_host_at_most_takes_over_automatically() -> None:
    """Hosts that see the same cluster: only the lowest live one volunteers."""
    for leader, states in itertools.product(leaders(), itertools.product(STATES, repeat=3)):
        truth = dict(zip(HOSTS, states, strict=True))
        takers = []
        for me in HOSTS:
            if truth[me] is not HostState.LIVE:
                continue  # a host that is not running decides nothing
            gens = {h: 1 for h in HOSTS if truth[h] is not HostState.FREE}
            v = RoleView(host_id=me, generation=1, epoch=None, lease_left=10 * N, n=N,
                         leader=leader, states=truth, generations=gens, auto_takeover=True,
                         handover=None)
            d = decide(v)
            if d.act is Act.ACQUIRE and d.why == "automatic takeover":
                takers.append(me)
        assert len(takers) <= 1, (leader, truth, takers)


def test_the_writer_drops_the_role_unless_the_leader_names_it_at_its_epoch() -> None:
    for leader in leaders():
        v = RoleView(host_id=1, generation=2, epoch=5, lease_left=10 * N, n=N, leader=leader)
        mine = leader is not None and not leader.released and is_me(v, leader)
        assert (decide(v).act is Act.DROP) is not mine
    ld = Leader(1, 2, 4)
    assert decide(RoleView(1, 2, 5, 10 * N, N, ld)).act is Act.DROP  # another epoch


def test_the_writer_hands_over_only_when_asked_for_another_host() -> None:
    ld = Leader(1, 2, 5)
    asked = HandoverAsk(2, "h2", "n1")
    assert decide(RoleView(1, 2, 5, 1.0, N, ld, ask=asked)).act is Act.HAND_OVER
    assert decide(RoleView(1, 2, 5, 1.0, N, ld, ask=HandoverAsk(1, "h1", "n"))).act \
        is Act.NOTHING


def test_a_handover_request_is_checked_as_untrusted_data() -> None:
    names = {"h1": 1, "h2": 2, "h3": 3}
    live = {1: True, 2: True, 3: False}
    good = {"to": "h2", "id": "n1", "from_epoch": 5}
    assert handover_ask({3: good, 2: good}, live, names, 5, None) == HandoverAsk(2, "h2", "n1")
    for bad in ({**good, "from_epoch": 4}, {**good, "from_epoch": "5"}, {**good, "to": "h3"},
                {**good, "to": "h9"}, {**good, "id": 7}, "junk", None):
        assert handover_ask({2: bad}, live, names, 5, None) is None, bad
    assert handover_ask({2: good}, live, names, 5, "n1") is None  # already done
    assert handover_ask({3: good}, live, names, 5, None) is None  # asker not live


def test_a_ballot_this_host_won_but_could_not_record_is_finished_by_it() -> None:
    """Its leader write failed: the others learn "chosen for h1" and lose to it for as
    long as h1 lives. Unless h1 finishes the acquire, the cluster has no writer."""
    old = Leader(3, 1, 4, owner_name="h3")
    base = dict(host_id=1, generation=2, epoch=None, lease_left=10 * N, n=N,
                states={1: HostState.LIVE, 2: HostState.LIVE, 3: HostState.DEAD},
                generations={1: 2, 2: 1, 3: 1}, handover=None)
    d = decide(RoleView(leader=old, ballot_won=5, **base))  # type: ignore[arg-type]
    assert d.act is Act.ACQUIRE and "ballot" in d.why
    assert decide(RoleView(leader=Leader(1, 2, 5), ballot_won=5, **base)  # type: ignore[arg-type]
                  ).act is Act.ACQUIRE  # the leader names it: take the role as usual
    assert decide(RoleView(leader=Leader(2, 1, 5), ballot_won=5, **base)  # type: ignore[arg-type]
                  ).act is Act.NOTHING  # recorded for another host at that epoch
