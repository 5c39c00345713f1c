"""Record header, CRC-32C, layout and superblock of the control area."""

from __future__ import annotations

import itertools
import random
import struct
import uuid

import pytest

from fenceless.blockio import SECTOR, BlockDevice
from fenceless.errors import IntegrityError, UserError
from fenceless.ondisk.crc import crc32c
from fenceless.ondisk.errors import (
    BadLength,
    BadMagic,
    ChecksumMismatch,
    CorruptRecord,
    UnsupportedVersion,
)
from fenceless.ondisk.layout import (
    Layout,
    Region,
    Superblock,
    decode_superblock,
    encode_superblock,
    read_superblock,
    write_superblock,
)
from fenceless.ondisk.record import (
    FORMAT_VERSION,
    KIND_HOST,
    KIND_LEDGER,
    decode_record,
    encode_record,
    pad,
)

MiB = 1024 * 1024


def test_crc32c_matches_the_published_check_values() -> None:
    assert crc32c(b"123456789") == 0xE3069283
    assert crc32c(b"") == 0
    assert crc32c(bytes(32)) == 0x8A9136AA  # RFC 3720 B.4
    assert crc32c(b"\xff" * 32) == 0x62A8AB43
    assert crc32c(b"6789", crc32c(b"12345")) == 0xE3069283  # chaining


def test_the_c_crc32c_is_used_and_agrees_with_the_reference() -> None:
    import random

    from fenceless.ondisk.crc import CRC32C_IMPLEMENTATION, crc32c_py

    assert CRC32C_IMPLEMENTATION == "c", "google-crc32c's C extension is missing"
    rnd = random.Random(7)
    for n in (0, 1, 7, 64, 4095, 4096, 70001):
        data = rnd.randbytes(n)
        seed = rnd.getrandbits(32)
        assert crc32c(data) == crc32c_py(data)
        assert crc32c(data, seed) == crc32c_py(data, seed)
    assert crc32c_py(b"123456789") == 0xE3069283


def test_record_round_trip_and_empty_sector() -> None:
    raw = pad(encode_record(KIND_HOST, b"payload", seq=7, epoch=3))
    assert len(raw) == SECTOR
    rec = decode_record(raw, kind=KIND_HOST, region="hosts", offset=MiB)
    assert rec is not None
    assert (rec.seq, rec.epoch, rec.payload, rec.version) == (7, 3, b"payload", 1)
    assert decode_record(bytes(SECTOR), kind=KIND_HOST, region="hosts", offset=MiB) is None


def _good() -> bytearray:
    return bytearray(pad(encode_record(KIND_HOST, b"x" * 100, seq=1, epoch=2)))


def _corruptions() -> list[tuple[str, bytes, type[CorruptRecord], str]]:
    rnd = random.Random(7)
    random_bytes = bytes(rnd.randrange(256) for _ in range(SECTOR))
    flipped = _good()
    flipped[60] ^= 0x10
    flipped_header = _good()
    flipped_header[24] ^= 0x01  # epoch field
    newer = bytearray(pad(encode_record(KIND_HOST, b"x", version=FORMAT_VERSION + 1)))
    older = bytearray(pad(encode_record(KIND_HOST, b"x", version=0)))
    other_kind = pad(encode_record(KIND_LEDGER, b"x"))
    no_magic = bytearray(SECTOR)
    no_magic[100] = 1
    overflow = _good()
    struct.pack_into("<I", overflow, 12, SECTOR)
    return [
        ("random", random_bytes, BadMagic, "foreign data"),
        ("flipped payload bit", bytes(flipped), ChecksumMismatch, "checksum mismatch (stored 0x"),
        ("flipped header bit", bytes(flipped_header), ChecksumMismatch, "checksum mismatch"),
        ("newer version", bytes(newer), UnsupportedVersion, "written by a newer fenceless"),
        ("older version", bytes(older), UnsupportedVersion, "older format"),
        ("other kind", other_kind, BadMagic, "found a ledger record where a host lease"),
        ("zero magic", bytes(no_magic), BadMagic, "no record header"),
        ("length overflow", bytes(overflow), BadLength, "length overflow"),
    ]


@pytest.mark.parametrize(("what", "raw", "cls", "text"), _corruptions(),
                         ids=[c[0] for c in _corruptions()])
