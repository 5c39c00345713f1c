"""agent/metrics.py: the published view rendered as Prometheus text that the
prometheus-client parser reads, served over HTTP and written as a textfile."""

from __future__ import annotations

import socket
import threading
import time
import urllib.request

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from fenceless.agent import metrics
from fenceless.config import HostConfig, VgConfig
from fenceless.localstate import set_agent_view

NAMES = {"fenceless_host_lease_age_seconds", "fenceless_host_lease_state",
         "fenceless_writer_epoch", "fenceless_is_writer", "fenceless_vg_free_bytes",
         "fenceless_vg_metadata_area_used_ratio", "fenceless_vms", "fenceless_request_seconds",
         "fenceless_lvm_command_seconds"}


def cfg(tmp_path, listen: str = "", textfile: str = "") -> HostConfig:
    return HostConfig(path="-", host="h1", state_dir=str(tmp_path), io_timeout=0.2,
                      vgs=(VgConfig("sanvg", ("/dev/loop9",)),), metrics_listen=listen,
                      metrics_textfile=textfile)


def publish(tmp_path) -> None:
    set_agent_view(str(tmp_path), "sanvg", {
        "mono": 100.0, "writer_epoch": 4, "leader_epoch": 4, "names": {"1": "h1", "2": "h2"},
        "hosts": {"1": {"state": "live", "changed": 99.5}, "2": {"state": "dead",
                                                              "changed": 80.0},
                  "3": {"state": "free", "changed": None}},
        "vg_report": {"free": 1 << 30, "mda_size": 16 << 20, "mda_free": 6 << 20},
        "vms_per_host": {"h2": 3}})


def families(text: str) -> dict[str, dict]:
    out = {}
    for fam in text_string_to_metric_families(text):
        out[fam.name] = {(s.name, tuple(sorted(s.labels.items()))): s.value for s in fam.samples}
    return out


def test_the_view_renders_as_prometheus_text(tmp_path):
    publish(tmp_path)
    m = metrics.Metrics(cfg(tmp_path))
    m.update(now=100.0)
    m.observe_request("sanvg", "create", 0.07)
    m.observe_lvm("lvcreate", 0.04)
    got = families(generate_latest(m.registry).decode())
    assert set(got) >= NAMES
    ages = got["fenceless_host_lease_age_seconds"]
    assert ages[("fenceless_host_lease_age_seconds", (("host", "h1"), ("vg", "sanvg")))] == 0.5
    state = got["fenceless_host_lease_state"]
    assert state[("fenceless_host_lease_state",
                  (("host", "h2"), ("state", "dead"), ("vg", "sanvg")))] == 1
    assert not any(dict(labels).get("host") == "3" for _n, labels in state)  # a free id
    assert got["fenceless_writer_epoch"][("fenceless_writer_epoch", (("vg", "sanvg"),))] == 4
    assert got["fenceless_vg_metadata_area_used_ratio"][
        ("fenceless_vg_metadata_area_used_ratio", (("vg", "sanvg"),))] == 0.25
    assert got["fenceless_vms"][("fenceless_vms", (("host", "h2"), ("vg", "sanvg")))] == 3
    req = got["fenceless_request_seconds"]
    assert req[("fenceless_request_seconds_count", (("op", "create"), ("vg", "sanvg")))] == 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_served_on_loopback_and_written_as_a_textfile(tmp_path):
    publish(tmp_path)
    port = free_port()
    textfile = tmp_path / "fenceless.prom"
    m = metrics.Metrics(cfg(tmp_path, f"127.0.0.1:{port}", str(textfile)))
    stop = threading.Event()
    thread = threading.Thread(target=metrics.serve, args=(m, stop, lambda _m: None))
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not textfile.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
    finally:
        stop.set()
        thread.join(10)
    assert set(families(body.decode())) >= NAMES
    assert set(families(textfile.read_text())) >= NAMES


def test_series_of_what_is_gone_are_gone(tmp_path):
    """A drained host's VM count, a freed host's lease state, a writer role that moved:
    each rendering starts empty, so none is left behind with its last value."""
    publish(tmp_path)
    m = metrics.Metrics(cfg(tmp_path))
    m.update(now=100.0)
    set_agent_view(str(tmp_path), "sanvg", {
        "mono": 101.0, "writer_epoch": None, "leader_epoch": 5, "names": {"1": "h1"},
        "hosts": {"1": {"state": "live", "changed": 100.5}}})
    m.update(now=101.0)
    got = families(generate_latest(m.registry).decode())
    assert "fenceless_vms" not in got or not got["fenceless_vms"]
    assert not any(dict(labels).get("host") == "h2"
                   for _n, labels in got["fenceless_host_lease_state"])
    assert got["fenceless_is_writer"][("fenceless_is_writer", (("vg", "sanvg"),))] == 0


def test_an_op_name_from_the_disk_does_not_make_a_series_of_its_own(tmp_path):
    m = metrics.Metrics(cfg(tmp_path))
    for i in range(50):
        m.observe_request("sanvg", f"junk-{i}", 0.01)
    text = generate_latest(m.registry).decode()
    assert "junk" not in text and 'op="other"' in text
