"""The requester side of the mailboxes, against an in-memory control area."""

from __future__ import annotations

import time
from dataclasses import replace
from types import SimpleNamespace

import pytest

from fenceless import errors
from fenceless.agent.mailbox import Mailboxes, Pending, complete, reply_of
from fenceless.blockio import IoError, MemDevice
from fenceless.clock import FakeClock
from fenceless.errors import CommandFailed, FencelessError, NotFound, RemoteError, UserError
from fenceless.ledger import mailbox as mb
from fenceless.ledger.state import Outcome
from fenceless.localstate import set_member
from fenceless.ondisk.errors import ChecksumMismatch, StaleEpoch
from fenceless.ondisk.layout import Layout
from fenceless.ops.journal import Interrupted, Journal, ReusedRequestId, error_fields
from fenceless.ops.volume import NoSpace, VolumeExists
from tests.unit.harness import FakeVg, host, make_area

LAYOUT = Layout.compute(4)
HOST_ID = 2


class Desk(Mailboxes):
    """The mailboxes of host h2, with its writer role settable by the test."""

    role = SimpleNamespace(epoch=None)


def requester(state_dir: str = "/nonexistent") -> tuple[Desk, MemDevice]:
    """h2's mailboxes over a real control area in memory, h2 holding a real host lease."""
    clock = FakeClock(start=time.monotonic())
    dev = MemDevice(LAYOUT.total_size())
    h2 = host(make_area(dev, clock), clock, "h2", HOST_ID, FakeVg(), state_dir)
    role = SimpleNamespace(epoch=None)
    desk = Desk(h2.keeper, "h2", "sanvg", lambda: role.epoch, Journal(h2.port),
                h2.logs.append)
    desk.role = role
    return desk, dev


def pending(rid: str, size: str = "+8M") -> Pending:
    return Pending(request={"request": {"id": rid, "op": "extend",
                                        "args": {"name": "r", "size": size}}},
                   deadline=1e9)


def fp(size: str = "+8M") -> str:
    return mb.Request("any", "extend", {"name": "r", "size": size}).fingerprint


def inbox_ids(dev: MemDevice) -> list[str]:
    return [r.id for r in mb.read_inbox(dev, LAYOUT, HOST_ID).requests]


def given_up(svc: Desk, rid: str) -> Pending:
    """Submit a request whose CLI then stops waiting (the request stays queued)."""
    item = pending(rid)
    svc.submit(item)
    item.deadline = 0.0
    svc.expire(now=1.0)
    assert item.error is not None
    return item


def writer_replies(dev: MemDevice, *replies: mb.Reply) -> None:
    mb.write_outbox(dev, LAYOUT, HOST_ID, mb.Outbox(seq=1, epoch=1, replies=replies))


def test_a_reply_reaches_the_waiting_request_and_leaves_the_inbox():
    svc, dev = requester()
    item = pending("a")
    svc.submit(item)
    assert inbox_ids(dev) == ["a"]
    writer_replies(dev, mb.Reply("a", "ok", result={"size_bytes": 1}, fp=fp()))
    svc.poll_outbox()
    assert item.done.is_set() and item.result == {"size_bytes": 1}
    assert mb.read_inbox(dev, LAYOUT, HOST_ID).requests == ()


def test_a_retried_id_is_answered_from_a_reply_already_in_the_outbox():
    """The writer answers an id once: it does not rewrite an outbox that holds the reply.

    If the retry reaches the inbox before the writer saw the first try leave it,
    the requester must find the old reply in the (unchanged) outbox.
    """
    svc, dev = requester()
    first = pending("retry-me")
    svc.submit(first)
    writer_replies(dev, mb.Reply("retry-me", "ok", result={"size_bytes": 16}, fp=fp()))
    svc.poll_outbox()
    assert first.done.is_set()
    again = pending("retry-me")
    svc.submit(again)
    svc.poll_outbox()  # the outbox bytes are those already seen
    assert again.done.is_set() and again.result == first.result


def test_a_reply_to_another_operation_under_the_same_id_is_not_taken():
    svc, dev = requester()
    svc.submit(pending("reused", "+8M"))
    writer_replies(dev, mb.Reply("reused", "ok", result={"size_bytes": 16}, fp=fp("+8M")))
    svc.poll_outbox()
    different = pending("reused", "+16M")
    svc.submit(different)
    svc.poll_outbox()
    assert not different.done.is_set()  # the writer must look at it (and refuse it)
    writer_replies(dev, mb.Reply("reused", "error", error={"message": "already used"},
                                 fp=fp("+16M")))
    svc.poll_outbox()
    assert different.done.is_set() and different.error is not None


def test_replies_round_trip_their_fingerprint_and_old_replies_have_none():
    box = mb.Outbox(seq=3, epoch=2, replies=(mb.Reply("x", "ok", fp=fp()), mb.Reply("y", "ok")))
    off = mb.offsets(LAYOUT, HOST_ID)[1]
    got = mb.decode_outbox(mb.encode_outbox(box), off)
    assert got is not None and got.replies == box.replies
    req = mb.Request("x", "extend", {"name": "r", "size": "+8M"})
    assert got.replies[0].answers(req) and not got.replies[0].answers(
        mb.Request("x", "extend", {"name": "r", "size": "+9M"}))
    assert mb.Reply("x", "ok").answers(req)  # written before fingerprints: trusted by id


