#!/usr/bin/env python3
"""What fenceless adds to starting and moving a VM, against bare libvirt in the same run.

A lab of 2 hosts with agents and one libvirtd each (N = 0.2 s by default), and
two copies of the counter guest (``lab demo-vm``), each on its own 16 MiB
volume:

- ``ctr`` is run through fenceless: ``vm start`` (the writer's grant, the
  disk's claim and mapping, libvirt's createXML), ``vm stop --force``.
- ``bare`` is what the setup fenceless replaces does: the volume is mapped on
  both hosts at once with no claim (a loop device over each host's view of
  the LUN, as the lab maps LVs), and libvirt is called directly (createXML,
  destroy) with the same XML.

Timed after one untimed start on each host (libvirtd probes QEMU's
capabilities on its first start, about 4 s here), alternating the two,
``--runs`` times each (wall clock of the whole step, the CLI process included
for fenceless):

1. start on h1 (until the domain runs);
2. a cold move h1 -> h2: stop on h1, then start on h2.

And the VM self-fence margin: ``ctr`` runs on h2, h2's agent is frozen
(SIGSTOP) right after a renewal; the margin is the time from QEMU's death
(polled every 10 ms) to the moment h1 may act on h2's death (14N after the
last change of h2 that h1 saw), in N. Results are appended to
bench/results-vm.md.

    sudo .venv/bin/python bench/bench_vm.py [--runs 5] [--n 0.2] [--fence-runs 5]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import HERE, child_env, code_state, lab, log, med, ms, start, take_down, wait_until

from fenceless import config as cfgmod
from fenceless.clock import boottime
from fenceless.hv.domain import with_disk_paths
from fenceless.lab import loopdev
from fenceless.lab.libvirt import qemu_pids
from fenceless.lease.delta import LeaseTiming
from fenceless.localstate import agent_view
from fenceless.lvm.mapping import single_extent
from fenceless.ops.context import Context
from fenceless.runner import SubprocessRunner


def on(cli: str, labdir: Path, host: str, *words: str) -> float:
    """Run ``fenceless -c <host> WORDS``; its wall clock in seconds."""
    t0 = time.monotonic()
    proc = subprocess.run([cli, "-c", str(labdir / "hosts" / host / "fenceless.toml"), *words],
                          capture_output=True, text=True, env=child_env(), check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{host}: fenceless {' '.join(words)}: {proc.stderr.strip()}")
    return time.monotonic() - t0


class Bare:
    """The bare setup: the volume mapped on every host, libvirt called directly."""

    def __init__(self, labdir: Path, xml: str) -> None:
        import libvirt

        self.devices: dict[str, str] = {}
        self.conns = {}
        self.xml = {}
        for host in ("h1", "h2"):
            cfg = cfgmod.load(str(labdir / "hosts" / host / "fenceless.toml"))
            lvm = Context(cfg).lvm(None)
            pvs = {p.name: p for p in lvm.pvs()}
            vg = lvm.vg_info()
            ext = single_extent(lvm.segments("bare-disk"), pvs, vg.extent_size, vg.name,
                                "bare-disk")
            dev = loopdev.attach(SubprocessRunner(), ext.device, offset=ext.offset,
                                 sizelimit=ext.size)
            self.devices[host] = dev
            self.xml[host] = with_disk_paths(xml, vg.name, {"bare-disk": dev})
            assert cfg.hypervisor_uri is not None
            self.conns[host] = libvirt.open(cfg.hypervisor_uri)

    def start(self, host: str) -> float:
        t0 = time.monotonic()
        self.conns[host].createXML(self.xml[host], 0)
        return time.monotonic() - t0

    def stop(self, host: str) -> float:
        t0 = time.monotonic()
        self.conns[host].lookupByName("bare").destroy()
        return time.monotonic() - t0

    def migrate(self, src: str, dst: str) -> float:
        """A live migration as the replaced setup does it: the disk is mapped on both hosts
        all along; libvirt moves the guest with the destination's path for it."""
        import libvirt

        from fenceless.hv.domain import with_target_paths

        t0 = time.monotonic()
        dom = self.conns[src].lookupByName("bare")
        xml = with_target_paths(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_MIGRATABLE),
                                {"vda": self.devices[dst]})
        dom.migrate3(self.conns[dst], {libvirt.VIR_MIGRATE_PARAM_DEST_XML: xml,
                                       libvirt.VIR_MIGRATE_PARAM_URI: "tcp://127.0.0.1"},
                     libvirt.VIR_MIGRATE_LIVE)
        return time.monotonic() - t0

    def close(self) -> None:
        for c in self.conns.values():
            c.close()
        for dev in self.devices.values():
            loopdev.detach(SubprocessRunner(), dev)


