"""``fenceless host drain|resume|remove``: a host's maintenance, as before a kernel update.

``drain`` puts the host in maintenance first (the writer then places nothing there),
then moves each VM that runs there, live where it can and cold where it cannot, to the
live host with the fewest VMs, one at a time, saying what it does. ``resume`` ends the
maintenance; ``remove`` takes a drained, stopped host out of the cluster's table.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
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
from fenceless.errors import ExecError, UserError

ARRIVAL_POLL = 0.5  # seconds between two looks at a live migration to the drained host


class NoHostToDrainTo(UserError):
    """Refused: VM {name} has nowhere to go: no other live host with a hypervisor is out \
of maintenance. It runs on {host} still"""


class DrainIncomplete(ExecError):
    """{host} is in maintenance, but {left} still run there: {why}"""


def register(sub: Subparsers, name: str) -> None:
    """Add the ``host`` command and its subcommands to the top-level ``sub``."""
    del name
    hp = sub.add_parser("host", help="a host's maintenance: drain, resume, remove",
                        formatter_class=FORMATTER, description="Take a host out of service "
                        "(its VMs move away, nothing new is placed there) and back.",
                        epilog=epilog("host drain", "host resume", "host remove"))
    hsub = hp.add_subparsers(dest="host_command", metavar="HOSTCOMMAND", parser_class=Parser)
    hsub.required = True
    sp = command(hsub, "drain", "host drain", "put HOST in maintenance and move every VM "
                 "away from it (live where possible, else cold)")
    sp.add_argument("host")
    vg_option(sp)
    sp.add_argument("--timeout", type=float, default=300.0,
                    help="seconds to wait for each VM's move (default 300)")
    sp.add_argument("--force", action="store_true", help="a cold move may destroy a guest "
                    "that does not shut down (as `vm migrate --force`)")
    for sub_name, text in (("resume", "end HOST's maintenance: VMs may be placed there again"),
                           ("remove", "take a drained host whose agent is stopped out of the "
                            "cluster (its name and host id are forgotten)")):
        sp = command(hsub, sub_name, f"host {sub_name}", text)
        sp.add_argument("host")
        vg_option(sp)


def run(args: argparse.Namespace) -> int:
    from fenceless.config import host_name
    from fenceless.ops.requests import host_request

    cfg = load_config(args)
    host = host_name(args.host)
    sub = args.host_command
    op = "host-forget" if sub == "remove" else "host-maintenance"
    res = agent_call(cfg, {"op": "host", "vg": args.vg, "request": host_request(
        op, host, on=sub == "drain" if sub != "remove" else None)}, timeout=60.0)
    if sub != "drain":
        emit(args, res, lambda r: f"{host}: maintenance ended, VMs may be placed there again"
             if sub == "resume" else f"{host} (host id {r.get('host_id')}) removed from the "
             "cluster")
        return 0
    for name in res.get("cancelled") or []:
        if not getattr(args, "json", False):
            print(f"{name}: its start or move to {host}, asked for before, is withdrawn",
                  flush=True)
    moved = drain(cfg, args, host)
    emit(args, {"host": host, "maintenance": True, "moved": moved,
                "cancelled": res.get("cancelled") or []},
         lambda r: f"{host} is in maintenance and runs no VM; `fenceless host resume {host}` "
         "ends it")
    return 0


def drain(cfg: Any, args: argparse.Namespace, host: str) -> list[dict[str, Any]]:
    """Move each VM off ``host``, one at a time; what moved where. A VM that would not
    move is left running where it is, and named in the error at the end."""
    from fenceless.ops import vmlife, vmquery
    from fenceless.ops.status import read_status

    def call(request: dict[str, Any]) -> dict[str, Any]:
        return agent_call(cfg, request, timeout=args.timeout)

    def say(text: str) -> None:
        if not getattr(args, "json", False):
            print(text, flush=True)

    moved: list[dict[str, Any]] = []
    failed: dict[str, str] = _arrivals(cfg, args, host, vmquery.vm_list, say)
    for vm in [v for v in vmquery.vm_list(cfg, args.vg)
               if v["host"] == host and v["name"] not in failed]:
        target = _target(cfg, args.vg, host, read_status, vmquery)
        if target is None:
            raise NoHostToDrainTo(name=vm["name"], host=host)
        for live in (True, False):
            say(f"{vm['name']}: {'live' if live else 'cold'} migration {host} -> {target} ...")
            try:
                vmlife.ask_move(cfg, args.vg, vm["name"], target, call, force=args.force,
                                move=True, timeout=args.timeout, live=live)
            except vmlife.MoveFailed as exc:  # it runs where it ran: a cold move may do
                say(f"{vm['name']}: {exc}")
                failed[vm["name"]] = str(exc)
                continue
            except (vmlife.MoveTimedOut, UserError) as exc:
                # Still under way, or refused (a move already under way): a cold move
                # now could stop a guest that is moving live. Reported, not retried.
                say(f"{vm['name']}: {exc}")
                failed[vm["name"]] = str(exc)
                break
            failed.pop(vm["name"], None)
            moved.append({"name": vm["name"], "to": target, "live": live})
            say(f"{vm['name']}: runs on {target}")
            break
    if failed:
        raise DrainIncomplete(host=host, left=", ".join(sorted(failed)),
                              why="; ".join(failed.values()))
    return moved


def _arrivals(cfg: Any, args: argparse.Namespace, host: str,
              vm_list: Callable[[Any, str | None], list[dict[str, Any]]],
              say: Callable[[str], None]) -> dict[str, str]:
    """Wait for live migrations to ``host`` that began before the drain: each VM then
    runs there and is moved on with the others. Those still arriving at the time limit:
    VM -> why, for the error at the end."""
    from fenceless.ops.status import read_status

    deadline = time.monotonic() + args.timeout
    told: set[str] = set()
    while True:
        # (arrived, but its source has not yet unmapped its disks: not yet movable on,
        # unless that source is DEAD, whose mappings are gone with it)
        vms = vm_list(cfg, args.vg)
        dead = {h["name"] for h in read_status(cfg, args.vg)["hosts"]
                if h["lease"] == "dead"} if any(v.get("left") for v in vms) else set()
        arriving = sorted(v["name"] for v in vms if v.get("moving_to") == host
                          or (v.get("host") == host and v.get("left")
                              and v["left"] not in dead))
        if not arriving:
            return {}
        if time.monotonic() > deadline:
            return {n: f"{n}'s live migration to {host} did not finish within "
                    f"{args.timeout:g}s" for n in arriving}
        for n in sorted(set(arriving) - told):
            say(f"{n}: waiting for its live migration to {host} to finish ...")
        told |= set(arriving)
        time.sleep(ARRIVAL_POLL)


def _target(cfg: Any, vg: str | None, host: str, read_status: Any, vmquery: Any) -> str | None:
    """The live host with a hypervisor, out of maintenance, that runs the fewest VMs."""
    status = read_status(cfg, vg)
    ledger = vmquery.read_ledger(cfg, vg)
    load: dict[str, int] = {}
    for v in ledger.vms.values():
        if v.host:
            load[v.host] = load.get(v.host, 0) + 1
    fit = [h["name"] for h in status["hosts"]
           if h["lease"] == "live" and h["name"] != host and h["facts"].get("vms") is True
           and not ledger.in_maintenance(h["name"])]
    return min(fit, key=lambda n: (load.get(n, 0), n)) if fit else None
