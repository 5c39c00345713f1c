#!/usr/bin/env python3
"""What a volume operation costs, and what forwarding it through the mailboxes adds (issue 4).

One lab: 3 hosts with real agents, N = 0.5 s, LUNs of 16G, two VGs: ``sanvg``
(the fenceless cluster: init on h1, which is the writer; h2 and h3 join) and
``dflt`` (a plain VG on its own LUN, driven by LVM with DEFAULT settings as in
bench_lvm.py configuration (a): an lvm.conf with only filter/global_filter,
``activation = 0`` and private locking/backup/archive dirs). Both VGs are
filled in bulk to 1000 LVs first (not measured).

1. Writer side: the whole ``fenceless volume create NAME 4M`` process on h1
   against the whole ``lvm lvcreate -an -Zn -L 4m -n NAME dflt`` process
   (default settings), interleaved. Goal: volume create <= 0.8 x lvcreate.
   Also the agent-side time alone: ``ipc.call(state_dir, {"op": "volume",
   ...})`` from this process to h1's agent (no CLI start-up).
2. The latency a non-writer adds: (h3's time) - (h1's time) for the same
   request, whole CLI processes and in-process ``ipc.call``, interleaved.
   "busy": back-to-back requests (the writer polls the inboxes every POLL);
   "idle": more than IDLE_AFTER s without an inbox change before each pair
   (the writer polls every IDLE_POLL). Goal: median <= 150 ms.
3. LVM processes per operation on the writer: h1's ``lvm_binary`` becomes a
   small sh wrapper that logs each command and execs /usr/sbin/lvm; h1's
   agent restarts and takes the writer role back; then create, extend,
   rename, remove, asked of h1 (local) and of h3 (forwarded). With the
   writer's lvm shell (lvm/shell.py) the wrapper sees only the shell start.
   Run last, as it restarts the writer's agent.
4. Where the time of one create goes: ``ipc.call`` creates that ask the agent
   for a profile (the journal's steps: LVM report, intent, LVM change, report
   after, outcome, audit, history), and the CLI's own share from part 1.
5. Throughput: --per-host (100) CLI creates from each of the 3 hosts at once,
   against as many bare lvcreates one after another on the writer.

The measuring runs inside h1's mount namespace (LVM's default hints file and
lock dir are h1's). The lab is always taken down (``finally``) and ``losetup
-a`` is checked for leftovers. The package is byte-compiled first and the
timed child processes run without PYTHONDONTWRITEBYTECODE, as an installed
fenceless does.

Needs root. Usage::

    bench/bench_volume.py            # full run (~6 min), appends to bench/results-volume.md
    bench/bench_volume.py --quick    # smoke run: 100 LVs, few repetitions, stdout only
    bench/bench_volume.py --repeat 21 --idle-reps 7 --output /tmp/r.md
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import (
    HERE,
    LVM,
    child_env,
    code_state,
    compile_package,
    lab,
    log,
    lvm_version,
    med,
    ms,
    p90,
    run_ok,
    start,
    take_down,
    wait_until,
)

from fenceless import config as cfgmod
from fenceless.agent import ipc
from fenceless.agent.mailbox import IDLE_AFTER, IDLE_POLL, POLL
from fenceless.ops.status import read_status

DEFAULT_OUTPUT = HERE / "results-volume.md"
VG = "sanvg"  # the fenceless cluster
VG_DEFAULT = "dflt"  # plain LVM, default settings
N = 0.5
HOSTS = 3
LUN_SIZE = "16G"
LV_SIZE = "4M"
MiB = 1 << 20
WRITER, REQUESTER = "h1", "h3"


def _load_bench_lvm() -> Any:
    """bench_lvm.py's configuration (a) and namespace helpers, so both benches use the same."""
    spec = importlib.util.spec_from_file_location("bench_lvm", HERE / "bench_lvm.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_lvm"] = mod  # its dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


BL = _load_bench_lvm()


# --- small helpers -------------------------------------------------------------------


# --- the lab ---------------------------------------------------------------------------


@dataclass
class Lab:
    dir: Path
    cli: str
    hosts: list[str]
    config_paths: dict[str, str]
    configs: dict[str, cfgmod.HostConfig]
    loops: dict[str, dict[str, str]]  # host -> VG -> loop device
    holder: dict[str, int]  # host -> pid holding its mount namespace
    default_sysdir: Path | None = None
    setup_seconds: float = 0.0
    fill_seconds: dict[str, float] = field(default_factory=dict)

    def state_dir(self, host: str) -> str:
        return self.configs[host].state_dir

    def all_live(self) -> bool:
        for obs in self.hosts:
            st = read_status(self.configs[obs], VG)
            if st["lease_source"] != "agent":
                return False
            if any(h["lease"] != "live" for h in st["hosts"]) or \
                    {h["name"] for h in st["hosts"]} != set(self.hosts):
                return False
        return True

    def writer(self) -> str | None:
        w = read_status(self.configs[self.hosts[-1]], VG)["writer"]
        return None if w is None or w.get("released") else str(w["host"])


