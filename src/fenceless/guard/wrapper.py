"""The text of the LVM wrapper that the guard installs at the real binary's path.

It sits in front of every ``lvs`` on the host, so it is POSIX sh (dash) with
its settings embedded, no Python, and no fork before the final ``exec``: it
reads the role file, the boot id and /proc/uptime with the ``read`` builtin.

The script is the package data file ``wrapper.sh.in``, kept as plain sh so it
reads (and diffs) as what runs. ``generate()`` fills its ``@NAME@``
placeholders: this host's settings, and every command list and option list
from :mod:`fenceless.lvm.policy`, the policy the adapter follows too.

How it decides, in this order (the command classes are the policy's):

=================================================  ===============================
command                                            what runs
=================================================  ===============================
``pvscan`` exactly as udev's rule runs it           passes unchanged, always
neutral (version, help, lvmconfig, ...)            passes unchanged, always
on a shared VG, on every host (the writer too):    refused, exit 5, nothing runs
the lvm shell or a script (or a command this
guard does not know), pvmove, lvconvert, lvpoll,
anything but a report that names the control LV,
vgremove/vgsplit/vgmerge, lvremove/lvresize/...
of a bare VG, a tag or a selection, and any
activation
names only non-shared VGs                           passes (``metadata_read_only=0``)
this host is the writer of every VG concerned      passes (``metadata_read_only=0``)
otherwise: reporting (lvs, vgs, pvs, *display,      ``--readonly`` added
vgcfgbackup, fullreport, lvscan, lvmdiskscan)
``lvchange``/``vgchange -a n`` and nothing else     ``--sysinit --readonly`` added
that changes metadata
anything else                                       refused, exit 5, nothing runs
=================================================  ===============================

"The writer" is read from the agent's role file (:mod:`fenceless.guard.role`):
it counts only with this boot's id, the current header and a line that has
not expired. Passing commands get ``--config global/metadata_read_only=0``
(merged into the caller's own ``--config``: LVM refuses the option twice) to
undo the guard's lvm.conf block on LVM 2.02.

Which VGs a command concerns is over-approximated, so that a parsing gap can
only refuse, never let a change through: any value or positional that names a
shared VG (``VG``, ``VG/LV``, ``/dev/VG/LV``, ``$LVM_VG_NAME``) concerns it;
and a command concerns *every* shared VG when it names no VG at all, or has a
positional that is not a plain VG or VG/LV name (a device path, relative or
not, a tag, a UUID), a positional where LVM expects a device
(``policy.DEVICE_COMMANDS``, ``policy.PV_AFTER_FIRST_COMMANDS``), or
``--select``. Options are split as LVM splits them: which take a value is
known from ``policy.FLAG_LONG``, ``policy.VALUE_LONG`` and each command's
``policy.SHORT_OPTIONS``. An option of unknown arity (an abbreviation, a
letter the command lacks, ``--uuid``) is read as taking the next word, makes
the command concern every shared VG, and that word, if it starts with ``-``,
is read as options too. Any prefix of ``--activate`` or ``--select`` counts
as that option, as LVM's getopt_long reads an unambiguous one.
"""

from __future__ import annotations

import functools
import re
import shlex
from dataclasses import dataclass
from importlib import resources

from fenceless.guard import role
from fenceless.lvm import policy

# fenceless commands that do what an admin tried with LVM on a non-writer.
FORWARDED = {
    "lvcreate": "volume create NAME SIZE",
    "lvextend": "volume extend NAME +SIZE",
    "lvresize": "volume extend NAME +SIZE",
    "lvrename": "volume rename OLD NEW",
    "lvremove": "volume remove NAME",
}
# Undoes the guard's lvm.conf block for the writer (LVM 2.02 honours it; 2.03 ignores it).
RO_OFF = "global/metadata_read_only=0"
TEMPLATE = "wrapper.sh.in"
_PLACEHOLDER = re.compile(r"@([A-Z][A-Z0-9_]*)@")


@dataclass(frozen=True)
class WrapperSettings:
    host: str  # this host's name, for the refusal message
    shared_vgs: tuple[str, ...]  # the config's [vg.NAME] tables
    real_binary: str  # the diverted binary, named lvm (LVM reads argv[0])
    role_file: str
    version: str  # fenceless's version, so `guard status` sees an outdated wrapper
    boot_id_file: str = role.BOOT_ID_PATH


def _alts(words: tuple[str, ...] | list[str]) -> str:
    """A sh ``case`` pattern list matching exactly these words."""
    return "|".join(shlex.quote(w) if any(c in w for c in "?*[") else w for w in words)


