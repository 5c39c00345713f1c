"""``fenceless volume create|extend|rename|remove|list|show``.

Parsing and output only. A change is built into a request by
``ops.requests.volume_request`` and sent to the local agent, which runs it
if this host is the writer or forwards it through the on-disk mailboxes;
``list`` and ``show`` read this host's view (``ops.queries``).
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
    table,
    vg_option,
)


def register(sub: Subparsers, name: str) -> None:
    """Add the ``volume`` command and its subcommands to the top-level ``sub``."""
    del name  # this module has the one command, "volume"
    vp = sub.add_parser("volume", help="volumes (LVs) of a shared VG, from any host",
                        formatter_class=FORMATTER,
                        description="Volume operations run on the metadata writer; from any "
                        "other host they are forwarded to it through the on-disk mailboxes.",
                        epilog=epilog("volume create", "volume extend", "volume list"))
    vsub = vp.add_subparsers(dest="volume_command", metavar="VOLUMECOMMAND",
                             parser_class=Parser)
    vsub.required = True
    sp = command(vsub, "create", "volume create", "create a volume")
    sp.add_argument("name")
    sp.add_argument("size", help="e.g. 512M, 10G")
    sp.add_argument("--shared-ro", action="store_true",
                    help="meant to be shared read-only by many hosts (images, repositories)")
    _change_options(sp)
    sp = command(vsub, "extend", "volume extend", "grow a volume to SIZE (or by +SIZE); every "
                 "host with it active is refreshed before this returns")
    sp.add_argument("name")
    sp.add_argument("size", help="new size (10G) or growth (+2G)")
    _change_options(sp)
    sp = command(vsub, "rename", "volume rename", "rename a volume (not while active anywhere)")
    sp.add_argument("name")
    sp.add_argument("new_name")
    _change_options(sp)
    sp = command(vsub, "remove", "volume remove", "remove a volume (not while active anywhere)")
    sp.add_argument("name")
    _change_options(sp)
    sp = command(vsub, "list", "volume list", "the volumes of the VG (read-only, this host)")
    vg_option(sp)
    sp = command(vsub, "show", "volume show", "one volume: size, segments, where it is active")
    sp.add_argument("name")
    vg_option(sp)


def _change_options(sp: argparse.ArgumentParser) -> None:
    """The options of every volume change: --vg, --request-id, --timeout."""
    vg_option(sp)
    sp.add_argument("--request-id", help="an id of your own, to retry a request safely "
                    "(the same id is never applied twice)")
    sp.add_argument("--timeout", type=float, default=120.0,
                    help="seconds to wait for the writer (default 120)")


def run(args: argparse.Namespace) -> int:
    """Run ``fenceless volume SUBCOMMAND``; exit 3 if an extend left a host not refreshed."""
    cfg = load_config(args)
    sub = args.volume_command
    if sub in ("list", "show"):
        from fenceless.ops import queries

        if sub == "list":
            emit(args, queries.volume_list(cfg, args.vg), _list_text)
        else:
            emit(args, queries.volume_show(cfg, args.vg, args.name), _show_text)
        return 0
    from fenceless.ops.requests import volume_request

    request = volume_request(sub, args.name, size=getattr(args, "size", None),
                             new_name=getattr(args, "new_name", None),
                             shared_ro=getattr(args, "shared_ro", False), rid=args.request_id)
    res = agent_call(cfg, {"op": "volume", "vg": args.vg, "request": request},
                     timeout=args.timeout)
    emit(args, res, lambda r: change_text(sub, r))
    return 3 if res.get("not_refreshed") else 0


def _list_text(vols: list[dict[str, Any]]) -> str:
    from fenceless.validate import human

    return table([(x["name"], human(x["size_bytes"]), "yes" if x["shared_ro"] else "")
                  for x in vols], ("VOLUME", "SIZE", "SHARED-RO"))


def _show_text(v: dict[str, Any]) -> str:
    from fenceless.validate import human

    return (f"{v['name']}: {human(v['size_bytes'])}"
            + (", shared read-only" if v["shared_ro"] else "")
            + (f", active on {', '.join(v.get('active_on', [])) or 'no host'}"))


def change_text(sub: str, r: dict[str, Any]) -> str:
    """One line for a change's result; for extend, where it was (not yet) refreshed."""
    from fenceless.validate import human

    if sub == "remove":
        return f"removed {r['name']} (VG seqno {r.get('seqno')}, epoch {r.get('epoch')})"
    line = (f"{sub}: {r['name']} is {human(r['size_bytes'])}"
            + (" (shared read-only)" if r.get("shared_ro") else "")
            + f" (VG seqno {r.get('seqno')}, writer epoch {r.get('epoch')})")
    if sub == "extend":
        if r.get("refreshed"):
            line += f"; refreshed on {', '.join(r['refreshed'])}"
        if r.get("not_refreshed"):
            line += f"; NOT yet refreshed on {', '.join(r['not_refreshed'])}"
    return line
