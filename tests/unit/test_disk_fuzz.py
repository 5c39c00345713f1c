"""The disk is untrusted input: whatever a sector holds, reading it is a record or a clear
error of ours (an IntegrityError), never another exception (never a traceback).

A control area is filled with real records of every kind; then, again and again,
one sector is replaced by random bytes, by a record of some kind whose payload
is random (with a valid checksum: the hard case), or by a valid record with a
flipped bit, and every reader runs over the whole area.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable

import pytest

from fenceless.blockio import SECTOR, MemDevice
from fenceless.clock import FakeClock
from fenceless.control.area import ControlArea
from fenceless.errors import FencelessError
from fenceless.ledger import audit, claims, history
from fenceless.ledger import mailbox as mb
from fenceless.ledger.slots import write_ledger
from fenceless.ledger.state import LedgerState
from fenceless.lvm.mda import vg_identity
from fenceless.ondisk import record
from fenceless.ondisk.layout import read_superblock
from tests.unit.harness import make_area
from tests.unit.test_history import vg_text

KINDS = sorted(record.MAGICS)


def filled() -> tuple[MemDevice, ControlArea]:
    """A 4-host control area with a record of every kind in it."""
    clock = FakeClock()
    dev = MemDevice(make_layout_size())
    area = make_area(dev, clock)
    lay = area.layout
    hosts = area.hosts()
    for hid in (1, 2):
        hosts.acquire(hid, f"h{hid}", {"version": "x"})
    area.writer().acquire(1, 1, lambda h, g: True)
    state = LedgerState.from_json({"cluster": "c", "vg": "v", "hosts": {"1": {"name": "h1"}}})
    write_ledger(dev, lay, 1, state.to_json(), writer_host_id=1, both_slots=True)
    mb.write_inbox(dev, lay, 2, mb.Inbox(1, "h2", 1, (mb.Request("r", "create", {"n": 1}),)))
    mb.write_outbox(dev, lay, 2, mb.Outbox(1, 1, (mb.Reply("r", "ok"),)))
    audit.append(dev, lay, audit.audit_record(host="h2", user="u", argv=["x"],
                                              request_id="r", result="ok", message=""), epoch=1)
    history.append(dev, lay, history.HistoryEntry(vg_text(3), 3, "r"), epoch=1,
                   parse=vg_identity)
    claims.write_claims(dev, lay, 2, claims.HostClaims("h2", 1, {"a": claims.Claim(1)}))
    return dev, area


def make_layout_size() -> int:
    from fenceless.ondisk.layout import Layout

    return Layout.compute(4).total_size()


def readers(dev: MemDevice, area: ControlArea) -> list[Callable[[], object]]:
    lay = area.layout
    hosts = area.hosts()
    return [
        lambda: read_superblock(dev),
        lambda: [hosts.decode(hosts.read_area(), h) for h in range(1, 5)],
        lambda: area.writer().read_leader(),
        lambda: area.writer().read_dblocks(),
        lambda: area.writer().read_request(),
        lambda: (v := area.ledger()).current and LedgerState.from_json(v.current.state),
        lambda: [mb.read_inbox(dev, lay, h) for h in range(1, 5)],
        lambda: [mb.read_outbox(dev, lay, h) for h in range(1, 5)],
        lambda: audit.read_log(dev, lay),
        lambda: history.list_entries(dev, lay),
        lambda: history.read_entry(dev, lay, 3, parse=vg_identity),
        lambda: [claims.read_claims(dev, lay, h) for h in range(1, 5)],
    ]


def record_starts(area: ControlArea) -> list[tuple[int, int]]:
    """(offset, kind) of every sector where a record begins: where damage matters most."""
    lay = area.layout
    out = [(0, record.KIND_SUPERBLOCK)]
    reg = lay.region
    out += [(reg("hosts").offset + i * SECTOR, record.KIND_HOST) for i in range(4)]
    out += [(reg("writer").offset, record.KIND_LEADER),
            (reg("writer").offset + SECTOR, record.KIND_REQUEST)]
    out += [(reg("writer").offset + (2 + i) * SECTOR, record.KIND_DBLOCK) for i in range(4)]
    out += [(reg(n).offset, record.KIND_LEDGER) for n in ("ledger_a", "ledger_b")]
    out += [(reg("mailboxes").offset + i * SECTOR, record.KIND_INBOX) for i in range(4)]
    out += [(reg("mailboxes").offset + (4 + i) * SECTOR, record.KIND_OUTBOX) for i in range(4)]
    hsize = reg("mdhistory").length // 128
    out += [(reg("mdhistory").offset + i * hsize, record.KIND_MDHISTORY) for i in range(4)]
    out += [(reg("audit").offset + i * SECTOR, record.KIND_AUDIT) for i in range(4)]
    csize = reg("claims").length // 4
    out += [(reg("claims").offset + i * csize, record.KIND_CLAIMS) for i in range(4)]
    return out


PAYLOADS = [[], {}, "x", 5, None, {"requests": [1]}, {"host": 1, "gen": "x", "lvs": []},
            {"host": "h", "gen": 1, "lvs": {"a": [1, "zz"]}}, {"replies": [{"id": 1}]},
            {"host": "h", "gen": "1", "requests": [{"id": "a", "op": 1, "args": []}]},
            {"hosts": {"x": 1}}, {"intents": {"a": 1}}, {"replies": "no"}]


def garbage(rnd: random.Random, kind: int) -> bytes:
    """A record of ``kind`` (or another) with a valid checksum and a bad payload, or noise."""
    choice = rnd.randrange(5)
    if choice == 0:
        return bytes(rnd.randrange(256) for _ in range(SECTOR))
    if choice == 1:
        kind = rnd.choice(KINDS)
    size = rnd.choice([0, 1, 8, 20, 40, 64, 120, 300, 2000, SECTOR - record.HEADER_SIZE])
    if choice == 2:
        payload = json.dumps(rnd.choice(PAYLOADS)).encode()
        # Some records have a fixed body before their JSON: give it one, sometimes.
        payload = bytes(rnd.randrange(256) for _ in range(rnd.choice([0, 12, 52]))) + payload
    elif choice == 3:
        payload = b"\xff" * size
    else:
        payload = bytes(rnd.randrange(256) for _ in range(size))
    return record.pad(record.encode_record(kind, payload[: SECTOR - record.HEADER_SIZE],
                                           seq=rnd.choice([0, 1, 3, 1 << 62, (1 << 64) - 1]),
                                           epoch=rnd.randrange(3)))


@pytest.mark.parametrize("seed", range(4))
def test_damage_anywhere_is_an_integrity_error_or_nothing(seed: int) -> None:
    rnd = random.Random(seed)
    dev, area = filled()
    starts = record_starts(area)
    for _ in range(100):
        sector, kind = rnd.choice(starts)
        original = dev.read(sector, SECTOR)
        if rnd.random() < 0.2 and any(original):
            raw = bytearray(original)
            raw[rnd.randrange(SECTOR)] ^= 1 << rnd.randrange(8)
            dev.write(sector, bytes(raw))
        else:
            dev.write(sector, garbage(rnd, kind))
        for read in readers(dev, area):
            try:
                read()
            except FencelessError:
                pass  # a clear error of ours (an IntegrityError, or "not found")
            except Exception as exc:  # pragma: no cover - the failure being tested for
                raise AssertionError(f"{type(exc).__name__}: {exc} after damage at "
                                     f"{sector} (a {record.KIND_NAMES[kind]} record)") from exc
        if rnd.random() < 0.5:
            dev.write(sector, original)
