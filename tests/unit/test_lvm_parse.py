"""The parsers, on JSON saved from this LVM version (tests/fixtures/capture.sh)."""

from pathlib import Path

import pytest

from fenceless.errors import LvmOutputError
from fenceless.lvm import parse
from fenceless.lvm.mapping import MultiSegmentRefused, dm_name, dm_table, single_extent

FIX = Path(__file__).parent.parent / "fixtures" / "lvm-2.03.16"


def load(name):
    return (FIX / name).read_text()


def test_vgs():
    (vg,) = parse.parse_vgs(load("vgs.json"))
    assert vg.name == "fx"
    assert vg.extent_size == 4 << 20
    assert vg.seqno == 4
    assert vg.lv_count == 2
    assert vg.free == vg.free_count * vg.extent_size


def test_pvs():
    (pv,) = parse.parse_pvs(load("pvs.json"))
    assert pv.name == "/dev/loop7"
    assert pv.vg_name == "fx"
    assert pv.pe_start % 4096 == 0
    assert pv.pe_alloc_count == 12


def test_lvs_and_tags():
    lvs = {lv.name: lv for lv in parse.parse_lvs(load("lvs.json"))}
    assert lvs["vm1-disk"].size == 40 << 20
    assert lvs["vm1-disk"].seg_count == 2
    assert lvs["iso"].tags == ("fenceless_shared_ro",)
    assert lvs["vm1-disk"].tags == ()


def test_empty_lvs():
    assert parse.parse_lvs(load("lvs-empty.json")) == []


def test_segments():
    segs = parse.parse_segments(load("segs.json"))
    disk = [s for s in segs if s.lv_name == "vm1-disk"]
    assert [(s.start_le, s.size_le) for s in disk] == [(0, 5), (5, 5)]
    assert disk[1].pe_ranges == (parse.PeRange("/dev/loop7", 7, 11),)


def _maps():
    segs = parse.parse_segments(load("segs.json"))
    pvs = {p.name: p for p in parse.parse_pvs(load("pvs.json"))}
    (vg,) = parse.parse_vgs(load("vgs.json"))
    return segs, pvs, vg


def test_single_extent_offset():
    segs, pvs, vg = _maps()
    ext = single_extent(segs, pvs, vg.extent_size, "fx", "iso")
    pe_start = pvs["/dev/loop7"].pe_start
    assert ext.device == "/dev/loop7"
    assert ext.offset == pe_start + 5 * vg.extent_size
    assert ext.size == 2 * vg.extent_size


def test_multi_segment_refused_for_the_lab():
    segs, pvs, vg = _maps()
    with pytest.raises(MultiSegmentRefused, match="2 segments"):
        single_extent(segs, pvs, vg.extent_size, "fx", "vm1-disk")


def test_dm_table_for_a_two_segment_lv():
    segs, pvs, vg = _maps()
    table = dm_table(segs, pvs, vg.extent_size, "fx", "vm1-disk", {"/dev/loop7": "7:7"})
    start = pvs["/dev/loop7"].pe_start // 512
    ext = vg.extent_size // 512
    assert table.splitlines() == [
        f"0 {5 * ext} linear 7:7 {start}",
        f"{5 * ext} {5 * ext} linear 7:7 {start + 7 * ext}",
    ]


def test_dm_name_doubles_dashes():
    assert dm_name("san-vg", "vm1-disk") == "san--vg-vm1--disk"


@pytest.mark.parametrize("text", [
    "not json", '{"report": 3}', '{"report": [{"lv": [{"lv_name": 3}]}]}',
])
def test_bad_reports(text):
    with pytest.raises(LvmOutputError):
        parse.parse_lvs(text)


def test_bad_number():
    text = load("lvs.json").replace('"lv_size":"41943040"', '"lv_size":"-4"')
    with pytest.raises(LvmOutputError, match="lv_size"):
        parse.parse_lvs(text)


def test_bad_pe_range():
    with pytest.raises(LvmOutputError, match="backwards"):
        parse.parse_pe_ranges("/dev/sda:9-3")
    assert parse.parse_pe_ranges("/dev/sda:0-1 /dev/sdb:4-4")[1].count == 1


def test_segments_carry_the_lvs_permission():
    """Saved from LVM 2.03.16 after `lvchange --permission r --addtag fenceless_vm_ro`."""
    segs = {s.lv_name: s for s in parse.parse_segments(load("segs-permission.json"))}
    assert segs["image"].lv_attr[1] == "r" and segs["disk"].lv_attr[1] == "w"
    assert parse.parse_segments(load("segs.json"))[0].lv_attr == ""  # reports before it
