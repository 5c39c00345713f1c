"""Reading the control area's history and audit rings, and planning a metadata restore.

Reading needs no agent and no LVM: like ``status``, it follows the anchor to
the control area through this host's own device, with O_DIRECT.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from fenceless.blockio import device_size, open_device
from fenceless.clock import SystemClock
from fenceless.config import HostConfig
from fenceless.control.anchor import NotInitialized, read_anchor
from fenceless.control.area import ControlArea
from fenceless.ledger import audit, history
from fenceless.lvm.mda import vg_identity


@contextmanager
def control_area(cfg: HostConfig, vg_name: str | None) -> Iterator[ControlArea]:
    vg = cfg.vg(vg_name)
    path = vg.devices[0]
    dev = open_device(path)
    try:
        anchor = read_anchor(dev, device_size(path))
        if anchor is None:
            raise NotInitialized(vg=vg.name, device=path)
        yield ControlArea.open(dev, anchor, SystemClock())
    finally:
        dev.close()


def _wall(ms: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000)) if ms else "-"


def read_log(cfg: HostConfig, vg: str | None, limit: int | None) -> list[dict[str, Any]]:
    with control_area(cfg, vg) as area:
        entries = audit.read_log(area.dev, area.layout, limit=limit)
    out = []
    for e in entries:
        if e.error is not None:
            out.append({"seq": e.seq, "error": str(e.error)})
            continue
        r = e.record
        assert r is not None
        out.append({"seq": e.seq, "time": _wall(e.wall_ms), "epoch": e.epoch, "host": r.host,
                    "user": r.user, "command": list(r.argv), "request_id": r.request_id,
                    "result": r.result, "message": r.message, "stale": e.stale})
    return out


def list_history(cfg: HostConfig, vg: str | None) -> list[dict[str, Any]]:
    with control_area(cfg, vg) as area:
        entries = history.list_entries(area.dev, area.layout)
    out = []
    for e in entries:
        if e.error is not None:
            out.append({"entry": e.seq, "error": str(e.error)})
            continue
        out.append({"seqno": e.vg_seqno, "time": _wall(e.wall_ms), "epoch": e.epoch,
                    "request_id": e.request_id, "writer_host_id": e.writer_host_id,
                    "text_bytes": e.text_size, "stored_bytes": e.stored_size,
                    "stale": e.stale})
    return out


def read_version(cfg: HostConfig, vg: str | None, seqno: int) -> str:
    with control_area(cfg, vg) as area:
        return history.read_entry(area.dev, area.layout, seqno, parse=vg_identity)


_OPEN = re.compile(r"^\s*([A-Za-z0-9+_.][A-Za-z0-9+_.-]*)\s*\{\s*$")


def lv_blocks(text: str) -> dict[str, str]:
    """Each LV's block of an LVM metadata text, by name.

    LVM writes the text on disk without indentation, and ``vgcfgbackup`` with
    tabs: only the nesting of braces is relied on (names and braces sit on
    lines of their own in both).
    """
    out: dict[str, str] = {}
    depth = 0
    in_lvs = False
    current: str | None = None
    lines: list[str] = []
    for line in text.splitlines():
        stripped = line.split("#", 1)[0].strip()
        m = _OPEN.match(stripped)
        if m:
            depth += 1
            if depth == 2 and m.group(1) == "logical_volumes":
                in_lvs = True
            elif depth == 3 and in_lvs:
                current, lines = m.group(1), []
        if current is not None:
            lines.append(stripped)
        if stripped == "}":
            if depth == 3 and current is not None:
                out[current] = "\n".join(lines)
                current = None
            elif depth == 2:
                in_lvs = False
            depth -= 1
    return out


def with_seqno(text: str, seqno: int) -> str:
    """The text with the VG's seqno set (the first ``seqno =`` line is the VG's)."""
    return re.sub(r"^(\s*)seqno = [0-9]+$", rf"\g<1>seqno = {seqno}", text, count=1,
                  flags=re.M)


def changed_lvs(current: str, target: str) -> list[str]:
    """LVs that a restore from ``current`` to ``target`` would create, change or remove."""
    a, b = lv_blocks(current), lv_blocks(target)
    return sorted(n for n in set(a) | set(b) if a.get(n) != b.get(n))
