#!/usr/bin/env python3
"""What the control area costs and how fast it moves the writer role (issue 3).

Three measurements, each on a lab with one real agent per host:

1. ``status`` against ``lvs``, with 16 hosts and 2000 LVs (N = 0.5 s).
   (a) The whole ``fenceless -c h2.toml status`` process against the whole
       ``lvs`` process as an admin runs it on h2: plain ``lvm lvs sanvg``
       (LVM_SYSTEM_DIR = h2's), and the adapter's ``lvs`` (``--readonly``
       JSON report, the adapter's ``--config``), built by ``Lvm.argv``.
       Goal: status <= 0.5 x lvs.
   (b) ``read_status(cfg, None)`` in-process (after one warm-up call), against
       one ``lvs`` process. Goal: >= 10 x faster.
   Diagnosis: ``python -X importtime`` of the status process, ``python -c
   pass`` from the same venv, and the CPU the lab's agents burn meanwhile.
2. Takeover time after the writer's agent is SIGKILLed (4 hosts, N = 0.2 s):
   (i) automatic (agents run ``--auto-takeover``): from the kill until the
   leader sector on disk names another host at a higher epoch; (ii) manual:
   ``fenceless writer takeover --wait`` on two other hosts at once, from the
   kill until one returns success. Goal: <= 14 N.
3. Bytes read and written per renewal, for a reader and for the writer, with
   max_hosts 16: the real agents of h1 (writer) and h2 stop, and two
   ``Agent`` objects with their configs run their VG threads in this process
   through a counting ``BlockDevice``.

Every lab is taken down in a ``finally`` and ``losetup -a`` is checked for
leftovers. The timed child processes run without PYTHONDONTWRITEBYTECODE, so
they use .pyc files as an installed fenceless does.

Needs root. Usage::

    bench/bench_control.py            # full run, appends a section to bench/results-control.md
    bench/bench_control.py --quick    # smoke run: 4 hosts, 100 LVs, few repetitions, stdout only
    bench/bench_control.py --output /tmp/r.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

from common import (
    HERE,
    LVM,
    child_env,
    code_state,
    lab,
    lab_loops,
    log,
    med,
    p90,
    start,
    take_down,
    wait_until,
)

from fenceless import config as cfgmod
from fenceless.agent.daemon import Agent
from fenceless.agent.vg import VgAgent
from fenceless.blockio import BlockDevice, device_size, open_device
from fenceless.clock import SystemClock
from fenceless.config import HostConfig
from fenceless.control.anchor import read_anchor
from fenceless.control.area import ControlArea
from fenceless.lab import daemons
from fenceless.lease.delta import decode_host
from fenceless.localstate import agent_view
from fenceless.lvm import parse
from fenceless.lvm.adapter import REPORT_OPTS
from fenceless.ops.context import Context
from fenceless.ops.status import read_status
from fenceless.runner import RecordingRunner

DEFAULT_OUTPUT = HERE / "results-control.md"
VG = "sanvg"
N_STATUS = 0.5  # io_timeout of the status / renewal lab
N_TAKEOVER = 0.2  # io_timeout of the takeover lab
TAIL = 1 << 20  # the LUN's last MiB: anchor and init lock
CLK_TCK = os.sysconf("SC_CLK_TCK")


# --- small helpers -------------------------------------------------------------------


def ms(x: float) -> str:
    return f"{x * 1000:.1f}" if x < 1 else f"{x * 1000:.0f}"


def on(cli: str, cfg_path: str, *words: str) -> str:
    proc = subprocess.run([cli, "-c", cfg_path, *words], capture_output=True, text=True,
                          check=False, env=child_env())
    if proc.returncode != 0:
        raise RuntimeError(f"fenceless {' '.join(words)} ({cfg_path}) failed "
                           f"(rc {proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


@dataclass
class Cluster:
    """A lab whose hosts all joined one cluster on VG sanvg."""

    dir: Path
    n: float
    hosts: list[str]
    config_paths: dict[str, str]
    configs: dict[str, HostConfig]
    devices: dict[str, str]
    setup_seconds: float = 0.0
    ids: dict[str, int] = field(default_factory=dict)  # host name -> host id (join order)

    def all_live(self, observers: Sequence[str] | None = None) -> bool:
        """Every host LIVE in every observer's status (lease states from its agent)."""
        for obs in observers or self.hosts:
            st = read_status(self.configs[obs], None)
            if st["lease_source"] != "agent":
                return False
            seen = {h["name"]: h["lease"] for h in st["hosts"]}
            if any(seen.get(h) != "live" for h in self.hosts):
                return False
        return True

    def wait_all_live(self, timeout: float) -> None:
        wait_until(self.all_live, timeout, "every host live in every host's status", 0.1)


