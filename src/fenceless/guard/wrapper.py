"""The text of the LVM wrapper that the guard installs at the real binary's path.

It sits in front of every ``lvs`` on the host, so it is POSIX sh (dash) with
its settings embedded, no Python, and no fork before the final ``exec``: it
reads the role file and /proc/uptime with the ``read`` builtin.

How it decides (on a host that is not the writer of the VG(s) concerned):

=================================================  ===============================
command                                            what runs
=================================================  ===============================
neutral (version, help, lvmconfig, ...)            passes unchanged, always
reporting (lvs, vgs, pvs, *display, vgcfgbackup,    ``--readonly`` added
fullreport, lvscan, lvmdiskscan)
``lvchange``/``vgchange`` with ``-a y|n`` and       ``--sysinit --readonly`` added
nothing else that changes metadata
``pvscan --cache`` (udev's event activation)        passes unchanged
names only non-shared VGs                           passes (``metadata_read_only=0``)
anything else, and the ``lvm`` shell                refused, exit 5, nothing runs
=================================================  ===============================

On the writer of every VG concerned, everything passes, with
``--config global/metadata_read_only=0`` (merged into the caller's own
``--config``: LVM refuses the option twice) to undo the guard's lvm.conf
block on LVM 2.02.

Which VGs a command concerns is over-approximated, so that a parsing gap can
only refuse, never let a change through: any value or positional that names a
shared VG (``VG``, ``VG/LV``, ``/dev/VG/LV``, ``$LVM_VG_NAME``) concerns it;
and a command concerns *every* shared VG when it names no VG at all, or uses
a tag, ``--select``, a device or file path, or a UUID. Options whose value
LVM takes from the next argument are all options except a known list of
flags, so an unknown option swallows (rather than frees) the next word.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass

REPORT_COMMANDS = ("lvs", "vgs", "pvs", "lvdisplay", "vgdisplay", "pvdisplay", "vgcfgbackup",
                   "fullreport", "lvscan", "lvmdiskscan")
NEUTRAL_COMMANDS = ("version", "help", "lvmconfig", "config", "dumpconfig", "formats",
                    "segtypes", "types", "tags", "devtypes")
ACTIVATION_COMMANDS = ("lvchange", "vgchange")
# fenceless commands that do what an admin tried with LVM on a non-writer.
FORWARDED = {
    "lvcreate": "volume create NAME SIZE",
    "lvextend": "volume extend NAME +SIZE",
    "lvresize": "volume extend NAME +SIZE",
    "lvrename": "volume rename OLD NEW",
    "lvremove": "volume remove NAME",
}
# LVM 2.03.16 options that take no value, from every command's --longhelp.
# Short letters that are a flag for one command and take a value for another
# (-a, -c, -f, -l, ...) are not here: they are treated as taking a value.
FLAG_LONG = (
    "--abort", "--activevolumegroups", "--aligned", "--all", "--atomic", "--background",
    "--binary", "--blockdevice", "--cache", "--checkcomplete", "--colon", "--columns",
    "--debug", "--exported", "--force", "--foreign", "--full", "--handlemissingpvs", "--help",
    "--history", "--ignoreactivationskip", "--ignoreadvanced", "--ignorelocal",
    "--ignorelockingfailure", "--ignoremonitoring", "--ignoreunsupported", "--import",
    "--importdevices", "--list", "--logonly", "--longhelp", "--lvmpartition", "--maps",
    "--mergedconfig", "--mirrorsonly", "--mknodes", "--nameprefixes", "--nofsck",
    "--noheadings", "--nohints", "--nohistory", "--nolocking", "--norestorefile", "--nosuffix",
    "--nosync", "--notifydbus", "--noudevsync", "--novolumegroup", "--partial", "--quiet",
    "--readonly", "--refresh", "--resizefs", "--restoremissing", "--rows", "--segments",
    "--shared", "--short", "--showdeprecated", "--showunsupported", "--snapshot", "--stdin",
    "--sysinit", "--test", "--thin", "--udevoutput", "--unbuffered", "--unconfigured",
    "--unquoted", "--usepolicies", "--validate", "--vdo", "--verbose", "--version",
    "--vgonline", "--withcomments", "--withgeneralpreamble", "--withlocalpreamble",
    "--withspaces", "--withsummary", "--withversions", "--yes",
)
FLAG_SHORT = "HKPTbdehqtvy"
# Options that may accompany ``-a y|n`` in an activation a reader may run.
ACTIVATION_FLAGS = ("--sysinit", "--readonly", "-a", "--activate", "-v", "--verbose", "-q",
                    "--quiet", "-d", "--debug", "-t", "--test", "-K", "--ignoreactivationskip",
                    "--noudevsync", "--ignorelockingfailure", "--config", "-S", "--select",
                    "-h", "--help")
ACTIVATION_VALUES = ("y", "n", "ay", "an", "ey", "en", "ly", "ln", "sy", "sn")
RO_OFF = "global/metadata_read_only=0"


@dataclass(frozen=True)
class WrapperSettings:
    host: str  # this host's name, for the refusal message
    shared_vgs: tuple[str, ...]  # the config's [vg.NAME] tables
    real_binary: str  # the diverted binary, e.g. /sbin/lvm.distrib
    lvm_link: str  # a symlink named "lvm" to real_binary (LVM reads argv[0])
    role_file: str
    version: str  # fenceless's version, so `guard status` sees an outdated wrapper


def _alts(words: tuple[str, ...] | list[str]) -> str:
    """A sh ``case`` pattern list matching exactly these words."""
    return "|".join(shlex.quote(w) if any(c in w for c in "?*[") else w for w in words)


def generate(s: WrapperSettings) -> str:
    """The wrapper script for these settings (pure: ``guard status`` regenerates and compares)."""
    q = shlex.quote
    shared = " " + " ".join(s.shared_vgs) + " "
    uuid32 = "[A-Za-z0-9]" * 32
    forwarded = "\n".join(f"    {cmd}) fl_hint={q(hint)} ;;" for cmd, hint in FORWARDED.items())
    return f"""#!/bin/sh