def make_lab(cli: str, labdir: Path) -> Lab:
    t0 = time.perf_counter()
    state = json.loads(lab(cli, "up", "--dir", str(labdir), "--hosts", str(HOSTS), "--size",
                           LUN_SIZE, "--io-timeout", str(N), "--vg", VG, "--vg", VG_DEFAULT,
                           "--agents", "--json"))
    names = [h["name"] for h in state["hosts"]]
    paths = {h["name"]: h["config"] for h in state["hosts"]}
    lb = Lab(labdir, cli, names, paths, {h: cfgmod.load(p) for h, p in paths.items()},
             {h["name"]: dict(h["loops"]) for h in state["hosts"]},
             {h["name"]: int(h["holder_pid"]) for h in state["hosts"]})
    log(f"lab up in {labdir} ({time.perf_counter() - t0:.1f} s)")
    run_ok([cli, "-c", paths[WRITER], "init", "--vg", VG], "init", env=child_env())
    joins = [subprocess.Popen([cli, "-c", paths[h], "join", "--vg", VG], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=child_env())
             for h in names if h != WRITER]
    for p in joins:
        _out, err = p.communicate(timeout=120)
        if p.returncode != 0:
            raise RuntimeError(f"join failed (rc {p.returncode}): {err.strip()}")
    wait_until(lb.all_live, 90, "every host live in every host's status")
    if lb.writer() != WRITER:
        raise RuntimeError(f"expected {WRITER} to be the writer, got {lb.writer()}")
    lb.setup_seconds = time.perf_counter() - t0
    log(f"cluster on {VG}: init on {WRITER}, joins, all live ({lb.setup_seconds:.1f} s)")
    return lb


def fill_fenceless(lb: Lab, count: int) -> float:
    """``count`` LVs in sanvg through one ``lvm`` shell in h1's namespace (no backup/archive)."""
    lines = "".join(f'lvcreate -an -Zn -L 4m -n fill{i:05d} --config "backup{{backup=0 '
                    f'archive=0}}" {VG}\n' for i in range(1, count + 1))
    started = time.perf_counter()
    proc = subprocess.run([lb.cli, "lab", "exec", "--dir", str(lb.dir), WRITER, "--", "lvm"],
                          input=lines, capture_output=True, text=True, check=False,
                          env=child_env())
    made = proc.stdout.count("created.")
    if made != count:
        tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
        raise RuntimeError(f"the {VG} filler made {made} of {count} LVs: {tail}")
    return time.perf_counter() - started


def setup_default_vg(lb: Lab, tmp: Path, count: int) -> float:
    """Make VG dflt on h1's loop device of its LUN, with default LVM settings, and fill it.

    Runs inside h1's mount namespace (the caller's)."""
    device = lb.loops[WRITER][VG_DEFAULT]
    sysdir = BL.make_system_dir(tmp / "default-lvm",
                                BL.default_lvm_conf(tmp / "default-lvm", device))
    lb.default_sysdir = sysdir
    env = child_env(LVM_SYSTEM_DIR=str(sysdir), LVM_SUPPRESS_FD_WARNINGS="1", LC_ALL="C")
    run_ok([LVM, "pvcreate", "--metadatasize", "16m", device], "pvcreate", env=env)
    run_ok([LVM, "vgcreate", "-s", "4m", VG_DEFAULT, device], "vgcreate", env=env)
    filler = BL.make_system_dir(tmp / "fill-default", BL.filler_lvm_conf(tmp / "fill-default",
                                                                          device))
    lines = "".join(f"lvcreate -an -Zn -L 4m -n fill{i:05d} {VG_DEFAULT}\n"
                    for i in range(1, count + 1))
    started = time.perf_counter()
    proc = subprocess.run([LVM], input=lines, capture_output=True, text=True, check=False,
                          env=child_env(LVM_SYSTEM_DIR=str(filler), LVM_SUPPRESS_FD_WARNINGS="1",
                                        LC_ALL="C"))
    made = proc.stdout.count("created.")
    if made != count:
        tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
        raise RuntimeError(f"the {VG_DEFAULT} filler made {made} of {count} LVs: {tail}")
    return time.perf_counter() - started


def lv_count(lb: Lab, vg: str) -> int:
    """LVs in a VG (the control LV included), read with h1's LVM config, read-only."""
    sysdir = lb.default_sysdir if vg == VG_DEFAULT else lb.configs[WRITER].lvm_system_dir
    out = run_ok([LVM, "vgs", "--readonly", "--noheadings", "-o", "lv_count", vg], "vgs",
                 env=child_env(LVM_SYSTEM_DIR=str(sysdir), LVM_SUPPRESS_FD_WARNINGS="1",
                               LC_ALL="C")).stdout
    return int(out.strip())