def released(cli: str, labdir: Path, name: str, timeout: float = 60.0) -> None:
    """Wait until the source of the last live migration has unmapped the VM's disks."""
    import json

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = subprocess.run([cli, "-c", str(labdir / "hosts" / "h1" / "fenceless.toml"), "vm",
                              "list", "--json"], capture_output=True, text=True, check=True,
                             env=child_env()).stdout
        if all(v["left"] is None for v in json.loads(out) if v["name"] == name):
            return
        time.sleep(0.2)
    raise RuntimeError(f"{name}: the source never released its disks")


def alive(pid: int) -> bool:
    """Running (a killed QEMU stays a zombie until libvirtd, frozen or not, reaps it)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def fence_margin(cli: str, labdir: Path, n: float) -> float:
    """ctr on h2, h2's agent frozen after a renewal: (h1 may act) - (QEMU gone), in N."""
    on(cli, labdir, "h2", "vm", "start", "ctr")
    h1_state = cfgmod.load(str(labdir / "hosts" / "h1" / "fenceless.toml")).state_dir
    hdir = labdir / "hosts" / "h2"
    pids = wait_until(lambda: qemu_pids(hdir), 30, "ctr's QEMU on h2")

    def h2_changed() -> float | None:
        h2 = ((agent_view(h1_state, "sanvg") or {}).get("hosts", {}).get("2") or {})
        return h2.get("changed")

    seen = h2_changed()
    wait_until(lambda: h2_changed() != seen, 10, "a renewal of h2", every=0.005)
    lab(cli, "agent", "--dir", str(labdir), "h2", "pause")
    wait_until(lambda: not any(alive(p) for p in pids), 30 * n + 10, "QEMU to die",
               every=0.01)
    gone = boottime()

    def dead_at() -> float | None:
        h2 = ((agent_view(h1_state, "sanvg") or {}).get("hosts", {}).get("2") or {})
        if h2.get("state") != "dead":
            return None
        return float(h2["changed"]) + LeaseTiming(n).dead_after

    dead = wait_until(dead_at, 30 * n + 10, "h1 to see h2 dead")
    margin = (dead - gone) / n
    log(f"  QEMU gone {gone:.3f}, h2 dead at {dead:.3f}: margin {margin:.2f}N")
    on(cli, labdir, "h1", "vm", "recover", "ctr")
    lab(cli, "agent", "--dir", str(labdir), "h2", "start")
    wait_until(lambda: ((agent_view(h1_state, "sanvg") or {}).get("hosts", {}).get("2")
                        or {}).get("state") == "live", 60, "h2 live again")
    on(cli, labdir, "h1", "vm", "stop", "ctr", "--force")
    return margin


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--fence-runs", type=int, default=5)
    ap.add_argument("--n", type=float, default=0.2, help="io_timeout of the lab (seconds)")
    ap.add_argument("--output", default=str(HERE / "results-vm.md"))
    args = ap.parse_args()
    cli = start()
    if cli is None:
        return 2
    scope = Path(tempfile.mkdtemp(prefix="fenceless-bench-vm-"))
    labdir = scope / "lab"
    rows: dict[str, list[float]] = {k: [] for k in ("f-start", "b-start", "f-move", "b-move",
                                                    "f-live", "b-live")}
    margins: list[float] = []
    bare = None
    try:
        lab(cli, "up", "--dir", str(labdir), "--hosts", "2", "--size", "1G", "--io-timeout",
            str(args.n), "--lun-dir", "/dev/shm", "--agents", "--libvirt")
        on(cli, labdir, "h1", "init")
        on(cli, labdir, "h2", "join")
        lab(cli, "demo-vm", "--dir", str(labdir), "ctr")
        lab(cli, "demo-vm", "--dir", str(labdir), "bare")
        xml = subprocess.run([cli, "-c", str(labdir / "hosts" / "h1" / "fenceless.toml"),
                              "vm", "show", "bare", "--json"], capture_output=True, text=True,
                             check=True, env=child_env()).stdout
        import json

        on(cli, labdir, "h1", "vm", "undefine", "bare")  # its volume stays: bare from now on
        bare = Bare(labdir, json.loads(xml)["xml"])
        for host in ("h1", "h2"):  # libvirtd probes QEMU on its first start: not timed
            bare.start(host)
            bare.stop(host)
        for i in range(args.runs):
            log(f"run {i + 1}/{args.runs}")
            rows["f-start"].append(on(cli, labdir, "h1", "vm", "start", "ctr"))
            rows["b-start"].append(bare.start("h1"))
            time.sleep(1.0)
            rows["f-move"].append(on(cli, labdir, "h1", "vm", "stop", "ctr", "--force")
                                  + on(cli, labdir, "h2", "vm", "start", "ctr"))
            rows["b-move"].append(bare.stop("h1") + bare.start("h2"))
            on(cli, labdir, "h2", "vm", "stop", "ctr", "--force")
            bare.stop("h2")
            # Live: started on h1 (untimed), moved while it runs to h2 (timed), and back
            # to stopped once h1 has released the disk.
            on(cli, labdir, "h1", "vm", "start", "ctr")
            bare.start("h1")
            time.sleep(1.0)
            rows["f-live"].append(on(cli, labdir, "h1", "vm", "migrate", "ctr", "--to", "h2",
                                     "--live"))
            rows["b-live"].append(bare.migrate("h1", "h2"))
            released(cli, labdir, "ctr")
            on(cli, labdir, "h2", "vm", "stop", "ctr", "--force")
            bare.stop("h2")
        bare.close()
        bare = None
        for i in range(args.fence_runs):
            log(f"fence run {i + 1}/{args.fence_runs}")
            margins.append(fence_margin(cli, labdir, args.n))
    finally:
        if bare is not None:
            bare.close()
        left = take_down(cli, labdir, scope)
    report(args, rows, margins)
    return 1 if left else 0


