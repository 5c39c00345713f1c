"""``fenceless log`` and ``fenceless metadata history|show|diff|restore``: the records on the LUN.

Parsing and output only: the audit log and the VG metadata history are read
from the control area by ``ops.metadata``; a restore runs in the local agent.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from fenceless.cli.common import (
    FORMATTER,
    Parser,
    Subparsers,
    agent_call,
    command,
    emit,
    epilog,
    load_config,
    table,
    vg_option,
)


def register(sub: Subparsers, name: str) -> None:
    """Add the parser of top-level command ``name`` ("log" or "metadata") to ``sub``."""
    if name == "log":
        sp = command(sub, "log", "log",
                     "the audit log on the LUN: every change, who asked, result")
        vg_option(sp)
        sp.add_argument("--limit", type=int, help="only the last N records")
    elif name == "metadata":
        _register_metadata(sub)
    else:
        raise ValueError(f"metadata_cmd has no command {name!r}")


def _register_metadata(sub: Subparsers) -> None:
    """metadata history|show|diff|restore; show and diff print text only (no --json)."""
    mp = sub.add_parser("metadata", help="the VG metadata history on the LUN",
                        formatter_class=FORMATTER,
                        description="After every change the writer keeps the VG metadata text "
                        "in a ring on the control area (the last 128 versions).",
                        epilog=epilog("metadata history", "metadata diff",
                                      "metadata restore"))
    msub = mp.add_subparsers(dest="metadata_command", metavar="METADATACOMMAND",
                             parser_class=Parser)
    msub.required = True
    sp = command(msub, "history", "metadata history", "the stored versions, newest first")
    vg_option(sp)
    sp = command(msub, "show", "metadata show", "one stored version's text", json_opt=False)
    sp.add_argument("seqno", type=int)
    vg_option(sp)
    sp = command(msub, "diff", "metadata diff", "what changed between two stored versions",
                 json_opt=False)
    sp.add_argument("a", type=int)
    sp.add_argument("b", type=int)
    vg_option(sp)
    sp = command(msub, "restore", "metadata restore", "restore a stored version (writer only; "
                 "a dry run that shows the diff unless --yes)")
    sp.add_argument("seqno", type=int)
    sp.add_argument("--yes", action="store_true", help="really restore")
    sp.add_argument("--request-id", metavar="ID",
                    help="an id of your own: after an interrupted restore, running it again "
                    "with the same id tells its outcome (it is never applied twice)")
    vg_option(sp)


def run(args: argparse.Namespace) -> int:
    """Run ``fenceless log`` or ``fenceless metadata SUBCOMMAND``."""
    if args.command == "log":
        return _log(args)
    return _metadata(args)


def _log(args: argparse.Namespace) -> int:
    """The audit log; an unreadable record is a row of its own, not a failed command."""
    from fenceless.ops.metadata import read_log

    entries = read_log(load_config(args), args.vg, args.limit)
    emit(args, entries, lambda es: table(
        [(e["seq"], e["time"], e["epoch"], e["host"], e["user"], " ".join(e["command"]),
          e["result"] + (f": {e['message']}" if e["message"] else ""))
         if "error" not in e else (e["seq"], "-", "-", "-", "-", "-", "ERROR " + e["error"])
         for e in es], ("SEQ", "TIME", "EPOCH", "HOST", "USER", "COMMAND", "RESULT")))
    return 0


def _history_text(es: list[dict[str, Any]]) -> str:
    return table(
        [(e["seqno"], e["time"], e["epoch"], e["request_id"], e["text_bytes"],
          "stale" if e["stale"] else "") if "error" not in e else
         ("?", "-", "-", "ERROR " + e["error"], "-", "") for e in es],
        ("SEQNO", "TIME", "EPOCH", "REQUEST", "BYTES", ""))


def _restore_text(r: dict[str, Any]) -> str:
    tail = (f"\nrestored seqno {r['seqno']} as seqno {r['new_seqno']}" if r["applied"] else
            f"\ndry run: would change {', '.join(r['changes']) or 'no LV'}; "
            "run again with --yes to restore")
    return f"{r['diff']}{tail}"


def _metadata(args: argparse.Namespace) -> int:
    """Reading the history needs no agent; a restore changes the VG, so the agent runs it."""
    from fenceless.ledger.history import diff
    from fenceless.ops import metadata as md

    cfg = load_config(args)
    sub = args.metadata_command
    if sub == "history":
        emit(args, md.list_history(cfg, args.vg), _history_text)
    elif sub == "show":
        sys.stdout.write(md.read_version(cfg, args.vg, args.seqno))
    elif sub == "diff":
        a, b = md.read_version(cfg, args.vg, args.a), md.read_version(cfg, args.vg, args.b)
        sys.stdout.write(diff(a, b, label_a=f"seqno {args.a}", label_b=f"seqno {args.b}"))
    else:
        from fenceless.ops.requests import current_user, new_request_id
        from fenceless.validate import request_id

        rid = request_id(args.request_id) if args.request_id else new_request_id()
        argv = ["fenceless", "metadata", "restore", str(args.seqno)] + (
            ["--yes"] if args.yes else [])
        res = agent_call(cfg, {"op": "restore", "vg": args.vg, "seqno": args.seqno,
                               "apply": args.yes, "id": rid, "user": current_user(),
                               "argv": argv}, timeout=120.0)
        emit(args, res, _restore_text)
    return 0
