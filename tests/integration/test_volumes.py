"""Volume operations through the writer: forwarding, refusals, refresh, concurrency and
the crash matrix, on a lab with real agents and real LVM."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import CLI, cli
from tests.integration.test_cluster import all_live, status, wait_until

pytestmark = pytest.mark.lab

MiB = 1 << 20


def volume_lab(make_lab, hosts=3, size="1G"):
    """A lab with agents, h1 the writer, every host joined and seen live by every host."""
    lab = make_lab(hosts, "--agents", "--size", size)
    lab.on("h1", "init")
    for h in lab.hosts[1:]:
        lab.on(h, "join")
    for h in lab.hosts:
        wait_until(lambda h=h: all_live(lab, h, lab.hosts), 20, f"all live from {h}")
    return lab


@pytest.fixture
def vlab(make_lab):
    return lambda hosts=3, size="1G": volume_lab(make_lab, hosts, size)


def volumes(lab, host):
    return {v["name"]: v for v in json.loads(lab.on(host, "volume", "list", "--json").stdout)}


def vgck(lab, writer):
    res = lab.exec(writer, "vgck", "sanvg", check=False)
    assert res.returncode == 0, res.stderr
    return res


def ledger_state(lab, host):
    from fenceless import config
    from fenceless.blockio import device_size, open_device
    from fenceless.clock import SystemClock
    from fenceless.control.anchor import read_anchor
    from fenceless.control.area import ControlArea

    path = config.load(lab.config(host)).vgs[0].devices[0]
    dev = open_device(path)
    try:
        area = ControlArea.open(dev, read_anchor(dev, device_size(path)), SystemClock())
        return area.ledger().current.state
    finally:
        dev.close()


def test_volume_from_a_non_writer_appears_everywhere(vlab):
    lab = vlab()
    res = json.loads(lab.on("h3", "volume", "create", "vm1-disk", "64M", "--json").stdout)
    assert res["name"] == "vm1-disk" and res["size_bytes"] == 64 * MiB and res["epoch"] == 1
    lab.on("h2", "volume", "create", "iso", "8M", "--shared-ro")
    for host in lab.hosts:
        vols = volumes(lab, host)
        assert vols["vm1-disk"] == {"name": "vm1-disk", "size_bytes": 64 * MiB,
                                    "shared_ro": False}
        assert vols["iso"]["shared_ro"] is True
        assert "fenceless-ctl" not in vols
    state = ledger_state(lab, "h2")
    assert state["intents"] == {}
    assert state["vg_seqno"] == json.loads(lab.on("h2", "scan", "--json").stdout)["vg"]["seqno"]
    # The writer keeps the latest metadata text on its own disk (LVM's backup is off).
    from fenceless import config
    from fenceless.lvm.mda import vg_identity

    copy = Path(config.load(lab.config("h1")).state_dir) / "vgs" / "sanvg" / "lvm-metadata"
    assert vg_identity(copy.read_text()) == ("sanvg", state["vg_seqno"])
    assert "\niso {\n" in copy.read_text()
    # ... and LVM's own backup file, so that a plain `vgcfgrestore sanvg` finds this version.
    assert (lab.dir / "hosts" / "h1" / "lvm" / "backup" / "sanvg").read_text() == \
        copy.read_text()


def test_the_fast_client_prints_what_the_full_cli_prints(vlab):
    """With the config file its agent checked, `volume create` goes to the agent with no
    more than ``_socket`` (cli/fast.py); the full CLI (here after the config was touched)
    prints the same, and refuses the same way."""
    lab = vlab(2)

    def run(*argv: str) -> tuple[subprocess.CompletedProcess[str], set[str]]:
        got = subprocess.run([sys.executable, "-X", "importtime", "-m", "fenceless.cli.main",
                              "-c", lab.config("h2"), *argv], capture_output=True, text=True,
                             check=False)
        modules = {ln.split("|")[-1].strip() for ln in got.stderr.splitlines()
                   if ln.startswith("import time:")}
        return got, modules

    fast, loaded = run("volume", "create", "f1", "8M")
    assert {"tomllib", "typing", "argparse", "fenceless.config", "json"} & loaded == set()
    exists, _ = run("volume", "create", "f1", "8M")
    grown, _ = run("volume", "extend", "f1", "+4M", "--json")
    Path(lab.config("h2")).touch()  # another version of the file: the full CLI runs
    full, loaded = run("volume", "create", "f2", "8M")
    assert "argparse" in loaded
    exists_full, _ = run("volume", "create", "f2", "8M")
    grown_full, _ = run("volume", "extend", "f2", "+4M", "--json")
    assert fast.stdout.replace("f1", "f2").split(" (VG seqno")[0] == \
        full.stdout.split(" (VG seqno")[0] == "create: f2 is 8M"
    assert (exists.returncode, exists_full.returncode) == (2, 2)
    strip = [ln for ln in exists.stderr.splitlines() if not ln.startswith("import time:")]
    strip_full = [ln for ln in exists_full.stderr.splitlines()
                  if not ln.startswith("import time:")]
    assert [ln.replace("f1", "f2") for ln in strip] == strip_full
    a, b = json.loads(grown.stdout), json.loads(grown_full.stdout)
    assert sorted(a) == sorted(b) and a["size_bytes"] == b["size_bytes"] == 12 * MiB


@pytest.mark.parametrize(("argv", "expect"), [
    (["create", "bad/name", "8M"], "Invalid volume name"),
    (["create", "x", "0M"], "greater than zero"),
    (["create", "x", "--", "-5G"], "Invalid size"),
    (["create", "x", "lots"], "Invalid size"),
    (["create", "x", "100T"], "free"),
    (["create", "fenceless-ctl", "8M"], "control area"),
    (["extend", "v", "4M"], "only grows"),
    (["extend", "nope", "+4M"], "not found"),
    (["rename", "v", "v"], "already exists"),
    (["remove", "nope"], "not found"),
    (["create", "x", "8M", "--request-id", "no spaces"], "Invalid request id"),
])
def test_bad_requests_are_refused_and_change_nothing(vlab, argv, expect):
    lab = vlab(2)
    lab.on("h2", "volume", "create", "v", "8M")
    seq = json.loads(lab.on("h1", "scan", "--json").stdout)["vg"]["seqno"]
    res = lab.on("h2", "volume", *argv, check=False)
    assert res.returncode == 2, res.stderr
    assert expect in res.stderr
    assert json.loads(lab.on("h1", "scan", "--json").stdout)["vg"]["seqno"] == seq


def test_remove_or_rename_refused_while_active_elsewhere(vlab):
    lab = vlab()
    lab.on("h3", "volume", "create", "busy", "16M")
    cli("lab", "activate", "--dir", str(lab.dir), "h2", "busy")
    for argv in (["remove", "busy"], ["rename", "busy", "other"]):
        res = lab.on("h3", "volume", *argv, check=False)
        assert res.returncode == 2 and "active on h2" in res.stderr
    cli("lab", "deactivate", "--dir", str(lab.dir), "h2", "busy")
    lab.on("h3", "volume", "remove", "busy")
    assert "busy" not in volumes(lab, "h1")


def test_a_volume_active_read_write_on_one_host_is_mapped_on_no_other(vlab):
    """Read-write on one host excludes every other mapping; read-only is shared."""
    lab = vlab()
    lab.on("h1", "volume", "create", "disk", "16M")
    lab.on("h1", "volume", "create", "image", "16M", "--shared-ro")
    lab_cmd = ["lab", "activate", "--dir", str(lab.dir)]
    cli(*lab_cmd, "h2", "disk")
    for host, extra in (("h3", []), ("h3", ["--readonly"]), ("h1", [])):
        res = cli(*lab_cmd, host, "disk", *extra, check=False)
        assert res.returncode == 2 and "active read-write on h2" in res.stderr, res.stderr
        assert lab_mapped(lab, host) == set()
    cli(*lab_cmd, "h2", "image", "--readonly")
    cli(*lab_cmd, "h3", "image", "--readonly")
    res = cli(*lab_cmd, "h1", "image", check=False)
    assert res.returncode == 2 and "active read-only on h" in res.stderr, res.stderr
    assert lab_mapped(lab, "h3") == {"image"}
    cli("lab", "deactivate", "--dir", str(lab.dir), "h2", "disk")
    cli(*lab_cmd, "h3", "disk")  # free again


def lab_mapped(lab, host):
    """The LVs a lab host has mapped, as its activator records them."""
    folder = lab.dir / "hosts" / host / "state" / "lab-active" / "sanvg"
    return {p.stem for p in folder.glob("*.json")} if folder.exists() else set()


def test_extend_refreshes_the_host_that_has_it_active_before_returning(vlab):
    lab = vlab()
    lab.on("h1", "volume", "create", "grow", "32M")
    act = json.loads(cli("lab", "activate", "--dir", str(lab.dir), "h2", "grow",
                         "--json").stdout)
    res = json.loads(lab.on("h3", "volume", "extend", "grow", "+32M", "--json").stdout)
    assert res["size_bytes"] == 64 * MiB
    assert res["refreshed"] == ["h2"] and res["not_refreshed"] == []
    size = subprocess.run(["blockdev", "--getsize64", act["device"]], capture_output=True,
                          text=True, check=True).stdout
    assert int(size) == 64 * MiB


def test_the_writer_plans_each_request_on_the_vg_as_the_last_one_left_it(vlab):
    """The writer reports only what a change touched and keeps the rest from before;
    every later check must still see the VG exactly as LVM does."""
    lab = vlab(2)
    steps = [("h1", ["create", "a", "8M"], 0), ("h2", ["create", "a", "8M"], 2),
             ("h2", ["rename", "a", "b"], 0), ("h1", ["create", "b", "4M"], 2),
             ("h1", ["create", "a", "4M"], 0), ("h2", ["extend", "b", "+4M"], 0),
             ("h1", ["remove", "a"], 0), ("h2", ["rename", "b", "a"], 0),
             ("h1", ["extend", "a", "8M"], 2), ("h2", ["remove", "b"], 2),
             ("h1", ["create", "b", "2M"], 0)]
    for host, argv, rc in steps:
        res = lab.on(host, "volume", *argv, check=False)
        assert res.returncode == rc, (argv, res.stderr)
    free = int(json.loads(lab.exec("h1", "vgs", "--readonly", "--reportformat", "json",
                                   "--units", "b", "--nosuffix", "-o", "vg_free", "sanvg")
                          .stdout)["report"][0]["vg"][0]["vg_free"])
    too_big = lab.on("h2", "volume", "create", "c", f"{free + 1}b", check=False)
    assert too_big.returncode == 2 and "free" in too_big.stderr, too_big.stderr
    exact = lab.on("h2", "volume", "create", "c", f"{free}b", check=False)
    assert exact.returncode == 0, exact.stderr
    assert {n: v["size_bytes"] for n, v in volumes(lab, "h2").items()} == {
        "a": 12 * MiB, "b": 4 * MiB, "c": free}
    vgck(lab, "h1")


def test_a_retried_request_id_is_applied_once(vlab):
    lab = vlab(2)
    lab.on("h1", "volume", "create", "r", "8M")
    first = json.loads(lab.on("h2", "volume", "extend", "r", "+8M", "--request-id",
                              "retry-me-1", "--json").stdout)
    again = json.loads(lab.on("h2", "volume", "extend", "r", "+8M", "--request-id",
                              "retry-me-1", "--json").stdout)
    assert first == again
    assert volumes(lab, "h1")["r"]["size_bytes"] == 16 * MiB
    other = lab.on("h2", "volume", "extend", "r", "+16M", "--request-id", "retry-me-1",
                   check=False)
    assert other.returncode == 2 and "already used for `extend`" in other.stderr, other.stderr
    assert volumes(lab, "h1")["r"]["size_bytes"] == 16 * MiB

@pytest.mark.slow
def test_every_host_sends_100_requests_at_once(vlab):
    lab = vlab(3, size="4G")
    procs = []
    for host in lab.hosts:
        for i in range(100):
            procs.append(subprocess.Popen(
                [*CLI, "-c", lab.config(host), "volume", "create", f"{host}-v{i:03d}", "4M",
                 "--timeout", "300"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                text=True))
    failed = [(p.args[-4], p.stderr.read()) for p in procs if p.wait(timeout=400) != 0]
    kinds: dict[str, list[str]] = {}
    for name, err in failed:
        kinds.setdefault(err.split(";")[0][:120], []).append(name)
    assert not failed, "\n".join(
        f"{len(names)} failed ({', '.join(names[:5])}...): {kind}" for kind, names in kinds.items())
    expected = {f"{h}-v{i:03d}" for h in lab.hosts for i in range(100)}
    for host in lab.hosts:
        assert set(volumes(lab, host)) == expected
    vgck(lab, "h1")
    state = ledger_state(lab, "h1")
    assert state["intents"] == {}
    assert sum(1 for r in state["requests"].values() if r["status"] == "ok") == 300


def test_a_writer_that_lost_its_lease_takes_the_role_back(vlab):
    """A writer frozen past its lease (an overloaded host) is fenced by its watchdog, and
    must not leave the cluster without a writer: once its agent runs again and its host
    lease is acquired anew, it takes the role back at a new epoch; requests asked in
    between, here and elsewhere, are carried out."""
    lab = vlab(3)
    before = status(lab, "h2")
    assert before["writer"]["host"] == "h1"
    cli("lab", "agent", "--dir", str(lab.dir), "h1", "pause")
    wait_until(lambda: next(h for h in status(lab, "h2")["hosts"] if h["name"] == "h1")[
        "lease"] in ("fail", "dead"), 30, "h1's lease to fail as seen from h2")
    wait_until(lambda: json.loads(cli("lab", "watchdog", "--dir", str(lab.dir), "h1", "fired",
                                      "--json").stdout), 30, "h1's watchdog to fire")
    reqs = [subprocess.Popen([*CLI, "-c", lab.config(h), "volume", "create", f"gap-{h}",
                              "4M", "--timeout", "60"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for h in ("h2", "h3")]
    cli("lab", "agent", "--dir", str(lab.dir), "h1", "start")  # as after a reset
    reqs.append(subprocess.Popen([*CLI, "-c", lab.config("h1"), "volume", "create", "gap-h1",
                                  "4M", "--timeout", "60"], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True))
    for req in reqs:
        _, err = req.communicate(timeout=90)
        assert req.returncode == 0, err
    st = wait_until(lambda: (s := status(lab, "h3"))["writer"]["epoch"] > 1 and s, 30,
                    "a new writer epoch")
    assert st["writer"]["host"] == "h1" and st["writer"]["epoch"] == 2
    h1 = next(h for h in st["hosts"] if h["name"] == "h1")
    assert h1["generation"] == 2  # a new incarnation took it, not the frozen one
    assert {"gap-h1", "gap-h2", "gap-h3"} <= set(volumes(lab, "h3"))
    vgck(lab, "h1")


CRASH_STEPS = ("journaled", "applied", "recorded")


@pytest.mark.slow
@pytest.mark.parametrize("op", ["create", "extend", "rename", "remove"])
def test_crash_matrix(vlab, op):
    """kill -9 the writer's agent at every journaled step; the next writer finishes it."""
    lab = vlab(3)
    for step in CRASH_STEPS:
        name = f"{op}-{step}"
        if op != "create":
            lab.on("h3", "volume", "create", name, "8M")
        writer = status(lab, "h3")["writer"]["host"]
        survivor = next(h for h in ("h1", "h2") if h != writer)
        cli("lab", "agent", "--dir", str(lab.dir), writer, "stop")
        cli("lab", "agent", "--dir", str(lab.dir), writer, "start",
            env={"FENCELESS_CRASHPOINT": f"volume.{op}.{step}"})
        # The stop released the writer lease; the restarted agent takes it again.
        lab.on(writer, "writer", "takeover", "--wait")
        argv = {"create": ["create", name, "8M"], "extend": ["extend", name, "+8M"],
                "rename": ["rename", name, name + "-new"], "remove": ["remove", name]}[op]
        req = subprocess.Popen([*CLI, "-c", lab.config("h3"), "volume", *argv, "--json",
                                "--timeout", "120"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
        # The writer's agent kills itself at the crash point; another host takes over.
        wait_until(lambda w=writer: cli("lab", "agent", "--dir", str(lab.dir), w, "pid",
                                        "--json", check=False).returncode != 0,
                   30, f"{writer}'s agent to die at volume.{op}.{step}")
        lab.on(survivor, "writer", "takeover", "--wait")
        _, err = req.communicate(timeout=120)
        assert req.returncode == 0, (step, err)
        vols = volumes(lab, "h3")
        if op == "create":
            assert vols[name]["size_bytes"] == 8 * MiB
        elif op == "extend":
            assert vols[name]["size_bytes"] == 16 * MiB, "applied exactly once"
        elif op == "rename":
            assert name not in vols and vols[name + "-new"]["size_bytes"] == 8 * MiB
        else:
            assert name not in vols
        state = ledger_state(lab, "h3")
        assert state["intents"] == {}, state["intents"]
        vgck(lab, survivor)
        # Bring the dead writer back (a new incarnation) for the next step.
        cli("lab", "agent", "--dir", str(lab.dir), writer, "start")
        wait_until(lambda: all_live(lab, "h3", lab.hosts), 30, "all live again")
