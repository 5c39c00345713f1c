"""Delta leases on the host area: host ids and host liveness, with sanlock's semantics.

Each host id n owns sector n-1 of the ``hosts`` region. The holder renews it
by writing its own lease timestamp every 2N (N = io_timeout). Nobody ever
compares that timestamp with another clock: observers only notice that the
sector *changed* and note their own lease time (docs/design.md,
"Clocks").

Timing, in multiples of N, measured from the holder's last good renewal (for
the holder) or from the last observed change (for an observer):

=========  =======  =========================================================
renew      2N       holder renews
acquire    2N       after writing, wait and re-read before keeping an id
warn       6N       holder: renewals are late
fail       8N       holder stops exclusive work; observer: LIVE -> FAIL
fence      10N      the holder's watchdog kills its work if it is still there
dead       14N      observer: FAIL -> DEAD; others may take the host's leases
=========  =======  =========================================================

sanlock's dead time is 8N plus the watchdog's 60 s; we use 6N in place of the
60 s so every time scales with N (at N=10 s: 80 s and 140 s, as sanlock).
"""

from __future__ import annotations

import contextlib
import enum
import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from fenceless.blockio import SECTOR, BlockDevice
from fenceless.clock import Clock
from fenceless.lease.errors import (
    BadHostIdentity,
    HostIdInUse,
    HostLeaseLost,
    HostNameInUse,
    LeaseExpired,
)
from fenceless.ondisk.errors import CorruptRecord
from fenceless.ondisk.layout import Region
from fenceless.ondisk.record import (
    KIND_HOST,
    decode_record,
    encode_record,
    pack_name,
    pad,
    unpack_name,
)

NAME_SIZE = 48
FACTS_MAX = 3 * 1024
_BODY = struct.Struct("<48sHHQQI")  # name, host id, reserved, generation, timestamp, io ms


@dataclass(frozen=True)
class LeaseTiming:
    """All lease times derive from N, the io_timeout."""

    io_timeout: float

    @property
    def renew_interval(self) -> float:
        return 2 * self.io_timeout

    @property
    def acquire_wait(self) -> float:
        return 2 * self.io_timeout

    @property
    def warn_after(self) -> float:
        return 6 * self.io_timeout

    @property
    def fail_after(self) -> float:
        return 8 * self.io_timeout

    @property
    def watchdog_fire(self) -> float:
        """The watchdog fences a holder that has not renewed for this long: 4N before others
        may take over (docs/design.md, "The watchdog")."""
        return 10 * self.io_timeout

    @property
    def dead_after(self) -> float:
        return 14 * self.io_timeout


@dataclass(frozen=True)
class HostRecord:
    host_id: int
    name: str
    generation: int
    timestamp: int  # the holder's own lease clock, ms; 0 = free
    io_timeout: float
    facts: Mapping[str, Any] = field(default_factory=dict)

    @property
    def free(self) -> bool:
        return self.timestamp == 0


def encode_host(rec: HostRecord) -> bytes:
    facts = json.dumps(dict(rec.facts), sort_keys=True, separators=(",", ":"),
                       ensure_ascii=False).encode("utf-8")
    if len(facts) > FACTS_MAX:
        raise BadHostIdentity(detail=f"host facts are {len(facts)} bytes, at most {FACTS_MAX}")
    body = _BODY.pack(pack_name(rec.name, NAME_SIZE, "host name"), rec.host_id, 0,
                      rec.generation, rec.timestamp, round(rec.io_timeout * 1000))
    return pad(encode_record(KIND_HOST, body + facts, seq=rec.generation), SECTOR)


def decode_host(buf: bytes, *, region: str, offset: int) -> HostRecord | None:
    rec = decode_record(buf, kind=KIND_HOST, region=region, offset=offset)
    if rec is None:
        return None
    try:
        name, host_id, _res, gen, ts, io_ms = _BODY.unpack_from(rec.payload)
        facts = json.loads(rec.payload[_BODY.size :].decode("utf-8"))
        if not isinstance(facts, dict):
            raise ValueError("facts are not a JSON object")
    except (struct.error, ValueError) as exc:
        raise CorruptRecord(region=region, offset=offset,
                            detail=f"host lease payload is malformed: {exc}") from exc
    return HostRecord(host_id=host_id, name=unpack_name(name), generation=gen, timestamp=ts,
                      io_timeout=io_ms / 1000, facts=facts)


