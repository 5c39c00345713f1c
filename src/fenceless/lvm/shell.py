"""The writer's long-lived ``lvm`` shell: LVM commands without a process each.

A bare ``lvcreate`` spends part of its time starting: exec, loading its
configuration, setting up its tool context. The writer runs every metadata
change of the cluster, so it keeps one ``lvm`` process per VG and writes its
commands on the shell's stdin, as lvm2's D-Bus daemon does (docs/design.md,
"The LVM shell").

How a command's end and its status are known: the shell runs with a command
profile (``fenceless-shell``, installed in LVM's profile directory) that turns
on ``log/report_command_log`` and JSON output. Every command then ends with a
JSON object whose ``log`` holds one status entry for the command itself
(``log_context`` "shell", ``log_object_type`` "cmd", ``log_ret_code`` 1 for
success), and the same object holds the command's report. Error messages come
as ``log_type`` "error" entries.

What keeps it safe:
- Only the commands of ``SHELL_COMMANDS``, and only arguments that the shell's
  word splitting passes through unchanged (``quote``); anything else runs as a
  process, as before. Nothing read from the LUN reaches a shell of the system.
- One command at a time (a lock); a second caller gets a process instead.
- A command that outlives its time, output that does not parse, or a shell that
  dies: the shell is killed (its whole process group, which sits in the agent's
  work cgroup) and the command counts as timed out, so the journal checks the
  VG for its effect as for any killed LVM command. The next command starts a
  new shell.
- The shell is closed whenever the writer role is dropped, and restarted after
  ``MAX_COMMANDS`` commands so that no leak of a months-long process builds up.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from fenceless.errors import CommandFailed, CommandTimeout
from fenceless.lvm.adapter import Lvm
from fenceless.runner import Result, Runner

PROFILE_NAME = "fenceless-shell"
PROFILE_TEXT = """\
# Written by fenceless (lvm/shell.py): the metadata writer's long-lived lvm shell
# reads each command's status from LVM's command log report.
log {
	report_command_log = 1
	command_log_selection = "log_type=status || log_type=error"
}
report {
	output_format = "json"
}
"""
# The commands of the writer's hot path (reports and volume changes).
SHELL_COMMANDS = frozenset({"lvs", "vgs", "pvs", "lvcreate", "lvextend", "lvrename", "lvremove"})
MAX_COMMANDS = 1000
START_TIMEOUT = 10.0  # seconds for a new shell to answer its first command
POLL = 0.05  # seconds between two calls of ``between`` while a command runs
LVM_OK = 1  # ECMD_PROCESSED in the command log


class ShellLost(CommandTimeout):
    """`{argv0}` in the writer's lvm shell did not complete: {why}. The shell was killed"""


class LineChild(Protocol):
    pid: int

    def send(self, line: str) -> None: ...
    def read_line(self, wait: float) -> str | None: ...
    def take_stderr(self) -> str: ...
    def alive(self) -> bool: ...
    def kill(self, *, wait: bool = True) -> None: ...


Spawn = Callable[[Sequence[str], Mapping[str, str]], LineChild]


def quote(arg: str) -> str | None:
    """``arg`` as one word of the lvm shell's splitting, or None if it cannot be one.

    The shell splits on white space; a word may be wrapped whole in ``'`` or ``"``
    (with no escapes inside), and a word that starts with ``#`` begins a comment.
    """
    if "\n" in arg or "\r" in arg or "\0" in arg:
        return None
    if arg and not any(c.isspace() or c in "'\"" for c in arg) and not arg.startswith("#"):
        return arg
    if "'" not in arg:
        return f"'{arg}'"
    if '"' not in arg:
        return f'"{arg}"'
    return None


def command_line(args: Sequence[str]) -> str | None:
    """One line for the shell (command and arguments), or None."""
    words = [quote(a) for a in args]
    if any(w is None for w in words) or len(words) > 60:  # lvm's shell takes 64 words
        return None
    return " ".join(w for w in words if w is not None)


@dataclass
class Reply:
    """What the shell said about one command."""

    done: bool = False
    ret_code: int = 0
    report: str = ""  # the JSON object with the report, as text (the parsers take text)
    errors: list[str] = field(default_factory=list)

    @property
    def rc(self) -> int:
        """As the exit code of the same command run as a process (0: success)."""
        return 0 if self.ret_code == LVM_OK else (self.ret_code or 5)


class BadShellOutput(ValueError):
    pass


