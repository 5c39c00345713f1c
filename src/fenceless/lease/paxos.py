"""The writer lease: Disk Paxos (Gafni & Lamport 2003) as sanlock's paxos_lease uses it.

The ``writer`` region holds a leader sector, a request sector and one dblock
per host. The leader's ``lver`` is the *writer epoch*: it rises by one per
change of writer and is the fencing token every shared write carries.

The protocol is written once, as generators (``acquire_steps`` and
``run_ballot``) that *yield* I/O requests and receive their results. The
real driver (``WriterLease.acquire``) executes them on a ``BlockDevice``;
the model checker in tests/unit/test_lease_paxos_model.py executes the very
same generators over every interleaving of three hosts. So the code that
was checked is the code that ships.

Choices beyond the paper (see docs/format.md):
- mbal = k * max_hosts + host_id, so ballots of different hosts never tie.
- Only the host whose value won writes the leader. A host that learns that
  the value chosen for lver L belongs to an incarnation that is gone (dead,
  or replaced by a new generation) moves on to lver L+1 without writing the
  leader: so every leader write for a given lver comes from one host, and the
  leader's lver never goes back as long as a host whose lease ran out writes
  nothing (its ``before_write`` check; docs/design.md, "The stale writer").
- A dblock with a higher lver than ours (our own included) makes us abort
  and next run the ballot at that lver: it proves the instance before it is
  finished, and our own accepted value in it must never be overwritten.
- A host's ballot numbers only ever rise, also from one acquire to the next
  (each starts above the mbal in its own dblock): a lowered mbal would let a
  competitor in phase 2 miss it (found by the model check, once a host could
  acquire again after a failed leader write).
"""

from __future__ import annotations

import enum
import random
import struct
from collections.abc import Callable, Generator
from dataclasses import dataclass

from fenceless.blockio import SECTOR, BlockDevice
from fenceless.clock import Clock
from fenceless.lease.errors import BadHostIdentity, NotWriter
from fenceless.ondisk.errors import CorruptRecord
from fenceless.ondisk.layout import Region
from fenceless.ondisk.record import (
    KIND_DBLOCK,
    KIND_LEADER,
    KIND_REQUEST,
    decode_record,
    encode_record,
    pack_name,
    pad,
    unpack_name,
)

LEADER_INDEX = 0
REQUEST_INDEX = 1
FLAG_RELEASED = 1

_LEADER = struct.Struct("<HHQQQI48s")  # owner id, reserved, owner gen, lver, timestamp, flags, name
_DBLOCK = struct.Struct("<QQHHQQQI")  # mbal, bal, inp id, reserved, inp gen, inp ts, lver, flags
_REQUEST = struct.Struct("<QHHI")  # lver, requester id, reserved, force mode


def dblock_index(host_id: int) -> int:
    """Sector index of a host's dblock within the writer region."""
    return 1 + host_id


# --- records ----------------------------------------------------------------------


@dataclass(frozen=True)
class Leader:
    owner_id: int
    owner_generation: int
    lver: int
    timestamp: int = 0  # the owner's lease clock, ms, for humans
    released: bool = False
    owner_name: str = ""

    @property
    def free(self) -> bool:
        return self.owner_id == 0 or self.released


@dataclass(frozen=True)
class Inp:
    """A proposed owner: one incarnation of a host."""

    host_id: int
    generation: int
    timestamp: int = 0


NO_INP = Inp(0, 0, 0)


@dataclass(frozen=True)
class DBlock:
    mbal: int
    bal: int
    inp: Inp
    lver: int
    released: bool = False


@dataclass(frozen=True)
class Request:
    lver: int
    requester_id: int
    force_mode: int = 0


def encode_leader(ld: Leader) -> bytes:
    body = _LEADER.pack(ld.owner_id, 0, ld.owner_generation, ld.lver, ld.timestamp,
                        FLAG_RELEASED if ld.released else 0,
                        pack_name(ld.owner_name, 48, "owner name"))
    return encode_record(KIND_LEADER, body, epoch=ld.lver, seq=ld.owner_generation)


def encode_dblock(db: DBlock) -> bytes:
    body = _DBLOCK.pack(db.mbal, db.bal, db.inp.host_id, 0, db.inp.generation, db.inp.timestamp,
                        db.lver, FLAG_RELEASED if db.released else 0)
    return encode_record(KIND_DBLOCK, body, epoch=db.lver, seq=db.mbal)


