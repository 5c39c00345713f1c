"""``fenceless status`` and ``writer status``: the control area as this host reads it.

Runs no LVM command and needs no agent: the anchor in the LUN's tail leads
to the control area, read with O_DIRECT through this host's own device.
Lease states need history (did a host's sector change, and when?), so they
come from the local agent's last observations when it is running; without
it a host is "free" or "unknown".
"""

from __future__ import annotations

from typing import Any

from fenceless.blockio import TimedIO, device_size, open_device
from fenceless.clock import SystemClock, boottime
from fenceless.config import HostConfig
from fenceless.control.anchor import NotInitialized, read_anchor
from fenceless.control.area import ControlArea
from fenceless.ledger.claims import HostClaims, read_all_claims
from fenceless.ledger.state import LedgerState, LedgerStateInvalid, ledger_hosts
from fenceless.localstate import agent_view, member
from fenceless.ondisk.errors import CorruptRecord


def read_status(cfg: HostConfig, vg_name: str | None, *,
                with_claims: bool = False) -> dict[str, Any]:
    """The cluster as this host sees it; ``with_claims`` adds what each host has mapped."""
    vg = cfg.vg(vg_name)
    path = vg.devices[0]
    # With a deadline: a hung path gives an error, not a hung command.
    dev = TimedIO(open_device(path), timeout=max(cfg.io_timeout, 1.0))
    try:
        size = device_size(path)
        anchor = read_anchor(dev, size)
        if anchor is None:
            raise NotInitialized(vg=vg.name, device=path)
        clock = SystemClock()
        area = ControlArea.open(dev, anchor, clock)
        hosts_area = area.hosts()
        raw = hosts_area.read_area()
        leader = area.writer().read_leader()
        view = area.ledger()
        claims = read_all_claims(area.dev, area.layout, area.sb.max_hosts) if with_claims else {}
    finally:
        dev.close()

    seen = agent_view(cfg.state_dir, vg.name)
    now = boottime()  # the agent publishes its view on the same clock
    fresh = seen is not None and isinstance(seen.get("mono"), int | float) and \
        now - float(seen["mono"]) < 4 * area.io_timeout
    observed = seen.get("hosts", {}) if fresh and seen else {}
    problems = [str(p) for p in view.problems]
    try:
        names = ledger_hosts(LedgerState.from_json(view.current.state)) if view.current else {}
    except LedgerStateInvalid as exc:
        names = {}
        problems.append(str(exc))
    hosts = _hosts(area, raw, names, observed, now, claims if with_claims else None)
    writer: dict[str, Any] | None = None
    if leader is not None:
        writer = {"host": leader.owner_name, "id": leader.owner_id, "epoch": leader.lver,
                  "generation": leader.owner_generation, "released": leader.released,
                  "state": _writer_state(leader, hosts)}
    me = member(cfg.state_dir, vg.name)
    return {
        "vg": anchor.vg_name, "cluster": str(anchor.cluster_uuid), "host": cfg.host,
        "host_id": me.get("host_id") if me else None,
        "writer": writer,
        "hosts": hosts,
        "ledger": {"generation": view.current.generation if view.current else None,
                   "epoch": view.current.epoch if view.current else None,
                   "problems": problems},
        "io_timeout": area.io_timeout,
        "lease_source": "agent" if fresh else "disk only (no running agent here)",
    }


def _hosts(area: ControlArea, raw: bytes, names: dict[int, str], observed: dict[str, Any],
           now: float, claims: dict[int, HostClaims | CorruptRecord] | None
           ) -> list[dict[str, Any]]:
    """One entry per host id in use: lease state (as the agent observed it), facts, claims."""
    hosts_area = area.hosts()
    hosts = []
    for hid in range(1, area.sb.max_hosts + 1):
        try:
            rec = hosts_area.decode(raw, hid)
            problem = None
        except CorruptRecord as exc:
            rec, problem = None, str(exc)
        if rec is None and problem is None and hid not in names:
            continue
        if problem is not None:
            lease = "unknown"
        elif rec is None or rec.free:
            lease = "free"
        else:
            lease = str(observed.get(str(hid), {}).get("state", "unknown"))
        entry: dict[str, Any] = {
            "id": hid, "name": rec.name if rec else names.get(hid, "?"), "lease": lease,
            "generation": rec.generation if rec else None,
            "age": _age(observed.get(str(hid), {}).get("changed"), now),
            "facts": dict(rec.facts) if rec else {},
        }
        if claims is not None:
            got = claims.get(hid)
            if isinstance(got, HostClaims):
                entry["claims"] = {lv: {"size_bytes": c.size, "mode": c.mode}
                                   for lv, c in got.lvs.items()}
            elif got is not None:
                entry["claims_error"] = str(got)
        if problem:
            entry["error"] = problem
        hosts.append(entry)
    return hosts


def _writer_state(leader: Any, hosts: list[dict[str, Any]]) -> str:
    """active, released, or gone (its host id now runs another incarnation, or is free/dead)."""
    if leader.released:
        return "released"
    host = next((h for h in hosts if h["id"] == leader.owner_id), None)
    if host is None or host["lease"] in ("free", "dead") or \
            host["generation"] != leader.owner_generation:
        return "gone"
    return "active" if host["lease"] == "live" else host["lease"]


def _age(changed: Any, now: float) -> float | None:
    """Seconds since the host's sector last changed, by this host's lease clock."""
    return round(now - float(changed), 2) if isinstance(changed, int | float) else None