class ReplyReader:
    """Collects stdout lines into JSON objects until the command's own status comes.

    LVM prints each top-level object of its JSON output opening with ``  {`` and
    closing with ``  }`` on lines of their own; lines outside objects are ignored.
    """

    def __init__(self) -> None:
        self.reply = Reply()
        self._chunk: list[str] | None = None

    def feed(self, line: str) -> bool:
        """Take one line; True once the command is complete."""
        if self._chunk is None:
            if line.rstrip() == "  {":
                self._chunk = [line]
            return False
        self._chunk.append(line)
        if line.rstrip() != "  }":
            return False
        text = "\n".join(self._chunk)
        self._chunk = None
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as exc:
            raise BadShellOutput(f"output that is not JSON ({exc.msg})") from exc
        if not isinstance(doc, dict):
            raise BadShellOutput("a JSON value that is not an object")
        self._take(doc, text)
        return self.reply.done

    def _take(self, doc: dict[str, Any], text: str) -> None:
        if "report" in doc:
            self.reply.report = text
        log = doc.get("log", [])
        if not isinstance(log, list):
            raise BadShellOutput("a command log that is not a list")
        for entry in log:
            if not isinstance(entry, dict):
                continue
            if entry.get("log_type") == "error":
                self.reply.errors.append(str(entry.get("log_message", "")))
            if entry.get("log_type") == "status" and entry.get("log_context") == "shell" \
                    and entry.get("log_object_type") == "cmd":
                try:
                    self.reply.ret_code = int(entry.get("log_ret_code", "0"))
                except ValueError as exc:
                    raise BadShellOutput("a return code that is not a number") from exc
                self.reply.done = True


