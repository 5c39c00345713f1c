"""`fenceless check` on a real lab: nothing on a healthy cluster; each hazard planted is
found with its code and fix, and running that fix clears it.

(Hazards that fenceless itself prevents, such as an LV read-write on two hosts, are
planted past it in tests/integration/test_check_plant.py.)"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest

from tests.integration.test_cluster import wait_until
from tests.integration.test_metadata import mlab  # noqa: F401  (the fixture)

pytestmark = pytest.mark.lab


def findings(lab, host: str) -> tuple[int, list[dict]]:
    """`fenceless check` as an admin on ``host`` runs it: in the host's namespace, where
    its own guard is (the others' come from what their agents publish)."""
    res = lab.exec(host, "fenceless", "check", "--json", check=False)
    assert res.returncode in (0, 6), res.stderr
    return res.returncode, json.loads(res.stdout)["findings"]


def codes(found: list[dict]) -> set[tuple[str, str | None]]:
    return {(f["code"], f["host"]) for f in found}


def run_fix(lab, host: str, fix: str) -> None:
    """A finding's fix, run as its text says ("on HOST: ..." or "on the writer: ...")."""
    where, _, command = fix.partition(": ")
    where = {"on the writer": "h1"}.get(where, where.removeprefix("on "))
    lab.exec(where, *shlex.split(command))


@pytest.fixture
def cluster(mlab):  # noqa: F811
    """test_metadata's three hosts with agents (h1 the writer), each with its guard."""
    lab = mlab
    for h in lab.hosts:
        lab.exec(h, "fenceless", "guard", "install")
    return lab


def test_a_healthy_lab_has_no_error_and_each_planted_hazard_is_found_and_fixed(cluster):
    lab = cluster
    lab.on("h2", "volume", "create", "web-disk", "8M")

    def healthy(host: str) -> bool:
        rc, found = findings(lab, host)
        return (rc, [f for f in found if f["severity"] != "info"]) == (0, [])

    # (Each agent publishes its guard's state at its next renewal after the install.)
    wait_until(lambda: healthy("h3"), 10, "no error and no warning")

    # The guard removed on h2: found there, with the command that puts it back.
    lab.exec("h2", "fenceless", "guard", "remove")
    rc, found = findings(lab, "h2")
    assert rc == 6 and ("E_GUARD", "h2") in codes(found)
    fix = next(f["fix"] for f in found if f["code"] == "E_GUARD")
    assert fix == "on h2: fenceless guard install"
    run_fix(lab, "h2", fix)
    assert ("E_GUARD", "h2") not in codes(findings(lab, "h2")[1])

    # Autoactivation turned on by hand on the writer.
    lab.exec("h1", "vgchange", "-q", "--setautoactivation", "y", "sanvg")
    found = wait_until(lambda: (got := findings(lab, "h3")[1]) and
                       ("W_AUTOACTIVATION", None) in codes(got) and got, 10, "autoactivation")
    run_fix(lab, "h3", next(f["fix"] for f in found if f["code"] == "W_AUTOACTIVATION"))
    assert ("W_AUTOACTIVATION", None) not in codes(findings(lab, "h3")[1])

    # An LV made by hand, past fenceless: accounted for by nobody.
    lab.exec("h1", "lvcreate", "-q", "-an", "-Zn", "-L", "4m", "-n", "by-hand", "sanvg")
    found = findings(lab, "h2")[1]
    hand = [f for f in found if f["code"] == "I_UNACCOUNTED"]
    assert [(f["severity"], f["fix"]) for f in hand] == [
        ("info", "if it is still needed, nothing; else: fenceless volume remove by-hand")]
    run_fix(lab, "h2", "on h2: " + hand[0]["fix"].split("else: ")[1])
    wait_until(lambda: healthy("h2"), 10, "h2 sees no hazard")
    # h2's guard, removed and put back above, is also as h1 sees it now.
    wait_until(lambda: healthy("h1"), 10, "h1 sees no hazard either")

    # Text for people, with the same codes.
    text = lab.exec("h2", "fenceless", "check").stdout
    assert text.strip().endswith("0 error(s), 0 warning(s), 0 note(s)") or \
        text.strip() == "VG sanvg: no hazard found"


def test_every_agent_writes_its_metrics_and_the_writer_its_requests(cluster):
    """The lab's agents write node-exporter textfiles (each host shares this machine's
    loopback): prometheus-client's parser reads them, with the writer's request latency
    and LVM command durations once a request ran."""
    from prometheus_client.parser import text_string_to_metric_families

    lab = cluster
    lab.on("h3", "volume", "create", "m1", "8M")
    # The writer's long-lived lvm shell lives in its work cgroup, which the watchdog kills.
    from tests.integration.test_fencing import lvm_children

    def argv(pid: int) -> list[bytes]:
        try:
            return [a for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") if a]
        except OSError:
            return []

    # (the shell is `lvm` with no command; a reader's report may come and go beside it)
    shells = [p for p in lvm_children(lab, "h1")
              if len(got := argv(p)) == 1 and got[0].endswith(b"lvm")]
    assert len(shells) == 1

    def families(host: str) -> dict[str, list]:
        path = lab.dir / "hosts" / host / "metrics.prom"
        if not path.exists():
            return {}
        return {f.name: f.samples for f in text_string_to_metric_families(path.read_text())}

    got = wait_until(lambda: (f := families("h1")) and any(
        s.name == "fenceless_request_seconds_count" and s.value >= 1
        for s in f.get("fenceless_request_seconds", [])) and f, 10, "h1's request metrics")
    assert {"fenceless_host_lease_age_seconds", "fenceless_writer_epoch",
            "fenceless_lvm_command_seconds", "fenceless_vg_free_bytes",
            "fenceless_vg_metadata_area_used_ratio"} <= set(got)
    assert any(s.labels.get("command") == "lvcreate" for s in got["fenceless_lvm_command_seconds"])
    reader = wait_until(lambda: families("h3"), 10, "h3's metrics")
    live = [s for s in reader["fenceless_host_lease_state"]
            if s.labels["state"] == "live" and s.value == 1]
    assert {s.labels["host"] for s in live} == {"h1", "h2", "h3"}
    # The same cluster at a glance: `status --watch`, drawn twice, 80 columns, no LVM
    # (no lvm binary on PATH at all).
    out = lab.on("h2", "status", "--watch", "--interval", "0.2", "--count", "2",
                 env={"PATH": "/nonexistent"}).stdout
    assert all(len(line) <= 80 for line in out.splitlines()), out
    assert "writer:" in out and "h1 epoch 1 [active]" in out
    assert "requests on the writer: " in out  # h1 ran m1's create
    for name in ("h1", "h2", "h3"):
        assert name in out
    assert out.count("live") >= 3


def test_a_dead_writer_and_a_host_with_its_own_io_timeout_are_found_and_fixed(cluster):
    from tests.integration.test_cluster import agent

    lab = cluster
    wait_until(lambda: not [f for f in findings(lab, "h3")[1] if f["severity"] != "info"],
               10, "a healthy start")
    # h3's config says another io_timeout than the cluster's.
    config = Path(lab.config("h3"))
    good = config.read_text()
    config.write_text(good.replace("io_timeout = 0.2", "io_timeout = 0.3"))
    agent(lab, "h3", "stop")
    agent(lab, "h3", "start")
    found = wait_until(lambda: (got := findings(lab, "h2")[1]) and
                       ("W_IO_TIMEOUT", "h3") in codes(got) and got, 20, "W_IO_TIMEOUT")
    fix = next(f["fix"] for f in found if f["code"] == "W_IO_TIMEOUT")
    assert fix.startswith("on h3: set io_timeout = 0.2 in its fenceless.toml")
    config.write_text(good)  # the fix, as it says
    agent(lab, "h3", "stop")
    agent(lab, "h3", "start")
    wait_until(lambda: ("W_IO_TIMEOUT", "h3") not in codes(findings(lab, "h2")[1]), 20,
               "W_IO_TIMEOUT cleared")

    # The writer's agent dies: found, then the fix (a takeover) clears it.
    agent(lab, "h1", "kill")
    found = wait_until(lambda: (got := findings(lab, "h2")[1]) and
                       {c for c, _h in codes(got)} & {"W_WRITER", "E_WRITER"} and got,
                       20, "the writer's lease failing")
    fix = next(f["fix"] for f in found if f["code"] in ("W_WRITER", "E_WRITER"))
    assert "fenceless writer takeover --wait" in fix
    lab.on("h2", "writer", "takeover", "--wait", "--timeout", "30")
    wait_until(lambda: not {c for c, _h in codes(findings(lab, "h2")[1])}
               & {"W_WRITER", "E_WRITER"}, 20, "a live writer again")
