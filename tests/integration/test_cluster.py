"""The control area on a lab with real agents: init, join, takeover, stale writers, caches,
corruption. io_timeout 0.1-0.2 s so lease times stay short."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import CLI, cli

pytestmark = pytest.mark.lab

N = 0.2


def wait_until(pred, timeout, what):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = pred()
            if last:
                return last
        except AssertionError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")


def status(lab, host):
    return json.loads(lab.on(host, "status", "--json").stdout)


def start_many(lab, argvs):
    """Start several fenceless CLIs at once; return their (rc, stdout, stderr)."""
    procs = [subprocess.Popen([*CLI, "-c", lab.config(h), *argv], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for h, argv in argvs]
    return [(p.wait(timeout=120), p.stdout.read(), p.stderr.read()) for p in procs]


def agent(lab, host, action):
    return cli("lab", "agent", "--dir", str(lab.dir), host, action)


def all_live(lab, host, names):
    st = status(lab, host)
    seen = {h["name"]: h["lease"] for h in st["hosts"]}
    return all(seen.get(n) == "live" for n in names) and st


@pytest.fixture
def cluster(make_lab):
    """A lab of 4 hosts with agents; h1 initialized, h2 and h3 joined (h4 left out)."""
    def make(hosts=4, join=("h2", "h3"), io_timeout=N):
        lab = make_lab(hosts, "--agents")
        for h in lab.hosts:
            # the lab was made with io_timeout 0.2; tests that want another rewrite it
            if io_timeout != 0.2:
                p = Path(lab.config(h))
                text = p.read_text().replace("io_timeout = 0.2", f"io_timeout = {io_timeout}")
                p.write_text(text)
        if io_timeout != 0.2:
            for h in lab.hosts:
                agent(lab, h, "stop")
                agent(lab, h, "start")
        lab.on("h1", "init")
        for h in join:
            lab.on(h, "join")
        wait_until(lambda: all_live(lab, "h1", ["h1", *join]), 30, "hosts live")
        return lab
    return make


def test_init_race_exactly_one_wins(make_lab):
    lab = make_lab(3, "--agents")
    results = start_many(lab, [("h1", ["init"]), ("h2", ["init"])])
    rcs = sorted(r[0] for r in results)
    assert rcs == [0, 2], results
    loser = next(r for r in results if r[0] == 2)
    assert "Refused" in loser[2]
    winner = "h1" if results[0][0] == 0 else "h2"
    st = status(lab, "h3")
    assert st["writer"]["host"] == winner and st["writer"]["epoch"] == 1
    again = lab.on("h3", "init", check=False)
    assert again.returncode == 2 and "already has a fenceless control area" in again.stderr


def test_init_refuses_foreign_vg_unless_adopt(make_lab):
    lab = make_lab(2, "--agents")
    dev = lab.device("h1")
    lab.exec("h1", "pvcreate", "-q", "--setphysicalvolumesize", "1000m", dev)
    lab.exec("h1", "vgcreate", "-q", "sanvg", dev)
    lab.exec("h1", "lvcreate", "-q", "-an", "-Zn", "-L", "8m", "-n", "olddisk", "sanvg")
    res = lab.on("h1", "init", check=False)
    assert res.returncode == 2 and "init --adopt" in res.stderr
    before = json.loads(lab.on("h2", "scan", "--json").stdout)["lvs"]
    lab.on("h1", "init", "--adopt")
    after = {lv["name"]: lv for lv in json.loads(lab.on("h2", "scan", "--json").stdout)["lvs"]}
    assert after["olddisk"] == before[0]
    assert "fenceless-ctl" in after
    lab.on("h2", "join")
    assert status(lab, "h2")["writer"]["host"] == "h1"


def test_join_race_gives_each_host_its_own_id(make_lab):
    lab = make_lab(5, "--agents")
    lab.on("h1", "init")
    results = start_many(lab, [(h, ["join", "--json"]) for h in ("h2", "h3", "h4", "h5")])
    assert [r[0] for r in results] == [0, 0, 0, 0], results
    ids = [json.loads(r[1])["host_id"] for r in results]
    assert len(set(ids)) == 4 and 1 not in ids
    st = wait_until(lambda: all_live(lab, "h1", lab.hosts), 30, "all live")
    assert sorted(h["id"] for h in st["hosts"]) == [1, 2, 3, 4, 5]


def test_status_json_shape_and_no_lvm(cluster):
    lab = cluster(hosts=3)
    st = wait_until(lambda: all_live(lab, "h3", ["h1", "h2", "h3"]), 10, "live from h3")
    assert st["writer"]["host"] == "h1" and st["writer"]["epoch"] == 1
    h2 = st["hosts"][1]
    assert (h2["name"], h2["id"], h2["lease"]) == ("h2", 2, "live")
    assert st["lease_source"] == "agent"
    # status runs no LVM command: it works with no lvm binary on PATH at all
    env = {"PATH": "/nonexistent"}
    res = cli("-c", lab.config("h2"), "status", "--json", env=env)
    assert json.loads(res.stdout)["writer"]["host"] == "h1"
    # The agent answers a plain status (cli/fast.py) with the same read a CLI makes
    # itself without one: same cluster, writer and hosts; only what each agent publishes
    # at every renewal moves on between the two reads (its sector's age, its facts: a
    # CI run saw h3's metadata seqno published in between).
    from fenceless import config
    from fenceless.ops.status import read_status

    def same(s: dict) -> dict:
        return {**s, "hosts": [{**h, "age": None, "facts": None} for h in s["hosts"]]}

    served = json.loads(cli("-c", lab.config("h2"), "status", "--json").stdout)
    here = read_status(config.load(lab.config("h2")), None)
    assert same(served) == same(here)
    # ... and, with the config file the agent checked, without loading any of fenceless
    # but the CLI's entry (no TOML parser, no typing, no codecs): the agent renders it.
    imports = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "fenceless.cli.main", "-c",
         lab.config("h2"), "status"], capture_output=True, text=True, check=True)
    loaded = {ln.split("|")[-1].strip() for ln in imports.stderr.splitlines()}
    assert {"tomllib", "typing", "fenceless.config", "fenceless.errors", "json"} & loaded \
        == set()
    assert imports.stdout.startswith("cluster ") and "writer: h1 (id 1" in imports.stdout
    # A config changed since the agent started is read and checked anew by the CLI.
    cfg_path = lab.config("h2")
    with open(cfg_path, "a") as f:
        f.write("# edited\n")
    again = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "fenceless.cli.main", "-c", cfg_path,
         "status"], capture_output=True, text=True, check=True)
    assert "fenceless.config" in {ln.split("|")[-1].strip() for ln in again.stderr.splitlines()}
    assert again.stdout == imports.stdout or again.stdout.startswith("cluster ")
    agent(lab, "h2", "stop")  # no agent: read from the disk by the CLI itself
    # (its last published view counts for 4N more: lease states from it until then)
    st = wait_until(lambda: (s := json.loads(cli("-c", lab.config("h2"), "status",
                                                 "--json").stdout))["lease_source"]
                    == "disk only (no running agent here)" and s, 10, "the view to age")
    assert st["writer"]["host"] == "h1" and [h["name"] for h in st["hosts"]] == [
        "h1", "h2", "h3"]
    text = cli("-c", lab.config("h2"), "status").stdout
    assert text.startswith("cluster ") and "writer: h1 (id 1" in text

@pytest.mark.slow
def test_takeover_race_exactly_one_winner_in_50_rounds(cluster):
    """Each round kills the writer and has the three other live hosts race for the role.

    Five hosts, so that a round need not wait for the last round's killed writer: its
    restarted agent must watch its old host lease for 14N before it may take it again
    (no clocks are shared), and it sits out one round while it does."""
    lab = cluster(hosts=5, join=("h2", "h3", "h4", "h5"), io_timeout=0.1)
    epoch = 1
    restarting = "h5"  # the last round's writer, taking its host id back (h5 sits out first)
    for round_no in range(50):
        pool = [h for h in lab.hosts if h != restarting]
        st = wait_until(lambda pool=pool: all_live(lab, pool[-1], pool), 30,
                        f"{pool} live")
        writer = st["writer"]["host"]
        assert st["writer"]["epoch"] == epoch
        agent(lab, writer, "kill")
        racers = [h for h in pool if h != writer]
        assert len(racers) == 3
        results = start_many(lab, [(h, ["writer", "takeover", "--wait", "--json"])
                                   for h in racers])
        winners = [h for h, r in zip(racers, results, strict=True) if r[0] == 0]
        assert len(winners) == 1, (round_no, results)
        for h, r in zip(racers, results, strict=True):
            if h not in winners:
                # Lost the race; or (a CLI that started late on a loaded machine) read the
                # writer epoch only after the winner had won: it saw a live writer and
                # waited for it, as asked, up to its time limit.
                assert r[0] == 2 and ("won the writer lease at epoch" in r[2] or
                                      f"the writer {winners[0]}'s host lease is live" in r[2]), r
        epoch += 1
        got = json.loads(results[racers.index(winners[0])][1])
        assert got["epoch"] == epoch and got["host"] == winners[0]
        agent(lab, writer, "start")
        restarting = writer
        st = status(lab, winners[0])
        assert st["writer"]["host"] == winners[0] and st["ledger"]["epoch"] == epoch


def control_offset(lab, host):
    from fenceless import config
    from fenceless.blockio import device_size, open_device
    from fenceless.control.anchor import read_anchor

    path = config.load(lab.config(host)).vgs[0].devices[0]
    dev = open_device(path)
    try:
        return read_anchor(dev, device_size(path)).offset
    finally:
        dev.close()


def shared_bytes(lab, host):
    """Every shared sector of the control area, read with O_DIRECT through host's device."""
    from fenceless import config
    from fenceless.blockio import device_size, open_device
    from fenceless.clock import SystemClock
    from fenceless.control.anchor import read_anchor
    from fenceless.control.area import ControlArea

    cfg = config.load(lab.config(host))
    path = cfg.vgs[0].devices[0]
    dev = open_device(path)
    try:
        anchor = read_anchor(dev, device_size(path))
        area = ControlArea.open(dev, anchor, SystemClock())
        snap = area.shared_snapshot()
        snap["superblock"] = area.dev.read(0, 4096)
        return snap
    finally:
        dev.close()


