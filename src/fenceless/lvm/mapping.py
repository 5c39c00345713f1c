"""From LV segments to byte ranges on the LUN, and to device-mapper tables.

Both activation paths need the same fact, where an LV's bytes live: the lab
maps them with a loop device, production (as a reader that must not run
``lvchange --refresh``) reloads a device-mapper table built here from
metadata read with ``--readonly``. Pure functions, unit-tested on saved output.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from fenceless.errors import UserError
from fenceless.lvm.parse import PvInfo, Segment

SECTOR = 512


class MultiSegmentRefused(UserError):
    """LV {vg}/{lv} has {count} segments; the lab maps only single-segment linear LVs \
onto a loop device (production activation through device-mapper has no such limit)"""


class NotLinear(UserError):
    """LV {vg}/{lv} has a {segtype} segment; only linear LVs can be mapped"""


class PvNotSeen(UserError):
    """segment on PV {pv} which this host does not see"""


class NoSegments(UserError):
    """LV {vg}/{lv} has no segments in this metadata"""


class SegmentGap(UserError):
    """LV {vg}/{lv}: segments are not contiguous at LE {le}"""


class NoDeviceNumber(UserError):
    """no device number known for PV {pv}"""


@dataclass(frozen=True)
class ByteExtent:
    device: str
    offset: int
    size: int


def lv_segments(segments: Sequence[Segment], lv: str) -> list[Segment]:
    return sorted((s for s in segments if s.lv_name == lv), key=lambda s: s.start_le)


def _pe_start(pvs: Mapping[str, PvInfo], pv: str) -> int:
    try:
        return pvs[pv].pe_start
    except KeyError as exc:
        raise PvNotSeen(pv=pv) from exc


def single_extent(
    segments: Sequence[Segment], pvs: Mapping[str, PvInfo], extent_size: int, vg: str, lv: str
) -> ByteExtent:
    """The one contiguous byte range of a single-segment linear LV (lab activation)."""
    segs = lv_segments(segments, lv)
    ranges = [r for s in segs for r in s.pe_ranges]
    if len(segs) != 1 or len(ranges) != 1:
        raise MultiSegmentRefused(vg=vg, lv=lv, count=max(len(segs), len(ranges)))
    seg = segs[0]
    if seg.segtype != "linear":
        raise NotLinear(vg=vg, lv=lv, segtype=seg.segtype)
    r = ranges[0]
    return ByteExtent(
        device=r.pv,
        offset=_pe_start(pvs, r.pv) + r.first * extent_size,
        size=r.count * extent_size,
    )


def dm_table(
    segments: Sequence[Segment],
    pvs: Mapping[str, PvInfo],
    extent_size: int,
    vg: str,
    lv: str,
    devnums: Mapping[str, str],
) -> str:
    """A device-mapper ``linear`` table for the LV, one line per PE range.

    ``devnums`` maps PV path to ``major:minor`` as this host sees it. Units
    are 512-byte sectors, as dm requires.
    """
    segs = lv_segments(segments, lv)
    if not segs:
        raise NoSegments(vg=vg, lv=lv)
    lines = []
    logical = 0
    for seg in segs:
        if seg.segtype != "linear":
            raise NotLinear(vg=vg, lv=lv, segtype=seg.segtype)
        if seg.start_le * extent_size != logical:
            raise SegmentGap(vg=vg, lv=lv, le=seg.start_le)
        for r in seg.pe_ranges:
            length = r.count * extent_size
            physical = _pe_start(pvs, r.pv) + r.first * extent_size
            if r.pv not in devnums:
                raise NoDeviceNumber(pv=r.pv)
            lines.append(f"{logical // SECTOR} {length // SECTOR} linear "
                         f"{devnums[r.pv]} {physical // SECTOR}")
            logical += length
    return "\n".join(lines) + "\n"


def dm_name(vg: str, lv: str) -> str:
    """LVM's device-mapper name: dashes doubled inside each part, joined by one dash."""
    return vg.replace("-", "--") + "-" + lv.replace("-", "--")
