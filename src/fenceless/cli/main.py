"""The ``fenceless`` command: parsing, output and exit codes, nothing else.

Only ``main()`` prints errors and exits. Modules are imported per command so
that a quick command (``status``) starts quickly.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from fenceless import __version__
from fenceless.errors import FencelessError, UsageError

EXAMPLES = {
    "lab up": "fenceless lab up --dir /tmp/lab --hosts 3 --size 8G --io-timeout 0.2",
    "lab down": "fenceless lab down --dir /tmp/lab",
    "lab status": "fenceless lab status --dir /tmp/lab --json",
    "lab exec": "fenceless lab exec --dir /tmp/lab h2 -- lvs",
    "lab shell": "fenceless lab shell --dir /tmp/lab h2",
    "lab activate": "fenceless lab activate --dir /tmp/lab h2 vm1-disk",
    "lab deactivate": "fenceless lab deactivate --dir /tmp/lab h2 vm1-disk",
    "lab refresh": "fenceless lab refresh --dir /tmp/lab h2 vm1-disk",
    "scan": "fenceless -c /tmp/lab/hosts/h2/fenceless.toml scan --json",
    "config": "fenceless -c /etc/fenceless/fenceless.toml config",
    "init": "fenceless init --max-hosts 16",
    "join": "fenceless join",
    "agent": "fenceless agent --auto-takeover",
    "status": "fenceless status --json",
    "writer status": "fenceless writer status",
    "writer handover": "fenceless writer handover h2",
    "writer takeover": "fenceless writer takeover",
    "lab agent": "fenceless lab agent --dir /tmp/lab h2 stop",
    "volume create": "fenceless volume create vm7-disk 20G",
    "volume extend": "fenceless volume extend vm7-disk +5G",
    "volume rename": "fenceless volume rename vm7-disk vm8-disk",
    "volume remove": "fenceless volume remove vm8-disk",
    "volume list": "fenceless volume list --json",
    "volume show": "fenceless volume show vm7-disk",
    "log": "fenceless log --limit 20",
    "metadata history": "fenceless metadata history",
    "metadata show": "fenceless metadata show 42",
    "metadata diff": "fenceless metadata diff 41 42",
    "metadata restore": "fenceless metadata restore 41 --yes",
    "guard": "fenceless guard install",
}


class Parser(argparse.ArgumentParser):
    """argparse that raises instead of printing and exiting."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(detail=f"{message} (see `{self.prog} --help`)")


def _epilog(*keys: str) -> str:
    return "examples:\n" + "\n".join(f"  {EXAMPLES[k]}" for k in keys)


def _common(p: argparse.ArgumentParser, *, json_opt: bool = True) -> None:
    # Accepted both before and after the command name.
    p.add_argument("-c", "--config", default=argparse.SUPPRESS, metavar="PATH",
                   help="host config (default: $FENCELESS_CONFIG or /etc/fenceless/fenceless.toml)")
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                   help="show tracebacks")
    if json_opt:
        p.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                       help="machine-readable output")


TOP_COMMANDS = ("lab", "init", "join", "agent", "status", "writer", "scan", "config", "volume",
                "log", "metadata", "guard")


def _command_of(argv: Sequence[str]) -> str | None:
    """The command named in argv, so that only its parser is built (start-up time)."""
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg in ("-c", "--config"):
            skip = True
        elif not arg.startswith("-"):
            return arg if arg in TOP_COMMANDS else None
    return None