def test_stopped_writer_writes_nothing_after_takeover(cluster):
    lab = cluster(hosts=4, join=("h2", "h3"))
    agent(lab, "h1", "pause")
    try:
        res = lab.on("h2", "writer", "takeover", "--wait", "--json")
        assert json.loads(res.stdout)["epoch"] == 2
        # Give the stopped writer a reason to write: a new host joins meanwhile.
        lab.on("h4", "join")
        wait_until(lambda: "h4" in {h["name"] for h in status(lab, "h2")["hosts"]}
                   and status(lab, "h2")["ledger"]["generation"], 10, "h4 recorded")
        time.sleep(4 * N)
        before = shared_bytes(lab, "h3")
    finally:
        # Its watchdog fenced it before h2 could take over: nothing is left to resume.
        cli("lab", "agent", "--dir", str(lab.dir), "h1", "resume", check=False)
    fired = json.loads(cli("lab", "watchdog", "--dir", str(lab.dir), "h1", "fired",
                           "--json").stdout)
    assert len(fired) == 1 and fired[0]["agent_killed"] and fired[0]["work_gone"]
    time.sleep(20 * N)
    after = shared_bytes(lab, "h3")
    for region in before:
        assert before[region] == after[region], f"{region} changed after SIGCONT"
    agent(lab, "h1", "start")  # as after a reset: a new incarnation, a reader
    st = wait_until(lambda: all_live(lab, "h2", ["h1", "h2", "h3", "h4"]), 30, "h1 back")
    assert st["writer"]["host"] == "h2" and st["writer"]["epoch"] == 2
    h1 = next(h for h in st["hosts"] if h["name"] == "h1")
    assert h1["generation"] == 2, "h1 came back as a new incarnation"


