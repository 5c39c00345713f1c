"""The lab: a simulated SAN of loop devices over sparse image files.

One image file per shared VG is the LUN. Each lab host gets its own loop
device over each image (its own block cache, as a host on a real SAN has),
its own LVM system dir whose filter admits only its own loop devices, and
its own mount namespace in which /etc/lvm, /run/lvm and /run/lock/lvm are
that host's, and /usr/sbin, /usr/libexec and /var/lib/dpkg are overlays
whose changes stay in DIR/hosts/NAME/ov/ (so ``fenceless guard install`` can
divert the lvm binary for that host only). Each host's config has its own
``run_dir`` (DIR/hosts/NAME/run) for what the host keeps on a tmpfs. ``lab
exec`` runs a command inside it, so what a host runs in the lab is what it
would run on a real machine. The mounts live and die with the namespace's
holder process: ``lab down`` needs no unmount.

Everything the lab makes is recorded in DIR/lab.json *before* it is made,
and every process it starts carries ``FENCELESS_LAB=DIR`` in its
environment, so ``lab down`` can find and undo all of it after a crash or a
kill -9 of the CLI that ran ``lab up``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fenceless import config as cfgmod
from fenceless.cgroup import WorkGroup, cgroup2_root
from fenceless.errors import LabError, UsageError
from fenceless.faults import crashpoint
from fenceless.lab import libvirt, loopdev
from fenceless.runner import Runner, exec_replace, spawn_detached
from fenceless.validate import human

STATE_FILE = "lab.json"
ENV_LAB = "FENCELESS_LAB"
ENV_HOST = "FENCELESS_LAB_HOST"
MAX_HOSTS = 16
FORMAT = 1

# Paths that are per host inside a lab host's mount namespace, and the
# folder under DIR/hosts/NAME that backs each.
NS_BINDS = (("lvm", "/etc/lvm"), ("run-lvm", "/run/lvm"), ("lock", "/run/lock/lvm"),
            *libvirt.LIBVIRT_BINDS)
# Machine paths that a lab host may change in its own view only: an overlay
# whose upper and work dirs are DIR/hosts/NAME/SUB/{upper,work}. The guard
# (dpkg-divert) moves the lvm binary from /usr/sbin to /usr/libexec/fenceless and
# rewrites /var/lib/dpkg, which a bind mount of one file cannot isolate; an overlay
# copies up only what changes.
NS_OVERLAYS = (("ov/usr-sbin", "/usr/sbin"), ("ov/usr-libexec", "/usr/libexec"),
               ("ov/var-lib-dpkg", "/var/lib/dpkg"))
# The hosts' work cgroups (the watchdog kills them): LAB_CGROUP/<lab id>/<host>.
LAB_CGROUP = "fenceless-lab"

_HOLDER_SCRIPT = (
    'set -e; h="$1"; shift\n'
    'while [ "$#" -gt 1 ] && [ "$1" != "--overlays" ]; do\n'
    '  mount --bind "$h/$1" "$2"; shift 2\n'
    "done\n"
    'if [ "$#" -gt 0 ]; then shift; fi\n'
    'while [ "$#" -gt 1 ]; do\n'
    '  mount -t overlay "fenceless-lab" \\\n'
    '    -o "lowerdir=$2,upperdir=$h/$1/upper,workdir=$h/$1/work" "$2"\n'
    "  shift 2\n"
    "done\n"
    "echo ready\n"
    "exec sleep infinity </dev/null >/dev/null 2>&1\n"
)


class LabOptionOutOfRange(UsageError):
    """{option} must be {bounds}, got {got}"""


class RepeatedVg(UsageError):
    """give each --vg once"""


class InvalidLabVg(UsageError):
    """invalid VG name {vg!r}"""


class NoCommand(UsageError):
    """lab exec needs a command after --"""


@dataclass(frozen=True)
class LabHost:
    name: str
    config: str
    loops: dict[str, str]  # VG name -> this host's loop device over that VG's image
    holder_pid: int | None


def lab_dir(path: str) -> Path:
    return Path(path).resolve()


def _state_path(d: Path) -> Path:
    return d / STATE_FILE


def _write_state(d: Path, state: dict[str, Any]) -> None:
    tmp = d / (STATE_FILE + ".tmp")
    with open(tmp, "w") as f:
        json.dump(state, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, _state_path(d))


def read_state(d: Path) -> dict[str, Any]:
    try:
        text = _state_path(d).read_text()
    except FileNotFoundError as exc:
        raise LabError(dir=str(d), detail="no lab here (run `fenceless lab up --dir "
                       f"{d} --hosts 3` to make one)") from exc
    try:
        state = json.loads(text)
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            raise ValueError("unknown format")
    except ValueError as exc:
        raise LabError(dir=str(d), detail=f"{STATE_FILE} is unreadable ({exc}); "
                       "`fenceless lab down --dir DIR --force` cleans up by scanning") from exc
    return state


def host_dir(d: Path, name: str) -> Path:
    return d / "hosts" / name


def _lvm_conf(hdir: Path, devices: list[str]) -> str:
    accept = ", ".join(f'"a|^{dev}$|"' for dev in devices)
    filt = f"[ {accept}, \"r|.*|\" ]"
    return f"""# LVM config of lab host {hdir.name}: it sees only its own loop devices.
