"""Per-host configuration: one TOML file per host.

Example::

    host = "h1"
    state_dir = "/var/lib/fenceless"
    run_dir = "/run/fenceless"         # a tmpfs: the guard's role file, gone after a reboot
    io_timeout = 10.0
    lvm_system_dir = "/etc/lvm"        # optional: LVM_SYSTEM_DIR for fenceless's LVM calls
    hypervisor_uri = "qemu:///system"  # optional, used by the VM commands
    peer_uri = "qemu+ssh://{host}/system"  # another host's libvirtd (live migration)
    migration_uri = "tcp://{host}"     # optional: where a guest's memory goes
    activation = "lvm"                 # "lvm" (device-mapper) or "lab" (loop mappings)
    cgroup = "fenceless"               # the work cgroup the watchdog kills, under cgroup v2
    watchdog_device = "/dev/watchdog"  # the hardware backstop ("none": no device)
    lvm_shell = true                   # the writer runs LVM in one long-lived lvm shell
    metrics_listen = "127.0.0.1:9567"  # Prometheus metrics over HTTP ("" for none)
    metrics_textfile = "/var/lib/prometheus/node-exporter/fenceless.prom"  # optional

    [vg.vmstore]
    devices = ["/dev/disk/by-id/wwn-0x600a0b80001234"]

A cluster often has several LUNs, one VG each, so VGs are a table keyed by
name; commands take ``--vg`` when more than one is configured. Parsing is a
pure function so that every refusal can be unit-tested.
"""

from __future__ import annotations

import os
import re
import tomllib
from typing import Any, NamedTuple

from fenceless.errors import ConfigError, UsageError

DEFAULT_PATH = "/etc/fenceless/fenceless.toml"
ENV_VAR = "FENCELESS_CONFIG"

# 43 characters: the on-disk name fields hold 48 bytes, and the init lock adds "init:".
HOST_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,42}$")
# LVM's own VG name rule, minus names LVM reserves.
VG_NAME_RE = re.compile(r"^[A-Za-z0-9+_][A-Za-z0-9+_.-]{0,126}$")
# Device paths end up inside an LVM filter regex; keep them to a plain alphabet.
DEVICE_RE = re.compile(r"^/dev/[A-Za-z0-9/_.:+-]+$")
ACTIVATION_MODES = ("lvm", "lab")
CGROUP_PART_RE = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9_.-]*$")


class VgNotChosen(UsageError):
    """this host has {count} shared VGs configured ({names}): choose one with --vg NAME"""


class VgNotConfigured(UsageError):
    """VG {vg!r} is not configured on host {host} (configured: {names}; see {path})"""


# NamedTuples, not dataclasses: every CLI start loads a config, and the
# dataclasses module alone costs several ms of imports.
class VgConfig(NamedTuple):
    name: str
    devices: tuple[str, ...]


class BadHostName(UsageError):
    """{name!r} is not a host name (lowercase letters, digits and '-', at most 43)"""


def host_name(name: str) -> str:
    """``name`` if it is a host name fenceless takes (BadHostName otherwise)."""
    if not HOST_NAME_RE.match(name):
        raise BadHostName(name=name[:64])
    return name


class HostConfig(NamedTuple):
    path: str
    host: str
    state_dir: str
    io_timeout: float
    vgs: tuple[VgConfig, ...]
    lvm_system_dir: str | None = None
    lvm_binary: str = "/usr/sbin/lvm"
    hypervisor_uri: str | None = None
    activation: str = "lvm"
    cgroup: str = "fenceless"
    watchdog_device: str = "/dev/watchdog"
    run_dir: str = "/run/fenceless"
    # Live migration: how this host reaches another host's libvirtd, and (optional) where
    # the guest's memory is sent; ``{host}`` is the other host's name.
    peer_uri: str = "qemu+ssh://{host}/system"
    migration_uri: str | None = None
    # The writer keeps one long-lived ``lvm`` shell for its LVM commands (lvm/shell.py).
    lvm_shell: bool = True
    # Prometheus metrics (agent/metrics.py): HOST:PORT to serve them on ("": not served),
    # and a file for node-exporter's textfile collector ("": none).
    metrics_listen: str = "127.0.0.1:9567"
    metrics_textfile: str = ""

    def peer(self, host: str) -> str:
        """``peer_uri`` for ``host``. The name comes from the shared disk: only a valid
        host name goes into a URI (no parameters slipped in)."""
        return self.peer_uri.replace("{host}", host_name(host))

    def migration_to(self, host: str) -> str | None:
        if not self.migration_uri:
            return None
        return self.migration_uri.replace("{host}", host_name(host))

    def vg(self, name: str | None) -> VgConfig:
        """The VG a command works on: the named one, or the only one configured."""
        if name is None:
            if len(self.vgs) == 1:
                return self.vgs[0]
            names = ", ".join(v.name for v in self.vgs)
            raise VgNotChosen(count=len(self.vgs), names=names)
        for vg in self.vgs:
            if vg.name == name:
                return vg
        names = ", ".join(v.name for v in self.vgs)
        raise VgNotConfigured(vg=name, host=self.host, names=names, path=self.path)


