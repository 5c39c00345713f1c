"""``fenceless adopt``: take over a running setup of the kind fenceless replaces.

That setup is a shared VG with one LV per VM disk, and a directory of VM
configs (xl or libvirt XML), usually on an ext4 LV mounted read-only on most
hosts. Which host runs which VM is told by per-host symlinks: a directory per
host, named after it, holding a link to the config of each VM it runs::

    /srv/vmconfigs/web01.cfg
    /srv/vmconfigs/db01.xml
    /srv/vmconfigs/h1/web01.cfg -> ../web01.cfg
    /srv/vmconfigs/h2/db01.xml -> ../db01.xml

Adopting reads all of it, checks all of it, and only then changes anything:
``init --adopt`` adds the control LV in the VG's free space (no existing LV
or PV byte changes), the writer stores each definition on the LUN, and
records each linked VM as running on its host. It writes nothing in the
config directory. Run again after an interruption, it skips what is done.

This module is the pure part: the plan from the directory's contents and the
VG's LVs. ``read_config_dir`` reads the directory (files only, no device).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fenceless.config import HOST_NAME_RE
from fenceless.errors import UserError
from fenceless.hv.domain import DomainSpec, parse_domain_xml, parse_xl

CONFIG_SUFFIXES = {".cfg": "xl", ".xl": "xl", ".xml": "xml"}
MAX_CONFIG = 1 << 20  # a config file larger than this is not a VM config


class ConfigDirUnreadable(UserError):
    """Refused: cannot read the config directory {path} ({reason}); nothing was changed"""


class BadConfig(UserError):
    """Refused: {path}: {detail}. Fix or move the file, and run adopt again; nothing was \
changed"""


class LinkOutside(UserError):
    """Refused: {link} points to {target}, which is not a VM config in {dir}; nothing was \
changed"""


class RunsOnTwoHosts(UserError):
    """Refused: VM {name} is linked from the directories of {hosts}: it runs on one host \
only, so one of the links is stale. Remove it, and run adopt again; nothing was changed"""


class SameNameTwice(UserError):
    """Refused: VM {name} is defined by both {first} and {second}; nothing was changed"""


class DiskOfTwoVms(UserError):
    """Refused: volume {volume} is a disk of {vms}, read-write in {rw}: a read-write disk \
belongs to one VM. Nothing was changed"""


class NoSuchVolume(UserError):
    """Refused: {path} names volume {volume}, which VG {vg} does not have; nothing was \