def build_parser(only: str | None = None) -> Parser:
    """The whole parser, or (``only``) the top level plus one command's subtree."""

    def want(name: str) -> bool:
        return only is None or only == name

    fmt = argparse.RawDescriptionHelpFormatter
    p = Parser(prog="fenceless", formatter_class=fmt,
               description="Safe VM hosts on one shared LUN with plain LVM2, no cluster stack.",
               epilog=_epilog("lab up", "lab exec", "scan", "lab down")
               + "\n\nexit codes: 0 ok, 1 internal error, 2 refused/bad input (nothing "
               "changed),\n  3 failed part-way, 4 integrity error on disk, 5 lease lost, "
               "130 interrupted")
    p.add_argument("--version", action="version", version=f"fenceless {__version__}")
    _common(p)
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)

    def cmd(parent: Any, name: str, key: str, helptext: str, *, json_opt: bool = True
            ) -> argparse.ArgumentParser:
        sp: argparse.ArgumentParser = parent.add_parser(
            name, help=helptext, description=helptext, epilog=_epilog(key),
            formatter_class=fmt)
        _common(sp, json_opt=json_opt)
        return sp

    if want("lab"):
        _build_lab(sub, cmd, fmt)

    def vg_opt(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--vg", help="the shared VG, when several are configured")

    if want("init"):
        sp = cmd(sub, "init", "init", "make this host's shared VG a fenceless cluster; this "
                 "host becomes the metadata writer at epoch 1 (runs in the local agent)")
        vg_opt(sp)
        sp.add_argument("--max-hosts", type=int, default=16, help="host ids to provide (1-250)")
        sp.add_argument("--adopt", action="store_true",
                        help="the VG exists already: add the control LV, touch no existing LV")
    if want("join"):
        sp = cmd(sub, "join", "join", "take a host id in the cluster (runs in the local agent)")
        vg_opt(sp)
    if want("agent"):
        sp = cmd(sub, "agent", "agent", "the per-host daemon (foreground): renews leases, "
                 "serves the writer role", json_opt=False)
        sp.add_argument("--auto-takeover", action="store_true", help="take over a dead writer "
                        "when this is the lowest-numbered live host")
    if want("status"):
        sp = cmd(sub, "status", "status", "hosts, leases, writer and ledger, read from the "
                 "control area (no LVM command runs)")
        vg_opt(sp)
    if want("writer"):
        _build_writer(sub, cmd, fmt, vg_opt)
    if want("volume"):
        _build_volume(sub, cmd, fmt, vg_opt)
    if want("log"):
        sp = cmd(sub, "log", "log", "the audit log on the LUN: every change, who asked, result")
        vg_opt(sp)
        sp.add_argument("--limit", type=int, help="only the last N records")
    if want("metadata"):
        _build_metadata(sub, cmd, fmt, vg_opt)
    if want("guard"):
        from fenceless.cli import guard_cmd

        guard_cmd.register(sub, cmd, vg_opt)
    if want("scan"):
        sp = cmd(sub, "scan", "scan", "what this host's LVM sees of a shared VG (read-only)")
        vg_opt(sp)
    if want("config"):
        cmd(sub, "config", "config", "check this host's config and show it")
    return p


def _build_lab(sub: Any, cmd: Any, fmt: Any) -> None:
    lab = sub.add_parser("lab", help="a simulated SAN of loop devices, for tests and learning",
                         description="A simulated SAN: one sparse image per LUN, one loop "
                         "device per host, one mount namespace per host.",
                         formatter_class=fmt,
                         epilog=_epilog("lab up", "lab status", "lab exec", "lab down"))
    lsub = lab.add_subparsers(dest="lab_command", metavar="LABCOMMAND", parser_class=Parser)
    lsub.required = True
    sp = cmd(lsub, "up", "lab up", "make a lab: the LUN image(s), loop devices, host configs")
    sp.add_argument("--dir", required=True, help="folder that holds the lab")
    sp.add_argument("--hosts", type=int, default=3, help="number of hosts (h1..hN), 1-16")
    sp.add_argument("--size", default="8G", help="size of each LUN image (sparse), e.g. 8G")
    sp.add_argument("--io-timeout", type=float, default=1.0, metavar="S",
                    help="io_timeout written into every host config (tests: 0.1-0.5)")
    sp.add_argument("--vg", action="append", metavar="NAME",
                    help="a shared VG (one LUN image each); repeat for several (default: sanvg)")
    sp.add_argument("--agents", action="store_true", help="start one agent per host")
    sp.add_argument("--auto-takeover", action="store_true",
                    help="with --agents: agents take over a dead writer by themselves")
    sp = cmd(lsub, "down", "lab down", "stop every lab process and detach every loop device")
    sp.add_argument("--dir", required=True)
    sp.add_argument("--force", action="store_true",
                    help="clean up by scanning even if lab.json is missing or unreadable")
    sp = cmd(lsub, "status", "lab status", "what the lab holds and whether it is intact")
    sp.add_argument("--dir", required=True)
    sp = cmd(lsub, "exec", "lab exec", "run a command as a lab host would (its namespace, "
             "its config)", json_opt=False)
    sp.add_argument("--dir", required=True)
    sp.add_argument("host")
    sp.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- CMD [ARGS...]")
    sp = cmd(lsub, "shell", "lab shell", "an interactive shell as a lab host", json_opt=False)
    sp.add_argument("--dir", required=True)
    sp.add_argument("host")
    for name, helptext in (("activate", "map an LV onto a loop device on a lab host"),
                           ("deactivate", "remove a lab host's mapping of an LV"),
                           ("refresh", "re-read an LV's size from metadata and resize the "
                            "mapping")):
        sp = cmd(lsub, name, f"lab {name}", helptext)
        sp.add_argument("--dir", required=True)
        sp.add_argument("host")
        sp.add_argument("lv")
        sp.add_argument("--vg", help="the shared VG, when the host has several")
        if name == "activate":
            sp.add_argument("--readonly", action="store_true", help="map read-only")

    sp = cmd(lsub, "agent", "lab agent", "start, stop or signal a lab host's agent")
    sp.add_argument("--dir", required=True)
    sp.add_argument("host")
    sp.add_argument("action", choices=["start", "stop", "kill", "pause", "resume", "pid"])
    sp.add_argument("--auto-takeover", action="store_true", help="with start")


def _build_metadata(sub: Any, cmd: Any, fmt: Any, vg_opt: Any) -> None:
    mp = sub.add_parser("metadata", help="the VG metadata history on the LUN",
                        formatter_class=fmt,
                        description="After every change the writer keeps the VG metadata text "
                        "in a ring on the control area (the last 128 versions).",
                        epilog=_epilog("metadata history", "metadata diff",
                                       "metadata restore"))
    msub = mp.add_subparsers(dest="metadata_command", metavar="METADATACOMMAND",
                             parser_class=Parser)
    msub.required = True
    sp = cmd(msub, "history", "metadata history", "the stored versions, newest first")
    vg_opt(sp)
    sp = cmd(msub, "show", "metadata show", "one stored version's text", json_opt=False)
    sp.add_argument("seqno", type=int)
    vg_opt(sp)
    sp = cmd(msub, "diff", "metadata diff", "what changed between two stored versions",
             json_opt=False)
    sp.add_argument("a", type=int)
    sp.add_argument("b", type=int)
    vg_opt(sp)
    sp = cmd(msub, "restore", "metadata restore", "restore a stored version (writer only; "
             "a dry run that shows the diff unless --yes)")
    sp.add_argument("seqno", type=int)
    sp.add_argument("--yes", action="store_true", help="really restore")
    vg_opt(sp)


def _build_volume(sub: Any, cmd: Any, fmt: Any, vg_opt: Any) -> None:
    vp = sub.add_parser("volume", help="volumes (LVs) of a shared VG, from any host",
                        formatter_class=fmt,
                        description="Volume operations run on the metadata writer; from any "
                        "other host they are forwarded to it through the on-disk mailboxes.",
                        epilog=_epilog("volume create", "volume extend", "volume list"))
    vsub = vp.add_subparsers(dest="volume_command", metavar="VOLUMECOMMAND",
                             parser_class=Parser)
    vsub.required = True

    def common(sp: argparse.ArgumentParser) -> None:
        vg_opt(sp)
        sp.add_argument("--request-id", help="an id of your own, to retry a request safely "
                        "(the same id is never applied twice)")
        sp.add_argument("--timeout", type=float, default=120.0,
                        help="seconds to wait for the writer (default 120)")

    sp = cmd(vsub, "create", "volume create", "create a volume")
    sp.add_argument("name")
    sp.add_argument("size", help="e.g. 512M, 10G")
    sp.add_argument("--shared-ro", action="store_true",
                    help="meant to be shared read-only by many hosts (images, repositories)")
    common(sp)
    sp = cmd(vsub, "extend", "volume extend", "grow a volume to SIZE (or by +SIZE); every "
             "host with it active is refreshed before this returns")
    sp.add_argument("name")
    sp.add_argument("size", help="new size (10G) or growth (+2G)")
    common(sp)
    sp = cmd(vsub, "rename", "volume rename", "rename a volume (not while active anywhere)")
    sp.add_argument("name")
    sp.add_argument("new_name")
    common(sp)
    sp = cmd(vsub, "remove", "volume remove", "remove a volume (not while active anywhere)")
    sp.add_argument("name")
    common(sp)
    sp = cmd(vsub, "list", "volume list", "the volumes of the VG (read-only, this host)")
    vg_opt(sp)
    sp = cmd(vsub, "show", "volume show", "one volume: size, segments, where it is active")
    sp.add_argument("name")
    vg_opt(sp)


def _build_writer(sub: Any, cmd: Any, fmt: Any, vg_opt: Any) -> None:
    writer = sub.add_parser("writer", help="the metadata writer role", formatter_class=fmt,
                            description="The metadata writer: the one host that changes LVM "
                            "metadata, chosen by a Disk Paxos lease whose version is the epoch.",
                            epilog=_epilog("writer status", "writer handover", "writer takeover"))
    wsub = writer.add_subparsers(dest="writer_command", metavar="WRITERCOMMAND",
                                 parser_class=Parser)
    wsub.required = True
    sp = cmd(wsub, "status", "writer status", "which host is the writer, at which epoch")
    vg_opt(sp)
    sp = cmd(wsub, "handover", "writer handover", "planned move of the writer role to HOST "
             "(the old writer finishes and releases; HOST acquires at epoch+1)")
    vg_opt(sp)
    sp.add_argument("to", metavar="HOST")
    sp.add_argument("--timeout", type=float, help="seconds to wait (default 20 x io_timeout)")
    sp = cmd(wsub, "takeover", "writer takeover", "become the writer here; only when the "
             "writer's host lease is DEAD (two hosts racing never both win)")
    vg_opt(sp)
    sp.add_argument("--wait", action="store_true", help="if the writer still looks alive, "
                    "wait (up to --timeout) for its lease to die instead of refusing")
    sp.add_argument("--timeout", type=float, help="seconds to wait for the old writer to be "
                    "declared dead (default 20 x io_timeout)")



# --- output -----------------------------------------------------------------------


def emit(args: argparse.Namespace, data: Any, text: Callable[[Any], str]) -> None:
    if getattr(args, "json", False):
        print(json.dumps(data, indent=2, sort_keys=True))
    else:
        out = text(data)
        if out:
            print(out)


def _table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    cells = [list(map(str, header))] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                     for r in cells)


