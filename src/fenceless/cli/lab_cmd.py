"""``fenceless lab ...``: the simulated SAN (loop devices, one namespace per host).

Parsing and output only; the lab itself is ``fenceless.lab``, imported when a
lab command runs.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from fenceless.cli.common import (
    FORMATTER,
    Parser,
    Subparsers,
    agent_call,
    command,
    emit,
    epilog,
    table,
)

if TYPE_CHECKING:
    from fenceless.runner import Runner


def register(sub: Subparsers, name: str) -> None:
    """Add the ``lab`` command and its subcommands to the top-level ``sub``."""
    del name  # this module has the one command, "lab"
    lab = sub.add_parser("lab", help="a simulated SAN of loop devices, for tests and learning",
                         description="A simulated SAN: one sparse image per LUN, one loop "
                         "device per host, one mount namespace per host.",
                         formatter_class=FORMATTER,
                         epilog=epilog("lab up", "lab status", "lab exec", "lab down"))
    lsub = lab.add_subparsers(dest="lab_command", metavar="LABCOMMAND", parser_class=Parser)
    lsub.required = True
    sp = command(lsub, "up", "lab up", "make a lab: the LUN image(s), loop devices, host configs")
    sp.add_argument("--dir", required=True, help="folder that holds the lab")
    sp.add_argument("--hosts", type=int, default=3, help="number of hosts (h1..hN), 1-16")
    sp.add_argument("--size", default="8G", help="size of each LUN image (sparse), e.g. 8G")
    sp.add_argument("--io-timeout", type=float, default=1.0, metavar="S",
                    help="io_timeout written into every host config (tests: 0.1-0.5)")
    sp.add_argument("--vg", action="append", metavar="NAME",
                    help="a shared VG (one LUN image each); repeat for several (default: sanvg)")
    sp.add_argument("--lun-dir", metavar="PATH", help="where the LUN images live (default "
                    "DIR/luns); a tmpfs such as /dev/shm makes synchronous writes cheap")
    sp.add_argument("--agents", action="store_true", help="start one agent per host")
    sp.add_argument("--auto-takeover", action="store_true",
                    help="with --agents: agents take over a dead writer by themselves")
    sp.add_argument("--libvirt", action="store_true",
                    help="start each host's own libvirtd (and virtlogd) in its namespace")
    sp = command(lsub, "down", "lab down", "stop every lab process and detach every loop device")
    sp.add_argument("--dir", required=True)
    sp.add_argument("--force", action="store_true",
                    help="clean up by scanning even if lab.json is missing or unreadable")
    sp = command(lsub, "demo-vm", "lab demo-vm", "create the counter guest's volume and VM "
                 "definition (the guest is built and cached on first use)")
    sp.add_argument("--dir", required=True)
    sp.add_argument("name")
    sp.add_argument("--host", default="h1", help="the lab host to ask from (default h1)")
    sp = command(lsub, "counter", "lab counter", "the counter guest's records on its volume, "
                 "read through a host's own view of the LUN (O_DIRECT, no mapping)")
    sp.add_argument("--dir", required=True)
    sp.add_argument("volume")
    sp.add_argument("--host", default="h1", help="whose view of the LUN (default h1)")
    sp.add_argument("--last", type=int, default=5, help="how many records (default 5)")
    sp.add_argument("--wait-for", type=int, default=0, metavar="N",
                    help="wait (up to 120 s) until there are N records more than now")
    sp = command(lsub, "status", "lab status", "what the lab holds and whether it is intact")
    sp.add_argument("--dir", required=True)
    sp = command(lsub, "exec", "lab exec", "run a command as a lab host would (its namespace, "
                 "its config)", json_opt=False)
    sp.add_argument("--dir", required=True)
    sp.add_argument("host")
    sp.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- CMD [ARGS...]")
    sp = command(lsub, "shell", "lab shell", "an interactive shell as a lab host", json_opt=False)
    sp.add_argument("--dir", required=True)
    sp.add_argument("host")
    _register_activation(lsub)
    sp = command(lsub, "agent", "lab agent", "start, stop or signal a lab host's agent")
    sp.add_argument("--dir", required=True)
    sp.add_argument("host")
    sp.add_argument("action", choices=["start", "stop", "kill", "pause", "resume", "pid"])
    sp.add_argument("--auto-takeover", action="store_true", help="with start")
    sp = command(lsub, "watchdog", "lab watchdog", "start, stop or signal a lab host's "
                 "watchdog stand-in, or show when it fired")
    sp.add_argument("--dir", required=True)
    sp.add_argument("host")
    sp.add_argument("action", choices=["start", "stop", "kill", "pid", "fired"])


def _register_activation(lsub: Subparsers) -> None:
    """lab activate|deactivate|refresh: one LV on one lab host."""
    for name, helptext in (("activate", "map an LV onto a loop device on a lab host"),
                           ("deactivate", "remove a lab host's mapping of an LV"),
                           ("refresh", "re-read an LV's size from metadata and resize the "
                            "mapping")):
        sp = command(lsub, name, f"lab {name}", helptext)
        sp.add_argument("--dir", required=True)
        sp.add_argument("host")
        sp.add_argument("lv", nargs="+", help="one LV, or several (one after the other)")
        sp.add_argument("--vg", help="the shared VG, when the host has several")
        if name == "activate":
            sp.add_argument("--readonly", action="store_true", help="map read-only")
        sp.add_argument("--by-hand", action="store_true",
                        help="act directly, past the host's agent and its claim on the LUN, "
                        "as lvchange would on a host without the guard (to plant a hazard "
                        "for `fenceless check`)")


def _daemons() -> Any:
    from fenceless.lab import daemons

    return daemons


def load_config_path(path: str) -> Any:
    from fenceless import config

    return config.load(path)


def run(args: argparse.Namespace) -> int:
    """Run ``fenceless lab SUBCOMMAND``."""
    from fenceless.lab import cluster
    from fenceless.runner import SubprocessRunner

    sub = args.lab_command
    if sub == "up":
        _up(args, cluster, SubprocessRunner())
    elif sub == "down":
        res = cluster.down(args.dir, runner=SubprocessRunner(), force=args.force)
        emit(args, res, lambda r: f"lab down in {r['dir']}: stopped {r['processes_stopped']} "
             f"processes, detached {len(r['loops_detached'])} loop devices")
    elif sub == "status":
        emit(args, cluster.status(args.dir), _status_text)
    elif sub == "exec":
        argv = list(args.argv)
        if argv and argv[0] == "--":
            argv = argv[1:]
        cluster.exec_in(args.dir, args.host, argv)
    elif sub == "shell":
        cluster.shell(args.dir, args.host)
    elif sub == "agent":
        return _agent(args)
    elif sub == "watchdog":
        return _watchdog(args, cluster)
    elif sub == "counter":
        got = _counter(args, cluster)
        if args.wait_for:
            import time

            want, deadline = len(got) + args.wait_for, time.monotonic() + 120
            while len(got) < want and time.monotonic() < deadline:
                time.sleep(0.5)
                got = _counter(args, cluster)
        emit(args, got, lambda r: "\n".join(f"FLCOUNT {n} {i}" for n, i in r[-args.last:])
             + "\n" + _runs(r))
    elif sub == "demo-vm":
        emit(args, _demo_vm(args, cluster), lambda r: f"defined {r['name']} on volume "
             f"{r['volume']} (version {r['version']}); start it with "
             f"`fenceless -c {r['config']} vm start {r['name']}`")
    else:
        return _activation(args, cluster)
    return 0


def _runs(records: list[tuple[int, str]]) -> str:
    """Which instance wrote which numbers: "1-17 by ctr-1a2b, 18-25 by ctr-3c4d"."""
    runs: list[list[Any]] = []
    for n, ident in records:
        if runs and runs[-1][2] == ident and runs[-1][1] == n - 1:
            runs[-1][1] = n
        else:
            runs.append([n, n, ident])
    return f"{len(records)} records: " + (", ".join(f"{a}-{b} by {i}" for a, b, i in runs)
                                         or "none yet")


def _counter(args: argparse.Namespace, cluster: Any) -> list[tuple[int, str]]:
    from fenceless import config
    from fenceless.blockio import open_device
    from fenceless.lab import guest
    from fenceless.lvm.mapping import single_extent
    from fenceless.ops.context import Context

    d = cluster.lab_dir(args.dir)
    cfg = config.load(cluster.find_host(d, cluster.read_state(d), args.host)["config"])
    lvm = Context(cfg).lvm(None)
    vg = lvm.vg_info()
    pvs = {p.name: p for p in lvm.pvs()}
    ext = single_extent(lvm.segments(args.volume), pvs, vg.extent_size, vg.name, args.volume)
    dev = open_device(ext.device)
    try:
        raw = dev.read(ext.offset, 512 * (guest.RING + 1))
    finally:
        dev.close()
    return guest.read_counter(raw)


def _demo_vm(args: argparse.Namespace, cluster: Any) -> dict[str, Any]:
    """The counter guest: a 16 MiB volume NAME-disk and the VM NAME, defined on the LUN."""
    from fenceless import config
    from fenceless.hv.domain import vm_name
    from fenceless.lab import guest
    from fenceless.ops.requests import vm_request, volume_request
    from fenceless.runner import SubprocessRunner

    name = vm_name(args.name)
    d = cluster.lab_dir(args.dir)
    cfg = config.load(cluster.find_host(d, cluster.read_state(d), args.host)["config"])
    vg = cfg.vg(None).name
    kernel, initrd = guest.build(SubprocessRunner())
    volume = f"{name}-disk"
    agent_call(cfg, {"op": "volume", "vg": vg, "request": volume_request(
        "create", volume, size="16M")}, timeout=120.0)
    xml = guest.counter_domain(name, vg, volume, kernel, initrd)
    res = agent_call(cfg, {"op": "vm", "vg": vg, "request": vm_request(
        "vm-define", name, xml=xml)}, timeout=120.0)
    return {"name": name, "volume": volume, "version": res.get("version"),
            "config": cfg.path}


def _up(args: argparse.Namespace, cluster: Any, runner: Runner) -> None:
    """lab up, then (--agents) one agent per host."""
    from fenceless.validate import parse_size

    size = parse_size(args.size, minimum=64 << 20)
    state = cluster.up(args.dir, hosts=args.hosts, size=size, io_timeout=args.io_timeout,
                       vgs=args.vg or ["sanvg"], runner=runner, lun_dir=args.lun_dir,
                       libvirt_uris=args.libvirt)
    if args.agents:
        for h in state["hosts"]:
            h["agent_pid"] = _daemons().start_agent(
                args.dir, h["name"], ["--auto-takeover"] if args.auto_takeover else [])
    if args.libvirt:
        for h in state["hosts"]:
            h["libvirt_uri"] = cluster.start_libvirt(args.dir, h["name"], runner)
    emit(args, state, _up_text)


def _up_text(s: dict[str, Any]) -> str:
    from fenceless.validate import human

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


def _status_text(s: dict[str, Any]) -> str:
    rows = [(h["name"], h["namespace"], "ok" if h["loops_attached"] else "MISSING",
             " ".join(h["loops"].values()), h["config"]) for h in s["hosts"]]
    out = [f"lab {s['dir']}: {s['status']}, io_timeout {s['io_timeout']}s, "
           f"{s['processes']} lab processes",
           table(rows, ("HOST", "NAMESPACE", "LOOPS", "DEVICES", "CONFIG"))]
    if s["lv_mappings"]:
        out.append(table([(m["device"], m["over"], m["offset"], m["size"])
                          for m in s["lv_mappings"]],
                         ("LV MAPPING", "OVER", "OFFSET", "SIZE")))
    return "\n".join(out)


def _watchdog(args: argparse.Namespace, cluster: Any) -> int:
    """lab watchdog: start, stop or kill a host's watchdog, or what it recorded firing."""
    import signal

    from fenceless.watchdog.daemon import read_fired

    action = args.action
    if action == "fired":
        d = cluster.lab_dir(args.dir)
        cfg = load_config_path(cluster.find_host(d, cluster.read_state(d), args.host)["config"])
        fired = read_fired(cfg.state_dir)
        emit(args, fired, lambda fs: "\n".join(
            f"fired at {f['fired_at']:.3f} (boottime) for {', '.join(f['vgs'])}: agent "
            f"{'killed' if f['agent_killed'] else 'gone'}, work "
            f"{'gone' if f['work_gone'] else 'NOT gone'}" for f in fs) or "never fired")
        return 0
    if action == "start":
        pid = _daemons().start_watchdog(args.dir, args.host)
    elif action == "pid":
        pid = _daemons().watchdog_pid(args.dir, args.host)
    else:
        sig = signal.SIGTERM if action == "stop" else signal.SIGKILL
        pid = _daemons().signal_agent(args.dir, args.host, sig, wait=10.0, kind="watchdog")
    emit(args, {"host": args.host, "action": action, "pid": pid},
         lambda r: f"{r['host']}: watchdog {r['action']} (pid {r['pid']})")
    return 0 if pid is not None or action != "pid" else 3


