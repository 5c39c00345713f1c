"""``fenceless status --watch``: the cluster at a glance, redrawn every few seconds.

A colored table (rich) of the hosts (lease, its age with a small plot of the ages
seen while watching, role, guard, VMs), the writer with a plot of its recent request
times (which it publishes in its lease sector), and the VMs with where they run; it
fits 80 columns. Everything comes from the control area (``read_status``, with
claims) and the VM index: no LVM command runs, so watching costs the cluster nothing
but a few O_DIRECT reads per refresh.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import Any

from fenceless.errors import UserError

BARS = "▁▂▃▄▅▆▇█"
HISTORY = 24  # samples per plot (about two minutes at the default interval)
COLORS = {"live": "green", "fail": "yellow", "dead": "red", "free": "dim", "unknown": "magenta"}


class BadInterval(UserError):
    """--interval takes 0.2 to 3600 seconds (got {got})"""


def spark(values: list[float], top: float) -> str:
    """A one-line plot of ``values`` (0 .. ``top``)."""
    if top <= 0:
        return ""
    return "".join(BARS[min(len(BARS) - 1, int(v / top * (len(BARS) - 1)))] for v in values)


class Watch:
    """What one ``status --watch`` remembers between refreshes: each host's lease ages."""

    def __init__(self) -> None:
        self.ages: dict[str, deque[float]] = {}
        self.latency: deque[float] = deque(maxlen=HISTORY)  # the writer's request times

    def render(self, s: dict[str, Any], vms: list[dict[str, Any]]) -> Any:
        from rich.console import Group
        from rich.table import Table
        from rich.text import Text

        io = float(s["io_timeout"])
        w = s["writer"]
        head = Text.assemble(
            ("VG ", "bold"), (str(s["vg"]), "bold cyan"), f"  seen from {s['host']}  N={io}s  ",
            ("writer: ", "bold"),
            (f"{w['host']} epoch {w['epoch']} [{w['state']}]" if w else "none",
             "green" if w and w["state"] == "active" else "red"))
        hosts = Table(box=None, pad_edge=False, expand=False)
        for col in ("ID", "HOST", "LEASE", "AGE", "AGES (0..8N)", "ROLE", "GUARD", "MAPS"):
            hosts.add_column(col, no_wrap=True)
        for h in s["hosts"]:
            ages = self.ages.setdefault(h["name"], deque(maxlen=HISTORY))
            if h["age"] is not None:
                ages.append(float(h["age"]))
            guard = h["facts"].get("guard", "-")
            # Everything read from the LUN goes in as plain Text: never as rich markup.
            hosts.add_row(str(h["id"]), Text(str(h["name"])),
                          Text(str(h["lease"]), style=COLORS.get(h["lease"], "")),
                          "-" if h["age"] is None else f"{h['age']:.1f}s",
                          spark(list(ages), 8 * io), Text(str(h["facts"].get("lvm_role", "-"))),
                          Text(str(guard), style="green" if guard == "ok" else "red"),
                          str(len(h.get("claims") or {})))
        parts: list[Any] = [head, hosts]
        writer = next((h for h in s["hosts"] if w and h["name"] == w["host"]), None)
        req_ms = writer["facts"].get("req_ms") if writer else None
        if isinstance(req_ms, int | float):
            self.latency.append(float(req_ms))
            parts.append(Text.assemble(
                ("requests on the writer: ", "bold"), f"{req_ms:.0f} ms (median of the last) ",
                spark(list(self.latency), max(self.latency))))
        if vms:
            table = Table(box=None, pad_edge=False)
            for col in ("VM", "HOST", "STATE", "DISKS"):
                table.add_column(col, no_wrap=True, max_width=30)
            for v in vms:
                table.add_row(Text(str(v["name"])), Text(str(v["host"] or "-")),
                              Text(str(v["state"])),
                              Text(" ".join(str(d["volume"]) for d in v["disks"])))
            parts.append(table)
        problems = s["ledger"].get("problems", [])
        parts += [Text(f"problem: {p}", style="red") for p in problems]
        return Group(*parts)


def watch(read: Callable[[], tuple[dict[str, Any], list[dict[str, Any]]]],
          interval: float, *, count: int | None = None) -> None:
    """Redraw every ``interval`` seconds until interrupted (or ``count`` times)."""
    from rich.console import Console
    from rich.live import Live

    view = Watch()
    console = Console(width=min(Console().width, 80) if Console().is_terminal else 80)
    with Live(console=console, auto_refresh=False, transient=False) as live:
        n = 0
        while count is None or n < count:
            status, vms = read()
            live.update(view.render(status, vms), refresh=True)
            n += 1
            if count is None or n < count:
                time.sleep(interval)