def test_corrupt_records_name_region_and_offset(what: str, raw: bytes,
                                                cls: type[CorruptRecord], text: str) -> None:
    with pytest.raises(cls) as info:
        decode_record(raw, kind=KIND_HOST, region="hosts", offset=1052672)
    msg = str(info.value)
    assert msg.startswith("Control area region 'hosts' at offset 1052672: ")
    assert text in msg
    assert msg.endswith("refusing to use or overwrite it")
    assert isinstance(info.value, IntegrityError)
    assert info.value.exit_code == 4


def test_layout_for_sixteen_hosts() -> None:
    layout = Layout.compute(16)
    table = {r.name: (r.offset, r.length) for r in layout.regions}
    assert table == {
        "superblock": (0, 4096),
        "hosts": (1 * MiB, 16 * 4096),
        "writer": (2 * MiB, 18 * 4096),
        "ledger_a": (3 * MiB, 256 * 1024),
        "ledger_b": (4 * MiB, 256 * 1024),
        "mailboxes": (5 * MiB, 16 * 8192),
        "mdhistory": (6 * MiB, 128 * 256 * 1024),
        "audit": (38 * MiB, MiB),
        "claims": (39 * MiB, 16 * 512 * 1024),
        "vms": (47 * MiB, 1024 * 68 * 1024),  # 68 MiB
        "vmstage": (115 * MiB, 16 * 68 * 1024),
    }
    assert layout.total_size() == 117 * MiB


@pytest.mark.parametrize("hosts", [1, 2, 16, 100, 250])
def test_layout_regions_are_aligned_and_disjoint(hosts: int) -> None:
    layout = Layout.compute(hosts)
    regions = sorted(layout.regions, key=lambda r: r.offset)
    for a, b in itertools.pairwise(regions):
        assert a.end <= b.offset
    assert all(r.offset % MiB == 0 and r.length % SECTOR == 0 for r in regions)
    assert layout.total_size() % MiB == 0
    assert layout.total_size() >= regions[-1].end


def test_layout_refuses_bad_sizes() -> None:
    with pytest.raises(ValueError, match="max_hosts"):
        Layout.compute(0)
    with pytest.raises(ValueError, match="max_hosts"):
        Layout.compute(251)
    with pytest.raises(ValueError, match="multiple"):
        Layout.compute(4, ledger_slot_size=5000)


def _sb(hosts: int = 16) -> Superblock:
    return Superblock(cluster_uuid=uuid.UUID(int=42),
                      vg_uuid="abcdef-1234-5678-9abc-def0-1234-5678", io_timeout=0.25,
                      creation_epoch=1, layout=Layout.compute(hosts))


def test_superblock_round_trip(dev: BlockDevice) -> None:
    sb = _sb(4)
    assert read_superblock(dev) is None
    write_superblock(dev, sb)
    assert read_superblock(dev) == sb
    with pytest.raises(UserError, match="already holds a fenceless superblock"):
        write_superblock(dev, sb)
    changed = Superblock(sb.cluster_uuid, sb.vg_uuid, 0.5, 2, sb.layout)
    write_superblock(dev, changed, overwrite=True)
    got = read_superblock(dev)
    assert got is not None
    assert got.io_timeout == 0.5


def test_superblock_is_never_written_over_foreign_data(dev: BlockDevice) -> None:
    dev.write(0, b"\x42" * SECTOR)
    with pytest.raises(BadMagic, match="region 'superblock' at offset 0"):
        write_superblock(dev, _sb(4), overwrite=True)
    assert dev.read(0, SECTOR) == b"\x42" * SECTOR


def test_superblock_keeps_unknown_regions_for_forward_compatibility() -> None:
    base = Layout.compute(16)
    extra = Region("future", base.total_size(), 4 * MiB)
    sb = Superblock(uuid.UUID(int=1), "vg", 10.0, 1, Layout(16, (*base.regions, extra)))
    got = decode_superblock(encode_superblock(sb))
    assert got is not None
    assert got.layout.region("future") == extra
    assert got.layout.total_size() == base.total_size() + 4 * MiB


def test_superblock_with_missing_or_overlapping_regions_is_refused() -> None:
    base = Layout.compute(4)
    missing = Layout(4, tuple(r for r in base.regions if r.name != "ledger_b"))
    raw = encode_superblock(Superblock(uuid.UUID(int=1), "vg", 10.0, 1, missing))
    with pytest.raises(CorruptRecord, match="missing"):
        decode_superblock(raw)
    overlap = Layout(4, (*base.regions, Region("x", MiB + SECTOR, SECTOR)))
    raw = encode_superblock(Superblock(uuid.UUID(int=1), "vg", 10.0, 1, overlap))
    with pytest.raises(CorruptRecord, match="overlap"):
        decode_superblock(raw)
