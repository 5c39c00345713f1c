"""The ``fenceless`` command: the top-level parser, dispatch, error messages and exit codes.

Each command group lives in its own module (``cli/*_cmd.py``: its parser and
its run function) over ``cli/common.py``. Only the module of the command
named in argv is imported and its parser built, because start-up time
matters (``status`` is run from scripts and monitoring; the guard's wrapper
starts on every LVM command). Only ``main()`` prints errors and picks exit
codes; everything below it raises.
"""

from __future__ import annotations

import os
import sys

# Nothing else at import time: a plain `status` answered by the agent needs no more
# (cli/fast.py), and ``typing`` alone costs a ``status`` a fifth of its time.
TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse
    from collections.abc import Sequence
    from typing import Protocol

    from fenceless.cli.common import Parser, Subparsers

    class CommandModule(Protocol):
        """What a ``cli/*_cmd.py`` module provides."""

        def register(self, sub: Subparsers, name: str) -> None:
            """Add the parser of top-level command ``name`` to ``sub``."""

        def run(self, args: argparse.Namespace) -> int:
            """Run the parsed command; the exit code if nothing was raised."""

# Every top-level command and the module (fenceless.cli.<module>) that owns it,
# in the order `fenceless --help` lists them.
COMMANDS: dict[str, str] = {
    "lab": "lab_cmd",
    "init": "cluster_cmd", "adopt": "adopt_cmd", "join": "cluster_cmd",
    "agent": "cluster_cmd",
    "watchdog": "cluster_cmd",
    "status": "cluster_cmd",
    "writer": "writer_cmd",
    "volume": "volume_cmd",
    "vm": "vm_cmd",
    "log": "metadata_cmd", "metadata": "metadata_cmd",
    "guard": "guard_cmd",
    "scan": "cluster_cmd", "config": "cluster_cmd",
    "host": "host_cmd",
    "check": "check_cmd",
    "repair": "repair_cmd",
    "completion": "completion_cmd",
}
TOP_COMMANDS = tuple(COMMANDS)


def command_module(name: str) -> CommandModule:
    """The module of top-level command ``name``, imported now (and not before)."""
    import importlib

    module: CommandModule = importlib.import_module(f"fenceless.cli.{COMMANDS[name]}")
    return module


def _command_of(argv: Sequence[str]) -> str | None:
    """The command named in argv, so that only its parser is built (start-up time)."""
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg in ("-c", "--config"):
            skip = True
        elif not arg.startswith("-"):
            return arg if arg in TOP_COMMANDS else None
    return None


def build_parser(only: str | None = None) -> Parser:
    """The whole parser, or (``only``) the top level plus one command's subtree."""
    from fenceless import __version__
    from fenceless.cli.common import FORMATTER, Parser, add_common, epilog
    p = Parser(prog="fenceless", formatter_class=FORMATTER,
               description="Safe VM hosts on one shared LUN with plain LVM2, no cluster stack.",
               epilog=epilog("lab up", "lab exec", "scan", "lab down")
               + "\n\nexit codes: 0 ok, 1 internal error, 2 refused/bad input (nothing "
               "changed),\n  3 failed part-way, 4 integrity error on disk, 5 lease lost, "
               "6 check found an error, 130 interrupted")
    p.add_argument("--version", action="version", version=f"fenceless {__version__}")
    add_common(p)
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for name in COMMANDS:
        if only is None or only == name:
            command_module(name).register(sub, name)
    return p


def _stdout_reader_gone() -> bool:
    """Whether stdout is a pipe whose reader has exited (``fenceless lab up | head -1``).

    A BrokenPipeError from anywhere else (the agent's socket) is a fault, reported
    as one. The kernel tells: a pipe without readers polls as POLLERR.
    """
    import select

    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _fd, events in poller.poll(0))
    except (OSError, ValueError):  # no file descriptor (a test's capture): not a pipe
        return False


def _reader_gone() -> int:
    """Nobody reads the output any more: stop quietly, as Unix tools do.

    They die of SIGPIPE, which a shell reports as 141 (128 + 13), and so does this
    exit code rather than 0: the command stopped at the write that failed, perhaps
    part-way, so it cannot claim success, and a script under ``set -o pipefail``
    sees what it sees from any other tool. Python ignores SIGPIPE, so the write
    raised instead; stdout now goes to /dev/null, because Python flushes what is
    left in its buffer once more at exit and would complain of the pipe there.
    """
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    finally:
        os.close(devnull)
    return 141


def main(argv: Sequence[str] | None = None) -> int:
    """Parse, run, and turn what was raised into a message and an exit code.

    A FencelessError exits with its class's code (errors.py); anything else is
    a bug (exit 1), except stdout's reader going away (exit 141, quietly).
    Tracebacks only with --debug (or FENCELESS_DEBUG=1).
    """
    args_list = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args_list or os.environ.get("FENCELESS_DEBUG") == "1"
    if _command_of(args_list) == "status":
        from fenceless.cli import fast

        rc = fast.from_agent(args_list)  # answered with next to no imports (cli/fast.py)
        if rc is not None:
            return rc
    elif _command_of(args_list) == "volume":
        from fenceless.cli import fast

        rc, args_list = fast.volume_from_agent(args_list)  # the same, for a change
        if rc is not None:
            return rc
    from fenceless.errors import FencelessError

    try:
        if _command_of(args_list) == "status":
            from fenceless.cli import fast

            rc = fast.status(args_list)  # a plain status: no parser needed (cli/fast.py)
            if rc is not None:
                return rc
        args = build_parser(_command_of(args_list)).parse_args(args_list)
        if not args.command:
            build_parser().print_help()
            return 2
        args.full_parser = build_parser  # for the commands that describe the CLI itself
        rc = command_module(args.command).run(args)
        sys.stdout.flush()  # here, not at exit: a reader that has gone is handled below
        return rc
    except FencelessError as exc:
        if debug:
            import traceback

            traceback.print_exc()
        from fenceless.cli.render import explain

        print(f"fenceless: {explain(exc)}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("fenceless: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if isinstance(exc, BrokenPipeError) and _stdout_reader_gone():
            return _reader_gone()
        if debug:
            raise
        print(f"fenceless: internal error: {type(exc).__name__}: {exc} "
              "(run again with --debug for a traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
