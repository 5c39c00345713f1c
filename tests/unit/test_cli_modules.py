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
    assert GROUPS == ["adopt_cmd", "check_cmd", "cluster_cmd", "completion_cmd", "guard_cmd",
                      "host_cmd", "lab_cmd", "metadata_cmd", "repair_cmd", "vm_cmd", "volume_cmd",
                      "writer_cmd"]
    for group in GROUPS:
        tree = ast.parse((CLI / f"{group}.py").read_text())
        names = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
        assert {"register", "run"} <= names, group


def test_importing_every_command_module_imports_nothing_heavy():
    code = "\n".join(f"import fenceless.cli.{g}" for g in GROUPS)
    assert fenceless_modules_after(code) == BASE | {f"fenceless.cli.{g}" for g in GROUPS}


def test_cli_main_imports_no_command_module_by_itself():
    # Not even the errors: a status the agent answers never raises one (cli/fast.py).
    assert fenceless_modules_after("import fenceless.cli.main") == {
        "fenceless", "fenceless.cli", "fenceless.cli.main"}


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
    # tried first, declined
    fast = {"fenceless.cli.fast"} if {"status", "volume"} & set(argv) else set()
    assert fenceless_modules_after(code) == BASE | fast | {"fenceless.cli.main",
                                                           f"fenceless.cli.{group}"}


def test_a_plain_status_builds_no_parser():
    """`fenceless status` parses its few options by hand and asks the agent: no argparse,
    no command module (here the config is missing, so it stops at the config)."""
    code = ("import sys\nfrom fenceless.cli.main import main\n"
            "assert main(['-c', '/nonexistent.toml', 'status', '--json']) == 2\n"
            "assert 'argparse' not in sys.modules, 'argparse was imported'")
    # (cli.render: to explain the missing config)
    assert fenceless_modules_after(code) == {
        "fenceless", "fenceless.cli", "fenceless.errors", "fenceless.cli.main",
        "fenceless.cli.fast", "fenceless.config", "fenceless.cli.render"}


@pytest.mark.parametrize(("argv", "opts"), [
    (["status"], {"json": False, "vg": None, "config": None, "debug": False}),
    (["-c", "/h2.toml", "status", "--json", "--vg", "sanvg"],
     {"json": True, "vg": "sanvg", "config": "/h2.toml", "debug": False}),
    (["status", "--config=/x.toml", "--debug"],
     {"json": False, "vg": None, "config": "/x.toml", "debug": True}),
    (["status", "--help"], None), (["status", "--vg"], None), (["status", "status"], None),
    (["writer", "status"], None), (["status", "--vg="], None),
])
def test_the_fast_status_takes_only_plain_command_lines(argv, opts):
    from fenceless.cli import fast

    assert fast.parse(argv) == opts


@pytest.mark.parametrize(("text", "state_dir"), [
    ('host = "h1"\nstate_dir = "/var/lib/x"  # here\n[vg.a]\ndevices = ["/dev/sdb"]\n',
     "/var/lib/x"),
    ('host = "h1"\n[vg.a]\nstate_dir = "/not/top/level"\n', "/var/lib/fenceless"),
    ('state_dir = "/a"\nstate_dir = "/b"\n', None),  # TOML refuses it: so does the parser
    ("state_dir = '/literal'\n", None),
    ('state_dir = "/with\\u0041escape"\n', None),
    ('state_dir = "relative"\n', None),
    ('"state_dir" = "/quoted/key"\n', None),
    ('state_dir="/a" \n', "/a"),
    ('host = "h\xe9"\nstate_dir = "/a"\n', None),
])
def test_the_tiny_status_client_reads_only_a_plainly_written_state_dir(text, state_dir):
    from fenceless.cli import fast

    assert fast.state_dir_of(text.encode("latin-1")) == state_dir


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


