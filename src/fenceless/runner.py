"""Running external commands: the one place (with the lab) that imports subprocess.

Domain code receives a ``Runner`` (an interface) and never starts processes
itself, so tests and the lease code can bound, record or refuse every
command. The real one, ``SubprocessRunner``, runs commands without a shell,
with ``LC_ALL=C``, in their own process group, so a timeout kills everything
the command started (a stale LVM child must never outlive the lease that
allowed it). ``RecordingRunner`` wraps another runner and keeps every argv,
for tests and benchmarks only: the agent runs for months, and a list that
grows with each of its LVM commands would be a leak.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from fenceless.cgroup import WorkGroup
from fenceless.errors import CommandFailed, CommandTimeout


@dataclass(frozen=True)
class Result:
    argv: tuple[str, ...]
    rc: int
    stdout: str
    stderr: str
    seconds: float = 0.0


class Runner(Protocol):
    """Runs argv lists: what domain code is given instead of subprocess."""

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
        """Run argv; ``die_with_parent`` kills it (SIGKILL) if our thread dies first.

        Without that, an LVM command started by a writer that is then killed
        would go on running after others have waited out its lease. ``env``
        is added to the runner's environment; ``check`` raises CommandFailed
        for a non-zero exit; a timeout raises CommandTimeout.

        ``between`` is called every few tens of milliseconds while the command
        runs, on the caller's thread: the agent renews its lease there, so a
        command slower than a lease does not cost the lease. Whatever it
        raises kills the command's process group and propagates (the lease
        ran short: the work stops first).
        """
        ...


@dataclass
class SubprocessRunner:
    """The real runner: no shell, ``LC_ALL=C``, own process group, killed as a group.

    With a ``workgroup`` (the agent's), every child joins that cgroup before it
    execs, so the watchdog can kill it even if this process is frozen
    (docs/design.md, "The watchdog").
    """

    default_timeout: float = 120.0
    base_env: Mapping[str, str] | None = None
    workgroup: WorkGroup | None = None
    between_every: float = 0.05  # seconds between two calls of ``between``

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
        """See ``Runner.run``."""
        full_env = dict(os.environ if self.base_env is None else self.base_env)
        full_env["LC_ALL"] = "C"
        if env:
            full_env.update(env)
        argv_t = tuple(argv)
        shown = " ".join(argv_t[:2])
        if die_with_parent:
            argv_t = ("setpriv", "--pdeathsig", "KILL", "--", *argv_t)
        limit = self.default_timeout if timeout is None else timeout
        started = time.monotonic()
        procs_fd = self.workgroup.procs_fd() if self.workgroup is not None else None

        def join_workgroup() -> None:  # in the child, before exec: "0" is the writer itself
            if procs_fd is not None:
                os.write(procs_fd, b"0")

        try:
            proc = subprocess.Popen(
                argv_t,
                stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=full_env,
                text=True,
                close_fds=True,
                start_new_session=True,
                preexec_fn=join_workgroup if procs_fd is not None else None,  # noqa: PLW1509
            )
        except FileNotFoundError as exc:
            raise CommandFailed(argv0=argv_t[0], rc=127, stderr="command not found") from exc
        finally:
            if procs_fd is not None:
                os.close(procs_fd)
        try:
            out, err = self._wait(proc, input, started + limit, between)
        except subprocess.TimeoutExpired as exc:
            _kill_group(proc)
            raise CommandTimeout(argv0=shown, timeout=limit) from exc
        except BaseException:
            _kill_group(proc)
            raise
        result = Result(argv_t, proc.returncode, out, err, time.monotonic() - started)
        if check and result.rc != 0:
            raise CommandFailed(argv0=shown, rc=result.rc, stderr=_last_lines(err or out))
        return result

    def _wait(self, proc: subprocess.Popen[str], input: str | None, deadline: float,
              between: Callable[[], None] | None) -> tuple[str, str]:
        """Its output once it exits; TimeoutExpired at the deadline. ``communicate``
        may be called again after a timeout without losing output (its input is
        sent by the first call only)."""
        if between is None:
            return proc.communicate(input=input, timeout=max(0.0, deadline - time.monotonic()))
        while True:
            left = deadline - time.monotonic()
            step = max(0.0, min(left, self.between_every))
            try:
                return proc.communicate(input=input, timeout=step)
            except subprocess.TimeoutExpired:
                if left <= self.between_every:
                    raise
            input = None
            between()


    def spawn_lines(self, argv: Sequence[str], *, env: Mapping[str, str] | None = None
                    ) -> LineChild:
        """A long-lived child that reads commands on stdin, one per line (``lvm`` as a
        shell): in its own session, in the work cgroup, killed if this process dies."""
        full_env = dict(os.environ if self.base_env is None else self.base_env)
        full_env["LC_ALL"] = "C"
        if env:
            full_env.update(env)
        argv_t = ("setpriv", "--pdeathsig", "KILL", "--", *argv)
        procs_fd = self.workgroup.procs_fd() if self.workgroup is not None else None

        def join_workgroup() -> None:
            if procs_fd is not None:
                os.write(procs_fd, b"0")

        try:
            proc = subprocess.Popen(
                argv_t, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                env=full_env, close_fds=True, start_new_session=True,
                preexec_fn=join_workgroup if procs_fd is not None else None,  # noqa: PLW1509
            )
        except FileNotFoundError as exc:
            raise CommandFailed(argv0=argv_t[4], rc=127, stderr="command not found") from exc
        finally:
            if procs_fd is not None:
                os.close(procs_fd)
        return LineChild(proc)


ERR_KEEP = 16384  # bytes of a child's stderr kept: its last lines explain a failure
ERR_READS = 16  # reads of a child's stderr per look (64 KiB each)


class LineChild:
    """A child process spoken to in lines: what ``lvm/shell.py`` drives.

    Reads never block past their deadline (a hung LVM must not stop the lease
    thread that waits for it). Its stderr is read in the same loop as its stdout, so a
    chatty child never blocks on a full pipe, and ``take_stderr`` reads what is left
    in the pipe first: what a command wrote there before its reply on stdout belongs to
    that command, never to the next one (LVM writes its messages before its report).
    """

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
        self.proc = proc
        self.pid = proc.pid
        self._out = proc.stdout.fileno()
        self._errfd = proc.stderr.fileno()
        os.set_blocking(self._out, False)
        os.set_blocking(self._errfd, False)
        self._buf = b""
        self._err = b""
        self._err_eof = False

    def _read_err(self) -> None:
        """Whatever stderr holds now (no wait, and at most ERR_READS reads: a child that
        writes without end must not keep a caller past its deadline); the last ERR_KEEP
        bytes are kept."""
        for _ in range(ERR_READS):
            if self._err_eof:
                return
            try:
                chunk = os.read(self._errfd, 65536)
            except BlockingIOError:
                return
            if not chunk:
                self._err_eof = True
                return
            self._err = (self._err + chunk)[-ERR_KEEP:]

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def read_line(self, wait: float) -> str | None:
        """The next line of stdout within ``wait`` seconds (None: not yet); EOFError when
        the child closed it."""
        deadline = time.monotonic() + wait
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            fds = [self._out] if self._err_eof else [self._out, self._errfd]
            ready, _, _ = select.select(fds, [], [], left)
            if self._errfd in ready:
                self._read_err()
            if self._out not in ready:
                continue
            chunk = os.read(self._out, 65536)
            if not chunk:
                raise EOFError("the child closed its output")
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return line.decode("utf-8", "replace")

    def take_stderr(self) -> str:
        """What the child wrote to stderr since the last call (the pipe read to its end)."""
        self._read_err()
        text, self._err = self._err.decode("utf-8", "replace"), b""
        return text

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self, *, wait: bool = True) -> None:
        """SIGKILL its process group; reaped within KILL_WAIT (``wait``), else later by
        ``alive`` or left to its cgroup. Its pipes stay open until it is reaped, so that
        a reader still in ``read_line`` never reads a descriptor another thread reuses."""
        if wait:
            _kill_group(self.proc)
        else:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)


@dataclass
class RecordingRunner:
    """Runs through another runner and keeps each argv in ``calls`` (tests, benchmarks).

    The argv is kept as the caller gave it (without the ``setpriv`` prefix of
    ``die_with_parent``), and before it runs, so a command that fails or times
    out is counted too.
    """

    inner: Runner = field(default_factory=SubprocessRunner)
    calls: list[tuple[str, ...]] = field(default_factory=list)

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
        """See ``Runner.run``."""
        self.calls.append(tuple(argv))
        return self.inner.run(argv, env=env, input=input, timeout=timeout, check=check,
                              die_with_parent=die_with_parent, between=between)


KILL_WAIT = 5.0  # seconds to wait for a killed command to be gone


def _kill_group(proc: subprocess.Popen[str] | subprocess.Popen[bytes]) -> None:
    """SIGKILL the command's process group; wait for it, but never forever.

    A process in uninterruptible sleep (a hung path) survives SIGKILL until its
    I/O returns: waiting for it would stop the caller, the agent's lease thread
    among them. It is left to its cgroup and the watchdog.
    """
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=KILL_WAIT)


def _last_lines(text: str, n: int = 5) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return " / ".join(lines[-n:]) if lines else "(no output)"


def spawn_detached(
    argv: Sequence[str], *, env: Mapping[str, str], ready_timeout: float = 10.0
) -> int:
    """Start a long-lived helper in its own session; wait for its first line, ``ready``.

    The helper must outlive the CLI that started it (a kill -9 of ``lab up``
    must not take the lab's namespaces with it), so it gets a new session and
    no inherited terminal. Returns its pid.
    """
    proc = subprocess.Popen(
        list(argv), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env=dict(env), text=True, close_fds=True, start_new_session=True, cwd="/",
    )
    assert proc.stdout is not None and proc.stderr is not None
    import selectors

    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    ready = sel.select(ready_timeout)
    line = proc.stdout.readline().strip() if ready else ""
    sel.close()
    if line != "ready":
        _kill_group(proc)
        err = proc.stderr.read()
        raise CommandFailed(argv0=" ".join(argv[:2]), rc=proc.returncode, stderr=_last_lines(err))
    proc.stdout.close()
    proc.stderr.close()
    return proc.pid


def run_interactive(argv: Sequence[str]) -> int:
    """A command on this terminal, such as an admin's editor; its exit code."""
    try:
        return subprocess.call(list(argv))
    except FileNotFoundError:
        return 127


def exec_replace(argv: Sequence[str], env: Mapping[str, str]) -> None:
    """Replace this process (``lab exec``/``lab shell``: the command owns the terminal)."""
    os.execvpe(argv[0], list(argv), dict(env))


def spawn_logged(argv: Sequence[str], *, env: Mapping[str, str], log_path: str) -> int:
    """Start a daemon in its own session with its output appended to a log file."""
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            list(argv), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            env=dict(env), close_fds=True, start_new_session=True, cwd="/",
        )
    return proc.pid