def _ms(t: float) -> int:
    return max(1, int(t * 1000))


class HostArea:
    """The ``hosts`` region: one sector per host id (id n at sector n-1)."""

    def __init__(self, dev: BlockDevice, region: Region, max_hosts: int, io_timeout: float,
                 clock: Clock) -> None:
        if region.length < max_hosts * SECTOR:
            raise ValueError("host region is smaller than max_hosts sectors")
        self.dev = dev
        self.region = region
        self.max_hosts = max_hosts
        self.timing = LeaseTiming(io_timeout)
        self.clock = clock

    def sector_offset(self, host_id: int) -> int:
        if not 1 <= host_id <= self.max_hosts:
            raise BadHostIdentity(detail=f"host id {host_id} is not in 1..{self.max_hosts}")
        return self.region.offset + (host_id - 1) * SECTOR

    def read_area(self) -> bytes:
        """All host sectors in one O_DIRECT read."""
        return self.dev.read(self.region.offset, self.max_hosts * SECTOR)

    @staticmethod
    def sector_of(area: bytes, host_id: int) -> bytes:
        return area[(host_id - 1) * SECTOR : host_id * SECTOR]

    def decode(self, area: bytes, host_id: int) -> HostRecord | None:
        return decode_host(self.sector_of(area, host_id), region=self.region.name,
                           offset=self.sector_offset(host_id))

    def _held_by_name(self, area: bytes, name: str, skip: int) -> dict[int, HostRecord]:
        found = {}
        for hid in range(1, self.max_hosts + 1):
            if hid == skip:
                continue
            try:
                rec = self.decode(area, hid)
            except CorruptRecord:
                continue  # another host's problem; it cannot be our name
            if rec is not None and not rec.free and rec.name == name:
                found[hid] = rec
        return found

    def acquire(
        self, host_id: int, name: str, facts: Mapping[str, Any] | None = None
    ) -> DeltaLease:
        """Take host id ``host_id`` as ``name`` (sanlock's delta_lease_acquire).

        A sector held by anyone (even by our own name: it may be another
        machine configured with it) is watched for the full dead time and
        taken only if it never changed. The same name held on another id is
        watched the same way and refused if it changes. After writing we wait
        2N and keep the id only if the sector is still byte-identical.
        """
        if not name or len(name.encode("utf-8")) > NAME_SIZE:
            raise BadHostIdentity(detail=f"host name {name!r} must be 1..{NAME_SIZE} bytes")
        offset = self.sector_offset(host_id)
        timing = self.timing
        dead_seen: dict[int, bytes] = {}
        while True:
            area = self.read_area()
            ours = self.decode(area, host_id)  # corrupt -> raise; never overwrite it
            watch: dict[int, HostRecord] = {}
            if ours is not None and not ours.free:
                watch[host_id] = ours
            watch.update(self._held_by_name(area, name, host_id))
            watch = {h: r for h, r in watch.items()
                     if dead_seen.get(h) != self.sector_of(area, h)}
            if not watch:
                break
            self._wait_dead(host_id, name, area, watch)
            dead_seen.update({h: self.sector_of(area, h) for h in watch})
        generation = (ours.generation if ours is not None else 0) + 1
        # Wait 2N of the longer io_timeout: ours, or the previous holder's, who may
        # still be writing the sector within its own (docs/design.md, "Identity").
        wait = LeaseTiming(max(timing.io_timeout, ours.io_timeout if ours else 0.0))
        started = self.clock.now()
        rec = HostRecord(host_id=host_id, name=name, generation=generation,
                         timestamp=_ms(started), io_timeout=timing.io_timeout,
                         facts=dict(facts or {}))
        data = encode_host(rec)
        self.dev.write(offset, data)
        self.clock.sleep(wait.acquire_wait)
        now = self.dev.read(offset, SECTOR)
        if now != data:
            other = None
            with contextlib.suppress(CorruptRecord):
                other = decode_host(now, region=self.region.name, offset=offset)
            raise HostIdInUse(
                host_id=host_id, owner=other.name if other else "?",
                generation=other.generation if other else "?",
                detail="another host wrote the sector while we were acquiring it",
            )
        return DeltaLease(self, rec, data, started)

    def _wait_dead(self, host_id: int, name: str, area: bytes,
                   watch: Mapping[int, HostRecord]) -> None:
        """Watch ``watch``'s sectors for the dead time; raise if any changes.

        The dead time is the holder's, if its io_timeout is longer than ours.
        """
        timing = LeaseTiming(max([self.timing.io_timeout,
                                  *(r.io_timeout for r in watch.values())]))
        start = self.clock.now()
        while True:
            elapsed = self.clock.now() - start
            if elapsed >= timing.dead_after:
                return
            self.clock.sleep(min(timing.renew_interval, timing.dead_after - elapsed))
            fresh = self.read_area()
            for hid, rec in watch.items():
                if self.sector_of(fresh, hid) == self.sector_of(area, hid):
                    continue
                if hid == host_id:
                    raise HostIdInUse(host_id=host_id, owner=rec.name, generation=rec.generation,
                                      detail="its owner is alive and renewing it")
                raise HostNameInUse(name=name, other_id=hid, generation=rec.generation)