devices {{
    filter = {filt}
    global_filter = {filt}
    obtain_device_list_from_udev = 0
    hints = "none"
    use_devicesfile = 0
}}
global {{
    # This kernel has no device-mapper: metadata only.
    activation = 0
    use_aio = 0
    locking_dir = "{hdir}/lock"
}}
activation {{
    auto_activation_volume_list = []
}}
backup {{
    backup = 1
    backup_dir = "{hdir}/lvm/backup"
    archive = 1
    archive_dir = "{hdir}/lvm/archive"
}}
"""


def up(
    path: str,
    *,
    hosts: int,
    size: int,
    io_timeout: float,
    vgs: list[str],
    runner: Runner,
    lun_dir: str | None = None,
    libvirt_uris: bool = False,
) -> dict[str, Any]:
    """Make the lab. Refuses a DIR that already holds one.

    ``libvirt_uris``: each host's config names its own libvirtd (``start_libvirt``), and
    its agent runs a VM worker; a lab without VMs has neither.

    ``lun_dir`` puts the LUN images elsewhere than DIR/luns: on a tmpfs, every
    O_DIRECT|O_SYNC write of the hosts no longer waits for the machine's disk
    (the tests do this; the loop devices and their caches are the same).
    """
    if not 1 <= hosts <= MAX_HOSTS:
        raise LabOptionOutOfRange(option="--hosts", bounds=f"between 1 and {MAX_HOSTS}",
                                  got=hosts)
    if size < 64 << 20:
        raise LabOptionOutOfRange(option="--size", bounds="at least 64M", got=human(size))
    if not 0.01 <= io_timeout <= 300:
        raise LabOptionOutOfRange(option="--io-timeout", bounds="between 0.01 and 300 s",
                                  got=io_timeout)
    if not vgs or len(set(vgs)) != len(vgs):
        raise RepeatedVg()
    for vg in vgs:
        if not cfgmod.VG_NAME_RE.match(vg):
            raise InvalidLabVg(vg=vg)
    d = lab_dir(path)
    d.mkdir(parents=True, exist_ok=True)
    state: dict[str, Any] = {
        "format": FORMAT, "dir": str(d), "status": "creating", "size": size,
        "io_timeout": io_timeout, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "luns": {vg: _lun_path(d, lun_dir, vg) for vg in vgs},
        "hosts": [],
    }
    try:
        fd = os.open(_state_path(d), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        try:
            old = read_state(d)
            what = f"{len(old.get('hosts', []))} hosts, {old.get('status')}"
        except LabError:
            what = "unreadable state"
        raise LabError(dir=str(d), detail=f"a lab already exists here ({what}); run "
                       f"`fenceless lab down --dir {d}` first") from None
    os.close(fd)
    _write_state(d, state)
    try:
        _build(d, state, hosts, size, io_timeout, vgs, runner, libvirt_uris)
    except BaseException:
        with contextlib.suppress(Exception):
            down(str(d), runner=runner, force=True)
        raise
    return state


def _lun_path(d: Path, lun_dir: str | None, vg: str) -> str:
    if lun_dir is None:
        return str(d / "luns" / f"{vg}.img")
    return str(Path(lun_dir).resolve() / f"fenceless-lab-{_lab_id(d)}-{vg}.img")


def _build(d: Path, state: dict[str, Any], hosts: int, size: int, io_timeout: float,
           vgs: list[str], runner: Runner, libvirt_uris: bool) -> None:
    (d / "luns").mkdir(exist_ok=True)
    for vg, image in state["luns"].items():
        Path(image).parent.mkdir(parents=True, exist_ok=True)
        link = d / "luns" / f"{vg}.img"
        if str(link) != image:  # elsewhere: a link here lets `lab down --force` find it
            link.symlink_to(image)
        with open(image, "wb") as f:
            f.truncate(size)
    for i in range(1, hosts + 1):
        name = f"h{i}"
        hdir = host_dir(d, name)
        for sub in ("lvm/backup", "lvm/archive", "lock", "run-lvm", "state", "run",
                    *(b[0] for b in libvirt.LIBVIRT_BINDS)):
            (hdir / sub).mkdir(parents=True, exist_ok=True)
        entry: dict[str, Any] = {"name": name, "loops": {}, "holder_pid": None,
                                 "config": str(hdir / "fenceless.toml")}
        state["hosts"].append(entry)
        for vg, image in state["luns"].items():
            entry["loops"][vg] = loopdev.attach(runner, image)
            _write_state(d, state)
            crashpoint("lab.up.loop-attached")
        devices = list(entry["loops"].values())
        (hdir / "lvm" / "lvm.conf").write_text(_lvm_conf(hdir, devices))
        host_cfg = cfgmod.HostConfig(
            path=entry["config"], host=name, state_dir=str(hdir / "state"),
            run_dir=str(hdir / "run"), io_timeout=io_timeout,
            vgs=tuple(cfgmod.VgConfig(vg, (dev,)) for vg, dev in entry["loops"].items()),
            lvm_system_dir=str(hdir / "lvm"), activation="lab",
            cgroup=f"{LAB_CGROUP}/{_lab_id(d)}/{name}", watchdog_device="none",
            hypervisor_uri=libvirt.uri(hdir) if libvirt_uris else None,
            # The other hosts' daemons are on this machine too; guests' memory goes
            # over loopback.
            peer_uri=libvirt.uri(host_dir(d, "{host}")),
            migration_uri="tcp://127.0.0.1" if libvirt_uris else None,
            # Every lab host shares this machine's loopback: metrics go to a file each.
            metrics_listen="", metrics_textfile=str(hdir / "metrics.prom"),
        )
        Path(entry["config"]).write_text(cfgmod.render(host_cfg))
        entry["holder_pid"] = _start_holder(d, hdir, name, runner)
        entry["holder_start"] = _proc_start_time(entry["holder_pid"])
        _write_state(d, state)
        crashpoint("lab.up.holder-started")
    state["status"] = "up"
    _write_state(d, state)


def _lab_id(d: Path) -> str:
    """A short name for this lab's cgroups (the lab path may not fit a cgroup name)."""
    import hashlib

    return hashlib.sha256(str(d).encode()).hexdigest()[:12]