def test_reader_with_a_warm_stale_cache_still_sees_the_latest_ledger(cluster):
    lab = cluster(hosts=4, join=("h2", "h3"))
    dev = lab.device("h3")
    st = status(lab, "h3")
    gen_before = st["ledger"]["generation"]
    # Warm h3's page cache over the whole device's head and keep it open.
    ctl = control_offset(lab, "h3")
    # Both ledger slots (3 MiB and 4 MiB into the control area): only the writer writes them.
    ledger = (ctl + (3 << 20), 2 << 20)
    fd = os.open(dev, os.O_RDONLY)
    try:
        cached = os.pread(fd, ledger[1], ledger[0])
        lab.on("h4", "join")  # the writer h1 records h4: a ledger write through h1's device
        st = wait_until(lambda: (s := status(lab, "h3"))["ledger"]["generation"] > gen_before
                        and s, 10, "new ledger generation seen from h3")
        assert "h4" in {h["name"] for h in st["hosts"]}
        # The buffered view through h3's device is normally still the old one: O_DIRECT is
        # what saw the change. (The kernel may drop clean cache at any time, so a fresh
        # buffered view is reported, not failed: the requirement is the status above.)
        if os.pread(fd, ledger[1], ledger[0]) != cached:
            import warnings

            warnings.warn("h3's page cache was dropped during the test; staleness not shown",
                          stacklevel=1)
    finally:
        os.close(fd)