def encode_request(rq: Request) -> bytes:
    body = _REQUEST.pack(rq.lver, rq.requester_id, 0, rq.force_mode)
    return encode_record(KIND_REQUEST, body, epoch=rq.lver)


def _payload(buf: bytes, kind: int, region: Region, index: int,
             size: int) -> tuple[bytes, int] | None:
    offset = region.offset + index * SECTOR
    rec = decode_record(buf, kind=kind, region=region.name, offset=offset)
    if rec is None:
        return None
    if len(rec.payload) < size:
        raise CorruptRecord(region=region.name, offset=offset, detail="record payload too short")
    return rec.payload, offset


def decode_leader(buf: bytes, region: Region) -> Leader | None:
    got = _payload(buf, KIND_LEADER, region, LEADER_INDEX, _LEADER.size)
    if got is None:
        return None
    oid, _r, gen, lver, ts, flags, name = _LEADER.unpack_from(got[0])
    return Leader(oid, gen, lver, ts, bool(flags & FLAG_RELEASED), unpack_name(name))


def decode_dblock(buf: bytes, region: Region, host_id: int) -> DBlock | None:
    got = _payload(buf, KIND_DBLOCK, region, dblock_index(host_id), _DBLOCK.size)
    if got is None:
        return None
    mbal, bal, iid, _r, igen, its, lver, flags = _DBLOCK.unpack_from(got[0])
    return DBlock(mbal, bal, Inp(iid, igen, its), lver, bool(flags & FLAG_RELEASED))


def decode_request(buf: bytes, region: Region) -> Request | None:
    got = _payload(buf, KIND_REQUEST, region, REQUEST_INDEX, _REQUEST.size)
    if got is None:
        return None
    lver, rid, _r, force = _REQUEST.unpack_from(got[0])
    return Request(lver, rid, force)


# --- the protocol as step generators ----------------------------------------------


@dataclass(frozen=True)
class ReadOp:
    """Read one sector of the writer region; the result is its bytes."""

    index: int


@dataclass(frozen=True)
class WriteOp:
    """Write one sector (``data`` is the unpadded record); the result is None."""

    index: int
    data: bytes


@dataclass(frozen=True)
class OwnerGoneOp:
    """Ask the host observer whether this incarnation can no longer hold leases."""

    host_id: int
    generation: int


@dataclass(frozen=True)
class BackoffOp:
    """Sleep a random time before the next ballot (the driver picks 0..N)."""


Op = ReadOp | WriteOp | OwnerGoneOp | BackoffOp
Steps = Generator[Op, object, "AcquireResult"]


@dataclass(frozen=True)
class Abort:
    seen_mbal: int
    seen_lver: int


class Outcome(enum.Enum):
    WON = "won"  # we hold the writer lease at ``epoch``
    LOST = "lost"  # the ballot chose another host's incarnation for ``epoch``
    BUSY = "busy"  # the lease is held by an owner that may be alive
    CONTENDED = "contended"  # every ballot was aborted by competitors


@dataclass(frozen=True)
class AcquireResult:
    outcome: Outcome
    epoch: int
    owner_id: int
    owner_generation: int
    fresh: bool = True  # False: we already held it, no new epoch

    @property
    def won(self) -> bool:
        return self.outcome is Outcome.WON


