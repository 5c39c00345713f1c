#!/usr/bin/env python3
"""The self-fence margin: how long before another host may take over does the watchdog fire?

On a lab of 2 hosts with real agents and watchdogs, h1 is the writer. Each
run freezes h1's agent (SIGSTOP) right after one of its renewals and measures,
on the machine's CLOCK_BOOTTIME (shared by the lab's hosts):

- ``fired``: when h1's watchdog fired (its record, ``lab watchdog fired``);
- ``dead``: the earliest moment h2 may take over: h2's agent noted h1's last
  sector change at ``changed`` (its published view), and calls h1 DEAD 14N
  after that.

The margin is (dead - fired) / N; the goal is at least 2N. h1's agent is then
started again (a new incarnation takes the writer role back) before the next
run. Results are appended to bench/results-fence.md.

    sudo .venv/bin/python bench/bench_fence.py [--runs 20] [--n 0.2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from common import HERE, code_state, lab, log, start, take_down, wait_until

from fenceless import config as cfgmod
from fenceless.lease.delta import LeaseTiming
from fenceless.localstate import agent_view
from fenceless.watchdog.daemon import read_fired

GOAL_N = 2.0


def status(cli: str, labdir: Path, host: str) -> dict:
    import subprocess

    out = subprocess.run([cli, "-c", str(labdir / "hosts" / host / "fenceless.toml"),
                          "status", "--json"], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def writer_is_h1(cli: str, labdir: Path) -> bool:
    st = status(cli, labdir, "h2")
    w = st["writer"]
    live = {h["name"]: h["lease"] for h in st["hosts"]}
    return bool(w and w["host"] == "h1" and w["state"] == "active" and
                live.get("h1") == "live" and live.get("h2") == "live")


def one_run(cli: str, labdir: Path, n: float, h1_state: str, h2_state: str) -> float:
    """Freeze h1 after a renewal; the margin of this run, in N."""
    before = len(read_fired(h1_state))
    view = agent_view(h2_state, "sanvg") or {}
    seen = (view.get("hosts", {}).get("1") or {}).get("changed")
    # Right after h2 saw h1's sector change: h1 has just renewed.
    wait_until(lambda: ((agent_view(h2_state, "sanvg") or {}).get("hosts", {}).get("1")
                        or {}).get("changed") != seen, 10, "a renewal of h1", every=0.005)
    lab(cli, "agent", "--dir", str(labdir), "h1", "pause")
    fired = wait_until(lambda: read_fired(h1_state)[before:], 30 * n + 5, "the watchdog")
    dead_at = wait_until(lambda: _dead_at(h2_state, n), 30 * n + 5, "h2 to see h1 dead")
    margin = (dead_at - fired[0]["fired_at"]) / n
    log(f"  fired {fired[0]['fired_at']:.3f}, dead at {dead_at:.3f}: margin {margin:.2f}N")
    lab(cli, "agent", "--dir", str(labdir), "h1", "start")  # the killed agent, again
    wait_until(lambda: writer_is_h1(cli, labdir), 60 * n + 20, "h1 writer again")
    return margin


def _dead_at(h2_state: str, n: float) -> float | None:
    """When h2 calls h1 DEAD: 14N after the last change it saw (None: not dead yet)."""
    view = agent_view(h2_state, "sanvg") or {}
    h1 = view.get("hosts", {}).get("1") or {}
    if h1.get("state") != "dead" or not isinstance(h1.get("changed"), int | float):
        return None
    return float(h1["changed"]) + LeaseTiming(n).dead_after


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--n", type=float, default=0.2, help="io_timeout of the lab (seconds)")
    ap.add_argument("--output", default=str(HERE / "results-fence.md"))
    args = ap.parse_args()
    cli = start()
    if cli is None:
        return 2
    scope = Path(tempfile.mkdtemp(prefix="fenceless-bench-fence-"))
    labdir = scope / "lab"
    margins: list[float] = []
    try:
        lab(cli, "up", "--dir", str(labdir), "--hosts", "2", "--size", "1G",
            "--io-timeout", str(args.n), "--lun-dir", "/dev/shm", "--agents")
        import subprocess

        for host, verb in (("h1", "init"), ("h2", "join")):
            subprocess.run([cli, "-c", str(labdir / "hosts" / host / "fenceless.toml"), verb],
                           check=True, capture_output=True)
        wait_until(lambda: writer_is_h1(cli, labdir), 30, "the cluster")
        h1_state = cfgmod.load(str(labdir / "hosts" / "h1" / "fenceless.toml")).state_dir
        h2_state = cfgmod.load(str(labdir / "hosts" / "h2" / "fenceless.toml")).state_dir
        for i in range(args.runs):
            log(f"run {i + 1}/{args.runs}")
            margins.append(one_run(cli, labdir, args.n, h1_state, h2_state))
    finally:
        left = take_down(cli, labdir, scope)
    report(args, margins)
    return 1 if left else 0


def report(args: argparse.Namespace, margins: list[float]) -> None:
    lo, md = min(margins), statistics.median(margins)
    lines = [
        f"\n## Self-fence margin, {time.strftime('%Y-%m-%d %H:%M')} ({code_state()})\n",
        f"2 lab hosts, N = {args.n} s, {len(margins)} runs: h1 (the writer) frozen with "
        "SIGSTOP right after a renewal; margin = (the moment h2 may take over, 14N after "
        "the last change of h1 it saw) - (the moment h1's watchdog fired), in N.\n",
        "| runs | min | median | max | goal |",
        "|---|---|---|---|---|",
        f"| {len(margins)} | {lo:.2f}N | {md:.2f}N | {max(margins):.2f}N | "
        f">= {GOAL_N:.0f}N: {'met' if lo >= GOAL_N else 'MISSED'} |",
        "", "Each run: " + ", ".join(f"{m:.2f}" for m in margins), ""]
    text = "\n".join(lines)
    print(text)
    with open(args.output, "a") as f:
        f.write(text)


if __name__ == "__main__":
    sys.exit(main())
