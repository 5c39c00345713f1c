"""The ledger's payload: the cluster state the writer publishes."""

from __future__ import annotations

from typing import Any


def ledger_hosts(state: dict[str, Any]) -> dict[int, str]:
    raw = state.get("hosts", {})
    out: dict[int, str] = {}
    if isinstance(raw, dict):
        for k, v in raw.items():
            if str(k).isdigit() and isinstance(v, dict) and isinstance(v.get("name"), str):
                out[int(k)] = v["name"]
    return out