def test_without_a_lease_a_member_queues_and_a_stranger_is_refused(tmp_path):
    svc, dev = requester(str(tmp_path))
    lease, svc.keeper.lease = svc.keeper.lease, None  # lost, being acquired again
    with pytest.raises(UserError, match="run `fenceless join`"):
        svc.submit(pending("early"))
    set_member(str(tmp_path), "sanvg", {"host_id": HOST_ID, "cluster": "c"})
    item = pending("waits")
    svc.submit(item)
    assert mb.read_inbox(dev, LAYOUT, HOST_ID) is None  # nothing written without a lease
    svc.keeper.lease = lease  # back
    svc.publish_inbox()
    assert inbox_ids(dev) == ["waits"]
    assert not item.done.is_set()


def test_a_host_that_becomes_the_writer_runs_its_own_waiting_requests():
    """Kept in the inbox (on disk too) until each outcome is recorded: nothing is lost
    if the agent dies or the role goes away in between."""
    svc, dev = requester()
    waiting = pending("waiting")
    svc.submit(waiting)
    given_up(svc, "given-up")
    assert not waiting.done.is_set()
    svc.role.epoch = 3
    svc.adopt_own()
    assert [(r.id, item) for _h, r, item in svc.work] == [
        ("waiting", waiting), ("given-up", None)]
    svc.adopt_own()  # a second pass adds nothing twice
    assert len(svc.work) == 2
    on_disk = inbox_ids(dev)
    assert on_disk == ["waiting", "given-up"]
    svc.work.pop(0)
    svc.in_work.discard("waiting")
    svc.forget_own("waiting")  # its outcome is recorded
    assert inbox_ids(dev) == ["given-up"]
    svc.role.epoch = None  # the role is lost with "given-up" still to do
    svc.requeue()
    assert svc.work == [] and svc.in_work == set()
    assert inbox_ids(dev) == ["given-up"]


def test_an_answered_request_leaves_the_inbox_even_if_nobody_waits_for_it():
    svc, dev = requester()
    given_up(svc, "late")
    writer_replies(dev, mb.Reply("late", "ok", result={"size_bytes": 16}, fp=fp()))
    svc.poll_outbox()
    assert mb.read_inbox(dev, LAYOUT, HOST_ID).requests == ()


def test_a_retry_joins_the_queued_request_and_another_operation_is_refused():
    svc, dev = requester()
    given_up(svc, "x")
    with pytest.raises(UserError, match="already queued here for `extend`"):
        svc.submit(pending("x", "+16M"))
    retry = pending("x")
    svc.submit(retry)
    assert inbox_ids(dev) == ["x"]  # no copy
    writer_replies(dev, mb.Reply("x", "ok", result={"size_bytes": 16}, fp=fp()))
    svc.poll_outbox()
    assert retry.done.is_set() and retry.result == {"size_bytes": 16}


def test_an_own_request_that_just_failed_waits_before_it_is_tried_again():
    svc, _dev = requester()
    svc.submit(pending("flaky"))
    svc.role.epoch = 3
    svc.retry_after["flaky"] = time.monotonic() + 60  # as run_work sets it on a failure
    svc.adopt_own()
    assert svc.work == []
    svc.retry_after["flaky"] = time.monotonic() - 1
    svc.adopt_own()
    assert [r.id for _h, r, _i in svc.work] == ["flaky"]


# --- replay and loss ---------------------------------------------------------------------


def test_a_failed_inbox_write_is_written_again_later():
    svc, dev = requester()
    dev.fail_io = True
    item = pending("lost?")
    with pytest.raises(IoError):
        svc.submit(item)
    dev.fail_io = False
    svc.publish_inbox()  # the next pass (nothing new was queued meanwhile)
    assert inbox_ids(dev) == ["lost?"]


def test_the_requester_ignores_an_outbox_older_than_the_writer_lease():
    """An outbox left by an old writer (epoch 1) while the lease is at epoch 2."""
    svc, dev = requester()
    item = pending("a")
    svc.submit(item)
    svc.writer_epoch = lambda: 2  # type: ignore[method-assign]
    writer_replies(dev, mb.Reply("a", "ok", result={"size_bytes": 1}, fp=fp()))  # epoch 1
    svc.poll_outbox()
    assert not item.done.is_set()
    mb.write_outbox(dev, LAYOUT, HOST_ID, mb.Outbox(seq=2, epoch=2, replies=(
        mb.Reply("a", "ok", result={"size_bytes": 2}, fp=fp()),)))
    svc.poll_outbox()
    assert item.done.is_set() and item.result == {"size_bytes": 2}


