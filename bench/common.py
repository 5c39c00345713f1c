"""What the bench scripts share: finding the CLI, timing helpers, lab calls, provenance.

The scripts run as ``bench/NAME.py``, so this directory is on ``sys.path`` and
``import common`` finds this file.
"""

from __future__ import annotations

import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import fenceless
from fenceless.errors import FencelessError

HERE = Path(__file__).resolve().parent
LVM = "/usr/sbin/lvm"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def fenceless_cli() -> str:
    beside = Path(sys.executable).parent / "fenceless"
    if beside.exists():
        return str(beside)
    found = shutil.which("fenceless")
    if not found:
        sys.exit("bench: the fenceless CLI is not installed (pip install -e .)")
    return found


def child_env(**extra: str) -> dict[str, str]:
    """The environment of a timed child: as on a real install (.pyc files used)."""
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env.pop("LVM_SYSTEM_DIR", None)
    env.update(extra)
    return env


def p90(xs: Sequence[float]) -> float:
    if len(xs) < 2:
        return xs[0]
    return statistics.quantiles(xs, n=10, method="inclusive")[8]


def med(xs: Sequence[float]) -> float:
    return statistics.median(xs)


def ms(x: float) -> str:
    return f"{x * 1000:.1f}"


def run_ok(argv: Sequence[str], what: str, **kw: Any) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(argv), capture_output=True, text=True, check=False, **kw)
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed (rc {proc.returncode}): "
                           f"{(proc.stderr or proc.stdout).strip()[-400:]}")
    return proc


def lab(cli: str, *words: str) -> str:
    """``fenceless lab ...``; its output, or RuntimeError with LVM's or our message."""
    return run_ok([cli, "lab", *words], f"fenceless lab {' '.join(words[:3])}",
                  env=child_env()).stdout


def lab_loops(tmp: Path) -> list[str]:
    """Loop devices still attached over files under ``tmp`` (a bench must leave none)."""
    out = subprocess.run(["losetup", "-a"], capture_output=True, text=True, check=False).stdout
    return [ln for ln in out.splitlines() if str(tmp) in ln]


def wait_until(pred: Callable[[], Any], timeout: float, what: str, every: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = pred()
        except FencelessError as exc:
            last = exc
        else:
            if last:
                return last
        time.sleep(every)
    raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r})")


def lvm_version() -> str:
    out = subprocess.run([LVM, "version"], capture_output=True, text=True, check=False,
                         env={**os.environ, "LC_ALL": "C", "LVM_SUPPRESS_FD_WARNINGS": "1"})
    for line in out.stdout.splitlines():
        if "LVM version:" in line:
            return line.split(":", 1)[1].strip()
    return "unknown"


def compile_package() -> None:
    """Byte-compile fenceless, so the timed processes find .pyc files as an install would."""
    pkg = Path(fenceless.__file__).parent
    run_ok([sys.executable, "-m", "compileall", "-q", str(pkg)], "compileall", env=child_env())


def code_state() -> str:
    """The commit measured, and which product files differ from it (the tree may be dirty)."""
    def git(*words: str) -> str:
        proc = subprocess.run(["git", "-C", str(HERE.parent), *words], capture_output=True,
                              text=True, check=False)
        return proc.stdout.rstrip("\n") if proc.returncode == 0 else ""

    head = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = [ln[3:] for ln in git("status", "--porcelain", "--", "src").splitlines()]
    return f"commit `{head}`" + (f", with uncommitted changes in {len(dirty)} path(s) under "
                                 f"src/: " + ", ".join(f"`{d}`" for d in dirty)
                                 if dirty else ", clean src/")


def start() -> str | None:
    """A bench's first step: root or nothing (loop devices, LVM); SIGTERM unwinds through
    the ``finally`` that takes the lab down. Returns the CLI to run, or None."""
    if os.geteuid() != 0:
        print("bench: needs root (loop devices, LVM)", file=sys.stderr)
        return None

    def on_term(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
    return fenceless_cli()


def take_down(cli: str, labdir: Path, scope: Path) -> list[str]:
    """Take the lab down (if it came up) and return the loop devices still attached over
    files under ``scope``: a bench must leave none, whatever happened before."""
    try:
        if (labdir / "lab.json").exists():
            lab(cli, "down", "--dir", str(labdir))
    finally:
        left = lab_loops(scope)
    if left:
        print("bench: loop devices left behind:\n  " + "\n  ".join(left), file=sys.stderr)
    else:
        log(f"lab {labdir.name} down; losetup -a shows none of its loop devices")
    return left
