"""The lease keeper: this host's hold on its host id in one VG's cluster.

It finds the control area (through the anchor, on this host's own device),
takes the host id this host joined with, renews it every 2N, and feeds every
renewal's read of the host area to the observer that judges the others LIVE,
FAIL or DEAD. All its I/O goes through ``TimedIO``: a hung path costs a
renewal, never the thread (docs/design.md, "I/O that never returns").

If renewals fail, the keeper tells its owner to stop exclusive work first
(``on_late``, past the warning time) and gives the lease up for good once
its time is over (``on_lost``); a new generation is acquired afterwards.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from fenceless.agent.priority import raise_this_thread
from fenceless.blockio import BlockDevice, IoError, TimedIO, device_size
from fenceless.clock import Clock
from fenceless.config import HostConfig, VgConfig
from fenceless.control.anchor import Anchor, read_anchor
from fenceless.control.area import ControlArea
from fenceless.errors import LeaseLost
from fenceless.faults import crashpoint
from fenceless.lease.delta import DeltaLease, HostObserver, LeaseTiming
from fenceless.localstate import member

Opener = Callable[[str, bool], BlockDevice]


class NoHostLease(LeaseLost):
    """no host lease"""


class IoStillHung(LeaseLost):
    """{count} I/O request(s) to the LUN are still hung; no shared write until they complete"""


class LeaseKeeper:
    """One VG's control area as this host reaches it, and this host's lease in it."""

    def __init__(self, cfg: HostConfig, vg: VgConfig, clock: Clock, opener: Opener,
                 log: Callable[[str], None]) -> None:
        self.cfg = cfg
        self.vg = vg
        self.clock = clock
        self.opener = opener
        self.log = log
        self.dev: TimedIO | None = None
        self.size = 0
        self.anchor: Anchor | None = None
        self.area: ControlArea | None = None
        self.observer: HostObserver | None = None
        self.lease: DeltaLease | None = None
        self.on_late: Callable[[str], None] = lambda why: None  # stop exclusive work
        self.on_lost: Callable[[str], None] = lambda why: None  # the lease is gone

    @property
    def n(self) -> float:
        return self.area.io_timeout if self.area is not None else self.cfg.io_timeout

    @property
    def timing(self) -> LeaseTiming:
        return LeaseTiming(self.n)

    def remaining(self) -> float:
        """Seconds before this host must have stopped exclusive work (0 without a lease)."""
        return self.lease.remaining() if self.lease is not None else 0.0

    # --- finding the control area -----------------------------------------------------

    def open_device(self) -> TimedIO:
        if self.dev is None:
            path = self.vg.devices[0]
            self.size = device_size(path)
            self.dev = TimedIO(self.opener(path, True), timeout=self.cfg.io_timeout,
                               thread_init=raise_this_thread)
        return self.dev

    def attach(self) -> bool:
        """Find the control area through the anchor; False while there is none."""
        dev = self.open_device()
        if self.area is not None:
            return True
        anchor = read_anchor(dev, self.size)
        if anchor is None:
            return False
        area = ControlArea.open(dev, anchor, self.clock)
        # From now on N is the cluster's, from the superblock.
        dev.close()
        self.dev = TimedIO(self.opener(self.vg.devices[0], True), timeout=area.io_timeout,
                           thread_init=raise_this_thread)
        self.anchor = anchor
        self.area = ControlArea.open(self.dev, anchor, self.clock)
        self.observer = HostObserver(self.area.hosts())
        self.log(f"found cluster {anchor.cluster_uuid} (control LV {anchor.lv_name}, "
                 f"io_timeout {self.area.io_timeout}s)")
        return True

    def adopt(self, area: ControlArea, anchor: Anchor | None, lease: DeltaLease) -> None:
        """Take over the lease an ``init`` or ``join`` just acquired in this process."""
        same = anchor is not None and self.anchor is not None and \
            anchor.cluster_uuid == self.anchor.cluster_uuid
        self.area, self.lease = area, lease
        if anchor is not None:
            self.anchor = anchor
        if self.observer is None or not same:
            self.observer = HostObserver(area.hosts())  # else keep what it has watched

    # --- the lease --------------------------------------------------------------------

    def acquire_member(self, facts: Mapping[str, Any]) -> bool:
        """Take the host id this host joined with; False if it is not a member (yet).

        A non-member still watches the others, so liveness is known once it joins.
        """
        assert self.area is not None and self.anchor is not None and self.observer is not None
        if self.lease is not None:
            return True
        known = member(self.cfg.state_dir, self.vg.name)
        if not known or known.get("cluster") != str(self.anchor.cluster_uuid):
            self.observer.observe(self.area.hosts().read_area(), self.clock.now())
            return False
        self.log(f"acquiring host id {known['host_id']} (waits out any earlier holder)")
        self.lease = self.area.hosts().acquire(int(known["host_id"]), self.cfg.host, facts)
        self.log(f"host id {self.lease.host_id} generation {self.lease.generation}")
        return True

    def renew(self, facts: Mapping[str, Any]) -> bool:
        """Renew the host lease and feed the observer; False if this renewal failed."""
        lease = self.lease
        if lease is None:
            return False
        late = self.clock.now() - lease.last_renewal
        if late > self.timing.warn_after:
            self.log(f"WARNING: renewal is late ({late:.2f}s since the last one)")
        try:
            raw = lease.renew(facts)
        except LeaseLost as exc:
            self.lose(str(exc))
            return False
        except IoError as exc:
            if lease.remaining() <= 0:
                self.lose(f"renewal I/O failing past the lease time: {exc}")
            else:
                if self.clock.now() - lease.last_renewal > self.timing.warn_after:
                    self.on_late("host lease renewals are failing")
                self.log(f"WARNING: renewal failed ({exc}); retrying")
            return False
        crashpoint("agent.renewed")
        assert self.observer is not None
        self.observer.observe(raw, self.clock.now())
        return True

    def due(self) -> bool:
        return self.lease is not None and \
            self.clock.now() - self.lease.last_renewal >= self.timing.renew_interval

    def lose(self, why: str) -> None:
        self.on_lost(why)
        if self.lease is not None:
            self.log(f"!!! HOST LEASE LOST: {why}")
        self.lease = None

    def check_write(self) -> None:
        """Right before every shared write: the lease must have at least N to spare."""
        if self.lease is None:
            raise NoHostLease()
        self.lease.check(margin=self.n)
        if self.dev is not None and self.dev.abandoned:
            # A timed-out write may still land: writing again could be overtaken by it.
            raise IoStillHung(count=self.dev.abandoned)

    def release(self) -> None:
        """A planned stop: free the host id (after the writer lease was released)."""
        if self.lease is not None:
            self.lease.release()
            self.log("released the host lease")
