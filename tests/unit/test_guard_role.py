"""The role file the agent writes and the wrapper reads."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from fenceless.errors import UsageError
from fenceless.guard import role

BOOT = "5d6f2c2e-3a5b-4f2e-9a0a-1b2c3d4e5f60"


def test_format_is_one_line_per_vg_after_a_header_and_the_boot(tmp_path):
    path = role.write_role_file(str(tmp_path), [
        role.RoleEntry("sanvg", "writer", "h1", 7, 123456),
        role.RoleEntry("vg2", "reader", None, 0, 42),
    ], boot_id=BOOT)
    assert path == tmp_path / "guard" / "role"
    assert path.read_text() == (f"{role.HEADER}\n"
                                f"boot {BOOT}\n"
                                "sanvg writer h1 7 123456\n"
                                "vg2 reader - 0 42\n")
    assert role.HEADER.startswith("# fenceless role file v2: ")
    assert oct(path.stat().st_mode & 0o777) == "0o644"
    assert role.read_role_file(str(tmp_path)) == role.RoleFile(BOOT, {
        "sanvg": role.RoleEntry("sanvg", "writer", "h1", 7, 123456),
        "vg2": role.RoleEntry("vg2", "reader", None, 0, 42),
    })


def test_the_file_is_stamped_with_this_boot(tmp_path):
    role.write_role_file(str(tmp_path), [role.RoleEntry("sanvg", "writer", "h1", 7, 1)])
    this_boot = Path(role.BOOT_ID_PATH).read_text().strip()
    assert role.current_boot_id() == this_boot
    got = role.read_role_file(str(tmp_path))
    assert got is not None and got.boot_id == this_boot


@pytest.mark.parametrize("text", ["", "garbage\n", "0123\n",
                                  BOOT.upper() + "\n", BOOT + "-0\n"])
def test_no_boot_id_is_an_os_error_and_writes_nothing(tmp_path, text):
    bad = tmp_path / "boot_id"
    bad.write_text(text)
    with pytest.raises(OSError):
        role.current_boot_id(str(bad))
    with pytest.raises(OSError):
        role.current_boot_id(str(tmp_path / "missing"))
    with pytest.raises(role.InvalidBootId):
        role.write_role_file(str(tmp_path), [], boot_id=text.strip())
    assert not role.role_path(str(tmp_path)).exists()


@pytest.mark.parametrize("text", [
    "sanvg writer h1 7 5\n",
    f"{role.HEADER}\nsanvg writer h1 7 5\n",
    f"{role.HEADER}\nboot nope\nsanvg writer h1 7 5\n",
    f"{role.HEADER}\nboot {BOOT} x\nsanvg writer h1 7 5\n",
    "# fenceless role file v1: VG ROLE WRITER EPOCH VALID_UNTIL (CLOCK_BOOTTIME centiseconds)"
    f"\nboot {BOOT}\nsanvg writer h1 7 5\n",
])
def test_a_file_without_the_header_and_boot_line_has_no_entries(tmp_path, text):
    assert role.parse(text) == role.RoleFile(None, {})


def test_valid_until_is_boottime_plus_the_lease_left():
    before = int(time.clock_gettime(time.CLOCK_BOOTTIME) * 100)
    e = role.entry("sanvg", "writer", "h1", 3, 12.345)
    after = int(time.clock_gettime(time.CLOCK_BOOTTIME) * 100)
    assert before + 1234 <= e.valid_until_cs <= after + 1234
    # /proc/uptime is the same clock, in the unit the wrapper reads.
    up = float(Path("/proc/uptime").read_text().split()[0])
    assert abs(up * 100 - role.boottime_cs()) < 100


def test_negative_lease_left_means_already_expired():
    assert role.entry("sanvg", "writer", "h1", 3, -5).valid_until_cs <= role.boottime_cs()


@pytest.mark.parametrize("bad", [
    role.RoleEntry("san vg", "writer", "h1", 1, 1),
    role.RoleEntry("sanvg", "owner", "h1", 1, 1),
    role.RoleEntry("sanvg", "writer", "H 1", 1, 1),
    role.RoleEntry("sanvg", "writer", "h1", -1, 1),
])
def test_bad_entries_are_refused_and_the_old_file_stays(tmp_path, bad):
    role.write_role_file(str(tmp_path), [role.RoleEntry("sanvg", "reader", "h1", 1, 5)],
                         boot_id=BOOT)
    before = role.role_path(str(tmp_path)).read_bytes()
    with pytest.raises(UsageError):
        role.write_role_file(str(tmp_path), [bad], boot_id=BOOT)
    assert role.role_path(str(tmp_path)).read_bytes() == before
    assert os.listdir(tmp_path / "guard") == ["role"]


def test_two_lines_for_one_vg_are_refused(tmp_path):
    with pytest.raises(UsageError):
        role.write_role_file(str(tmp_path), [role.RoleEntry("sanvg", "reader", "h1", 1, 5),
                                             role.RoleEntry("sanvg", "writer", "h1", 1, 5)])


def test_missing_file_reads_as_none(tmp_path):
    assert role.read_role_file(str(tmp_path)) is None


def test_readers_never_see_a_partial_file(tmp_path):
    """Rewrites at every renewal race with the wrapper's reads: rename makes them atomic."""
    state = str(tmp_path)
    entries = [role.RoleEntry(f"vg{i}", "writer", "h1", i, 10**9) for i in range(50)]
    role.write_role_file(state, entries)
    stop = threading.Event()
    seen: list[int] = []

    def read_loop() -> None:
        while not stop.is_set():
            got = role.read_role_file(state)
            seen.append(len(got.entries) if got is not None else 0)

    t = threading.Thread(target=read_loop)
    t.start()
    for _ in range(200):
        role.write_role_file(state, entries)
    stop.set()
    t.join()
    assert seen and set(seen) == {50}
