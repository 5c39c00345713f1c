"""``fenceless guard install|remove|status``: the CLI part (parsing and output only).

Wired into ``cli.main`` with ``guard_cmd.register(sub, cmd, vg_opt)`` and
``COMMANDS["guard"] = guard_cmd.run``. ``python -m fenceless.cli.guard_cmd``
runs the same parser on its own.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

EXAMPLES = {
    "install": "fenceless guard install",
    "remove": "fenceless guard remove",
    "status": "fenceless guard status --json",
}


def register(sub: Any, cmd: Any, vg_opt: Any) -> None:
    """Add the ``guard`` parser and its subcommands to ``sub`` (as cli.main builds the others)."""
    del vg_opt  # the guard covers every shared VG of the host's config
    from fenceless.cli.main import Parser

    guard = sub.add_parser(
        "guard", help="the LVM guard: LVM itself refuses metadata changes on non-writers",
        description="Replace this host's lvm binary by a wrapper (dpkg-divert): on a host "
        "that is not the metadata writer, reports run --readonly, activation runs "
        "--sysinit --readonly, and every other LVM command on a shared VG is refused.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n" + "\n".join(f"  {e}" for e in EXAMPLES.values()))
    gsub = guard.add_subparsers(dest="guard_command", metavar="GUARDCOMMAND",
                                parser_class=Parser)
    gsub.required = True
    for name, text in (("install", "divert the lvm binary, install the wrapper and the "
                        "lvm.conf block (again: brings them up to date)"),
                       ("remove", "restore the distribution's binary, the diversion list and "
                        "lvm.conf exactly"),
                       ("status", "what is in place, the role file, autoactivation flags")):
        sp = cmd(gsub, name, "guard", text)
        sp.epilog = f"example:\n  {EXAMPLES[name]}"


def run(args: argparse.Namespace) -> int:
    from fenceless import config
    from fenceless.cli.main import emit
    from fenceless.guard import install as guard
    from fenceless.runner import SubprocessRunner

    cfg = config.load(config.resolve_path(getattr(args, "config", None)))
    runner = SubprocessRunner()
    sub = args.guard_command
    if sub == "install":
        res = guard.install(cfg, runner)
        emit(args, res, lambda r: (
            f"guard {'updated' if r['already'] else 'installed'} on {r['host']}: {r['binary']} "
            f"is the wrapper (shared VGs: {', '.join(r['shared_vgs'])}); the real binary is "
            f"{r['diverted_to']}; role file {r['role_file']}"))
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


def _status_text(s: dict[str, Any]) -> str:
    w = s["wrapper"]
    lines = [
        f"guard on {s['host']}: {'installed' if s['installed'] else 'NOT installed'}",
        f"  {s['binary']}: " + (f"diverted to {s['diverted_to']}" if s["diverted"] else
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


def main(argv: Sequence[str] | None = None) -> int:
    """``fenceless guard ...`` on its own, with cli.main's error handling."""
    from fenceless.cli import main as climain
    from fenceless.errors import FencelessError

    args_list = list(sys.argv[1:] if argv is None else argv)
    p = climain.Parser(prog="fenceless")
    climain._common(p)
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=climain.Parser)

    def cmd(parent: Any, name: str, key: str, helptext: str, *, json_opt: bool = True
            ) -> argparse.ArgumentParser:
        sp: argparse.ArgumentParser = parent.add_parser(name, help=helptext,
                                                        description=helptext)
        climain._common(sp, json_opt=json_opt)
        return sp

    register(sub, cmd, None)
    try:
        args = p.parse_args(args_list)
        return run(args)
    except FencelessError as exc:
        print(f"fenceless: {climain._explain(exc)}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
