"""ops/hostops.py: maintenance in the ledger's host table, what it refuses, and when a
host may be forgotten."""

from __future__ import annotations

from dataclasses import replace

import pytest

from fenceless.ledger.state import HostEntry, LedgerState, RequestInfo, VmDisk, VmEntry
from fenceless.ops import hostops, vm

STATE = LedgerState(hosts={1: HostEntry("h1", 1), 2: HostEntry("h2", 1), 3: HostEntry("h3", 1)})


def ask(op: str, host: str, on: bool | None = None) -> RequestInfo:
    args: dict[str, object] = {"host": host}
    if on is not None:
        args["on"] = on
    return RequestInfo("r1", op, args, "alice", ("fenceless", "host"))


def change(state, req, lease="dead", mapped=()):
    return hostops.change(state, req, 4, lambda _n: lease, lambda _n: list(mapped))


def test_maintenance_goes_on_and_off_and_survives_the_ledger():
    on, result = change(STATE, ask("host-maintenance", "h2", True))
    assert result == {"host": "h2", "maintenance": True, "epoch": 4, "cancelled": []}
    again = LedgerState.from_json(on.to_json())
    assert again.in_maintenance("h2") and not again.in_maintenance("h3")
    off, _ = change(again, ask("host-maintenance", "h2", False))
    assert not off.in_maintenance("h2")
    assert "maintenance" not in off.to_json()["hosts"]["2"]  # as an older fenceless wrote it


def test_an_unknown_or_bad_host_is_refused():
    with pytest.raises(hostops.UnknownHost, match="hosts: h1, h2, h3"):
        change(STATE, ask("host-maintenance", "h9", True))
    with pytest.raises(Exception, match="not a host name"):
        change(STATE, ask("host-maintenance", "../h1", True))


def vm_on(host: str | None) -> VmEntry:
    return VmEntry(name="web", slot=1, seq=1, sha="0" * 64, disks=(VmDisk("vda", "d", "rw"),),
                   memory_mib=64, vcpus=1, source="xml", epoch=1, changed_ms=0, host=host,
                   state="running" if host else "stopped")


def test_nothing_is_started_or_moved_to_a_host_in_maintenance():
    state, _ = change(STATE, ask("host-maintenance", "h2", True))
    state = replace(state, vms={"web": vm_on(None)})
    for action in ("start", "want", "recover"):
        with pytest.raises(hostops.HostInMaintenance, match="h2 is in maintenance"):
            vm.place(state, "web", state.vms["web"], {"host": "h2", "action": action}, 4,
                     None, 0)  # type: ignore[arg-type]  (refused before the store is asked)


@pytest.mark.parametrize(("state_of", "lease", "mapped", "why"), [
    ("active", "dead", (), "not in maintenance"),
    ("vm", "dead", (), "VMs web are placed there"),
    ("drained", "live", (), "its lease is live"),
    ("drained", "free", ("d",), "it maps d"),
])
def test_a_host_is_forgotten_only_once_nothing_can_be_its(state_of, lease, mapped, why):
    state = STATE if state_of == "active" else change(STATE, ask("host-maintenance", "h2",
                                                                True))[0]
    if state_of == "vm":
        state = replace(state, vms={"web": vm_on("h2")})
    with pytest.raises(hostops.HostStillInUse, match=why):
        change(state, ask("host-forget", "h2"), lease, mapped)


def test_a_drained_stopped_host_is_forgotten():
    state, _ = change(STATE, ask("host-maintenance", "h2", True))
    gone, result = change(state, ask("host-forget", "h2"), "free")
    assert result == {"host": "h2", "removed": True, "host_id": 2, "epoch": 4}
    assert gone.host_id("h2") is None and set(gone.host_names().values()) == {"h1", "h3"}


def test_a_live_migration_to_a_host_in_maintenance_does_not_begin():
    state, _ = change(STATE, ask("host-maintenance", "h3", True))
    state = replace(state, vms={"web": vm_on("h2")})
    with pytest.raises(hostops.HostInMaintenance):
        vm.place(state, "web", state.vms["web"], {"host": "h3", "action": "migrate-begin"},
                 4, None, 0)  # type: ignore[arg-type]


def test_maintenance_withdraws_what_was_asked_of_the_host_before():
    """A start or move to the host asked for before its drain would wait there forever
    (every placement there is refused now): it is withdrawn, with the reason. A live
    migration already under way to it finishes (the drain waits, then moves it on)."""
    wanted = replace(vm_on(None), name="db", want="h2", want_live=False)
    coming = replace(vm_on("h1"), name="app", state="migrating", moving_to="h2", want="h2",
                     want_live=True)
    other = replace(vm_on(None), name="web", want="h3")
    state = replace(STATE, vms={"db": wanted, "app": coming, "web": other})
    on, result = change(state, ask("host-maintenance", "h2", True))
    assert result["cancelled"] == ["db"]
    db = on.vms["db"]
    assert (db.want, db.error) == (None, "not started or moved to h2: it went into maintenance")
    assert on.vms["app"] == coming and on.vms["web"] == other
    _off, result = change(on, ask("host-maintenance", "h2", False))
    assert result["cancelled"] == []


def test_a_drain_waits_for_a_live_migration_to_the_host_then_moves_the_vm_on(monkeypatch):
    import argparse

    from fenceless.cli import host_cmd
    from fenceless.ops import vmlife, vmquery

    looks = iter([[{"name": "app", "host": "h1", "moving_to": "h2"}],
                  [{"name": "app", "host": "h1", "moving_to": "h2"}],
                  [{"name": "app", "host": "h2", "moving_to": None}]])
    last: list[list[dict[str, object]]] = []

    def vm_list(_cfg: object, _vg: object) -> list[dict[str, object]]:
        last[:] = [next(looks, last[0] if last else [])]
        return last[0]

    asked: list[tuple[str, str]] = []
    monkeypatch.setattr(vmquery, "vm_list", vm_list)
    monkeypatch.setattr(host_cmd, "ARRIVAL_POLL", 0.01)
    monkeypatch.setattr(host_cmd, "_target", lambda *a: "h3")
    monkeypatch.setattr(vmlife, "ask_move", lambda cfg, vg, name, to, call, **kw:
                        asked.append((name, to)))
    args = argparse.Namespace(vg=None, timeout=5.0, force=False, json=True)
    moved = host_cmd.drain(object(), args, "h2")
    assert asked == [("app", "h3")] and moved == [{"name": "app", "to": "h3", "live": True}]
    # One that does not arrive in time is named in the error, and not moved.
    looks = iter([])
    last[:] = [[{"name": "app", "host": "h1", "moving_to": "h2"}]]
    with pytest.raises(host_cmd.DrainIncomplete, match=r"app's live migration to h2 did not "
                       r"finish within 0\.05s"):
        host_cmd.drain(object(), argparse.Namespace(vg=None, timeout=0.05, force=False,
                                                    json=True), "h2")
