"""What describes the CLI is generated from its parser and kept current: every command's
--help has examples, the shell completion knows every command, the man page is fresh."""

from __future__ import annotations

import argparse
import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

from fenceless.cli.main import build_parser

ROOT = Path(__file__).resolve().parent.parent.parent


def leaves(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """(command words, parser) of every command that runs, and its group parsers."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield path, parser
        return
    yield path, parser
    for name, sub in subs[0].choices.items():
        yield from leaves(sub, (*path, name))


COMMANDS = [(p, sp) for p, sp in leaves(build_parser()) if p]


@pytest.mark.parametrize(("path", "parser"), COMMANDS, ids=[" ".join(p) for p, _ in COMMANDS])
def test_every_command_help_shows_examples(path, parser):
    text = parser.format_help()
    assert re.search(r"\bexamples?:\n  fenceless ", text), f"`fenceless {' '.join(path)} --help`"


@pytest.mark.parametrize("shell", ["bash", "zsh"])
def test_the_completion_comes_from_the_parser_and_knows_every_command(shell):
    out = subprocess.run([sys.executable, "-m", "fenceless.cli.main", "completion", shell],
                         capture_output=True, text=True, check=True).stdout
    for path, _p in COMMANDS:
        assert path[-1] in out, path
    assert "--request-id" in out and "--shared-ro" in out
    if shell == "bash":
        # The script is valid bash.
        subprocess.run(["bash", "-n"], input=out, text=True, check=True)


def test_the_man_page_is_current():
    """docs/fenceless.8 is what scripts/manpage writes now (the date line aside): run the
    script after changing the CLI."""
    script = runpy.run_path(str(ROOT / "scripts" / "manpage"))
    committed = (ROOT / "docs" / "fenceless.8").read_text().splitlines()
    fresh = script["render"]("2000-01-01").splitlines()
    assert committed[0].startswith(".TH FENCELESS \"8\"")
    assert committed[1:] == fresh[1:], "docs/fenceless.8 is out of date: run scripts/manpage"
