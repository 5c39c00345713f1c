"""The runners: the real one's process rules, and the recording wrapper tests and benches use."""

from __future__ import annotations

import os
import time

import pytest

from fenceless.config import HostConfig
from fenceless.errors import CommandFailed, CommandTimeout
from fenceless.ops.context import Context
from fenceless.runner import RecordingRunner, Result, SubprocessRunner


class Scripted:
    """An inner runner that answers without a process and keeps what it was asked."""

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.asked: list[tuple[tuple[str, ...], dict[str, object]]] = []

    def run(self, argv, **kw):
        self.asked.append((tuple(argv), kw))
        if self.fail:
            raise CommandFailed(argv0=argv[0], rc=3, stderr="no")
        return Result(tuple(argv), 0, "out", "")


def test_recording_runner_keeps_each_argv_and_passes_everything_on():
    inner = Scripted()
    rec = RecordingRunner(inner)
    res = rec.run(["lvm", "lvs"], env={"A": "1"}, input="x", timeout=5.0, check=False,
                  die_with_parent=True)
    rec.run(iter(["lvm", "vgs"]))  # any sequence: kept as a tuple
    assert res.stdout == "out"
    assert rec.calls == [("lvm", "lvs"), ("lvm", "vgs")]
    assert inner.asked[0] == (("lvm", "lvs"), {"env": {"A": "1"}, "input": "x", "timeout": 5.0,
                                                "check": False, "die_with_parent": True,
                                                "between": None})
    assert inner.asked[1][1] == {"env": None, "input": None, "timeout": None, "check": True,
                                 "die_with_parent": False, "between": None}


def test_recording_runner_counts_a_command_that_fails():
    rec = RecordingRunner(Scripted(fail=True))
    with pytest.raises(CommandFailed):
        rec.run(["lvm", "lvcreate"])
    assert rec.calls == [("lvm", "lvcreate")]


def test_recording_runner_keeps_the_callers_argv_not_the_setpriv_prefix():
    rec = RecordingRunner()  # a real SubprocessRunner inside
    res = rec.run(["true"], die_with_parent=True)
    assert rec.calls == [("true",)]
    assert res.argv[:2] == ("setpriv", "--pdeathsig")


def test_production_does_not_record():
    """The agent's context runs for months: its runner must not keep a list of commands."""
    ctx = Context(HostConfig(path="/c", host="h1", state_dir="/s", io_timeout=1.0, vgs=()))
    assert type(ctx.runner) is SubprocessRunner
    assert not hasattr(ctx.runner, "calls")


def test_subprocess_runner_sets_lc_all_and_adds_env():
    r = SubprocessRunner(base_env={"PATH": "/usr/bin:/bin", "LC_ALL": "de_DE.UTF-8"})
    out = r.run(["sh", "-c", 'echo "$LC_ALL $X"'], env={"X": "y"}).stdout
    assert out == "C y\n"


def test_subprocess_runner_check_and_rc():
    r = SubprocessRunner()
    assert r.run(["sh", "-c", "exit 3"], check=False).rc == 3
    with pytest.raises(CommandFailed, match="exit 3"):
        r.run(["sh", "-c", "echo bad >&2; exit 3"])
    with pytest.raises(CommandFailed, match="command not found"):
        r.run(["/nonexistent/fenceless-test"])


def test_subprocess_runner_kills_the_whole_group_on_timeout(tmp_path):
    """The child's child holds stdout open: the runner must kill it, not wait for it."""
    marker, pidfile = tmp_path / "late", tmp_path / "pid"
    script = f"sh -c 'echo $$ > {pidfile}; sleep 30; touch {marker}' & wait"
    with pytest.raises(CommandTimeout):
        SubprocessRunner().run(["sh", "-c", script], timeout=0.3)
    grandchild = int(pidfile.read_text())
    deadline = time.monotonic() + 10  # only a bound on the wait for the kernel to reap it
    while os.path.exists(f"/proc/{grandchild}") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not os.path.exists(f"/proc/{grandchild}"), "the grandchild outlived the timeout"
    assert not marker.exists()


def test_between_runs_while_the_command_runs_and_its_output_is_whole():
    """The agent renews its lease in ``between``: it must be called all along a slow
    command, and the output read across the calls must arrive whole."""
    calls = []
    script = "head -c 200000 /dev/zero | tr '\\0' x; sleep 0.5; cat"
    res = SubprocessRunner(between_every=0.02).run(
        ["sh", "-c", script], input="tail", between=lambda: calls.append(time.monotonic()))
    assert res.stdout == "x" * 200000 + "tail"
    assert len(calls) >= 2  # called again and again, not once (its cadence is not a test's)


def test_what_between_raises_kills_the_command_group(tmp_path):
    """A lease that ran short stops the work: the command and its children die."""
    marker, pidfile = tmp_path / "late", tmp_path / "pid"
    script = f"sh -c 'echo $$ > {pidfile}; sleep 30; touch {marker}' & wait"

    class Short(Exception):
        pass

    def between() -> None:
        if pidfile.exists() and pidfile.read_text().strip():  # the grandchild runs
            raise Short()

    with pytest.raises(Short):
        SubprocessRunner(between_every=0.02).run(["sh", "-c", script], between=between)
    grandchild = int(pidfile.read_text())
    deadline = time.monotonic() + 10  # only a bound on the wait for the kernel to reap it
    while os.path.exists(f"/proc/{grandchild}") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not os.path.exists(f"/proc/{grandchild}"), "the grandchild outlived the stop"
    assert not marker.exists()


def test_between_does_not_stretch_the_timeout():
    calls = []
    with pytest.raises(CommandTimeout):
        SubprocessRunner(between_every=0.02).run(["sleep", "5"], timeout=0.3,
                                                 between=lambda: calls.append(1))
    assert calls  # it ran while the command did, and did not keep it alive past 0.3 s
