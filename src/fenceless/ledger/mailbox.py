"""Per-host mailboxes on the control area: requests to the writer, replies from it.

Region ``mailboxes`` (2 x max_hosts sectors): all inboxes first, then all outboxes,
so that the writer's poll of every inbox is one contiguous read.
- host n's *inbox*, sector n-1, is written only by host n: its open requests;
- host n's *outbox*, sector max_hosts + n-1, is written only by the writer.
So every byte still has one writer at a time. Both are single-sector records
(atomic writes) in the common checksummed format; the inbox's ``seq`` rises
on every write, the outbox carries the writer's epoch, and a reader ignores
an outbox from an epoch older than the writer lease's.

Everything read here came from the disk and is untrusted: payloads are
parsed as JSON data and checked for shape, never executed or passed to a
shell.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from fenceless.blockio import SECTOR, BlockDevice
from fenceless.ondisk.errors import CorruptRecord, RecordTooLarge
from fenceless.ondisk.layout import Layout
from fenceless.ondisk.record import (
    HEADER_SIZE,
    KIND_INBOX,
    KIND_OUTBOX,
    Record,
    decode_record,
    encode_record,
    pad,
)

SLOT = 2 * SECTOR
ROOM = SECTOR - HEADER_SIZE


class MailboxFull(RecordTooLarge):
    """Mailbox record of {size} bytes does not fit in a sector ({limit} bytes of room); \
nothing was written"""


@dataclass(frozen=True)
class Request:
    id: str
    op: str
    args: dict[str, Any]
    user: str = ""
    argv: tuple[str, ...] = ()

    def as_json(self) -> dict[str, Any]:
        return {"id": self.id, "op": self.op, "args": self.args, "user": self.user,
                "argv": list(self.argv)}

    @property
    def fingerprint(self) -> str:
        """What was asked, short: a reply answers one id *and* this operation."""
        return hashlib.sha256(_dump([self.op, self.args])).hexdigest()[:16]


@dataclass(frozen=True)
class Reply:
    id: str
    status: str  # "ok" | "error"
    result: dict[str, Any] = field(default_factory=dict)
    error: dict[str, Any] = field(default_factory=dict)
    fp: str = ""  # the fingerprint of the request answered ("" from format 1.0 writers)

    def answers(self, req: Request) -> bool:
        return self.id == req.id and self.fp in ("", req.fingerprint)

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "status": self.status}
        if self.fp:
            out["fp"] = self.fp
        if self.result:
            out["result"] = self.result
        if self.error:
            out["error"] = self.error
        return out


@dataclass(frozen=True)
class Inbox:
    seq: int
    host: str
    generation: int
    requests: tuple[Request, ...]


@dataclass(frozen=True)
class Outbox:
    seq: int
    epoch: int
    replies: tuple[Reply, ...]


def offsets(layout: Layout, host_id: int) -> tuple[int, int]:
    """(inbox, outbox) byte offsets of a host's mailbox in the control area."""
    region = layout.region("mailboxes")
    if not 1 <= host_id <= layout.max_hosts or region.length < layout.max_hosts * SLOT:
        raise ValueError(f"host id {host_id} has no mailbox")
    inbox = region.offset + (host_id - 1) * SECTOR
    return inbox, inbox + layout.max_hosts * SECTOR