def next_mbal(floor: int, host_id: int, max_hosts: int) -> int:
    """The smallest ballot number above ``floor`` that belongs to ``host_id``."""
    return (floor // max_hosts + 1) * max_hosts + host_id


def _bytes(x: object) -> bytes:
    if not isinstance(x, bytes):
        raise TypeError(f"expected sector bytes from the driver, got {type(x).__name__}")
    return x


def _other_dblock(buf: bytes, region: Region, host_id: int) -> DBlock | None:
    """Another host's dblock; a damaged one is skipped, as sanlock does.

    Only its owner writes a dblock, one sector at a time (atomic), so damage is
    external: stopping every acquire on it would leave the cluster without a
    writer for good. Our own dblock is never skipped (it may hold our vote).
    """
    try:
        return decode_dblock(buf, region, host_id)
    except CorruptRecord:
        return None


def run_ballot(
    region: Region, max_hosts: int, host_id: int, lver: int, mbal: int, proposal: Inp
) -> Generator[Op, object, Inp | Abort]:
    """One Disk Paxos ballot for instance ``lver``: the chosen value, or Abort."""
    own = decode_dblock(_bytes((yield ReadOp(dblock_index(host_id)))), region, host_id)
    if own is not None and own.lver > lver:
        # We took part in a later instance (an earlier acquire call): never
        # overwrite that record with an older lver, join that instance instead.
        return Abort(own.mbal, own.lver)
    bal, inp = (own.bal, own.inp) if own is not None and own.lver == lver else (0, NO_INP)
    yield WriteOp(dblock_index(host_id), encode_dblock(DBlock(mbal, bal, inp, lver)))
    best_bal, best_inp = bal, inp
    for q in range(1, max_hosts + 1):
        if q == host_id:
            continue  # only we write our dblock
        blk = _other_dblock(_bytes((yield ReadOp(dblock_index(q)))), region, q)
        if blk is None or blk.lver < lver:
            continue
        if blk.lver > lver:
            return Abort(blk.mbal, blk.lver)
        if blk.mbal > mbal:
            return Abort(blk.mbal, lver)
        if blk.bal > best_bal:
            best_bal, best_inp = blk.bal, blk.inp
    value = best_inp if best_bal > 0 else proposal
    yield WriteOp(dblock_index(host_id), encode_dblock(DBlock(mbal, mbal, value, lver)))
    for q in range(1, max_hosts + 1):
        if q == host_id:
            continue
        blk = _other_dblock(_bytes((yield ReadOp(dblock_index(q)))), region, q)
        if blk is None or blk.lver < lver:
            continue
        if blk.lver > lver:
            return Abort(blk.mbal, blk.lver)
        if blk.mbal > mbal:
            return Abort(blk.mbal, lver)
    return value


def acquire_steps(
    region: Region,
    max_hosts: int,
    host_id: int,
    generation: int,
    *,
    name: str = "",
    timestamp: int = 0,
    max_ballots: int = 10,
) -> Steps:
    """The whole writer-lease acquire, as steps. See the module docstring."""
    me = Inp(host_id, generation, timestamp)
    # Ballot numbers of a host only ever rise, across acquires too: an acquire that
    # started again from the bottom would lower the mbal in its own dblock, and a host in
    # phase 2 with a ballot in between would miss it (and win as well).
    own = decode_dblock(_bytes((yield ReadOp(dblock_index(host_id)))), region, host_id)
    mbal_floor = own.mbal if own is not None else 0
    lver_floor = 0
    for _ in range(max_ballots):
        leader = decode_leader(_bytes((yield ReadOp(LEADER_INDEX))), region)
        if leader is not None and not leader.free:
            if (leader.owner_id, leader.owner_generation) == (host_id, generation):
                return AcquireResult(Outcome.WON, leader.lver, host_id, generation, fresh=False)
            if not (yield OwnerGoneOp(leader.owner_id, leader.owner_generation)):
                return AcquireResult(Outcome.BUSY, leader.lver, leader.owner_id,
                                     leader.owner_generation)
        lver = max(leader.lver if leader is not None else 0, lver_floor) + 1
        mbal = next_mbal(mbal_floor, host_id, max_hosts)
        got = yield from run_ballot(region, max_hosts, host_id, lver, mbal, me)
        if isinstance(got, Abort):
            mbal_floor = max(mbal_floor, mbal, got.seen_mbal)
            lver_floor = max(lver_floor, got.seen_lver - 1)
            yield BackoffOp()
            continue
        if (got.host_id, got.generation) == (host_id, generation):
            yield WriteOp(LEADER_INDEX, encode_leader(
                Leader(host_id, generation, lver, timestamp, False, name)))
            return AcquireResult(Outcome.WON, lver, host_id, generation)
        if (yield OwnerGoneOp(got.host_id, got.generation)):
            lver_floor = lver  # decided for a gone incarnation: it will never use it
            continue
        return AcquireResult(Outcome.LOST, lver, got.host_id, got.generation)
    return AcquireResult(Outcome.CONTENDED, 0, 0, 0)


# --- the real driver --------------------------------------------------------------


class WriterLease:
    """Drives the writer-lease steps on a ``BlockDevice`` (wrap it in ``TimedIO``)."""

    def __init__(self, dev: BlockDevice, region: Region, max_hosts: int, io_timeout: float,
                 clock: Clock, rng: random.Random | None = None) -> None:
        if region.length < (2 + max_hosts) * SECTOR:
            raise ValueError("writer region is too small for max_hosts")
        self.dev = dev
        self.region = region
        self.max_hosts = max_hosts
        self.io_timeout = io_timeout
        self.clock = clock
        self.rng = rng or random.Random()  # noqa: S311 - backoff jitter, not secrets

    def _offset(self, index: int) -> int:
        return self.region.offset + index * SECTOR

    def run(self, steps: Steps, owner_gone: Callable[[int, int], bool],
            before_write: Callable[[], None] | None = None) -> AcquireResult:
        """Execute protocol steps; ``before_write`` runs right before every write."""
        reply: object = None
        try:
            while True:
                op = steps.send(reply)
                if isinstance(op, ReadOp):
                    reply = self.dev.read(self._offset(op.index), SECTOR)
                elif isinstance(op, WriteOp):
                    if before_write is not None:
                        before_write()
                    self.dev.write(self._offset(op.index), pad(op.data, SECTOR))
                    reply = None
                elif isinstance(op, OwnerGoneOp):
                    reply = owner_gone(op.host_id, op.generation)
                else:
                    self.clock.sleep(self.rng.uniform(0, self.io_timeout))
                    reply = None
        except StopIteration as stop:
            result: AcquireResult = stop.value
            return result

    def acquire(self, host_id: int, generation: int, owner_gone: Callable[[int, int], bool],
                *, name: str = "", max_ballots: int = 10,
                before_write: Callable[[], None] | None = None) -> AcquireResult:
        """Become the writer, or learn who is. Never raises for losing a race.

        ``owner_gone(host_id, generation)`` must answer from a fresh host
        observer (``HostObserver.owner_gone``): the current owner is taken
        over only when it is free, dead, or a new incarnation.
        """
        if not 1 <= host_id <= self.max_hosts or generation < 1:
            raise BadHostIdentity(detail=f"host id {host_id} generation {generation}")
        ts = max(1, int(self.clock.now() * 1000))
        steps = acquire_steps(self.region, self.max_hosts, host_id, generation, name=name,
                              timestamp=ts, max_ballots=max_ballots)
        return self.run(steps, owner_gone, before_write)

    def read_leader(self) -> Leader | None:
        return decode_leader(self.dev.read(self._offset(LEADER_INDEX), SECTOR), self.region)

    def read_dblocks_of(self, host_id: int) -> DBlock | None:
        """One host's dblock (its last vote)."""
        raw = self.dev.read(self._offset(dblock_index(host_id)), SECTOR)
        return decode_dblock(raw, self.region, host_id)

    def read_dblocks(self) -> dict[int, DBlock | None]:
        area = self.dev.read(self._offset(dblock_index(1)), self.max_hosts * SECTOR)
        return {h: decode_dblock(area[(h - 1) * SECTOR : h * SECTOR], self.region, h)
                for h in range(1, self.max_hosts + 1)}

    def release(self, host_id: int, generation: int, epoch: int,
                before_write: Callable[[], None] | None = None) -> None:
        """Planned handover: mark the leader released; the next acquirer gets epoch+1."""
        leader = self.read_leader()
        if leader is None or leader.lver != epoch or \
                (leader.owner_id, leader.owner_generation) != (host_id, generation):
            held = "nobody" if leader is None else \
                f"host {leader.owner_id} gen {leader.owner_generation} at epoch {leader.lver}"
            raise NotWriter(host_id=host_id, epoch=epoch, detail=f"the leader names {held}")
        if leader.released:
            return
        if before_write is not None:
            before_write()
        released = Leader(leader.owner_id, leader.owner_generation, leader.lver,
                          max(1, int(self.clock.now() * 1000)), True, leader.owner_name)
        self.dev.write(self._offset(LEADER_INDEX), pad(encode_leader(released), SECTOR))

    def request_handover(self, requester_id: int, epoch: int, force_mode: int = 0) -> None:
        """Ask the writer at ``epoch`` to release (it polls ``read_request``)."""
        self.dev.write(self._offset(REQUEST_INDEX),
                       pad(encode_request(Request(epoch, requester_id, force_mode)), SECTOR))

    def read_request(self) -> Request | None:
        return decode_request(self.dev.read(self._offset(REQUEST_INDEX), SECTOR), self.region)
