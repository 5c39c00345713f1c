"""The one LVM2 adapter: every LVM command fenceless runs goes through here.

Why it is strict:
- LVM 2.03 ignores ``global/metadata_read_only``; only ``--readonly`` is
  honoured, and metadata-changing commands reject that flag. So a *reader*
  host is enforced here, by the rules of :mod:`fenceless.lvm.policy` (which
  the guard's wrapper shares): reporting commands get ``--readonly`` (no
  lock, no "repair"), activation must be ``--sysinit --readonly``, and every
  other command is refused before any process starts.
- Every call carries its own ``--config`` with a devices filter that admits
  only this VG's LUN device(s) as this host sees them, so a command never
  scans (or hangs on) another LUN, and never trusts udev or hints.
- ``LC_ALL=C``, no shell, a bounded run time: the caller's lease decides how
  long an LVM command may run, and the runner kills its whole process group.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from fenceless.config import HostConfig, VgConfig
from fenceless.errors import CommandFailed, CommandTimeout, LvmError, NotFound, RoleRefused
from fenceless.lvm import parse, policy
from fenceless.runner import Result, Runner


class Role(enum.Enum):
    READER = "reader"
    WRITER = "writer"


REPORT_OPTS = ("--reportformat", "json", "--units", "b", "--nosuffix")


def _filter_regex(device: str) -> str:
    # config.DEVICE_RE already limits device paths to [A-Za-z0-9/_.:+-]; escape the
    # regex-active ones among those.
    return "^" + re.sub(r"([.+])", r"\\\1", device) + "$"


@dataclass
class Lvm:
    """LVM for one shared VG, as one host sees it, in one role."""

    runner: Runner
    host: HostConfig
    vg: VgConfig
    role: Role = Role.READER
    driver_loaded: bool = True
    timeout: float = 60.0
    # Called while a command runs (see ``Runner.run``): the agent keeps its lease there.
    between: Callable[[], None] | None = None
    # The binary to run: the real one past this host's guard, as the caller resolved
    # it (ops.context); empty means the config's ``lvm_binary``.
    binary: str = ""
    # Told (command, seconds) of each command that ran (the agent's metrics).
    observe: Callable[[str, float], None] | None = None

    # --- plumbing ---------------------------------------------------------------

    def config_text(self, *, no_archive: bool = False) -> str:
        """The ``--config`` of every command; ``no_archive`` for a metadata change.

        A change writes neither LVM's archive nor its backup: every version goes
        into the history ring on the LUN, which every host can read, and the
        writer's agent keeps the latest text in a file of its own after each change
        (``AgentPort.local_copy``), off LVM's path (docs/design.md, "The LVM
        shell"). LVM writes and syncs each of its two files whole, a third of a
        change's time at a thousand LVs, and only the writer of the day had them."""
        accept = ", ".join(f'"a|{_filter_regex(d)}|"' for d in self.vg.devices)
        filt = f'[ {accept}, "r|.*|" ]'
        parts = [
            "devices { "
            f"filter = {filt} global_filter = {filt} "
            'obtain_device_list_from_udev = 0 hints = "none" use_devicesfile = 0 }',
            # Nothing of the shared VG may come up by itself at boot or on a scan.
            "activation { auto_activation_volume_list = [] }",
        ]
        if not self.driver_loaded:
            parts.append("global { activation = 0 }")
        if no_archive:
            parts.append("backup { backup = 0 archive = 0 }")
        return " ".join(parts)

    def env(self) -> dict[str, str]:
        env = {"LVM_SUPPRESS_FD_WARNINGS": "1"}
        if self.host.lvm_system_dir:
            env["LVM_SYSTEM_DIR"] = self.host.lvm_system_dir
        return env

    def argv(self, command: str, args: Sequence[str]) -> list[str]:
        """The full argv for one LVM command, or RoleRefused for a reader."""
        argv = [self.binary or self.host.lvm_binary, command, *args]
        kind = policy.kind(command)
        if kind is policy.Kind.REPORT:
            if "--readonly" not in argv:
                argv.append("--readonly")
        elif kind is policy.Kind.NEUTRAL:
            pass
        elif self.role is Role.READER and not _reader_activation(command, args):
            raise RoleRefused(command=command, hint=(
                "Only the metadata writer runs metadata changes; fenceless forwards volume "
                "operations to it."))
        argv += ["--config", self.config_text(no_archive=kind is policy.Kind.METADATA)]
        return argv

    def run(self, command: str, *args: str, timeout: float | None = None) -> Result:
        argv = self.argv(command, args)
        try:
            # Metadata changes die with their caller: no LVM writer may outlive the
            # lease that allowed it.
            got = self.runner.run(argv, env=self.env(),
                                  timeout=self.timeout if timeout is None else timeout,
                                  die_with_parent=policy.kind(command) is not policy.Kind.REPORT,
                                  between=self.between)
            if self.observe is not None:
                self.observe(command, got.seconds)
            return got
        except CommandTimeout:
            raise
        except CommandFailed as exc:
            raise LvmError(command=f"{command} {' '.join(args)}".strip(),
                           rc=exc.fields.get("rc"), stderr=exc.fields.get("stderr")) from exc

    def _report(self, command: str, fields: Sequence[str], *args: str) -> str:
        return self.run(command, *REPORT_OPTS, "-o", ",".join(fields), *args).stdout

    # --- reports (any role) --------------------------------------------------------

    def pvs(self) -> list[parse.PvInfo]:
        """PVs visible through the filter, i.e. this VG's devices that are PVs."""
        return parse.parse_pvs(self._report("pvs", parse.PV_FIELDS))

    def vgs(self) -> list[parse.VgInfo]:
        """Every VG visible through this VG's devices (normally zero or one)."""
        return parse.parse_vgs(self._report("vgs", parse.VG_FIELDS))

    def vg_info(self) -> parse.VgInfo:
        for vg in self.vgs():
            if vg.name == self.vg.name:
                return vg
        raise NotFound(kind="VG", name=self.vg.name,
                       where=f" on {', '.join(self.vg.devices)} (as host {self.host.host} sees it)")

    def lvs(self) -> list[parse.LvInfo]:
        return parse.parse_lvs(self._report("lvs", parse.LV_FIELDS, self.vg.name))

    def vg_and_lvs(self) -> tuple[parse.VgInfo, list[parse.LvInfo]]:
        """The VG and its LVs from one LVM process (a VG with no LV needs a second)."""
        fields = tuple(dict.fromkeys(parse.VG_FIELDS + parse.LV_FIELDS))
        text = self._report("lvs", fields, self.vg.name)
        lvs = parse.parse_lvs(text)
        vgs = parse.parse_vgs(text.replace('"lv": [', '"vg": ['), command="lvs")
        if not vgs:
            return self.vg_info(), []
        return vgs[0], lvs

    def vg_and_lv(self, name: str) -> tuple[parse.VgInfo, parse.LvInfo]:
        """The VG and one LV from one LVM process: cheaper than every LV at scale."""
        fields = tuple(dict.fromkeys(parse.VG_FIELDS + parse.LV_FIELDS))
        text = self._report("lvs", fields, f"{self.vg.name}/{name}")
        lvs = parse.parse_lvs(text)
        vgs = parse.parse_vgs(text.replace('"lv": [', '"vg": ['), command="lvs")
        if len(lvs) != 1 or len(vgs) != 1 or lvs[0].name != name:
            raise NotFound(kind="volume", name=name, where=f" in VG {self.vg.name}")
        return vgs[0], lvs[0]

    def segments(self, lv: str | None = None) -> list[parse.Segment]:
        """Segments of every LV, or of one (a far smaller report at scale)."""
        target = self.vg.name if lv is None else f"{self.vg.name}/{lv}"
        return parse.parse_segments(self._report("lvs", parse.SEG_FIELDS, "--segments", target))

    def version(self) -> str:
        out = self.run("version").stdout
        m = re.search(r"LVM version:\s*(\S+)", out)
        return m.group(1) if m else "unknown"

    # --- metadata changes (writer role only) ----------------------------------------

    def pvcreate(self, device: str, *, metadatasize: str = "16m",
                 size_bytes: int | None = None) -> None:
        """No --yes: LVM must refuse (not wipe) a device that holds other signatures."""
        size = ["--setphysicalvolumesize", f"{size_bytes}b"] if size_bytes else []
        self.run("pvcreate", "--metadatasize", metadatasize, *size, device)

    def vgcreate(self, devices: Sequence[str], extent_size: str = "4m") -> None:
        self.run("vgcreate", "--yes", "--physicalextentsize", extent_size,
                 "--setautoactivation", "n", self.vg.name, *devices)

    def lvcreate(self, name: str, size_bytes: int, tags: Sequence[str] = (), *,
                 contiguous: bool = False, pvs: Sequence[str] = (),
                 timeout: float | None = None) -> None:
        tag_args = [a for t in tags for a in ("--addtag", t)]
        alloc = ["--alloc", "contiguous"] if contiguous else []
        self.run("lvcreate", "--yes", "--activate", "n", "--zero", "n",
                 "--setautoactivation", "n", "--size", f"{size_bytes}b", "--name", name,
                 *alloc, *tag_args, self.vg.name, *pvs, timeout=timeout)

    def lvextend(self, name: str, size_bytes: int, *, timeout: float | None = None) -> None:
        self.run("lvextend", "--size", f"{size_bytes}b", f"{self.vg.name}/{name}",
                 timeout=timeout)

    def lvrename(self, old: str, new: str, *, timeout: float | None = None) -> None:
        self.run("lvrename", self.vg.name, old, new, timeout=timeout)

    def lvpermission(self, name: str, *, readonly: bool, tag: str,
                     timeout: float | None = None) -> None:
        """Set the LV's LVM permission (``r`` or ``rw``), adding or dropping ``tag`` in
        the same metadata change (the tag says who set it)."""
        self.run("lvchange", "--permission", "r" if readonly else "rw",
                 "--addtag" if readonly else "--deltag", tag, f"{self.vg.name}/{name}",
                 timeout=timeout)

    def lvremove(self, name: str, *, timeout: float | None = None) -> None:
        self.run("lvremove", "--yes", f"{self.vg.name}/{name}", timeout=timeout)

    def vgck(self) -> Result:
        return self.run("vgck", self.vg.name)

    # --- activation (both roles; a reader activates read-only) -----------------------

    def activate(self, name: str) -> None:
        if self.role is Role.READER:
            self.run("lvchange", "--activate", "y", "--sysinit", "--readonly",
                     f"{self.vg.name}/{name}")
        else:
            self.run("lvchange", "--activate", "y", f"{self.vg.name}/{name}")

    def deactivate(self, name: str) -> None:
        if self.role is Role.READER:
            self.run("lvchange", "--activate", "n", "--sysinit", "--readonly",
                     f"{self.vg.name}/{name}")
        else:
            self.run("lvchange", "--activate", "n", f"{self.vg.name}/{name}")


def _reader_activation(command: str, args: Sequence[str]) -> bool:
    """The wrapper's activation rule, with ``--sysinit --readonly`` given, not added.

    The adapter builds its own argv, so a missing ``--sysinit --readonly`` is a
    bug in the caller: refusing it shows the bug instead of hiding it.
    """
    return policy.reader_activation(command, args) and policy.runs_readonly(args)