changed"""


@dataclass(frozen=True)
class ConfigDir:
    """What the config directory holds: config files by name, and the per-host links."""

    path: str
    files: dict[str, str]  # file name -> text
    links: dict[str, list[tuple[str, str]]]  # host -> [(link path, file name it names)]
    skipped: list[str] = field(default_factory=list)  # entries that are neither


@dataclass(frozen=True)
class AdoptVm:
    name: str
    file: str
    source: str  # "xl" | "xml"
    xml: str  # the libvirt XML to store (an xl config's translation)
    spec: DomainSpec
    host: str | None  # where it runs now, by its host's link

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "file": self.file, "source": self.source,
                "host": self.host, "disks": [{"target": d.target, "volume": d.volume,
                                              "mode": d.mode} for d in self.spec.disks]}


@dataclass(frozen=True)
class AdoptPlan:
    vg: str
    lvs: dict[str, int]  # every LV of the VG now: name -> size in bytes
    vms: list[AdoptVm]
    skipped: list[str]

    def users(self) -> dict[str, list[str]]:
        """volume -> the VMs (``name:mode``) that have it as a disk."""
        out: dict[str, list[str]] = {}
        for vm in self.vms:
            for d in vm.spec.disks:
                out.setdefault(d.volume, []).append(f"{vm.name}:{d.mode}")
        return out

    def to_json(self) -> dict[str, Any]:
        users = self.users()
        return {"vg": self.vg, "vms": [v.to_json() for v in self.vms],
                "hosts": sorted({v.host for v in self.vms if v.host is not None}),
                "volumes": [{"name": n, "size_bytes": s, "used_by": users.get(n, [])}
                            for n, s in sorted(self.lvs.items())],
                "unaccounted": sorted(n for n in self.lvs if n not in users),
                "skipped": self.skipped}


def read_config_dir(path: str) -> ConfigDir:
    """The config files (``*.cfg``, ``*.xl``, ``*.xml``) at the top of ``path``, and
    the links in each per-host subdirectory. Read only; nothing is followed out of
    ``path``."""
    root = Path(path)
    try:
        entries = sorted(root.iterdir())
    except OSError as exc:
        raise ConfigDirUnreadable(path=path, reason=exc.strerror or str(exc)) from exc
    files: dict[str, str] = {}
    links: dict[str, list[tuple[str, str]]] = {}
    skipped: list[str] = []
    for entry in entries:
        if entry.is_symlink():
            skipped.append(entry.name)
        elif entry.is_dir():
            if not HOST_NAME_RE.match(entry.name):
                skipped.append(entry.name + "/")
                continue
            links[entry.name] = _host_links(root, entry)
        elif entry.is_file() and entry.suffix in CONFIG_SUFFIXES:
            files[entry.name] = _read(entry)
        else:
            skipped.append(entry.name)
    return ConfigDir(str(root), files, links, skipped)


def _read(path: Path) -> str:
    try:
        # O_NOFOLLOW: a link put in place after the directory was listed is not read.
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as f:
            raw = f.read(MAX_CONFIG + 1)
    except OSError as exc:
        raise BadConfig(path=str(path), detail=exc.strerror or str(exc)) from exc
    if len(raw) > MAX_CONFIG:
        raise BadConfig(path=str(path), detail=f"larger than {MAX_CONFIG} bytes")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadConfig(path=str(path), detail="not UTF-8 text") from exc


def _host_links(root: Path, hostdir: Path) -> list[tuple[str, str]]:
    """(link, config file name) for each link in a host's directory; a link must name a
    config file directly in ``root`` (relative or absolute, but resolving there)."""
    out = []
    try:
        real_root = root.resolve()
        entries = sorted(hostdir.iterdir())
    except (OSError, RuntimeError) as exc:
        raise ConfigDirUnreadable(path=str(hostdir), reason=str(exc)) from exc
    for link in entries:
        if not link.is_symlink():
            raise LinkOutside(link=str(link), target="(not a link)", dir=str(root))
        try:
            target = os.readlink(link)
            resolved = (hostdir / target).resolve()
        except (OSError, RuntimeError) as exc:  # a loop of links, an unreadable one
            raise LinkOutside(link=str(link), target=f"({exc})", dir=str(root)) from exc
        if resolved.parent != real_root or resolved.suffix not in CONFIG_SUFFIXES:
            raise LinkOutside(link=str(link), target=target, dir=str(root))
        out.append((str(link), resolved.name))
    return out


def plan(vg: str, lvs: dict[str, int], found: ConfigDir) -> AdoptPlan:
    """Every config parsed and checked against the VG, every link resolved to a host:
    the plan, or the first refusal (nothing is changed on a refusal)."""
    by_file: dict[str, AdoptVm] = {}
    by_name: dict[str, str] = {}
    for fname, text in sorted(found.files.items()):
        where = os.path.join(found.path, fname)
        source = CONFIG_SUFFIXES[Path(fname).suffix]
        try:
            spec = parse_xl(text, vg, source=where) if source == "xl" else \
                parse_domain_xml(text, vg, source=where)
        except UserError as exc:
            raise BadConfig(path=where, detail=str(exc)) from exc
        if spec.name in by_name:
            raise SameNameTwice(name=spec.name, first=by_name[spec.name], second=fname)
        by_name[spec.name] = fname
        for disk in spec.disks:
            if disk.volume not in lvs:
                raise NoSuchVolume(path=where, volume=disk.volume, vg=vg)
        by_file[fname] = AdoptVm(spec.name, fname, source, spec.xml if source == "xl"
                                 else text, spec, None)
    hosts: dict[str, list[str]] = {}
    for host, items in sorted(found.links.items()):
        for link, fname in items:
            if fname not in by_file:
                raise LinkOutside(link=link, target=fname, dir=found.path)
            hosts.setdefault(fname, []).append(host)
    vms = []
    for fname, vm in sorted(by_file.items(), key=lambda kv: kv[1].name):
        on = sorted(set(hosts.get(fname, [])))
        if len(on) > 1:
            raise RunsOnTwoHosts(name=vm.name, hosts=", ".join(on))
        vms.append(AdoptVm(vm.name, vm.file, vm.source, vm.xml, vm.spec,
                           on[0] if on else None))
    result = AdoptPlan(vg, dict(lvs), vms, list(found.skipped))
    for volume, users in result.users().items():
        rw = [u.split(":")[0] for u in users if u.endswith(":rw")]
        if rw and len(users) > 1:
            raise DiskOfTwoVms(volume=volume, vms=", ".join(u.split(":")[0] for u in users),
                               rw=", ".join(rw))
    return result
