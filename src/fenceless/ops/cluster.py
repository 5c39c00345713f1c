"""Making a cluster (``init``) and entering one (``join``).

Both run inside the host's agent, which then keeps renewing the leases they
took: a lease taken by a CLI process that then exits would only decay.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from fenceless.blockio import BlockDevice
from fenceless.clock import Clock
from fenceless.config import HostConfig, VgConfig
from fenceless.control.anchor import (
    TAIL_SIZE,
    Anchor,
    NotInitialized,
    init_lock_region,
    read_anchor,
    tail_offset,
    write_anchor,
)
from fenceless.control.area import ControlArea, OffsetDevice, format_regions
from fenceless.errors import IntegrityError, UserError
from fenceless.faults import crashpoint
from fenceless.lease.delta import DeltaLease, HostArea
from fenceless.lease.errors import HostIdInUse
from fenceless.ledger.slots import write_ledger
from fenceless.ledger.state import HostEntry, LedgerState, WriterInfo, ledger_hosts
from fenceless.localstate import member, set_member
from fenceless.lvm.adapter import Lvm, Role
from fenceless.lvm.mapping import single_extent
from fenceless.lvm.policy import CONTROL_LV
from fenceless.ondisk.errors import CorruptRecord
from fenceless.ondisk.layout import Layout, Superblock, read_superblock, write_superblock
from fenceless.ops.base import Operation
from fenceless.validate import human

CONTROL_TAG = "fenceless_control"
METADATA_SIZE = "16m"  # room for ~30k LVs; the default area fills at 1843 here
EXTENT_SIZE = "4m"


class AlreadyInitialized(UserError):
    """Refused: VG {vg} on {device} already has a fenceless control area (cluster \
{cluster}, control LV {lv}). Run `fenceless join` on the other hosts instead."""


class VgExists(UserError):
    """Refused: VG {vg} already exists on {device} ({lvs} LVs) and is not a fenceless VG \
yet. `fenceless init --adopt` adds the control LV in free space and touches no existing LV."""


class InitBusy(UserError):
    """Refused: another host is initializing {device} right now ({detail}). Wait for it \
and run `fenceless join` here."""


class BadMaxHosts(UserError):
    """--max-hosts must be 1..250, got {max_hosts}"""


class ForeignPv(UserError):
    """Refused: {device} is a PV of VG {other}, not of {vg} (check [vg.{vg}] in {config})"""


class ForeignControlLv(UserError):
    """Refused: VG {vg} has an LV named {lv} that fenceless did not create"""


class DeviceNotInVg(UserError):
    """Refused: {device} is not a PV of VG {vg}"""


class PvInAnchorArea(UserError):
    """Refused: PV {pv} reaches into the last MiB of the device, which fenceless needs for \
its anchor. Shrink the PV first: `pvresize --setphysicalvolumesize {size}b {pv}` (needs that \
much free space at its end)."""


class NoRoomForControlLv(UserError):
    """Refused: VG {vg} has {free} free; the control LV needs {need}"""


class LunTooSmall(UserError):
    """Refused: {device} is {size}, too small for a fenceless VG"""


class UnreadableControlLv(UserError):
    """Refused: the control LV {lv} holds data fenceless cannot read ({detail}); not \
formatting over it"""


class AnchorMissing(UserError):
    """Refused: the control LV {lv} of VG {vg} already holds cluster {cluster}, but the \