# fenceless LVM guard for host {s.host}, written by `fenceless guard install` (fenceless
# {s.version}). Do not edit: `fenceless guard status` compares it with what fenceless writes,
# and `fenceless guard remove` puts the distribution's binary back.
# This host may change the metadata of a shared VG only while the local agent's role file
# says it is that VG's writer; otherwise reports run --readonly, activation runs
# --sysinit --readonly, and every other LVM command is refused (exit 5).
FL_HOST={q(s.host)}
FL_SHARED={q(shared)}
FL_REAL={q(s.real_binary)}
FL_LVM={q(s.lvm_link)}
FL_ROLE={q(s.role_file)}
FL_RO_OFF={q(RO_OFF)}

fl_die() {{
    printf '%s\\n' "$1" >&2
    exit 5
}}
[ -x "$FL_LVM" ] || fl_die "fenceless guard: the real LVM binary is not reachable as $FL_LVM \\
(a link to $FL_REAL): run \\`fenceless guard install\\` again"

fl_cmd=${{0##*/}}
if [ "$fl_cmd" = lvm ]; then
    fl_cmd=
    if [ "$#" -gt 0 ]; then fl_cmd=$1; shift; fi
fi

case $fl_cmd in
    {_alts(NEUTRAL_COMMANDS)}|--version|-h|--help|'-?')
        exec "$FL_LVM" "$fl_cmd" "$@" ;;
    {_alts(REPORT_COMMANDS)}) fl_class=report ;;
    {_alts(ACTIVATION_COMMANDS)}) fl_class=activation ;;
    pvscan) fl_class=pvscan ;;
    '') fl_class=shell ;;
    *) fl_class=other ;;
esac

