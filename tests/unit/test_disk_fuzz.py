"""The disk is untrusted input: whatever a sector holds, reading it is a record or a clear
error of ours (an IntegrityError), never another exception (never a traceback).

A control area is filled with real records of every kind; then, again and again,
one sector is replaced by random bytes, by a record of some kind whose payload
is random (with a valid checksum: the hard case), or by a valid record with a
flipped bit, and every reader runs over the whole area.

The same for the two other things fenceless reads from the LUN: LVM's own
metadata on the PV (label, metadata area header, text: each damaged, and each
also rewritten with a valid checksum over bad fields), read in memory and
through O_DIRECT, and the anchor in the LUN's last MiB.
"""

from __future__ import annotations

import json
import random
import struct
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from fenceless.blockio import SECTOR, BlockDevice, DirectDevice, MemDevice
from fenceless.clock import FakeClock
from fenceless.control import anchor as anchor_mod
from fenceless.control.area import ControlArea, OffsetDevice, format_regions
from fenceless.errors import FencelessError
from fenceless.ledger import audit, claims, history
from fenceless.ledger import mailbox as mb
from fenceless.ledger.slots import write_ledger
from fenceless.ledger.state import LedgerState
from fenceless.lvm import mda
from fenceless.lvm.mda import vg_identity
from fenceless.ondisk import record
from fenceless.ondisk.layout import Layout, Superblock, read_superblock, write_superblock
from tests.unit.harness import make_area
from tests.unit.test_history import vg_text
from tests.unit.test_mda import DEV_SIZE, MDA_SIZE, MDA_START, Pv, text_for

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


def ours(read: Callable[[], object], context: str) -> None:
    """Run one reader: a result, or a clear error of ours; anything else fails the test."""
    try:
        read()
    except FencelessError:
        pass  # a clear error of ours (an IntegrityError, or "not found")
    except Exception as exc:  # pragma: no cover - the failure being tested for
        raise AssertionError(f"{type(exc).__name__}: {exc} after {context}") from exc


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
            ours(read, f"damage at {sector} (a {record.KIND_NAMES[kind]} record)")
        if rnd.random() < 0.5:
            dev.write(sector, original)


# --- LVM's metadata on the PV --------------------------------------------------------

LABEL_AT = 512  # the test PV's label is in sector 1
TEXT_AT = 1024  # and its committed text at this offset of the metadata area
# Seqnos and VG names LVM never writes, each of which once escaped as a ValueError.
BAD_SEQNOS = ["\u00b2", "\u0661\u0662", "1" * 5000, "1" * 25, "-1", "0x10", '"3"', "[1]", "1e3"]
BAD_NAMES = ["v" * 200, "\u00e9" * 70, "x\u00b2y"]


def edge(rnd: random.Random) -> int:
    """A number where a bound check would break: 0, sizes of the PV, past 2**63."""
    return rnd.choice([0, 1, 511, 512, 4096, MDA_START, MDA_SIZE, DEV_SIZE, 1 << 20,
                       (1 << 63) - 4096, 1 << 63, (1 << 64) - 1, rnd.randrange(1 << 64),
                       rnd.randrange(DEV_SIZE)])


def noise(rnd: random.Random, n: int) -> bytes:
    return bytes(rnd.randrange(256) for _ in range(n))


def label_sector(rnd: random.Random) -> bytes:
    """A label with a valid checksum over random fields: where the PV header is, how big
    the PV is, and its lists of areas (terminated or not)."""
    sec = bytearray(noise(rnd, 512))
    struct.pack_into("<8sQII8s", sec, 0, mda.LABEL_ID, 1, 0,
                     rnd.choice([32, 32, 0, 8, 400, rnd.randrange(1 << 32)]), mda.LABEL_TYPE)
    struct.pack_into("<Q", sec, 64, rnd.choice([0, DEV_SIZE, edge(rnd)]))
    for pos in range(72, 512 - 16, 16):
        if rnd.random() < 0.3:
            struct.pack_into("<QQ", sec, pos, 0, 0)
        elif rnd.random() < 0.7:
            struct.pack_into("<QQ", sec, pos, edge(rnd), edge(rnd))
    struct.pack_into("<I", sec, 16, mda.calc_crc(bytes(sec[20:])))
    return bytes(sec)


def header_sector(rnd: random.Random) -> bytes:
    """An mda_header with a valid checksum; mostly the right area, any text location."""
    hdr = bytearray(512)
    struct.pack_into("<I16sIQQ", hdr, 0, 0, mda.MDA_MAGIC, rnd.choice([1, 1, 1, 2]),
                     rnd.choice([MDA_START, MDA_START, edge(rnd)]),
                     rnd.choice([MDA_SIZE, MDA_SIZE, edge(rnd)]))
    struct.pack_into("<QQII", hdr, 40, rnd.choice([TEXT_AT, edge(rnd)]),
                     rnd.choice([100, MDA_SIZE - 512, edge(rnd)]), rnd.randrange(1 << 32),
                     rnd.randrange(4))
    struct.pack_into("<I", hdr, 0, mda.calc_crc(bytes(hdr[4:])))
    return bytes(hdr)


