"""One LV, and the VG after one change, from LVM's metadata text as it is on the PV.

Why: after each change the writer needs the VG as it now is (the new LV's
uuid and tags, the free space) to check the change's effect and to plan the
next request. An ``lvs`` for that reads and parses the whole metadata again:
35 ms of a 150 ms create at a thousand LVs. The writer reads the committed
text from the PV anyway (for the history entry, ``lvm/mda.py``, checksum
verified), and the planned-on report plus exactly one commit (the seqno rose
by one) plus the changed LV's own section give the same answer.

Only what fenceless itself creates is read this way: a linear LV (``striped``
segments of one stripe) with no status flag beyond READ, WRITE and VISIBLE
and no allocation policy of its own. Anything else, or any line of a shape
not listed here, gives None, and the caller asks LVM (``Journal.snapshot_after``).
The text is LVM's on-disk form: one item per line, no indentation.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import replace

from fenceless.lvm.parse import LvInfo, VgInfo

PLAIN_STATUS = {"READ", "WRITE", "VISIBLE"}
# Keys of an LV section that say nothing the report needs.
IGNORED_KEYS = {"creation_time", "creation_host", "flags"}


def _strings(value: str) -> list[str] | None:
    """``["a", "b"]`` as a list; None if it is not that simple shape."""
    if not (value.startswith("[") and value.endswith("]")):
        return None
    inner = value[1:-1].strip()
    if not inner:
        return []
    items = [x.strip() for x in inner.split(",")]
    if any(len(x) < 2 or x[0] != '"' or x[-1] != '"' or '"' in x[1:-1] for x in items):
        return None
    return [x[1:-1] for x in items]


def _section_at(text: str, name: str) -> int | None:
    """Where LV ``name``'s section starts in ``logical_volumes`` (None: no such LV)."""
    start = text.find("\nlogical_volumes {\n")
    # The VG block ends before the description LVM appends (which quotes a command
    # line: it may hold anything), and the live LVs before the historical ones.
    end = text.find('\ncontents = "Text Format Volume Group"', start)
    if start < 0 or end < 0:
        return None
    historical = text.find("\nhistorical_logical_volumes {\n", start, end)
    at = text.find(f"\n{name} {{\nid = \"", start, historical if historical >= 0 else end)
    return None if at < 0 else at + 1


def lv_from_text(text: str, name: str, vg: VgInfo, old_attr: str | None = None, *,
                 state_known: bool = True) -> LvInfo | None:
    """LV ``name`` as ``lvs`` would report it, or None when it is absent or not a plain
    linear LV. Its state is ``old_attr``'s (the LV before the change) or, for a new LV
    (created inactive), "not active"; LVM without device-mapper
    (``state_known=False``) reports the state as unknown, "XX"."""
    at = _section_at(text, name)
    if at is None:
        return None
    lines = iter(text[at:].split("\n", 400))
    next(lines)  # "NAME {"
    uuid, status, tags, segments, extents = None, None, [], None, 0
    seen = 0
    for raw in lines:
        line = raw.split("#", 1)[0].strip() if '"' not in raw else raw.strip()
        if not line:
            continue
        if line == "}":
            break
        if line.endswith(" {") and segments is not None:  # "segmentN {"
            got = _segment(lines)
            if got is None:
                return None
            extents += got
            seen += 1
            continue
        key, eq, value = line.partition(" = ")
        if not eq:
            return None
        if key == "id":
            uuid = value.strip('"') if value.count('"') == 2 else None
        elif key == "status":
            status = _strings(value)
        elif key == "tags":
            got_tags = _strings(value)
            if got_tags is None:
                return None
            tags = got_tags
        elif key == "segment_count":
            segments = int(value) if value.isascii() and value.isdigit() else None
        elif key not in IGNORED_KEYS:
            return None
    else:
        return None
    if uuid is None or status is None or not set(status) <= PLAIN_STATUS \
            or "READ" not in status or segments is None or seen != segments or seen == 0:
        return None
    perm = "w" if "WRITE" in status else "r"
    state = "--" if state_known else "XX"
    attr = f"-{perm}i-{state}----" if old_attr is None or len(old_attr) != 10 else \
        old_attr[0] + perm + old_attr[2:]
    return LvInfo(vg_name=vg.name, name=name, uuid=uuid, size=extents * vg.extent_size,
                  attr=attr, tags=tuple(sorted(tags)), seg_count=segments)  # as lvs sorts


def _segment(lines: Iterator[str]) -> int | None:
    """The extent count of one ``segmentN { ... }`` of one stripe; None otherwise."""
    count, kind, stripes = None, None, None
    depth = 0
    for raw in lines:
        line = raw.strip()
        if not line:
            continue
        if depth:  # inside "stripes = [": "pvN", start
            if line == "]":
                depth = 0
            continue
        if line == "}":
            break
        key, eq, value = line.partition(" = ")
        if not eq:
            return None
        value = value.split("#", 1)[0].strip()
        if key == "extent_count":
            count = int(value) if value.isascii() and value.isdigit() else None
        elif key == "type":
            kind = value
        elif key == "stripe_count":
            stripes = value
        elif key == "stripes" and value == "[":
            depth = 1
        elif key != "start_extent":
            return None
    else:
        return None
    if kind != '"striped"' or stripes != "1" or count is None:
        return None
    return count


def vg_after(before: VgInfo, lvs: Mapping[str, LvInfo], seqno: int, gone: Sequence[str],
             lv: LvInfo | None) -> VgInfo | None:
    """The VG after one change that removed the LVs ``gone`` and left ``lv`` new or
    changed: free space and LV count follow from what moved. None if it does not add
    up (then LVM is asked)."""
    ext = before.extent_size
    old = [lvs[n] for n in {*gone, *([lv.name] if lv else [])} if n in lvs]
    freed = sum(x.size for x in old) - (lv.size if lv else 0)
    if freed % ext:
        return None
    free_count = before.free_count + freed // ext
    if not 0 <= free_count <= before.extent_count:
        return None
    count = before.lv_count - len(old) + (1 if lv is not None else 0)
    # LVM's free space in its metadata area moved too, by an amount only it knows: -1
    # (unknown) until the next full report, rather than the old figure.
    return replace(before, seqno=seqno, free_count=free_count, free=free_count * ext,
                   lv_count=count, mda_free=-1)