def _remove_cgroups(d: Path) -> None:
    """Kill and remove this lab's work cgroups, deepest first."""
    root = cgroup2_root()
    if root is None:
        return
    top = Path(root) / LAB_CGROUP / _lab_id(d)
    for sub, _dirs, _files in sorted(os.walk(top), key=lambda w: -len(w[0])):
        with contextlib.suppress(OSError):
            WorkGroup(sub).kill()
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:
            try:
                os.rmdir(sub)
                break
            except FileNotFoundError:
                break
            except OSError:
                time.sleep(0.02)
    with contextlib.suppress(OSError):
        os.rmdir(top.parent)  # the lab cgroups' parent, once no lab is left


def _lab_env(d: Path, name: str) -> dict[str, str]:
    env = dict(os.environ)
    env[ENV_LAB] = str(d)
    env[ENV_HOST] = name
    env["FENCELESS_CONFIG"] = str(host_dir(d, name) / "fenceless.toml")
    env["LVM_SUPPRESS_FD_WARNINGS"] = "1"
    env.pop("LVM_SYSTEM_DIR", None)
    bindir = os.path.dirname(sys.executable)
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
    return env


def _start_holder(d: Path, hdir: Path, name: str, runner: Runner) -> int:
    """A process that holds the host's mount namespace open; it does nothing else."""
    binds: list[str] = []
    for sub, target in NS_BINDS:
        Path(target).mkdir(parents=True, exist_ok=True)
        binds += [sub, target]
    # overlayfs takes its dirs in one comma/colon-separated option string.
    if any(c in str(hdir) for c in ",:\\"):
        raise LabError(dir=str(d), detail=f"the lab path {hdir} must not contain , : or \\ "
                       "(overlay mount options)")
    binds.append("--overlays")
    for sub, target in NS_OVERLAYS:
        for part in ("upper", "work"):
            (hdir / sub / part).mkdir(parents=True, exist_ok=True)
        binds += [sub, target]
    argv = ["unshare", "--mount", "--propagation", "private", "--",
            "sh", "-c", _HOLDER_SCRIPT, f"fenceless-lab-{name}", str(hdir), *binds]
    return spawn_detached(argv, env=_lab_env(d, name))