# --- commands ---------------------------------------------------------------------


def _context(args: argparse.Namespace) -> Any:
    from fenceless import config
    from fenceless.ops.context import Context

    return Context(config.load(config.resolve_path(getattr(args, "config", None))))


def _lab(args: argparse.Namespace) -> int:
    from fenceless.lab import cluster
    from fenceless.runner import SubprocessRunner
    from fenceless.validate import human, parse_size

    runner = SubprocessRunner()
    sub = args.lab_command
    if sub == "up":
        size = parse_size(args.size, minimum=64 << 20)
        state = cluster.up(args.dir, hosts=args.hosts, size=size, io_timeout=args.io_timeout,
                           vgs=args.vg or ["sanvg"], runner=runner)
        if args.agents:
            for h in state["hosts"]:
                h["agent_pid"] = cluster.start_agent(
                    args.dir, h["name"], ["--auto-takeover"] if args.auto_takeover else [])

        def up_text(s: dict[str, Any]) -> str:
            lines = [f"lab up in {s['dir']}: {len(s['hosts'])} hosts, "
                     f"LUN(s) of {human(s['size'])}, io_timeout {s['io_timeout']}s"]
            lines += [f"  {h['name']}: {', '.join(f'{vg} on {d}' for vg, d in h['loops'].items())}"
                      for h in s["hosts"]]
            first = s["hosts"][0]["name"]
            lines += ["address a host with:",
                      f"  fenceless -c {s['dir']}/hosts/{first}/fenceless.toml scan",
                      f"  fenceless lab exec --dir {s['dir']} {first} -- lvs",
                      f"  fenceless lab shell --dir {s['dir']} {first}"]
            return "\n".join(lines)

        emit(args, state, up_text)
    elif sub == "down":
        res = cluster.down(args.dir, runner=runner, force=args.force)
        emit(args, res, lambda r: f"lab down in {r['dir']}: stopped {r['processes_stopped']} "
             f"processes, detached {len(r['loops_detached'])} loop devices")
    elif sub == "status":
        st = cluster.status(args.dir)

        def status_text(s: dict[str, Any]) -> str:
            rows = [(h["name"], h["namespace"], "ok" if h["loops_attached"] else "MISSING",
                     " ".join(h["loops"].values()), h["config"]) for h in s["hosts"]]
            out = [f"lab {s['dir']}: {s['status']}, io_timeout {s['io_timeout']}s, "
                   f"{s['processes']} lab processes",
                   _table(rows, ("HOST", "NAMESPACE", "LOOPS", "DEVICES", "CONFIG"))]
            if s["lv_mappings"]:
                out.append(_table([(m["device"], m["over"], m["offset"], m["size"])
                                   for m in s["lv_mappings"]],
                                  ("LV MAPPING", "OVER", "OFFSET", "SIZE")))
            return "\n".join(out)

        emit(args, st, status_text)
    elif sub == "exec":
        argv = list(args.argv)
        if argv and argv[0] == "--":
            argv = argv[1:]
        cluster.exec_in(args.dir, args.host, argv)
    elif sub == "shell":
        cluster.shell(args.dir, args.host)
    elif sub == "agent":
        return _lab_agent(args, cluster)
    else:
        return _lab_activation(args, cluster)
    return 0