def _agent(args: argparse.Namespace) -> int:
    """lab agent: start, stop or signal a host's agent; ``pid`` of none is exit 3."""
    import signal

    action = args.action
    if action == "start":
        pid = _daemons().start_agent(args.dir, args.host,
                                  ["--auto-takeover"] if args.auto_takeover else [])
    elif action == "pid":
        pid = _daemons().agent_pid(args.dir, args.host)
    else:
        sig = {"stop": signal.SIGTERM, "kill": signal.SIGKILL, "pause": signal.SIGSTOP,
               "resume": signal.SIGCONT}[action]
        pid = _daemons().signal_agent(args.dir, args.host, sig,
                                   wait=10.0 if action in ("stop", "kill") else 0.0)
    emit(args, {"host": args.host, "action": action, "pid": pid},
         lambda r: f"{r['host']}: agent {r['action']} (pid {r['pid']})")
    return 0 if pid is not None or action != "pid" else 3


def _activation_text(r: dict[str, Any]) -> str:
    return (f"{r['host']}: {r['vg']}/{r['lv']} on {r['device']} "
            f"({r['size_bytes']} bytes, {'read-only' if r['readonly'] else 'read-write'})")


def _activation(args: argparse.Namespace, cluster: Any) -> int:
    """lab activate|deactivate|refresh: through the host's agent if it runs, else directly.

    The agent claims an LV on the LUN before it maps it; without an agent (a
    lab with no cluster yet) the host's activator maps it directly.
    """
    from fenceless import config

    d = cluster.lab_dir(args.dir)
    host = cluster.find_host(d, cluster.read_state(d), args.host)
    cfg = config.load(host["config"])
    via_agent = not args.by_hand and _daemons().agent_pid(args.dir, args.host) is not None
    done = [_activate_one(args, cfg, lv, via_agent) for lv in args.lv]
    text = (lambda r: f"{r['host']}: {r['lv']} deactivated") \
        if args.lab_command == "deactivate" else _activation_text
    emit(args, done[0] if len(done) == 1 else done,
         text if len(done) == 1 else (lambda rs: "\n".join(text(r) for r in rs)))
    return 0


def _activate_one(args: argparse.Namespace, cfg: Any, lv: str, via_agent: bool
                  ) -> dict[str, Any]:
    from fenceless.ops.context import Context

    sub = args.lab_command
    if via_agent:
        res = agent_call(cfg, {"op": sub, "vg": args.vg, "lv": lv,
                               "readonly": getattr(args, "readonly", False)}, timeout=30.0)
        return {"host": args.host, **res}
    act = Context(cfg).activator(args.vg)
    if sub == "deactivate":
        act.deactivate(lv)
        return {"host": args.host, "lv": lv, "active": False}
    got = act.activate(lv, readonly=args.readonly) if sub == "activate" else act.refresh(lv)
    return {"host": args.host, "vg": got.vg, "lv": got.lv, "device": got.device,
            "size_bytes": got.size, "readonly": got.readonly}
