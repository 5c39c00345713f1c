"""This host's own small files in its state dir (never shared, never trusted by others).

- ``vgs/VG/member.json``: this host's membership of the VG's cluster (host id).
- ``vgs/VG/agent.json``: what the running agent last saw, stamped with this
  host's lease clock (CLOCK_BOOTTIME), so a CLI on the same host can show lease states
  (a monotonic time is meaningful only on the host that took it).
- ``RUN_DIR/vm-NAME.lock``: held while a lifecycle step of VM NAME runs here.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def vg_dir(state_dir: str, vg: str) -> Path:
    return Path(state_dir) / "vgs" / vg


def replace_file(path: Path, text: str, *, sync: bool, mode: int | None = None) -> None:
    """``path`` holds ``text`` whole or not at all (written beside it, then renamed; the
    "~" keeps the temporary name out of what LVM names a VG's backup file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp~")
    with open(tmp, "w") as f:
        f.write(text)
        if mode is not None:
            os.fchmod(f.fileno(), mode)
        if sync:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json(path: Path, data: dict[str, Any]) -> None:
    replace_file(path, json.dumps(data, indent=1, sort_keys=True), sync=True)


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_metadata_copy(state_dir: str, vg: str, text: str,
                        lvm_backup_dir: str | None = None) -> Path:
    """The VG's latest metadata text in ``VG/lvm-metadata`` under the state dir, and in
    LVM's own backup file (``lvm_backup_dir``/VG) when given: the writer keeps both after
    each change in place of LVM's backup, which it turns off (lvm/adapter.py). Like
    LVM's they outlive the LUN (``vgcfgrestore`` reads them); unlike LVM's they are not
    synced, so after a crash of this host they may be older (the history ring on the
    LUN has every recent version)."""
    path = vg_dir(state_dir, vg) / "lvm-metadata"
    for target in [path] + ([Path(lvm_backup_dir) / vg] if lvm_backup_dir else []):
        replace_file(target, text, sync=False, mode=0o600)
    return path


def member(state_dir: str, vg: str) -> dict[str, Any] | None:
    return read_json(vg_dir(state_dir, vg) / "member.json")


def set_member(state_dir: str, vg: str, data: dict[str, Any]) -> None:
    write_json(vg_dir(state_dir, vg) / "member.json", data)


def agent_view(state_dir: str, vg: str) -> dict[str, Any] | None:
    return read_json(vg_dir(state_dir, vg) / "agent.json")


def set_agent_view(state_dir: str, vg: str, data: dict[str, Any]) -> None:
    write_json(vg_dir(state_dir, vg) / "agent.json", data)


class VmBusyHere(Exception):
    """Raised by ``vm_lock`` when another process of this host works on the VM now."""


@contextlib.contextmanager
def vm_lock(run_dir: str, name: str, *, wait: bool | float = True) -> Iterator[None]:
    """This host's lock on one VM's lifecycle (``run_dir``/vm-NAME.lock, flock): held by a
    start, stop or migration for as long as it runs, and released by the kernel when its
    process dies. So the agent can tell a step under way from one that died part-way
    (``agent/vmwork.py`` settles only the latter). ``wait``: True blocks for it, False
    raises VmBusyHere at once, a number of seconds tries that long first (the agent's
    own look at a VM holds it for a moment: a command must not be refused for that)."""
    path = Path(run_dir) / f"vm-{name}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    deadline = time.monotonic() + (wait if not isinstance(wait, bool) else 0.0)
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait is True else fcntl.LOCK_NB))
                break
            except BlockingIOError as exc:
                if time.monotonic() >= deadline:
                    raise VmBusyHere(name) from exc
                time.sleep(0.05)
        yield
    finally:
        os.close(fd)