def resolve_path(cli_path: str | None, environ: dict[str, str] | None = None) -> str:
    env = os.environ if environ is None else environ
    return cli_path or env.get(ENV_VAR) or DEFAULT_PATH


def load(path: str) -> HostConfig:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError as exc:
        raise ConfigError(
            path=path,
            detail=f"file not found (give one with -c PATH or {ENV_VAR}; "
            "a lab writes one per host under DIR/hosts/NAME/)",
        ) from exc
    except OSError as exc:
        raise ConfigError(path=path, detail=f"cannot read: {exc.strerror}") from exc
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(path=path, detail="not UTF-8 text") from exc
    return parse(text, path)


_TOP_KEYS = {
    "host", "state_dir", "run_dir", "io_timeout", "lvm_system_dir", "lvm_binary",
    "hypervisor_uri", "activation", "vg", "cgroup", "watchdog_device", "peer_uri",
    "migration_uri", "lvm_shell", "metrics_listen", "metrics_textfile",
}
_VG_KEYS = {"devices"}


def _type_name(value: Any) -> str:
    return {bool: "boolean", int: "integer", float: "number", str: "string",
            list: "array", dict: "table"}.get(type(value), type(value).__name__)


class _Fields:
    """Checked access to one parsed file's keys: every problem names the file and key."""

    def __init__(self, raw: dict[str, Any], path: str) -> None:
        self.raw = raw
        self.path = path

    def fail(self, key: str, expected: str, value: Any = None, *,
             show: bool = True) -> ConfigError:
        got = f", got {value!r} ({_type_name(value)})" if show else ""
        return ConfigError(path=self.path, detail=f"key {key!r}: expected {expected}{got}")

    def string(self, key: str, default: str | None, *, required: bool = False) -> str | None:
        if key not in self.raw:
            if required:
                raise self.fail(key, "a string; it is required", show=False)
            return default
        value = self.raw[key]
        if not isinstance(value, str) or not value:
            raise self.fail(key, "a non-empty string", value)
        return value

    def listen(self, key: str) -> str:
        value = self.raw.get(key, "127.0.0.1:9567")
        host, _, port = value.rpartition(":") if isinstance(value, str) else ("", "", "")
        if value == "" or (isinstance(value, str) and host and port.isdigit()
                           and 0 < int(port) < 65536):
            return str(value)
        raise self.fail(key, 'ADDRESS:PORT (such as "127.0.0.1:9567"), or "" for none', value)

    def path_or_empty(self, key: str) -> str:
        value = self.raw.get(key, "")
        if not isinstance(value, str) or (value and not value.startswith("/")):
            raise self.fail(key, 'an absolute path, or "" for none', value)
        return value

    def boolean(self, key: str, default: bool) -> bool:
        value = self.raw.get(key, default)
        if not isinstance(value, bool):
            raise self.fail(key, "true or false", value)
        return value

    def io_timeout(self) -> float:
        if "io_timeout" not in self.raw:
            return 10.0
        value = self.raw["io_timeout"]
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.fail("io_timeout", "a number of seconds", value)
        if not 0.01 <= float(value) <= 300:
            raise self.fail("io_timeout", "seconds between 0.01 and 300", value)
        return float(value)

    def cgroup(self) -> str:
        value = self.string("cgroup", "fenceless") or "fenceless"
        parts = value.strip("/").split("/")
        if any(not CGROUP_PART_RE.match(p) for p in parts):
            raise self.fail("cgroup", "a cgroup path of letters, digits and - _ . (below the "
                            "cgroup v2 root)", value)
        return "/".join(parts)

    def vgs(self) -> tuple[VgConfig, ...]:
        vg_table = self.raw.get("vg")
        if vg_table is None:
            raise ConfigError(
                path=self.path,
                detail='no shared VG configured: add a table such as [vg.vmstore] with '
                'devices = ["/dev/sdX"]',
            )
        if not isinstance(vg_table, dict) or not vg_table:
            raise self.fail("vg", "a table of VGs such as [vg.vmstore]", vg_table)
        seen: dict[str, str] = {}
        return tuple(self.vg(name, body, seen) for name, body in vg_table.items())

    def vg(self, name: str, body: Any, seen: dict[str, str]) -> VgConfig:
        key = f"vg.{name}"
        if not VG_NAME_RE.match(name) or name in (".", ".."):
            raise self.fail(key, "a VG name of letters, digits and + _ . - (at most 127)", name)
        if not isinstance(body, dict):
            raise self.fail(key, "a table with a 'devices' key", body)
        for sub in body:
            if sub not in _VG_KEYS:
                raise ConfigError(path=self.path, detail=f"unknown key {key + '.' + sub!r} "
                                  f"(known keys: {', '.join(sorted(_VG_KEYS))})")
        devices = body.get("devices")
        if devices is None:
            raise self.fail(f"{key}.devices", "a list of device paths; it is required",
                            show=False)
        if not isinstance(devices, list) or not devices:
            raise self.fail(f"{key}.devices", "a non-empty list of device paths", devices)
        for dev in devices:
            if not isinstance(dev, str) or not DEVICE_RE.match(dev) or ".." in dev:
                raise self.fail(f"{key}.devices", "device paths under /dev/ "
                                "(letters, digits and / _ . : + -)", dev)
            if dev in seen:
                raise self.fail(f"{key}.devices", f"each device in one VG only "
                                f"({dev} is also in {seen[dev]})", dev, show=False)
            seen[dev] = name
        return VgConfig(name=name, devices=tuple(devices))