# --- the timed operations -----------------------------------------------------------------


def timed_proc(argv: Sequence[str], env: dict[str, str], check: Callable[[str], bool]) -> float:
    started = time.perf_counter()
    proc = subprocess.run(list(argv), capture_output=True, text=True, env=env, check=False)
    wall = time.perf_counter() - started
    if proc.returncode != 0 or not check(proc.stdout):
        raise RuntimeError(f"{' '.join(argv[:6])}...: rc {proc.returncode}: "
                           f"{proc.stderr.strip()[:300] or proc.stdout[:300]}")
    return wall


def bare_lvcreate(lb: Lab, name: str) -> float:
    assert lb.default_sysdir is not None
    env = child_env(LVM_SYSTEM_DIR=str(lb.default_sysdir), LVM_SUPPRESS_FD_WARNINGS="1")
    return timed_proc([LVM, "lvcreate", "-an", "-Zn", "-L", "4m", "-n", name, VG_DEFAULT], env,
                      lambda out: "created" in out)


def cli_create(lb: Lab, host: str, name: str) -> float:
    return timed_proc([lb.cli, "-c", lb.config_paths[host], "volume", "create", "--vg", VG,
                       name, LV_SIZE], child_env(), lambda out: f"{name} is 4M" in out)


def volume_request(op: str, args: dict[str, Any], timeout: float = 60.0) -> dict[str, Any]:
    """The request `fenceless volume OP` sends to its local agent."""
    argv = ["fenceless", "volume", op, str(args["name"])]
    return {"op": "volume", "vg": VG, "timeout": timeout,
            "request": {"id": secrets.token_hex(8), "op": op, "args": args,
                        "user": "bench", "argv": argv}}


def ipc_op(lb: Lab, host: str, op: str, args: dict[str, Any]) -> tuple[float, dict[str, Any]]:
    req = volume_request(op, args)
    started = time.perf_counter()
    res = ipc.call(lb.state_dir(host), req, timeout=65.0)
    return time.perf_counter() - started, res


def ipc_create(lb: Lab, host: str, name: str) -> float:
    took, res = ipc_op(lb, host, "create", {"name": name, "size_bytes": 4 * MiB,
                                            "shared_ro": False})
    if res.get("name") != name or res.get("size_bytes") != 4 * MiB:
        raise RuntimeError(f"unexpected reply to create {name}: {res}")
    return took


# --- 1. writer side --------------------------------------------------------------------------


def measure_writer(lb: Lab, reps: int) -> dict[str, list[float]]:
    ops: dict[str, Callable[[int], float]] = {
        "lvcreate": lambda i: bare_lvcreate(lb, f"b{i:04d}"),
        "cli": lambda i: cli_create(lb, WRITER, f"w-cli-{i:04d}"),
        "ipc": lambda i: ipc_create(lb, WRITER, f"w-ipc-{i:04d}"),
        "fwd": lambda i: cli_create(lb, REQUESTER, f"w-fwd-{i:04d}"),
    }
    for f in ops.values():  # warm-up: page cache, the agent's first look at the big VG
        f(9999)
    out: dict[str, list[float]] = {k: [] for k in ops}
    keys = list(ops)
    for i in range(reps):
        for k in keys[i % len(keys):] + keys[:i % len(keys)]:  # rotate: drift hits all alike
            out[k].append(ops[k](i))
    log("  " + "  ".join(f"{k} {ms(med(v))} ms" for k, v in out.items()))
    return out


# --- 4. where the time of one create goes -------------------------------------------------


def measure_profile(lb: Lab, reps: int) -> dict[str, list[float]]:
    """``ipc.call`` creates on the writer that ask its agent for a profile: the time of
    each step of the journal (ops/journal.py marks them), in ms, per run."""
    out: dict[str, list[float]] = {}
    for i in range(reps + 1):
        req = volume_request("create", {"name": f"p-{i:04d}", "size_bytes": 4 * MiB,
                                        "shared_ro": False})
        req["profile"] = True
        started = time.perf_counter()
        res = ipc.call(lb.state_dir(WRITER), req, timeout=65.0)
        total = (time.perf_counter() - started) * 1000
        steps = res.get("profile") or []
        if i == 0:
            continue  # warm-up
        for name, took in steps:
            out.setdefault(name, []).append(float(took))
        out.setdefault("agent: socket, queue, reply", []).append(
            total - sum(float(t) for _n, t in steps))
        out.setdefault("total (`ipc.call`)", []).append(total)
    return out