def _proc_start_time(pid: int) -> int:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0
    return int(stat.rsplit(")", 1)[1].split()[19])


def _holder_alive(entry: dict[str, Any]) -> bool:
    pid = entry.get("holder_pid")
    return isinstance(pid, int) and _proc_start_time(pid) == entry.get("holder_start")


def hosts(d: Path, state: dict[str, Any]) -> list[LabHost]:
    return [LabHost(h["name"], h["config"], dict(h["loops"]), h.get("holder_pid"))
            for h in state.get("hosts", [])]


def find_host(d: Path, state: dict[str, Any], name: str) -> dict[str, Any]:
    for h in state.get("hosts", []):
        if h["name"] == name:
            return dict(h)
    names = ", ".join(h["name"] for h in state.get("hosts", []))
    raise LabError(dir=str(d), detail=f"no host {name!r} in this lab (hosts: {names})")


def status(path: str) -> dict[str, Any]:
    d = lab_dir(path)
    state = read_state(d)
    loops = {x.device: x for x in loopdev.list_loops()}
    out_hosts = []
    for h in state.get("hosts", []):
        loop_ok = all(dev in loops and loops[dev].backing == state["luns"][vg]
                      for vg, dev in h["loops"].items())
        out_hosts.append({
            "name": h["name"], "config": h["config"], "loops": h["loops"],
            "namespace": "up" if _holder_alive(h) else "down",
            "loops_attached": loop_ok,
        })
    images = set(state["luns"].values())
    mapped = [x for x in loopdev.tree(images) if x.backing not in images]
    return {
        "dir": str(d), "status": state.get("status"), "size": state.get("size"),
        "io_timeout": state.get("io_timeout"), "luns": state["luns"], "hosts": out_hosts,
        "lv_mappings": [{"device": x.device, "over": x.backing, "offset": x.offset,
                         "size": x.sizelimit} for x in mapped],
        "processes": len(_lab_processes(d, state)),
    }


def _ancestors() -> set[int]:
    pids = set()
    pid = os.getpid()
    while pid > 1:
        pids.add(pid)
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            break
        pid = int(stat.rsplit(")", 1)[1].split()[1])
    return pids


