"""``fenceless repair ledger``: the rebuild from what else is on the LUN (no I/O), the one
write over a ledger with no valid slot, and the whole repair on a real control area
(memory and O_DIRECT). The same in a lab: tests/integration/test_repair.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from fenceless.blockio import BlockDevice
from fenceless.hv.domain import parse_domain_xml
from fenceless.lease.delta import HostRecord
from fenceless.ledger import audit, slots, vmstore
from fenceless.ledger.audit import AuditEntry, AuditRecord
from fenceless.ledger.claims import Claim, HostClaims, write_claims
from fenceless.ledger.slots import LEDGER_SLOTS, LedgerReadable, SlotsChanged
from fenceless.ledger.state import LedgerState, RequestInfo, WriterInfo
from fenceless.ledger.vmstore import StoredXml
from fenceless.ondisk.errors import CorruptRecord, StaleEpoch
from fenceless.ondisk.layout import Layout
from fenceless.ondisk.record import HEADER_SIZE
from fenceless.ops.repair import Found, RepairLedgerOp, RepairNotWriter, RepairUnsure, rebuild
from tests.unit.harness import writer_and_reader
from tests.unit.test_domain import WEB

LAYOUT = Layout.compute(4)
DB = WEB.replace("web01", "db01").replace("vm-web01", "vm-db01")


def parse(xml: str):  # type: ignore[no-untyped-def]
    return parse_domain_xml(xml, "sanvg")


def hrec(hid: int, name: str, gen: int = 1, free: bool = False) -> HostRecord:
    return HostRecord(hid, name, gen, 0 if free else 1000, 0.2)


def said(seq: int, *argv: str, result: str = "ok") -> AuditEntry:
    return AuditEntry(seq, 0, seq, 1, record=AuditRecord("h2", "root", ("fenceless", *argv),
                                                         f"r{seq}", result))


def found(**kw) -> Found:  # type: ignore[no-untyped-def]
    base = dict(cluster="c-1", vg="sanvg", writer=WriterInfo(1, "h1", 5),
                hosts=[hrec(1, "h1"), hrec(2, "h2"), hrec(3, "h3", free=True)],
                claims={}, definitions=[(0, StoredXml("web01", WEB, 3, 2)),
                                        (1, StoredXml("db01", DB, 4, 2))],
                audit=[], vg_seqno=17, wall_ms=1)
    base.update(kw)
    return Found(**base)  # type: ignore[arg-type]


def test_the_rebuild_takes_hosts_vms_seqno_and_the_writer_from_their_own_places():
    plan = rebuild(found(), parse)
    st = plan.state
    assert (st.cluster, st.vg, st.writer, st.vg_seqno, st.vm_seq) == \
        ("c-1", "sanvg", WriterInfo(1, "h1", 5), 17, 4)
    assert st.host_names() == {1: "h1", 2: "h2"}  # h3's sector is free: left out, said so
    assert any(x.startswith("host h3 (id 3): its host sector is free") for x in plan.left_out)
    assert {n: (v.host, v.state, v.seq) for n, v in st.vms.items()} == {
        "web01": (None, "stopped", 3), "db01": (None, "stopped", 4)}
    assert [(d.volume, d.mode) for d in st.vms["web01"].disks] == \
        [("vm-web01", "rw"), ("debian-12-iso", "ro")]
    assert st.vms["web01"].sha == vmstore.digest(WEB)
    assert st.intents == {} and st.requests == {}
    # What it writes reads back as a ledger.
    assert LedgerState.from_json(st.to_json()) == st


def test_the_newest_version_is_current_and_the_older_ones_its_history():
    plan = rebuild(found(definitions=[(0, StoredXml("web01", WEB, 3, 2)),
                                      (5, StoredXml("web01", WEB.replace("<vcpu>2", "<vcpu>4"),
                                                    7, 3))]), parse)
    web = plan.state.vms["web01"]
    assert (web.slot, web.seq, web.vcpus, plan.state.vm_seq) == (5, 7, 4, 7)
    assert [(h.slot, h.seq, h.action) for h in plan.state.vm_history] == [(0, 3, "edit")]


def test_a_vm_undefined_after_its_last_version_stays_out_and_one_defined_again_is_in():
    undefined = [said(10, "vm", "define", "db01", "--xml", "db.xml"),
                 said(11, "vm", "undefine", "db01"),
                 said(12, "vm", "undefine", "web01"),
                 said(13, "vm", "define", "web01", "--xml", "w.xml"),
                 said(14, "vm", "undefine", "zz", result="refused")]
    plan = rebuild(found(audit=undefined), parse)
    assert set(plan.state.vms) == {"web01"}
    assert "VM db01 (version 4): undefined, audit record 11" in plan.left_out


def test_a_definition_that_does_not_read_or_parse_is_left_out_and_said_so():
    bad = CorruptRecord(region="vms", offset=4096, detail="checksum mismatch")
    plan = rebuild(found(definitions=[(0, bad), (1, StoredXml("db01", "<domain/>", 4, 2))]),
                   parse)
    assert plan.state.vms == {} and plan.state.vm_seq == 4
    assert plan.left_out[1].startswith("VM store slot 0: ")
    assert plan.left_out[2].startswith("VM db01 (version 4, slot 1): ")


def test_a_vm_runs_where_its_disk_is_mapped_read_write_as_the_writer_reads_claims():
    claims = {2: HostClaims("h2", 1, {"vm-web01": Claim(8 << 20, "rw"),
                                      "debian-12-iso": Claim(8 << 20, "ro")}),
              1: HostClaims("h1", 1, {"debian-12-iso": Claim(8 << 20, "ro")})}
    plan = rebuild(found(claims=claims), parse)
    web = plan.state.vms["web01"]
    assert (web.host, web.state, web.holder_id, web.holder_gen, web.since_epoch) == \
        ("h2", "running", 2, 1, 5)
    assert plan.state.vms["db01"].host is None
    # Claims count until withdrawn, also while the agent restarts (its sector FREE) ...
    restarting = {3: HostClaims("h3", 1, {"vm-web01": Claim(8 << 20, "rw")})}
    assert rebuild(found(claims=restarting), parse).state.vms["web01"].host == "h3"
    # ... and only a DEAD host's are void (its watchdog fired: it maps nothing).
    assert rebuild(found(claims=restarting, dead=frozenset({3})), parse
                   ).state.vms["web01"].host is None


def test_a_vm_with_no_read_write_disk_is_stopped_and_the_plan_says_to_look():
    ro_only = WEB.replace("<source dev='/dev/sanvg/vm-web01'/>",
                          "<source dev='/dev/sanvg/vm-web01'/>\n      <readonly/>")
    plan = rebuild(found(definitions=[(0, StoredXml("web01", ro_only, 3, 2))]), parse)
    assert plan.state.vms["web01"].host is None
    assert any(x.startswith("VM web01: recorded as stopped, but no read-write disk") for x
               in plan.left_out)


def test_what_cannot_be_told_safely_stops_the_repair():
    both = {1: HostClaims("h1", 1, {"vm-web01": Claim(1, "rw")}),
            2: HostClaims("h2", 1, {"vm-web01": Claim(1, "rw")})}
    with pytest.raises(RepairUnsure, match="VM web01's disks are mapped read-write on h1, h2"):
        rebuild(found(claims=both), parse)
    # (after a failover the old host is DEAD: its claim is void, no refusal)
    assert rebuild(found(claims=both, dead=frozenset({1})), parse).state.vms[
        "web01"].host == "h2"
    bad = {2: CorruptRecord(region="claims", offset=0, detail="foreign data")}
    with pytest.raises(RepairUnsure, match=r"claims record of host id 2 .* restart its agent"):
        rebuild(found(claims=bad), parse)


def garbage(dev: BlockDevice) -> tuple[bytes, bytes]:
    for name in LEDGER_SLOTS:
        r = LAYOUT.region(name)
        dev.write(r.offset, b"\xa5" * 4096)
    return slots.slot_bytes(dev, LAYOUT)


def test_the_one_write_over_a_ledger_with_no_valid_slot(dev: BlockDevice):
    raw = garbage(dev)
    found_damage = slots.damage(slots.slot_bytes(dev, LAYOUT), LAYOUT, 9)
    assert found_damage.valid is None and found_damage.slots == LEDGER_SLOTS
    assert all("foreign data" in d for d in found_damage.problems)
    state = {"cluster": "c-1", "vg": "sanvg"}
    # Bytes other than those the plan saw: nothing is written.
    other = (raw[0], b"\0" + raw[1][1:])
    with pytest.raises(SlotsChanged, match="ledger_b now hold"):
        slots.overwrite_ledger(dev, LAYOUT, 5, state, writer_host_id=1, expect=other)
    assert slots.slot_bytes(dev, LAYOUT) == raw
    rec = slots.overwrite_ledger(dev, LAYOUT, 5, state, writer_host_id=1, expect=raw,
                                 wall_clock=lambda: 1000.0)
    view = slots.read_ledger(dev, LAYOUT)
    assert view.current is not None and view.current.state == state
    # Generations start above the wall clock in ms: no late write of this epoch from
    # before the damage (one per change) can count as newer.
    assert (rec.epoch, rec.generation) == (5, 1_000_002) and view.problems == []
    # A ledger that reads is never written over by a repair.
    with pytest.raises(LedgerReadable):
        slots.damage(slots.slot_bytes(dev, LAYOUT), LAYOUT, 9)
    with pytest.raises(LedgerReadable):
        slots.overwrite_ledger(dev, LAYOUT, 6, state, writer_host_id=1,
                               expect=slots.slot_bytes(dev, LAYOUT))


def test_one_slot_of_foreign_bytes_beside_a_valid_one_gets_the_valid_state(dev: BlockDevice):
    """The writer never writes over foreign bytes, so one such slot stops every ledger
    write (and a repair cut short after slot A leaves this too): the repair copies."""
    slots.write_ledger(dev, LAYOUT, 3, {"vg": "sanvg", "n": 1}, writer_host_id=1,
                       both_slots=True)
    b = LAYOUT.region("ledger_b")
    dev.write(b.offset, b"\xa5" * 4096)
    with pytest.raises(Exception, match="foreign data"):
        slots.write_ledger(dev, LAYOUT, 3, {"vg": "sanvg", "n": 2}, writer_host_id=1)
    found_damage = slots.damage(slots.slot_bytes(dev, LAYOUT), LAYOUT, 9)
    assert found_damage.slots == ("ledger_b",) and found_damage.valid is not None
    slots.overwrite_ledger(dev, LAYOUT, 3, found_damage.valid.state, writer_host_id=1,
                           expect=slots.slot_bytes(dev, LAYOUT))
    slots.write_ledger(dev, LAYOUT, 3, {"vg": "sanvg", "n": 2}, writer_host_id=1)
    view = slots.read_ledger(dev, LAYOUT)
    assert view.current is not None and view.current.state["n"] == 2 and not view.problems


def test_another_record_kind_in_a_slot_is_a_wrong_layout_not_damage(dev: BlockDevice):
    from fenceless.ondisk.record import KIND_AUDIT, encode_record, pad

    for name in LEDGER_SLOTS:
        dev.write(LAYOUT.region(name).offset, pad(encode_record(KIND_AUDIT, b"x", seq=1)))
    with pytest.raises(slots.NotALedger, match="holds another fenceless record"):
        slots.damage(slots.slot_bytes(dev, LAYOUT), LAYOUT, 9)


def test_torn_headers_are_not_trusted_but_a_valid_newer_epoch_refuses(dev: BlockDevice):
    """The repair runs only as the writer whose lease was just checked, and ledger epochs
    are lease epochs: a torn header claiming more is damage. A valid record of a higher
    epoch is not: a stale repair is refused."""
    slots.write_ledger(dev, LAYOUT, 7, {"vg": "sanvg"}, writer_host_id=2, both_slots=True)
    for name in LEDGER_SLOTS:  # both torn: their headers say epoch 7, their bodies are cut
        r = LAYOUT.region(name)
        head = dev.read(r.offset, 4096)
        dev.write(r.offset, head[:HEADER_SIZE] + b"\xff" * 8 + head[HEADER_SIZE + 8:])
    raw = slots.slot_bytes(dev, LAYOUT)
    rec = slots.overwrite_ledger(dev, LAYOUT, 6, {"vg": "sanvg"}, writer_host_id=1,
                                 expect=raw)
    assert rec.epoch == 6 and slots.read_ledger(dev, LAYOUT).current == rec
    slots.write_ledger(dev, LAYOUT, 7, {"vg": "sanvg"}, writer_host_id=2)
    b = LAYOUT.region("ledger_b")
    dev.write(b.offset, b"\xa5" * 4096)  # a valid A at epoch 7, foreign bytes in B
    with pytest.raises(StaleEpoch):
        slots.overwrite_ledger(dev, LAYOUT, 6, {}, writer_host_id=1,
                               expect=slots.slot_bytes(dev, LAYOUT))


def test_the_whole_repair_on_a_control_area(dev: BlockDevice, tmp_path: Path):
    from fenceless.agent.repairio import RepairIo

    _clock, _vg, h1, h2 = writer_and_reader(dev)
    area = h1.keeper.area
    assert area is not None
    vmstore.write_definition(area.dev, area.layout, 2, "web01", WEB, seq=1, epoch=1)
    write_claims(area.dev, area.layout, 2, HostClaims("h2", h2.keeper.lease.generation, {
        "vm-web01": Claim(8 << 20, "rw")}))  # type: ignore[union-attr]
    raw = garbage(area.dev)
    request = RequestInfo("r1", "repair-ledger", {}, "root", ("fenceless", "repair", "ledger"))

    # Only the writer repairs.
    with pytest.raises(RepairNotWriter, match="h1 is, epoch 1"):
        RepairLedgerOp(RepairIo(h2.port, h2.keeper, str(tmp_path)), parse, apply=False,
                       request=request).run()
    io = RepairIo(h1.port, h1.keeper, str(tmp_path))
    plan = RepairLedgerOp(io, parse, apply=False, request=request).run()
    assert plan["applied"] is False and slots.slot_bytes(area.dev, area.layout) == raw
    assert plan["hosts"] == {"1": "h1", "2": "h2"}
    assert plan["vms"] == [{"name": "web01", "version": 1, "host": "h2", "state": "running"}]

    from fenceless.ops.repair import PlanChanged, PlanNeeded

    with pytest.raises(PlanNeeded):  # --yes alone: which plan?
        RepairLedgerOp(io, parse, apply=True, request=request).run()
    with pytest.raises(PlanChanged):
        RepairLedgerOp(io, parse, apply=True, request=request, plan="0" * 12).run()
    assert slots.slot_bytes(area.dev, area.layout) == raw
    done = RepairLedgerOp(io, parse, apply=True, request=request, plan=plan["plan"]).run()
    assert done["applied"] is True and done["mode"] == "rebuild"
    assert Path(done["kept"]).read_bytes() == raw[0] + raw[1]  # nothing lost
    state = h1.port.ledger(fresh=True)
    assert state.writer == WriterInfo(1, "h1", 1) and state.vms["web01"].host == "h2"
    log = [(e.record.argv, e.record.result) for e in audit.read_log(area.dev, area.layout)
           if e.record is not None]
    assert log[-2:] == [(("fenceless", "repair", "ledger"), "started"),
                        (("fenceless", "repair", "ledger"), "ok")]
    # Run again: the ledger reads, so there is nothing to repair.
    with pytest.raises(LedgerReadable):
        RepairLedgerOp(io, parse, apply=True, request=request, plan=plan["plan"]).run()


def test_a_superblock_is_written_back_only_over_damage_and_only_over_what_was_seen(
        dev: BlockDevice):
    from fenceless.ondisk.layout import (
        SuperblockChanged,
        SuperblockReadable,
        read_superblock,
        rewrite_superblock,
    )
    from tests.unit.harness import FakeClock, make_area

    sb = make_area(dev, FakeClock()).sb
    with pytest.raises(SuperblockReadable):
        rewrite_superblock(dev, sb, expect=dev.read(0, 4096))
    dev.write(0, b"\x5a" * 4096)
    seen = dev.read(0, 4096)
    with pytest.raises(SuperblockChanged):
        rewrite_superblock(dev, sb, expect=b"\0" * 4096)
    assert dev.read(0, 4096) == seen
    rewrite_superblock(dev, sb, expect=seen)
    assert read_superblock(dev) == sb


class FakeRepairPort:
    """What RepairSuperblockOp asks of the writer's agent (agent/repairio.py, whose reads
    of the anchor need a whole LUN: the lab test has one)."""

    host = "h1"

    def __init__(self, dev: BlockDevice, sb: object) -> None:
        self.dev, self.sb, self.said, self.kept = dev, sb, [], b""

    def writer(self) -> WriterInfo:
        return WriterInfo(1, "h1", 3)

    def superblock_bytes(self) -> bytes:
        return self.dev.read(0, 4096)

    def superblock_copy(self):  # type: ignore[no-untyped-def]
        return self.sb

    def keep_damaged(self, raw: tuple[bytes, bytes]) -> str:
        self.kept = raw[0]
        return "/state/sb.bin"

    def rewrite_superblock(self, sb, expect: bytes) -> None:  # type: ignore[no-untyped-def]
        from fenceless.ondisk.layout import rewrite_superblock

        rewrite_superblock(self.dev, sb, expect=expect)

    def audit(self, host: str, request: RequestInfo, result: str, message: str) -> None:
        self.said.append(result)

    def log(self, msg: str) -> None:
        pass


def test_the_superblock_repair_plans_then_writes_keeping_the_damage(dev: BlockDevice):
    from fenceless.ondisk.layout import read_superblock
    from fenceless.ops.repair import RepairSuperblockOp
    from tests.unit.harness import FakeClock, make_area

    sb = make_area(dev, FakeClock()).sb
    dev.write(0, b"\x5a" * 4096)
    port = FakeRepairPort(dev, sb)
    request = RequestInfo("r1", "repair-superblock", {}, "root", ("fenceless", "repair"))
    plan = RepairSuperblockOp(port, apply=False, request=request).run()  # type: ignore[arg-type]
    assert plan["applied"] is False and "foreign data" in plan["damage"]
    assert plan["cluster"] == str(sb.cluster_uuid) and dev.read(0, 4096) == b"\x5a" * 4096
    done = RepairSuperblockOp(port, apply=True, request=request,  # type: ignore[arg-type]
                              plan=plan["plan"]).run()
    assert done["applied"] and port.kept == b"\x5a" * 4096
    assert port.said == ["started", "ok"] and read_superblock(dev) == sb


def test_a_host_can_become_the_writer_over_a_damaged_ledger_to_repair_it(dev: BlockDevice):
    """The writer died and no ledger slot reads: the takeover must still give a writer
    (the lease makes it one, not the ledger), or nobody could ever run the repair."""
    from fenceless.ops.writer import become_writer

    _clock, _vg, h1, h2 = writer_and_reader(dev)
    assert h1.keeper.lease is not None
    garbage(dev)
    h1.keeper.lease.release()
    h1.keeper.lease = None
    got = become_writer(h2.port, "takeover")
    assert got.won and got.epoch == 2 and h2.port.epoch == 2
    assert any("the ledger cannot be written" in line for line in h2.logs)


def test_a_torn_header_claiming_an_epoch_above_the_writers_lease_is_damage(dev: BlockDevice):
    """Ledger epochs are lease epochs: beside a valid slot, a torn header claiming more
    than the lease this writer holds (a flipped bit) blocks every write (StaleEpoch), so
    it is damage for the repair, and written over."""
    from fenceless.ondisk.record import HEADER

    slots.write_ledger(dev, LAYOUT, 3, {"vg": "sanvg"}, writer_host_id=1, both_slots=True)
    b = LAYOUT.region("ledger_b")
    head = bytearray(dev.read(b.offset, 4096))
    fields = list(HEADER.unpack_from(head))
    fields[6] = 99  # the epoch
    HEADER.pack_into(head, 0, *fields)  # (its CRC no longer matches: a torn header)
    dev.write(b.offset, bytes(head))
    with pytest.raises(StaleEpoch):
        slots.write_ledger(dev, LAYOUT, 3, {"vg": "sanvg"}, writer_host_id=1)
    with pytest.raises(LedgerReadable):  # a writer at epoch 99 or more: not damage
        slots.damage(slots.slot_bytes(dev, LAYOUT), LAYOUT, 99)
    found_damage = slots.damage(slots.slot_bytes(dev, LAYOUT), LAYOUT, 3)
    assert found_damage.slots == ("ledger_b",) and found_damage.valid is not None
    slots.overwrite_ledger(dev, LAYOUT, 3, found_damage.valid.state, writer_host_id=1,
                           expect=slots.slot_bytes(dev, LAYOUT))
    slots.write_ledger(dev, LAYOUT, 3, {"vg": "sanvg", "after": True}, writer_host_id=1)


def test_another_record_kind_in_the_ledger_makes_no_writer(dev: BlockDevice):
    from fenceless.ondisk.record import KIND_AUDIT, encode_record, pad
    from fenceless.ops.writer import become_writer

    _clock, _vg, h1, h2 = writer_and_reader(dev)
    assert h1.keeper.lease is not None
    for name in LEDGER_SLOTS:
        dev.write(LAYOUT.region(name).offset, pad(encode_record(KIND_AUDIT, b"x", seq=1)))
    h1.keeper.lease.release()
    h1.keeper.lease = None
    with pytest.raises(slots.LedgerUnreadable, match="record where a ledger record belongs"):
        become_writer(h2.port, "takeover")
    assert h2.port.epoch is None


def test_a_writer_whose_lease_holds_writes_over_a_torn_header_claiming_a_higher_epoch(
        dev: BlockDevice):
    """A flipped bit in a torn header's epoch: without the leader check every write was
    StaleEpoch (the writer gave its role up, took it back, and so on); with it, the
    damaged slot is written over. A leader that moved still refuses."""
    from fenceless.errors import LeaseLost
    from fenceless.ondisk.record import HEADER

    slots.write_ledger(dev, LAYOUT, 3, {"n": 1}, writer_host_id=1, both_slots=True)
    b = LAYOUT.region("ledger_b")
    head = bytearray(dev.read(b.offset, 4096))
    fields = list(HEADER.unpack_from(head))
    fields[6] = 99
    HEADER.pack_into(head, 0, *fields)
    dev.write(b.offset, bytes(head))
    with pytest.raises(StaleEpoch):
        slots.write_ledger(dev, LAYOUT, 3, {"n": 2}, writer_host_id=1)

    def moved() -> None:
        raise LeaseLost(detail="the leader names h2 at epoch 4")
    with pytest.raises(LeaseLost, match="h2 at epoch 4"):
        slots.write_ledger(dev, LAYOUT, 3, {"n": 2}, writer_host_id=1, confirm=moved)
    slots.write_ledger(dev, LAYOUT, 3, {"n": 2}, writer_host_id=1, confirm=lambda: None)
    view = slots.read_ledger(dev, LAYOUT)
    assert view.current is not None and view.current.state == {"n": 2} and not view.problems
