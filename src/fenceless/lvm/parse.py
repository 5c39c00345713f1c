"""Pure parsers for LVM's JSON reports (``--reportformat json --units b --nosuffix``).

LVM prints every value as a string; these functions turn a report into typed
records and refuse anything they do not understand, because LVM output is a
cache of the shared metadata and a wrong number here becomes a wrong offset
on the LUN later.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from fenceless.errors import LvmOutputError

# Fields asked of LVM for each report; the parsers read exactly these.
PV_FIELDS = ("pv_name", "vg_name", "pv_uuid", "pv_size", "pv_free", "pe_start", "dev_size",
             "pv_pe_count", "pv_pe_alloc_count")
VG_FIELDS = ("vg_name", "vg_uuid", "vg_size", "vg_free", "vg_extent_size", "vg_extent_count",
             "vg_free_count", "vg_seqno", "lv_count", "pv_count", "vg_mda_size", "vg_mda_free",
             "vg_attr", "vg_tags")
LV_FIELDS = ("vg_name", "lv_name", "lv_uuid", "lv_size", "lv_attr", "lv_tags", "seg_count")
SEG_FIELDS = ("vg_name", "lv_name", "lv_uuid", "segtype", "seg_start_pe", "seg_size_pe",
              "seg_pe_ranges", "lv_attr")


@dataclass(frozen=True)
class PvInfo:
    name: str
    vg_name: str
    uuid: str
    size: int
    free: int
    pe_start: int
    dev_size: int
    pe_count: int
    pe_alloc_count: int


@dataclass(frozen=True)
class VgInfo:
    name: str
    uuid: str
    size: int
    free: int
    extent_size: int
    extent_count: int
    free_count: int
    seqno: int
    lv_count: int
    pv_count: int
    mda_size: int
    mda_free: int
    attr: str
    tags: tuple[str, ...]


@dataclass(frozen=True)
class LvInfo:
    vg_name: str
    name: str
    uuid: str
    size: int
    attr: str
    tags: tuple[str, ...]
    seg_count: int


@dataclass(frozen=True)
class PeRange:
    pv: str
    first: int
    last: int

    @property
    def count(self) -> int:
        return self.last - self.first + 1


@dataclass(frozen=True)
class Segment:
    vg_name: str
    lv_name: str
    lv_uuid: str
    segtype: str
    start_le: int
    size_le: int
    pe_ranges: tuple[PeRange, ...]
    lv_attr: str = ""  # the LV's attributes ("-ri-------": its LVM permission is read-only)


def report_rows(text: str, kind: str, command: str) -> list[dict[str, str]]:
    """The rows of one LVM JSON report section (``kind`` is pv, vg, lv or seg)."""
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise LvmOutputError(command=command, detail=f"not JSON ({exc.msg} at {exc.pos})") from exc
    try:
        sections = doc["report"]
        rows: list[dict[str, str]] = []
        for section in sections:
            for row in section.get(kind, []):
                if not isinstance(row, dict) or not all(
                    isinstance(k, str) and isinstance(v, str) for k, v in row.items()
                ):
                    raise TypeError("row is not a map of strings")
                rows.append(row)
    except (KeyError, TypeError, AttributeError) as exc:
        raise LvmOutputError(command=command, detail=f"unexpected report shape ({exc})") from exc
    return rows


def _int(row: dict[str, str], key: str, command: str) -> int:
    try:
        text = row[key]
    except KeyError as exc:
        raise LvmOutputError(command=command, detail=f"field {key} missing") from exc
    if not re.fullmatch(r"[0-9]+", text):
        raise LvmOutputError(command=command, detail=f"field {key}={text!r} is not a whole number")
    return int(text)


def _str(row: dict[str, str], key: str, command: str) -> str:
    try:
        return row[key]
    except KeyError as exc:
        raise LvmOutputError(command=command, detail=f"field {key} missing") from exc


def _tags(text: str) -> tuple[str, ...]:
    return tuple(t for t in text.split(",") if t)


def parse_pvs(text: str, command: str = "pvs") -> list[PvInfo]:
    out = []
    for r in report_rows(text, "pv", command):
        out.append(PvInfo(
            name=_str(r, "pv_name", command), vg_name=_str(r, "vg_name", command),
            uuid=_str(r, "pv_uuid", command), size=_int(r, "pv_size", command),
            free=_int(r, "pv_free", command), pe_start=_int(r, "pe_start", command),
            dev_size=_int(r, "dev_size", command), pe_count=_int(r, "pv_pe_count", command),
            pe_alloc_count=_int(r, "pv_pe_alloc_count", command),
        ))
    return out


def parse_vgs(text: str, command: str = "vgs") -> list[VgInfo]:
    out = []
    for r in report_rows(text, "vg", command):
        out.append(VgInfo(
            name=_str(r, "vg_name", command), uuid=_str(r, "vg_uuid", command),
            size=_int(r, "vg_size", command), free=_int(r, "vg_free", command),
            extent_size=_int(r, "vg_extent_size", command),
            extent_count=_int(r, "vg_extent_count", command),
            free_count=_int(r, "vg_free_count", command), seqno=_int(r, "vg_seqno", command),
            lv_count=_int(r, "lv_count", command), pv_count=_int(r, "pv_count", command),
            mda_size=_int(r, "vg_mda_size", command), mda_free=_int(r, "vg_mda_free", command),
            attr=_str(r, "vg_attr", command), tags=_tags(_str(r, "vg_tags", command)),
        ))
    return out


def parse_lvs(text: str, command: str = "lvs") -> list[LvInfo]:
    out = []
    for r in report_rows(text, "lv", command):
        out.append(LvInfo(
            vg_name=_str(r, "vg_name", command), name=_str(r, "lv_name", command),
            uuid=_str(r, "lv_uuid", command), size=_int(r, "lv_size", command),
            attr=_str(r, "lv_attr", command), tags=_tags(_str(r, "lv_tags", command)),
            seg_count=_int(r, "seg_count", command),
        ))
    return out


_RANGE_RE = re.compile(r"^(/[^:\s]+):([0-9]+)-([0-9]+)$")


def parse_pe_ranges(text: str, command: str = "lvs --segments") -> tuple[PeRange, ...]:
    """``/dev/sdb:0-4 /dev/sdc:7-9`` as typed ranges (LVM separates them with spaces)."""
    ranges = []
    for part in text.split():
        m = _RANGE_RE.match(part)
        if not m:
            raise LvmOutputError(command=command, detail=f"PE range {part!r} not understood")
        first, last = int(m.group(2)), int(m.group(3))
        if last < first:
            raise LvmOutputError(command=command, detail=f"PE range {part!r} runs backwards")
        ranges.append(PeRange(m.group(1), first, last))
    return tuple(ranges)


def parse_segments(text: str, command: str = "lvs --segments") -> list[Segment]:
    out = []
    for r in report_rows(text, "seg", command):
        out.append(Segment(
            vg_name=_str(r, "vg_name", command), lv_name=_str(r, "lv_name", command),
            lv_uuid=_str(r, "lv_uuid", command), segtype=_str(r, "segtype", command),
            start_le=_int(r, "seg_start_pe", command), size_le=_int(r, "seg_size_pe", command),
            pe_ranges=parse_pe_ranges(_str(r, "seg_pe_ranges", command), command),
            lv_attr=str(r.get("lv_attr", "")),  # reports saved before it was asked lack it
        ))
    return out


def as_json(obj: Any) -> Any:
    """A plain-JSON form of the records above (and of NamedTuples), for ``--json`` output."""
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return {k: as_json(getattr(obj, k)) for k in obj._fields}
    if isinstance(obj, list | tuple):
        return [as_json(x) for x in obj]
    if hasattr(obj, "__dataclass_fields__"):
        return {k: as_json(getattr(obj, k)) for k in obj.__dataclass_fields__}
    return obj


def metadata_area_use(mda_size: int, mda_free: int) -> tuple[float, float]:
    """(bytes LVM's metadata text may take, bytes it takes) of one area: LVM's
    ``vg_mda_free`` counts against half the area, since a commit writes the new text
    beside the old one."""
    usable = mda_size / 2
    return usable, max(0.0, usable - mda_free)
