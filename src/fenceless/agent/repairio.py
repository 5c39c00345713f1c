"""The writer agent's side of ``fenceless repair ledger`` (``ops/repair.py``): the reads
of every place on the LUN that the rebuild takes from, the copy of the damaged slots,
and the one write over them."""

from __future__ import annotations

import os
import time

from fenceless.agent.keeper import LeaseKeeper
from fenceless.blockio import SECTOR
from fenceless.control.anchor import read_anchor
from fenceless.errors import FencelessError
from fenceless.lease.delta import HostRecord, HostState
from fenceless.ledger import audit, slots, vmstore
from fenceless.ledger.state import LedgerState, RequestInfo, WriterInfo
from fenceless.ledger.vmstore import StoredXml
from fenceless.localstate import vg_dir
from fenceless.ondisk.errors import CorruptRecord
from fenceless.ondisk.layout import (
    Superblock,
    encode_superblock,
    read_superblock,
    rewrite_superblock,
)
from fenceless.ops.port import RolePort
from fenceless.ops.repair import Found, RepairNotWriter, RepairUnsure


class RepairIo:
    def __init__(self, port: RolePort, keeper: LeaseKeeper, state_dir: str) -> None:
        assert keeper.area is not None
        self.p, self.keeper, self.area, self.state_dir = port, keeper, keeper.area, state_dir
        self.host = port.host

    def writer(self) -> WriterInfo:
        epoch = self.p.epoch
        if epoch is None:
            leader = self.p.read_leader()
            who = f"{leader.owner_name} is, epoch {leader.lver}" if leader is not None \
                and not leader.released else "none is"
            raise RepairNotWriter(host=self.host, who=who)
        self.p.check_leader()
        return WriterInfo(self.p.host_id, self.host, epoch)

    def check_write(self) -> None:
        self.p.check_write()

    def slot_bytes(self) -> tuple[bytes, bytes]:
        return slots.slot_bytes(self.area.dev, self.area.layout)

    def damage(self, raw: tuple[bytes, bytes]) -> slots.Damage:
        disk = read_superblock(self.area.dev)
        if disk is None or encode_superblock(disk) != encode_superblock(self.area.sb):
            raise RepairUnsure(detail="the superblock on the LUN is not the one this agent "
                               "attached with (repair it first: `fenceless repair "
                               "superblock`; or restart the agent)")
        epoch = self.p.epoch
        assert epoch is not None  # (writer() ran first, and checked the leader)
        return slots.damage(raw, self.area.layout, epoch)

    def find(self, writer: WriterInfo) -> Found:
        dev, layout = self.area.dev, self.area.layout
        hosts_area = self.area.hosts()
        raw = hosts_area.read_area()
        assert self.keeper.observer is not None  # (fed this fresh read: "dead" from it)
        self.keeper.observer.observe(raw, self.p.clock.now())
        hosts: list[HostRecord] = []
        for hid in range(1, self.area.sb.max_hosts + 1):
            try:
                rec = hosts_area.decode(raw, hid)
            except CorruptRecord:
                continue  # its claims cannot be told apart: see ops/repair.py
            if rec is not None:
                hosts.append(rec)
        defs: list[tuple[int, StoredXml | FencelessError]] = []
        for slot in range(vmstore.slot_count(layout) if vmstore.has_store(layout) else 0):
            try:
                got = vmstore.read_slot(dev, layout, slot)
            except FencelessError as exc:
                defs.append((slot, exc))
                continue
            if got is not None:
                defs.append((slot, got))
        try:
            seqno: int | None = self.p.read_metadata()[1]
        except FencelessError:
            seqno = None
        claims = self.p.claims_now()
        dead = frozenset(hid for hid in claims if self.p.host_state(hid) is HostState.DEAD)
        return Found(cluster=str(self.area.sb.cluster_uuid), vg=self.p.vg, writer=writer,
                     hosts=hosts, claims=claims, definitions=defs,
                     audit=audit.read_log(dev, layout), vg_seqno=seqno,
                     wall_ms=int(time.time() * 1000), dead=dead)

    def keep_damaged(self, raw: tuple[bytes, bytes]) -> str:
        folder = vg_dir(self.state_dir, self.p.vg)
        folder.mkdir(parents=True, exist_ok=True)
        what = "ledger" if raw[1] else "superblock"
        path = folder / f"{what}-damaged-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-" \
            f"{time.monotonic_ns()}.bin"
        with open(path, "xb") as f:  # never over an earlier copy
            f.write(raw[0] + raw[1])
            f.flush()
            os.fsync(f.fileno())
        return str(path)

    def overwrite(self, state: LedgerState, expect: tuple[bytes, bytes]) -> int:
        epoch = self.p.epoch
        assert epoch is not None
        rec = slots.overwrite_ledger(self.area.dev, self.area.layout, epoch, state.to_json(),
                                     writer_host_id=self.p.host_id, expect=expect,
                                     before_write=self.p.check_write)
        self.p.ledger(fresh=True)  # the writer's copy: the new ledger
        return rec.generation

    def audit(self, host: str, request: RequestInfo, result: str, message: str) -> None:
        self.p.audit(host, request, result, message)

    def log(self, msg: str) -> None:
        self.p.log(msg)

    def superblock_bytes(self) -> bytes:
        return self.area.dev.read(0, SECTOR)

    def superblock_copy(self) -> Superblock:
        sb = self.area.sb
        assert self.keeper.dev is not None
        anchor = read_anchor(self.keeper.dev, self.keeper.size)
        if anchor is None or anchor != self.keeper.anchor or \
                anchor.cluster_uuid != sb.cluster_uuid or anchor.vg_uuid != sb.vg_uuid:
            found = "no anchor" if anchor is None else \
                f"the anchor of cluster {anchor.cluster_uuid}, VG {anchor.vg_uuid}"
            raise RepairUnsure(detail=f"this agent attached to cluster {sb.cluster_uuid} (VG "
                               f"{sb.vg_uuid}), but the LUN has {found} now")
        return sb

    def rewrite_superblock(self, sb: Superblock, expect: bytes) -> None:
        rewrite_superblock(self.area.dev, sb, expect=expect, before_write=self.p.check_write)
