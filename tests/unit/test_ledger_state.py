"""The ledger's typed state: version 1's JSON in and out unchanged, untrusted input refused."""

from __future__ import annotations

import contextlib
import copy
import json
import random

import pytest

from fenceless.ledger.state import (
    KEEP_OUTCOMES,
    HostEntry,
    Intent,
    LedgerState,
    LedgerStateInvalid,
    Outcome,
    RequestInfo,
    merge_hosts,
)

# A state as format version 1 writes it, after init, a handover and some requests.
V1 = {
    "cluster": "2f0d6c1e-7a55-4f43-9d1e-0a6b1f1ad6a1", "vg": "sanvg",
    "writer": {"host_id": 2, "name": "h2", "epoch": 3},
    "hosts": {"1": {"name": "h1", "since_epoch": 1}, "2": {"name": "h2", "since_epoch": 1}},
    "handover": {"to_id": 2, "to": "h2", "from_epoch": 2, "id": "a1b2c3"},
    "intents": {"r9": {"op": "extend", "name": "db", "uuid": "u-1", "from_bytes": 8388608,
                       "size_bytes": 16777216, "host": "h1", "user": "root",
                       "argv": ["fenceless", "volume", "extend", "db", "+8M"], "epoch": 3,
                       "request": {"id": "r9", "op": "extend",
                                   "args": {"name": "db", "size_bytes": 8388608,
                                            "relative": True},
                                   "user": "root",
                                   "argv": ["fenceless", "volume", "extend", "db", "+8M"]}}},
    "requests": {"r1": {"status": "ok", "op": "create",
                        "args": {"name": "db", "size_bytes": 8388608, "shared_ro": False},
                        "epoch": 2, "n": 1,
                        "result": {"vg": "sanvg", "name": "db", "size_bytes": 8388608,
                                   "shared_ro": False, "seqno": 4, "epoch": 2}},
                 "r2": {"status": "error", "op": "remove", "args": {"name": "x"}, "epoch": 2,
                        "n": 2, "error": {"message": "not found", "code": 2,
                                          "kind": "NotFound"}}},
    "request_counter": 2, "vg_seqno": 4,
}


def test_version_1_json_round_trips_unchanged() -> None:
    state = LedgerState.from_json(copy.deepcopy(V1))
    assert state.to_json() == V1
    assert state.host_name(1) == "h1" and state.host_id("h2") == 2
    assert state.intents["r9"].size_bytes == 16777216
    assert state.handover_from(2) is not None and state.handover_from(3) is None


def test_keys_of_a_newer_version_are_kept() -> None:
    data = {**V1, "networks": {"lan": {"vlan": 7}}}
    assert LedgerState.from_json(data).to_json()["networks"] == {"lan": {"vlan": 7}}


VMS = {"vms": {"web01": {"slot": 3, "seq": 7, "sha": "ab" * 32,
                         "disks": [["vda", "vm-web01", "rw"], ["vdb", "iso", "ro"]],
                         "mem": 256, "vcpus": 2, "src": "xml", "epoch": 4, "ms": 1,
                         "state": "running", "host": "h2", "at": 5, "pe": 4}},
       "vm_history": [["web01", 5, 1, "cd" * 32, "edit", 3, 0]], "vm_seq": 7}


def test_the_vm_index_reads_back_as_written() -> None:
    state = LedgerState.from_json({**V1, **VMS})
    web = state.vms["web01"]
    assert (web.slot, web.seq, web.host, web.state) == (3, 7, "h2", "running")
    assert (web.since_ms, web.since_epoch) == (5, 4)
    assert [d.to_json() for d in web.disks] == VMS["vms"]["web01"]["disks"]
    assert state.vm_history[0].seq == 5 and state.vm_seq == 7
    assert {k: state.to_json()[k] for k in VMS} == VMS