def _lab_processes(d: Path, state: dict[str, Any] | None) -> list[int]:
    """Every process the lab started: marked in its environment, or inside a host namespace."""
    marker = f"{ENV_LAB}={d}".encode()
    namespaces = set()
    for h in (state or {}).get("hosts", []):
        if _holder_alive(h):
            with contextlib.suppress(OSError):
                namespaces.add(os.readlink(f"/proc/{h['holder_pid']}/ns/mnt"))
    skip = _ancestors()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in skip:
            continue
        try:
            env = (entry / "environ").read_bytes().split(b"\0")
            ns = os.readlink(entry / "ns" / "mnt")
        except OSError:
            continue
        if marker in env or ns in namespaces:
            found.append(int(entry.name))
    return found


def _stop_processes(d: Path, state: dict[str, Any] | None, grace: float = 3.0) -> int:
    pids = _lab_processes(d, state)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        alive = [p for p in pids if _alive(p)]
        if not alive:
            break
        time.sleep(0.05)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    # Reap what we can; others are reaped by init.
    for pid in pids:
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(pid, os.WNOHANG)
    return len(pids)


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def down(path: str, *, runner: Runner, force: bool = False) -> dict[str, Any]:
    """Stop every lab process and detach every lab loop device, then forget the lab."""
    d = lab_dir(path)
    try:
        state: dict[str, Any] | None = read_state(d)
    except LabError:
        if not force and not _state_path(d).exists():
            raise
        state = None
    images = set((state or {}).get("luns", {}).values())
    images |= {os.path.realpath(p) for p in (d / "luns").glob("*.img")}
    guests = _stop_guests(d)
    stopped = _stop_processes(d, state) + guests
    _remove_cgroups(d)
    detached = []
    for _ in range(3):
        loops = loopdev.tree(images)
        if not loops:
            break
        for x in loops:
            loopdev.detach(runner, x.device)
            detached.append(x.device)
        time.sleep(0.05)
    left = loopdev.tree(images)
    if left:
        raise LabError(dir=str(d), detail="could not detach "
                       + ", ".join(x.device for x in left) + " (still open?)")
    for image in images:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(image)
    # The lab is disposable: its host folders (configs, LVM archives) go with it.
    for sub in ("hosts", "luns"):
        shutil.rmtree(d / sub, ignore_errors=True)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(_state_path(d))
    return {"dir": str(d), "processes_stopped": stopped, "loops_detached": sorted(set(detached))}


def _stop_guests(d: Path) -> int:
    """Kill the QEMU processes of every host's libvirtd (they carry no lab marker)."""
    killed = 0
    for hdir in (d / "hosts").glob("*"):
        for pid in libvirt.qemu_pids(hdir):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
                killed += 1
    return killed


def start_libvirt(path: str, name: str, runner: Runner) -> str:
    """The host's own libvirtd (and virtlogd), in its namespace; its URI."""
    d = lab_dir(path)
    state = read_state(d)
    hdir = host_dir(d, name)
    libvirt.start(_enter_argv(d, state, name), hdir, runner, _lab_env(d, name))
    return libvirt.uri(hdir)


def _enter_argv(d: Path, state: dict[str, Any], name: str) -> list[str]:
    h = find_host(d, state, name)
    if not _holder_alive(h):
        raise LabError(dir=str(d), detail=f"host {name}'s namespace is gone "
                       "(was the lab taken down?); run `fenceless lab down` and `up` again")
    return ["nsenter", "--mount", "--target", str(h["holder_pid"]), "--"]


def exec_in(path: str, name: str, command: list[str]) -> None:
    """Run a command as lab host ``name`` would: its namespace, its config."""
    if not command:
        raise NoCommand()
    d = lab_dir(path)
    state = read_state(d)
    exec_replace([*_enter_argv(d, state, name), *command], _lab_env(d, name))


def shell(path: str, name: str) -> None:
    d = lab_dir(path)
    state = read_state(d)
    env = _lab_env(d, name)
    env["PS1"] = f"[lab {name}] \\w # "
    exec_replace([*_enter_argv(d, state, name), "bash", "--norc", "-i"], env)


# --- agents -----------------------------------------------------------------------
