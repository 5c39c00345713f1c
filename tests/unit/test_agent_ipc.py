"""The agent's socket carries errors as a kind plus fields: the client raises the same class.

A real ``Server`` on a Unix socket in a temporary directory, in this process;
its handler raises whatever the request names, and ``call`` must raise an
error of the same class, with the same fields, message and exit code.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from fenceless.agent.ipc import AgentUnavailable, Server, call
from fenceless.agent.mailbox import NoAnswer
from fenceless.errors import (
    CommandTimeout,
    ExecError,
    FencelessError,
    IntegrityError,
    LeaseLost,
    RemoteError,
    UserError,
)
from fenceless.lease.errors import HostLeaseLost
from fenceless.ondisk.errors import ChecksumMismatch
from fenceless.ops.journal import ReusedRequestId
from fenceless.ops.volume import VolumeExists

ERRORS: dict[str, Callable[[], BaseException]] = {
    "exists": lambda: VolumeExists(name="web", vg="sanvg", size="1.00 GiB"),
    "lease": lambda: HostLeaseLost(host_id=3, detail="renewal failed"),
    "crc": lambda: ChecksumMismatch(region="ledger_a", offset=4096, stored=1, computed=2),
    "answer": lambda: NoAnswer(id="r1"),
    "timeout": lambda: CommandTimeout(argv0="lvm lvcreate", timeout=2.5),
    "reused": lambda: ReusedRequestId(id="r2", op="create", args=("a", 1)),
    "relayed": lambda: RemoteError(message="from a newer writer", code=4, kind="Newer"),
    "bug": lambda: ValueError("a bug in the agent"),
}


@pytest.fixture
def state_dir() -> Iterator[str]:
    """A short path: a Unix socket's path has at most 107 bytes."""
    with tempfile.TemporaryDirectory(prefix="fl-ipc-") as d:
        server = Server(d, handler)
        server.start()
        try:
            yield d
        finally:
            server.close()


def handler(request: dict[str, Any]) -> dict[str, Any]:
    if request.get("raise"):
        raise ERRORS[request["raise"]]()
    return {"echo": request}


def raised(state_dir: str, name: str) -> FencelessError:
    with pytest.raises(FencelessError) as info:
        call(state_dir, {"raise": name}, timeout=5)
    return info.value


@pytest.mark.parametrize("name", [n for n in ERRORS if n not in ("relayed", "bug")])
def test_an_error_comes_back_as_its_own_class(state_dir: str, name: str) -> None:
    sent = ERRORS[name]()
    assert isinstance(sent, FencelessError)
    got = raised(state_dir, name)
    assert type(got) is type(sent)
    assert (str(got), got.exit_code) == (str(sent), sent.exit_code)
    assert set(got.fields) == set(sent.fields)


def test_the_caller_tells_a_refusal_from_a_lost_lease(state_dir: str) -> None:
    exists = raised(state_dir, "exists")
    assert isinstance(exists, UserError) and exists.fields["name"] == "web"
    assert isinstance(raised(state_dir, "lease"), LeaseLost)
    assert isinstance(raised(state_dir, "crc"), IntegrityError)
    assert isinstance(raised(state_dir, "answer"), ExecError)
    assert raised(state_dir, "crc").fields["stored"] == 1


def test_fields_arrive_json_safe_with_the_senders_message(state_dir: str) -> None:
    got = raised(state_dir, "reused")
    assert got.fields["args"] == ["a", 1]
    assert "('a', 1)" in str(got)  # the tuple as the agent printed it


def test_an_error_the_agent_relayed_keeps_its_kind_and_code(state_dir: str) -> None:
    got = raised(state_dir, "relayed")
    assert isinstance(got, RemoteError)
    assert (str(got), got.exit_code, got.fields["kind"]) == ("from a newer writer", 4, "Newer")


def test_a_bug_in_the_agent_is_exit_code_1(state_dir: str) -> None:
    got = raised(state_dir, "bug")
    assert isinstance(got, RemoteError) and got.exit_code == 1
    assert "agent internal error: ValueError: a bug in the agent" in str(got)


def test_results_and_a_missing_agent(state_dir: str) -> None:
    assert call(state_dir, {"op": "x"}, timeout=5) == {"echo": {"op": "x"}}
    with tempfile.TemporaryDirectory(prefix="fl-ipc-") as empty, \
            pytest.raises(AgentUnavailable):
        call(empty, {"op": "x"}, timeout=5)


def test_a_message_over_the_limit_is_refused_in_either_direction(state_dir: str) -> None:
    import json

    from fenceless.agent.ipc import MAX_MESSAGE, MessageTooLarge

    request = {"op": "x", "pad": ""}
    request["pad"] = "x" * (MAX_MESSAGE - len(json.dumps(request)))  # exactly the limit
    with pytest.raises(MessageTooLarge, match="over 1048576 bytes \\(the reply\\)"):
        call(state_dir, request, timeout=5)  # echoed back, with the reply's wrapping
    # the agent refuses a request that large the same way, by name
    with pytest.raises(MessageTooLarge, match="a request"):
        call(state_dir, {"op": "x", "pad": "x" * (MAX_MESSAGE + 1)}, timeout=5)