def make_cluster(cli: str, labdir: Path, hosts: int, size: str, n: float,
                 auto_takeover: bool) -> Cluster:
    """lab up with agents, init on h1, join on all others at once, wait until all are live."""
    t0 = time.perf_counter()
    extra = ["--auto-takeover"] if auto_takeover else []
    state = json.loads(lab(cli, "up", "--dir", str(labdir), "--hosts", str(hosts), "--size",
                           size, "--io-timeout", str(n), "--agents", *extra, "--json"))
    names = [h["name"] for h in state["hosts"]]
    paths = {h["name"]: h["config"] for h in state["hosts"]}
    c = Cluster(labdir, n, names, paths, {h: cfgmod.load(p) for h, p in paths.items()},
                {h["name"]: h["loops"][VG] for h in state["hosts"]})
    log(f"lab up in {labdir}: {hosts} hosts, agents running ({time.perf_counter() - t0:.1f} s)")
    on(cli, paths[names[0]], "init")
    joins = [subprocess.Popen([cli, "-c", paths[h], "join"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=child_env())
             for h in names[1:]]
    for h, p in zip(names[1:], joins, strict=True):
        _out, err = p.communicate(timeout=120)
        if p.returncode != 0:
            raise RuntimeError(f"join on {h} failed (rc {p.returncode}): {err.strip()}")
    c.wait_all_live(60 + 30 * n)
    c.setup_seconds = time.perf_counter() - t0
    c.ids = {h["name"]: h["id"] for h in read_status(c.configs[names[0]], None)["hosts"]}
    log(f"cluster: init on {names[0]}, {len(names) - 1} joins, all live "
        f"({c.setup_seconds:.1f} s)")
    return c


# --- 1. status against lvs ---------------------------------------------------------------


def fill_lvs(cli: str, c: Cluster, count: int) -> float:
    """``count`` LVs through one ``lvm`` shell in h1's namespace (archive/backup off)."""
    lines = "".join(f'lvcreate -an -Zn -L 4m -n lv{i:04d} --config "backup{{backup=0 '
                    f'archive=0}}" {VG}\n' for i in range(1, count + 1))
    started = time.perf_counter()
    proc = subprocess.run([cli, "lab", "exec", "--dir", str(c.dir), c.hosts[0], "--", "lvm"],
                          input=lines, capture_output=True, text=True, check=False,
                          env=child_env())
    took = time.perf_counter() - started
    made = proc.stdout.count("created.")
    if made != count:
        tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
        raise RuntimeError(f"the filler made {made} of {count} LVs (rc {proc.returncode}): {tail}")
    return took


def lv_count(c: Cluster, host: str) -> int:
    env = child_env(LC_ALL="C", LVM_SUPPRESS_FD_WARNINGS="1",
                    LVM_SYSTEM_DIR=str(c.configs[host].lvm_system_dir))
    out = subprocess.run([LVM, "vgs", "--noheadings", "-o", "lv_count", VG],
                         capture_output=True, text=True, env=env, check=True).stdout
    return int(out.strip())


@dataclass
class ProcSample:
    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)  # user+sys of the process and its children


def timed_proc(argv: Sequence[str], env: dict[str, str], sample: ProcSample | None,
               check: Callable[[str], bool]) -> str:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    proc = subprocess.run(list(argv), capture_output=True, text=True, env=env, check=False)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0 or not check(proc.stdout):
        raise RuntimeError(f"{argv[0]} {argv[1]}: rc {proc.returncode}, unexpected output: "
                           f"{proc.stderr.strip()[:300] or proc.stdout[:300]}")
    if sample is not None:
        sample.wall.append(wall)
        sample.cpu.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    return proc.stdout


def proc_cpu(pids: Sequence[int]) -> float:
    """CPU seconds used so far by these processes and their reaped children."""
    total = 0
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        total += sum(int(x) for x in fields[11:15])  # utime stime cutime cstime
    return total / CLK_TCK


def import_total_ms(stderr: str) -> float:
    """The sum of the 'self' column of ``-X importtime``: all import time, in ms."""
    total = 0
    for line in stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            first = line.split(":", 1)[1].split("|")[0].strip()
            if first.isdigit():
                total += int(first)
    return total / 1000


def top_imports(stderr: str, k: int = 8) -> list[tuple[str, float]]:
    """The modules of ``-X importtime`` that took longest on their own (self ms)."""
    out = []
    for line in stderr.splitlines():
        if not line.startswith("import time:") or "|" not in line:
            continue
        own, _cum, name = line.split(":", 1)[1].split("|")
        if own.strip().isdigit():
            out.append((name.strip(), int(own) / 1000))
    return sorted(out, key=lambda x: -x[1])[:k]


