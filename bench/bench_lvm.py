#!/usr/bin/env python3
"""Baseline cost of bare ``lvcreate``, ``lvs`` and ``vgs`` as the LV count grows.

Two configurations, measured side by side in one lab (one host, two VGs, one
LUN image each, so both sit on the same disk and the same page cache):

(a) ``default``: the plain ``lvm`` binary with an LVM_SYSTEM_DIR whose lvm.conf
    holds only what keeps it inside the lab (a filter/global_filter for its one
    loop device, ``activation = 0`` because there is no device-mapper, private
    backup/archive/locking dirs). Everything else is LVM's default: use_aio,
    udev device list, hints. Plain text ``lvs VG`` / ``vgs VG``, and
    ``lvcreate -an -Zn -L 4m -n NAME VG``.
(b) ``adapter``: fenceless's ``Lvm`` adapter for the lab host (its lvm.conf with
    ``use_aio = 0``, the adapter's ``--config``, ``--readonly`` JSON reports):
    ``Lvm.lvcreate``, ``Lvm.lvs()``, ``Lvm.vgs()``, timed including the parse.

The whole run happens inside the lab host's mount namespace, so LVM's default
hints file (/run/lvm/hints) and lock dir are the lab host's, not the machine's.
The VGs are filled in bulk through one ``lvm`` shell process per checkpoint
(not measured); every timed ``lvcreate`` makes a real new LV that counts
towards the next checkpoint. Both configurations alternate call by call, so
drift (page cache, CPU frequency, a noisy neighbour) hits both alike.

Needs root. Usage::

    bench/bench_lvm.py                         # full run, writes bench/results.md
    bench/bench_lvm.py --quick                 # smoke run: counts 50,100, repeat 3
    bench/bench_lvm.py --counts 100,500 --repeat 9 --output /tmp/r.md
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import HERE, LVM, lab, log, lvm_version, ms, p90, start, take_down

from fenceless import config as cfgmod
from fenceless.lvm.adapter import Lvm, Role
from fenceless.ops.context import Context
from fenceless.runner import RecordingRunner, Result, SubprocessRunner

DEFAULT_OUTPUT = HERE / "results.md"
LV_SIZE = 4 << 20
VG_DEFAULT = "dflt"
VG_ADAPTER = "fncl"
OPS = ("lvcreate", "lvs", "vgs")
CONFIGS = ("default", "adapter")
CLONE_NEWNS = 0x00020000
# Effective settings shown in the header, as `lvmconfig --typeconfig full` reports them.
SETTING_KEYS = ("global/use_aio", "global/activation", "devices/obtain_device_list_from_udev",
                "devices/hints", "devices/use_devicesfile", "backup/backup", "backup/archive")


# --- small helpers -------------------------------------------------------------------


def lv_name(i: int) -> str:
    return f"lv{i:05d}"


def setns_mount(fd: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNS) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns(CLONE_NEWNS): {os.strerror(err)}")


@contextlib.contextmanager
def in_mount_namespace(pid: int) -> Iterator[None]:
    """Run the body inside process ``pid``'s mount namespace (single-threaded caller)."""
    cwd = os.getcwd()
    home = os.open("/proc/self/ns/mnt", os.O_RDONLY)
    target = os.open(f"/proc/{pid}/ns/mnt", os.O_RDONLY)
    try:
        setns_mount(target)
        os.chdir(cwd)
        try:
            yield
        finally:
            setns_mount(home)
            os.chdir(cwd)
    finally:
        os.close(target)
        os.close(home)


class TimedRunner(RecordingRunner):
    """A RecordingRunner that also keeps each command's own run time (Result.seconds)."""

    def __init__(self, env: dict[str, str] | None = None) -> None:
        super().__init__(SubprocessRunner())
        self.extra_env = env or {}
        self.seconds: list[float] = []

    def run(self, argv: Sequence[str], **kw: Any) -> Result:
        if self.extra_env:
            kw["env"] = {**self.extra_env, **(kw.get("env") or {})}
        res = super().run(argv, **kw)
        self.seconds.append(res.seconds)
        return res