def profile_table(p: dict[str, list[float]], cli_extra: float | None) -> str:
    lines = ["| step | runs | median ms | p90 ms |", "|:---|---:|---:|---:|"]
    if cli_extra is not None:
        lines.append(f"| CLI process: start-up, imports, client (part 1: median CLI - median "
                     f"ipc) | — | {ms(cli_extra)} | — |")
    for name, v in p.items():
        lines.append(f"| {name} | {len(v)} | {med(v):.1f} | {p90(v):.1f} |")
    return "\n".join(lines)


# --- 5. throughput: 300 creates from 3 hosts against 300 bare lvcreates ---------------------


def measure_throughput(lb: Lab, per_host: int) -> dict[str, float]:
    """Seconds for ``per_host`` CLI creates from each host at once (one stream per host,
    each create a whole CLI process), and for as many bare lvcreates one after another."""
    import threading

    started = time.perf_counter()
    for i in range(per_host * HOSTS):
        bare_lvcreate(lb, f"t-bare-{i:04d}")
    bare = time.perf_counter() - started
    errors: list[str] = []

    def stream(host: str) -> None:
        try:
            for i in range(per_host):
                cli_create(lb, host, f"t-{host}-{i:04d}")
        except Exception as exc:  # reported below: the run does not count then
            errors.append(f"{host}: {exc}")

    threads = [threading.Thread(target=stream, args=(h,)) for h in lb.hosts]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    fenceless = time.perf_counter() - started
    if errors:
        raise RuntimeError("; ".join(errors))
    return {"bare": bare, "fenceless": fenceless, "count": per_host * HOSTS}


# --- 2. forwarding latency -------------------------------------------------------------------


@dataclass
class Pairs:
    h1: list[float] = field(default_factory=list)
    h3: list[float] = field(default_factory=list)

    @property
    def diffs(self) -> list[float]:
        return [b - a for a, b in zip(self.h1, self.h3, strict=True)]


def measure_forwarding(lb: Lab, reps: int, idle_reps: int) -> dict[str, Pairs]:
    how: dict[str, Callable[[str, str], float]] = {
        "cli": lambda host, name: cli_create(lb, host, name),
        "ipc": lambda host, name: ipc_create(lb, host, name),
    }
    out = {f"{series}/{m}": Pairs() for series in ("busy", "idle") for m in how}
    # busy: back-to-back; one untimed forwarded request first switches the writer to fast polls
    how["ipc"](REQUESTER, "f-warm")
    seq = [(m, h) for m in how for h in (WRITER, REQUESTER)]
    for i in range(reps):
        got: dict[tuple[str, str], float] = {}
        for m, h in seq[i % 4:] + seq[:i % 4]:
            got[(m, h)] = how[m](h, f"f-busy-{m}-{h}-{i:03d}")
        for m in how:
            out[f"busy/{m}"].h1.append(got[(m, WRITER)])
            out[f"busy/{m}"].h3.append(got[(m, REQUESTER)])
    for m in how:
        log(f"  busy {m}: h1 {ms(med(out[f'busy/{m}'].h1))} ms, h3 "
            f"{ms(med(out[f'busy/{m}'].h3))} ms, median diff {ms(med(out[f'busy/{m}'].diffs))} ms")
    # idle: no inbox change for > IDLE_AFTER s. A request on the writer itself does not
    # touch the inboxes, so the writer still polls at IDLE_POLL for the pair's second half.
    for i in range(idle_reps):
        for m, fn in how.items():
            time.sleep(IDLE_AFTER + 1.0)
            order = (WRITER, REQUESTER) if i % 2 == 0 else (REQUESTER, WRITER)
            got1 = {h: fn(h, f"f-idle-{m}-{h}-{i:03d}") for h in order}
            out[f"idle/{m}"].h1.append(got1[WRITER])
            out[f"idle/{m}"].h3.append(got1[REQUESTER])
            log(f"  idle {m} #{i + 1}: h1 {ms(got1[WRITER])} ms, h3 {ms(got1[REQUESTER])} ms")
    return out


# --- 3. LVM processes per operation --------------------------------------------------------

WRAPPER = """#!/bin/sh
# bench_volume.py: log each LVM command (the --config text elided), then run the real lvm.
line=""
skip=0
for a in "$@"; do
    if [ "$skip" = 1 ]; then skip=0; line="$line '...'"; continue; fi
    [ "$a" = --config ] && skip=1
    line="$line $a"
done
printf '%s\\n' "${{line# }}" >> {log}
exec {lvm} "$@"
"""


def calls_log(path: Path) -> list[str]:
    try:
        return path.read_text().splitlines()
    except FileNotFoundError:
        return []