def install_profile(system_dir: str | None) -> str:
    """Write the shell's command profile into LVM's profile directory (if it differs);
    its name. LVM looks for profiles only there (``config/profile_dir``)."""
    directory = os.path.join(system_dir or "/etc/lvm", "profile")
    path = os.path.join(directory, PROFILE_NAME + ".profile")
    try:
        with open(path) as f:
            if f.read() == PROFILE_TEXT:
                return PROFILE_NAME
    except OSError:
        pass
    os.makedirs(directory, exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(PROFILE_TEXT)
    os.replace(tmp, path)
    return PROFILE_NAME


class LvmShell:
    """One ``lvm`` process, started at first use, that runs commands one at a time."""

    def __init__(self, spawn: Spawn, binary: str, env: Mapping[str, str],
                 log: Callable[[str], None] = lambda _m: None,
                 profile: Callable[[str | None], str] = install_profile) -> None:
        self.spawn = spawn
        self.binary = binary
        self.env = dict(env)
        self.log = log
        self.profile = profile
        self.child: LineChild | None = None
        self.commands = 0
        self.disabled = ""  # why the shell is not used (then every command is a process)
        self.retired = False  # its role is gone: it never starts again
        self.lock = threading.Lock()

    def takes(self, argv: Sequence[str], env: Mapping[str, str] | None,
              input: str | None) -> str | None:
        """The shell line for ``argv``, or None if it must run as a process."""
        if self.disabled or self.retired or input is not None or len(argv) < 2 \
                or argv[0] != self.binary \
                or argv[1] not in SHELL_COMMANDS or dict(env or {}) != self.env:
            return None
        return command_line(argv[1:])

    def close(self, *, retire: bool = False) -> None:
        """Kill the shell (a command running in it dies with it). ``retire``: the role it
        served is gone, and it never starts again.

        Called from inside a running command too (the lease thread drops the role in
        ``between``): the command's own loop sees ``child`` gone and stops. The kill
        does not wait for the process to be reaped: the caller may be renewing leases
        while the path hangs."""
        self.retired = self.retired or retire
        child, self.child = self.child, None
        if child is not None:
            child.kill(wait=False)

    def _start(self, between: Callable[[], None] | None) -> LineChild:
        """A new shell that answered its first command; the caller installs it."""
        try:
            name = self.profile(self.env.get("LVM_SYSTEM_DIR"))
        except OSError as exc:
            self.disabled = f"cannot write LVM's command profile: {exc}"
            raise
        child = self.spawn([self.binary], {**self.env, "LVM_COMMAND_PROFILE": name})
        self.child = child  # (so that a close meanwhile reaches it)
        try:
            reply = self._await(child, "version", time.monotonic() + START_TIMEOUT, between)
        except BaseException:
            child.kill(wait=False)
            raise
        finally:
            self.child = None
        stderr = child.take_stderr().strip()  # the start's own messages: not the next's
        if reply.rc != 0:
            child.kill(wait=False)
            raise BadShellOutput(f"its first command failed: "
                                 f"{'; '.join([e for e in (*reply.errors, stderr) if e][:5])}")
        self.commands = 0
        self.log(f"started the writer's lvm shell (pid {child.pid})")
        return child

    def _await(self, child: LineChild, line: str, deadline: float,
               between: Callable[[], None] | None) -> Reply:
        child.send(line)
        reader = ReplyReader()
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            got = child.read_line(min(left, POLL))
            if got is not None:
                if reader.feed(got):
                    return reader.reply
                continue
            if not child.alive():
                raise EOFError("the shell exited")
            if between is not None:
                between()
                if self.child is not child:  # closed meanwhile: the role was dropped
                    raise EOFError("the shell was closed (the writer role was dropped)")

    def run(self, argv: Sequence[str], line: str, *, timeout: float, check: bool,
            between: Callable[[], None] | None) -> Result | None:
        """Run one command line; None if the shell is busy or cannot start (run it as a
        process instead). A command sent and then lost raises ``ShellLost``."""
        if not self.lock.acquire(blocking=False):
            return None
        try:
            return self._run(argv, line, timeout=timeout, check=check, between=between)
        finally:
            self.lock.release()

    def _run(self, argv: Sequence[str], line: str, *, timeout: float, check: bool,
             between: Callable[[], None] | None) -> Result | None:
        started = time.monotonic()
        shown = " ".join(argv[:2])
        if self.child is None or not self.child.alive():
            self.close()
            try:
                child = self._start(between)
            except (OSError, EOFError, TimeoutError, BadShellOutput) as exc:
                why = f"it did not start ({exc or type(exc).__name__})"
                if isinstance(exc, TimeoutError):  # a slow scan, say: again next time
                    self.log(f"no lvm shell this time: {why}; this command runs as a process")
                else:  # it cannot work here (its profile, its output): processes for good
                    self.disabled = self.disabled or why
                    self.log(f"no lvm shell: {self.disabled}; LVM commands run as processes")
                return None
            if self.retired:  # the role went while it started
                child.kill(wait=False)
                return None
            self.child = child
        child = self.child
        try:
            reply = self._await(child, line, started + timeout, between)
        except TimeoutError:
            self.close()
            raise ShellLost(argv0=shown, timeout=timeout,
                            why=f"no answer within {timeout:.1f}s") from None
        except (OSError, EOFError, BadShellOutput) as exc:
            self.close()
            raise ShellLost(argv0=shown, timeout=timeout, why=str(exc)) from exc
        except BaseException:
            self.close()  # ``between`` refused (the lease ran short): the command stops
            raise
        self.commands += 1
        if self.commands >= MAX_COMMANDS:
            self.close()
        stderr = "\n".join([*reply.errors, child.take_stderr().strip()]).strip()
        result = Result(tuple(argv), reply.rc, reply.report, stderr,
                        time.monotonic() - started)
        if check and result.rc != 0:
            lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
            raise CommandFailed(argv0=shown, rc=result.rc,
                                stderr=" / ".join(lines[-5:]) or "(no output)")
        return result


@dataclass
class ShellRunner:
    """A ``Runner`` that sends what the shell takes to it and everything else to
    ``inner`` (the writer's LVM; readers never get one)."""

    inner: Runner
    shell: LvmShell

    def run(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        input: str | None = None,
        timeout: float | None = None,
        check: bool = True,
        die_with_parent: bool = False,
        between: Callable[[], None] | None = None,
    ) -> Result:
        """See ``Runner.run``; a command of the shell dies with it (and it with us)."""
        line = self.shell.takes(argv, env, input)
        if line is not None:
            got = self.shell.run(argv, line, timeout=120.0 if timeout is None else timeout,
                                 check=check, between=between)
            if got is not None:
                return got
        return self.inner.run(argv, env=env, input=input, timeout=timeout, check=check,
                              die_with_parent=die_with_parent, between=between)


class ShellSlot:
    """Where a writer keeps its shell for one VG: made at the first command of the role,
    for the binary and environment that command uses, and closed with the role."""

    def __init__(self, spawn: Callable[..., LineChild] | None,
                 log: Callable[[str], None]) -> None:
        self.spawn = spawn  # None: no shell (the config turns it off, or no real runner)
        self.log = log
        self.shell: LvmShell | None = None

    def wrap(self, lvm: Lvm) -> None:
        """Give ``lvm`` (the writer's) a runner that goes through the shell."""
        spawn = self.spawn
        if spawn is None:
            return
        binary, env = lvm.binary or lvm.host.lvm_binary, lvm.env()
        if self.shell is None or (self.shell.binary, self.shell.env) != (binary, env):
            self.close()
            self.shell = LvmShell(lambda argv, e: spawn(argv, env=e), binary, env,
                                  log=self.log)
        lvm.runner = ShellRunner(lvm.runner, self.shell)

    def close(self) -> None:
        """The role is gone: its shell is killed, and an ``Lvm`` still holding it runs
        its commands as processes (the next role gets a new shell)."""
        if self.shell is not None:
            self.shell.close(retire=True)
            self.shell = None
