"""``fenceless writer status|handover|takeover``: the metadata writer role.

Parsing and output only. Takeover and handover run in the local agent; for a
handover the agent only starts the move, and ``ops.requests.finish_handover``
waits for it to complete.
"""

from __future__ import annotations

import argparse
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
    vg_option,
)


def register(sub: Subparsers, name: str) -> None:
    """Add the ``writer`` command and its subcommands to the top-level ``sub``."""
    del name  # this module has the one command, "writer"
    writer = sub.add_parser("writer", help="the metadata writer role", formatter_class=FORMATTER,
                            description="The metadata writer: the one host that changes LVM "
                            "metadata, chosen by a Disk Paxos lease whose version is the epoch.",
                            epilog=epilog("writer status", "writer handover", "writer takeover"))
    wsub = writer.add_subparsers(dest="writer_command", metavar="WRITERCOMMAND",
                                 parser_class=Parser)
    wsub.required = True
    sp = command(wsub, "status", "writer status", "which host is the writer, at which epoch")
    vg_option(sp)
    sp = command(wsub, "handover", "writer handover", "planned move of the writer role to HOST "
                 "(the old writer finishes and releases; HOST acquires at epoch+1)")
    vg_option(sp)
    sp.add_argument("to", metavar="HOST")
    sp.add_argument("--timeout", type=float, help="seconds to wait (default 20 x io_timeout)")
    sp = command(wsub, "takeover", "writer takeover", "become the writer here; only when the "
                 "writer's host lease is DEAD (two hosts racing never both win)")
    vg_option(sp)
    sp.add_argument("--wait", action="store_true", help="if the writer still looks alive, "
                    "wait (up to --timeout) for its lease to die instead of refusing")
    sp.add_argument("--timeout", type=float, help="seconds to wait for the old writer to be "
                    "declared dead (default 20 x io_timeout)")


def _writer_text(r: dict[str, Any]) -> str:
    return f"{r['host']} is the metadata writer at epoch {r['epoch']}"


def run(args: argparse.Namespace) -> int:
    """Run ``fenceless writer SUBCOMMAND``."""
    cfg = load_config(args)
    sub = args.writer_command
    if sub == "status":
        from fenceless.ops.status import read_status

        st = read_status(cfg, args.vg)
        data = {"writer": st["writer"], "vg": st["vg"], "ledger": st["ledger"]}
        emit(args, data, lambda d: "no writer" if d["writer"] is None else
             f"writer: {d['writer']['host']} (host id {d['writer']['id']}) at epoch "
             f"{d['writer']['epoch']} [{d['writer']['state']}]")
        return 0
    # Long enough for the old writer's lease to run out (a takeover --wait), and then some.
    timeout = args.timeout or 20 * cfg.io_timeout + 5
    if sub == "takeover":
        res = agent_call(cfg, {"op": "takeover", "vg": args.vg, "wait": args.wait,
                               "seen_epoch": _epoch_now(cfg, args.vg)}, timeout=timeout)
        emit(args, res, lambda r: _writer_text(r)
             + (" (it already was)" if r["outcome"] == "already" else ""))
        return 0
    from fenceless.ops.queries import status_reader
    from fenceless.ops.requests import finish_handover

    res = agent_call(cfg, {"op": "handover", "vg": args.vg, "to": args.to}, timeout=timeout)
    res = finish_handover(res, args.to, status_reader(cfg, args.vg), timeout=timeout,
                          interval=cfg.io_timeout / 2)
    emit(args, res, _writer_text)
    return 0


def _epoch_now(cfg: Any, vg: str | None) -> int | None:
    """The writer epoch as the admin asks for the role (a fresh read of the control area):
    a host that wins after this is a race lost, one that won before is the writer to wait
    out. None if it does not read (the agent then reads it first thing)."""
    from fenceless.errors import FencelessError
    from fenceless.ops.status import read_status

    try:
        writer = read_status(cfg, vg)["writer"]
    except FencelessError:
        return None
    return int(writer["epoch"]) if writer else 0
