"""Each lab host's own libvirtd, in the host's mount namespace.

libvirt keeps its sockets, state, caches and logs in four fixed directories;
the lab host's namespace has its own of each (bind mounts from
DIR/hosts/NAME/libvirt, ``LIBVIRT_BINDS``), so several independent libvirtd
run side by side, one per lab host, as one per machine would. virtlogd runs in
the same namespace (libvirt refuses to create a domain without it). A host's
config names its daemon as ``hypervisor_uri``
(``qemu+unix:///system?socket=DIR/hosts/NAME/libvirt/run/libvirt-sock``).

The daemons carry the lab's environment marker, so ``lab down`` stops them
like every lab process. QEMU does not (libvirt gives it a clean environment):
``qemu_pids`` finds each host's guests by libvirt's pid files, and ``lab
down`` kills those first.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from pathlib import Path

from fenceless.errors import LabError
from fenceless.runner import Runner

LIBVIRT_BINDS = (("libvirt/run", "/run/libvirt"), ("libvirt/lib", "/var/lib/libvirt"),
                 ("libvirt/cache", "/var/cache/libvirt"), ("libvirt/log", "/var/log/libvirt"))
READY_WAIT = 20.0


def socket_path(hdir: Path) -> Path:
    return hdir / "libvirt" / "run" / "libvirt-sock"


def uri(hdir: Path) -> str:
    return f"qemu+unix:///system?socket={socket_path(hdir)}"


def start(enter: list[str], hdir: Path, runner: Runner, env: dict[str, str]) -> None:
    """libvirtd and virtlogd in the host's namespace (``enter``: the nsenter argv), with
    the lab's environment (``env``: its marker is how ``lab down`` finds them)."""
    (hdir / "libvirt" / "log" / "qemu").mkdir(parents=True, exist_ok=True)
    sock = socket_path(hdir)
    if sock.exists():
        with contextlib.suppress(FileNotFoundError):
            sock.unlink()  # a daemon of an earlier lab, gone with its namespace
    # Each daemon has a host UUID of its own: libvirt refuses a migration between two
    # daemons that report the same one (as two on one machine otherwise do).
    conf = hdir / "libvirt" / "libvirtd.conf"
    conf.write_text(f'host_uuid = "{uuid.uuid5(uuid.NAMESPACE_URL, str(hdir))}"\n')
    runner.run([*enter, "libvirtd", "--daemon", "--config", str(conf),
                "--pid-file", "/run/libvirt/libvirtd.pid"], env=env)
    # Its default pid file is /run/virtlogd.pid, shared by every namespace: each host's
    # goes with the rest of its libvirt state.
    runner.run([*enter, "virtlogd", "--daemon", "--pid-file", "/run/libvirt/virtlogd.pid"],
               env=env)
    deadline = time.monotonic() + READY_WAIT
    while not sock.exists():
        if time.monotonic() > deadline:
            raise LabError(dir=str(hdir), detail=f"libvirtd did not open {sock} within "
                           f"{READY_WAIT:.0f}s (see {hdir}/libvirt/log)")
        time.sleep(0.05)


def qemu_pids(hdir: Path) -> list[int]:
    """The QEMU processes of this host's libvirtd, from its pid files."""
    pids = []
    for f in (hdir / "libvirt" / "run" / "qemu").glob("*.pid"):
        if f.name == "driver.pid":  # libvirtd's own (the QEMU driver's lock), not a guest
            continue
        with contextlib.suppress(OSError, ValueError):
            pids.append(int(f.read_text().strip()))
    return pids
