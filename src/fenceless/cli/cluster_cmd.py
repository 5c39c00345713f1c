"""The cluster's top-level commands: init, join, agent, status, scan, config.

Parsing and output only. ``status`` is the command that must start fastest:
``cli.main`` builds only the parser of the command named in argv, and this
module imports nothing beyond ``cli.common`` until a command runs.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from fenceless.cli.common import (
    Subparsers,
    agent_call,
    command,
    emit,
    load_config,
    table,
    vg_option,
)

if TYPE_CHECKING:
    from fenceless.ops.context import Context

NAMES = ("init", "join", "agent", "watchdog", "status", "scan", "config")


def register(sub: Subparsers, name: str) -> None:
    """Add the parser of top-level command ``name`` (one of NAMES) to ``sub``."""
    if name == "init":
        sp = command(sub, "init", "init", "make this host's shared VG a fenceless cluster; this "
                     "host becomes the metadata writer at epoch 1 (runs in the local agent)")
        vg_option(sp)
        sp.add_argument("--max-hosts", type=int, default=16, help="host ids to provide (1-250)")
        sp.add_argument("--adopt", action="store_true",
                        help="the VG exists already: add the control LV, touch no existing LV")
    elif name == "join":
        sp = command(sub, "join", "join",
                     "take a host id in the cluster (runs in the local agent)")
        vg_option(sp)
    elif name == "agent":
        sp = command(sub, "agent", "agent", "the per-host daemon (foreground): renews leases, "
                     "serves the writer role", json_opt=False)
        sp.add_argument("--auto-takeover", action="store_true", help="take over a dead writer "
                        "when this is the lowest-numbered live host")
    elif name == "watchdog":
        command(sub, "watchdog", "watchdog", "the per-host watchdog (foreground): fences this "
                "host's work (kills the agent and its work cgroup) when the agent stops "
                "re-arming it; pets /dev/watchdog while all is well", json_opt=False)
    elif name == "status":
        sp = command(sub, "status", "status", "hosts, leases, writer and ledger, read from the "
                     "control area (no LVM command runs)")
        vg_option(sp)
        sp.add_argument("--watch", action="store_true",
                        help="a colored table of hosts and VMs, redrawn every --interval "
                        "seconds until ^C (still no LVM command)")
        sp.add_argument("--interval", type=float, default=2.0, help="seconds (with --watch)")
        sp.add_argument("--count", type=int, help=argparse.SUPPRESS)  # tests: stop after N
    elif name == "scan":
        sp = command(sub, "scan", "scan", "what this host's LVM sees of a shared VG (read-only)")
        vg_option(sp)
    elif name == "config":
        command(sub, "config", "config", "check this host's config and show it")
    else:
        raise ValueError(f"cluster_cmd has no command {name!r}")


def run(args: argparse.Namespace) -> int:
    """Run the top-level command ``args.command`` (one of NAMES)."""
    runners: dict[str, Callable[[argparse.Namespace], int]] = {
        "init": _init, "join": _join, "agent": _agent, "watchdog": _watchdog,
        "status": _status, "scan": _scan, "config": _config}
    return runners[args.command](args)


def _context(args: argparse.Namespace) -> Context:
    """Config plus runner and LVM access, for the commands that run LVM here (scan)."""
    from fenceless.ops.context import Context

    return Context(load_config(args))


def _init(args: argparse.Namespace) -> int:
    """init runs in the agent, which goes on renewing the host lease and writer role it took."""
    cfg = load_config(args)
    res = agent_call(cfg, {"op": "init", "vg": args.vg, "max_hosts": args.max_hosts,
                           "adopt": args.adopt}, timeout=120.0)
    emit(args, res, lambda r: f"initialized cluster {r['cluster']} on VG {r['vg']}: this host "
         f"({cfg.host}) is host id {r['host_id']} and the metadata writer at epoch "
         f"{r['epoch']} (control LV {r['control_lv']})")
    return 0


def _join(args: argparse.Namespace) -> int:
    """join runs in the agent: a host id is held only as long as its lease is renewed."""
    cfg = load_config(args)
    res = agent_call(cfg, {"op": "join", "vg": args.vg}, timeout=120.0)
    emit(args, res, lambda r: f"joined cluster {r['cluster']} on VG {r['vg']} as host id "
         f"{r['host_id']} (generation {r['generation']})")
    return 0


def _agent(args: argparse.Namespace) -> int:
    """The daemon itself, in the foreground; its exit code is the command's."""
    from fenceless.agent.daemon import Agent, CliOutput
    from fenceless.cli.render import explain, status_text
    from fenceless.cli.volume_cmd import change_text

    return Agent(load_config(args), auto_takeover=args.auto_takeover,
                 render=CliOutput(status_text, change_text, explain)).run()


def _watchdog(args: argparse.Namespace) -> int:
    """The watchdog daemon, in the foreground (systemd: fenceless-watchdog.service)."""
    from fenceless.agent.watchdog_main import run_watchdog

    return run_watchdog(load_config(args))


def _status_text(s: dict[str, Any]) -> str:
    from fenceless.cli.render import status_text

    return status_text(s)


def _status(args: argparse.Namespace) -> int:
    """Read from the control area directly: works without the agent and runs no LVM."""
    from fenceless.ops.status import read_status

    cfg = load_config(args)
    if args.watch:
        from fenceless.cli.watch import watch
        from fenceless.ops.vmquery import vm_list

        if not 0.2 <= args.interval <= 3600:
            from fenceless.cli.watch import BadInterval

            raise BadInterval(got=args.interval)
        watch(lambda: (read_status(cfg, args.vg, with_claims=True), vm_list(cfg, args.vg)),
              args.interval, count=args.count)
        return 0
    emit(args, read_status(cfg, args.vg), _status_text)
    return 0


def _scan(args: argparse.Namespace) -> int:
    """This host's --readonly LVM view of the VG (no cluster needed)."""
    from fenceless.ops.scan import scan

    emit(args, scan(_context(args), args.vg), _scan_text)
    return 0


def _scan_text(d: dict[str, Any]) -> str:
    from fenceless.validate import human

    vg = d["vg"]
    head = (f"host {d['host']} sees VG {vg['name']} (seqno {vg['seqno']}, "
            f"{human(vg['size'])}, {human(vg['free'])} free, {vg['lv_count']} LVs) on "
            + ", ".join(p["name"] for p in d["pvs"]))
    rows = [(lv["name"], human(lv["size"]), lv["attr"], ",".join(lv["tags"]))
            for lv in d["lvs"]]
    return head + ("\n" + table(rows, ("LV", "SIZE", "ATTR", "TAGS")) if rows else "")


def _config(args: argparse.Namespace) -> int:
    """Loading the config is the check; then show it as read (with defaults filled in)."""
    from fenceless.lvm.parse import as_json

    ctx = _context(args)
    emit(args, as_json(ctx.cfg), lambda c: f"{c['path']}: ok (host {c['host']}, VGs "
         + ", ".join(v["name"] for v in c["vgs"]) + ")")
    return 0