anchor at the end of {device} is missing (was the LUN resized, or its last MiB \
overwritten?). fenceless does not reformat a cluster that may be live."""


class ControlLvMisplaced(IntegrityError):
    """control LV landed on {got}, not {device}"""


class FreshLeaseNotWon(IntegrityError):
    """a fresh writer lease was not won ({outcome})"""


class AlreadyJoined(UserError):
    """Refused: this host already joined cluster {cluster} as host id {host_id}"""


class NoFreeHostId(UserError):
    """Refused: no free host id (max_hosts {max_hosts}); {tried}"""


@dataclass
class VgEnv:
    """What an operation on one shared VG works with, as this host sees it."""

    cfg: HostConfig
    vg: VgConfig
    dev: BlockDevice  # this host's LUN device, O_DIRECT with deadlines
    device_size: int
    clock: Clock
    lvm: Callable[[Role], Lvm]
    log: Callable[[str], None] = field(default=lambda msg: None)

    @property
    def device(self) -> str:
        return self.vg.devices[0]

    @property
    def io_timeout(self) -> float:
        return self.cfg.io_timeout

    def facts(self) -> dict[str, Any]:
        from fenceless import __version__

        return {"version": __version__}


def _same_device(a: str, b: str) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


class InitOp(Operation):
    name = "init"

    def __init__(self, env: VgEnv, *, max_hosts: int = 16, adopt: bool = False) -> None:
        self.env = env
        self.max_hosts = max_hosts
        self.adopt = adopt
        self.layout = Layout.compute(max_hosts) if 1 <= max_hosts <= 250 else None
        self.init_lock: DeltaLease | None = None
        # Set by execute(), adopted by the agent:
        self.host_lease: DeltaLease | None = None
        self.area: ControlArea | None = None
        self.epoch = 0
        self._vg_exists = False

    def check_args(self) -> None:
        if self.layout is None:
            raise BadMaxHosts(max_hosts=self.max_hosts)

    def tail_is_unused(self) -> None:
        """The init lock and the anchor live in the device's last MiB: before the first
        write there, no PV on the device may have extents reaching into it (an adopted
        VG's PV often spans the whole LUN; its last extent may hold a VM's data)."""
        env = self.env
        lvm = env.lvm(Role.READER)
        extent = {v.name: v.extent_size for v in lvm.vgs()}
        for pv in lvm.pvs():
            if not _same_device(pv.name, env.device) or not pv.vg_name:
                continue
            if pv.vg_name not in extent:  # a VG this host's LVM does not show: unknown
                raise ForeignPv(device=env.device, other=pv.vg_name, vg=env.vg.name,
                                config=env.cfg.path)
            end = pv.pe_start + pv.pe_count * extent[pv.vg_name]
            if end > tail_offset(env.device_size):
                raise PvInAnchorArea(pv=pv.name, size=tail_offset(env.device_size))

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        env = self.env
        self.tail_is_unused()  # read-only, and before the lock's own write in the tail
        area = HostArea(env.dev, init_lock_region(env.device_size), 1, env.io_timeout,
                        env.clock)
        try:
            self.init_lock = area.acquire(1, f"init:{env.cfg.host}", {"host": env.cfg.host})
        except HostIdInUse as exc:
            raise InitBusy(device=env.device, detail=str(exc)) from exc
        try:
            yield
        finally:
            with contextlib.suppress(Exception):
                self.init_lock.release()

    def _keep_lock(self) -> None:
        """Renew the init lock between steps; past its time, stop."""
        assert self.init_lock is not None
        self.init_lock.renew()

    def check_prereq(self) -> None:
        env = self.env
        anchor = read_anchor(env.dev, env.device_size)
        if anchor is not None:
            raise AlreadyInitialized(vg=anchor.vg_name, device=env.device,
                                     cluster=anchor.cluster_uuid, lv=anchor.lv_name)
        lvm = env.lvm(Role.READER)
        vgs = {v.name: v for v in lvm.vgs()}
        pvs = {p.name: p for p in lvm.pvs()}
        mine = [p for p in pvs.values() if _same_device(p.name, env.device)]
        if mine and mine[0].vg_name and mine[0].vg_name != env.vg.name:
            raise ForeignPv(device=env.device, other=mine[0].vg_name, vg=env.vg.name,
                            config=env.cfg.path)
        self._vg_exists = env.vg.name in vgs
        assert self.layout is not None
        need = self.layout.total_size()
        if self._vg_exists:
            vg = vgs[env.vg.name]
            lvs = {lv.name: lv for lv in lvm.lvs()}
            ours = CONTROL_LV in lvs and CONTROL_TAG in lvs[CONTROL_LV].tags
            if not self.adopt and not ours:
                raise VgExists(vg=vg.name, device=env.device, lvs=vg.lv_count)
            if CONTROL_LV in lvs and not ours:
                raise ForeignControlLv(vg=vg.name, lv=CONTROL_LV)
            if ours:
                self._refuse_live_control_area(lvm, vg)
            pv = mine[0] if mine else None
            if pv is None:
                raise DeviceNotInVg(device=env.device, vg=vg.name)
            end = pv.pe_start + pv.pe_count * vg.extent_size
            if end > tail_offset(env.device_size):
                raise PvInAnchorArea(pv=pv.name, size=tail_offset(env.device_size))
            if not ours and vg.free < need:
                raise NoRoomForControlLv(vg=vg.name, free=human(vg.free), need=human(need))
        elif env.device_size < TAIL_SIZE + need + (64 << 20):
            raise LunTooSmall(device=env.device, size=human(env.device_size))

    def _refuse_live_control_area(self, lvm: Lvm, vg: Any) -> None:
        """A control LV that holds a superblock is a cluster: never format over it."""
        env = self.env
        pvs = {p.name: p for p in lvm.pvs()}
        ext = single_extent(lvm.segments(), pvs, vg.extent_size, vg.name, CONTROL_LV)
        if not _same_device(ext.device, env.device):
            return
        try:
            sb = read_superblock(OffsetDevice(env.dev, ext.offset, ext.size))
        except CorruptRecord as exc:
            raise UnreadableControlLv(lv=CONTROL_LV, detail=str(exc)) from exc
        if sb is not None:
            raise AnchorMissing(lv=CONTROL_LV, vg=vg.name, cluster=str(sb.cluster_uuid),
                                device=env.device)

    def lock_check(self) -> None:
        """Before every write of init: the init lock must have N to spare."""
        assert self.init_lock is not None
        self.init_lock.check(margin=self.env.io_timeout)

    def execute(self) -> dict[str, Any]:
        env = self.env
        assert self.layout is not None
        writer = env.lvm(Role.WRITER)
        assert self.init_lock is not None
        writer.timeout = max(1.0, self.init_lock.remaining() - env.io_timeout)
        if not self._vg_exists:
            self._keep_lock()
            writer.pvcreate(env.device, metadatasize=METADATA_SIZE,
                            size_bytes=tail_offset(env.device_size))
            crashpoint("init.pvcreated")
            self._keep_lock()
            writer.vgcreate([env.device], extent_size=EXTENT_SIZE)
            crashpoint("init.vgcreated")
            env.log(f"created VG {env.vg.name} on {env.device}")
        reader = env.lvm(Role.READER)
        if CONTROL_LV not in {lv.name for lv in reader.lvs()}:
            self._keep_lock()
            writer.lvcreate(CONTROL_LV, self.layout.total_size(), [CONTROL_TAG],
                            contiguous=True, pvs=[env.device])
            crashpoint("init.lvcreated")
        vg = reader.vg_info()
        pvs = {p.name: p for p in reader.pvs()}
        ext = single_extent(reader.segments(), pvs, vg.extent_size, vg.name, CONTROL_LV)
        if not _same_device(ext.device, env.device):
            raise ControlLvMisplaced(got=ext.device, device=env.device)
        lv_uuid = next(lv.uuid for lv in reader.lvs() if lv.name == CONTROL_LV)
        ctl = OffsetDevice(env.dev, ext.offset, ext.size)
        self._keep_lock()
        format_regions(ctl, self.layout, before_write=self._keep_lock)
        sb = Superblock(cluster_uuid=uuid.uuid4(), vg_uuid=vg.uuid,
                            io_timeout=env.io_timeout, creation_epoch=1, layout=self.layout)
        self.lock_check()
        write_superblock(ctl, sb, overwrite=True)
        crashpoint("init.formatted")
        self._keep_lock()
        area = ControlArea(ctl, sb, env.clock)
        lease = area.hosts().acquire(1, env.cfg.host, env.facts())
        self._keep_lock()
        got = area.writer().acquire(1, lease.generation, lambda h, g: True,
                                    name=env.cfg.host, before_write=lease.check)
        if not got.won:
            raise FreshLeaseNotWon(outcome=got.outcome.value)
        state = LedgerState(cluster=str(sb.cluster_uuid), vg=vg.name,
                            writer=WriterInfo(1, env.cfg.host, got.epoch),
                            hosts={1: HostEntry(env.cfg.host, got.epoch)})
        self._keep_lock()
        write_ledger(ctl, self.layout, got.epoch, state.to_json(), writer_host_id=1,
                     both_slots=True, before_write=self.lock_check)
        crashpoint("init.ledger-written")
        self._keep_lock()
        # The commit point: from here on, every host can find the cluster.
        self.lock_check()
        write_anchor(env.dev, env.device_size, Anchor(
            cluster_uuid=sb.cluster_uuid, vg_name=vg.name, vg_uuid=vg.uuid,
            lv_name=CONTROL_LV, lv_uuid=lv_uuid, offset=ext.offset, length=ext.size))
        self.host_lease, self.area, self.epoch = lease, area, got.epoch
        env.log(f"initialized cluster {sb.cluster_uuid} on VG {vg.name}; this host is id 1 "
                f"and the metadata writer at epoch {got.epoch}")
        return {"cluster": str(sb.cluster_uuid), "vg": vg.name, "host_id": 1,
                "generation": lease.generation, "epoch": got.epoch, "control_lv": CONTROL_LV,
                "control_offset": ext.offset, "max_hosts": self.max_hosts}

    def record(self, result: dict[str, Any]) -> None:
        set_member(self.env.cfg.state_dir, self.env.vg.name, {
            "cluster": result["cluster"], "host_id": result["host_id"],
            "name": self.env.cfg.host})


class JoinOp(Operation):
    name = "join"

    def __init__(self, env: VgEnv) -> None:
        self.env = env
        self.area: ControlArea | None = None
        self.anchor: Anchor | None = None
        self.host_lease: DeltaLease | None = None

    def check_prereq(self) -> None:
        env = self.env
        self.anchor = read_anchor(env.dev, env.device_size)
        if self.anchor is None:
            raise NotInitialized(vg=env.vg.name, device=env.device)
        self.area = ControlArea.open(env.dev, self.anchor, env.clock)
        known = member(env.cfg.state_dir, env.vg.name)
        if known and known.get("cluster") == str(self.anchor.cluster_uuid):
            raise AlreadyJoined(cluster=str(self.anchor.cluster_uuid),
                                host_id=known.get("host_id"))

    def candidates(self) -> list[int]:
        """Our own earlier id first, then ids no host has ever used."""
        assert self.area is not None
        hosts = self.area.hosts()
        raw = hosts.read_area()
        view = self.area.ledger().current
        in_ledger = ledger_hosts(LedgerState.from_json(view.state)) if view else {}
        own, fresh = [], []
        for hid in range(1, self.area.sb.max_hosts + 1):
            try:
                rec = hosts.decode(raw, hid)
            except CorruptRecord:
                continue  # never take (or overwrite) a sector we cannot read
            if (rec is not None and rec.name == self.env.cfg.host) or \
                    in_ledger.get(hid) == self.env.cfg.host:
                own.append(hid)
            elif rec is None and hid not in in_ledger:
                fresh.append(hid)
        return own + fresh

    def execute(self) -> dict[str, Any]:
        assert self.area is not None and self.anchor is not None
        tried = []
        for hid in self.candidates():
            try:
                lease = self.area.hosts().acquire(hid, self.env.cfg.host, self.env.facts())
            except HostIdInUse as exc:
                tried.append(f"id {hid}: {exc}")
                continue
            self.host_lease = lease
            self.env.log(f"joined cluster {self.anchor.cluster_uuid} as host id {hid} "
                         f"(generation {lease.generation})")
            return {"cluster": str(self.anchor.cluster_uuid), "vg": self.anchor.vg_name,
                    "host_id": hid, "generation": lease.generation}
        raise NoFreeHostId(max_hosts=self.area.sb.max_hosts, tried="; ".join(tried[-3:]))

    def record(self, result: dict[str, Any]) -> None:
        set_member(self.env.cfg.state_dir, self.env.vg.name, {
            "cluster": result["cluster"], "host_id": result["host_id"],
            "name": self.env.cfg.host})
