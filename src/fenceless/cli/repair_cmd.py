"""``fenceless repair ledger``: rebuild a ledger whose two slots both fail to read
(``ops/repair.py``). Parsing and output only; the writer's agent does the work.

Without ``--yes`` it shows what it would write and changes nothing.
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
    """Add the ``repair`` command and its subcommands to the top-level ``sub``."""
    del name
    rp = sub.add_parser("repair", help="rebuild damaged parts of the control area",
                        formatter_class=FORMATTER, description="Rebuild a part of the "
                        "control area that does not read, from what else is on the LUN.",
                        epilog=epilog("repair ledger", "repair superblock"))
    rsub = rp.add_subparsers(dest="repair_command", metavar="REPAIRCOMMAND",
                             parser_class=Parser)
    rsub.required = True
    for what, text, kept in (
            ("ledger", "repair a ledger slot the writer does not write over (foreign bytes, "
             "or both slots damaged): from the slot that reads, or rebuilt from the host "
             "sectors, claims, VM store, audit log and LVM metadata", "slots"),
            ("superblock", "write back a superblock that does not read, from the copy the "
             "writer's agent read when it attached", "sector")):
        sp = command(rsub, what, f"repair {what}", f"{text} (on the writer; a dry run that "
                     "shows the plan unless --yes)")
        sp.add_argument("--yes", action="store_true", help="really write the plan named by "
                        f"--plan (the damaged {kept} kept in the writer's state dir first)")
        sp.add_argument("--plan", metavar="ID", help="the plan you checked, as the dry run "
                        "showed it: refused if the plan is another one now")
        vg_option(sp)


def run(args: argparse.Namespace) -> int:
    from fenceless.ops.requests import current_user, new_request_id

    cfg = load_config(args)
    what = args.repair_command
    argv = ["fenceless", "repair", what] + (["--yes"] if args.yes else []) + (
        ["--plan", args.plan] if args.plan else [])
    res = agent_call(cfg, {"op": f"repair-{what}", "vg": args.vg, "apply": args.yes,
                           "plan": args.plan, "id": new_request_id(), "user": current_user(),
                           "argv": argv}, timeout=60.0)
    emit(args, res, text if what == "ledger" else superblock_text)
    return 0


def superblock_text(res: dict[str, Any]) -> str:
    lines = [f"The superblock does not read: {res['damage']}",
             f"{'Wrote' if res['applied'] else 'Would write'} back the copy this writer's "
             f"agent read when it attached: cluster {res['cluster']}, VG {res['vg_uuid']}, "
             f"io_timeout {res['io_timeout']}s, {res['max_hosts']} host ids, regions "
             f"{', '.join(res['regions'])}."]
    lines.append(f"Done. The damaged sector is kept in {res['kept']}. Run `fenceless check`."
                 if res["applied"] else f"Nothing was changed. This is plan {res['plan']}: "
                 f"`fenceless repair superblock --yes --plan {res['plan']}` writes it.")
    return "\n".join(lines)


def text(res: dict[str, Any]) -> str:
    """The plan (or what was done), for people."""
    lines = [f"VG {res['vg']}: ledger slots with damage the writer does not write over:"]
    lines += [f"  {d}" for d in res["damage"]]
    how = "copied from the slot that reads" if res["mode"] == "copy" else \
        "rebuilt from the rest of the LUN"
    lines.append(f"{'Wrote' if res['applied'] else 'Would write'} a ledger ({how}) at writer "
                 f"epoch {res['epoch']}, VG seqno {res['vg_seqno']}, with:")
    lines.append("  hosts: " + (", ".join(f"{n} (id {i})" for i, n in res["hosts"].items())
                                or "none"))
    for vm in res["vms"]:
        where = f"running on {vm['host']}" if vm["host"] else "stopped"
        lines.append(f"  VM {vm['name']} version {vm['version']}: {where}")
    if not res["vms"]:
        lines.append("  no VM")
    if res["left_out"]:
        lines.append("Left out:")
        lines += [f"  {x}" for x in res["left_out"]]
    lines.append("Not kept (a ledger holds them only):")
    lines += [f"  {x}" for x in res["lost"]]
    if res["applied"]:
        lines.append(f"Done: generation {res['generation']}. The damaged slots are kept in "
                     f"{res['kept']}. Run `fenceless check`.")
    else:
        lines.append(f"Nothing was changed. This is plan {res['plan']}. Check the VMs' "
                     "hosts above (virsh list on each host), then run `fenceless repair "
                     f"ledger --yes --plan {res['plan']}` to write it.")
    return "\n".join(lines)