def restart_writer_with_wrapper(lb: Lab, tmp: Path) -> Path:
    """h1's lvm_binary -> a counting wrapper; restart h1's agent; h1 takes the writer back."""
    counter = tmp / "lvm-calls.log"
    wrapper = tmp / "lvm-counting"
    wrapper.write_text(WRAPPER.format(log=counter, lvm=LVM))
    wrapper.chmod(0o755)
    path = Path(lb.config_paths[WRITER])
    text = path.read_text()
    lines = [ln for ln in text.splitlines() if not ln.startswith("lvm_binary")]
    lines.insert(1, f'lvm_binary = "{wrapper}"')
    path.write_text("\n".join(lines) + "\n")
    lb.configs[WRITER] = cfgmod.load(str(path))
    t0 = time.perf_counter()
    lab(lb.cli, "agent", "--dir", str(lb.dir), WRITER, "stop")
    lab(lb.cli, "agent", "--dir", str(lb.dir), WRITER, "start")
    run_ok([lb.cli, "-c", lb.config_paths[WRITER], "writer", "takeover", "--vg", VG, "--wait",
            "--timeout", "120"], "writer takeover on h1", env=child_env())
    wait_until(lambda: lb.writer() == WRITER and lb.all_live(), 60,
               f"{WRITER} writer again and every host live")
    log(f"  {WRITER}'s agent restarted with lvm_binary = {wrapper}; writer again "
        f"({time.perf_counter() - t0:.1f} s)")
    return counter


@dataclass
class OpCalls:
    op: str
    origin: str
    calls: list[list[str]] = field(default_factory=list)  # per run: the logged commands
    seconds: list[float] = field(default_factory=list)  # ipc.call time per run


def measure_lvm_calls(lb: Lab, tmp: Path, reps: int, background_s: float) -> dict[str, Any]:
    counter = restart_writer_with_wrapper(lb, tmp)
    time.sleep(2 * N)
    n0, t0 = len(calls_log(counter)), time.monotonic()
    time.sleep(background_s)
    bg = calls_log(counter)[n0:]
    bg_window = time.monotonic() - t0
    log(f"  background: {len(bg)} LVM processes in {bg_window:.1f} s")
    results: dict[tuple[str, str], OpCalls] = {}
    for origin in (WRITER, REQUESTER):
        for i in range(reps):
            name = f"c-{origin}-{i:02d}"
            steps: list[tuple[str, dict[str, Any]]] = [
                ("create", {"name": name, "size_bytes": 4 * MiB, "shared_ro": False}),
                ("extend", {"name": name, "size_bytes": 4 * MiB, "relative": True}),
                ("rename", {"name": name, "new_name": name + "-r"}),
                ("remove", {"name": name + "-r"}),
            ]
            for op, args in steps:
                entry = results.setdefault((op, origin), OpCalls(op, origin))
                before = len(calls_log(counter))
                took, res = ipc_op(lb, origin, op, args)
                if op == "extend" and res.get("size_bytes") != 8 * MiB:
                    raise RuntimeError(f"extend of {name}: unexpected reply {res}")
                entry.calls.append(calls_log(counter)[before:])
                entry.seconds.append(took)
    if not any(c for r in results.values() for c in r.calls):
        raise RuntimeError(f"the wrapper logged no LVM call: is {WRITER}'s agent using it?")
    return {"background": bg, "background_s": bg_window, "ops": list(results.values()),
            "wrapper": WRAPPER.format(log="LOG", lvm=LVM)}


# --- report ----------------------------------------------------------------------------------


def writer_table(w: dict[str, list[float]]) -> str:
    base = med(w["lvcreate"])
    rows = [("bare `lvm lvcreate -an -Zn -L 4m` (default LVM settings, VG dflt)", "lvcreate"),
            ("`fenceless volume create NAME 4M` on h1 (whole CLI process)", "cli"),
            ("agent side: `ipc.call` to h1's agent from the bench process", "ipc"),
            ("`fenceless volume create NAME 4M` on h3, forwarded (whole CLI process)", "fwd")]
    lines = ["| what | runs | median ms | p90 ms | median / bare lvcreate |",
             "|:---|---:|---:|---:|---:|"]
    for label, k in rows:
        ratio = f"{med(w[k]) / base:.2f}"
        if k == "cli":
            ratio = f"**{ratio}** (goal ≤ 0.8)"
        elif k == "fwd":
            ratio = f"**{ratio}** (goal ≤ 1.0)"
        lines.append(f"| {label} | {len(w[k])} | {ms(med(w[k]))} | {ms(p90(w[k]))} | {ratio} |")
    return "\n".join(lines)


