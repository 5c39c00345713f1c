"""The writer's journal engine and reconcile, on a real control area (memory and O_DIRECT).

LVM is an in-memory VG (tests/unit/harness.py); the ledger, the audit ring
and the leases are the real code. A writer "dies" at a named crash point by
raising out of the engine, and a second writer at a higher epoch reconciles.
The lab tests (tests/integration/test_volumes.py) run the same paths on LVM.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from fenceless.blockio import SECTOR, BlockDevice
from fenceless.errors import LeaseLost, UserError, from_wire
from fenceless.lease.paxos import Leader, encode_leader
from fenceless.ledger import audit
from fenceless.ledger.state import Intent, LedgerState, RequestInfo
from fenceless.ondisk.layout import Layout
from fenceless.ondisk.record import pad
from fenceless.ops import journal as journal_mod
from fenceless.ops.activation import ActivationOp, HeldElsewhere
from fenceless.ops.claims import claims_of_others
from fenceless.ops.journal import Journal, ReusedRequestId, claims
from fenceless.ops.volume import REQ_TAG_PREFIX
from fenceless.ops.writer import become_writer
from tests.unit.harness import FakeVg, Host, writer_and_reader

LAYOUT = Layout.compute(4)
GiB = 1 << 30


class Died(BaseException):
    """The writer process died here (a crash point)."""


@pytest.fixture
def cluster(dev: BlockDevice) -> Iterator[tuple[FakeVg, Host, Host]]:
    """h1, the writer at epoch 1, and h2, a reader that may take over; one VG."""
    _clock, vg, h1, h2 = writer_and_reader(dev)
    yield vg, h1, h2


def ask(rid: str, op: str, **args: object) -> RequestInfo:
    return RequestInfo(rid, op, args, "alice", ("fenceless", "volume", op))


def die_at(monkeypatch: pytest.MonkeyPatch, point: str) -> None:
    def crashpoint(name: str) -> None:
        if name == point:
            raise Died(name)
    monkeypatch.setattr(journal_mod, "crashpoint", crashpoint)


def take_over(dead: Host, h: Host) -> None:
    """``dead``'s host lease is gone; ``h`` wins the writer lease at the next epoch."""
    assert dead.keeper.lease is not None
    dead.keeper.lease.release()
    dead.keeper.lease = None
    assert become_writer(h.port, "takeover").won


def state(h: Host) -> LedgerState:
    return h.port.ledger(fresh=True)


def audit_results(h: Host) -> list[tuple[str, str]]:
    area = h.keeper.area
    assert area is not None
    return [(e.record.request_id, e.record.result)
            for e in audit.read_log(area.dev, area.layout) if e.record is not None]


def test_a_create_is_journaled_applied_recorded_and_audited(cluster):
    vg, h1, _h2 = cluster
    out = Journal(h1.port).process("h3", ask("r1", "create", name="web", size_bytes=GiB))
    assert out.ok and out.result["name"] == "web" and out.result["epoch"] == 1
    assert REQ_TAG_PREFIX + "r1" in vg.lvs["web"].tags
    st = state(h1)
    assert st.intents == {} and st.requests["r1"].ok and st.vg_seqno == vg.seqno
    assert audit_results(h1) == [("r1", "ok")]
    assert h1.noted == [("r1", vg.seqno)]


def test_a_retry_is_answered_from_the_record_and_applied_once(cluster):
    vg, h1, _h2 = cluster
    j = Journal(h1.port)
    first = j.process("h3", ask("r1", "create", name="web", size_bytes=GiB))
    again = j.process("h3", ask("r1", "create", name="web", size_bytes=GiB))
    assert again.result == first.result
    assert [c[0] for c in vg.commands] == ["lvcreate"]


def test_an_id_reused_for_another_operation_is_refused(cluster):
    vg, h1, _h2 = cluster
    j = Journal(h1.port)
    j.process("h3", ask("r1", "create", name="web", size_bytes=GiB))
    out = j.process("h3", ask("r1", "remove", name="web"))
    assert not out.ok and "already used for `create`" in out.error["message"]
    assert "web" in vg.lvs
    # The outcome names the class and its fields: the requester raises the same refusal.
    assert out.error["kind"] == "ReusedRequestId" and out.error["fields"]["op"] == "create"
    again = from_wire(out.error)
    assert isinstance(again, ReusedRequestId) and str(again) == out.error["message"]