fl_all=; fl_named=; fl_refs=' '; fl_act=1; fl_acta=; fl_ro=; fl_si=; fl_cache=; fl_cfg=

fl_ref() {{  # a value or positional: note the shared VG it names
    fl_v=${{1#/dev/}}; fl_v=${{fl_v%%/*}}
    case $FL_SHARED in
        *" $fl_v "*) case $fl_refs in *" $fl_v "*) ;; *) fl_refs="$fl_refs$fl_v " ;; esac ;;
    esac
}}

fl_pos() {{  # a positional argument
    fl_named=1
    fl_ref "$1"
    case $1 in
        @*|/dev/mapper/*) fl_all=1 ;;
        /dev/*/*) case ${{1#/dev/}} in */*/*) fl_all=1 ;; esac ;;
        /*) fl_all=1 ;;
        *[!A-Za-z0-9+_./-]*|'') fl_all=1 ;;
        ??????-????-????-????-????-????-??????|{uuid32}) fl_all=1 ;;
    esac
}}

fl_opt() {{  # an option name
    case $1 in
        --readonly) fl_ro=1 ;;
        --sysinit) fl_si=1 ;;
        --cache) fl_cache=1 ;;
        --config) fl_cfg=1 ;;
        -a|--activate) fl_acta=1 ;;
        -S|--select) fl_all=1 ;;
    esac
    case $1 in
        {_alts(ACTIVATION_FLAGS)}) ;;
        *) fl_act= ;;
    esac
}}

fl_val() {{  # an option's value
    fl_ref "$2"
    case $1 in
        -a|--activate) case $2 in {_alts(ACTIVATION_VALUES)}) ;; *) fl_act= ;; esac ;;
    esac
}}

fl_want=; fl_end=
for fl_a do
    if [ -n "$fl_want" ]; then fl_val "$fl_want" "$fl_a"; fl_want=; continue; fi
    if [ -n "$fl_end" ]; then fl_pos "$fl_a"; continue; fi
    case $fl_a in
        --) fl_end=1 ;;
        --*=*) fl_opt "${{fl_a%%=*}}"; fl_val "${{fl_a%%=*}}" "${{fl_a#*=}}" ;;
        --*)
            fl_opt "$fl_a"
            case $fl_a in {_alts(FLAG_LONG)}) ;; *) fl_want=$fl_a ;; esac ;;
        -?*)
            fl_s=${{fl_a#-}}
            while [ -n "$fl_s" ]; do
                fl_c=${{fl_s%"${{fl_s#?}}"}}; fl_s=${{fl_s#?}}
                fl_opt "-$fl_c"
                case $fl_c in
                    [{FLAG_SHORT}]) ;;
                    *) if [ -n "$fl_s" ]; then fl_val "-$fl_c" "$fl_s"; else fl_want=-$fl_c; fi
                       fl_s= ;;
                esac
            done ;;
        *) fl_pos "$fl_a" ;;
    esac
done
[ -z "${{LVM_VG_NAME:-}}" ] || fl_ref "$LVM_VG_NAME"
[ -n "$fl_named" ] || fl_all=1
[ "$fl_class" = activation ] && [ -z "$fl_acta" ] && fl_act=

fl_rw() {{  # run as asked, with the guard's lvm.conf block undone (LVM 2.02)
    if [ -z "$fl_cfg" ]; then exec "$FL_LVM" "$fl_cmd" --config "$FL_RO_OFF" "$@"; fi
    fl_n=$#; fl_next=
    for fl_a do
        if [ -n "$fl_next" ]; then set -- "$@" "$FL_RO_OFF $fl_a"; fl_next=
        else
            case $fl_a in
                --config) set -- "$@" "$fl_a"; fl_next=1 ;;
                --config=*) set -- "$@" "--config=$FL_RO_OFF ${{fl_a#--config=}}" ;;
                *) set -- "$@" "$fl_a" ;;
            esac
        fi
    done
    shift "$fl_n"
    exec "$FL_LVM" "$fl_cmd" "$@"
}}

# udev runs `lvm pvscan --cache DEV` for every block device: it records which PVs are
# online (/run/lvm), and must keep working for the host's local VGs.
if [ "$fl_class" = pvscan ] && [ -n "$fl_cache" ]; then exec "$FL_LVM" "$fl_cmd" "$@"; fi

if [ -n "$fl_all" ]; then fl_concern=$FL_SHARED; else fl_concern=$fl_refs; fi

fl_now=
if read -r fl_up fl_idle 2>/dev/null </proc/uptime; then
    case $fl_up in
        [0-9]*.[0-9][0-9]) fl_f=${{fl_up#*.}}; fl_now=$(( ${{fl_up%.*}} * 100 + ${{fl_f#0}} )) ;;
    esac
fi

fl_check() {{  # this host's role for VG $1: writer, reader, stale or missing
    fl_state=missing; fl_w=-; fl_e=0
    [ -r "$FL_ROLE" ] || return 0
    while read -r fl_v fl_r fl_ww fl_ee fl_u fl_x; do
        [ "$fl_v" = "$1" ] || continue
        case $fl_r in writer|reader) ;; *) break ;; esac
        [ -z "$fl_x" ] || break
        case $fl_ee in ''|*[!0-9]*) break ;; esac
        case $fl_u in ''|*[!0-9]*) break ;; esac
        fl_w=$fl_ww; fl_e=$fl_ee; fl_state=stale
        if [ -n "$fl_now" ] && [ "$fl_now" -lt "$fl_u" ] 2>/dev/null; then fl_state=$fl_r; fi
        break
    done <"$FL_ROLE"
}}

fl_bad=
for fl_vg in $fl_concern; do
    fl_check "$fl_vg"
    if [ "$fl_state" != writer ]; then fl_bad=$fl_vg; break; fi
done

if [ -z "$fl_bad" ]; then
    if [ "$fl_class" = shell ]; then exec "$FL_LVM"; fi
    fl_rw "$@"
fi

case $fl_class in
    report)
        if [ -z "$fl_ro" ]; then set -- --readonly "$@"; fi
        exec "$FL_LVM" "$fl_cmd" "$@" ;;
    activation)
        if [ -n "$fl_act" ]; then
            if [ -z "$fl_ro" ]; then set -- --readonly "$@"; fi
            if [ -z "$fl_si" ]; then set -- --sysinit "$@"; fi
            exec "$FL_LVM" "$fl_cmd" "$@"
        fi ;;
esac

fl_to="the writer"
if [ "$fl_w" != - ] && [ "$fl_w" != "$FL_HOST" ]; then fl_to=$fl_w; fi
case $fl_state in
    reader)
        if [ "$fl_w" = - ]; then fl_why="(no host is the writer now, epoch $fl_e)"
        else fl_why="($fl_w is, epoch $fl_e)"; fi ;;
    stale)
        fl_why="(the local agent's role file is stale: is \\`fenceless agent\\` running?)" ;;
    *)
        fl_why="(the local agent's role file $FL_ROLE has no valid line for it: is \\
\\`fenceless agent\\` running?)" ;;
esac
fl_hint=
case $fl_cmd in
{forwarded}
esac
if [ -n "$fl_hint" ]; then
    fl_hint="Use \\`fenceless $fl_hint\\`, which forwards the request to $fl_to."
else
    fl_hint="Only the metadata writer changes a shared VG: run it on $fl_to, or move the \\
role here first with \\`fenceless writer handover $FL_HOST\\`."
fi
fl_shown=${{fl_cmd:-lvm (the interactive shell)}}
fl_die "Refused: this host ($FL_HOST) is not the metadata writer of VG $fl_bad $fl_why. \\
$fl_hint
  (fenceless guard: \\`$fl_shown\\` was not run; nothing was changed.)"
"""