class DeltaLease:
    """Our hold on a host id: renew it, release it, and check it before every write."""

    def __init__(self, area: HostArea, record: HostRecord, written: bytes,
                 renewed_at: float) -> None:
        self.area = area
        self.record = record
        self.timing = area.timing
        self.clock = area.clock
        self.last_renewal = renewed_at
        self._written = written
        self._maybe_written: list[bytes] = []
        self.lost: str | None = None

    @property
    def host_id(self) -> int:
        return self.record.host_id

    @property
    def generation(self) -> int:
        return self.record.generation

    @property
    def name(self) -> str:
        return self.record.name

    def expires_at(self) -> float:
        """Local lease-clock time at which exclusive work must have stopped (8N)."""
        return self.last_renewal + self.timing.fail_after

    def takeover_at(self) -> float:
        """Local lease-clock time from which others may take our leases (14N)."""
        return self.last_renewal + self.timing.dead_after

    def remaining(self) -> float:
        return self.expires_at() - self.clock.now()

    def check(self, margin: float = 0.0) -> None:
        """Raise unless we still hold the lease with ``margin`` seconds to spare.

        Called right before every shared write (docs/design.md, "The stale
        writer").
        """
        if self.lost is not None:
            raise HostLeaseLost(host_id=self.host_id, detail=self.lost)
        age = self.clock.now() - self.last_renewal
        if age + margin > self.timing.fail_after:
            raise LeaseExpired(host_id=self.host_id, age=age, limit=self.timing.fail_after)

    def _lose(self, why: str) -> HostLeaseLost:
        self.lost = why
        return HostLeaseLost(host_id=self.host_id, detail=why)

    def _verify(self, area: bytes) -> None:
        current = self.area.sector_of(area, self.host_id)
        if current == self._written or current in self._maybe_written:
            return
        offset = self.area.sector_offset(self.host_id)
        try:
            other = decode_host(current, region=self.area.region.name, offset=offset)
        except CorruptRecord as exc:
            self.lost = str(exc)
            raise
        if other is not None and not other.free and \
                (other.name, other.generation) == (self.name, self.generation):
            return  # one of our own renewals that timed out and landed late: still ours
        if other is None or other.free:
            raise self._lose("our sector was cleared by someone else")
        raise self._lose(f"the sector now belongs to {other.name!r} generation {other.generation}")

    def renew(self, facts: Mapping[str, Any] | None = None) -> bytes:
        """Read the whole area, check our sector is intact, write a new timestamp.

        Returns the area as read, for a ``HostObserver``. A renewal that
        starts after the fail time is refused: others may already be waiting
        out our dead time, and a late renewal must not revive the lease.
        """
        if self.lost is not None:
            raise HostLeaseLost(host_id=self.host_id, detail=self.lost)
        start = self.clock.now()
        age = start - self.last_renewal
        if age > self.timing.fail_after:
            self.lost = f"no successful renewal for {age:.3f}s"
            raise LeaseExpired(host_id=self.host_id, age=age, limit=self.timing.fail_after)
        area = self.area.read_area()
        self._verify(area)
        t = self.clock.now()
        ts = max(_ms(t), self.record.timestamp + 1)
        rec = HostRecord(host_id=self.host_id, name=self.name, generation=self.generation,
                         timestamp=ts, io_timeout=self.record.io_timeout,
                         facts=dict(facts) if facts is not None else self.record.facts)
        data = encode_host(rec)
        self._maybe_written.append(data)  # a failed write may still land later
        self.area.dev.write(self.area.sector_offset(self.host_id), data)
        self.record = rec
        self._written = data
        self._maybe_written.clear()
        self.last_renewal = t
        return area

    def release(self) -> None:
        """Write timestamp 0 (free), after checking the sector is still ours."""
        if self.lost is not None:
            raise HostLeaseLost(host_id=self.host_id, detail=self.lost)
        self.check(margin=self.timing.io_timeout)  # past its time, a lease writes nothing
        self._verify(self.area.read_area())
        rec = HostRecord(host_id=self.host_id, name=self.name, generation=self.generation,
                         timestamp=0, io_timeout=self.record.io_timeout, facts=self.record.facts)
        self.lost = "released"
        self.area.dev.write(self.area.sector_offset(self.host_id), encode_host(rec))