def _corrupt(lab, host, region, data_fn):
    """Overwrite one sector of a control-area region through host's device; return offset."""
    from fenceless import config
    from fenceless.blockio import device_size, open_device
    from fenceless.clock import SystemClock
    from fenceless.control.anchor import read_anchor
    from fenceless.control.area import ControlArea

    cfg = config.load(lab.config(host))
    path = cfg.vgs[0].devices[0]
    dev = open_device(path, writable=True)
    try:
        anchor = read_anchor(dev, device_size(path))
        area = ControlArea.open(dev, anchor, SystemClock())
        r = area.layout.region(region[0])
        off = r.offset + region[1] * 4096
        old = area.dev.read(off, 4096)
        new = data_fn(old)
        area.dev.write(off, new)
        return anchor.offset + off, new
    finally:
        dev.close()


def _read_abs(lab, host, offset):
    import mmap

    fd = os.open(lab.device(host), os.O_RDONLY | os.O_DIRECT)
    buf = mmap.mmap(-1, 4096)
    try:
        os.preadv(fd, [buf], offset)
        return bytes(buf)
    finally:
        os.close(fd)


@pytest.mark.parametrize("kind", ["random", "zero-magic", "old-version"])
def test_corrupt_sectors_are_refused_and_never_overwritten(cluster, kind):
    lab = cluster(hosts=3, join=("h2",))
    rng = random.Random(7)

    def corrupt(old):
        if kind == "random":
            return bytes(rng.getrandbits(8) for _ in range(4096))
        if kind == "zero-magic":
            return bytes(4) + old[4:]
        return old[:4] + (0).to_bytes(2, "little") + old[6:]

    # A host sector that nobody owns yet (id 3) and both ledger slots.
    offsets = [_corrupt(lab, "h1", ("hosts", 2), corrupt)]
    offsets.append(_corrupt(lab, "h1", ("ledger_a", 0), corrupt))
    offsets.append(_corrupt(lab, "h1", ("ledger_b", 0), corrupt))
    res = lab.on("h2", "status", check=False)
    assert res.returncode == 4, res.stderr
    assert "Ledger has no valid slot" in res.stderr
    assert "region 'ledger_a' at offset" in res.stderr
    # A change asked of the writer is refused with the reason (it used to wait out its
    # time limit and end with "no answer", exit 2), and nothing is run: nothing could be
    # journaled.
    res = lab.on("h2", "volume", "create", "x", "8M", "--timeout", "30", check=False)
    assert res.returncode == 4, res.stderr
    assert "Ledger has no valid slot" in res.stderr
    # h3 cannot take the corrupt id 3: it must take another, never overwrite it.
    time.sleep(6 * N)  # agents run several rounds, the writer tries to write the ledger
    joined = lab.on("h3", "join", "--json", check=False)
    for off, data in offsets:
        assert _read_abs(lab, "h1", off) == data, f"sector at {off} was overwritten"
    if joined.returncode == 0:
        assert json.loads(joined.stdout)["host_id"] != 3
    # The writer's periodic re-read of the ledger finds the damage and says so.
    wait_until(lambda: "refusing to use or overwrite it" in
               (lab.dir / "hosts/h1/agent.log").read_text(), 40 * N, "the writer's complaint")
    for off, data in offsets:
        assert _read_abs(lab, "h1", off) == data, f"sector at {off} was overwritten"


