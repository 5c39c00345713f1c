"""The role file: what the LVM wrapper knows about this host's writer role.

The wrapper sits in front of every ``lvs``, so it cannot ask the agent or
read the LUN; it reads one small local file instead, written by the agent at
every lease renewal. It lives in the config's ``run_dir`` (``/run/fenceless``,
a tmpfs), so it is gone after a reboot. Format (text, fields separated by one
space)::

    # fenceless role file v2: boot BOOT_ID, then VG ROLE WRITER EPOCH VALID_UNTIL ...
    boot 5d6f2c2e-3a5b-4f2e-9a0a-1b2c3d4e5f60
    sanvg writer h1 7 1234567
    othervg reader h3 2 1234567

- the first line is exactly :data:`HEADER`; the second names the boot the
  file was written in (``/proc/sys/kernel/random/boot_id``);
- ROLE is ``writer`` or ``reader`` (this host's role for that VG);
- WRITER is the host name of the VG's writer as the agent last saw it, or
  ``-`` when it knows none; EPOCH is the writer epoch (0 when none);
- VALID_UNTIL is in CLOCK_BOOTTIME centiseconds: the agent writes now plus
  the time its lease has left. ``/proc/uptime`` is CLOCK_BOOTTIME, so the
  wrapper compares without any clock of another host and without a fork.
  That clock restarts at 0 on boot, hence the boot line: a file of an
  earlier boot (a ``run_dir`` that is not a tmpfs) is never trusted.

The wrapper treats a missing, unreadable or malformed file, a header of
another version, a boot id that is not this boot's (or none to compare
with), and a missing, malformed or expired line as "not the writer": a
dead agent cannot leave a host writable.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from fenceless.config import HOST_NAME_RE, VG_NAME_RE
from fenceless.errors import UsageError

ROLE_FILE = "guard/role"
HEADER = ("# fenceless role file v2: boot BOOT_ID, then VG ROLE WRITER EPOCH VALID_UNTIL "
          "(CLOCK_BOOTTIME centiseconds)")
BOOT_ID_PATH = "/proc/sys/kernel/random/boot_id"
ROLES = ("writer", "reader")
_LINE_RE = re.compile(r"^(\S+) (writer|reader) (\S+) ([0-9]+) ([0-9]+)$")
BOOT_ID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


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


@dataclass(frozen=True)
class RoleFile:
    boot_id: str | None  # the boot it was written in; None when the header or boot line is bad
    entries: dict[str, RoleEntry]


def role_path(run_dir: str) -> Path:
    return Path(run_dir) / ROLE_FILE


class InvalidBootId(UsageError):
    """role file: invalid boot id {boot_id!r} (the form of {path}: 8-4-4-4-12 hex digits)"""


class RoleVgInvalid(UsageError):
    """role file: invalid VG name {vg!r}"""


class UnknownRole(UsageError):
    """role file: role must be writer or reader, got {role!r}"""


class RoleWriterInvalid(UsageError):
    """role file: invalid writer host name {writer!r}"""


class RoleNegative(UsageError):
    """role file: epoch and valid_until must not be negative"""


class RoleVgTwice(UsageError):
    """role file: one line per VG"""


def current_boot_id(path: str = BOOT_ID_PATH) -> str:
    """This boot's id, as the wrapper reads it.

    OSError when it cannot be read or is not a boot id: the agent logs an
    OSError from the role file and goes on, and the wrapper, finding no file
    of this boot, treats the host as a reader.
    """
    with open(path, encoding="ascii", errors="replace") as f:
        text = f.readline().strip()
    if not BOOT_ID_RE.match(text):
        raise OSError(errno.EINVAL, f"does not hold a boot id: {text[:40]!r}", path)
    return text


def boottime_cs() -> int:
    """Now, in the wrapper's clock: CLOCK_BOOTTIME (= /proc/uptime) in centiseconds."""
    return int(time.clock_gettime(time.CLOCK_BOOTTIME) * 100)


def entry(vg: str, role: str, writer: str | None, epoch: int, lease_left: float) -> RoleEntry:
    """An entry valid for ``lease_left`` seconds from now (rounded down: fail safe)."""
    left_cs = max(0, int(lease_left * 100))
    return RoleEntry(vg, role, writer, epoch, boottime_cs() + left_cs)


def _check(e: RoleEntry) -> None:
    if not VG_NAME_RE.match(e.vg):
        raise RoleVgInvalid(vg=e.vg)
    if e.role not in ROLES:
        raise UnknownRole(role=e.role)
    if e.writer is not None and not HOST_NAME_RE.match(e.writer):
        raise RoleWriterInvalid(writer=e.writer)
    if e.epoch < 0 or e.valid_until_cs < 0:
        raise RoleNegative(epoch=e.epoch, valid_until_cs=e.valid_until_cs)


def render(entries: list[RoleEntry], boot_id: str) -> str:
    if not BOOT_ID_RE.match(boot_id):
        raise InvalidBootId(boot_id=boot_id, path=BOOT_ID_PATH)
    for e in entries:
        _check(e)
    if len({e.vg for e in entries}) != len(entries):
        raise RoleVgTwice()
    return "\n".join([HEADER, f"boot {boot_id}", *(e.line() for e in entries)]) + "\n"


def write_role_file(run_dir: str, entries: list[RoleEntry], *,
                    boot_id: str | None = None) -> Path:
    """Replace the role file atomically (the wrapper may read it at any moment).

    Stamped with this boot's id (``boot_id`` only for tests). Written to a
    temporary file, fsynced and renamed, so a reader sees the old or the new
    file, never half of one.
    """
    text = render(entries, current_boot_id() if boot_id is None else boot_id)
    path = role_path(run_dir)
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


def parse(text: str) -> RoleFile:
    """The file as the wrapper reads it: nothing without the header and a boot line, and
    malformed lines ignored. Whether the boot is this one is the caller's question."""
    lines = text.split("\n")
    boot = lines[1].split(" ") if len(lines) > 2 and lines[0] == HEADER else []
    if len(boot) != 2 or boot[0] != "boot" or not BOOT_ID_RE.match(boot[1]):
        return RoleFile(None, {})
    out: dict[str, RoleEntry] = {}
    for line in lines[2:]:
        m = _LINE_RE.match(line)
        if m and m.group(1) not in out:
            writer = None if m.group(3) == "-" else m.group(3)
            out[m.group(1)] = RoleEntry(m.group(1), m.group(2), writer, int(m.group(4)),
                                        int(m.group(5)))
    return RoleFile(boot[1], out)


def read_role_file(run_dir: str) -> RoleFile | None:
    """The file, or None when it is missing or unreadable."""
    try:
        return parse(role_path(run_dir).read_text())
    except (OSError, UnicodeDecodeError):
        return None
