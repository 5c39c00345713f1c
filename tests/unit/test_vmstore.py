"""The VM store on a memory device: slots, uploads, and what a reader refuses."""

from __future__ import annotations

import pytest

from fenceless.blockio import SECTOR, IoError, MemDevice
from fenceless.ledger import vmstore
from fenceless.ondisk.errors import ChecksumMismatch
from fenceless.ondisk.layout import VM_SLOT_SIZE, Layout

LAYOUT = Layout.compute(4, vm_slots=8)
XML = "<domain><name>web01</name>" + "<!-- padding -->" * 3000 + "</domain>"  # ~48 KiB


def device() -> MemDevice:
    return MemDevice(LAYOUT.total_size())


def test_a_definition_reads_back_only_as_the_ledger_names_it():
    dev = device()
    sha = vmstore.digest(XML)
    vmstore.write_definition(dev, LAYOUT, 5, "web01", XML, seq=9, epoch=3)
    assert vmstore.read_definition(dev, LAYOUT, 5, name="web01", seq=9, sha=sha) == XML
    with pytest.raises(vmstore.DefinitionMismatch, match="version 9 of 'web01'"):
        vmstore.read_definition(dev, LAYOUT, 5, name="web01", seq=10, sha=sha)
    with pytest.raises(vmstore.DefinitionMismatch, match="digest"):
        vmstore.read_definition(dev, LAYOUT, 5, name="web01", seq=9, sha="0" * 64)
    with pytest.raises(vmstore.DefinitionMismatch, match="empty"):
        vmstore.read_definition(dev, LAYOUT, 4, name="web01", seq=9, sha=sha)


def test_a_write_cut_short_leaves_a_checksum_mismatch_not_a_wrong_definition():
    dev = device()
    vmstore.write_definition(dev, LAYOUT, 2, "web01", XML, seq=1, epoch=1)
    dev.tear_next_write(1)  # the tail goes first: only its first sector lands
    with pytest.raises(IoError):
        vmstore.write_definition(dev, LAYOUT, 2, "web01", XML.replace("padding", "PADDING"),
                                 seq=2, epoch=1)
    with pytest.raises(ChecksumMismatch):
        vmstore.read_definition(dev, LAYOUT, 2, name="web01", seq=1,
                                sha=vmstore.digest(XML))


def test_the_largest_definition_fits_a_slot_and_a_larger_one_is_refused():
    dev = device()
    room = VM_SLOT_SIZE - 40 - 2 - len("web01")
    big = "x" * room
    vmstore.write_definition(dev, LAYOUT, 0, "web01", big, seq=1, epoch=1)
    assert vmstore.read_definition(dev, LAYOUT, 0, name="web01", seq=1,
                                   sha=vmstore.digest(big)) == big
    assert room >= 64 * 1024
    with pytest.raises(vmstore.DefinitionTooLarge, match="nothing was written"):
        vmstore.write_definition(dev, LAYOUT, 1, "web01", big + "x", seq=2, epoch=1)
    assert dev.read(LAYOUT.region("vms").offset + VM_SLOT_SIZE, SECTOR) == bytes(SECTOR)


def test_an_upload_is_taken_only_with_its_name_and_digest():
    dev = device()
    vmstore.write_stage(dev, LAYOUT, 3, "web01", XML, seq=4, generation=2)
    assert vmstore.stage_seq(dev, LAYOUT, 3) == 4
    assert vmstore.stage_seq(dev, LAYOUT, 2) == 0
    sha = vmstore.digest(XML)
    assert vmstore.read_stage(dev, LAYOUT, 3, name="web01", sha=sha) == XML
    with pytest.raises(vmstore.StageMismatch, match="send it again"):
        vmstore.read_stage(dev, LAYOUT, 3, name="web02", sha=sha)
    with pytest.raises(vmstore.StageMismatch):
        vmstore.read_stage(dev, LAYOUT, 2, name="web01", sha=sha)


def test_a_new_version_takes_a_free_slot_then_the_oldest_earlier_version():
    assert vmstore.free_slot([0, 1], [2], 4) == (3, False)
    assert vmstore.free_slot([0, 1], [3, 2], 4) == (3, True)  # oldest earlier version first
    with pytest.raises(vmstore.StoreFull, match="4 slots"):
        vmstore.free_slot([0, 1, 2, 3], [], 4)


def test_a_cluster_made_before_vms_has_no_store():
    old = Layout(max_hosts=4, regions=tuple(r for r in LAYOUT.regions
                                            if r.name not in ("vms", "vmstage")))
    assert vmstore.slot_count(old) == 0
    with pytest.raises(vmstore.NoVmStore):
        vmstore.write_stage(device(), old, 1, "web01", XML, seq=1, generation=1)
