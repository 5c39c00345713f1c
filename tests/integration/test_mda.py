"""The metadata-area reader against real LVM on a loop device (no device-mapper needed)."""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from fenceless.blockio import DirectDevice
from fenceless.lvm.mda import read_label, read_mda_header, read_metadata_text, vg_section

pytestmark = pytest.mark.lab


class Pv:
    """A loop device over a temp image, and an LVM that sees only it."""

    def __init__(self, root: Path, dev: str) -> None:
        self.root = root
        self.dev = dev
        lvm_dir = root / "lvm"
        for d in ("backup", "archive"):
            (lvm_dir / d).mkdir(parents=True)
        (root / "lock").mkdir()
        (lvm_dir / "lvm.conf").write_text(
            f'devices {{ filter=["a|^{dev}$|","r|.*|"] global_filter=["a|^{dev}$|","r|.*|"]\n'
            '  obtain_device_list_from_udev=0 hints="none" use_devicesfile=0 }\n'
            f'global {{ activation=0 use_aio=0 locking_dir="{root}/lock" }}\n'
            f'backup {{ backup_dir="{lvm_dir}/backup" archive_dir="{lvm_dir}/archive" }}\n')
        self.env = {**os.environ, "LVM_SYSTEM_DIR": str(lvm_dir),
                    "LVM_SUPPRESS_FD_WARNINGS": "1", "LC_ALL": "C"}

    def lvm(self, *args: str) -> str:
        proc = subprocess.run(["lvm", *args], capture_output=True, text=True, env=self.env,
                              timeout=60, check=False)
        if proc.returncode:
            raise AssertionError(f"lvm {' '.join(args)}: {proc.stderr}")
        return proc.stdout

    def seqno(self, vg: str = "fx") -> int:
        return int(self.lvm("vgs", "--noheadings", "-o", "vg_seqno", vg).strip())

    def backup_text(self, vg: str = "fx") -> str:
        out = self.root / "vgcfgbackup.txt"
        self.lvm("vgcfgbackup", "-q", "-f", str(out), vg)
        return out.read_text()


@pytest.fixture
def pv(tmp_path: Path) -> Iterator[Pv]:
    image = tmp_path / "lun.img"
    with open(image, "wb") as f:
        f.truncate(512 << 20)
    dev = subprocess.run(["losetup", "--find", "--show", str(image)], capture_output=True,
                         text=True, check=True).stdout.strip()
    try:
        yield Pv(tmp_path, dev)
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)


_COMMENT = re.compile(r'("(?:[^"\\]|\\.)*")|#.*')


def normalized(text: str) -> list[str]:
    """The VG section's lines without comments or indentation (vgcfgbackup adds both)."""
    sec = vg_section(text)
    lines = []
    for raw in text[sec.start : sec.end].splitlines():
        line = _COMMENT.sub(lambda m: m.group(1) or "", raw).strip()
        if line:
            lines.append(re.sub(r"\s+", " ", line))
    return lines


def read(pv: Pv) -> tuple[str, int]:
    dev = DirectDevice(pv.dev)
    try:
        return read_metadata_text(dev)
    finally:
        dev.close()


def test_reader_matches_vgs_and_vgcfgbackup(pv: Pv) -> None:
    pv.lvm("pvcreate", "-q", "--metadatasize", "4m", pv.dev)
    pv.lvm("vgcreate", "-q", "-s", "4m", "fx", pv.dev)
    steps = [
        ("lvcreate", "-q", "-an", "-Zn", "-L", "20m", "-n", "vm1-disk", "fx"),
        ("lvcreate", "-q", "-an", "-Zn", "-L", "8m", "-n", "iso", "fx",
         "--addtag", "fenceless_shared_ro"),
        ("lvextend", "-q", "-L", "40m", "fx/vm1-disk"),
        ("lvcreate", "-q", "-an", "-Zn", "-L", "4m", "-n", "scratch", "fx"),
        ("lvremove", "-q", "-y", "fx/scratch"),
        ("lvrename", "-q", "fx", "iso", "iso2"),
    ]
    for step in steps:
        pv.lvm(*step)
        text, seqno = read(pv)
        assert seqno == pv.seqno()
        assert normalized(text) == normalized(pv.backup_text())
    assert "iso2" in text and "scratch" not in text


def test_reader_follows_the_circular_buffer_through_a_wrap(pv: Pv) -> None:
    pv.lvm("pvcreate", "-q", "--metadatasize", "1m", pv.dev)
    pv.lvm("vgcreate", "-q", "-s", "1m", "fx", pv.dev)
    dev = DirectDevice(pv.dev)
    try:
        first = read_mda_header(dev)
        wraps = 0
        i = 0
        while wraps < 3:
            i += 1
            assert i < 400, "the metadata area never wrapped"
            pv.lvm("lvcreate", "-q", "-an", "-Zn", "-L", "1m", "-n", f"lv{i:03d}", "fx")
            if i % 10 == 0:
                pv.lvm("lvextend", "-q", "-L", "+1m", f"fx/lv{i:03d}")
            info = read_mda_header(dev, location=first.location)
            text, seqno = read_metadata_text(dev, location=first.location)
            assert seqno == pv.seqno()
            if info.wraps:
                wraps += 1
                assert normalized(text) == normalized(pv.backup_text())
        assert f"lv{i:03d}" in text
        full_text, full_seqno = read_metadata_text(dev)  # from the label again
        assert (full_text, full_seqno) == (text, seqno)
    finally:
        dev.close()


def test_both_metadata_copies_read_the_same(pv: Pv) -> None:
    pv.lvm("pvcreate", "-q", "--pvmetadatacopies", "2", "--metadatasize", "1m", pv.dev)
    pv.lvm("vgcreate", "-q", "-s", "4m", "fx", pv.dev)
    pv.lvm("lvcreate", "-q", "-an", "-Zn", "-L", "8m", "-n", "a", "fx")
    dev = DirectDevice(pv.dev)
    try:
        locations = read_label(dev)
        assert len(locations) == 2 and locations[1].start > locations[0].start
        got = [read_metadata_text(dev, location=loc) for loc in locations]
        assert got[0] == got[1] == read_metadata_text(dev)
        assert got[0][1] == pv.seqno()
        assert normalized(got[1][0]) == normalized(pv.backup_text())
    finally:
        dev.close()