def _lab_agent(args: argparse.Namespace, cluster: Any) -> int:
    import signal

    action = args.action
    if action == "start":
        pid = cluster.start_agent(args.dir, args.host,
                                  ["--auto-takeover"] if args.auto_takeover else [])
    elif action == "pid":
        pid = cluster.agent_pid(args.dir, args.host)
    else:
        sig = {"stop": signal.SIGTERM, "kill": signal.SIGKILL, "pause": signal.SIGSTOP,
               "resume": signal.SIGCONT}[action]
        pid = cluster.signal_agent(args.dir, args.host, sig,
                                   wait=10.0 if action in ("stop", "kill") else 0.0)
    emit(args, {"host": args.host, "action": action, "pid": pid},
         lambda r: f"{r['host']}: agent {r['action']} (pid {r['pid']})")
    return 0 if pid is not None or action != "pid" else 3


def _lab_activation(args: argparse.Namespace, cluster: Any) -> int:
    from fenceless import config
    from fenceless.ops.context import Context

    d = cluster.lab_dir(args.dir)
    host = cluster.find_host(d, cluster.read_state(d), args.host)
    cfg = config.load(host["config"])
    if cluster.agent_pid(args.dir, args.host) is not None:
        # Through the host's agent, which announces the activation on disk first.
        res = _agent_call(cfg, {"op": args.lab_command, "vg": args.vg, "lv": args.lv,
                                "readonly": getattr(args, "readonly", False)}, timeout=30.0)
        data = {"host": args.host, **res}
        if args.lab_command == "deactivate":
            emit(args, data, lambda r: f"{r['host']}: {r['lv']} deactivated")
        else:
            emit(args, data, lambda r: f"{r['host']}: {r['vg']}/{r['lv']} on {r['device']} "
                 f"({r['size_bytes']} bytes, {'read-only' if r['readonly'] else 'read-write'})")
        return 0
    ctx = Context(cfg)
    act = ctx.activator(args.vg)
    sub = args.lab_command
    if sub == "deactivate":
        act.deactivate(args.lv)
        emit(args, {"host": args.host, "lv": args.lv, "active": False},
             lambda r: f"{r['host']}: {r['lv']} deactivated")
        return 0
    got = act.activate(args.lv, readonly=args.readonly) if sub == "activate" \
        else act.refresh(args.lv)
    data = {"host": args.host, "vg": got.vg, "lv": got.lv, "device": got.device,
            "size_bytes": got.size, "readonly": got.readonly}
    emit(args, data, lambda r: f"{r['host']}: {r['vg']}/{r['lv']} on {r['device']} "
         f"({r['size_bytes']} bytes, {'read-only' if r['readonly'] else 'read-write'})")
    return 0