@pytest.mark.parametrize("damage", [
    lambda d: d["vms"]["web01"].update(slot="3"),
    lambda d: d["vms"]["web01"]["disks"].append(["vdc", "x", "rwx"]),
    lambda d: d["vms"]["web01"].update(disks="vda"),
    lambda d: d["vm_history"].append(["web01", 1]),
    lambda d: d.update(vm_history={}),
])
def test_a_damaged_vm_index_is_refused(damage) -> None:
    data = copy.deepcopy({**V1, **VMS})
    damage(data)
    with pytest.raises(LedgerStateInvalid):
        LedgerState.from_json(data)


def test_an_empty_ledger_and_a_fresh_init() -> None:
    assert LedgerState.from_json({}).to_json() == {}
    init = {"cluster": "c", "vg": "v", "writer": {"host_id": 1, "name": "h1", "epoch": 1},
            "hosts": {"1": {"name": "h1", "since_epoch": 1}}}
    assert LedgerState.from_json(init).to_json() == init


def test_outcomes_are_recorded_and_the_oldest_forgotten() -> None:
    state = LedgerState.from_json(copy.deepcopy(V1))
    req = RequestInfo("r9", "extend", {"name": "db"})
    state = state.with_outcome("r9", Outcome("ok", "extend", {"name": "db"}, 3), seqno=5)
    assert "r9" not in state.intents and state.requests["r9"].n == 3 and state.vg_seqno == 5
    for i in range(KEEP_OUTCOMES + 5):
        state = state.with_outcome(f"x{i}", Outcome("ok", "create", {}, 3))
    assert len(state.requests) == KEEP_OUTCOMES and "r1" not in state.requests
    assert state.with_intent("new", Intent("create", "a", req)).intents["new"].name == "a"


def test_live_hosts_are_merged_into_the_table_once() -> None:
    state = LedgerState.from_json(copy.deepcopy(V1))
    assert merge_hosts(state, [(1, "h1"), (2, "h2")], 3) is None
    merged = merge_hosts(state, [(3, "h3")], 3)
    assert merged is not None and merged.hosts[3] == HostEntry("h3", 3)
    assert merged.to_json()["hosts"]["3"] == {"name": "h3", "since_epoch": 3}


@pytest.mark.parametrize("bad", [
    [], "x", {"hosts": []}, {"hosts": {"one": {"name": "h"}}}, {"hosts": {"1": {"name": 5}}},
    {"writer": {"host_id": "1", "name": "h", "epoch": 1}}, {"requests": {"r": {"status": "?"}}},
    {"requests": {"r": []}}, {"request_counter": "3"}, {"vg_seqno": True},
    {"handover": {"to_id": 2}},
])
def test_a_malformed_state_is_refused_as_an_integrity_error(bad: object) -> None:
    with pytest.raises(LedgerStateInvalid):
        LedgerState.from_json(bad)


def test_an_intent_that_does_not_read_is_kept_aside_not_lost() -> None:
    data = {**V1, "intents": {"ok": V1["intents"]["r9"], "bad": {"op": 7}}}  # type: ignore[dict-item]
    state = LedgerState.from_json(data)
    assert list(state.intents) == ["ok"] and state.unreadable == {"bad": {"op": 7}}
    assert state.to_json()["intents"]["bad"] == {"op": 7}
    closed = state.with_outcome("bad", Outcome("error", "?", {}, 3))
    assert "bad" not in closed.to_json()["intents"]


def test_random_damage_never_escapes_as_another_exception() -> None:
    """Whatever JSON the slot holds, reading it gives a state or LedgerStateInvalid."""
    rnd = random.Random(7)
    text = json.dumps(V1)
    for _ in range(2000):
        pos = rnd.randrange(len(text))
        mutated = text[:pos] + rnd.choice('{}[]":,0a1 ') + text[pos + 1:]
        try:
            data = json.loads(mutated)
        except ValueError:
            continue
        with contextlib.suppress(LedgerStateInvalid):
            LedgerState.from_json(data)
