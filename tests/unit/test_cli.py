"""Exit codes and messages of the CLI, run in-process through main()."""

import os
import subprocess
import sys

import pytest

from fenceless import __version__
from fenceless.cli.main import main


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert __version__ in capsys.readouterr().out


def test_help_has_examples(capsys):
    with pytest.raises(SystemExit):
        main(["lab", "up", "--help"])
    assert "fenceless lab up --dir" in capsys.readouterr().out


def test_unknown_command_is_a_usage_error(capsys):
    assert main(["frobnicate"]) == 2
    assert "invalid choice" in capsys.readouterr().err


def test_missing_config_exit_2(capsys, tmp_path):
    rc = main(["-c", str(tmp_path / "none.toml"), "scan"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "none.toml: file not found" in err
    assert "Traceback" not in err


def test_malformed_config_names_the_key(capsys, tmp_path):
    p = tmp_path / "c.toml"
    p.write_text('host = "h1"\nio_timeout = "x"\n[vg.a]\ndevices = ["/dev/sda"]\n')
    assert main(["scan", "-c", str(p)]) == 2
    assert "key 'io_timeout'" in capsys.readouterr().err


def test_config_command_json(capsys, tmp_path):
    p = tmp_path / "c.toml"
    p.write_text('host = "h1"\n[vg.a]\ndevices = ["/dev/sda"]\n')
    assert main(["config", "--json", "-c", str(p)]) == 0
    assert '"host": "h1"' in capsys.readouterr().out


def test_bad_lab_arguments(capsys, tmp_path):
    assert main(["lab", "up", "--dir", str(tmp_path), "--hosts", "40"]) == 2
    assert "between 1 and 16" in capsys.readouterr().err
    assert main(["lab", "up", "--dir", str(tmp_path), "--size", "lots"]) == 2
    assert "Invalid size 'lots'" in capsys.readouterr().err
    assert main(["lab", "status", "--dir", str(tmp_path)]) == 2
    assert "no lab here" in capsys.readouterr().err


def run_into_a_closed_pipe(args):
    """The CLI with stdout a pipe whose reader has gone, as in `fenceless ... | head -0`."""
    r, w = os.pipe()
    os.close(r)
    try:
        return subprocess.run([sys.executable, "-m", "fenceless.cli.main", *args], stdout=w,
                              stderr=subprocess.PIPE, text=True, timeout=120, check=False)
    finally:
        os.close(w)


def test_a_reader_that_went_away_is_a_quiet_exit_141(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text('host = "h1"\n[vg.a]\ndevices = ["/dev/sda"]\n')
    got = run_into_a_closed_pipe(["config", "--json", "-c", str(p)])
    assert (got.returncode, got.stderr) == (141, "")


def test_a_broken_pipe_that_is_not_stdout_is_still_a_bug(capsys, monkeypatch, tmp_path):
    """E.g. the agent's socket: that is reported, not hidden."""
    from fenceless.cli import cluster_cmd

    def run(args):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(cluster_cmd, "run", run)
    p = tmp_path / "c.toml"
    p.write_text('host = "h1"\n[vg.a]\ndevices = ["/dev/sda"]\n')
    assert main(["config", "-c", str(p)]) == 1
    assert "internal error: BrokenPipeError" in capsys.readouterr().err