def default_lvm_conf(d: Path, device: str) -> str:
    filt = f'[ "a|^{device}$|", "r|.*|" ]'
    return f"""# (a) default LVM settings: only what keeps LVM inside the lab.
devices {{
    filter = {filt}
    global_filter = {filt}
}}
global {{
    activation = 0
    locking_dir = "{d}/lock"
}}
backup {{
    backup_dir = "{d}/backup"
    archive_dir = "{d}/archive"
}}
"""


def filler_lvm_conf(d: Path, device: str) -> str:
    filt = f'[ "a|^{device}$|", "r|.*|" ]'
    return f"""# bulk filler only (not measured): as fast as LVM goes.
devices {{
    filter = {filt}
    global_filter = {filt}
    obtain_device_list_from_udev = 0
    hints = "none"
    use_devicesfile = 0
}}
global {{
    activation = 0
    use_aio = 0
    locking_dir = "{d}/lock"
}}
backup {{
    backup = 0
    archive = 0
}}
"""


def make_system_dir(d: Path, text: str) -> Path:
    for sub in ("backup", "archive", "lock"):
        (d / sub).mkdir(parents=True, exist_ok=True)
    (d / "lvm.conf").write_text(text)
    return d


# --- the two configurations --------------------------------------------------------------


@dataclass
class Config:
    """One configuration under test: its three operations and its bulk filler."""

    name: str
    vg: str
    device: str
    runner: TimedRunner
    filler_dir: Path
    filler_line: Callable[[str], str]
    ops: dict[str, Callable[[str], object]] = field(default_factory=dict)
    created: int = 0  # LVs in the VG so far

    def fill_to(self, target: int) -> float:
        """Create LVs through one ``lvm`` shell until the VG holds ``target``; seconds."""
        n = target - self.created
        if n <= 0:
            return 0.0
        names = [lv_name(i) for i in range(self.created + 1, target + 1)]
        script = "".join(self.filler_line(x) + "\n" for x in names)
        env = {**os.environ, "LC_ALL": "C", "LVM_SUPPRESS_FD_WARNINGS": "1",
               "LVM_SYSTEM_DIR": str(self.filler_dir)}
        started = time.perf_counter()
        proc = subprocess.run([LVM], input=script, capture_output=True, text=True, env=env,
                              check=False)
        took = time.perf_counter() - started
        made = proc.stdout.count("created.")
        if made != n:
            tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
            raise RuntimeError(f"{self.name}: filler made {made} of {n} LVs (rc {proc.returncode})"
                               f": {tail}")
        self.created = target
        return took


def default_config(vg: str, device: str, sysdir: Path, filler_dir: Path) -> Config:
    runner = TimedRunner({"LVM_SYSTEM_DIR": str(sysdir), "LVM_SUPPRESS_FD_WARNINGS": "1"})
    cfg = Config("default", vg, device, runner, filler_dir,
                 lambda n: f"lvcreate -an -Zn -L 4m -n {n} {vg}")

    def lvcreate(name: str) -> object:
        return runner.run([LVM, "lvcreate", "-an", "-Zn", "-L", "4m", "-n", name, vg])

    cfg.ops = {
        "lvcreate": lvcreate,
        "lvs": lambda _n: runner.run([LVM, "lvs", vg]),
        "vgs": lambda _n: runner.run([LVM, "vgs", vg]),
    }
    runner.run([LVM, "pvcreate", "--metadatasize", "16m", device])
    runner.run([LVM, "vgcreate", "-s", "4m", vg, device])
    return cfg


def adapter_config(host_config: str, vg: str, filler_dir: Path) -> tuple[Config, Lvm]:
    runner = TimedRunner()
    ctx = Context(cfgmod.load(host_config), runner=runner)
    lvm = ctx.lvm(vg, role=Role.WRITER)
    device = lvm.vg.devices[0]
    cfg = Config("adapter", vg, device, runner, filler_dir,
                 lambda n: ("lvcreate --yes --activate n --zero n --setautoactivation n "
                            f"--size {LV_SIZE}b --name {n} {vg}"))
    cfg.ops = {
        "lvcreate": lambda n: lvm.lvcreate(n, LV_SIZE),
        "lvs": lambda _n: lvm.lvs(),
        "vgs": lambda _n: lvm.vgs(),
    }
    lvm.pvcreate(device)  # --metadatasize 16m
    lvm.vgcreate([device])  # -s 4m
    return cfg, lvm