@functools.cache
def template() -> str:
    """The script with its placeholders, read once from the package's data."""
    return resources.files(__package__).joinpath(TEMPLATE).read_text(encoding="utf-8")


def _udev_scan_test() -> str:
    """sh that is true when "$@" is udev's pvscan arguments followed by one /dev/ path."""
    words = [f'[ "${{{i}}}" = {shlex.quote(w)} ]' for i, w in enumerate(policy.UDEV_SCAN_ARGS, 1)]
    n = len(policy.UDEV_SCAN_ARGS) + 1
    return " && ".join([f'[ "$#" -eq {n} ]', *words, f'fl_devname "${{{n}}}"'])


def generate(s: WrapperSettings) -> str:
    """The wrapper script for these settings (pure: ``guard status`` regenerates and compares)."""
    q = shlex.quote
    forwarded = "\n".join(f"    {cmd}) fl_hint={q(hint)} ;;" for cmd, hint in FORWARDED.items())
    hexd = "[0-9a-f]"
    values = {
        "HOST": s.host,
        "VERSION": s.version,
        "FL_HOST": q(s.host),
        "FL_SHARED": q(" " + " ".join(s.shared_vgs) + " "),
        "FL_LVM": q(s.real_binary),
        "FL_ROLE": q(s.role_file),
        "FL_ROLE_HEADER": q(role.HEADER),
        "FL_BOOT_ID": q(s.boot_id_file),
        "FL_RO_OFF": q(RO_OFF),
        "FL_CTL": q(policy.CONTROL_LV),
        "FL_CTL_DM": q(policy.CONTROL_LV.replace("-", "--")),
        "BOOT_ID_PATTERN": "-".join(hexd * n for n in (8, 4, 4, 4, 12)),
        "NEUTRAL_COMMANDS": _alts(policy.NEUTRAL_COMMANDS),
        "REPORT_COMMANDS": _alts(policy.REPORT_COMMANDS),
        "ACTIVATION_COMMANDS": _alts(policy.ACTIVATION_COMMANDS),
        "METADATA_COMMANDS": _alts(policy.METADATA_COMMANDS),
        "UDEV_SCAN_COMMAND": policy.UDEV_SCAN_COMMAND,
        "UDEV_SCAN_TEST": _udev_scan_test(),
        "DEVICE_COMMANDS": _alts(policy.DEVICE_COMMANDS),
        "PV_AFTER_FIRST_COMMANDS": _alts(policy.PV_AFTER_FIRST_COMMANDS),
        "LONG_RUNNING_COMMANDS": _alts(policy.LONG_RUNNING_COMMANDS),
        "LV_WIDE_COMMANDS": _alts(policy.LV_WIDE_COMMANDS),
        "VG_REMOVING_COMMANDS": _alts(policy.VG_REMOVING_COMMANDS),
        "LV_REMOVE_COMMAND": policy.LV_REMOVE_COMMAND,
        "ACTIVATING_COMMANDS": _alts(policy.ACTIVATING_COMMANDS),
        "ACTIVATES_BY_DEFAULT": _alts(policy.ACTIVATES_BY_DEFAULT),
        "DEACTIVATION_VALUES": _alts(policy.DEACTIVATION_VALUES),
        "ABBREVIABLE_OPTIONS": " ".join(policy.ABBREVIABLE_OPTIONS),
        "ACTIVATE_OPTIONS": _alts(policy.ACTIVATE_OPTIONS),
        "ACTIVATION_FLAGS": _alts(policy.ACTIVATION_FLAGS),
        "ACTIVATION_VALUES": _alts(policy.ACTIVATION_VALUES),
        "FLAG_LONG": _alts(policy.FLAG_LONG),
        "VALUE_LONG": _alts(policy.VALUE_LONG),
        "SHORT_OPTIONS": "\n".join(f"    {cmd}) fl_sflag={q(flags)}; fl_sval={q(values)} ;;"
                                   for cmd, (flags, values) in policy.SHORT_OPTIONS.items()),
        "UUID32": "[A-Za-z0-9]" * 32,
        "FORWARDED": forwarded,
    }

    def fill(m: re.Match[str]) -> str:
        try:
            return values[m.group(1)]
        except KeyError:
            raise ValueError(f"{TEMPLATE}: unknown placeholder {m.group(0)}") from None

    # One pass: a value that happens to contain "@NAME@" is never filled in again.
    return _PLACEHOLDER.sub(fill, template())