def forwarding_table(f: dict[str, Pairs]) -> str:
    lines = ["| series | measured as | pairs | h1 median ms | h3 median ms "
             "| median(h3) - median(h1) ms | median of paired diffs ms | p90 of paired diffs ms "
             "| max paired diff ms |",
             "|:---|:---|---:|---:|---:|---:|---:|---:|---:|"]
    label = {"cli": "whole CLI process", "ipc": "`ipc.call` in-process"}
    for key, p in f.items():
        if not p.h1:
            continue
        series, m = key.split("/")
        d = p.diffs
        lines.append(f"| {series} | {label[m]} | {len(d)} | {ms(med(p.h1))} | {ms(med(p.h3))} "
                     f"| {ms(med(p.h3) - med(p.h1))} | **{ms(med(d))}** | {ms(p90(d))} "
                     f"| {ms(max(d))} |")
    return "\n".join(lines)


def calls_table(c: dict[str, Any]) -> str:
    lines = ["| operation | asked of | runs | LVM processes per op | commands (per op) "
             "| `ipc.call` median ms |",
             "|:---|:---|---:|:---:|:---|---:|"]
    for r in c["ops"]:
        counts = [len(x) for x in r.calls]
        per = str(counts[0]) if min(counts) == max(counts) else f"{min(counts)}-{max(counts)}"
        kinds: Counter[str] = Counter()
        for x in r.calls:
            kinds.update(cmd_kind(line) for line in x)
        cmds = ", ".join(f"`{k}` x{v / len(r.calls):g}" for k, v in sorted(kinds.items()))
        where = "h1 (writer, local)" if r.origin == WRITER else "h3 (forwarded)"
        lines.append(f"| {r.op} | {where} | {len(r.calls)} | **{per}** | {cmds or 'none'} "
                     f"| {ms(med(r.seconds))} |")
    return "\n".join(lines)


def cmd_kind(line: str) -> str:
    words = line.split()
    if not words:
        return "?"
    return words[0] + (" --readonly" if "--readonly" in words else "")


def sample_commands(c: dict[str, Any]) -> list[str]:
    seen: dict[str, str] = {}
    for r in c["ops"]:
        for x in r.calls:
            for line in x:
                seen.setdefault(cmd_kind(line), line)
    return [re_names(v) for _k, v in sorted(seen.items())]


def re_names(line: str) -> str:
    return line if len(line) < 400 else line[:400] + " ..."


def agent_log_notes(lb: Lab) -> list[str]:
    notes = []
    for h in lb.hosts:
        path = lb.dir / "hosts" / h / "agent.log"
        try:
            text = path.read_text()
        except OSError:
            continue
        bad = [ln for ln in text.splitlines()
               if "WARNING" in ln or "error" in ln.lower() or "refused" in ln.lower()]
        if bad:
            notes.append(f"{h}: {len(bad)} line(s), e.g. `{bad[0][:200]}`")
    return notes