# --- measuring ---------------------------------------------------------------------------


@dataclass
class Sample:
    wall: list[float] = field(default_factory=list)  # s, the whole call as its caller sees it
    inner: list[float] = field(default_factory=list)  # s, inside the LVM process(es)
    calls: list[int] = field(default_factory=list)  # LVM processes per call


def timed(cfg: Config, op: str, name: str, sample: Sample) -> None:
    calls0, secs0 = len(cfg.runner.calls), len(cfg.runner.seconds)
    started = time.perf_counter()
    cfg.ops[op](name)
    sample.wall.append(time.perf_counter() - started)
    sample.calls.append(len(cfg.runner.calls) - calls0)
    sample.inner.append(sum(cfg.runner.seconds[secs0:]))


def effective_settings(c: Config, lvm: Lvm | None) -> str:
    """The settings that differ between the configurations, as LVM itself resolves them."""
    args = ("--typeconfig", "full", *SETTING_KEYS)
    res = lvm.run("lvmconfig", *args) if lvm else c.runner.run([LVM, "lvmconfig", *args])
    return ", ".join(ln.strip() for ln in res.stdout.splitlines() if "=" in ln)


def lv_count(c: Config) -> int:
    env = {**os.environ, "LC_ALL": "C", "LVM_SUPPRESS_FD_WARNINGS": "1",
           "LVM_SYSTEM_DIR": str(c.filler_dir)}
    out = subprocess.run([LVM, "vgs", "--noheadings", "-o", "lv_count", c.vg],
                         capture_output=True, text=True, env=env, check=True).stdout
    return int(out.strip())


def checkpoint(count: int, repeat: int,
               configs: Sequence[Config]) -> dict[tuple[str, str], Sample]:
    """From count-repeat LVs: time ``repeat`` lvcreates (reaching count), then lvs and vgs."""
    out = {(c.name, op): Sample() for c in configs for op in OPS}
    for _ in range(repeat):
        for c in configs:
            c.created += 1
            timed(c, "lvcreate", lv_name(c.created), out[(c.name, "lvcreate")])
    for c in configs:  # one untimed report each: the first after a change reads cold metadata
        c.ops["vgs"]("")
    for op in ("lvs", "vgs"):
        for _ in range(repeat):
            for c in configs:
                timed(c, op, "", out[(c.name, op)])
    for c in configs:
        have = lv_count(c)
        if have != count:
            raise RuntimeError(f"{c.name}: VG {c.vg} holds {have} LVs, expected {count}")
    return out


# --- report ------------------------------------------------------------------------------


def table(results: dict[int, dict[tuple[str, str], Sample]]) -> str:
    head = ("| LVs | operation | default median ms | default p90 ms | adapter median ms "
            "| adapter p90 ms | ratio adapter/default (median) | adapter: in LVM ms (median) "
            "| LVM processes/op (default / adapter) |")
    lines = [head, "|---:|:---|---:|---:|---:|---:|---:|---:|:---:|"]
    for count, res in results.items():
        for op in OPS:
            d, a = res[("default", op)], res[("adapter", op)]
            dm, am = statistics.median(d.wall), statistics.median(a.wall)
            procs = f"{max(d.calls)} / {max(a.calls)}"
            if min(d.calls) != max(d.calls) or min(a.calls) != max(a.calls):
                procs += " (varies)"
            lines.append(f"| {count} | `{op}` | {ms(dm)} | {ms(p90(d.wall))} | {ms(am)} "
                         f"| {ms(p90(a.wall))} | {am / dm:.2f} | {ms(statistics.median(a.inner))} "
                         f"| {procs} |")
    return "\n".join(lines)


def argv_text(argv: Sequence[str]) -> str:
    return " ".join(a if a and " " not in a and '"' not in a else f"'{a}'" for a in argv)


