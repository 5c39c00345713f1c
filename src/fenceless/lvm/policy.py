"""The LVM command policy: what a host that is not the metadata writer may run.

Two places enforce it, and both are built from this module so they cannot
drift apart: the adapter (:mod:`fenceless.lvm.adapter`, every command
fenceless itself runs) and the guard's wrapper (:mod:`fenceless.guard.wrapper`,
every command anyone else runs on the host).

Why the classes exist (all checked against LVM 2.03.16):

- LVM 2.03 ignores ``global/metadata_read_only``: ``lvcreate --config
  global/metadata_read_only=1`` creates the LV. The only read-only switch it
  honours is the ``--readonly`` option, so a reader's safety rests on passing it.
- *Report* commands accept ``--readonly`` and then neither lock nor "repair"
  the VG, so a reader runs them with it added.
- *Activation*: ``lvchange``/``vgchange -a y|n`` with ``--readonly`` alone is
  refused ("Operation prohibited while --readonly is set"), but with
  ``--sysinit --readonly`` LVM allows it ("Allowing activation with --readonly
  --sysinit") and writes no metadata. Any other change those commands can
  make (``--addtag``, ``--refresh``, ...) rejects ``--readonly``, so a reader's
  activation may carry only the options in :data:`ACTIVATION_FLAGS`.
- *Metadata* commands reject ``--readonly`` at parse time ("unrecognized
  option" / "Command does not accept option"), so they cannot be made safe
  for a reader: a reader refuses them before any process starts. Every
  command not in another class is treated as one, listed or not, so a
  command a later LVM adds is refused until someone checks it.
- *Neutral* commands touch no VG (versions, help, configuration, types).

udev's ``pvscan --cache ... DEVNAME`` is the guard's one exception
(:data:`UDEV_SCAN_ARGS`, only in that exact form): udev runs it for every
block device to record which PVs are online under /run/lvm, and the host's
local VGs need it. fenceless itself never runs it.

The guard's wrapper refuses more than a reader's adapter does, on every host,
the writer too (``docs/design.md``, "The guard"): what keeps going after the
writer role is gone (:data:`LONG_RUNNING_COMMANDS`, the lvm shell), what may
remove the control LV (:data:`CONTROL_LV`), and activation of a shared VG's
LVs, which only fenceless does, with a claim on the LUN first. Which VGs a
command concerns follows from its positionals: :data:`DEVICE_COMMANDS` and
:data:`PV_AFTER_FIRST_COMMANDS` say where LVM expects devices.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence


class Kind(enum.Enum):
    NEUTRAL = "neutral"
    REPORT = "report"
    ACTIVATION = "activation"
    METADATA = "metadata"


# Accept --readonly (each checked with `lvm CMD --readonly` on 2.03.16) and never write.
REPORT_COMMANDS = ("lvs", "vgs", "pvs", "lvdisplay", "vgdisplay", "pvdisplay", "vgcfgbackup",
                   "fullreport", "lvscan", "lvmdiskscan")
# Need no VG access at all. (``types`` is no command on 2.03.16; LVM itself rejects it.)
NEUTRAL_COMMANDS = ("version", "help", "lvmconfig", "config", "dumpconfig", "formats",
                    "segtypes", "types", "tags", "devtypes")
ACTIVATION_COMMANDS = ("lvchange", "vgchange")
# The rest of `lvm help` on 2.03.16: they change metadata, may (pvck and vgck repair,
# vgscan --mknodes, pvscan -a), or were never checked not to. Listed for the tests and
# the reader; kind() gives METADATA for any name outside the other classes.
METADATA_COMMANDS = (
    "lastlog", "lvconvert", "lvcreate", "lvextend", "lvmdevices", "lvmsadc", "lvmsar",
    "lvpoll", "lvreduce", "lvremove", "lvrename", "lvresize", "pvchange", "pvck", "pvcreate",
    "pvdata", "pvmove", "pvremove", "pvresize", "pvscan", "systemid", "vgcfgrestore", "vgck",
    "vgconvert", "vgcreate", "vgexport", "vgextend", "vgimport", "vgimportclone",
    "vgimportdevices", "vgmerge", "vgmknodes", "vgreduce", "vgremove", "vgrename", "vgscan",
    "vgsplit",
)
# udev's event scan, exactly as Debian 12's /lib/udev/rules.d/69-lvm.rules runs it, followed by
# one device (DEVNAME): the only pvscan that passes the guard unchanged.
UDEV_SCAN_COMMAND = "pvscan"
UDEV_SCAN_ARGS = ("--cache", "--listvg", "--checkcomplete", "--vgonline", "--autoactivation",
                  "event", "--udevoutput", "--journal=output")

# The LV that holds a cluster's control area (leases, ledger, mailboxes) in each shared VG.
CONTROL_LV = "fenceless-ctl"

# Every positional of these is a device (a PV), so each concerns every shared VG: any
# device may be the shared LUN, whatever path (relative, a link, a partition) names it.
DEVICE_COMMANDS = ("pvchange", "pvck", "pvcreate", "pvdata", "pvdisplay", "pvmove", "pvremove",
                   "pvresize", "pvs", "pvscan", "vgimportclone")
# These take PVs after a VG or LV: every positional after the first is a device.
PV_AFTER_FIRST_COMMANDS = ("vgcreate", "vgextend", "vgreduce", "vgsplit", "vgmerge", "lvcreate",
                           "lvextend", "lvresize", "lvreduce", "lvconvert")
# Go on in the background (lvmpolld) after they return, also after the writer role is gone:
# the guard refuses them on a shared VG on every host, the writer too.
LONG_RUNNING_COMMANDS = ("pvmove", "lvconvert", "lvpoll")
# Remove, resize or rename LVs: with a tag, --select or a name that is not VG/LV they may
# reach the control LV, so the guard refuses them for a shared VG on every host; lvremove
# also with a VG name alone (it removes every LV of the VG).
LV_WIDE_COMMANDS = ("lvremove", "lvresize", "lvextend", "lvreduce", "lvrename")
LV_REMOVE_COMMAND = "lvremove"
# Remove a whole VG, or move its LVs (the control LV too) to another VG: refused for a
# shared VG on every host.
VG_REMOVING_COMMANDS = ("vgremove", "vgsplit", "vgmerge")
# Their -a/--activate activates; lvcreate activates the new LV unless given -a n.
ACTIVATING_COMMANDS = ("lvchange", "vgchange", "pvscan", "lvcreate")
ACTIVATES_BY_DEFAULT = ("lvcreate",)
# LVM parses options with getopt_long, which takes any unambiguous prefix of a long option
# (`pvscan --activ ay` activates). The wrapper reads any prefix of these as the option
# itself, also one LVM would find ambiguous: it can only refuse more.
ABBREVIABLE_OPTIONS = ("--activate", "--select")
# -a values that only deactivate. Any other value (y, ay, ey, e, sy, ly, ...) is taken to
# activate, also one LVM would reject: the guard refuses it for a shared VG on every host.
DEACTIVATION_VALUES = ("n", "an", "en", "ln", "sn")

# Options that may accompany ``-a y|n`` in an activation a reader may run: none of them
# changes metadata, and LVM accepts each together with --sysinit --readonly.
ACTIVATION_FLAGS = ("--sysinit", "--readonly", "-a", "--activate", "-v", "--verbose", "-q",
                    "--quiet", "-d", "--debug", "-t", "--test", "-K", "--ignoreactivationskip",
                    "--noudevsync", "--ignorelockingfailure", "--config", "-S", "--select",
                    "-h", "--help")
ACTIVATE_OPTIONS = ("-a", "--activate")
ACTIVATION_VALUES = ("y", "n", "ay", "an", "ey", "en", "ly", "ln", "sy", "sn")

# LVM 2.03.16 options that take no value, from every command's --longhelp (its usage lines
# too). Every other option takes the next word as its value, so an unknown option swallows
# (rather than frees) a word. Short letters that are a flag for one command and take a value
# for another (-a, -c, -f, -l, ...) are not in FLAG_SHORT: the adapter treats them as taking a
# value; the wrapper knows each command's own (SHORT_OPTIONS).
FLAG_LONG = (
    "--abort", "--activevolumegroups", "--aligned", "--all", "--atomic", "--background", "--binary",
    "--blockdevice", "--cache", "--check", "--checkcomplete", "--colon", "--columns", "--debug",
    "--detachprofile", "--exported", "--force", "--foreign", "--full", "--handlemissingpvs",
    "--help", "--history", "--ignoreactivationskip", "--ignoreadvanced", "--ignorelocal",
    "--ignorelockingfailure", "--ignoremonitoring", "--ignoreunsupported", "--import",
    "--importdevices", "--list", "--listlvs", "--listvg", "--lockstart", "--lockstop", "--logonly",
    "--longhelp", "--lvmpartition", "--maps", "--merge", "--mergedconfig", "--mergemirrors",
    "--mergesnapshot", "--mergethin", "--mirrorsonly", "--mknodes", "--nameprefixes", "--nofsck",
    "--noheadings", "--nohints", "--nohistory", "--nolocking", "--norestorefile", "--nosuffix",
    "--nosync", "--notifydbus", "--noudevsync", "--novolumegroup", "--partial", "--quiet",
    "--readonly", "--refresh", "--removemissing", "--repair", "--resizefs", "--restoremissing",
    "--resync", "--rows", "--segments", "--shared", "--short", "--showdeprecated",
    "--showunsupported", "--snapshot", "--splitcache", "--splitsnapshot", "--startpoll", "--stdin",
    "--swapmetadata", "--sysinit", "--test", "--thin", "--trackchanges", "--udevoutput",
    "--unbuffered", "--uncache", "--unconfigured", "--unquoted", "--update", "--updatemetadata",
    "--usepolicies", "--validate", "--vdo", "--verbose", "--version", "--vgonline",
    "--withcomments", "--withgeneralpreamble", "--withlocalpreamble", "--withspaces",
    "--withsummary", "--withversions", "--yes",
)
# And those that take a value. A long option in neither list (an abbreviation, or --uuid,
# a flag for some commands that takes a value for pvcreate) is read as taking the next word,
# which the wrapper also counts as a positional it cannot place: it may be one.
VALUE_LONG = (
    "--activate", "--activationmode", "--adddev", "--addpvid", "--addtag", "--alloc",
    "--allocatable", "--atversion", "--autoactivation", "--autobackup", "--basevgname",
    "--bootloaderareasize", "--cachedevice", "--cachemetadataformat", "--cachemode",
    "--cachepolicy", "--cachepool", "--cachesettings", "--cachesize", "--cachevol", "--chunksize",
    "--clustered", "--commandprofile", "--compression", "--config", "--configreport",
    "--contiguous", "--dataalignment", "--dataalignmentoffset", "--deduplication", "--deldev",
    "--delpvid", "--deltag", "--deviceidtype", "--devices", "--devicesfile", "--discards",
    "--driverloaded", "--dump", "--errorwhenfull", "--extents", "--file", "--interval", "--journal",
    "--labelsector", "--lockopt", "--locktype", "--logicalvolume", "--major", "--maxlogicalvolumes",
    "--maxphysicalvolumes", "--maxrecoveryrate", "--metadataignore", "--metadataprofile",
    "--metadatasize", "--metadatatype", "--minor", "--minrecoveryrate", "--mirrorlog", "--mirrors",
    "--monitor", "--name", "--options", "--originname", "--permission", "--persistent",
    "--physicalextentsize", "--poll", "--polloperation", "--poolmetadata", "--poolmetadatasize",
    "--poolmetadataspare", "--profile", "--pvmetadatacopies", "--raidintegrity",
    "--raidintegrityblocksize", "--raidintegritymode", "--readahead", "--rebuild", "--regionsize",
    "--repairtype", "--replace", "--reportformat", "--resizeable", "--restorefile", "--select",
    "--separator", "--setactivationskip", "--setautoactivation", "--setphysicalvolumesize",
    "--settings", "--sinceversion", "--size", "--sort", "--splitmirrors", "--stripes",
    "--stripesize", "--syncaction", "--systemid", "--thinpool", "--type", "--typeconfig", "--units",
    "--vdopool", "--vdosettings", "--vgmetadatacopies", "--virtualsize", "--wipesignatures",
    "--writebehind", "--writemostly", "--zero",
)
# Each command's short options: (letters that are flags, letters that take a value), from
# its --longhelp on 2.03.16. A letter in neither is no option of that command (LVM refuses
# it); the wrapper reads it as taking a value, and the word after it as a positional too.
SHORT_OPTIONS: dict[str, tuple[str, str]] = {
    "config": ("dhlqtvy", "f"), "devtypes": ("dhqtvy", "OSo"), "dumpconfig": ("dhlqtvy", "f"),
    "formats": ("dhqtvy", ""), "fullreport": ("adhqtvy", "OSo"), "help": ("dhqtvy", ""),
    "lastlog": ("dhqtvy", "S"), "lvchange": ("KPdfhqtvy", "ACMSZajkpr"),
    "lvconvert": ("HTbdfhqstvy", "IRVZcimnr"), "lvcreate": ("HKTdhqstvy", "ACILMRVWZacijklmnpr"),
    "lvdisplay": ("CHacdhmqtvy", "OSo"), "lvextend": ("dfhnqrtvy", "AILilm"),
    "lvmconfig": ("dhlqtvy", "f"), "lvmdevices": ("dhqtvy", ""), "lvmdiskscan": ("dhlqtvy", ""),
    "lvmsadc": ("dhqtvy", ""), "lvmsar": ("dfhqstvy", ""), "lvpoll": ("dhqtvy", "Ai"),
    "lvreduce": ("dfhnqrtvy", "ALl"), "lvremove": ("dfhqtvy", "AS"), "lvrename": ("dhqtvy", "A"),
    "lvresize": ("dfhnqrtvy", "AILil"), "lvs": ("Hadhqtvy", "OSo"), "lvscan": ("abdhqtvy", ""),
    "pvchange": ("adfhqtuvy", "ASx"), "pvck": ("dhqtvy", "f"), "pvcreate": ("dfhqtvy", "MZu"),
    "pvdata": ("dhqtvy", ""), "pvdisplay": ("Cacdhmqstvy", "OSo"), "pvmove": ("bdhqtvy", "Ain"),
    "pvremove": ("dfhqtvy", ""), "pvresize": ("dhqtvy", ""), "pvs": ("adhqtvy", "OSo"),
    "pvscan": ("dehnqstuvy", "aj"), "segtypes": ("dhqtvy", ""), "systemid": ("dhqtvy", ""),
    "tags": ("dhqtvy", ""), "vgcfgbackup": ("dhqtvy", "f"), "vgcfgrestore": ("dhlqtvy", "Mf"),
    "vgchange": ("KPdfhqtuvy", "ASalpsx"), "vgck": ("dhqtvy", ""), "vgconvert": ("dfhqtvy", "M"),
    "vgcreate": ("dfhqtvy", "AMZclps"), "vgdisplay": ("ACcdhqstvy", "OSo"),
    "vgexport": ("adhqtvy", "S"), "vgextend": ("dfhqtvy", "AMZ"), "vgimport": ("adfhqtvy", "S"),
    "vgimportclone": ("dhiqtvy", "n"), "vgimportdevices": ("adhqtvy", "S"),
    "vgmerge": ("dhlqtvy", "A"), "vgmknodes": ("dhqtvy", ""), "vgreduce": ("adfhqtvy", "A"),
    "vgremove": ("dfhqtvy", "S"), "vgrename": ("dfhqtvy", "A"), "vgs": ("adhqtvy", "OSo"),
    "vgscan": ("dhqtvy", ""), "vgsplit": ("dhqtvy", "AMlnp"),
}

FLAG_SHORT = "HKPTbdehqtvy"


def known(command: str) -> bool:
    """Whether ``command`` is in one of the classes. The wrapper treats any other word
    as the lvm shell would (LVM runs it as a script), and refuses it for a shared VG."""
    return command in (*REPORT_COMMANDS, *NEUTRAL_COMMANDS, *ACTIVATION_COMMANDS,
                       *METADATA_COMMANDS)


def kind(command: str) -> Kind:
    """The class of an LVM command; anything unknown is METADATA (refused on a reader)."""
    if command in REPORT_COMMANDS:
        return Kind.REPORT
    if command in NEUTRAL_COMMANDS:
        return Kind.NEUTRAL
    if command in ACTIVATION_COMMANDS:
        return Kind.ACTIVATION
    return Kind.METADATA


def options(args: Sequence[str]) -> list[tuple[str, str | None]]:
    """The options in ``args`` with their values (None: a flag, or a value missing at the end).

    Split the way the wrapper's sh splits them, which is the way LVM does for
    the options that matter: ``--opt=value``, ``--opt value`` unless ``--opt``
    is a known flag, short clusters (``-vay`` is ``-v`` and ``-a y``), and
    nothing after ``--``.
    """
    found: list[tuple[str, str | None]] = []
    words = iter(args)
    for word in words:
        if word == "--":
            break
        if word.startswith("--"):
            name, eq, value = word.partition("=")
            if eq:
                found.append((name, value))
            else:
                found.append((name, None if name in FLAG_LONG else next(words, None)))
        elif word.startswith("-") and len(word) > 1:
            rest = word[1:]
            while rest:
                letter, rest = rest[0], rest[1:]
                if letter in FLAG_SHORT:
                    found.append((f"-{letter}", None))
                else:
                    found.append((f"-{letter}", rest or next(words, None)))
                    rest = ""
    return found


def reader_activation(command: str, args: Sequence[str]) -> bool:
    """Whether a reader may run this as an activation (with ``--sysinit --readonly``).

    An activation command, ``-a``/``--activate`` with a value in
    :data:`ACTIVATION_VALUES`, and no option outside :data:`ACTIVATION_FLAGS`.
    The wrapper adds ``--sysinit --readonly`` when they are missing; the adapter
    requires its callers to pass them (:func:`runs_readonly`). A value missing
    at the very end (``lvchange VG/LV -a``) is refused here, while the wrapper
    lets LVM reject it: LVM's parser stops it either way.
    """
    if kind(command) is not Kind.ACTIVATION:
        return False
    activates = False
    for name, value in options(args):
        if name not in ACTIVATION_FLAGS:
            return False
        if name in ACTIVATE_OPTIONS:
            if value not in ACTIVATION_VALUES:
                return False
            activates = True
    return activates


def runs_readonly(args: Sequence[str]) -> bool:
    """Whether ``args`` carry both ``--sysinit`` and ``--readonly`` (LVM's read-only activation)."""
    given = {name for name, _ in options(args)}
    return {"--sysinit", "--readonly"} <= given