def test_corrupt_superblock_is_a_clear_integrity_error(cluster):
    lab = cluster(hosts=3, join=())
    _corrupt(lab, "h1", ("superblock", 0), lambda old: old[:100] + b"\xff" + old[101:])
    res = lab.on("h3", "status", check=False)
    assert res.returncode == 4
    assert "region 'superblock' at offset 0: checksum mismatch" in res.stderr
    # The writer's agent, which read it when it attached, writes it back: a plan first.
    plan = json.loads(lab.on("h1", "repair", "superblock", "--json").stdout)
    assert plan["applied"] is False and "checksum mismatch" in plan["damage"]
    assert lab.on("h3", "status", check=False).returncode == 4
    done = json.loads(lab.on("h1", "repair", "superblock", "--yes", "--plan", plan["plan"],
                             "--json").stdout)
    assert done["applied"] and Path(done["kept"]).stat().st_size == 4096
    st = json.loads(lab.on("h3", "status", "--json").stdout)
    assert st["cluster"] == plan["cluster"] and st["writer"]["host"] == "h1"
    res = lab.on("h1", "repair", "superblock", check=False)
    assert res.returncode == 4 and "the superblock reads" in res.stderr
    assert "Traceback" not in res.stderr


def test_handover_moves_the_writer_to_the_named_host(cluster):
    lab = cluster(hosts=3)
    wait_until(lambda: all_live(lab, "h3", ["h1", "h2", "h3"]), 10, "live from h3")
    res = lab.on("h3", "writer", "handover", "h2", "--json")  # asked from a non-writer
    assert json.loads(res.stdout) == {"outcome": "done", "host": "h2", "epoch": 2}
    res = lab.on("h2", "writer", "handover", "h3", "--json")  # asked on the writer
    assert json.loads(res.stdout)["epoch"] == 3
    st = status(lab, "h1")
    assert st["writer"]["host"] == "h3" and st["writer"]["state"] == "active"
    refused = lab.on("h1", "writer", "takeover", check=False)
    assert refused.returncode == 2 and "is alive" in refused.stderr


def test_a_writer_that_dies_mid_handover_leaves_the_role_to_the_named_host(cluster):
    """Killed after recording "hand over to h2" but before releasing: h2 finishes the
    handover by itself once the old writer is gone, and the restarted old writer does
    not take the role back from it."""
    lab = cluster(hosts=3)
    wait_until(lambda: all_live(lab, "h3", ["h1", "h2", "h3"]), 10, "live from h3")
    agent(lab, "h1", "stop")
    cli("lab", "agent", "--dir", str(lab.dir), "h1", "start",
        env={"FENCELESS_CRASHPOINT": "agent.handover-recorded"})
    lab.on("h1", "writer", "takeover", "--wait")  # the stop released the role
    asked = lab.on("h3", "writer", "handover", "h2", "--timeout", "1", check=False)
    # h1 died at the crash point, so it never answers. The command either gives up, or,
    # when it runs late under load, already sees h2 holding the role it was promised.
    # Both are right; what may never be reported is another host or h1 keeping the role.
    assert (asked.returncode != 0
            or asked.stdout.startswith("h2 is the metadata writer at epoch 3")), asked
    wait_until(lambda: cli("lab", "agent", "--dir", str(lab.dir), "h1", "pid",
                           check=False).returncode != 0, 30, "h1's agent to die")
    st = wait_until(lambda: (s := status(lab, "h3"))["writer"]["host"] == "h2" and s,
                    30, "h2 to finish the handover")
    assert st["writer"]["epoch"] == 3
    agent(lab, "h1", "start")
    wait_until(lambda: all_live(lab, "h3", ["h1", "h2", "h3"]), 30, "h1 back")
    time.sleep(6 * 0.2)  # a few renewals of h1's new incarnation
    st = status(lab, "h3")
    assert (st["writer"]["host"], st["writer"]["epoch"]) == ("h2", 3)


def test_a_second_machine_with_a_live_hosts_name_is_refused(cluster):
    lab = cluster(hosts=4, join=("h2", "h3"))
    # h4 is misconfigured with h2's name: it must be refused, not merged with h2.
    cfg = Path(lab.config("h4"))
    cfg.write_text(cfg.read_text().replace('host = "h4"', 'host = "h2"'))
    agent(lab, "h4", "stop")
    agent(lab, "h4", "start")
    res = lab.on("h4", "join", check=False)
    assert res.returncode == 2, res.stderr
    assert "h2" in res.stderr and ("is in use" in res.stderr or "already live" in res.stderr)
    st = wait_until(lambda: all_live(lab, "h1", ["h1", "h2", "h3"]), 10, "cluster intact")
    assert [h["name"] for h in st["hosts"]] == ["h1", "h2", "h3"]
    assert next(h for h in st["hosts"] if h["name"] == "h2")["generation"] == 1