def report(args: argparse.Namespace, results: dict[int, dict[tuple[str, str], Sample]],
           default_conf: str, adapter_conf: str, adapter: Lvm, settings: dict[str, str],
           sample_argv: dict[str, list[tuple[str, ...]]], timings: dict[str, float]) -> str:
    when = time.strftime("%Y-%m-%d %H:%M %Z")
    header = (f"**{when}** · LVM {lvm_version()} · kernel {platform.release()} · "
              f"{os.cpu_count()} CPUs · repeat {args.repeat} · LV size 4 MiB · "
              "VGs: `pvcreate --metadatasize 16m`, `vgcreate -s 4m` · "
              "settings: **(a) default** = plain `lvm`, filter/global_filter admit its loop "
              f"device only, {settings['default']}, plain text `lvs VG`/`vgs VG`; "
              "**(b) adapter** = fenceless `Lvm`, lab host lvm.conf + the adapter's `--config` "
              f"(filter for its loop device only), {settings['adapter']}, "
              "`--readonly` JSON reports")
    out = [
        "# LVM baseline: bare lvcreate / lvs / vgs by LV count",
        "",
        header,
        "",
        f"Generated by `{' '.join(['bench/bench_lvm.py', *args.argv])}` in "
        f"{timings['total']:.0f} s (filling the VGs: {timings['fill']:.0f} s).",
        "",
        table(results),
        "",
        "How to read it:",
        "",
        f"- Each row: {args.repeat} calls per configuration, each a separate process, "
        "wall-clock as the caller sees it (process start to exit, output read; for the "
        "adapter also the JSON parse). The two configurations alternate call by call.",
        f"- `lvcreate` at N LVs: the VG held N-{args.repeat} .. N-1 LVs before the "
        f"{args.repeat} timed creates, which bring it to N. `lvs` and `vgs` run at exactly N.",
        "- *adapter: in LVM ms*: the median time inside the LVM process alone "
        "(`Result.seconds`); the rest of the adapter column is Python (argv, parse).",
        "- *LVM processes/op*: `len(runner.calls)` added by one operation.",
        "- The VGs are filled in bulk by one `lvm` shell process (not measured) with "
        "use_aio=0, hints none, archive/backup off; each VG's LVs are created with the "
        "options of its configuration's `lvcreate`.",
        "- One untimed `vgs` per configuration runs between the creates and the reports.",
        "",
        "## Configuration (a): default LVM settings",
        "",
        "LVM_SYSTEM_DIR holds only this lvm.conf (everything else LVM's compiled-in default):",
        "",
        "```",
        default_conf.rstrip(),
        "```",
        "",
        "Commands (exactly as run):",
        "",
        "```",
        *[argv_text(sample_argv["default"][i]) for i in range(len(OPS))],
        "```",
        "",
        "## Configuration (b): the adapter's settings",
        "",
        "The lab host's lvm.conf (LVM_SYSTEM_DIR):",
        "",
        "```",
        adapter_conf.rstrip(),
        "```",
        "",
        "The adapter's `--config` on every call:",
        "",
        "```",
        adapter.config_text(),
        "```",
        "",
        "Commands (exactly as run; `Lvm.lvcreate(name, 4 MiB)`, `Lvm.lvs()`, `Lvm.vgs()`):",
        "",
        "```",
        *[argv_text(a[:a.index("--config")] if "--config" in a else a)
          + " --config '...'" for a in sample_argv["adapter"]],
        "```",
        "",
        "Environment of both: `LC_ALL=C LVM_SUPPRESS_FD_WARNINGS=1`, run through "
        "`fenceless.runner.SubprocessRunner` (no shell, own process group), inside the lab host's "
        "mount namespace (its own /etc/lvm, /run/lvm, /run/lock/lvm).",
    ]
    return "\n".join(out) + "\n"