def parse(text: str, path: str) -> HostConfig:
    """Parse and check one host's config; every problem names the file and key."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(path=path, detail=f"not valid TOML: {exc}") from exc
    for key in raw:
        if key not in _TOP_KEYS:
            known = ", ".join(sorted(_TOP_KEYS))
            raise ConfigError(path=path, detail=f"unknown key {key!r} (known keys: {known})")
    f = _Fields(raw, path)
    host = f.string("host", None, required=True)
    assert host is not None
    if not HOST_NAME_RE.match(host):
        raise f.fail("host", "a host name of lowercase letters, digits and '-' "
                     "(at most 43, starting with a letter or digit)", host)
    state_dir = f.string("state_dir", "/var/lib/fenceless")
    assert state_dir is not None
    run_dir = f.string("run_dir", "/run/fenceless")
    assert run_dir is not None
    for key in ("state_dir", "run_dir", "lvm_system_dir", "lvm_binary"):
        value = raw.get(key)
        if isinstance(value, str) and not value.startswith("/"):
            raise f.fail(key, "an absolute path", value)
    io_timeout = f.io_timeout()
    activation = f.string("activation", "lvm")
    assert activation is not None
    if activation not in ACTIVATION_MODES:
        raise f.fail("activation", " or ".join(repr(m) for m in ACTIVATION_MODES), activation)
    return HostConfig(
        path=path, host=host, state_dir=state_dir, io_timeout=io_timeout, vgs=f.vgs(),
        lvm_system_dir=f.string("lvm_system_dir", None),
        lvm_binary=f.string("lvm_binary", "/usr/sbin/lvm") or "/usr/sbin/lvm",
        hypervisor_uri=f.string("hypervisor_uri", None),
        peer_uri=f.string("peer_uri", None) or "qemu+ssh://{host}/system",
        migration_uri=f.string("migration_uri", None),
        activation=activation, run_dir=run_dir,
        cgroup=f.cgroup(),
        watchdog_device=f.string("watchdog_device", "/dev/watchdog") or "/dev/watchdog",
        lvm_shell=f.boolean("lvm_shell", True),
        metrics_listen=f.listen("metrics_listen"),
        metrics_textfile=f.path_or_empty("metrics_textfile"),
    )


def render(cfg: HostConfig) -> str:
    """TOML text for a config (the lab writes host configs with this)."""

    def q(s: str) -> str:
        return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'

    lines = [
        f"host = {q(cfg.host)}",
        f"state_dir = {q(cfg.state_dir)}",
        f"run_dir = {q(cfg.run_dir)}",
        f"io_timeout = {cfg.io_timeout!r}",
        f"activation = {q(cfg.activation)}",
        f"lvm_binary = {q(cfg.lvm_binary)}",
    ]
    if cfg.lvm_system_dir:
        lines.append(f"lvm_system_dir = {q(cfg.lvm_system_dir)}")
    if cfg.hypervisor_uri:
        lines.append(f"hypervisor_uri = {q(cfg.hypervisor_uri)}")
        lines.append(f"peer_uri = {q(cfg.peer_uri)}")
        if cfg.migration_uri:
            lines.append(f"migration_uri = {q(cfg.migration_uri)}")
    lines.append(f"cgroup = {q(cfg.cgroup)}")
    lines.append(f"watchdog_device = {q(cfg.watchdog_device)}")
    if not cfg.lvm_shell:
        lines.append("lvm_shell = false")
    lines.append(f"metrics_listen = {q(cfg.metrics_listen)}")
    if cfg.metrics_textfile:
        lines.append(f"metrics_textfile = {q(cfg.metrics_textfile)}")
    for vg in cfg.vgs:
        devs = ", ".join(q(d) for d in vg.devices)
        lines += ["", f"[vg.{vg.name}]", f"devices = [{devs}]"]
    return "\n".join(lines) + "\n"