def report(args: argparse.Namespace, rows: dict[str, list[float]],
           margins: list[float]) -> None:
    def line(what: str, f: str, b: str) -> str:
        return (f"| {what} | {len(rows[f])} | {ms(med(rows[f]))} | {ms(med(rows[b]))} | "
                f"{med(rows[f]) / med(rows[b]):.2f} |")

    text = "\n".join([
        f"\n## VM start and cold move, {time.strftime('%Y-%m-%d %H:%M')} ({code_state()})\n",
        f"2 lab hosts with agents and a libvirtd each, N = {args.n} s; the counter guest "
        "(128 MiB, TCG) on a 16 MiB volume. fenceless: the whole CLI process (grant, claim, "
        "mapping, createXML). bare: libvirt's createXML/destroy called directly, the volume "
        "mapped on both hosts beforehand with no claim (what the replaced setup does).\n",
        "| step | runs | fenceless median ms | bare median ms | fenceless / bare |",
        "|---|---:|---:|---:|---:|",
        line("start on h1", "f-start", "b-start"),
        line("cold move h1 -> h2 (stop + start)", "f-move", "b-move"),
        line("live migration h1 -> h2", "f-live", "b-live"),
        "",
        "fenceless's live migration is the whole `vm migrate --live` process: the writer "
        "records the wish, h2's VM worker sees it at its next poll (every max(5N, 2 s)), "
        "records the start of the handoff, claims and maps the disk, and drives libvirt; "
        "bare: migrate3 alone, the disk mapped on both hosts beforehand.",
        "",
        f"VM self-fence margin ({len(margins)} runs; QEMU's death polled every 10 ms, h2's "
        "agent frozen right after a renewal; margin = (14N after the last change of h2 that "
        "h1 saw) - (QEMU gone)): min "
        f"{min(margins):.2f}N, median {statistics.median(margins):.2f}N, max "
        f"{max(margins):.2f}N; goal >= 2N: {'met' if min(margins) >= 2 else 'MISSED'}.",
        "", "Margins: " + ", ".join(f"{m:.2f}" for m in margins), ""]) if margins else ""
    print(text)
    with open(args.output, "a") as f:
        f.write(text)


if __name__ == "__main__":
    sys.exit(main())