def text(rnd: random.Random) -> bytes:
    """A metadata text LVM would never write (committed with a valid checksum)."""
    choice = rnd.randrange(6)
    if choice == 0:
        body = noise(rnd, rnd.randrange(1, 3000))
    elif choice == 1:
        body = f"vg0 {{\nseqno = {rnd.choice(BAD_SEQNOS)}\n}}\n".encode()
    elif choice == 2:
        body = text_for(5, name=rnd.choice(BAD_NAMES))[:-1]
    elif choice == 3:
        raw = bytearray(text_for(5)[:-1])
        for _ in range(rnd.randrange(1, 4)):
            raw[rnd.randrange(len(raw))] = rnd.randrange(256)
        body = bytes(raw)
    elif choice == 4:
        body = b"vg {" * rnd.randrange(1, 3000)
    else:
        body = b'vg { "' + b"\\x" * rnd.randrange(5000)
    return body[: MDA_SIZE - TEXT_AT - 1] + b"\0"


def damage_pv(rnd: random.Random, pv: Pv) -> str:
    """Damage the label, the metadata area's header or its text; what was done."""
    what = rnd.choice(["label noise", "label", "header noise", "header", "text", "bit"])
    if what.startswith("label"):
        head = bytearray(pv.dev.read(0, SECTOR))
        head[LABEL_AT : LABEL_AT + 512] = noise(rnd, 512) if what == "label noise" \
            else label_sector(rnd)
        pv.dev.write(0, bytes(head))
    elif what.startswith("header"):
        area = bytearray(pv.dev.read(MDA_START, SECTOR))
        area[:512] = noise(rnd, 512) if what == "header noise" else header_sector(rnd)
        pv.dev.write(MDA_START, bytes(area))
    elif what == "text":
        body = text(rnd)
        pv.commit(body, TEXT_AT, len(body))
    else:
        at = rnd.choice([0, MDA_START])
        raw = bytearray(pv.dev.read(at, SECTOR))
        raw[rnd.randrange(SECTOR)] ^= 1 << rnd.randrange(8)
        pv.dev.write(at, bytes(raw))
    return what


def pv_readers(dev: BlockDevice, loc: mda.MdaLocation,
               ring: MemDevice) -> list[Callable[[], object]]:
    """Every reader of LVM's metadata, with and without what a caller may know already,
    and what the writer does next with a text it read: store it in the history ring."""
    def into_history() -> None:
        got, seqno = mda.read_metadata_text(dev, size=DEV_SIZE)
        history.append(ring, RING_LAYOUT, history.HistoryEntry(got, seqno, "r"), epoch=1,
                       parse=vg_identity)

    return [
        lambda: mda.read_label(dev),
        lambda: mda.read_label(dev, size=DEV_SIZE),
        lambda: mda.read_mda_header(dev),
        lambda: mda.read_mda_header(dev, size=DEV_SIZE),
        lambda: mda.read_mda_header(dev, location=loc),
        lambda: mda.read_metadata_text(dev),
        lambda: mda.read_metadata_text(dev, size=DEV_SIZE),
        lambda: mda.read_metadata_text(dev, location=loc),
        into_history,
    ]


RING_LAYOUT = Layout.compute(1)


def as_file(dev: MemDevice, path: Path) -> DirectDevice:
    """The same PV as a file read with O_DIRECT: the kernel, not MemDevice, bounds offsets."""
    path.write_bytes(dev.read(0, MDA_START + MDA_SIZE))
    with path.open("r+b") as f:
        f.truncate(DEV_SIZE)
    return DirectDevice(str(path))


@pytest.mark.parametrize("seed", range(4))
def test_damaged_lvm_metadata_is_an_integrity_error_or_nothing(seed: int,
                                                               tmp_path: Path) -> None:
    rnd = random.Random(seed)
    ring = MemDevice(RING_LAYOUT.total_size())
    format_regions(ring, RING_LAYOUT)
    for i in range(120):
        pv = Pv()
        good = text_for(7)
        pv.commit(good, TEXT_AT, len(good))
        loc = mda.read_mda_header(pv.dev).location
        what = damage_pv(rnd, pv)
        devices: list[BlockDevice] = [pv.dev]
        if i % 4 == 0:
            devices.append(as_file(pv.dev, tmp_path / "pv"))
        for dev in devices:
            for read in pv_readers(dev, loc, ring):
                ours(read, f"damage to the PV ({what}), read from {type(dev).__name__}")
            dev.close()


@pytest.mark.parametrize("body", [f"vg0 {{\nseqno = {s}\n}}\n" for s in BAD_SEQNOS]
                         + [text_for(5, name=n)[:-1].decode() for n in BAD_NAMES])
def test_text_lvm_never_writes_is_an_mda_error(body: str) -> None:
    with pytest.raises(mda.MdaError, match="metadata text"):
        mda.vg_section(body)


