"""``fenceless completion bash|zsh``: shell completion, generated from the parser itself.

Generated (by shtab) rather than written by hand, so that it can never disagree with
the commands and options that exist. Install it with, for bash,
``fenceless completion bash > /etc/bash_completion.d/fenceless``.
"""

from __future__ import annotations

import argparse
from typing import Any

from fenceless.cli.common import command

SHELLS = ("bash", "zsh")


def register(sub: Any, name: str) -> None:
    """Add the ``completion`` command to the top-level ``sub``."""
    sp = command(sub, name, "completion", "print the shell completion script for bash or zsh, "
                 "generated from this fenceless's own parser", json_opt=False)
    sp.add_argument("shell", choices=SHELLS)


def run(args: argparse.Namespace) -> int:
    # cli/main.py lends its parser builder (a command module does not import main).
    print(script(args.full_parser(), args.shell), end="")
    return 0


def script(parser: argparse.ArgumentParser, shell: str) -> str:
    """The completion script for ``shell``, from the whole ``parser``."""
    import shtab

    return str(shtab.complete(parser, shell=shell))
