"""A control area on a memory or O_DIRECT device, with real leases, for agent and ops tests.

The lease keeper, the ledger, the mailboxes and the audit/history rings are
the real code over a ``BlockDevice``; only LVM is replaced, by ``FakeVg``: an
in-memory VG that keeps LVs, extents and a seqno the way LVM reports them,
so the journal engine's plan -> journal -> apply -> record path and its
reconcile run without root. The lab tests run the same paths on real LVM.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from fenceless.agent.keeper import LeaseKeeper
from fenceless.agent.local import LocalLvs
from fenceless.agent.port import AgentPort
from fenceless.blockio import BlockDevice
from fenceless.clock import FakeClock
from fenceless.config import HostConfig, VgConfig
from fenceless.control.area import ControlArea, format_regions
from fenceless.errors import CommandTimeout, LvmError, NotFound
from fenceless.lease.delta import HostObserver
from fenceless.lvm.activation import ActiveLv
from fenceless.lvm.parse import LvInfo, VgInfo
from fenceless.ondisk.layout import Layout, Superblock, write_superblock
from fenceless.ops.context import Context

N = 0.1
EXTENT = 4 << 20


@dataclass
class FakeVg:
    """An LVM VG in memory: what the journaled operations see through ``Lvm``."""

    name: str = "sanvg"
    size: int = 8 << 30
    seqno: int = 1
    lvs: dict[str, LvInfo] = field(default_factory=dict)
    commands: list[tuple[str, ...]] = field(default_factory=list)
    fail_next: str | None = None  # the next command of this name fails before any effect
    crash_after: str | None = None  # the next command of this name takes effect, then fails
    time_out_after: str | None = None  # ... takes effect, then is killed for running too long

    def info(self) -> VgInfo:
        used = sum(lv.size for lv in self.lvs.values())
        return VgInfo(name=self.name, uuid="vg-uuid", size=self.size, free=self.size - used,
                      extent_size=EXTENT, extent_count=self.size // EXTENT,
                      free_count=(self.size - used) // EXTENT, seqno=self.seqno,
                      lv_count=len(self.lvs), pv_count=1, mda_size=1 << 20,
                      mda_free=1 << 19, attr="wz--n-", tags=())

    def _cmd(self, *argv: str) -> Callable[[], None]:
        self.commands.append(argv)
        if self.fail_next == argv[0]:
            self.fail_next = None
            raise LvmError(command=" ".join(argv), rc=5, stderr="injected failure")

        def after() -> None:
            self.seqno += 1
            if self.crash_after == argv[0]:
                self.crash_after = None
                raise LvmError(command=" ".join(argv), rc=5, stderr="injected: died after it")
            if self.time_out_after == argv[0]:
                self.time_out_after = None
                raise CommandTimeout(argv0=" ".join(argv[:2]), timeout=1.0)
        return after

    def _lv(self, name: str, size: int, tags: Sequence[str] = (), uid: str = "") -> LvInfo:
        return LvInfo(vg_name=self.name, name=name, uuid=uid or str(uuid.uuid4()), size=size,
                      attr="-wi-------", tags=tuple(tags), seg_count=1)


def no_text(**_: object) -> tuple[str, int]:
    """A fake VG has no metadata text on a PV (lvm/lvtext.py is tested on LVM's own)."""
    from fenceless.lvm.mda import NoVgMetadata

    raise NoVgMetadata(path="/dev/fake", detail="a fake VG")


class FakeLvm:
    """The part of ``fenceless.lvm.adapter.Lvm`` that volume operations use."""

    def __init__(self, vg: FakeVg) -> None:
        self.fake = vg
        self.vg = VgConfig(vg.name, ("/dev/fake",))
        self.timeout = 60.0
        self.driver_loaded = True

    def vg_info(self) -> VgInfo:
        return self.fake.info()

    def vg_and_lvs(self) -> tuple[VgInfo, list[LvInfo]]:
        return self.fake.info(), list(self.fake.lvs.values())

    def vg_and_lv(self, name: str) -> tuple[VgInfo, LvInfo]:
        if name not in self.fake.lvs:
            raise NotFound(kind="volume", name=name, where="")
        return self.fake.info(), self.fake.lvs[name]

    def lvs(self) -> list[LvInfo]:
        return list(self.fake.lvs.values())

    def lvcreate(self, name: str, size_bytes: int, tags: Sequence[str] = (), *,
                 timeout: float | None = None, **_: Any) -> None:
        after = self.fake._cmd("lvcreate", name)
        self.fake.lvs[name] = self.fake._lv(name, size_bytes, tags)
        after()

    def lvextend(self, name: str, size_bytes: int, *, timeout: float | None = None) -> None:
        after = self.fake._cmd("lvextend", name)
        old = self.fake.lvs[name]
        self.fake.lvs[name] = self.fake._lv(name, size_bytes, old.tags, old.uuid)
        after()

    def lvrename(self, old: str, new: str, *, timeout: float | None = None) -> None:
        after = self.fake._cmd("lvrename", old, new)
        lv = self.fake.lvs.pop(old)
        self.fake.lvs[new] = self.fake._lv(new, lv.size, lv.tags, lv.uuid)
        after()

    def lvremove(self, name: str, *, timeout: float | None = None) -> None:
        after = self.fake._cmd("lvremove", name)
        del self.fake.lvs[name]
        after()


class FakeActivator:
    """Mappings of LVs on this host, sized from the fake VG."""

    def __init__(self, vg: FakeVg | None = None) -> None:
        self.vg = vg
        self.mapped: dict[str, int] = {}

    def _got(self, lv: str, readonly: bool = False) -> ActiveLv:
        return ActiveLv("sanvg", lv, f"/dev/fake/{lv}", self.mapped[lv], readonly)

    def activate(self, lv: str, *, readonly: bool) -> ActiveLv:
        assert self.vg is not None
        self.mapped[lv] = self.vg.lvs[lv].size
        return self._got(lv, readonly)

    def deactivate(self, lv: str) -> None:
        self.mapped.pop(lv, None)

    def refresh(self, lv: str) -> ActiveLv:
        return self.activate(lv, readonly=False)

    def active(self) -> list[ActiveLv]:
        return [ActiveLv("sanvg", lv, f"/dev/fake/{lv}", size, False)
                for lv, size in self.mapped.items()]


class FakeFence:
    """A watchdog that is always there; it keeps what it was armed with."""

    def __init__(self) -> None:
        self.armed: dict[str, float] = {}
        self.connected = True

    def arm(self, vg: str, fire_at: float) -> bool:
        if self.connected:
            self.armed[vg] = fire_at
        return self.connected

    def disarm(self, vg: str) -> bool:
        self.armed.pop(vg, None)
        return self.connected


def make_area(dev: BlockDevice, clock: FakeClock, max_hosts: int = 4) -> ControlArea:
    layout = Layout.compute(max_hosts)
    format_regions(dev, layout)
    sb = Superblock(cluster_uuid=uuid.uuid4(), vg_uuid="vg-uuid", io_timeout=N,
                    creation_epoch=1, layout=layout)
    write_superblock(dev, sb)
    return ControlArea(dev, sb, clock)


@dataclass
class Host:
    """One host of a harness cluster: its keeper and port, as the agent builds them."""

    name: str
    keeper: LeaseKeeper
    port: AgentPort
    local: LocalLvs
    activator: FakeActivator
    logs: list[str]
    noted: list[tuple[str, int]]
    fence: FakeFence


def host(area: ControlArea, clock: FakeClock, name: str, host_id: int, vg: FakeVg,
         state_dir: str = "/nonexistent") -> Host:
    """A host holding host id ``host_id`` on ``area``, with LVM replaced by ``vg``."""
    cfg = HostConfig(path="<test>", host=name, state_dir=state_dir, io_timeout=N,
                     vgs=(VgConfig(vg.name, ("/dev/fake",)),))
    logs: list[str] = []
    keeper = LeaseKeeper(cfg, cfg.vgs[0], clock, lambda p, w: area.dev, logs.append)
    keeper.area = area
    keeper.observer = HostObserver(area.hosts())
    keeper.lease = area.hosts().acquire(host_id, name, {})
    activator = FakeActivator(vg)
    local = LocalLvs(lambda: activator, lambda: FakeLvm(vg), clock,  # type: ignore[arg-type,return-value]
                     logs.append)
    fence = FakeFence()
    port = AgentPort(cfg, cfg.vgs[0], Context(cfg), keeper, local, clock, logs.append,
                     lambda entry: None, dict, fence)
    # LVM and its metadata area on the PV are the fake VG's: the snapshot cache keys on
    # its seqno, and the history ring records which changes were noted.
    port.lvm = lambda role=None: FakeLvm(vg)  # type: ignore[assignment,method-assign,misc]
    port.metadata_key = lambda: vg.seqno  # type: ignore[method-assign]
    port.read_metadata = no_text  # type: ignore[method-assign]  # the journal asks LVM
    port.activator = lambda: activator  # type: ignore[assignment,method-assign,return-value]
    noted: list[tuple[str, int]] = []
    port.note_metadata_change = lambda rid, seqno: noted.append((rid, seqno))  # type: ignore[method-assign]
    return Host(name, keeper, port, local, activator, logs, noted, fence)


def writer_and_reader(dev: BlockDevice) -> tuple[FakeClock, FakeVg, Host, Host]:
    """h1, the writer at epoch 1, and h2, a reader that may take over; one VG."""
    from fenceless.ops.writer import become_writer

    clock = FakeClock()
    area = make_area(dev, clock)
    vg = FakeVg()
    h1 = host(area, clock, "h1", 1, vg)
    h2 = host(area, clock, "h2", 2, vg)
    assert become_writer(h1.port, "test").epoch == 1
    return clock, vg, h1, h2