@pytest.mark.parametrize(("request_", "message"), [
    (ask("r", "create", name="db", size_bytes=GiB), "already exists"),
    (ask("r", "create", name="big", size_bytes=64 * GiB), "free"),
    (ask("r", "extend", name="nope", size_bytes=GiB), "not found"),
    (ask("r", "extend", name="db", size_bytes=GiB // 2), "only grows"),
    (ask("r", "remove", name="fenceless-ctl"), "control area"),
    (ask("r", "create", name="bad name", size_bytes=GiB), "Invalid volume name"),
    (ask("r", "frobnicate", name="db"), "unknown volume operation"),
    (ask("bad id!", "remove", name="db"), "Invalid request id"),
])
def test_refusals_journal_nothing_and_change_nothing(cluster, request_, message):
    vg, h1, _h2 = cluster
    Journal(h1.port).process("h1", ask("setup", "create", name="db", size_bytes=GiB))
    before = (dict(vg.lvs), vg.seqno, state(h1).requests.keys())
    out = Journal(h1.port).process("h3", request_)
    assert not out.ok and message in out.error["message"]
    assert (dict(vg.lvs), vg.seqno, state(h1).requests.keys()) == before
    assert state(h1).intents == {}


def test_a_volume_another_host_has_active_is_not_removed(cluster):
    vg, h1, h2 = cluster
    j = Journal(h1.port)
    j.process("h1", ask("c", "create", name="db", size_bytes=GiB))
    h2.port.claim("db")  # h2's claim is on the disk now
    out = j.process("h3", ask("r", "remove", name="db"))
    assert not out.ok and "active on h2" in out.error["message"]
    assert "db" in vg.lvs


@pytest.mark.parametrize("point", ["volume.create.journaled", "volume.create.applied"])
def test_a_new_writer_finishes_what_a_dead_one_journaled(cluster, monkeypatch, point):
    vg, h1, h2 = cluster
    die_at(monkeypatch, point)
    with pytest.raises(Died):
        Journal(h1.port).process("h3", ask("r1", "create", name="web", size_bytes=GiB))
    assert list(state(h1).intents) == ["r1"]
    monkeypatch.setattr(journal_mod, "crashpoint", lambda name: None)
    take_over(h1, h2)
    Journal(h2.port).reconcile()
    st = state(h2)
    assert st.intents == {} and st.requests["r1"].ok and st.requests["r1"].epoch == 2
    assert [c[0] for c in vg.commands] == ["lvcreate"]  # never twice
    assert "web" in vg.lvs


def test_a_relative_extend_is_never_applied_twice(cluster, monkeypatch):
    """The intent holds the absolute size "+1G" led to; reconcile does not plan again."""
    vg, h1, h2 = cluster
    j = Journal(h1.port)
    j.process("h1", ask("c", "create", name="db", size_bytes=GiB))
    die_at(monkeypatch, "volume.extend.applied")
    with pytest.raises(Died):
        j.process("h3", ask("x", "extend", name="db", size_bytes=GiB, relative=True))
    monkeypatch.setattr(journal_mod, "crashpoint", lambda name: None)
    take_over(h1, h2)
    Journal(h2.port).reconcile()
    assert vg.lvs["db"].size == 2 * GiB
    assert state(h2).requests["x"].result["size_bytes"] == 2 * GiB


def test_an_intent_the_vg_no_longer_allows_is_failed(cluster):
    vg, h1, h2 = cluster
    Journal(h1.port).process("h1", ask("c", "create", name="db", size_bytes=GiB))
    uuid = vg.lvs["db"].uuid
    # A journaled rename whose LV was meanwhile removed by other means.
    intent = Intent("rename", "db", ask("gone", "rename", name="db", new_name="db2"),
                    host="h3", epoch=1, uuid=uuid, name_after="db2")
    h1.port.write_ledger(state(h1).with_intent("gone", intent))
    del vg.lvs["db"]
    take_over(h1, h2)
    Journal(h2.port).reconcile()
    out = state(h2).requests["gone"]
    assert not out.ok and "interrupted when its writer died" in out.error["message"]


def test_an_intent_that_does_not_read_back_is_failed_not_ignored(cluster):
    _vg, h1, h2 = cluster
    bad = {**state(h1).to_json(), "intents": {"weird": {"op": 7}}}
    area = h1.keeper.area
    assert area is not None
    from fenceless.ledger.slots import write_ledger
    write_ledger(area.dev, area.layout, 1, bad, writer_host_id=1)
    take_over(h1, h2)
    Journal(h2.port).reconcile()
    st = state(h2)
    assert st.unreadable == {} and not st.requests["weird"].ok
    # Recorded in the ledger with its kind and fields, read back from the disk.
    assert st.requests["weird"].error["kind"] == "UnreadableIntent"
    assert st.requests["weird"].error["fields"] == {"id": "weird"}


def test_an_extend_waits_for_the_hosts_that_have_the_volume_active(cluster):
    vg, h1, h2 = cluster
    j = Journal(h1.port)
    j.process("h1", ask("c", "create", name="db", size_bytes=GiB))
    h2.activator.mapped["db"] = GiB
    h2.port.publish_claims()
    out = j.process("h3", ask("x", "extend", name="db", size_bytes=2 * GiB))
    assert out.ok and out.result["not_refreshed"] == ["h2"]  # h2 never refreshed
    assert vg.lvs["db"].size == 2 * GiB


def test_an_extend_returns_once_the_hosts_show_the_new_size(cluster):
    _vg, h1, h2 = cluster
    j = Journal(h1.port)
    j.process("h1", ask("c", "create", name="db", size_bytes=GiB))
    h2.activator.mapped["db"] = 2 * GiB  # as h2 publishes it once it saw the new seqno
    h2.port.publish_claims()
    out = j.process("h3", ask("x", "extend", name="db", size_bytes=2 * GiB))
    assert out.result["refreshed"] == ["h2"] and out.result["not_refreshed"] == []


# --- what a journaled change must never do (docs/design.md, "Crash points") -------------


def test_reconcile_checks_the_prerequisites_again_before_it_redoes(cluster, monkeypatch):
    """A remove journaled by a writer that died; meanwhile h2 mapped the volume."""
    vg, h1, h2 = cluster
    Journal(h1.port).process("h1", ask("c", "create", name="db", size_bytes=GiB))
    die_at(monkeypatch, "volume.remove.journaled")
    with pytest.raises(Died):
        Journal(h1.port).process("h3", ask("rm", "remove", name="db"))
    monkeypatch.setattr(journal_mod, "crashpoint", lambda name: None)
    h2.port.claim("db")
    take_over(h1, h2)
    Journal(h2.port).reconcile()
    assert "db" in vg.lvs
    out = state(h2).requests["rm"]
    assert not out.ok and "active on h2" in out.error["message"]


def test_a_request_found_journaled_is_finished_not_planned_again(cluster):
    """The writer lost its lease while recording "+1G"; it takes the role back at the same
    epoch and meets the request again in the inbox: it must not extend a second time."""
    vg, h1, _h2 = cluster
    j = Journal(h1.port)
    j.process("h1", ask("c", "create", name="db", size_bytes=GiB))
    real = h1.port.write_ledger
    calls = {"n": 0}

    def fail_second(st, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            raise LeaseLost(detail="renewal late")
        return real(st, **kw)

    h1.port.write_ledger = fail_second  # type: ignore[method-assign]
    grow = ask("x", "extend", name="db", size_bytes=GiB, relative=True)
    with pytest.raises(LeaseLost):
        j.process("h3", grow)  # journaled, applied, not recorded
    h1.port.write_ledger = real  # type: ignore[method-assign]
    out = j.process("h3", grow)
    assert out.ok and vg.lvs["db"].size == 2 * GiB
    assert [c[0] for c in vg.commands].count("lvextend") == 1


def test_a_timed_out_lvm_command_that_committed_is_recorded_as_done(cluster):
    vg, h1, _h2 = cluster
    vg.time_out_after = "lvcreate"
    out = Journal(h1.port).process("h3", ask("r1", "create", name="web", size_bytes=GiB))
    assert out.ok and "web" in vg.lvs
    assert state(h1).requests["r1"].ok


def test_the_leader_is_read_again_right_before_each_lvm_change(cluster):
    vg, h1, _h2 = cluster
    area = h1.keeper.area
    assert area is not None
    dev = area.dev
    leader_at = area.layout.region("writer").offset
    dev.write(leader_at, pad(encode_leader(Leader(2, 1, 9, owner_name="h2")), SECTOR))
    with pytest.raises(LeaseLost):
        Journal(h1.port).process("h3", ask("r1", "create", name="web", size_bytes=GiB))
    assert vg.commands == []


def test_claims_are_read_only_once_the_remove_is_journaled(cluster):
    """Remove against activate: the writer journals, then reads the claims; a host
    claims, then reads the journal. Whatever the interleaving, one of them sees the
    other and backs off."""
    _vg, h1, _h2 = cluster
    j = Journal(h1.port)
    j.process("h1", ask("c", "create", name="db", size_bytes=GiB))
    real = h1.port.hosts_now
    seen: list[list[str]] = []

    def spy():  # type: ignore[no-untyped-def]
        seen.append(sorted(state(h1).intents))
        return real()

    h1.port.hosts_now = spy  # type: ignore[method-assign]
    assert j.process("h3", ask("rm", "remove", name="db")).ok
    assert seen and all(s == ["rm"] for s in seen)


def test_an_activation_backs_off_from_a_journaled_remove(cluster):
    _vg, h1, h2 = cluster
    Journal(h1.port).process("h1", ask("c", "create", name="db", size_bytes=GiB))
    intent = Intent("remove", "db", ask("rm", "remove", name="db"), host="h3", epoch=1,
                    uuid="u", size_bytes=GiB)
    h1.port.write_ledger(state(h1).with_intent("rm", intent))
    with pytest.raises(UserError, match="being removed"):
        ActivationOp(h2.port, "sanvg", "activate", "db").run()
    assert "db" not in h2.activator.mapped and "db" not in claims(h1.port, "db")


def test_a_restore_asked_through_a_mailbox_is_refused(cluster):
    """Only the writer's own admin restores metadata; another host's mailbox cannot."""
    vg, h1, _h2 = cluster
    out = Journal(h1.port).process("h3", ask("r1", "restore", seqno=3))
    assert not out.ok and out.error["kind"] == "LocalOnly"
    assert "run on the writer itself" in out.error["message"]
    assert state(h1).intents == {} and vg.commands == []


def test_only_a_live_migrations_target_maps_a_disk_its_source_holds(cluster):
    """The source's read-write claim gives way for the one VM the writer recorded as
    migrating to this host, and for nothing else."""
    from dataclasses import replace

    from fenceless.ledger.state import VmDisk, VmEntry

    _vg, h1, h2 = cluster
    Journal(h1.port).process("h1", ask("c", "create", name="db", size_bytes=GiB))
    ActivationOp(h1.port, "sanvg", "activate", "db").run()
    web = VmEntry("web", 0, 1, "", (VmDisk("vda", "db", "rw"),), 128, 1, "xml", 1, 0,
                  host="h1", state="running", want="h2", want_live=True)
    h1.port.write_ledger(replace(state(h1), vms={"web": web}))
    with pytest.raises(HeldElsewhere):  # asked for, not begun
        ActivationOp(h2.port, "sanvg", "activate", "db", vm="web").run()
    other = replace(web, name="other", state="migrating", moving_to="h2")
    h1.port.write_ledger(replace(state(h1), vms={"web": web, "other": other}))
    with pytest.raises(HeldElsewhere):  # another VM's migration is no excuse
        ActivationOp(h2.port, "sanvg", "activate", "db", vm="web").run()
    h1.port.write_ledger(replace(state(h1), vms={"web": replace(
        web, state="migrating", moving_to="h2")}))
    with pytest.raises(HeldElsewhere):  # the VM must be named
        ActivationOp(h2.port, "sanvg", "activate", "db").run()
    assert "db" not in h2.activator.mapped
    ActivationOp(h2.port, "sanvg", "activate", "db", vm="web").run()
    assert "db" in h2.activator.mapped


def test_a_refused_activation_keeps_the_claim_of_a_mapping_that_was_there_before(cluster):
    """h2 maps db read-only, h1 too; h2 then asks for it read-write and is refused (h1
    has it). h2's read-only mapping still exists, so its claim must stay published: the
    old code withdrew it, leaving a mapping no other host could see."""
    _vg, h1, h2 = cluster
    Journal(h1.port).process("h1", ask("c", "create", name="db", size_bytes=GiB))
    ActivationOp(h2.port, "sanvg", "activate", "db", readonly=True).run()
    ActivationOp(h1.port, "sanvg", "activate", "db", readonly=True).run()
    with pytest.raises(HeldElsewhere):
        ActivationOp(h2.port, "sanvg", "activate", "db").run()
    assert "db" in h2.activator.mapped
    assert claims_of_others(h1.port, "db", 1) == [("h2", "ro")]


def test_a_ledger_that_does_not_read_back_refuses_with_its_reason(cluster):
    """Both slots damaged: the request is answered with the ledger's own error (exit 4)
    instead of raising (the requester used to wait out its time limit), and nothing is
    written over the damage."""
    from fenceless.ledger.slots import LEDGER_SLOTS

    _vg, h1, _h2 = cluster
    area = h1.port.keeper.area
    assert area is not None
    for name in LEDGER_SLOTS:
        area.dev.write(area.layout.region(name).offset, b"\x5a" * 4096)
    before = [area.dev.read(area.layout.region(n).offset, 4096) for n in LEDGER_SLOTS]
    h1.port.cache = None
    out = Journal(h1.port).process("h3", ask("r1", "create", name="web", size_bytes=GiB))
    assert not out.ok
    assert out.error["kind"] == "LedgerUnreadable" and out.error["code"] == 4
    assert [area.dev.read(area.layout.region(n).offset, 4096) for n in LEDGER_SLOTS] == before