class HostState(enum.Enum):
    FREE = "free"
    LIVE = "live"
    FAIL = "fail"
    DEAD = "dead"
    UNKNOWN = "unknown"


@dataclass
class _Seen:
    raw: bytes
    first_seen: float
    last_change: float | None
    record: HostRecord | None
    error: CorruptRecord | None


class HostObserver:
    """Liveness of other hosts from repeated reads of the host area.

    Liveness rests only on whether a sector's bytes changed, timed by our
    own lease clock. A host never seen to change is UNKNOWN until we have
    watched its unchanged sector for the dead time, then DEAD: a host that
    was dead when we started never changes, and must not block us forever.
    A corrupt sector is judged the same way (a host that died mid-write
    leaves one), but it is never FREE.
    """

    def __init__(self, area: HostArea) -> None:
        self.area = area
        self._seen: dict[int, _Seen] = {}

    def observe(self, area_bytes: bytes, now: float) -> None:
        for hid in range(1, self.area.max_hosts + 1):
            raw = self.area.sector_of(area_bytes, hid)
            seen = self._seen.get(hid)
            if seen is not None and seen.raw == raw:
                continue
            record: HostRecord | None = None
            error: CorruptRecord | None = None
            try:
                record = self.area.decode(area_bytes, hid)
            except CorruptRecord as exc:
                error = exc
            if seen is None:
                self._seen[hid] = _Seen(raw, now, None, record, error)
            else:
                self._seen[hid] = _Seen(raw, seen.first_seen, now, record, error)

    def record(self, host_id: int) -> HostRecord | None:
        seen = self._seen.get(host_id)
        return seen.record if seen else None

    def last_change(self, host_id: int) -> float | None:
        """Our lease-clock time when the host's sector last changed (None: not seen to change)."""
        seen = self._seen.get(host_id)
        return seen.last_change if seen else None

    def error(self, host_id: int) -> CorruptRecord | None:
        seen = self._seen.get(host_id)
        return seen.error if seen else None

    def state(self, host_id: int, now: float) -> HostState:
        seen = self._seen.get(host_id)
        if seen is None:
            return HostState.UNKNOWN
        if seen.error is None and (seen.record is None or seen.record.free):
            return HostState.FREE
        n = self.area.timing.io_timeout
        if seen.record is not None:
            n = max(n, seen.record.io_timeout)
        timing = LeaseTiming(n)
        if seen.last_change is None:
            if now - seen.first_seen >= timing.dead_after:
                return HostState.DEAD
            return HostState.UNKNOWN
        age = now - seen.last_change
        if age < timing.fail_after:
            return HostState.LIVE
        if age < timing.dead_after:
            return HostState.FAIL
        return HostState.DEAD

    def owner_gone(self, host_id: int, generation: int, now: float) -> bool:
        """True if incarnation (host_id, generation) can no longer hold anything.

        That is: its sector is free, holds a *newer* generation (a new
        incarnation does not inherit its predecessor's leases), or is DEAD.
        An older generation than asked about means our read predates the
        owner's restart: it proves nothing. Callers observe a fresh read of
        the host area right before asking (docs/design.md, "Caches").
        """
        state = self.state(host_id, now)
        if state in (HostState.FREE, HostState.DEAD):
            return True
        rec = self.record(host_id)
        return rec is not None and rec.generation > generation
