"""The writer's lvm shell: quoting, reading replies (saved from LVM 2.03.16), and what
happens to the shell when a command hangs, fails or the lease runs short.

The process-level tests use a real child (a small sh script standing in for an
lvm shell that misbehaves on purpose); the real LVM is in
tests/integration/test_lvm_shell.py.
"""

from __future__ import annotations

import os
import stat
import sys
import time
from pathlib import Path

import pytest

from fenceless.errors import CommandFailed, CommandTimeout
from fenceless.lvm import parse
from fenceless.lvm.shell import (
    BadShellOutput,
    LvmShell,
    ReplyReader,
    ShellLost,
    ShellRunner,
    command_line,
    quote,
)
from fenceless.runner import Result, SubprocessRunner

FIX = Path(__file__).parent.parent / "fixtures" / "lvm-2.03.16"


def replies(text: str) -> list:
    out, reader = [], ReplyReader()
    for line in text.splitlines():
        if reader.feed(line):
            out.append(reader.reply)
            reader = ReplyReader()
    return out


def test_replies_of_a_saved_session():
    version, exists, lvs, bogus = replies((FIX / "shell-session.txt").read_text())
    assert (version.done, version.rc) == (True, 0)
    assert exists.rc == 5
    assert exists.errors == ['Logical Volume "z3" already exists in volume group "expvg"']
    assert lvs.rc == 0
    rows = parse.report_rows(lvs.report, "lv", "lvs")
    assert rows == [{"lv_name": "lv1", "lv_size": "4194304"}]
    assert bogus.rc == 2 and "No such command" in bogus.errors[0]


def test_a_reply_that_is_not_json_is_refused():
    reader = ReplyReader()
    reader.feed("  {")
    reader.feed('      "log": [ {"log_type": ')
    with pytest.raises(BadShellOutput):
        reader.feed("  }")  # the closing line, but the object does not parse


def test_text_outside_objects_is_not_a_reply():
    reader = ReplyReader()
    assert not reader.feed("  Logical volume \"x\" created.")
    assert not reader.feed("")
    assert reader.reply.done is False


@pytest.mark.parametrize(("arg", "word"), [
    ("lvcreate", "lvcreate"),
    ('devices { filter = [ "a|^/dev/loop7$|" ] }',
     """'devices { filter = [ "a|^/dev/loop7$|" ] }'"""),
    ("it's", '"it\'s"'),
    ("", "''"),
    ("#tag", "'#tag'"),
])
def test_quote(arg, word):
    assert quote(arg) == word


@pytest.mark.parametrize("arg", ["a\nlvremove -y vg/x", "both ' and \"", "nul\0"])
def test_words_the_shell_cannot_carry_are_refused(arg):
    assert quote(arg) is None
    assert command_line(["lvcreate", "-n", arg, "vg"]) is None


class FakeInner:
    def __init__(self):
        self.calls = []

    def run(self, argv, **kw):
        self.calls.append(list(argv))
        return Result(tuple(argv), 0, "process", "")


def test_what_the_shell_does_not_take_runs_as_a_process():
    shell = LvmShell(lambda argv, env: pytest.fail("no shell should start"), "/sbin/lvm",
                     {"A": "1"})
    inner = FakeInner()
    runner = ShellRunner(inner, shell)
    runner.run(["/sbin/lvm", "vgcfgrestore", "-f", "x", "vg"], env={"A": "1"})
    runner.run(["/sbin/lvm", "lvcreate", "-n", "a\nb", "vg"], env={"A": "1"})
    runner.run(["/sbin/lvm", "lvs", "vg"], env={"A": "2"})
    runner.run(["/other/lvm", "lvs", "vg"], env={"A": "1"})
    runner.run(["/sbin/lvm", "lvs", "vg"], env={"A": "1"}, input="x")
    assert len(inner.calls) == 5


# --- a real child that plays an lvm shell -------------------------------------------------

OK = ('  {\n      "log": [\n          {"log_type":"status", "log_context":"shell", '
      '"log_object_type":"cmd", "log_ret_code":"1"}\n      ]\n  }')