def _scan(args: argparse.Namespace) -> int:
    from fenceless.ops.scan import scan
    from fenceless.validate import human

    data = scan(_context(args), args.vg)

    def text(d: dict[str, Any]) -> str:
        vg = d["vg"]
        head = (f"host {d['host']} sees VG {vg['name']} (seqno {vg['seqno']}, "
                f"{human(vg['size'])}, {human(vg['free'])} free, {vg['lv_count']} LVs) on "
                + ", ".join(p["name"] for p in d["pvs"]))
        rows = [(lv["name"], human(lv["size"]), lv["attr"], ",".join(lv["tags"]))
                for lv in d["lvs"]]
        return head + ("\n" + _table(rows, ("LV", "SIZE", "ATTR", "TAGS")) if rows else "")

    emit(args, data, text)
    return 0


def _config(args: argparse.Namespace) -> int:
    from fenceless.lvm.parse import as_json

    ctx = _context(args)
    emit(args, as_json(ctx.cfg), lambda c: f"{c['path']}: ok (host {c['host']}, VGs "
         + ", ".join(v["name"] for v in c["vgs"]) + ")")
    return 0


def _load_cfg(args: argparse.Namespace) -> Any:
    from fenceless import config

    return config.load(config.resolve_path(getattr(args, "config", None)))


