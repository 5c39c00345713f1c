"""Never two writers, never a disk in use removed: the watchdog, on real labs.

- The writer's LVM command stalls between reading and committing the VG
  metadata (strace delays its first write), and its agent is frozen; or the
  agent and its LVM child are both stopped with SIGSTOP. The watchdog kills
  them before another host may take over, so the stalled commit never lands:
  LVM's seqno and the audit log show only the new writer's changes (the
  request it was working on stays queued, and the new writer carries it out).
- Claims: 150 LVs mapped on one host keep its lease, and every one of them is
  refused to a remove; an agent restart keeps them refused throughout.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from fenceless.clock import boottime
from tests.conftest import CLI, cli
from tests.integration.test_cluster import agent, all_live, status, wait_until

pytestmark = pytest.mark.lab

N = 0.2
STALL = 6.0  # seconds strace holds the stalled write: longer than a takeover takes


def slow_lvm(lab, host: str, stall: float = STALL) -> None:
    """LVM on ``host`` with the commit of a create of ``stall-*`` held back by strace.

    ``-P`` limits strace to the host's PV: its first write there (LVM writes the
    new metadata with write(2), the lab sets use_aio=0) waits STALL seconds, as
    on a path that queues I/O (``stall`` seconds); everything else runs as usual.

    The wrapper decides by each command's arguments, so the writer runs LVM as one
    process per command here (``lvm_shell = false``): its long-lived shell gets its
    commands on stdin. The shell sits in the same work cgroup that the watchdog kills
    (tests/integration/test_check.py checks it is there), and a command in it that
    outlives the lease is killed with it (tests/unit/test_lvm_shell.py).
    """
    script = Path(lab.dir) / f"slow-lvm-{host}"
    delay = int(stall * 1_000_000)
    script.write_text(
        "#!/bin/sh\n"
        'case "$*" in *stall-*)\n'
        f"  exec strace -f -qq -o /dev/null -P {lab.device(host)} -e trace=write "
        f"-e inject=write:delay_enter={delay}:when=1 /usr/sbin/lvm \"$@\" ;;\n"
        "esac\n"
        'exec /usr/sbin/lvm "$@"\n')
    script.chmod(0o755)
    config = Path(lab.config(host))
    config.write_text(config.read_text().replace(
        'lvm_binary = "/usr/sbin/lvm"', f'lvm_binary = "{script}"\nlvm_shell = false'))


def slow_writer_lab(make_lab, stall: float = STALL):
    """Three hosts with agents, h1 the writer with its LVM held back (``slow_lvm``)."""
    lab = make_lab(3)
    slow_lvm(lab, "h1", stall)
    for h in lab.hosts:
        agent(lab, h, "start")
    lab.on("h1", "init")
    for h in ("h2", "h3"):
        lab.on(h, "join")
    for h in lab.hosts:
        wait_until(lambda h=h: all_live(lab, h, lab.hosts), 20, f"all live from {h}")
    return lab


@pytest.fixture
def three(make_lab):
    return slow_writer_lab(make_lab)


def lvm_children(lab, host: str) -> list[int]:
    from fenceless import config
    from fenceless.cgroup import WorkGroup

    return WorkGroup.under_root(config.load(lab.config(host)).cgroup).pids()


def seqno(lab, host: str = "h2") -> int:
    return json.loads(lab.on(host, "scan", "--json").stdout)["vg"]["seqno"]


def fired(lab, host: str) -> list[dict]:
    return json.loads(cli("lab", "watchdog", "--dir", str(lab.dir), host, "fired",
                          "--json").stdout)


@pytest.mark.parametrize("freeze", ["strace-stall", "sigstop-both"])
def test_a_frozen_writer_is_fenced_before_the_takeover(three, freeze):
    lab = three
    lab.on("h3", "volume", "create", "before", "8M")
    # h3 asks for a create that h1 starts, and stalls (or is stopped) in.
    asker = subprocess.Popen([*CLI, "-c", lab.config("h3"), "volume", "create",
                              "stall-me", "8M", "--timeout", "30"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_until(lambda: lvm_children(lab, "h1"), 20, "h1's lvcreate to run")
    if freeze == "strace-stall":
        time.sleep(0.5)  # it is in its held-back write now
        agent(lab, "h1", "pause")
    else:
        agent(lab, "h1", "pause")
        for pid in lvm_children(lab, "h1"):
            os.kill(pid, signal.SIGSTOP)
    frozen_at = boottime()
    lab.on("h2", "writer", "takeover", "--wait", "--timeout", "30")
    took_over = boottime()
    lab.on("h2", "volume", "create", "after", "8M")
    after = seqno(lab)

    # The watchdog fired before h2 could take over, and killed h1's work.
    got = fired(lab, "h1")
    assert len(got) == 1 and got[0]["work_gone"], got
    assert frozen_at < got[0]["fired_at"] < took_over
    assert lvm_children(lab, "h1") == []
    # Give a stalled write every chance to land, then resume what is left of h1.
    time.sleep(max(0.0, STALL - (boottime() - frozen_at)) + 1.0)
    cli("lab", "agent", "--dir", str(lab.dir), "h1", "resume", check=False)
    time.sleep(1.0)
    asker.wait(timeout=60)  # its request stayed queued: the new writer ran it
    vols = {v["name"] for v in json.loads(lab.on("h3", "volume", "list", "--json").stdout)}
    assert vols == {"before", "after", "stall-me"}
    # Nothing of h1's landed after the takeover: the metadata is the new writer's.
    now = seqno(lab)
    assert now >= after and seqno(lab, "h3") == now
    res = lab.exec("h2", "vgck", "sanvg", check=False)
    assert res.returncode == 0, res.stderr
    log = [e for e in json.loads(lab.on("h2", "log", "--json").stdout)
           if e.get("result") == "ok"]
    assert {(e["command"][3], e["epoch"]) for e in log} == {
        ("before", 1), ("after", 2), ("stall-me", 2)}

def test_a_writer_whose_lvm_is_slower_than_its_lease_keeps_the_role(make_lab):
    """A live agent keeps its lease while its LVM command runs: a commit held back for
    15N (a path that queues I/O, or a host under load) finishes, with no fencing and no
    takeover. Renewing only between commands killed the command at 7N, every time."""
    lab = slow_writer_lab(make_lab, stall=15 * N)
    started = boottime()
    lab.on("h3", "volume", "create", "stall-slow", "8M", "--timeout", "20")
    assert boottime() - started >= 15 * N  # it really was held back
    assert fired(lab, "h1") == []
    log = [e for e in json.loads(lab.on("h2", "log", "--json").stdout)
           if e.get("result") == "ok"]
    assert [(e["command"][3], e["epoch"]) for e in log] == [("stall-slow", 1)]
    seen = {h["name"]: h for h in status(lab, "h2")["hosts"]}
    assert seen["h1"]["lease"] == "live"


@pytest.mark.slow
def test_150_mapped_volumes_keep_the_lease_and_are_never_removed(make_lab):
    lab = make_lab(3, "--agents")
    lab.on("h1", "init")
    for h in ("h2", "h3"):
        lab.on(h, "join")
    names = [f"vm-{i:03d}-disk" for i in range(150)]
    script = "".join(f"lvcreate -q -an -Zn -L 4m -n {n} sanvg\n" for n in names)
    subprocess.run([*CLI, "lab", "exec", "--dir", str(lab.dir), "h1", "--", "lvm"],
                   input=script, text=True, check=True, capture_output=True, timeout=300)
    cli("lab", "activate", "--dir", str(lab.dir), "h2", *names, timeout=300)
    time.sleep(4 * 2 * N)  # several renewals with all of them claimed
    seen = {h["name"]: h for h in status(lab, "h1")["hosts"]}
    assert seen["h2"]["lease"] == "live"
    for name in (names[0], names[77], names[149]):
        res = lab.on("h3", "volume", "remove", name, check=False)
        assert res.returncode == 2 and "active on h2" in res.stderr, res.stderr
    show = json.loads(lab.on("h3", "volume", "show", names[77], "--json").stdout)
    assert show["active_on"] == ["h2"]


def test_an_agent_restart_keeps_the_claims(make_lab):
    lab = make_lab(3, "--agents")
    lab.on("h1", "init")
    for h in ("h2", "h3"):
        lab.on(h, "join")
    lab.on("h3", "volume", "create", "busy", "8M")
    cli("lab", "activate", "--dir", str(lab.dir), "h2", "busy")

    def refused() -> None:
        res = lab.on("h3", "volume", "remove", "busy", check=False)
        assert res.returncode == 2 and "active on h2" in res.stderr, res.stderr

    refused()
    agent(lab, "h2", "stop")  # releases its lease: FREE, the mapping stays
    refused()
    agent(lab, "h2", "start")
    refused()
    wait_until(lambda: all_live(lab, "h1", ["h2"]), 30, "h2 live again")
    refused()
    assert fired(lab, "h2") == []  # a planned restart is not fenced
    cli("lab", "deactivate", "--dir", str(lab.dir), "h2", "busy")
    lab.on("h3", "volume", "remove", "busy")
