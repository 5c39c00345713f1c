"""``fenceless scan``: what this host sees of a shared VG, read-only.

Useful on its own (is the LUN visible here? which seqno does this host's
LVM read?) and the first thing to compare when two hosts disagree.
"""

from __future__ import annotations

from typing import Any

from fenceless.lvm.parse import as_json
from fenceless.ops.context import Context


def scan(ctx: Context, vg: str | None) -> dict[str, Any]:
    lvm = ctx.lvm(vg)
    info = lvm.vg_info()
    return {
        "host": ctx.cfg.host,
        "vg": as_json(info),
        "pvs": as_json([p for p in lvm.pvs() if p.vg_name == info.name]),
        "lvs": as_json(lvm.lvs()),
    }
