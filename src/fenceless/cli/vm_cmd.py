"""``fenceless vm define|import|edit|undefine|list|show``: VM definitions on the LUN.

Parsing and output only. A change is checked here first (a refusal then costs
nothing), sent to the local agent, which uploads the XML to this host's slot
on the LUN and asks the writer through the mailboxes; the writer checks it
again on what it reads itself (``ops/vm.py``). ``list`` and ``show`` read the
LUN directly (``ops/vmquery.py``), on any host, with no LVM call.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
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
from fenceless.errors import UserError


class UnreadableFile(UserError):
    """Refused: cannot read {path} ({reason}); nothing was changed"""


class EditorFailed(UserError):
    """The editor {editor!r} exited with {rc}; the definition of {name} is unchanged"""


class NothingChanged(UserError):
    """The definition of {name} was not changed (nothing to do)"""


def register(sub: Subparsers, name: str) -> None:
    """Add the ``vm`` command and its subcommands to the top-level ``sub``."""
    del name
    vp = sub.add_parser("vm", help="VM definitions stored on the shared LUN, from any host",
                        formatter_class=FORMATTER,
                        description="VM definitions live on the LUN: every host reads the "
                        "same ones, with no stale copies. Changes run on the metadata writer; "
                        "from any other host they are forwarded through the on-disk mailboxes.",
                        epilog=epilog("vm define", "vm import", "vm list", "vm show"))
    vsub = vp.add_subparsers(dest="vm_command", metavar="VMCOMMAND", parser_class=Parser)
    vsub.required = True
    sp = command(vsub, "define", "vm define", "define a VM from a libvirt domain XML file")
    sp.add_argument("name")
    sp.add_argument("--xml", required=True, metavar="FILE", help="libvirt domain XML")
    _change_options(sp)
    sp = command(vsub, "import", "vm import", "define a VM from a Xen xl config (name, "
                 "memory, vcpus and disks that are volumes of the VG)")
    sp.add_argument("--xl", required=True, metavar="FILE", help="the xl config file")
    _change_options(sp)
    sp = command(vsub, "edit", "vm edit", "change a VM's definition: from --xml FILE, or "
                 "in $EDITOR (the earlier version stays in the history)")
    sp.add_argument("name")
    sp.add_argument("--xml", metavar="FILE", help="the new libvirt domain XML")
    _change_options(sp)
    sp = command(vsub, "undefine", "vm undefine", "remove a stopped VM's definition (its "
                 "last version stays in the history; its volumes are kept)")
    sp.add_argument("name")
    _change_options(sp)
    sp = command(vsub, "start", "vm start", "start a VM on this host: the writer grants it "
                 "(refused while it runs anywhere else), its disks are mapped, libvirt starts it")
    sp.add_argument("name")
    sp.add_argument("--on", metavar="HOST", help="the host to start it on (default: this "
                    "host); its agent starts it")
    _change_options(sp)
    sp = command(vsub, "migrate", "vm migrate", "move a VM to another host, cold: stopped "
                 "where it runs (its disks unmapped, its grant returned), started there; or "
                 "--live: moved while it runs (both hosts hold its disks for the handoff)")
    sp.add_argument("name")
    sp.add_argument("--to", required=True, metavar="HOST")
    sp.add_argument("--live", action="store_true",
                    help="migrate the running guest through libvirt (on failure it keeps "
                    "running where it is)")
    sp.add_argument("--force", action="store_true",
                    help="destroy the running copy instead of asking the guest to shut down")
    _change_options(sp)
    sp = command(vsub, "recover", "vm recover", "start here a VM whose host is DEAD (refused "
                 "before: its host may still be writing)")
    sp.add_argument("name")
    _change_options(sp)
    sp = command(vsub, "stop", "vm stop", "stop a VM running on this host, unmap its disks "
                 "and give its grant back")
    sp.add_argument("name")
    sp.add_argument("--force", action="store_true", help="destroy it (no guest shutdown)")
    _change_options(sp)
    sp = command(vsub, "list", "vm list", "every defined VM: where it runs, its state")
    vg_option(sp)
    sp = command(vsub, "show", "vm show", "one VM: its disks and its XML")
    sp.add_argument("name")
    sp.add_argument("--version", type=int, help="an earlier version (see `versions`)")
    vg_option(sp)


def _change_options(sp: argparse.ArgumentParser) -> None:
    vg_option(sp)
    sp.add_argument("--request-id", help="an id of your own, to retry a request safely")
    sp.add_argument("--timeout", type=float, default=120.0,
                    help="seconds to wait for the writer (default 120)")


def _read(path: str) -> str:
    from fenceless.hv.domain import MAX_XML

    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_XML + 1)
    except OSError as exc:
        raise UnreadableFile(path=path, reason=exc.strerror or str(exc)) from exc
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UnreadableFile(path=path, reason="not UTF-8 text") from exc


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args)
    sub = args.vm_command
    vg = cfg.vg(args.vg).name
    if sub in ("list", "show"):
        from fenceless.ops import vmquery

        if sub == "list":
            emit(args, vmquery.vm_list(cfg, args.vg), _list_text)
        else:
            emit(args, vmquery.vm_show(cfg, args.vg, args.name, version=args.version),
                 _show_text)
        return 0
    if sub in ("start", "stop", "recover", "migrate"):
        return _lifecycle(args, cfg, sub)
    from fenceless.hv import domain
    from fenceless.ops.requests import vm_request

    if sub == "undefine":
        request = vm_request("vm-undefine", domain.vm_name(args.name), rid=args.request_id)
    elif sub == "import":
        spec = domain.parse_xl(_read(args.xl), vg, source=args.xl)
        request = vm_request("vm-define", spec.name, xml=spec.xml, source="xl",
                             rid=args.request_id)
    else:
        name = domain.vm_name(args.name)
        xml = _edit(cfg, args, name) if sub == "edit" and args.xml is None else _read(args.xml)
        spec = domain.parse_domain_xml(xml, vg, source=args.xml or "(edited)")
        if spec.name != name:
            from fenceless.ops.vm import VmNameMismatch

            raise VmNameMismatch(found=spec.name, name=name)
        request = vm_request("vm-define", name, xml=xml, replace=sub == "edit",
                             rid=args.request_id)
    res = agent_call(cfg, {"op": "vm", "vg": args.vg, "request": request},
                     timeout=args.timeout)
    emit(args, res, lambda r: _change_text(sub, r))
    return 0


def _lifecycle(args: argparse.Namespace, cfg: Any, sub: str) -> int:
    from fenceless.hv.domain import vm_name
    from fenceless.ops import vmlife

    name = vm_name(args.name)

    def call(request: dict[str, Any]) -> dict[str, Any]:
        return agent_call(cfg, request, timeout=args.timeout)

    target = getattr(args, "to", None) or getattr(args, "on", None)
    if target is not None and (sub == "migrate" or target != cfg.host):
        live = bool(getattr(args, "live", False))
        with progress_of(args, name, str(target)) as shown:
            res = vmlife.ask_move(cfg, args.vg, name, str(target), call,
                                  force=getattr(args, "force", False), move=sub == "migrate",
                                  timeout=args.timeout, live=live, progress=shown)
        emit(args, res, lambda r: f"{r['name']}: running on {r['host']}"
             + (f" (moved {'live ' if r.get('live') else ''}from {r['from']})"
                if r.get("from") else ""))
        return 0
    driver = vmlife.driver_for(cfg)

    try:
        if sub in ("start", "recover"):
            res = vmlife.VmStartOp(cfg, args.vg, name, call, driver,
                                   recover=sub == "recover").run()
        else:
            res = vmlife.VmStopOp(cfg, args.vg, name, call, driver, force=args.force).run()
    finally:
        driver.close()
    emit(args, res, lambda r: f"{r['name']}: {r['state']} on {r['host']} "
         f"(writer epoch {r.get('epoch')})")
    return 0


@contextmanager
def progress_of(args: argparse.Namespace, name: str, target: str
                ) -> Iterator[Callable[[dict[str, Any]], None]]:
    """A move's progress on a terminal (rich's status line: where the VM is, each poll);
    nothing when the output is not a person's (--json, or stderr not a terminal)."""
    if getattr(args, "json", False) or not sys.stderr.isatty():
        yield lambda _vm: None
        return
    from rich.console import Console

    with Console(stderr=True).status(f"{name}: asking the writer to move it to {target}") as st:
        def shown(vm: dict[str, Any]) -> None:
            where = vm["host"] or "no host"
            step = (f"migrating live {where} -> {vm['moving_to']}" if vm.get("moving_to")
                    else f"{vm['state']} on {where}")
            st.update(f"{name}: {step} (to {target})")

        yield shown


