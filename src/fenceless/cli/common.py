"""What every command module shares: the parser class, common options, output, config, agent.

Command modules (``cli/*_cmd.py``) import this module and never ``cli.main``,
so that the CLI has no import cycle. It stays light on purpose: ``cli.main``
imports it on every start, before it knows which command runs, so anything
heavier than ``argparse`` and ``json`` is imported inside the function that
needs it.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NoReturn, TypeAlias

from fenceless.cli.render import table
from fenceless.errors import UsageError

__all__ = ["table"]  # the commands' table() lives in cli/render.py (light, for fast paths)

if TYPE_CHECKING:
    from fenceless.config import HostConfig

# One place for the example lines that end every --help, so the examples of
# all commands read alike (guard_cmd keeps its own three).
EXAMPLES = {
    "lab up": "fenceless lab up --dir /tmp/lab --hosts 3 --size 8G --io-timeout 0.2",
    "lab down": "fenceless lab down --dir /tmp/lab",
    "lab status": "fenceless lab status --dir /tmp/lab --json",
    "lab demo-vm": "fenceless lab demo-vm --dir /tmp/lab counter",
    "lab counter": "fenceless lab counter --dir /tmp/lab counter-disk --host h2",
    "lab exec": "fenceless lab exec --dir /tmp/lab h2 -- lvs",
    "lab shell": "fenceless lab shell --dir /tmp/lab h2",
    "lab activate": "fenceless lab activate --dir /tmp/lab h2 vm1-disk",
    "lab deactivate": "fenceless lab deactivate --dir /tmp/lab h2 vm1-disk",
    "lab refresh": "fenceless lab refresh --dir /tmp/lab h2 vm1-disk",
    "scan": "fenceless -c /tmp/lab/hosts/h2/fenceless.toml scan --json",
    "config": "fenceless -c /etc/fenceless/fenceless.toml config",
    "init": "fenceless init --max-hosts 16",
    "join": "fenceless join",
    "agent": "fenceless agent --auto-takeover",
    "status": "fenceless status --json",
    "writer status": "fenceless writer status",
    "writer handover": "fenceless writer handover h2",
    "writer takeover": "fenceless writer takeover",
    "lab agent": "fenceless lab agent --dir /tmp/lab h2 stop",
    "lab watchdog": "fenceless lab watchdog --dir /tmp/lab h2 fired --json",
    "watchdog": "fenceless watchdog",
    "volume create": "fenceless volume create vm7-disk 20G",
    "volume extend": "fenceless volume extend vm7-disk +5G",
    "volume rename": "fenceless volume rename vm7-disk vm8-disk",
    "volume remove": "fenceless volume remove vm8-disk",
    "volume list": "fenceless volume list --json",
    "volume show": "fenceless volume show vm7-disk",
    "vm define": "fenceless vm define web01 --xml web01.xml",
    "adopt": "fenceless adopt --configs /srv/vmconfigs --dry-run",
    "vm import": "fenceless vm import --xl /etc/xen/web01.cfg",
    "vm edit": "fenceless vm edit web01",
    "vm undefine": "fenceless vm undefine web01",
    "vm list": "fenceless vm list --json",
    "vm start": "fenceless vm start web01",
    "vm stop": "fenceless vm stop web01 --force",
    "vm recover": "fenceless vm recover web01",
    "vm migrate": "fenceless vm migrate web01 --to h3",
    "vm show": "fenceless vm show web01",
    "log": "fenceless log --limit 20",
    "metadata history": "fenceless metadata history",
    "metadata show": "fenceless metadata show 42",
    "metadata diff": "fenceless metadata diff 41 42",
    "metadata restore": "fenceless metadata restore 41 --yes",
    "guard": "fenceless guard install",
    "check": "fenceless check --json",
    "repair ledger": "fenceless repair ledger",
    "repair superblock": "fenceless repair superblock --yes --plan 3f9c2a1b7d4e",
    "host drain": "fenceless host drain h2",
    "host resume": "fenceless host resume h2",
    "host remove": "fenceless host remove h4",
    "completion": "fenceless completion bash > /etc/bash_completion.d/fenceless",
}

# Help texts keep their own line breaks (the examples, the exit code table).
FORMATTER = argparse.RawDescriptionHelpFormatter


class BadArguments(UsageError):
    """{message} (see `{prog} --help`)"""


class Parser(argparse.ArgumentParser):
    """argparse that raises instead of printing and exiting.

    A usage error then takes the one path every error takes: ``cli.main.main``
    prints it and picks the exit code (2).
    """

    def error(self, message: str) -> NoReturn:
        raise BadArguments(message=message, prog=self.prog)


# What ``add_subparsers(parser_class=Parser)`` returns; argparse has no public name for it.
Subparsers: TypeAlias = "argparse._SubParsersAction[Parser]"


def epilog(*keys: str) -> str:
    """The "examples:" block of a --help, from the EXAMPLES lines named by ``keys``."""
    return "examples:\n" + "\n".join(f"  {EXAMPLES[k]}" for k in keys)


def add_common(p: argparse.ArgumentParser, *, json_opt: bool = True) -> None:
    """-c/--config, --debug and (unless ``json_opt`` is false) --json on parser ``p``.

    They go on the top-level parser and on every command, so that they are
    accepted both before and after the command name; SUPPRESS keeps a value
    given before the command from being reset by the command's default.
    """
    p.add_argument("-c", "--config", default=argparse.SUPPRESS, metavar="PATH",
                   help="host config (default: $FENCELESS_CONFIG or /etc/fenceless/fenceless.toml)")
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                   help="show tracebacks")
    if json_opt:
        p.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                       help="machine-readable output")


def command(parent: Subparsers, name: str, key: str, helptext: str, *,
            json_opt: bool = True) -> argparse.ArgumentParser:
    """Add command ``name`` under ``parent``, with the common options and its EXAMPLES[key]."""
    sp: argparse.ArgumentParser = parent.add_parser(
        name, help=helptext, description=helptext, epilog=epilog(key),
        formatter_class=FORMATTER)
    add_common(sp, json_opt=json_opt)
    return sp


def vg_option(sp: argparse.ArgumentParser) -> None:
    """--vg, for the commands that work on one of the host's shared VGs."""
    sp.add_argument("--vg", help="the shared VG, when several are configured")


def emit(args: argparse.Namespace, data: Any, text: Callable[[Any], str]) -> None:
    """Print a command's result: as JSON with --json, else as ``text(data)`` (if not empty)."""
    if getattr(args, "json", False):
        print(json.dumps(data, indent=2, sort_keys=True))
    else:
        out = text(data)
        if out:
            print(out)




def load_config(args: argparse.Namespace) -> HostConfig:
    """This host's config: -c PATH, else $FENCELESS_CONFIG, else the default path."""
    from fenceless import config

    return config.load(config.resolve_path(getattr(args, "config", None)))


def agent_call(cfg: HostConfig, request: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Send ``request`` to this host's agent and return its reply.

    The agent gets ``timeout`` for the work; the socket waits 5 s longer so that
    the agent's own timeout error, which says more, arrives first.
    """
    from fenceless.agent import ipc

    request = {**request, "timeout": timeout}
    return ipc.call(cfg.state_dir, request, timeout=timeout + 5.0)