def measure_status(cli: str, c: Cluster, args: argparse.Namespace) -> dict[str, Any]:
    host = c.hosts[1]
    cfg = c.configs[host]
    lvm = Context(cfg).lvm(VG)
    argvs: dict[str, tuple[list[str], dict[str, str], Callable[[str], bool]]] = {
        "status": ([cli, "-c", c.config_paths[host], "status"], child_env(),
                   lambda out: "writer:" in out),
        "lvs (plain)": ([LVM, "lvs", VG],
                        child_env(LVM_SYSTEM_DIR=str(cfg.lvm_system_dir),
                                  LVM_SUPPRESS_FD_WARNINGS="1"),
                        lambda out: len(out.splitlines()) > args.lvs),
        "lvs (adapter)": (lvm.argv("lvs", [*REPORT_OPTS, "-o", ",".join(parse.LV_FIELDS), VG]),
                          child_env(LC_ALL="C", **lvm.env()),
                          lambda out: len(parse.parse_lvs(out)) > args.lvs),
    }
    samples = {k: ProcSample() for k in argvs}
    for argv, env, check in argvs.values():  # warm-up: page cache, .pyc files
        timed_proc(argv, env, None, check)
    agents = [p for h in c.hosts if (p := daemons.agent_pid(str(c.dir), h)) is not None]
    cpu0, t0 = proc_cpu(agents), time.perf_counter()
    keys = list(argvs)
    for i in range(args.repeat):
        for k in keys[i % 3:] + keys[:i % 3]:  # rotate the order: drift hits all alike
            argv, env, check = argvs[k]
            timed_proc(argv, env, samples[k], check)
    agent_load = (proc_cpu(agents) - cpu0) / (time.perf_counter() - t0)
    log("  " + "  ".join(f"{k} {ms(med(s.wall))} ms" for k, s in samples.items()))

    read_status(cfg, None)  # warm-up
    inproc: list[float] = []
    for _ in range(args.inproc):
        started = time.perf_counter()
        st = read_status(cfg, None)
        inproc.append(time.perf_counter() - started)
    assert len(st["hosts"]) == len(c.hosts), st["hosts"]
    log(f"  read_status in-process {med(inproc) * 1000:.2f} ms")

    imp_status: list[float] = []
    imp_pass: list[float] = []
    stderr = ""
    for _ in range(args.imports):
        proc = subprocess.run([sys.executable, "-X", "importtime", cli, "-c",
                               c.config_paths[host], "status"], capture_output=True, text=True,
                              env=child_env(), check=True)
        stderr = proc.stderr
        imp_status.append(import_total_ms(proc.stderr))
        proc = subprocess.run([sys.executable, "-X", "importtime", "-c", "pass"],
                              capture_output=True, text=True, env=child_env(), check=True)
        imp_pass.append(import_total_ms(proc.stderr))
    bare = ProcSample()
    for _ in range(args.repeat):
        timed_proc([sys.executable, "-c", "pass"], child_env(), bare, lambda _out: True)
    return {"host": host, "samples": samples, "inproc": inproc, "agent_load": agent_load,
            "agents": len(agents), "imp_status": med(imp_status), "imp_pass": med(imp_pass),
            "top_imports": top_imports(stderr), "bare": bare,
            "argv": {k: v[0] for k, v in argvs.items()}, "sysdir": cfg.lvm_system_dir}


# --- 3. bytes per renewal ----------------------------------------------------------------


class CountingDevice:
    """A BlockDevice that logs every request (time, op, offset, length) it passes on."""

    def __init__(self, dev: BlockDevice, log_: list[tuple[float, str, int, int]],
                 lock: threading.Lock) -> None:
        self.dev = dev
        self._log = log_
        self._lock = lock

    @property
    def path(self) -> str:
        return self.dev.path

    def read(self, offset: int, length: int) -> bytes:
        data = self.dev.read(offset, length)
        with self._lock:
            self._log.append((time.monotonic(), "read", offset, length))
        return data

    def write(self, offset: int, data: bytes) -> None:
        self.dev.write(offset, data)
        with self._lock:
            self._log.append((time.monotonic(), "write", offset, len(data)))

    def close(self) -> None:
        self.dev.close()