@pytest.mark.parametrize(("argv", "got"), [
    (["volume", "create", "web", "10G"], {"sub": "create", "name": "web", "size": "10G"}),
    (["-c", "/h.toml", "volume", "extend", "--vg", "sanvg", "web", "+2G", "--json"],
     {"sub": "extend", "name": "web", "size": "+2G", "vg": "sanvg", "config": "/h.toml",
      "json": True}),
    (["volume", "rename", "a", "b", "--request-id", "r1", "--timeout", "9"],
     {"sub": "rename", "name": "a", "new_name": "b", "request_id": "r1", "timeout": 9.0}),
    (["volume", "create", "--shared-ro", "img", "1G"],
     {"sub": "create", "name": "img", "size": "1G", "shared_ro": True}),
    (["volume", "remove", "x"], {"sub": "remove", "name": "x"}),
])
def test_the_fast_volume_client_takes_plain_changes(argv, got):
    from fenceless.cli import fast

    opts = fast.parse_volume(argv)
    assert opts is not None
    assert {k: opts[k] for k in got} == got


@pytest.mark.parametrize("argv", [
    ["volume", "list"], ["volume", "show", "x"], ["volume", "create", "x"],
    ["volume", "create", "x", "1G", "extra"], ["volume", "create", "x", "1G", "--help"],
    ["volume", "extend", "x", "1G", "--shared-ro"], ["volume", "remove", "x", "--debug"],
    ["volume", "create", "x", "1G", "--timeout", "soon"],
    ["volume", "create", "x", "1G", "--timeout", "inf"],
    ["volume", "create", "x", "1G", "--vg=a"], ["status"], ["volume"],
])
def test_anything_else_goes_to_the_full_parser(argv):
    from fenceless.cli import fast

    assert fast.parse_volume(argv) is None
    assert fast.volume_from_agent(argv) == (None, argv)


@pytest.mark.parametrize("answer", [
    b'{"error": {"kind": "InternalError", "code": 1}}',
    b"T0 80\ncreate: web is 8G (VG seqno 9",  # cut short: 80 bytes promised
    b"T0\ncreate: web is 8G (VG seqno 9",  # no length: it could be cut short
])
def test_a_request_that_may_have_reached_the_agent_is_retried_only_under_its_id(
        tmp_path, answer, capsys):
    """The agent accepts the connection but its reply is not one the client prints (a
    fault, or a reply cut short): the full CLI then runs with the same request id, so the
    writer, which keeps each id's outcome, never carries the change out twice, and
    nothing half is printed."""
    import socket
    import threading

    from fenceless.cli import fast

    state = tmp_path / "state"
    state.mkdir()
    cfg = tmp_path / "h.toml"
    cfg.write_text(f'host = "h1"\nstate_dir = "{state}"\n[vg.a]\ndevices = ["/dev/x"]\n')
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(state / "agent.sock"))
    server.listen(1)
    seen: list[bytes] = []

    def serve() -> None:
        conn, _ = server.accept()
        with conn:
            data = b""
            while chunk := conn.recv(65536):
                data += chunk
            seen.append(data)
            conn.sendall(answer)

    thread = threading.Thread(target=serve)
    thread.start()
    argv = ["-c", str(cfg), "volume", "extend", "web", "+2G"]
    rc, again = fast.volume_from_agent(argv)
    thread.join()
    server.close()
    assert rc is None
    assert again[:-2] == argv and again[-2] == "--request-id"
    assert f'"rid": "{again[-1]}"'.encode() in seen[0]
    assert capsys.readouterr() == ("", "")


def test_a_whole_agent_rendered_reply_is_printed_with_its_code(capsys):
    from fenceless.agent.ipc import raw_reply
    from fenceless.cli import fast

    assert fast._print(raw_reply("T", 3, "extend: web is 8G; NOT yet refreshed on h2\n")) == 3
    assert fast._print(raw_reply("E", 2, "Refused: no such volume é")) == 2
    assert capsys.readouterr() == ("extend: web is 8G; NOT yet refreshed on h2\n",
                                   "fenceless: Refused: no such volume é\n")
    whole = raw_reply("T", 0, "status ...\n")
    assert fast.unframe(whole[:-1]) is None and fast.unframe(whole + b"x") is None