def _edit(cfg: Any, args: argparse.Namespace, name: str) -> str:
    """The current XML in $EDITOR (as `virsh edit` does); the edited text."""
    from fenceless.ops import vmquery

    current = vmquery.vm_show(cfg, args.vg, name)["xml"]
    editor = os.environ.get("VISUAL") or os.environ.get("EDITOR") or "vi"
    with tempfile.NamedTemporaryFile("w", suffix=f"-{name}.xml", delete=False) as f:
        f.write(current)
        path = f.name
    from fenceless.runner import run_interactive

    try:
        rc = run_interactive([*shlex.split(editor), path])  # the admin's editor, no shell
        if rc != 0:
            raise EditorFailed(editor=editor, rc=rc, name=name)
        edited = _read(path)
    finally:
        os.unlink(path)
    if edited == current:
        raise NothingChanged(name=name)
    return edited


def _list_text(vms: list[dict[str, Any]]) -> str:
    if not vms:
        return "no VMs defined"
    return table([(v["name"], v["state"], v["host"] or "-", f"{v['memory_mib']} MiB",
                   v["vcpus"], ", ".join(f"{d['volume']}({d['mode']})" for d in v["disks"]))
                  for v in vms], ("VM", "STATE", "HOST", "MEMORY", "VCPUS", "DISKS"))


def _show_text(v: dict[str, Any]) -> str:
    head = (f"{v['name']}: {v['state']}" + (f" on {v['host']}" if v.get("host") else "")
            + f", version {v['shown_version']} (versions kept: "
            + ", ".join(map(str, v["versions"])) + ")")
    return head + "\n" + str(v["xml"]).rstrip("\n")


def _change_text(sub: str, r: dict[str, Any]) -> str:
    if sub == "undefine":
        return f"undefined {r['name']} (its version {r['version']} stays in the history)"
    verb = "edited" if r.get("edited") else "defined"
    disks = ", ".join(f"{d[1]} as {d[0]} ({d[2]})" for d in r.get("disks", []))
    return (f"{verb} {r['name']}: version {r['version']}, writer epoch {r['epoch']}"
            + (f"; disks: {disks}" if disks else ""))
