"""Lab activation: an LV "activated" on a host is a loop device over that host's LUN view.

This kernel has no device-mapper, so a single-segment linear LV is mapped
with ``losetup --offset --sizelimit`` over the host's own loop device. The
mapping is read from metadata taken with ``--readonly``, exactly as a
production reader builds its device-mapper table, and it is recorded in the
host's state dir so that every later command (and ``lab down``) finds it.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from fenceless.errors import IntegrityError, UserError
from fenceless.lab import loopdev
from fenceless.lvm.activation import ActiveLv
from fenceless.lvm.adapter import Lvm
from fenceless.lvm.mapping import ByteExtent, single_extent
from fenceless.runner import Runner


class MappingChanged(IntegrityError):
    """LV {vg}/{lv} moved on the LUN (was at offset {old}, metadata now says {new}); \
deactivate and activate it again"""


class AlreadyActive(UserError):
    """LV {vg}/{lv} is already active {mode} here as {device}; deactivate it first"""


class NotActive(UserError):
    """LV {vg}/{lv} is not active on this host"""


@dataclass
class LabActivator:
    lvm: Lvm
    runner: Runner
    state_dir: str

    def _record_path(self, lv: str) -> Path:
        return Path(self.state_dir) / "lab-active" / self.lvm.vg.name / f"{lv}.json"

    def _extent(self, lv: str) -> ByteExtent:
        return self._extent_and_permission(lv)[0]

    def _extent_and_permission(self, lv: str) -> tuple[ByteExtent, bool]:
        """Where the LV lies, and whether its LVM permission is read-only."""
        vg = self.lvm.vg_info()
        pvs = {p.name: p for p in self.lvm.pvs()}
        segs = self.lvm.segments(lv)
        protected = any(s.lv_attr[1:2] == "r" for s in segs)
        return single_extent(segs, pvs, vg.extent_size, vg.name, lv), protected

    def _load(self, lv: str, loops: dict[str, loopdev.LoopInfo] | None = None
              ) -> ActiveLv | None:
        try:
            rec = json.loads(self._record_path(lv).read_text())
        except FileNotFoundError:
            return None
        info = loopdev.info(rec["device"]) if loops is None else loops.get(rec["device"])
        if info is None or info.offset != rec["offset"] or info.backing != rec["over"]:
            # The loop device is gone or reused by someone else: the record is stale.
            self._record_path(lv).unlink(missing_ok=True)
            return None
        return ActiveLv(self.lvm.vg.name, lv, rec["device"], info.sizelimit, info.readonly)

    def _save(self, lv: str, device: str, extent: ByteExtent) -> None:
        path = self._record_path(lv)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"device": device, "over": extent.device,
                                   "offset": extent.offset}))
        os.replace(tmp, path)

    def activate(self, lv: str, *, readonly: bool) -> ActiveLv:
        current = self._load(lv)
        if current is not None:
            if current.readonly != readonly:
                mode = "read-only" if current.readonly else "read-write"
                raise AlreadyActive(vg=self.lvm.vg.name, lv=lv, mode=mode,
                                    device=current.device)
            return current
        extent, protected = self._extent_and_permission(lv)
        # As LVM does: an LV whose permission is read-only is activated read-only.
        readonly = readonly or protected
        # Direct I/O to the host's LUN device: a dm-linear mapping has no page cache
        # of its own, and neither may its stand-in (else it serves stale bytes).
        device = loopdev.attach(self.runner, extent.device, offset=extent.offset,
                                sizelimit=extent.size, readonly=readonly, direct_io=True)
        self._save(lv, device, extent)
        return ActiveLv(self.lvm.vg.name, lv, device, extent.size, readonly)

    def deactivate(self, lv: str) -> None:
        current = self._load(lv)
        if current is None:
            return
        loopdev.detach(self.runner, current.device)
        self._record_path(lv).unlink(missing_ok=True)

    def refresh(self, lv: str) -> ActiveLv:
        current = self._load(lv)
        if current is None:
            raise NotActive(vg=self.lvm.vg.name, lv=lv)
        rec = json.loads(self._record_path(lv).read_text())
        extent = self._extent(lv)
        if extent.offset != rec["offset"] or extent.device != rec["over"]:
            raise MappingChanged(vg=self.lvm.vg.name, lv=lv, old=rec["offset"], new=extent.offset)
        if extent.size != current.size:
            loopdev.set_sizelimit(current.device, extent.size)
        return ActiveLv(self.lvm.vg.name, lv, current.device, extent.size, current.readonly)

    def active(self) -> list[ActiveLv]:
        folder = Path(self.state_dir) / "lab-active" / self.lvm.vg.name
        out = []
        loops = {x.device: x for x in loopdev.list_loops()}  # one look at /sys for all
        with contextlib.suppress(FileNotFoundError):
            for rec in sorted(folder.glob("*.json")):
                got = self._load(rec.stem, loops)
                if got is not None:
                    out.append(got)
        return out


def reset_host(state_dir: str, runner: Runner) -> list[str]:
    """What a reset does to a lab host's mappings: every one is gone (the watchdog's step).

    Production mappings are device-mapper tables, which a reset clears; the
    lab's are loop devices, which would outlive a killed agent.
    """
    from fenceless.holders import kill_holders

    records = sorted(Path(state_dir).glob("lab-active/*/*.json"))
    devices = []
    for rec in records:
        with contextlib.suppress(ValueError, OSError, KeyError):
            devices.append(json.loads(rec.read_text())["device"])
    # The VMs first: a detached loop device stays usable to whoever holds it open.
    kill_holders(devices)
    gone = []
    for rec in records:
        with contextlib.suppress(ValueError, OSError, KeyError):
            device = json.loads(rec.read_text())["device"]
            info = loopdev.info(device)
            if info is not None:
                loopdev.detach(runner, device)
                gone.append(device)
        rec.unlink(missing_ok=True)
    return gone
