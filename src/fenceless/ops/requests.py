"""The requests a client makes of the agent, and what a client does with the replies.

Two things the CLI used to work out itself, and anything else that talks to
the agent (a hypervisor hook, a script) has to work out the same way:

- ``volume_request``: the request a volume change is sent as. It checks the
  admin's input before anything is sent (a refusal here changes nothing), and
  it records who asked and with which command line, for the audit log.
- ``finish_handover``: the agent only *starts* a planned handover (the old
  writer finishes and releases); the caller waits until the named host holds
  the writer lease at a higher epoch, reading the control area as ``status``
  does.

Light on purpose: the CLI imports this module on the way to the agent, so it
imports no LVM, device or control-area code; what it reads, it is given.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from fenceless.errors import ExecError, UserError
from fenceless.validate import lv_name, parse_size, request_id

if TYPE_CHECKING:
    from fenceless.clock import Clock

VOLUME_OPS = ("create", "extend", "rename", "remove")


class UnknownVolumeOp(UserError):
    """unknown volume operation {op!r}"""


class MissingArgument(UserError):
    """a volume operation of this kind needs a {what}"""


class HandoverNotFinished(ExecError):
    """handover to {to} requested, but {to} did not become the writer within \
{timeout:.0f}s (writer now: {writer})"""


def new_request_id() -> str:
    """A fresh request id: 64 random bits as 16 hex digits.

    os.urandom is what ``secrets`` uses, without its 4 ms of imports (hmac, random).
    """
    return os.urandom(8).hex()


def current_user() -> str:
    """Who asked, for the audit log (the login name, as ``getpass`` finds it)."""
    import getpass  # only a volume change needs it; not every handover or status

    return getpass.getuser()


def volume_request(op: str, name: str, *, size: str | None = None, new_name: str | None = None,
                   shared_ro: bool = False, rid: str | None = None,
                   user: Callable[[], str] = current_user,
                   new_id: Callable[[], str] = new_request_id) -> dict[str, Any]:
    """The request for one volume change, as the writer's agent takes it from a mailbox.

    ``size`` is the admin's text (``10G``; for ``extend`` also ``+2G``, growth
    rather than a new size); ``rid`` an id of the admin's own, to retry safely
    (else ``new_id()`` makes one). The checks run in the order the admin's
    arguments come, and ``user()`` is asked last, so a bad argument is always
    what is reported. ``argv`` is the command line as typed, for the audit log.
    """
    if op not in VOLUME_OPS:
        raise UnknownVolumeOp(op=op)
    body: dict[str, Any] = {"name": lv_name(name)}
    if op == "create":
        body.update(size_bytes=parse_size(_required(size, "size")), shared_ro=shared_ro)
    elif op == "extend":
        text = _required(size, "size").strip()
        body.update(size_bytes=parse_size(text.lstrip("+")), relative=text.startswith("+"))
    elif op == "rename":
        body["new_name"] = lv_name(_required(new_name, "new name"))
    argv = ["fenceless", "volume", op, name] + (
        [_required(size, "size")] if op in ("create", "extend") else []) + (
        [_required(new_name, "new name")] if op == "rename" else [])
    return {"id": request_id(rid) if rid else new_id(), "op": op, "args": body,
            "user": user(), "argv": argv}


def vm_request(op: str, name: str, *, xml: str | None = None, replace: bool = False,
               source: str = "xml", host: str | None = None, action: str | None = None,
               rid: str | None = None,
               user: Callable[[], str] = current_user,
               new_id: Callable[[], str] = new_request_id) -> dict[str, Any]:
    """The request for one VM definition change (``op``: vm-define or vm-undefine).

    ``xml`` travels to the local agent only: it uploads it to this host's slot on
    the LUN and sends the writer its digest (``agent/vg.py``, ``stage_vm``).
    """
    args: dict[str, Any] = {"name": name}
    argv = ["fenceless", "vm", "undefine" if op == "vm-undefine" else action or
            ("edit" if replace else "import" if source == "xl" else "define"), name]
    if op == "vm-define":
        args.update(xml=xml, replace=replace, source=source)
    elif op == "vm-place":
        args.update(host=host, action=action)
    return {"id": request_id(rid) if rid else new_id(), "op": op, "args": args,
            "user": user(), "argv": argv}


def host_request(op: str, host: str, *, on: bool | None = None,
                 user: Callable[[], str] = current_user,
                 new_id: Callable[[], str] = new_request_id) -> dict[str, Any]:
    """The request for a host's maintenance (``op`` host-maintenance, ``on``) or its
    removal from the cluster (host-forget)."""
    args: dict[str, Any] = {"host": host}
    if on is not None:
        args["on"] = on
    word = {"host-forget": "remove"}.get(op, "drain" if on else "resume")
    return {"id": new_id(), "op": op, "args": args, "user": user(),
            "argv": ["fenceless", "host", word, host]}


def _required(value: str | None, what: str) -> str:
    """A value an operation cannot do without (the CLI's parser already insists on it)."""
    if value is None:
        raise MissingArgument(what=what)
    return value


def finish_handover(reply: dict[str, Any], to: str, read_status: Callable[[], dict[str, Any]],
                    *, timeout: float, interval: float,
                    clock: Clock | None = None) -> dict[str, Any]:
    """The outcome of a handover the agent accepted (``reply``): wait for ``to`` to be writer.

    Done when ``read_status()`` shows ``to`` holding the writer lease, not
    released, at an epoch above the one the handover started from; a reply of
    ``already`` (``to`` is the writer) is the outcome as it is. Checks every
    ``interval`` seconds; after ``timeout`` seconds an ExecError: the handover
    was asked for, so something may have changed, but it did not finish.
    """
    if reply.get("outcome") == "already":
        return reply
    if clock is None:
        from fenceless.clock import SystemClock  # (it imports threading; a volume change needn't)

        clock = SystemClock()
    above = reply.get("from_epoch", 0)
    deadline = clock.now() + timeout
    while True:
        writer = read_status()["writer"]
        if writer and writer["host"] == to and not writer["released"] and \
                writer["epoch"] > above:
            return {"outcome": "done", "host": to, "epoch": writer["epoch"]}
        if clock.now() > deadline:
            raise HandoverNotFinished(to=to, timeout=timeout, writer=writer)
        clock.sleep(interval)
