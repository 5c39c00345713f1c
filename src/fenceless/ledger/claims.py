"""Claims: which LVs each host has mapped, in a region of the LUN of their own.

Why a region of its own: a claim is what keeps the writer from removing or
renaming an LV that is in use somewhere. It must

- be on the disk *before* the mapping exists, and be withdrawn only after
  the mapping is gone;
- outlast the agent that wrote it: an agent restart releases the host lease,
  the mappings (and the VMs on them) stay;
- never compete with the lease for room: a VM host with hundreds of disks
  mapped must not lose its lease because its claims grew (they used to ride
  in the lease sector's 3 KiB of facts).

Host id n owns slot n-1 of region ``claims`` (``CLAIMS_SLOT_SIZE`` each, room
for about 2000 LVs) and is its only writer. A record is the common header
(``seq`` rises per write, ``epoch`` is the writer's host generation) and a JSON
body ``{"host": name, "gen": generation, "lvs": {lv: [size, mode]}}``, where
size 0 means "being mapped". A multi-sector record is written tail first and
its header sector last, so a write cut short leaves a checksum mismatch: the
claims of that host are then *unknown*, and the writer refuses removals of
any LV until the host writes them again or is DEAD (never the reverse).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from fenceless.blockio import SECTOR, BlockDevice
from fenceless.ondisk.errors import CorruptRecord, RecordTooLarge
from fenceless.ondisk.layout import Layout, Region
from fenceless.ondisk.record import (
    HEADER_SIZE,
    KIND_CLAIMS,
    encode_record,
    pad,
    read_sized,
    write_tail_first,
)

REGION = "claims"
MODES = ("rw", "ro")


class ClaimsFull(RecordTooLarge):
    """The claims of this host would be {size} bytes, a slot holds {limit}; nothing was \
mapped or written"""


@dataclass(frozen=True)
class Claim:
    size: int  # bytes mapped; 0 while the mapping is being made
    mode: str = "rw"

    def to_json(self) -> list[Any]:
        return [self.size, self.mode]


@dataclass(frozen=True)
class HostClaims:
    """One host's claims as last written by it."""

    host: str
    generation: int
    lvs: Mapping[str, Claim] = field(default_factory=dict)
    seq: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"host": self.host, "gen": self.generation,
                "lvs": {lv: c.to_json() for lv, c in sorted(self.lvs.items())}}


def _slot(layout: Layout, host_id: int) -> tuple[Region, int]:
    region = layout.region(REGION)
    size = region.length // layout.max_hosts // SECTOR * SECTOR
    if not 1 <= host_id <= layout.max_hosts or size < SECTOR:
        raise ValueError(f"host id {host_id} has no claims slot")
    return region, size


def has_claims(layout: Layout) -> bool:
    """Clusters made before claims had their own region keep them in the lease facts."""
    return any(r.name == REGION for r in layout.regions)


def encode_claims(claims: HostClaims, slot_size: int) -> bytes:
    body = json.dumps(claims.to_json(), sort_keys=True, separators=(",", ":"),
                      ensure_ascii=False).encode("utf-8")
    if HEADER_SIZE + len(body) > slot_size:
        raise ClaimsFull(size=len(body), limit=slot_size - HEADER_SIZE)
    return pad(encode_record(KIND_CLAIMS, body, seq=claims.seq, epoch=claims.generation))


def _parse(rec_payload: bytes, seq: int, offset: int) -> HostClaims:
    def bad(detail: str) -> CorruptRecord:
        return CorruptRecord(region=REGION, offset=offset, detail=f"claims payload: {detail}")

    try:
        data = json.loads(rec_payload.decode("utf-8"))
    except ValueError as exc:
        raise bad(f"not JSON ({exc})") from exc
    if not isinstance(data, dict) or not isinstance(data.get("host"), str) or \
            not isinstance(data.get("gen"), int) or not isinstance(data.get("lvs"), dict):
        raise bad("not a claims object")
    lvs: dict[str, Claim] = {}
    for lv, value in data["lvs"].items():
        if not isinstance(value, list) or len(value) != 2 or not isinstance(value[0], int) \
                or isinstance(value[0], bool) or value[1] not in MODES:
            raise bad(f"claim of {lv!r} is malformed")
        lvs[lv] = Claim(value[0], value[1])
    return HostClaims(data["host"], data["gen"], lvs, seq)


def read_claims(dev: BlockDevice, layout: Layout, host_id: int) -> HostClaims | None:
    """One host's claims (None: it never wrote any). Unreadable: ``CorruptRecord``."""
    region, size = _slot(layout, host_id)
    offset = region.offset + (host_id - 1) * size
    rec = read_sized(dev, offset, kind=KIND_CLAIMS, region=REGION, limit=size)
    return None if rec is None else _parse(rec.payload, rec.seq, offset)


def read_all_claims(dev: BlockDevice, layout: Layout,
                    max_hosts: int) -> dict[int, HostClaims | CorruptRecord]:
    """Every host's claims by host id; a host that never wrote any is left out, and one
    whose claims do not read is there as its ``CorruptRecord`` (it counts as claiming
    everything: docs/design.md, "Claims")."""
    out: dict[int, HostClaims | CorruptRecord] = {}
    if not has_claims(layout):
        return out
    for hid in range(1, max_hosts + 1):
        try:
            got = read_claims(dev, layout, hid)
        except CorruptRecord as exc:
            out[hid] = exc
            continue
        if got is not None:
            out[hid] = got
    return out


def write_claims(dev: BlockDevice, layout: Layout, host_id: int, claims: HostClaims,
                 *, before_write: Any = None) -> None:
    """Only host ``host_id`` calls this: tail sectors first, the header sector last."""
    region, size = _slot(layout, host_id)
    offset = region.offset + (host_id - 1) * size
    write_tail_first(dev, offset, encode_claims(claims, size), before_write)
