"""Fuzzing with hypothesis: command lines and damaged control-area sectors.

Whatever comes in, the answer is a clear error of ours (a message and one of the
documented exit codes), never a traceback, and damage is never written over.
(tests/unit/test_disk_fuzz.py fuzzes the same readers with seeded random damage.)
"""

from __future__ import annotations

import contextlib
import io

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fenceless.cli import main as climain
from fenceless.ondisk import record
from tests.unit.test_disk_fuzz import filled, ours, readers, record_starts

# Commands that run for long or make labs are left out: the rest stop at the missing
# config, at their arguments, or answer from the parser alone.
WORDS = [c for c in climain.COMMANDS if c not in ("lab", "agent", "watchdog")] + [
    "create", "extend", "rename", "remove", "list", "show", "status", "handover",
    "takeover", "define", "start", "stop", "migrate", "history", "diff", "restore",
    "install", "bash", "zsh", "--json", "--vg", "--to", "--live", "--force", "--yes",
    "--request-id", "--timeout", "--shared-ro", "--warn", "-c", "/nonexistent.toml",
    "--config=/nonexistent.toml", "--", "-", "10G", "+2G", "-5G", "0", "web", "a/b",
    "x" * 300, "\u00e9", "\x00", "$(reboot)", ";", "--help", "-h", "--version"]
EXITS = {0, 2, 3, 4, 5, 6}


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(argv=st.lists(st.one_of(st.sampled_from(WORDS), st.text(max_size=12)), max_size=7))
def test_any_command_line_gets_a_clear_answer(argv, monkeypatch):
    monkeypatch.setenv("FENCELESS_CONFIG", "/nonexistent.toml")
    if argv and argv[0] in ("lab", "agent", "watchdog"):
        return
    argv = ["-c", "/nonexistent.toml", *argv]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = climain.main(argv)
        except SystemExit as exc:  # only argparse's own --help / --version
            rc = exc.code if isinstance(exc.code, int) else 2
    assert rc in EXITS, (argv, rc, err.getvalue())
    assert "Traceback" not in err.getvalue() and "internal error" not in err.getvalue(), argv
    if rc:  # a message of ours, or the usage (no command at all prints the help)
        assert err.getvalue().startswith("fenceless: ") or \
            "usage:" in err.getvalue() + out.getvalue(), argv


@pytest.fixture(scope="module")
def area():
    return filled()


@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pick=st.integers(min_value=0), raw=st.binary(max_size=4096),
       keep_header=st.booleans())
def test_a_damaged_sector_is_an_integrity_error_or_nothing(area, pick, raw, keep_header):
    dev, control = area
    starts = record_starts(control)
    sector, kind = starts[pick % len(starts)]
    original = dev.read(sector, 4096)
    data = raw + bytes(4096 - len(raw))
    if keep_header:  # a header that looks right over a body that is not
        data = original[:record.HEADER_SIZE] + data[record.HEADER_SIZE:]
    dev.write(sector, data)
    try:
        for read in readers(dev, control):
            ours(read, f"damage at {sector} (a {record.KIND_NAMES[kind]} record)")
        assert dev.read(sector, 4096) == data, "a reader wrote over the damage"
    finally:
        dev.write(sector, original)