def report(args: argparse.Namespace, lb: Lab, w: dict[str, list[float]] | None,
           f: dict[str, Pairs] | None, c: dict[str, Any] | None, info: dict[str, Any],
           prof: dict[str, list[float]] | None = None,
           tp: dict[str, float] | None = None) -> str:
    when = time.strftime("%Y-%m-%d %H:%M %Z")
    load = os.getloadavg()
    out = [f"## {when}: `{' '.join(['bench/bench_volume.py', *args.argv])}`", "",
           f"Code: {info['code']}", "",
           f"LVM {lvm_version()} · kernel {platform.release()} · {os.cpu_count()} CPUs · "
           f"load average at the start {info['load0'][0]:.2f}, at the end {load[0]:.2f} · "
           f"run time {info['total']:.0f} s (lab and cluster set-up {lb.setup_seconds:.0f} s; "
           f"filling {args.lvs} LVs: {VG} {lb.fill_seconds.get(VG, 0):.0f} s, {VG_DEFAULT} "
           f"{lb.fill_seconds.get(VG_DEFAULT, 0):.0f} s) · lab: {HOSTS} hosts with agents, "
           f"N = {N} s, LUNs {LUN_SIZE}, VG {VG} (fenceless; h1 writer) and VG {VG_DEFAULT} "
           "(plain LVM) on separate LUN images · LVs in each VG before the timed creates: "
           f"{args.lvs} (+ the control LV in {VG}); at the end {info.get('end_counts')}", ""]
    if w is not None:
        out += [f"### 1. Writer side: `volume create` on h1 (and forwarded from h3) against "
                f"a bare `lvcreate`, {args.lvs} LVs", "",
                f"{args.repeat} runs each, interleaved (rotating order), after one untimed "
                "warm-up each; wall-clock from start to exit, output read from a pipe. "
                "Every run creates a new 4 MiB LV, so the VGs grow by one LV per run.", "",
                writer_table(w), "",
                f"- CLI start-up and client side: median CLI - median `ipc.call` = "
                f"{ms(med(w['cli']) - med(w['ipc']))} ms.",
                "- Bare `lvcreate`: plain `/usr/sbin/lvm`, LVM_SYSTEM_DIR with only the lvm.conf "
                "of bench_lvm.py configuration (a) (filter/global_filter for h1's loop device "
                "of the dflt LUN, `activation = 0`, private locking/backup/archive dirs: "
                "backup and archive on, use_aio, hints and udev at their defaults).", ""]
    if f is not None:
        out += ["### 2. What a request from a non-writer host adds", "",
                f"Each pair: the same `volume create NAME 4M` asked of h1 (the writer: runs in "
                f"its agent) and of h3 (forwarded: h3's agent writes its inbox sector; the "
                f"writer polls the inboxes, runs it, writes h3's outbox; h3's agent polls its "
                f"outbox). Poll intervals: the writer every {POLL * 1000:.0f} ms while requests "
                f"come in, every {IDLE_POLL * 1000:.0f} ms after {IDLE_AFTER:.0f} s without an "
                f"inbox change; the requester every {POLL * 1000:.0f} ms. Goal: median ≤ 150 ms.",
                "",
                f"- *busy*: {args.repeat} rounds of four back-to-back requests (CLI h1, CLI h3, "
                "ipc h1, ipc h3; the order rotates each round).",
                f"- *idle*: {args.idle_reps} pairs per method, each after {IDLE_AFTER + 1:.0f} s "
                "of sleep (no inbox change for > 10 s); within a pair h1 and h3 alternate which "
                "goes first (a request on the writer itself does not touch the inboxes, so the "
                "writer is still in its idle poll for the second one).", "",
                forwarding_table(f), "",
                "- A rough expectation: the writer finds a new request after half a poll "
                "interval on average and the requester its reply after half of its own, so "
                f"≈ {POLL * 1000:.0f} ms busy and ≈ {(IDLE_POLL + POLL) / 2 * 1000:.0f} ms idle, "
                "plus the mailbox writes and reads.", ""]
    if c is not None:
        bg = c["background"]
        out += ["### 3. LVM processes per operation on the writer", "",
                f"h1's config got `lvm_binary = <wrapper>` (a sh script that logs the command "
                f"and execs {LVM}); h1's agent was restarted and took the writer role back. "
                f"Each run: create, extend (+4M), rename, remove of one 4 MiB LV through "
                f"`ipc.call` (the ops of one run back-to-back), asked of h1 (local) or of h3 "
                f"(forwarded). The LVM commands counted for an operation are the lines the "
                f"wrapper logged between the request and its reply. Background (no request): "
                f"{len(bg)} LVM processes in {c['background_s']:.1f} s"
                + (f" ({', '.join(sorted(set(cmd_kind(b) for b in bg)))})" if bg else "")
                + ".", "",
                calls_table(c), "",
                "- The `ipc.call` times include the wrapper's cost (one `sh` per LVM process, "
                "a few ms each); part 1 has the unwrapped numbers.",
                "- bench_lvm.py's `lvcreate` baseline is 1 LVM process per operation.", "",
                "Commands as logged (one example each; `'...'` is the adapter's `--config` "
                "text):", "", "```", *sample_commands(c), "```", ""]
    if prof is not None:
        cli_extra = med(w["cli"]) - med(w["ipc"]) if w is not None else None
        out += ["### 4. Where the time of one create goes (writer side)", "",
                f"{len(prof.get('total (`ipc.call`)', []))} creates through `ipc.call` on h1 "
                "that ask the agent for a profile: the journal marks the end of each step "
                "with the agent's clock (`ops/journal.py`, `Journal.mark`). The writer runs "
                "its LVM commands in its long-lived lvm shell (`lvm/shell.py`); a report is "
                "reused while LVM's metadata header on the PV is unchanged.", "",
                profile_table(prof, cli_extra), ""]
    if tp is not None:
        ratio = tp["fenceless"] / tp["bare"]
        out += ["### 5. Throughput: creates from three hosts at once", "",
                f"{tp['count']} creates: {tp['count'] // HOSTS} `fenceless volume create` "
                f"CLI processes from each of {', '.join(lb.hosts)} at once (one stream per "
                "host; h1 runs its own in its agent, the others go through the mailboxes), "
                f"against {tp['count']} bare `lvcreate` processes one after another in VG "
                f"{VG_DEFAULT}. Goal: fenceless takes less time.", "",
                "| what | creates | seconds | per create ms | fenceless / bare |",
                "|:---|---:|---:|---:|---:|",
                f"| bare `lvcreate`, one after another | {tp['count']} | {tp['bare']:.1f} | "
                f"{tp['bare'] / tp['count'] * 1000:.1f} | — |",
                f"| fenceless, 3 hosts at once | {tp['count']} | {tp['fenceless']:.1f} | "
                f"{tp['fenceless'] / tp['count'] * 1000:.1f} | **{ratio:.2f}** |", ""]
    notes = agent_log_notes(lb)
    if notes:
        out += ["Agent logs (warnings, errors, refusals during the run): "
                + "; ".join(notes), ""]
    return "\n".join(out) + "\n"


