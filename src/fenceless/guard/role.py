"""The role file: what the LVM wrapper knows about this host's writer role.

The wrapper sits in front of every ``lvs``, so it cannot ask the agent or
read the LUN; it reads one small local file instead, written by the agent at
every lease renewal. Format (text, one line per shared VG, fields separated
by one space; lines starting with ``#`` are comments)::

    # fenceless role file v1: VG ROLE WRITER EPOCH VALID_UNTIL
    sanvg writer h1 7 1234567
    othervg reader h3 2 1234567

- ROLE is ``writer`` or ``reader`` (this host's role for that VG);
- WRITER is the host name of the VG's writer as the agent last saw it, or
  ``-`` when it knows none; EPOCH is the writer epoch (0 when none);
- VALID_UNTIL is in CLOCK_BOOTTIME centiseconds: the agent writes now plus
  the time its lease has left. ``/proc/uptime`` is CLOCK_BOOTTIME, so the
  wrapper compares without any clock of another host and without a fork.

The wrapper treats a missing, unreadable, malformed or expired line as
"not the writer": a dead agent cannot leave a host writable.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from fenceless.config import HOST_NAME_RE, VG_NAME_RE
from fenceless.errors import UsageError

ROLE_FILE = "guard/role"
HEADER = "# fenceless role file v1: VG ROLE WRITER EPOCH VALID_UNTIL (CLOCK_BOOTTIME centiseconds)"
ROLES = ("writer", "reader")
_LINE_RE = re.compile(r"^(\S+) (writer|reader) (\S+) ([0-9]+) ([0-9]+)$")


@dataclass(frozen=True)
class RoleEntry:
    vg: str
    role: str  # "writer" or "reader"
    writer: str | None  # host name of the VG's writer, if known
    epoch: int
    valid_until_cs: int  # CLOCK_BOOTTIME, centiseconds

    def line(self) -> str:
        return (f"{self.vg} {self.role} {self.writer or '-'} {self.epoch} "
                f"{self.valid_until_cs}")


def role_path(state_dir: str) -> Path:
    return Path(state_dir) / ROLE_FILE


def boottime_cs() -> int:
    """Now, in the wrapper's clock: CLOCK_BOOTTIME (= /proc/uptime) in centiseconds."""
    return int(time.clock_gettime(time.CLOCK_BOOTTIME) * 100)


def entry(vg: str, role: str, writer: str | None, epoch: int, lease_left: float) -> RoleEntry:
    """An entry valid for ``lease_left`` seconds from now (rounded down: fail safe)."""
    left_cs = max(0, int(lease_left * 100))
    return RoleEntry(vg, role, writer, epoch, boottime_cs() + left_cs)


def _check(e: RoleEntry) -> None:
    if not VG_NAME_RE.match(e.vg):
        raise UsageError(detail=f"role file: invalid VG name {e.vg!r}")
    if e.role not in ROLES:
        raise UsageError(detail=f"role file: role must be writer or reader, got {e.role!r}")
    if e.writer is not None and not HOST_NAME_RE.match(e.writer):
        raise UsageError(detail=f"role file: invalid writer host name {e.writer!r}")
    if e.epoch < 0 or e.valid_until_cs < 0:
        raise UsageError(detail="role file: epoch and valid_until must not be negative")


def render(entries: list[RoleEntry]) -> str:
    for e in entries:
        _check(e)
    if len({e.vg for e in entries}) != len(entries):
        raise UsageError(detail="role file: one line per VG")
    return "\n".join([HEADER, *(e.line() for e in entries)]) + "\n"


def write_role_file(state_dir: str, entries: list[RoleEntry]) -> Path:
    """Replace the role file atomically (the wrapper may read it at any moment).

    Written to a temporary file, fsynced and renamed, so a reader sees the old
    or the new file, never half of one.
    """
    text = render(entries)
    path = role_path(state_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    return path


def parse(text: str) -> dict[str, RoleEntry]:
    """Entries by VG, as the wrapper reads them: malformed lines are ignored."""
    out: dict[str, RoleEntry] = {}
    for line in text.splitlines():
        m = _LINE_RE.match(line)
        if m and m.group(1) not in out:
            writer = None if m.group(3) == "-" else m.group(3)
            out[m.group(1)] = RoleEntry(m.group(1), m.group(2), writer, int(m.group(4)),
                                        int(m.group(5)))
    return out


def read_role_file(state_dir: str) -> dict[str, RoleEntry] | None:
    """The entries, or None when the file is missing or unreadable."""
    try:
        return parse(role_path(state_dir).read_text())
    except (OSError, UnicodeDecodeError):
        return None