# --- main --------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--counts", default="100,500,1000,2000",
                   help="LV counts to measure at, ascending (default: 100,500,1000,2000)")
    p.add_argument("--repeat", type=int, default=15, help="timed calls per operation")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: counts 50,100, repeat 3, no results file unless --output")
    p.add_argument("--output", help=f"markdown results file (default: {DEFAULT_OUTPUT}; "
                   "'-' for none)")
    args = p.parse_args(argv)
    args.argv = argv
    if args.quick:
        args.counts, args.repeat = "50,100", 3
        args.output = args.output or "-"
    args.output = args.output or str(DEFAULT_OUTPUT)
    try:
        counts = [int(x) for x in args.counts.split(",") if x.strip()]
    except ValueError:
        p.error(f"--counts: not a list of integers: {args.counts!r}")
    if args.repeat < 2:
        p.error("--repeat must be at least 2")
    prev = 0
    for c in counts:
        if c - args.repeat < prev:
            p.error(f"--counts: {c} must exceed the previous count ({prev}) by at least "
                    f"--repeat ({args.repeat}): the timed lvcreates count towards it")
        prev = c
    if not counts:
        p.error("--counts is empty")
    args.count_list = counts
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    cli = start()
    if cli is None:
        return 2
    t0 = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="fenceless-bench-"))
    labdir = tmp / "lab"
    size_gib = (max(args.count_list) * LV_SIZE + (1 << 30)) // (1 << 30) + 1
    text = ""
    left: list[str] = []
    try:
        state = json.loads(lab(cli, "up", "--dir", str(labdir), "--hosts", "1",
                               "--size", f"{size_gib}G", "--vg", VG_DEFAULT, "--vg", VG_ADAPTER,
                               "--json"))
        host = state["hosts"][0]
        log(f"lab up in {labdir}: {host['loops']}")
        with in_mount_namespace(int(host["holder_pid"])):
            text = run(args, tmp, host, t0)
    finally:
        left = take_down(cli, labdir, tmp)
        if not left:
            shutil.rmtree(tmp, ignore_errors=True)
    if left:
        return 1
    print(text, end="")
    if args.output != "-":
        Path(args.output).write_text(text)
        log(f"wrote {args.output}")
    return 0


def run(args: argparse.Namespace, tmp: Path, host: dict[str, Any], t0: float) -> str:
    dev_default = host["loops"][VG_DEFAULT]
    sysdir = make_system_dir(tmp / "default-lvm", default_lvm_conf(tmp / "default-lvm",
                                                                   dev_default))
    default_conf = (sysdir / "lvm.conf").read_text()
    dflt = default_config(VG_DEFAULT, dev_default,
                          sysdir, make_system_dir(tmp / "fill-default",
                                                  filler_lvm_conf(tmp / "fill-default",
                                                                  dev_default)))
    dev_adapter = host["loops"][VG_ADAPTER]
    fill_adapter = make_system_dir(tmp / "fill-adapter",
                                   filler_lvm_conf(tmp / "fill-adapter", dev_adapter))
    fncl, lvm = adapter_config(host["config"], VG_ADAPTER, fill_adapter)
    adapter_conf = Path(lvm.host.lvm_system_dir or "/etc/lvm", "lvm.conf").read_text()
    configs = (dflt, fncl)
    settings = {"default": effective_settings(dflt, None), "adapter": effective_settings(fncl, lvm)}
    for c in configs:  # the argv samples below start after set-up
        c.runner.calls.clear()
        c.runner.seconds.clear()
    results: dict[int, dict[tuple[str, str], Sample]] = {}
    fill = 0.0
    for count in args.count_list:
        log(f"checkpoint {count} LVs")
        for c in configs:
            took = c.fill_to(count - args.repeat)
            fill += took
            log(f"  {c.name}: filled to {c.created} LVs in {took:.1f} s")
        results[count] = checkpoint(count, args.repeat, configs)
        for op in OPS:
            d = statistics.median(results[count][("default", op)].wall)
            a = statistics.median(results[count][("adapter", op)].wall)
            log(f"  {op:8s} default {ms(d):>7s} ms  adapter {ms(a):>7s} ms")
    sample_argv = {c.name: [c.runner.calls[0], c.runner.calls[args.repeat + 1],
                            c.runner.calls[-1]] for c in configs}
    timings = {"total": time.perf_counter() - t0, "fill": fill}
    return report(args, results, default_conf, adapter_conf, lvm, settings, sample_argv,
                  timings)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