def test_a_text_larger_than_any_vg_is_not_read() -> None:
    """A header (checksum valid) pointing at gigabytes: refused, not allocated and read."""
    pv = Pv()
    pv.write_label(mdas=[(MDA_START, 3 << 30)], pv_size=4 << 30)
    pv.commit(b"", TEXT_AT, 0, msize=3 << 30)
    area = bytearray(pv.dev.read(MDA_START, SECTOR))
    struct.pack_into("<QQII", area, 40, TEXT_AT, 2 << 30, 0, 0)
    struct.pack_into("<I", area, 0, mda.calc_crc(bytes(area[4:512])))
    pv.dev.write(MDA_START, bytes(area))
    with pytest.raises(mda.MdaError, match="larger than any VG"):
        mda.read_metadata_text(pv.dev)


# --- the anchor in the LUN's last MiB -------------------------------------------------

ANCHOR_LUN = 48 << 20
CONTROL_AT = 4 << 20


def anchored() -> tuple[MemDevice, anchor_mod.Anchor]:
    """A LUN with a superblock at CONTROL_AT and the anchor that points at it."""
    dev = MemDevice(ANCHOR_LUN)
    layout = Layout.compute(4)
    sb = Superblock(cluster_uuid=uuid.uuid4(), vg_uuid="vg-uuid", io_timeout=1.0,
                    creation_epoch=1, layout=layout)
    write_superblock(OffsetDevice(dev, CONTROL_AT, layout.total_size()), sb)
    good = anchor_mod.Anchor(sb.cluster_uuid, "sanvg", "vg-uuid", "fenceless-ctl", "lv-uuid",
                             CONTROL_AT, layout.total_size())
    anchor_mod.write_anchor(dev, ANCHOR_LUN, good)
    return dev, good


def anchor_sector(rnd: random.Random, good: anchor_mod.Anchor) -> bytes:
    """The anchor sector, damaged: noise, a flipped bit, or a record with a valid
    checksum and a short, long or random body, or the right body with bad fields."""
    choice = rnd.randrange(5)
    if choice == 0:
        return noise(rnd, SECTOR)
    if choice == 1:
        raw = bytearray(anchor_mod.encode_anchor(good))
        raw[rnd.randrange(SECTOR)] ^= 1 << rnd.randrange(8)
        return bytes(raw)
    if choice == 2:
        body = noise(rnd, rnd.choice([0, 10, 100, anchor_mod._BODY.size, 1000]))
    elif choice == 3:
        body = anchor_mod._BODY.pack(noise(rnd, 16), noise(rnd, 128), noise(rnd, 64),
                                     noise(rnd, 64), noise(rnd, 64),
                                     rnd.choice([edge(rnd), edge(rnd) // SECTOR * SECTOR]),
                                     rnd.choice([edge(rnd), edge(rnd) // SECTOR * SECTOR]))
    else:
        body = anchor_mod._BODY.pack(good.cluster_uuid.bytes, b"sanvg", b"vg-uuid",
                                     b"fenceless-ctl", b"lv-uuid",
                                     rnd.choice([0, SECTOR, CONTROL_AT, ANCHOR_LUN - SECTOR]),
                                     rnd.choice([SECTOR, 1 << 20, ANCHOR_LUN]))
    kind = rnd.choice([record.KIND_ANCHOR, record.KIND_ANCHOR, rnd.choice(KINDS)])
    return record.pad(record.encode_record(kind, body[: SECTOR - record.HEADER_SIZE]), SECTOR)


@pytest.mark.parametrize("seed", range(4))
def test_a_damaged_anchor_is_an_integrity_error_or_nothing(seed: int) -> None:
    """read_anchor on a damaged tail, and what status does next: open the control area."""
    rnd = random.Random(seed)
    dev, good = anchored()
    at = anchor_mod.anchor_region(ANCHOR_LUN).offset

    def open_area() -> None:
        got = anchor_mod.read_anchor(dev, ANCHOR_LUN)
        if got is not None:
            ControlArea.open(dev, got, FakeClock())

    for _ in range(300):
        dev.write(at, anchor_sector(rnd, good))
        ours(lambda: anchor_mod.read_anchor(dev, ANCHOR_LUN), "damage to the anchor")
        ours(open_area, "damage to the anchor, then opening the control area")


def test_a_metadata_area_past_what_a_device_can_hold_is_refused(tmp_path: Path) -> None:
    """A PV header (checksum valid) that claims 2**64 bytes and an area at 2**63: an offset
    the kernel cannot take (os.preadv raised OverflowError), refused before any read."""
    pv = Pv()
    pv.write_label(mdas=[(1 << 63, 1 << 20)], pv_size=(1 << 64) - 1)
    dev = as_file(pv.dev, tmp_path / "pv")
    try:
        with pytest.raises(mda.MdaError, match="outside the PV"):
            mda.read_mda_header(dev)
    finally:
        dev.close()
