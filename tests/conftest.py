"""Shared test helpers: run the real CLI, and make real labs on loop devices."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

CLI = [sys.executable, "-m", "fenceless.cli.main"]
# LUN images on a tmpfs: a synchronous write then waits for no disk, so io_timeout 0.2 s
# holds on a busy 2-core machine (on /tmp, an image's first writes allocate blocks).
LUN_DIR = ["--lun-dir", "/dev/shm"] if os.path.isdir("/dev/shm") else []


def lab_prerequisites() -> str | None:
    if os.geteuid() != 0:
        return "needs root"
    for tool in ("lvm", "losetup", "unshare", "nsenter"):
        if not shutil.which(tool):
            return f"needs {tool}"
    return None


def pytest_collection_modifyitems(config, items):
    # The slow tests first: with the suite spread over workers, a long test started last
    # would be what everyone waits for.
    items.sort(key=lambda item: ("slow" not in item.keywords, "test_full_" not in item.name))
    missing = lab_prerequisites()
    if missing is None:
        return
    if os.environ.get("CI") == "true":
        # In CI a missing prerequisite is a broken .ci/run, not a reason to skip.
        raise pytest.UsageError(f"lab tests cannot run in CI: {missing}")
    for item in items:
        if "lab" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=missing))


def cli(*args: str, env: dict[str, str] | None = None, check: bool = True,
        timeout: float = 120) -> subprocess.CompletedProcess[str]:
    full_env = dict(os.environ)
    full_env.pop("FENCELESS_CONFIG", None)
    if env:
        full_env.update(env)
    proc = subprocess.run([*CLI, *args], capture_output=True, text=True, env=full_env,
                          timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"fenceless {' '.join(args)} failed ({proc.returncode}):\n"
                             f"{proc.stdout}\n{proc.stderr}")
    return proc


def lab_images(lab_dir: Path) -> list[str]:
    """Where a lab's LUN images are (DIR/luns, or what the links there point to)."""
    return [os.path.realpath(p) for p in sorted((lab_dir / "luns").glob("*.img"))]


def lab_loops(lab_dir: Path, images: list[str] | None = None) -> list[str]:
    """Loop devices still backed by this lab's images (directly or through another loop).

    ``images``: the image paths as the lab had them (a lab on a tmpfs keeps them there,
    and its links in DIR/luns are gone once it is down).
    """
    out = subprocess.run(["losetup", "-a"], capture_output=True, text=True, check=True).stdout
    marks = [str(lab_dir), *(images if images is not None else lab_images(lab_dir))]
    mine = [ln.split(":")[0] for ln in out.splitlines() if any(m in ln for m in marks)]
    nested = [ln.split(":")[0] for ln in out.splitlines()
              if any(f"({dev})" in ln for dev in mine)]
    return mine + nested


def lab_processes(lab_dir: Path) -> list[int]:
    marker = f"FENCELESS_LAB={lab_dir}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if marker in (entry / "environ").read_bytes().split(b"\0"):
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


class Lab:
    def __init__(self, path: Path, hosts: int):
        self.dir = path
        self.hosts = [f"h{i}" for i in range(1, hosts + 1)]
        self.images: list[str] = []

    def config(self, host: str) -> str:
        return str(self.dir / "hosts" / host / "fenceless.toml")

    def on(self, host: str, *args: str, **kw) -> subprocess.CompletedProcess[str]:
        """The fenceless CLI with this host's config."""
        return cli("-c", self.config(host), *args, **kw)

    def exec(self, host: str, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """A command inside the host's own view of the system."""
        return cli("lab", "exec", "--dir", str(self.dir), host, "--", *argv, check=check)

    def device(self, host: str, vg: str = "sanvg") -> str:
        import tomllib

        cfg = tomllib.loads(Path(self.config(host)).read_text())
        return str(cfg["vg"][vg]["devices"][0])


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.when == "call" and report.failed:
        item.stash[FAILED] = True


FAILED = pytest.StashKey[bool]()
LOG_TAIL = 60


def print_lab_logs(lab: Lab) -> None:
    """What each host's agent and watchdog said, for a failed test's report (the lab's
    directory is gone once it is down, and CI keeps only the output)."""
    for host in lab.hosts:
        host_dir = lab.dir / "hosts" / host
        for name in ("agent.log", "watchdog.log", "state/watchdog-fired.jsonl"):
            path = host_dir / name
            if path.exists():
                lines = path.read_text(errors="replace").splitlines()
                print(f"----- {host}/{name} (last {min(len(lines), LOG_TAIL)} of "
                      f"{len(lines)} lines)")
                print("\n".join(lines[-LOG_TAIL:]))


@pytest.fixture
def make_lab(tmp_path_factory, request):
    """Factory for labs; every lab made is taken down and checked to leave nothing behind.

    When the test failed, each host's agent and watchdog logs are printed first."""
    made: list[Lab] = []

    def make(hosts: int = 3, *extra: str) -> Lab:
        path = tmp_path_factory.mktemp("lab")
        cli("lab", "up", "--dir", str(path), "--hosts", str(hosts), "--size", "1G",
            "--io-timeout", "0.2", *LUN_DIR, *extra)
        lab = Lab(path, hosts)
        lab.images = lab_images(path)
        assert lab.images, "the lab has no LUN image"
        made.append(lab)
        return lab

    yield make
    for lab in made:
        if request.node.stash.get(FAILED, False):
            print_lab_logs(lab)
        down = cli("lab", "down", "--dir", str(lab.dir), "--force", check=False)
        said = f"lab down: rc {down.returncode}: {down.stdout}{down.stderr}"
        assert lab_loops(lab.dir, lab.images) == [], said
        assert not any(os.path.exists(p) for p in lab.images), "an image was left behind; " + said
        assert lab_processes(lab.dir) == []