def _agent_call(cfg: Any, request: dict[str, Any], timeout: float) -> dict[str, Any]:
    from fenceless.agent import ipc

    request = {**request, "timeout": timeout}
    return ipc.call(cfg.state_dir, request, timeout=timeout + 5.0)


def _init(args: argparse.Namespace) -> int:
    cfg = _load_cfg(args)
    res = _agent_call(cfg, {"op": "init", "vg": args.vg, "max_hosts": args.max_hosts,
                            "adopt": args.adopt}, timeout=120.0)
    emit(args, res, lambda r: f"initialized cluster {r['cluster']} on VG {r['vg']}: this host "
         f"({cfg.host}) is host id {r['host_id']} and the metadata writer at epoch "
         f"{r['epoch']} (control LV {r['control_lv']})")
    return 0


def _join(args: argparse.Namespace) -> int:
    cfg = _load_cfg(args)
    res = _agent_call(cfg, {"op": "join", "vg": args.vg}, timeout=120.0)
    emit(args, res, lambda r: f"joined cluster {r['cluster']} on VG {r['vg']} as host id "
         f"{r['host_id']} (generation {r['generation']})")
    return 0


def _agent(args: argparse.Namespace) -> int:
    from fenceless.agent.daemon import Agent

    return Agent(_load_cfg(args), auto_takeover=args.auto_takeover).run()


def _status_text(s: dict[str, Any]) -> str:
    w = s["writer"]
    writer = "none" if w is None else (
        f"{w['host']} (id {w['id']}, generation {w['generation']}), epoch {w['epoch']} "
        f"[{w['state']}]")
    rows = [(h["id"], h["name"], h["lease"], "-" if h["age"] is None else f"{h['age']:.1f}s",
             h["generation"] if h["generation"] is not None else "-",
             h["facts"].get("lvm_role", "-")) for h in s["hosts"]]
    lines = [f"cluster {s['cluster']} on VG {s['vg']} (seen from {s['host']}; io_timeout "
             f"{s['io_timeout']}s; lease states from {s['lease_source']})",
             f"writer: {writer}",
             f"ledger: generation {s['ledger']['generation']} at epoch {s['ledger']['epoch']}",
             _table(rows, ("ID", "HOST", "LEASE", "AGE", "GEN", "LVM ROLE"))]
    lines += [f"problem: {p}" for p in s["ledger"]["problems"]]
    return "\n".join(lines)


