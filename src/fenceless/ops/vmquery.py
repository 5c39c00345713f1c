"""``vm list`` and ``vm show``: the VM index and definitions, read from the LUN on any host.

No LVM call and no agent: the index is in the ledger, the XML in the VM store
(``ledger/vmstore.py``), both read with O_DIRECT like ``status`` reads the
control area, so every host sees a change as soon as the writer made it (the
read-only ext4 mounts this replaces kept showing stale files).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from fenceless.config import HostConfig
from fenceless.errors import UserError
from fenceless.ledger import vmstore
from fenceless.ledger.state import LedgerState, VmEntry


class UnknownVm(UserError):
    """No VM named {name} is defined in VG {vg}{hint}"""


class NoSuchVersion(UserError):
    """VM {name} has no version {version} in the store (kept: {kept})"""


@contextmanager
def _area(cfg: HostConfig, vg_name: str | None) -> Iterator[tuple[Any, LedgerState, str]]:
    from fenceless.blockio import TimedIO, device_size, open_device
    from fenceless.clock import SystemClock
    from fenceless.control.anchor import NotInitialized, read_anchor
    from fenceless.control.area import ControlArea

    vg = cfg.vg(vg_name)
    path = vg.devices[0]
    dev = TimedIO(open_device(path), timeout=max(cfg.io_timeout, 1.0))
    try:
        anchor = read_anchor(dev, device_size(path))
        if anchor is None:
            raise NotInitialized(vg=vg.name, device=path)
        area = ControlArea.open(dev, anchor, SystemClock())
        view = area.ledger()
        state = LedgerState.from_json(view.current.state) if view.current else LedgerState()
        yield area, state, vg.name
    finally:
        dev.close()


def read_ledger(cfg: HostConfig, vg_name: str | None) -> LedgerState:
    """The ledger as it is on the LUN now (the VM index among it)."""
    with _area(cfg, vg_name) as found:
        return found[1]


def entry_json(e: VmEntry) -> dict[str, Any]:
    return {"name": e.name, "host": e.host, "state": e.state, "memory_mib": e.memory_mib,
            "vcpus": e.vcpus, "disks": [{"target": d.target, "volume": d.volume,
                                         "mode": d.mode} for d in e.disks],
            "version": e.seq, "epoch": e.epoch, "source": e.source, "want": e.want,
            "want_force": e.want_force, "want_live": e.want_live, "moving_to": e.moving_to,
            "left": e.left, "error": e.error,
            "holder": {"host_id": e.holder_id, "generation": e.holder_gen,
                       "since_epoch": e.since_epoch} if e.host else None}


def vm_list(cfg: HostConfig, vg_name: str | None) -> list[dict[str, Any]]:
    """Every defined VM, by name: name, host (or None), state, size and disks."""
    with _area(cfg, vg_name) as found:
        state = found[1]
        return [entry_json(state.vms[name]) for name in sorted(state.vms)]


def vm_show(cfg: HostConfig, vg_name: str | None, name: str, *,
            version: int | None = None) -> dict[str, Any]:
    """One VM with its XML (``version``: an earlier one, while the store keeps it)."""
    with _area(cfg, vg_name) as (area, state, vg):
        entry = state.vms.get(name)
        earlier = [h for h in state.vm_history if h.name == name]
        if entry is None and version is None:
            kept = ", ".join(str(h.seq) for h in earlier)
            hint = f" (it was undefined; earlier versions: {kept})" if earlier else ""
            raise UnknownVm(name=name, vg=vg, hint=hint)
        out: dict[str, Any] = entry_json(entry) if entry is not None else {
            "name": name, "host": None, "state": "undefined"}
        versions = [h.seq for h in earlier] + ([entry.seq] if entry else [])
        out["versions"] = versions
        if version is None or (entry is not None and version == entry.seq):
            assert entry is not None
            slot, seq, sha = entry.slot, entry.seq, entry.sha
        else:
            old = next((h for h in earlier if h.seq == version), None)
            if old is None:
                raise NoSuchVersion(name=name, version=version,
                                    kept=", ".join(map(str, versions)) or "none")
            slot, seq, sha = old.slot, old.seq, old.sha
        out["xml"] = vmstore.read_definition(area.dev, area.layout, slot, name=name, seq=seq,
                                             sha=sha)
        out["shown_version"] = seq
        return out