def fake_lvm(tmp_path: Path, behaviour: str) -> str:
    """A stand-in for lvm in shell mode: answers "version", then ``behaviour`` for the rest."""
    script = tmp_path / "lvm"
    script.write_text(
        "#!/bin/sh\n"
        "echo $$ > \"$0.pid\"\n"
        "while read -r cmd rest; do\n"
        f"  if [ \"$cmd\" = version ]; then printf '%s\\n' '{OK}'; continue; fi\n"
        f"  {behaviour}\n"
        "done\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return str(script)


def make_shell(binary: str) -> LvmShell:
    runner = SubprocessRunner()
    return LvmShell(lambda argv, env: runner.spawn_lines(argv, env=env), binary, {},
                    profile=lambda _d: "p")


def gone(pid: int) -> bool:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        # A zombie counts as gone (its parent, this test process, has not reaped it).
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split(") ")[1].startswith("Z"):
                    return True
        except OSError:  # reaped meanwhile
            return True
        time.sleep(0.02)
    return False


def test_commands_share_one_process(tmp_path):
    binary = fake_lvm(tmp_path, f"printf '%s\\n' '{OK}'")
    shell = make_shell(binary)
    runner = ShellRunner(FakeInner(), shell)
    for _ in range(3):
        got = runner.run([binary, "lvs", "vg"], env={}, timeout=5)
        assert got.rc == 0
    pid = int(Path(binary + ".pid").read_text())
    assert shell.child is not None and shell.commands == 3
    shell.close()
    assert gone(pid)


def test_a_hung_command_kills_the_shell_and_counts_as_timed_out(tmp_path):
    binary = fake_lvm(tmp_path, "sleep 600")
    shell = make_shell(binary)
    with pytest.raises(ShellLost) as err:
        ShellRunner(FakeInner(), shell).run([binary, "lvcreate", "-n", "x", "vg"], env={},
                                            timeout=0.5)
    # A timeout: the journal checks the VG for the command's effect, as for a killed process.
    assert isinstance(err.value, CommandTimeout)
    assert shell.child is None
    assert gone(int(Path(binary + ".pid").read_text()))


def test_a_shell_that_dies_mid_command_is_lost_and_the_next_command_starts_a_new_one(tmp_path):
    flag = tmp_path / "died-once"
    binary = fake_lvm(tmp_path, f"if [ ! -e {flag} ]; then touch {flag}; exit 1; fi; "
                                f"printf '%s\\n' '{OK}'")
    shell = make_shell(binary)
    runner = ShellRunner(FakeInner(), shell)
    with pytest.raises(ShellLost):
        runner.run([binary, "lvremove", "-y", "vg/x"], env={}, timeout=5)
    assert runner.run([binary, "lvs", "vg"], env={}, timeout=5).rc == 0
    shell.close()


def test_a_lease_running_short_stops_the_command_and_the_shell(tmp_path):
    binary = fake_lvm(tmp_path, "sleep 600")
    shell = make_shell(binary)

    class Short(Exception):
        pass

    calls = []

    def between():
        calls.append(1)
        if len(calls) > 3:
            raise Short

    with pytest.raises(Short):
        ShellRunner(FakeInner(), shell).run([binary, "lvextend", "vg/x"], env={}, timeout=60,
                                            between=between)
    assert shell.child is None
    assert gone(int(Path(binary + ".pid").read_text()))


def test_a_failed_command_raises_with_lvms_message(tmp_path):
    failed = ('  {\n      "log": [\n          {"log_type":"error", "log_message":"no space"},\n'
              '          {"log_type":"status", "log_context":"shell", "log_object_type":"cmd", '
              '"log_ret_code":"5"}\n      ]\n  }')
    binary = fake_lvm(tmp_path, f"printf '%s\\n' '{failed}'")
    shell = make_shell(binary)
    with pytest.raises(CommandFailed, match="no space"):
        ShellRunner(FakeInner(), shell).run([binary, "lvcreate", "vg"], env={}, timeout=5)
    assert shell.child is not None  # a failed command is an answer: the shell stays
    shell.close()


def test_a_shell_that_does_not_start_leaves_commands_to_processes(tmp_path):
    binary = fake_lvm(tmp_path, "true")
    Path(binary).write_text("#!/bin/sh\nexit 3\n")
    shell = make_shell(binary)
    inner = FakeInner()
    got = ShellRunner(inner, shell).run([binary, "lvs", "vg"], env={}, timeout=5)
    assert got.stdout == "process" and shell.disabled
    assert inner.calls == [[binary, "lvs", "vg"]]


def test_a_role_dropped_while_a_command_runs_kills_it_and_starts_no_shell_again(tmp_path):
    """The lease thread drops the writer role inside ``between`` (it closes the shell
    there): the command stops as lost, and the shell, retired with the role, never
    starts again; a later command of the same Lvm runs as a process."""
    binary = fake_lvm(tmp_path, "sleep 600")
    shell = make_shell(binary)
    inner = FakeInner()
    runner = ShellRunner(inner, shell)

    def between():
        shell.close(retire=True)

    with pytest.raises(ShellLost, match="writer role was dropped"):
        runner.run([binary, "lvcreate", "-n", "x", "vg"], env={}, timeout=60, between=between)
    assert gone(int(Path(binary + ".pid").read_text()))
    Path(binary + ".pid").unlink()
    assert runner.run([binary, "lvs", "vg"], env={}, timeout=5).stdout == "process"
    assert not Path(binary + ".pid").exists()  # no new shell


def test_what_a_command_writes_to_stderr_before_its_reply_is_its_own():
    """Many lines on stderr, then the reply on stdout: all of them are the command's, and
    none is left over for the next one (a reader thread that lagged behind gave the
    next command the last lines of this one's)."""
    runner = SubprocessRunner()
    child = runner.spawn_lines([sys.executable, "-c",
                                "import sys\n"
                                "for cmd in sys.stdin:\n"
                                "    for i in range(3000):\n"
                                "        sys.stderr.write(f'{cmd.strip()} warning {i}\\n')\n"
                                "    sys.stderr.flush()\n"
                                "    print(cmd.strip() + ' done', flush=True)\n"])
    try:
        for cmd in ("first", "second"):
            child.send(cmd)
            assert child.read_line(10.0) == f"{cmd} done"
            err = child.take_stderr()
            assert err.endswith(f"{cmd} warning 2999\n"), err[-200:]
            assert ("first" in err) == (cmd == "first")
    finally:
        child.kill()