def _status(args: argparse.Namespace) -> int:
    from fenceless.ops.status import read_status

    emit(args, read_status(_load_cfg(args), args.vg), _status_text)
    return 0


def _writer(args: argparse.Namespace) -> int:
    import time

    from fenceless.ops.status import read_status

    cfg = _load_cfg(args)
    sub = args.writer_command
    if sub == "status":
        st = read_status(cfg, args.vg)
        data = {"writer": st["writer"], "vg": st["vg"], "ledger": st["ledger"]}
        emit(args, data, lambda d: "no writer" if d["writer"] is None else
             f"writer: {d['writer']['host']} (host id {d['writer']['id']}) at epoch "
             f"{d['writer']['epoch']} [{d['writer']['state']}]")
        return 0
    timeout = args.timeout or 20 * cfg.io_timeout + 5
    if sub == "takeover":
        res = _agent_call(cfg, {"op": "takeover", "vg": args.vg, "wait": args.wait},
                          timeout=timeout)
        emit(args, res, lambda r: f"{r['host']} is the metadata writer at epoch {r['epoch']}"
             + (" (it already was)" if r["outcome"] == "already" else ""))
        return 0
    res = _agent_call(cfg, {"op": "handover", "vg": args.vg, "to": args.to}, timeout=timeout)
    if res.get("outcome") != "already":
        deadline = time.monotonic() + timeout
        while True:
            st = read_status(cfg, args.vg)
            w = st["writer"]
            if w and w["host"] == args.to and not w["released"] and \
                    w["epoch"] > res.get("from_epoch", 0):
                res = {"outcome": "done", "host": args.to, "epoch": w["epoch"]}
                break
            if time.monotonic() > deadline:
                from fenceless.errors import ExecError

                raise ExecError(detail=f"handover to {args.to} requested, but {args.to} did "
                                f"not become the writer within {timeout:.0f}s (writer now: "
                                f"{w})")
            time.sleep(cfg.io_timeout / 2)
    emit(args, res, lambda r: f"{r['host']} is the metadata writer at epoch {r['epoch']}")
    return 0


def _volume(args: argparse.Namespace) -> int:
    import getpass

    from fenceless.validate import human, lv_name, parse_size, request_id

    cfg = _load_cfg(args)
    sub = args.volume_command
    if sub in ("list", "show"):
        from fenceless.ops.context import Context
        from fenceless.ops.volume import list_volumes

        ctx = Context(cfg)
        vols = list_volumes(ctx.lvm(args.vg))
        if sub == "list":
            emit(args, vols, lambda v: _table(
                [(x["name"], human(x["size_bytes"]), "yes" if x["shared_ro"] else "")
                 for x in v], ("VOLUME", "SIZE", "SHARED-RO")))
            return 0
        found = next((v for v in vols if v["name"] == args.name), None)
        if found is None:
            from fenceless.errors import NotFound

            raise NotFound(kind="volume", name=args.name, where=f" in VG {cfg.vg(args.vg).name}")
        from contextlib import suppress

        from fenceless.errors import FencelessError
        from fenceless.ops.status import read_status

        with suppress(FencelessError):
            st = read_status(cfg, args.vg)
            found["active_on"] = [h["name"] for h in st["hosts"]
                                  if args.name in (h["facts"].get("active") or {})]
        emit(args, found, lambda v: f"{v['name']}: {human(v['size_bytes'])}"
             + (", shared read-only" if v["shared_ro"] else "")
             + (f", active on {', '.join(v.get('active_on', [])) or 'no host'}"))
        return 0
    name = lv_name(args.name)
    body: dict[str, Any] = {"name": name}
    if sub == "create":
        body.update(size_bytes=parse_size(args.size), shared_ro=args.shared_ro)
    elif sub == "extend":
        size = args.size.strip()
        body.update(size_bytes=parse_size(size.lstrip("+")), relative=size.startswith("+"))
    elif sub == "rename":
        body["new_name"] = lv_name(args.new_name)
    argv = ["fenceless", "volume", sub, args.name] + (
        [args.size] if sub in ("create", "extend") else []) + (
        [args.new_name] if sub == "rename" else [])
    # os.urandom is what secrets uses, without its 4 ms of imports (hmac, random).
    rid = request_id(args.request_id) if args.request_id else os.urandom(8).hex()
    request = {"id": rid, "op": sub, "args": body,
               "user": getpass.getuser(), "argv": argv}
    res = _agent_call(cfg, {"op": "volume", "vg": args.vg, "request": request},
                      timeout=args.timeout)

    def text(r: dict[str, Any]) -> str:
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

    emit(args, res, text)
    return 3 if res.get("not_refreshed") else 0


