"""Text output shared by the full CLI and its fast paths: tables, and ``status``.

Light on purpose (no argparse, no codecs): ``cli/fast.py`` prints ``status``
with it before the rest of the CLI is imported.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    """Rows as left-aligned columns under ``header`` (no trailing blanks)."""
    cells = [list(map(str, header))] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                     for r in cells)


def status_text(s: dict[str, Any]) -> str:
    """``fenceless status`` as text: the cluster, its writer and ledger, a row per host."""
    w = s["writer"]
    writer = "none" if w is None else (
        f"{w['host']} (id {w['id']}, generation {w['generation']}), epoch {w['epoch']} "
        f"[{w['state']}]")
    rows = [(h["id"], h["name"], h["lease"], "-" if h["age"] is None else f"{h['age']:.1f}s",
             h["generation"] if h["generation"] is not None else "-",
             h["facts"].get("lvm_role", "-")) for h in s["hosts"]]
    lines = [f"cluster {s['cluster']} on VG {s['vg']} (seen from {s['host']}; io_timeout "
             f"{s['io_timeout']}s; lease states from {s['lease_source']})",
             f"writer: {writer}",
             f"ledger: generation {s['ledger']['generation']} at epoch {s['ledger']['epoch']}",
             table(rows, ("ID", "HOST", "LEASE", "AGE", "GEN", "LVM ROLE"))]
    lines += [f"problem: {p}" for p in s["ledger"]["problems"]]
    return "\n".join(lines)


def explain(exc: BaseException) -> str:
    """The message, followed by its cause chain (as stratis-cli explains errors)."""
    parts = [str(exc)]
    cause = exc.__cause__
    while cause is not None and len(parts) < 4:
        text = str(cause)
        if text and text not in parts[-1]:
            parts.append(f"  because: {text}")
        cause = cause.__cause__
    return "\n".join(parts)
