"""``fenceless adopt``: make a running shared-VG setup a fenceless cluster.

Parsing and output only; the plan is ``ops/adopt.py``. Everything is read and
checked before anything changes: the VG's LVs (read-only LVM), every config
in ``--configs DIR`` and every per-host link. Then, through the local agent:
``init --adopt`` (the control LV, in free space), one ``vm-define`` per VM and
one ``adopt`` placement per linked VM, each skipped when already done, so a
second run finishes an interrupted one.
"""

from __future__ import annotations

import argparse
from typing import Any

from fenceless.cli.common import (
    Subparsers,
    agent_call,
    command,
    emit,
    load_config,
    table,
    vg_option,
)
from fenceless.errors import UserError


class DefinedDifferently(UserError):
    """Refused: VM {name} is defined on the LUN already, with another definition than \
{file}; compare them (`fenceless vm show {name}`) and change one. Nothing more was changed"""


def register(sub: Subparsers, name: str) -> None:
    del name
    sp = command(sub, "adopt", "adopt", "make an existing shared VG a fenceless cluster: "
                 "inventory its LVs, add the control LV in free space, store the VM configs "
                 "of --configs DIR on the LUN and record where each VM runs (from the "
                 "per-host links DIR/HOST/NAME.cfg -> ../NAME.cfg); no existing byte changes")
    vg_option(sp)
    sp.add_argument("--configs", metavar="DIR",
                    help="the VM configs (*.cfg, *.xl: xl; *.xml: libvirt) and, per host, a "
                    "directory of links to the configs of the VMs it runs")
    sp.add_argument("--dry-run", action="store_true",
                    help="read and check everything, print the plan, change nothing")
    sp.add_argument("--max-hosts", type=int, default=16, help="host ids to provide (1-250)")


def run(args: argparse.Namespace) -> int:
    from fenceless.lvm.policy import CONTROL_LV
    from fenceless.ops import adopt
    from fenceless.ops.context import Context

    cfg = load_config(args)
    vg = cfg.vg(args.vg).name
    lvs = {lv.name: lv.size for lv in Context(cfg).lvm(args.vg).lvs() if lv.name != CONTROL_LV}
    found = adopt.read_config_dir(args.configs) if args.configs else \
        adopt.ConfigDir("-", {}, {})
    plan = adopt.plan(vg, lvs, found)
    out: dict[str, Any] = {"plan": plan.to_json(), "dry_run": bool(args.dry_run)}
    if not args.dry_run:
        out["done"] = _carry_out(cfg, args, plan)
    emit(args, out, _text)
    return 0


def _carry_out(cfg: Any, args: argparse.Namespace, plan: Any) -> list[str]:
    from fenceless.ops import vmquery
    from fenceless.ops.cluster import AlreadyInitialized
    from fenceless.ops.requests import vm_request

    done = []
    try:
        res = agent_call(cfg, {"op": "init", "vg": args.vg, "max_hosts": args.max_hosts,
                               "adopt": True}, timeout=120.0)
        done.append(f"added control LV {res['control_lv']} to VG {res['vg']}: cluster "
                    f"{res['cluster']}, this host ({cfg.host}) is the metadata writer at "
                    f"epoch {res['epoch']}")
    except AlreadyInitialized:
        done.append(f"VG {plan.vg} is a fenceless cluster already: going on with the VMs")
    defined = {v["name"]: v for v in vmquery.vm_list(cfg, args.vg)}
    for vm in plan.vms:
        if vm.name in defined:
            if vmquery.vm_show(cfg, args.vg, vm.name)["xml"] != vm.xml:
                raise DefinedDifferently(name=vm.name, file=vm.file)
        else:
            request = vm_request("vm-define", vm.name, xml=vm.xml, source=vm.source)
            request["args"]["adopted"] = True  # LVM permissions stay as they are
            agent_call(cfg, {"op": "vm", "vg": args.vg, "request": request}, timeout=120.0)
            done.append(f"defined {vm.name} from {vm.file}")
        if vm.host is not None and (defined.get(vm.name) or {}).get("host") != vm.host:
            agent_call(cfg, {"op": "vm", "vg": args.vg, "request": vm_request(
                "vm-place", vm.name, host=vm.host, action="adopt")}, timeout=120.0)
            done.append(f"recorded {vm.name} as running on {vm.host}")
    return done


def _text(out: dict[str, Any]) -> str:
    from fenceless.validate import human as human_size

    plan = out["plan"]
    lines = [f"VG {plan['vg']}: {len(plan['volumes'])} LVs, {len(plan['vms'])} VM configs"]
    if plan["volumes"]:
        lines.append(table([(v["name"], human_size(v["size_bytes"]),
                             ", ".join(v["used_by"]) or "-") for v in plan["volumes"]],
                           ("LV", "SIZE", "USED BY")))
    if plan["vms"]:
        lines.append(table([(v["name"], v["file"], v["host"] or "-",
                             ", ".join(f"{d['volume']}({d['mode']})" for d in v["disks"]))
                            for v in plan["vms"]], ("VM", "CONFIG", "RUNS ON", "DISKS")))
    if plan["hosts"]:
        lines.append("hosts named by the links (each must join under that name): "
                     + ", ".join(plan["hosts"]))
    if plan["unaccounted"]:
        lines.append("LVs no VM config names (kept as volumes): "
                     + ", ".join(plan["unaccounted"]))
    if plan["skipped"]:
        lines.append("not configs, left alone: " + ", ".join(plan["skipped"]))
    if out["dry_run"]:
        lines.append("dry run: nothing was changed")
    else:
        lines += out.get("done", []) or ["nothing to do: all of it was adopted before"]
    return "\n".join(lines)