def test_a_restarted_host_adopts_its_inbox_and_drops_what_was_answered():
    """The old incarnation asked for "done" (answered) and "open" (not yet)."""
    svc, dev = requester()
    svc.submit(pending("done"))
    svc.submit(pending("open"))
    writer_replies(dev, mb.Reply("done", "ok", result={}, fp=fp()))
    # The agent restarts before it read the outbox: a new incarnation, a new desk.
    again, _ = requester()
    again.keeper = svc.keeper
    again.keeper.lease.record = replace(again.keeper.lease.record, generation=2)
    again.adopt_inbox()
    assert sorted(again.own_pending()) == ["open"]
    box = mb.read_inbox(dev, LAYOUT, HOST_ID)
    assert [r.id for r in box.requests] == ["open"] and box.generation == 2


def test_the_writer_ignores_requests_of_a_dead_incarnation():
    """h3 asked as generation 1, then restarted as generation 2 without adopting them."""
    desk, dev = requester()
    desk.role.epoch = 1
    h3 = desk.keeper.area.hosts().acquire(3, "h3", {})
    mb.write_inbox(dev, LAYOUT, 3, mb.Inbox(1, "h3", h3.generation + 5, (
        mb.Request("ghost", "remove", {"name": "db"}),)))
    desk.keeper.observer.observe(desk.keeper.area.hosts().read_area(), desk.clock.now())
    desk.reconciled_epoch = 1
    desk.writer_poll()
    assert desk.work == []
    mb.write_inbox(dev, LAYOUT, 3, mb.Inbox(2, "h3", h3.generation, (
        mb.Request("real", "remove", {"name": "db"}),)))
    desk.last_poll = 0.0
    desk.writer_poll()
    assert [r.id for _h, r, _i in desk.work] == ["real"]


def test_a_lost_role_means_reconcile_again_even_at_the_same_epoch():
    desk, _dev = requester()
    desk.role.epoch = 1
    desk.reconciled_epoch = 1
    desk.role.epoch = None
    desk.requeue()
    assert desk.reconciled_epoch is None


# --- errors in replies ------------------------------------------------------------------

REPLY_ERRORS = [
    VolumeExists(name="web", vg="sanvg", size="1.00 GiB"),
    NoSpace(vg="sanvg", free="1.00 GiB", name="web", need="2.00 GiB"),
    ReusedRequestId(id="r1", op="create", args={"name": "web", "size_bytes": 1 << 30}),
    Interrupted(op="extend", name="db"),
    StaleEpoch(epoch=3, where="ledger slot ledger_a", seen=4),
    ChecksumMismatch(region="ledger_a", offset=4096, stored=1, computed=2),
    CommandFailed(argv0="lvm lvcreate", rc=5, stderr="x" * 900),
]


@pytest.mark.parametrize("exc", REPLY_ERRORS, ids=lambda e: type(e).__name__)
def test_an_error_in_a_reply_is_raised_as_its_class_from_the_outbox(exc: FencelessError):
    """Writer: the outcome's error in an outbox sector; requester: decoded, and raised."""
    req = mb.Request("r1", "create", {"name": "web"})
    outcome = Outcome("error", req.op, req.args, 1, error=error_fields(exc))
    raw = mb.encode_outbox(mb.Outbox(seq=1, epoch=1, replies=(reply_of(req, outcome),)))
    box = mb.decode_outbox(raw, mb.offsets(LAYOUT, HOST_ID)[1])
    assert box is not None
    item = Pending(request={})
    complete(item, box.replies[0])
    got = item.error
    assert type(got) is type(exc) and isinstance(got, FencelessError)
    assert (str(got), got.exit_code) == (str(exc), exc.exit_code)
    assert {k: v for k, v in got.fields.items() if k != "stderr"} == \
        {k: v for k, v in exc.fields.items() if k != "stderr"}


def test_a_long_field_stays_out_of_the_record_but_not_out_of_the_message():
    error = error_fields(REPLY_ERRORS[-1])
    assert "stderr" not in error["fields"] and error["fields"]["rc"] == 5
    assert "x" * 900 in error["message"] and "module" not in error


def test_replies_of_older_writers_still_raise_with_their_message():
    """Before errors carried fields: message, code and kind only (or less)."""
    for error, cls, code in [
        ({"message": "not found", "code": 2, "kind": "NotFound"}, NotFound, 2),
        ({"message": "from elsewhere", "code": 4, "kind": "SomethingNewer"}, RemoteError, 4),
        ({"message": "already used"}, RemoteError, 3),
        ({"message": 5, "code": "x", "kind": ["no"], "fields": "no"}, RemoteError, 3),
    ]:
        item = Pending(request={})
        complete(item, mb.Reply("r", "error", error=error))
        assert type(item.error) is cls and isinstance(item.error, FencelessError)
        assert item.error.exit_code == code
        if isinstance(error["message"], str):
            assert str(item.error) == error["message"]


def test_a_kind_read_from_the_disk_imports_nothing(monkeypatch: pytest.MonkeyPatch):
    def no_import(name: str) -> None:
        raise AssertionError(f"imported {name} by a name read from the disk")

    monkeypatch.setattr(errors.importlib, "import_module", no_import)
    item = Pending(request={})
    complete(item, mb.Reply("r", "error", error={
        "kind": "Unheard", "module": "fenceless.not_loaded", "message": "m", "code": 2}))
    assert isinstance(item.error, RemoteError) and item.error.exit_code == 2
