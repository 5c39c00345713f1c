"""ops.requests: building volume requests, and waiting for a handover to finish."""

from __future__ import annotations

import re

import pytest

from fenceless.clock import FakeClock
from fenceless.errors import ExecError, InvalidName, InvalidSize, UserError
from fenceless.ops.requests import finish_handover, new_request_id, volume_request
from fenceless.validate import request_id


def fixed(value: str):
    return lambda: value


def never(what: str):
    def call():
        pytest.fail(f"{what} must not be called")

    return call


# --- volume_request -------------------------------------------------------------------


def test_create_request():
    req = volume_request("create", "vm7-disk", size="20G", shared_ro=True,
                         user=fixed("alice"), new_id=fixed("0123456789abcdef"))
    assert req == {
        "id": "0123456789abcdef", "op": "create",
        "args": {"name": "vm7-disk", "size_bytes": 20 << 30, "shared_ro": True},
        "user": "alice", "argv": ["fenceless", "volume", "create", "vm7-disk", "20G"],
    }


def test_extend_by_and_to_a_size():
    grow = volume_request("extend", "v", size="+5G", user=fixed("u"), new_id=fixed("i"))
    assert grow["args"] == {"name": "v", "size_bytes": 5 << 30, "relative": True}
    to = volume_request("extend", "v", size=" 10G ", user=fixed("u"), new_id=fixed("i"))
    assert to["args"] == {"name": "v", "size_bytes": 10 << 30, "relative": False}
    # The audit log records the command line as typed, not the cleaned-up size.
    assert to["argv"] == ["fenceless", "volume", "extend", "v", " 10G "]


def test_rename_and_remove():
    ren = volume_request("rename", "a", new_name="b", user=fixed("u"), new_id=fixed("i"))
    assert ren["args"] == {"name": "a", "new_name": "b"}
    assert ren["argv"] == ["fenceless", "volume", "rename", "a", "b"]
    rm = volume_request("remove", "a", user=fixed("u"), new_id=fixed("i"))
    assert rm["args"] == {"name": "a"}
    assert rm["argv"] == ["fenceless", "volume", "remove", "a"]


def test_an_own_request_id_is_checked_and_used():
    req = volume_request("remove", "a", rid="retry-7", user=fixed("u"),
                         new_id=never("new_id"))
    assert req["id"] == "retry-7"
    with pytest.raises(InvalidName, match="Invalid request id"):
        volume_request("remove", "a", rid="no spaces", user=fixed("u"), new_id=fixed("i"))


@pytest.mark.parametrize(("op", "kwargs", "error", "text"), [
    ("create", {"size": "1G"}, InvalidName, "Invalid volume name 'bad name'"),
    ("create", {"size": "lots"}, InvalidSize, "Invalid size 'lots'"),
    ("create", {"size": "5"}, InvalidSize, "a unit is required"),
    ("extend", {"size": "+zz"}, InvalidSize, "Invalid size 'zz'"),
    ("rename", {"new_name": "x_tmeta"}, InvalidName, "reserves names containing '_tmeta'"),
])
def test_bad_input_is_refused_before_anyone_is_asked(op, kwargs, error, text):
    name = "bad name" if error is InvalidName and "new_name" not in kwargs else "ok"
    with pytest.raises(error, match=re.escape(text)) as exc:
        volume_request(op, name, **kwargs, rid="bad id!", user=never("user"),
                       new_id=never("new_id"))
    assert exc.value.exit_code == 2


def test_the_volume_name_is_reported_before_a_bad_request_id():
    with pytest.raises(InvalidName, match="volume name"):
        volume_request("remove", "-x", rid="bad id!", user=fixed("u"))


def test_unknown_operation_and_missing_size():
    with pytest.raises(UserError, match="unknown volume operation 'shrink'"):
        volume_request("shrink", "a", size="1G", user=fixed("u"), new_id=fixed("i"))
    with pytest.raises(UserError, match="needs a size"):
        volume_request("create", "a", user=fixed("u"), new_id=fixed("i"))


def test_new_request_ids_are_valid_and_differ():
    ids = {new_request_id() for _ in range(50)}
    assert len(ids) == 50
    for rid in ids:
        assert re.fullmatch(r"[0-9a-f]{16}", rid)
        assert request_id(rid) == rid


# --- finish_handover --------------------------------------------------------------------


def status_with(writer):
    return {"writer": writer, "hosts": [], "vg": "sanvg"}


def writer(host, epoch, *, released=False):
    return {"host": host, "id": 2, "epoch": epoch, "released": released, "state": "active"}


class Reads:
    """read_status that answers from a script, one status per call (the last one repeats)."""

    def __init__(self, *writers):
        self.writers = list(writers)
        self.calls = 0

    def __call__(self):
        w = self.writers[min(self.calls, len(self.writers) - 1)]
        self.calls += 1
        return status_with(w)


def test_already_the_writer_is_the_outcome_without_waiting():
    reply = {"outcome": "already", "host": "h2", "epoch": 4}
    clock = FakeClock()
    got = finish_handover(reply, "h2", never("read_status"), timeout=5, interval=0.5,
                          clock=clock)
    assert got is reply
    assert clock.slept == []


def test_waits_until_the_named_host_holds_the_role_at_a_higher_epoch():
    reads = Reads(writer("h1", 3),                 # the old writer is still finishing
                  writer("h1", 3, released=True),  # it released
                  writer("h2", 3),                 # h2 at the old epoch: not yet
                  writer("h2", 4, released=True),  # released: not a finished handover
                  None,                            # no writer for a moment
                  writer("h2", 4))
    clock = FakeClock()
    got = finish_handover({"outcome": "started", "from_epoch": 3}, "h2", reads,
                          timeout=10, interval=0.5, clock=clock)
    assert got == {"outcome": "done", "host": "h2", "epoch": 4}
    assert reads.calls == 6
    assert clock.slept == [0.5] * 5


def test_without_from_epoch_any_epoch_counts():
    got = finish_handover({}, "h3", Reads(writer("h3", 1)), timeout=1, interval=0.1,
                          clock=FakeClock())
    assert got == {"outcome": "done", "host": "h3", "epoch": 1}


def test_gives_up_after_the_timeout_with_an_exec_error():
    reads = Reads(writer("h1", 3))
    clock = FakeClock(start=1000.0)
    with pytest.raises(ExecError) as exc:
        finish_handover({"from_epoch": 3}, "h2", reads, timeout=1.0, interval=0.25,
                        clock=clock)
    assert exc.value.exit_code == 3
    assert str(exc.value) == (
        "handover to h2 requested, but h2 did not become the writer within 1s (writer now: "
        f"{writer('h1', 3)})")
    # Reads at 0, .25, .5, .75 and 1.0 s are within the time; the one at 1.25 s is the last.
    assert reads.calls == 6
    assert clock.now() == pytest.approx(1001.25)


def test_a_failing_read_is_not_swallowed():
    def broken():
        raise ExecError(detail="I/O error on /dev/sdx")

    with pytest.raises(ExecError, match="I/O error"):
        finish_handover({"from_epoch": 1}, "h2", broken, timeout=5, interval=1,
                        clock=FakeClock())
