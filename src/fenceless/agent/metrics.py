"""Prometheus metrics of the agent (prometheus-client), on loopback or in a textfile.

What is measured comes from what the agent already has: the view each VG thread
publishes for the CLI (``VgAgent.publish``: host lease states and ages, the
writer epoch, the VG's free space and metadata area as the writer last saw them,
VMs per host from the writer's ledger), plus two histograms the VG thread feeds
as it works (request latency on the writer, LVM command durations), which cost
an ``observe`` each. The rendering and the serving run in a thread of normal
priority of their own, never on a thread that renews leases
(``agent/priority.py``), and a metric that cannot be read is left out, never
guessed.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Gauge, Histogram, start_http_server
from prometheus_client import write_to_textfile as _write_textfile

from fenceless.clock import boottime
from fenceless.config import HostConfig
from fenceless.localstate import agent_view
from fenceless.lvm.parse import metadata_area_use

EVERY = 2.0  # seconds between two renderings
KNOWN_OPS = frozenset({"create", "extend", "rename", "remove", "restore", "protect",
                       "vm-define", "vm-undefine", "vm-place", "host-maintenance",
                       "host-forget"})
STATES = ("live", "fail", "dead", "free", "unknown")
# Request latency: from the writer taking a request to its recorded outcome.
REQUEST_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
LVM_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 60.0)


class Metrics:
    """The registry and its metrics; ``update`` renders the published views into it."""

    def __init__(self, cfg: HostConfig) -> None:
        self.cfg = cfg
        self.registry = CollectorRegistry()
        r, vg, vh = self.registry, ["vg"], ["vg", "host"]
        self.lease_age = Gauge("fenceless_host_lease_age_seconds", "Seconds since a host's "
                               "lease sector last changed, as this agent observed it", vh,
                               registry=r)
        self.lease_state = Gauge("fenceless_host_lease_state", "1 for the state this agent "
                                 "sees a host's lease in", [*vh, "state"], registry=r)
        self.writer_epoch = Gauge("fenceless_writer_epoch", "The metadata writer's epoch "
                                  "(the writer lease's version) as last read", vg, registry=r)
        self.is_writer = Gauge("fenceless_is_writer", "1 while this host is the metadata "
                               "writer", vg, registry=r)
        self.vg_free = Gauge("fenceless_vg_free_bytes", "Free space of the VG, as the writer "
                             "last saw it (the writer's agent only)", vg, registry=r)
        self.mda_used = Gauge("fenceless_vg_metadata_area_used_ratio", "Share of the space "
                              "LVM's metadata text may take that it does take (the writer's "
                              "agent only)", vg, registry=r)
        self.vms = Gauge("fenceless_vms", "VMs placed on each host, from the writer's ledger "
                         "(the writer's agent only)", vh, registry=r)
        self.requests = Histogram("fenceless_request_seconds", "Volume and VM requests on "
                                  "the writer: from taking one to its recorded outcome",
                                  [*vg, "op"], buckets=REQUEST_BUCKETS, registry=r)
        self.lvm = Histogram("fenceless_lvm_command_seconds", "LVM commands this agent ran",
                             ["command"], buckets=LVM_BUCKETS, registry=r)

    def update(self, now: float | None = None) -> None:
        """Render every VG's published view (a VG without one is left out). The gauges
        start empty each time: a host freed or drained, or a role gone, leaves no series
        behind."""
        now = boottime() if now is None else now
        for gauge in (self.lease_age, self.lease_state, self.writer_epoch, self.is_writer,
                      self.vg_free, self.mda_used, self.vms):
            gauge.clear()
        for vg in self.cfg.vgs:
            view = agent_view(self.cfg.state_dir, vg.name)
            if view is not None:
                self._vg(vg.name, view, now)

    def _vg(self, vg: str, view: dict[str, Any], now: float) -> None:
        names = view.get("names", {})
        for hid, seen in view.get("hosts", {}).items():
            host = str(names.get(hid, hid))
            state = seen.get("state")
            if state == "free" and host == hid:
                continue  # a host id nobody holds: no series for it
            for s in STATES:
                self.lease_state.labels(vg, host, s).set(1 if state == s else 0)
            if isinstance(seen.get("changed"), int | float):
                self.lease_age.labels(vg, host).set(max(0.0, now - float(seen["changed"])))
        epoch = view.get("leader_epoch")
        if isinstance(epoch, int):
            self.writer_epoch.labels(vg).set(epoch)
        self.is_writer.labels(vg).set(1 if view.get("writer_epoch") else 0)
        seen_vg = view.get("vg_report") or {}
        if isinstance(seen_vg.get("free"), int):
            self.vg_free.labels(vg).set(seen_vg["free"])
        if isinstance(seen_vg.get("mda_size"), int) and seen_vg["mda_size"] > 0 and \
                isinstance(seen_vg.get("mda_free"), int) and seen_vg["mda_free"] >= 0:
            usable, in_use = metadata_area_use(seen_vg["mda_size"], seen_vg["mda_free"])
            self.mda_used.labels(vg).set(in_use / usable)
        for host, count in (view.get("vms_per_host") or {}).items():
            self.vms.labels(vg, host).set(count)

    def observe_request(self, vg: str, op: str, seconds: float) -> None:
        # ``op`` came from a mailbox on the LUN: only known ones get series of their own.
        self.requests.labels(vg, op if op in KNOWN_OPS else "other").observe(seconds)

    def request_observer(self, vg: str) -> Callable[[str, float], None]:
        return lambda op, seconds: self.observe_request(vg, op, seconds)

    def observe_lvm(self, command: str, seconds: float) -> None:
        self.lvm.labels(command).observe(seconds)


def lower_this_thread() -> None:
    """Normal scheduling for the calling thread (and what it starts): rendering metrics
    must never compete with lease renewals."""
    with contextlib.suppress(OSError, AttributeError):
        os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, 0, 0)


def serve(metrics: Metrics, stop: threading.Event, log: Callable[[str], None]) -> None:
    """The metrics thread: lower its priority, start the HTTP server (``metrics_listen``),
    then render every EVERY seconds (and write ``metrics_textfile``) until ``stop``."""
    lower_this_thread()
    cfg = metrics.cfg
    if cfg.metrics_listen:
        addr, _, port = cfg.metrics_listen.rpartition(":")
        try:
            start_http_server(int(port), addr=addr.strip("[]"), registry=metrics.registry)
            log(f"metrics on http://{cfg.metrics_listen}/metrics")
        except OSError as exc:
            log(f"WARNING: no metrics on {cfg.metrics_listen}: {exc}")
    while True:
        try:
            metrics.update()
            if cfg.metrics_textfile:
                _write_textfile(cfg.metrics_textfile, metrics.registry)
        except (OSError, ValueError) as exc:
            log(f"metrics not rendered: {exc}")
        if stop.wait(EVERY):
            return