@dataclass
class Counted:
    """One in-process agent and the I/O it did."""

    host: str
    agent: Any = None  # the Agent, made after this (its opener is ours)
    io: list[tuple[float, str, int, int]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def vga(self) -> VgAgent:
        return self.agent.vgs[VG]

    def opener(self, path: str, writable: bool = False) -> BlockDevice:
        return CountingDevice(open_device(path, writable), self.io, self.lock)

    def window(self, t0: float, t1: float) -> list[tuple[float, str, int, int]]:
        with self.lock:
            return [x for x in self.io if t0 <= x[0] < t1]


def loop_sectors(device: str) -> tuple[int, int, int, int]:
    """(read ios, read bytes, write ios, write bytes) of a loop device, from sysfs."""
    name = os.path.basename(os.path.realpath(device))
    f = Path(f"/sys/block/{name}/stat").read_text().split()
    return int(f[0]), int(f[2]) * 512, int(f[4]), int(f[6]) * 512


def region_of(vga: VgAgent, offset: int) -> str:
    k = vga.keeper
    assert k.anchor is not None and k.area is not None
    rel = offset - k.anchor.offset
    if 0 <= rel < k.anchor.length:
        for r in k.area.layout.regions:
            if r.offset <= rel < r.end:
                return r.name
        return "control LV (unused)"
    if offset >= k.size - TAIL:
        return "anchor (LUN tail)"
    return "outside the control area (LVM's metadata header on the PV)"


def measure_renewal_io(cli: str, c: Cluster, args: argparse.Namespace) -> dict[str, Any]:
    writer, reader = c.hosts[0], c.hosts[1]
    st = read_status(c.configs[reader], None)
    if st["writer"] is None or st["writer"]["host"] != writer:
        raise RuntimeError(f"expected {writer} to be the writer: {st['writer']}")
    for h in (writer, reader):  # a planned stop: both release their leases
        lab(cli, "agent", "--dir", str(c.dir), h, "stop")
    runs: dict[str, Counted] = {}
    logs: list[str] = []
    try:
        for h in (writer, reader):
            run = Counted(h)
            run.agent = Agent(c.configs[h], opener=run.opener,
                              log=lambda m, h=h: logs.append(f"{h} {m}"))
            run.agent.ctx.runner = RecordingRunner()  # its LVM commands are counted below
            run.agent.lvm_version = run.agent.ctx.lvm(VG).version()
            runs[h] = run
            run.vga.thread.start()
        for run in runs.values():
            wait_until(lambda run=run: run.vga.keeper.lease is not None, 30 + 20 * c.n,
                       f"{run.host}'s in-process agent to hold its host id")
        res = runs[writer].vga.submit({"op": "takeover", "vg": VG, "wait": True}, 20 * c.n + 5)
        log(f"  in-process agents: {reader} reader, {writer} writer ({res['outcome']} epoch "
            f"{res['epoch']})")
        time.sleep(2 * 2 * c.n)  # let both settle into their steady rhythm
        t0 = time.monotonic()
        disk0 = {h: loop_sectors(c.devices[h]) for h in runs}
        calls0 = {h: len(r.agent.ctx.runner.calls) for h, r in runs.items()}
        time.sleep(args.renewals * 2 * c.n)
        t1 = time.monotonic()
        disk1 = {h: loop_sectors(c.devices[h]) for h in runs}
        calls1 = {h: list(r.agent.ctx.runner.calls) for h, r in runs.items()}
        out: dict[str, Any] = {}
        for h, run in runs.items():
            vga = run.vga
            k = vga.keeper
            assert k.lease is not None and k.area is not None and k.anchor is not None
            own = k.anchor.offset + k.area.hosts().sector_offset(k.lease.host_id)
            ios = run.window(t0, t1)
            stamps = [t for t, op, off, _n in ios if op == "write" and off == own]
            renewals = len(stamps)
            gaps = [b - a for a, b in pairwise(stamps)]
            per: dict[str, Counter[str]] = {}
            for _t, op, off, length in ios:
                cnt = per.setdefault(region_of(vga, off), Counter())
                cnt[op] += 1
                cnt[op + "_bytes"] += length
            d0, d1 = disk0[h], disk1[h]
            out[h] = {"role": "writer" if vga.port.epoch is not None else "reader",
                      "renewals": renewals, "seconds": t1 - t0, "regions": per,
                      "interval": (med(gaps), max(gaps)) if gaps else (0.0, 0.0),
                      "disk": tuple(b - a for a, b in zip(d0, d1, strict=True)),
                      "lvm": Counter(cmd[1] for cmd in calls1[h][calls0[h]:]),
                      "max_hosts": k.area.sb.max_hosts}
        return out
    finally:
        for run in runs.values():
            run.vga.stop.set()
        for run in runs.values():
            run.vga.thread.join(timeout=10)
            run.vga.shutdown()
            if run.vga.keeper.dev is not None:
                run.vga.keeper.dev.close()
        problems = [m for m in logs if "error" in m.lower() or "!!!" in m or "WARNING" in m]
        for m in problems[:10]:
            log(f"  agent log: {m}")


# --- 2. takeover -----------------------------------------------------------------------------


@dataclass
class Takeover:
    mode: str
    old: str
    new: str
    epoch: int
    seconds: float  # from the kill until success
    since_renewal: float  # from the dead writer's last renewal until success
    dead_seen: float | None  # from the kill until some agent published the writer DEAD
    note: str = ""


def leader_reader(c: Cluster, host: str) -> tuple[BlockDevice, ControlArea]:
    path = c.devices[host]
    dev = open_device(path)
    anchor = read_anchor(dev, device_size(path))
    assert anchor is not None
    return dev, ControlArea.open(dev, anchor, SystemClock())


def one_takeover(cli: str, c: Cluster, mode: str, rep: int) -> Takeover:
    observer = c.hosts[-1]
    st = read_status(c.configs[observer], None)
    w = st["writer"]
    old, old_id, epoch = w["host"], w["id"], w["epoch"]
    others = [h for h in c.hosts if h != old]
    watcher = others[-1]
    dev, area = leader_reader(c, watcher)
    try:
        pid = daemons.agent_pid(str(c.dir), old)
        assert pid is not None, f"{old} has no agent"
        racers = [others[rep % len(others)], others[(rep + 1) % len(others)]]
        os.kill(pid, signal.SIGKILL)
        t_kill = time.monotonic()
        procs: list[subprocess.Popen[str]] = []
        if mode == "manual":
            procs = [subprocess.Popen([cli, "-c", c.config_paths[h], "writer", "takeover",
                                       "--wait", "--json"], stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True, env=child_env())
                     for h in racers]
        done: dict[int, float] = {}
        dead_seen: float | None = None
        new_leader = None
        deadline = t_kill + 40 * c.n + 10
        while time.monotonic() < deadline:
            now = time.monotonic()
            if dead_seen is None:
                for h in others:
                    view = agent_view(c.configs[h].state_dir, VG) or {}
                    if view.get("hosts", {}).get(str(old_id), {}).get("state") == "dead":
                        dead_seen = now - t_kill
                        break
            if mode == "auto":
                leader = area.writer().read_leader()
                if leader is not None and not leader.free and leader.owner_id != old_id \
                        and leader.lver > epoch:
                    new_leader = leader
                    done[0] = now
                    break
            else:
                for i, p in enumerate(procs):
                    if i not in done and p.poll() is not None:
                        done[i] = now
                if len(done) == len(procs):
                    break
            time.sleep(0.02 if mode == "auto" else 0.005)
        raw = area.hosts().read_area()
        rec = decode_host(area.hosts().sector_of(raw, old_id), region="hosts", offset=0)
        last_renewal = rec.timestamp / 1000 if rec is not None else t_kill
        note = ""
        if mode == "auto":
            if new_leader is None:
                raise RuntimeError(f"auto takeover: no new leader within {40 * c.n + 10:.0f}s")
            t_done, new, new_epoch = done[0], new_leader.owner_name, new_leader.lver
        else:
            results = []
            for i, p in enumerate(procs):
                if i not in done:
                    p.kill()
                out, err = p.communicate(timeout=10)
                results.append((p.returncode, out, err))
            winners = [i for i, r in enumerate(results) if r[0] == 0]
            if len(winners) != 1:
                raise RuntimeError(f"manual takeover: {len(winners)} winners: {results}")
            i = winners[0]
            got = json.loads(results[i][1])
            t_done, new, new_epoch = done[i], got["host"], got["epoch"]
            loser = results[1 - i]
            note = f"other racer rc {loser[0]}"
            if loser[0] != 0 and "won the writer lease" not in loser[2]:
                note += f": {loser[2].strip()[:80]}"
            leader = area.writer().read_leader()
            if leader is None or leader.owner_name != new or leader.lver != new_epoch:
                raise RuntimeError(f"the leader on disk ({leader}) disagrees with {got}")
    finally:
        dev.close()
    if new_epoch != epoch + 1:
        note = (note + "; " if note else "") + f"epoch {epoch} -> {new_epoch}"
    return Takeover(mode, old, new, new_epoch, t_done - t_kill, t_done - last_renewal,
                    dead_seen, note)


def measure_takeover(cli: str, c: Cluster, reps: int) -> list[Takeover]:
    out: list[Takeover] = []
    for mode in ("auto", "manual"):
        if mode == "manual":
            # Agents without --auto-takeover from here on (the writer's is killed first).
            st = read_status(c.configs[c.hosts[-1]], None)
            for h in c.hosts:
                if h != st["writer"]["host"]:
                    lab(cli, "agent", "--dir", str(c.dir), h, "stop")
                    lab(cli, "agent", "--dir", str(c.dir), h, "start")
            c.wait_all_live(60 + 30 * c.n)
        for rep in range(reps):
            t = one_takeover(cli, c, mode, rep)
            out.append(t)
            log(f"  {mode} #{rep + 1}: {t.old} killed -> {t.new} at epoch {t.epoch} in "
                f"{t.seconds:.2f} s = {t.seconds / c.n:.1f} N"
                + (f" ({t.note})" if t.note else ""))
            extra = ["--auto-takeover"] if mode == "auto" else []
            lab(cli, "agent", "--dir", str(c.dir), t.old, "start", *extra)
            c.wait_all_live(60 + 40 * c.n)
    return out


# --- report ------------------------------------------------------------------------------


def status_table(r: dict[str, Any]) -> str:
    s = r["samples"]
    st = s["status"]
    lines = ["| process | median ms | p90 ms | CPU median ms | status / this (median) |",
             "|:---|---:|---:|---:|---:|"]
    for k, x in s.items():
        ratio = "—" if k == "status" else f"**{med(st.wall) / med(x.wall):.2f}x**"
        lines.append(f"| `{k}` | {ms(med(x.wall))} | {ms(p90(x.wall))} | {ms(med(x.cpu))} "
                     f"| {ratio} |")
    b = r["bare"]
    lines.append(f"| `python -c pass` (same venv) | {ms(med(b.wall))} | {ms(p90(b.wall))} "
                 f"| {ms(med(b.cpu))} | — |")
    return "\n".join(lines)


def inproc_table(r: dict[str, Any]) -> str:
    s = r["samples"]
    x = r["inproc"]
    lines = ["| what | median ms | p90 ms | lvs / this (median) |", "|:---|---:|---:|---:|",
             f"| `read_status(cfg, None)` in-process | {med(x) * 1000:.2f} | "
             f"{p90(x) * 1000:.2f} | — |"]
    for k in ("lvs (plain)", "lvs (adapter)"):
        lines.append(f"| one `{k}` process | {ms(med(s[k].wall))} | {ms(p90(s[k].wall))} "
                     f"| **{med(s[k].wall) / med(x):.0f}x** |")
    return "\n".join(lines)


def takeover_table(results: list[Takeover], n: float, ids: dict[str, int]) -> str:
    lines = ["| mode | runs | median s | max s | median N | max N | from the last renewal: "
             "median N / max N | kill → writer published DEAD: median N | outcomes |",
             "|:---|---:|---:|---:|---:|---:|---:|---:|:---|"]
    for mode, label in (("auto", "(i) automatic (`--auto-takeover`)"),
                        ("manual", "(ii) manual (`writer takeover --wait` on 2 hosts)")):
        rs = [t for t in results if t.mode == mode]
        if not rs:
            continue
        secs = [t.seconds for t in rs]
        since = [t.since_renewal for t in rs]
        dead = [t.dead_seen for t in rs if t.dead_seen is not None]
        moves = ", ".join(f"{t.old} (id {ids.get(t.old)}) → {t.new} (id {ids.get(t.new)})"
                          for t in rs)
        notes = sorted({t.note for t in rs if t.note})
        lines.append(
            f"| {label} | {len(rs)} | {med(secs):.2f} | {max(secs):.2f} | "
            f"**{med(secs) / n:.1f}** | **{max(secs) / n:.1f}** | "
            f"{med(since) / n:.1f} / {max(since) / n:.1f} | "
            f"{(f'{med(dead) / n:.1f} ({len(dead)} of {len(rs)} runs)' if dead else '—')} "
            f"| {moves}"
            + (f"; {'; '.join(notes)}" if notes else "") + " |")
    return "\n".join(lines)


def renewal_tables(r: dict[str, Any], n: float) -> str:
    out = []
    for host, x in r.items():
        k = max(1, x["renewals"])
        per_s = x["seconds"]
        gap, worst = x["interval"]
        lines = [f"**{host} ({x['role']})**: {x['renewals']} renewals in {x['seconds']:.1f} s "
                 f"(N = {n} s, max_hosts {x['max_hosts']}; time between renewals: median "
                 f"{gap:.3f} s, max {worst:.3f} s, against 2N = {2 * n:.1f} s)",
                 "",
                 "| region | reads / renewal | KiB read / renewal | writes / renewal "
                 "| KiB written / renewal |",
                 "|:---|---:|---:|---:|---:|"]
        tot: Counter[str] = Counter()
        order = ["anchor (LUN tail)", "superblock", "hosts", "writer", "ledger_a", "ledger_b",
                 "mailboxes", "mdhistory", "audit", "control LV (unused)"]
        for region in sorted(x["regions"], key=lambda g: order.index(g) if g in order else 99):
            cnt = x["regions"][region]
            tot.update(cnt)
            lines.append(f"| {region} | {cnt['read'] / k:.1f} | {cnt['read_bytes'] / k / 1024:.1f}"
                         f" | {cnt['write'] / k:.1f} | {cnt['write_bytes'] / k / 1024:.1f} |")
        lines.append(f"| **all, through the agent's device** | **{tot['read'] / k:.1f}** | "
                     f"**{tot['read_bytes'] / k / 1024:.1f}** | **{tot['write'] / k:.1f}** | "
                     f"**{tot['write_bytes'] / k / 1024:.1f}** |")
        rd_ios, rd, wr_ios, wr = x["disk"]
        lines.append(f"| whole loop device (sysfs; incl. LVM) | {rd_ios / k:.1f} | "
                     f"{rd / k / 1024:.1f} | {wr_ios / k:.1f} | {wr / k / 1024:.1f} |")
        lvm = ", ".join(f"`{cmd}` {cnt / k:.2f}" for cmd, cnt in sorted(x["lvm"].items())) \
            or "none"
        lines += ["", f"Per second: {tot['read_bytes'] / per_s / 1024:.1f} KiB "
                  f"read in {tot['read'] / per_s:.1f} reads, "
                  f"{tot['write_bytes'] / per_s / 1024:.1f} KiB written in "
                  f"{tot['write'] / per_s:.1f} writes. LVM processes per renewal: {lvm}."]
        out.append("\n".join(lines))
    return "\n\n".join(out)


def report(args: argparse.Namespace, st: dict[str, Any] | None, io: dict[str, Any] | None,
           tk: list[Takeover] | None, info: dict[str, Any]) -> str:
    when = time.strftime("%Y-%m-%d %H:%M %Z")
    load = os.getloadavg()
    out = [f"## {when}: `{' '.join(['bench/bench_control.py', *args.argv])}`", "",
           f"Code: {info['code']}", "",
           f"kernel {platform.release()} · {os.cpu_count()} CPUs · load average at the start "
           f"{info['load0'][0]:.2f}, at the end {load[0]:.2f} · run time {info['total']:.0f} s "
           f"(status lab: set-up {info.get('setup1', 0):.0f} s, filling "
           f"{args.lvs} LVs {info.get('fill', 0):.0f} s; takeover lab set-up "
           f"{info.get('setup2', 0):.0f} s)", ""]
    if st is not None:
        s = st["samples"]
        out += [f"### 1. `status` against `lvs`: {args.hosts} hosts, {args.lvs} LVs, "
                f"N = {N_STATUS} s, agents running", "",
                f"(a) Whole processes as an admin on {st['host']} runs them, {args.repeat} runs "
                "each, interleaved; wall-clock from start to exit, output read from a pipe. "
                "Goal: status ≤ 0.5x lvs.", "",
                status_table(st), "",
                f"(b) Reading and decoding the control area in-process ({args.inproc} calls "
                "after one warm-up) against one `lvs` process. Goal: ≥ 10x faster.", "",
                inproc_table(st), "",
                "Diagnosis:", "",
                f"- `python -X importtime` of the status process: **{st['imp_status']:.1f} ms** "
                f"of imports (sum of the *self* column, median of {args.imports}); of that "
                f"{st['imp_pass']:.1f} ms are the interpreter's own start-up imports "
                "(the same for `python -X importtime -c pass`). Slowest modules by their own "
                "import time (last run): "
                + ", ".join(f"`{m}` {t:.1f} ms" for m, t in st["top_imports"]) + ".",
                f"- `python -c pass` from the same venv: {ms(med(st['bare'].wall))} ms, so "
                f"the interpreter start alone is {med(st['bare'].wall) / med(s['status'].wall):.0%}"
                f" of the status process, imports (beyond the interpreter's own) "
                f"{(st['imp_status'] - st['imp_pass']) / 1000 / med(s['status'].wall):.0%}, "
                f"and `read_status` itself {med(st['inproc']) / med(s['status'].wall):.0%}.",
                f"- Background: the {st['agents']} agents used {st['agent_load']:.2f} CPU-s per "
                f"second (their own threads plus the LVM processes they ran) while (a) ran, on "
                f"{os.cpu_count()} CPUs (part 3 shows what an agent does per renewal); the "
                "CPU column above is less sensitive to that load than wall-clock.", "",
                "Commands (exactly as timed):", "", "```",
                f"LVM_SYSTEM_DIR={st['sysdir']} "
                + " ".join(st["argv"]["lvs (plain)"]) + "   # the host's own lvm.conf",
                *(" ".join(a if " " not in a else f"'{a[:60]}...'" for a in argv)
                  for k, argv in st["argv"].items() if k != "lvs (plain)"), "```", ""]
    if tk is not None:
        out += [f"### 2. Takeover after the writer's agent is SIGKILLed: {args.takeover_hosts} "
                f"hosts, N = {N_TAKEOVER} s, {args.takeover_reps} runs per mode", "",
                "From `kill -9` of the writer's agent until (i) the leader sector on disk (read "
                "with O_DIRECT every 20 ms) names another host at a higher epoch, or (ii) the "
                "first of two `fenceless writer takeover --wait` processes, started at the "
                "kill on two other hosts, returns success. Goal: ≤ 14N.", "",
                takeover_table(tk, N_TAKEOVER, info.get("ids2", {})), "",
                "- *outcomes*: which host took over from which (host ids come from the order "
                "of the concurrent joins; `--auto-takeover` picks the lowest live *id*).",
                "- *from the last renewal*: from the dead writer's last renewal (the timestamp "
                "in its host sector: the lab's hosts share one monotonic clock) to success; "
                "the protocol's floor is 14N after the *observer* last saw the sector change.",
                "- *writer published DEAD*: the first time any other host's agent wrote the "
                "writer as `dead` into its local view (published every 2N; a manual takeover "
                "can finish before any agent publishes it).",
                "- Between runs the killed agent is restarted (it waits 14N before it takes its "
                "host id again) and every host's `status` must show every host `live`.", ""]
    if io is not None:
        out += [f"### 3. I/O per renewal, max_hosts 16 ({args.hosts} hosts joined), "
                f"N = {N_STATUS} s, {args.lvs} LVs", "",
                "One `Agent` per host in the bench process (its VG thread, as `Agent.run` "
                "starts it), through a `BlockDevice` that counts every request, after the "
                "host's real agent stopped; the writer took the lease back with a takeover "
                "request. A renewal = one write of the host's own lease sector. The last row "
                "is the host's whole loop device from `/sys/block/*/stat`, which also counts "
                "what the agent's LVM processes read.", "",
                renewal_tables(io, N_STATUS), ""]
    return "\n".join(out) + "\n"


# --- main --------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hosts", type=int, default=16, help="hosts of the status lab (2-16)")
    p.add_argument("--lvs", type=int, default=2000, help="LVs in the VG for part 1")
    p.add_argument("--repeat", type=int, default=21, help="timed runs per process (part 1)")
    p.add_argument("--inproc", type=int, default=200, help="in-process read_status calls")
    p.add_argument("--imports", type=int, default=5, help="-X importtime runs")
    p.add_argument("--takeover-hosts", type=int, default=4)
    p.add_argument("--takeover-reps", type=int, default=5, help="takeovers per mode")
    p.add_argument("--renewals", type=int, default=20, help="renewals counted in part 3")
    p.add_argument("--parts", default="1,2,3", help="which parts to run (default 1,2,3)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 4 hosts, 100 LVs, few repetitions; no results file "
                   "unless --output")
    p.add_argument("--output", help=f"markdown file to append a section to (default: "
                   f"{DEFAULT_OUTPUT}; '-' for none)")
    args = p.parse_args(argv)
    args.argv = argv
    if args.quick:
        args.hosts, args.lvs, args.repeat, args.inproc, args.imports = 4, 100, 5, 50, 2
        args.takeover_reps, args.renewals = 2, 5
        args.output = args.output or "-"
    args.output = args.output or str(DEFAULT_OUTPUT)
    if not 2 <= args.hosts <= 16 or not 3 <= args.takeover_hosts <= 16:
        p.error("--hosts must be 2..16 and --takeover-hosts 3..16")
    if args.repeat < 2 or args.inproc < 2 or args.imports < 1 or args.takeover_reps < 1:
        p.error("repetitions must be at least 2 (--imports, --takeover-reps: 1)")
    args.part_set = {x.strip() for x in args.parts.split(",") if x.strip()}
    if not args.part_set <= {"1", "2", "3"} or not args.part_set:
        p.error("--parts takes a list of 1, 2, 3")
    return args


def with_lab(cli: str, tmp: Path, name: str, body: Callable[[Path], Any]) -> Any:
    """Run body(labdir); always take the lab down and check its loop devices are gone."""
    labdir = tmp / name
    try:
        return body(labdir)
    finally:
        if take_down(cli, labdir, labdir):
            raise RuntimeError(f"lab {name}: loop devices left behind")


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    cli = start()
    if cli is None:
        return 2
    t0 = time.perf_counter()
    started_wall = time.time()
    info: dict[str, Any] = {"load0": os.getloadavg(), "code": code_state()}
    tmp = Path(tempfile.mkdtemp(prefix="fenceless-bench-control-"))
    st = io = tk = None
    try:
        if args.part_set & {"1", "3"}:
            size = f"{(args.lvs * 4 + 2048) // 1024 + 1}G"

            def status_lab(labdir: Path) -> tuple[Any, Any]:
                c = make_cluster(cli, labdir, args.hosts, size, N_STATUS, False)
                info["setup1"] = c.setup_seconds
                info["fill"] = fill_lvs(cli, c, args.lvs)
                have = lv_count(c, c.hosts[1])
                log(f"filled {args.lvs} LVs in {info['fill']:.1f} s; {c.hosts[1]} sees "
                    f"{have} LVs (with the control LV)")
                s = i = None
                if "1" in args.part_set:
                    log("part 1: status against lvs")
                    s = measure_status(cli, c, args)
                if "3" in args.part_set:
                    log("part 3: I/O per renewal")
                    i = measure_renewal_io(cli, c, args)
                return s, i

            st, io = with_lab(cli, tmp, "status-lab", status_lab)
        if "2" in args.part_set:
            def takeover_lab(labdir: Path) -> list[Takeover]:
                c = make_cluster(cli, labdir, args.takeover_hosts, "1G", N_TAKEOVER, True)
                info["setup2"] = c.setup_seconds
                info["ids2"] = c.ids
                log("part 2: takeover")
                return measure_takeover(cli, c, args.takeover_reps)

            tk = with_lab(cli, tmp, "takeover-lab", takeover_lab)
    finally:
        if not lab_loops(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    info["total"] = time.perf_counter() - t0
    changed = sorted(str(p.relative_to(HERE.parent)) for p in (HERE.parent / "src").rglob("*.py")
                     if p.stat().st_mtime > started_wall)
    if changed:
        info["code"] += (". **Warning: these files changed while the bench ran** (processes "
                         "started after a change run the new code): "
                         + ", ".join(f"`{c}`" for c in changed))
    text = report(args, st, io, tk, info)
    print(text, end="")
    if args.output != "-":
        path = Path(args.output)
        head = "" if path.exists() else (
            "# Control area benchmarks (issue 3)\n\nGenerated by `bench/bench_control.py`; "
            "each run appends a section (newest last). See bench/README.md.\n\n")
        with open(path, "a") as f:
            f.write(head + text + "\n")
        log(f"appended to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