# --- main --------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lvs", type=int, default=1000, help="LVs in each VG before timing")
    p.add_argument("--repeat", type=int, default=15,
                   help="timed runs per series in parts 1 and 2 (busy)")
    p.add_argument("--idle-reps", type=int, default=5, help="idle pairs per method (part 2)")
    p.add_argument("--op-reps", type=int, default=5,
                   help="runs of create/extend/rename/remove per origin (part 3)")
    p.add_argument("--background", type=float, default=5.0,
                   help="seconds of idle LVM-call counting (part 3)")
    p.add_argument("--parts", default="1,2,3,4,5",
                   help="which parts to run (default 1,2,3,4,5)")
    p.add_argument("--per-host", type=int, default=100,
                   help="creates from each host in the throughput part (5)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 100 LVs, few repetitions; no results file unless --output")
    p.add_argument("--output", help=f"markdown file to append a section to (default: "
                   f"{DEFAULT_OUTPUT}; '-' for none)")
    args = p.parse_args(argv)
    args.argv = argv
    if args.quick:
        args.lvs, args.repeat, args.idle_reps, args.op_reps, args.background = 100, 4, 1, 1, 2.0
        args.per_host = 5
        args.output = args.output or "-"
    args.output = args.output or str(DEFAULT_OUTPUT)
    if args.repeat < 2 or args.idle_reps < 1 or args.op_reps < 1 or args.lvs < 1:
        p.error("--repeat must be at least 2; --idle-reps, --op-reps, --lvs at least 1")
    args.part_set = {x.strip() for x in args.parts.split(",") if x.strip()}
    if not args.part_set or not args.part_set <= {"1", "2", "3", "4", "5"}:
        p.error("--parts takes a list of 1, 2, 3, 4, 5")
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    cli = start()
    if cli is None:
        return 2
    t0 = time.perf_counter()
    started_wall = time.time()
    info: dict[str, Any] = {"load0": os.getloadavg(), "code": code_state()}
    compile_package()
    tmp = Path(tempfile.mkdtemp(prefix="fenceless-bench-volume-"))
    labdir = tmp / "lab"
    w = f = c = prof = tp = None
    lb: Lab | None = None
    try:
        lb = make_lab(cli, labdir)
        lb.fill_seconds[VG] = fill_fenceless(lb, args.lvs)
        with BL.in_mount_namespace(lb.holder[WRITER]):
            lb.fill_seconds[VG_DEFAULT] = setup_default_vg(lb, tmp, args.lvs)
            counts = {vg: lv_count(lb, vg) for vg in (VG, VG_DEFAULT)}
            log(f"filled: {counts} LVs ({VG} includes the control LV) in "
                f"{lb.fill_seconds[VG]:.1f} + {lb.fill_seconds[VG_DEFAULT]:.1f} s")
            if "1" in args.part_set:
                log("part 1: writer side")
                w = measure_writer(lb, args.repeat)
            if "2" in args.part_set:
                log("part 2: forwarding latency")
                f = measure_forwarding(lb, args.repeat, args.idle_reps)
            if "4" in args.part_set:
                log("part 4: where the time of one create goes")
                prof = measure_profile(lb, args.repeat)
            if "5" in args.part_set:
                log(f"part 5: throughput, {args.per_host} creates from each host")
                tp = measure_throughput(lb, args.per_host)
                log(f"  bare {tp['bare']:.1f} s, fenceless {tp['fenceless']:.1f} s")
            if "3" in args.part_set:  # last: it restarts the writer's agent with a wrapper
                log("part 3: LVM processes per operation")
                c = measure_lvm_calls(lb, tmp, args.op_reps, args.background)
            info["end_counts"] = {vg: lv_count(lb, vg) for vg in (VG, VG_DEFAULT)}
        info["total"] = time.perf_counter() - t0
        changed = sorted(str(p.relative_to(HERE.parent))
                         for p in (HERE.parent / "src").rglob("*.py")
                         if p.stat().st_mtime > started_wall)
        if changed:
            info["code"] += (". **Warning: these files changed while the bench ran**: "
                             + ", ".join(f"`{x}`" for x in changed))
        text = report(args, lb, w, f, c, info, prof, tp)
    finally:
        left = take_down(cli, labdir, tmp)
        if not left:
            shutil.rmtree(tmp, ignore_errors=True)
    if left:
        return 1
    print(text, end="")
    if args.output != "-":
        path = Path(args.output)
        head = "" if path.exists() else (
            "# Volume operation benchmarks (issue 4)\n\nGenerated by `bench/bench_volume.py`; "
            "each run appends a section (newest last). See bench/README.md.\n\n")
        with open(path, "a") as fh:
            fh.write(head + text + "\n")
        log(f"appended to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
