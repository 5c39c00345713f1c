"""``fenceless guard install|remove|status``: the CLI part (parsing and output only).

The guard itself is ``fenceless.guard.install``, imported when a guard command runs.
"""

from __future__ import annotations

import argparse
import contextlib
from typing import Any

from fenceless.cli.common import FORMATTER, Parser, Subparsers, command, emit, load_config

EXAMPLES = {
    "install": "fenceless guard install",
    "remove": "fenceless guard remove",
    "status": "fenceless guard status --json",
}


def register(sub: Subparsers, name: str) -> None:
    """Add the ``guard`` command and its subcommands to the top-level ``sub``.

    No --vg: the guard covers every shared VG of the host's config.
    """
    del name  # this module has the one command, "guard"
    guard = sub.add_parser(
        "guard", help="the LVM guard: LVM itself refuses metadata changes on non-writers",
        description="Replace this host's lvm binary by a wrapper (dpkg-divert): on a host "
        "that is not the metadata writer, reports run --readonly, deactivation runs "
        "--sysinit --readonly, and every other LVM command on a shared VG is refused. On "
        "every host, the writer too, it refuses the lvm shell, pvmove, lvconvert and lvpoll, "
        "changes to the control LV, and activation of a shared VG's LVs (fenceless's job).",
        formatter_class=FORMATTER,
        epilog="examples:\n" + "\n".join(f"  {e}" for e in EXAMPLES.values()))
    gsub = guard.add_subparsers(dest="guard_command", metavar="GUARDCOMMAND",
                                parser_class=Parser)
    gsub.required = True
    for cmd_name, text in (("install", "divert the lvm binary, install the wrapper and the "
                            "lvm.conf block (again: brings them up to date)"),
                           ("remove", "restore the distribution's binary, the diversion list "
                            "and lvm.conf exactly"),
                           ("status", "what is in place, the role file, autoactivation flags")):
        sp = command(gsub, cmd_name, "guard", text)
        sp.epilog = f"example:\n  {EXAMPLES[cmd_name]}"


def run(args: argparse.Namespace) -> int:
    """Run ``fenceless guard SUBCOMMAND``."""
    from fenceless.guard import install as guard
    from fenceless.runner import SubprocessRunner

    cfg = load_config(args)
    runner = SubprocessRunner()
    sub = args.guard_command
    if sub in ("install", "remove"):
        _tell_agent(cfg)
    if sub == "install":
        res = guard.install(cfg, runner)
        emit(args, res, lambda r: (
            f"guard {'updated' if r['already'] else 'installed'} on {r['host']}: {r['binary']} "
            f"is the wrapper (shared VGs: {', '.join(r['shared_vgs'])}); the real binary is "
            f"{r['diverted_to']}"
            + (f" (moved from {r['moved_from']})" if r["moved_from"] else "")
            + f"; role file {r['role_file']}"))
        return 0
    if sub == "remove":
        res = guard.remove(cfg, runner)
        emit(args, res, lambda r: "\n".join(
            [f"guard removed on {r['host']}: {r['binary']} is the distribution's binary again"]
            + [f"note: {n}" for n in r["notes"]]))
        return 0
    st = guard.status(cfg, runner)
    emit(args, st, _status_text)
    return 0


def _tell_agent(cfg: Any) -> None:
    """Ask the local agent (if one runs) to look at the guard again once this is done:
    it publishes the guard's state for `fenceless check` on every host."""
    import atexit

    from fenceless.agent import ipc
    from fenceless.errors import FencelessError

    def poke() -> None:
        with contextlib.suppress(FencelessError, OSError):
            ipc.call(cfg.state_dir, {"op": "guard-changed"}, timeout=2.0)

    atexit.register(poke)


def _status_text(s: dict[str, Any]) -> str:
    w = s["wrapper"]
    lines = [
        f"guard on {s['host']}: {'installed' if s['installed'] else 'NOT installed'}",
        f"  {s['binary']}: " + (f"diverted to {s['diverted_to']}" if s["diverted_to"] else
                                "not diverted")
        + (", wrapper " + ("matches" if w["matches"] else "DIFFERS") if w["present"] else ""),
        f"  lvm.conf {s['lvm_conf']['path']}: guard block "
        + ("present" if s["lvm_conf"]["block"] else "absent"),
        f"  role file {s['role_file']['path']}:",
    ]
    for r in s["role_file"]["vgs"]:
        if r["state"] == "missing":
            lines.append(f"    {r['vg']}: no line (this host counts as a reader)")
        else:
            lines.append(f"    {r['vg']}: {r['role']} (writer {r['writer'] or '-'}, epoch "
                         f"{r['epoch']}), {r['state']}, {r['seconds_left']}s left")
    for a in s["autoactivation"]:
        flag = a.get("raw") if a.get("autoactivation") is not None else f"? ({a.get('error')})"
        lines.append(f"  VG {a['vg']} autoactivation: {flag or 'off'}")
    lines += [f"warning: {x}" for x in s["warnings"]]
    return "\n".join(lines)