def _dump(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def encode_inbox(box: Inbox) -> bytes:
    body = _dump({"host": box.host, "gen": box.generation,
                  "requests": [r.as_json() for r in box.requests]})
    if len(body) > ROOM:
        raise MailboxFull(size=len(body), limit=ROOM)
    return pad(encode_record(KIND_INBOX, body, seq=box.seq), SECTOR)


def encode_outbox(box: Outbox) -> bytes:
    body = _dump({"replies": [r.as_json() for r in box.replies]})
    if len(body) > ROOM:
        raise MailboxFull(size=len(body), limit=ROOM)
    return pad(encode_record(KIND_OUTBOX, body, seq=box.seq, epoch=box.epoch),
                   SECTOR)


def fits_outbox(replies: list[Reply]) -> bool:
    return len(_dump({"replies": [r.as_json() for r in replies]})) <= ROOM


def fits_inbox(host: str, generation: int, requests: list[Request]) -> bool:
    body = {"host": host, "gen": generation, "requests": [r.as_json() for r in requests]}
    return len(_dump(body)) <= ROOM


def _payload(buf: bytes, kind: int, region: str, offset: int) -> tuple[Record, Any] | None:
    rec = decode_record(buf[:SECTOR], kind=kind, region=region, offset=offset)
    if rec is None:
        return None
    try:
        return rec, json.loads(rec.payload.decode("utf-8"))
    except ValueError as exc:
        raise CorruptRecord(region=region, offset=offset,
                                detail=f"mailbox payload is not JSON: {exc}") from exc


def _str(x: Any) -> str:
    if not isinstance(x, str):
        raise TypeError("expected a string")
    return x


def decode_inbox(buf: bytes, offset: int) -> Inbox | None:
    got = _payload(buf, KIND_INBOX, "mailboxes", offset)
    if got is None:
        return None
    rec, data = got
    try:
        requests = []
        for r in data["requests"]:
            args = r["args"]
            if not isinstance(args, dict):
                raise TypeError("args is not an object")
            requests.append(Request(id=_str(r["id"]), op=_str(r["op"]), args=args,
                                    user=_str(r.get("user", "")),
                                    argv=tuple(_str(a) for a in r.get("argv", []))))
        return Inbox(seq=rec.seq, host=_str(data["host"]), generation=int(data["gen"]),
                     requests=tuple(requests))
    except (KeyError, TypeError, ValueError) as exc:
        raise CorruptRecord(region="mailboxes", offset=offset,
                                detail=f"inbox is malformed: {exc}") from exc


def decode_outbox(buf: bytes, offset: int) -> Outbox | None:
    got = _payload(buf, KIND_OUTBOX, "mailboxes", offset)
    if got is None:
        return None
    rec, data = got
    try:
        replies = []
        for r in data["replies"]:
            result, error = r.get("result", {}), r.get("error", {})
            if not isinstance(result, dict) or not isinstance(error, dict):
                raise TypeError("result/error is not an object")
            replies.append(Reply(id=_str(r["id"]), status=_str(r["status"]), result=result,
                                 error=error, fp=_str(r.get("fp", ""))))
        return Outbox(seq=rec.seq, epoch=rec.epoch, replies=tuple(replies))
    except (KeyError, TypeError, ValueError) as exc:
        raise CorruptRecord(region="mailboxes", offset=offset,
                                detail=f"outbox is malformed: {exc}") from exc


def read_inboxes(dev: BlockDevice, layout: Layout, upto: int) -> bytes:
    """Inboxes of host ids 1..upto in one O_DIRECT read (the writer's poll)."""
    region = layout.region("mailboxes")
    return dev.read(region.offset, max(1, min(upto, layout.max_hosts)) * SECTOR)


def inbox_from(area: bytes, layout: Layout, host_id: int) -> Inbox | None:
    base = (host_id - 1) * SECTOR
    if base + SECTOR > len(area):
        return None
    return decode_inbox(area[base : base + SECTOR], offsets(layout, host_id)[0])


def read_outbox(dev: BlockDevice, layout: Layout, host_id: int) -> Outbox | None:
    off = offsets(layout, host_id)[1]
    return decode_outbox(dev.read(off, SECTOR), off)


def read_inbox(dev: BlockDevice, layout: Layout, host_id: int) -> Inbox | None:
    off = offsets(layout, host_id)[0]
    return decode_inbox(dev.read(off, SECTOR), off)


def write_inbox(dev: BlockDevice, layout: Layout, host_id: int, box: Inbox) -> None:
    """Only host ``host_id`` calls this: the inbox is its own sector."""
    dev.write(offsets(layout, host_id)[0], encode_inbox(box))


def write_outbox(dev: BlockDevice, layout: Layout, host_id: int, box: Outbox) -> None:
    """Only the writer calls this (after its lease check)."""
    dev.write(offsets(layout, host_id)[1], encode_outbox(box))
