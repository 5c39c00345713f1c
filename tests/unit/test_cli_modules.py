"""The CLI's layout: a module per command group, each light to import (start-up time).

Run in a fresh interpreter, since this process has imported half the package already.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from fenceless.cli import main as climain

CLI = Path(climain.__file__).resolve().parent
GROUPS = sorted(set(climain.COMMANDS.values()))


def fenceless_modules_after(code: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", code + "\nimport sys, json\n"
         "print(json.dumps(sorted(m for m in sys.modules if m.startswith('fenceless'))))"],
        capture_output=True, text=True, check=True).stdout
    return set(json.loads(out.splitlines()[-1]))


BASE = {"fenceless", "fenceless.cli", "fenceless.cli.common", "fenceless.cli.render",
        "fenceless.errors"}


def test_every_group_module_exists_and_has_register_and_run():
    assert GROUPS == ["adopt_cmd", "cluster_cmd", "guard_cmd", "lab_cmd", "metadata_cmd",
                      "vm_cmd", "volume_cmd", "writer_cmd"]
    for group in GROUPS:
        tree = ast.parse((CLI / f"{group}.py").read_text())
        names = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
        assert {"register", "run"} <= names, group


def test_importing_every_command_module_imports_nothing_heavy():
    code = "\n".join(f"import fenceless.cli.{g}" for g in GROUPS)
    assert fenceless_modules_after(code) == BASE | {f"fenceless.cli.{g}" for g in GROUPS}


def test_cli_main_imports_no_command_module_by_itself():
    assert fenceless_modules_after("import fenceless.cli.main") == {
        "fenceless", "fenceless.cli", "fenceless.errors", "fenceless.cli.main"}


@pytest.mark.parametrize(("argv", "group"), [
    (["status", "--help"], "cluster_cmd"),
    (["-c", "/x.toml", "volume", "show", "--help"], "volume_cmd"),
    (["writer", "handover", "--help"], "writer_cmd"),
])
def test_only_the_named_commands_group_is_imported(argv, group):
    code = ("import contextlib, io\nfrom fenceless.cli.main import main\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    try:\n"
            f"        main({argv!r})\n"
            "    except SystemExit:\n"
            "        pass")
    fast = {"fenceless.cli.fast"} if "status" in argv else set()  # tried first, declined
    assert fenceless_modules_after(code) == BASE | fast | {"fenceless.cli.main",
                                                           f"fenceless.cli.{group}"}


def test_a_plain_status_builds_no_parser():
    """`fenceless status` parses its few options by hand and asks the agent: no argparse,
    no command module (here the config is missing, so it stops at the config)."""
    code = ("import sys\nfrom fenceless.cli.main import main\n"
            "assert main(['-c', '/nonexistent.toml', 'status', '--json']) == 2\n"
            "assert 'argparse' not in sys.modules, 'argparse was imported'")
    assert fenceless_modules_after(code) == {
        "fenceless", "fenceless.cli", "fenceless.errors", "fenceless.cli.main",
        "fenceless.cli.fast", "fenceless.config"}


@pytest.mark.parametrize(("argv", "opts"), [
    (["status"], {"json": False, "vg": None, "config": None}),
    (["-c", "/h2.toml", "status", "--json", "--vg", "sanvg"],
     {"json": True, "vg": "sanvg", "config": "/h2.toml"}),
    (["status", "--config=/x.toml", "--debug"],
     {"json": False, "vg": None, "config": "/x.toml", "debug": True}),
    (["status", "--help"], None), (["status", "--vg"], None), (["status", "status"], None),
    (["writer", "status"], None), (["status", "--vg="], None),
])
def test_the_fast_status_takes_only_plain_command_lines(argv, opts):
    from fenceless.cli import fast

    assert fast.parse(argv) == opts


def test_no_command_module_imports_cli_main():
    for path in CLI.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            assert "fenceless.cli.main" not in names, path.name


def test_the_full_parser_has_every_command_in_order(capsys):
    assert climain.main([]) == 2
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines()
              if line.startswith("    ") and not line.startswith("     ")]
    assert listed == list(climain.COMMANDS)