def _log(args: argparse.Namespace) -> int:
    from fenceless.ops.metadata import read_log

    entries = read_log(_load_cfg(args), args.vg, args.limit)
    emit(args, entries, lambda es: _table(
        [(e["seq"], e["time"], e["epoch"], e["host"], e["user"], " ".join(e["command"]),
          e["result"] + (f": {e['message']}" if e["message"] else ""))
         if "error" not in e else (e["seq"], "-", "-", "-", "-", "-", "ERROR " + e["error"])
         for e in es], ("SEQ", "TIME", "EPOCH", "HOST", "USER", "COMMAND", "RESULT")))
    return 0


def _metadata(args: argparse.Namespace) -> int:
    from fenceless.ledger.history import diff
    from fenceless.ops import metadata as md

    cfg = _load_cfg(args)
    sub = args.metadata_command
    if sub == "history":
        emit(args, md.list_history(cfg, args.vg), lambda es: _table(
            [(e["seqno"], e["time"], e["epoch"], e["request_id"], e["text_bytes"],
              "stale" if e["stale"] else "") if "error" not in e else
             ("?", "-", "-", "ERROR " + e["error"], "-", "") for e in es],
            ("SEQNO", "TIME", "EPOCH", "REQUEST", "BYTES", "")))
    elif sub == "show":
        sys.stdout.write(md.read_version(cfg, args.vg, args.seqno))
    elif sub == "diff":
        a, b = md.read_version(cfg, args.vg, args.a), md.read_version(cfg, args.vg, args.b)
        sys.stdout.write(diff(a, b, label_a=f"seqno {args.a}", label_b=f"seqno {args.b}"))
    else:
        res = _agent_call(cfg, {"op": "restore", "vg": args.vg, "seqno": args.seqno,
                                "apply": args.yes}, timeout=120.0)
        emit(args, res, lambda r: r["diff"] + (
            f"\nrestored seqno {r['seqno']} as seqno {r['new_seqno']}" if r["applied"] else
            f"\ndry run: would change {', '.join(r['changes']) or 'no LV'}; "
            "run again with --yes to restore"))
    return 0


def _guard(args: argparse.Namespace) -> int:
    from fenceless.cli import guard_cmd

    return guard_cmd.run(args)


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "lab": _lab, "scan": _scan, "config": _config, "init": _init, "join": _join,
    "agent": _agent, "status": _status, "writer": _writer, "volume": _volume,
    "log": _log, "metadata": _metadata, "guard": _guard,
}


def _explain(exc: BaseException) -> str:
    """The message, followed by its cause chain (as stratis-cli explains errors)."""
    parts = [str(exc)]
    cause = exc.__cause__
    while cause is not None and len(parts) < 4:
        text = str(cause)
        if text and text not in parts[-1]:
            parts.append(f"  because: {text}")
        cause = cause.__cause__
    return "\n".join(parts)


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args_list or os.environ.get("FENCELESS_DEBUG") == "1"
    try:
        args = build_parser(_command_of(args_list)).parse_args(args_list)
        if not args.command:
            build_parser().print_help()
            return 2
        return COMMANDS[args.command](args)
    except FencelessError as exc:
        if debug:
            import traceback

            traceback.print_exc()
        print(f"fenceless: {_explain(exc)}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("fenceless: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if debug:
            raise
        print(f"fenceless: internal error: {type(exc).__name__}: {exc} "
              "(run again with --debug for a traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
