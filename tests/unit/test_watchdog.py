"""The watchdog: its decision on a fake clock, the agent's arming, and the real daemon.

The daemon test runs it for real: a separate "agent" process arms it and then
freezes; the watchdog must kill that process and everything in the work
cgroup, and record it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fenceless.agent.port import NoWatchdog
from fenceless.blockio import BlockDevice
from fenceless.cgroup import WorkGroup, cgroup2_root
from fenceless.clock import FakeClock, SystemClock, boottime
from fenceless.ondisk.layout import Layout
from fenceless.ops.writer import become_writer
from fenceless.watchdog import protocol as wp
from fenceless.watchdog.daemon import Client, Watch, Watchdog, read_fired
from tests.unit.harness import FakeVg, Host, N, host, make_area

LAYOUT = Layout.compute(4)


# --- the decision --------------------------------------------------------------------


def test_the_watch_fires_once_at_the_deadline_and_never_when_disarmed() -> None:
    clock = FakeClock(start=100.0)
    watch = Watch(clock)
    a, b = Client(), Client()
    watch.clients += [a, b]
    watch.receive(a, wp.Hello(10, 99))
    watch.receive(a, wp.Arm("sanvg", 101.0))
    watch.receive(b, wp.Arm("other", 101.0))
    watch.receive(b, wp.Disarm("other"))
    clock.advance(0.5)
    assert watch.due() == []
    clock.advance(0.5)
    fired = watch.due()
    assert [(f.client, f.vgs) for f in fired] == [(a, ("sanvg",))]
    assert watch.due() == []  # once


def test_a_closed_connection_leaves_its_deadlines_standing() -> None:
    clock = FakeClock(start=0.0)
    watch = Watch(clock)
    armed, idle = Client(), Client()
    watch.clients += [armed, idle]
    watch.receive(armed, wp.Arm("sanvg", 5.0))
    watch.closed(armed)  # the agent died: its LVM child may live on
    watch.closed(idle)
    assert watch.clients == [armed]
    clock.advance(5.0)
    assert len(watch.due()) == 1


def test_a_planned_stop_with_nothing_armed_is_forgotten() -> None:
    watch = Watch(FakeClock())
    c = Client()
    watch.clients.append(c)
    watch.receive(c, wp.Arm("v", 1e9))
    watch.receive(c, wp.Disarm("v"))
    watch.receive(c, wp.Bye())
    assert watch.clients == []


@pytest.mark.parametrize("line", ["", "arm", "arm vg", "arm vg x", "hello 1", "fire now",
                                  "disarm", "bye bye"])
def test_only_well_formed_messages_are_taken(line: str) -> None:
    with pytest.raises(wp.BadMessage):
        wp.parse(line)


# --- the agent arms it ---------------------------------------------------------------


@pytest.fixture
def pair(dev: BlockDevice) -> Iterator[tuple[FakeClock, Host, Host]]:
    clock = FakeClock()
    area = make_area(dev, clock)
    vg = FakeVg()
    yield clock, host(area, clock, "h1", 1, vg), host(area, clock, "h2", 2, vg)


def test_the_writer_arms_it_10n_after_each_renewal(pair):
    clock, h1, _h2 = pair
    assert become_writer(h1.port, "test").won
    clock.advance(N)
    h1.port.renew()
    assert h1.keeper.lease is not None
    assert h1.fence.armed["sanvg"] == pytest.approx(h1.keeper.lease.last_renewal + 10 * N)


def test_a_host_with_nothing_exclusive_disarms_and_one_with_mappings_arms(pair):
    _clock, _h1, h2 = pair
    h2.fence.armed["sanvg"] = 1.0
    h2.port.renew()
    assert "sanvg" not in h2.fence.armed
    h2.activator.mapped["db"] = 1 << 20
    h2.local.active(force=True)
    h2.port.renew()
    assert "sanvg" in h2.fence.armed


def test_without_a_watchdog_no_exclusive_work_is_taken(pair):
    _clock, h1, h2 = pair
    h1.fence.connected = False
    with pytest.raises(NoWatchdog, match="no watchdog guards this host"):
        become_writer(h1.port, "test")
    h2.fence.connected = False
    with pytest.raises(NoWatchdog):
        h2.port.claim("db")
    assert h2.local.mapping == {}


def test_a_writer_that_loses_its_watchdog_gives_up_the_role(pair):
    _clock, h1, _h2 = pair
    assert become_writer(h1.port, "test").won
    h1.fence.connected = False
    h1.port.renew()
    assert h1.port.epoch is None


# --- the real daemon ----------------------------------------------------------------

AGENT = textwrap.dedent("""
    import sys, time
    from fenceless.clock import boottime
    from fenceless.watchdog.client import WatchdogClient
    c = WatchdogClient(sys.argv[1], lambda msg: None)
    assert c.arm("sanvg", boottime() + float(sys.argv[2]))
    print("armed", flush=True)
    time.sleep(60)  # frozen: it never re-arms
""")


@pytest.mark.skipif(os.geteuid() != 0 or cgroup2_root() is None,
                    reason="needs root and a cgroup v2 hierarchy")
def test_the_daemon_kills_a_frozen_agent_and_its_work(tmp_path: Path) -> None:
    work = WorkGroup.under_root(f"fenceless-test-{os.getpid()}").create()
    logs: list[str] = []
    wd = Watchdog(str(tmp_path), work, SystemClock(), logs.append)
    ready = threading.Event()
    server = threading.Thread(target=wd.serve, kwargs={"ready": ready.set}, daemon=True)
    server.start()
    try:
        assert ready.wait(5)
        lvm = subprocess.Popen(["sleep", "60"])  # the agent's LVM child, in the cgroup
        work.add(lvm.pid)
        agent = subprocess.Popen([sys.executable, "-c", AGENT, str(tmp_path), "0.5"],
                                 stdout=subprocess.PIPE, text=True)
        assert agent.stdout is not None and agent.stdout.readline().strip() == "armed"
        armed_at = boottime()
        assert agent.wait(timeout=10) == -signal.SIGKILL
        assert lvm.wait(timeout=10) == -signal.SIGKILL
        deadline = time.monotonic() + 5  # the record follows the kill
        while not (fired := read_fired(str(tmp_path))) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(fired) == 1 and fired[0]["vgs"] == ["sanvg"] and fired[0]["work_gone"]
        assert fired[0]["agent_killed"] and fired[0]["fired_at"] >= armed_at + 0.4
        assert not work.populated()
    finally:
        wd.stop = True
        server.join(timeout=5)
        work.kill()
        time.sleep(0.1)
        os.rmdir(work.path)
