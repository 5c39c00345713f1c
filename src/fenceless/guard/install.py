"""``fenceless guard install|remove|status``: put the wrapper in front of LVM, and take it out.

- The binary is moved aside with ``dpkg-divert --add --rename``, a local
  diversion, to ``/usr/libexec/fenceless/lvm`` (``binary.GUARDED_BINARY``):
  on no PATH, in a directory only root may enter, and still named ``lvm``.
  An lvm2 upgrade then installs the new binary there and leaves the wrapper
  alone. On merged-/usr Debian 12 the package lists ``/sbin/lvm`` (``/sbin``
  links to ``/usr/sbin``), and a diversion only applies to the path dpkg
  knows, so the path is asked of ``dpkg-query -S``.
- An install made by an earlier fenceless diverted to ``lvm.distrib`` next to
  the wrapper, and linked it from the state dir: ``install`` moves that
  diversion (the wrapper stays in place meanwhile) and drops the link.
- ``global/metadata_read_only=1`` goes into lvm.conf in a marked block, for
  LVM 2.02 (2.03 ignores it; the wrapper is what 2.03 obeys).
- ``remove`` restores exactly what was there: the original lvm.conf bytes are
  kept in the state dir, the diversion is removed with ``--rename``, and the
  directory the binary was diverted to goes if ``install`` made it.

Everything that changes a file takes its paths from ``GuardPaths`` so the
lab (one mount namespace per host, with /usr/sbin, /usr/libexec and
/var/lib/dpkg overlaid) runs exactly this code.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fenceless import __version__
from fenceless.config import HostConfig
from fenceless.errors import CommandFailed, ExecError, FencelessError, UsageError
from fenceless.guard import role as rolemod
from fenceless.guard.binary import GUARDED_BINARY, GUARDED_PATHS, resolve_lvm_binary
from fenceless.guard.wrapper import WrapperSettings, generate
from fenceless.runner import Runner

OLD_DIVERT_SUFFIX = ".distrib"  # where an earlier fenceless diverted the binary to
OLD_LINK = "guard/lvm"  # and the link named lvm it kept to it in the state dir
WRAPPER_MARK = "# fenceless LVM guard"
BLOCK_BEGIN = "# >>> fenceless guard: managed by `fenceless guard install`; " \
    "`fenceless guard remove` takes it out"
BLOCK_END = "# <<< fenceless guard"
BLOCK = (f"{BLOCK_BEGIN}\n"
         "# LVM 2.02 refuses metadata changes with this; 2.03 ignores it (the wrapper\n"
         "# in front of the lvm binary enforces the role there).\n"
         "global {\n    metadata_read_only = 1\n}\n"
         f"{BLOCK_END}\n")
INSTALL_RECORD = "guard/install.json"
RECORD_FORMAT = 2
CONF_ORIG = "guard/lvm.conf.orig"
INITRAMFS_HOOKS = "/usr/share/initramfs-tools/hook-functions"


class NotTheDistributionBinary(UsageError):
    """the config sets lvm_binary = {binary!r}; the guard wraps the distribution's binary \
only ({paths})"""


class UnknownToDpkg(UsageError):
    """dpkg does not know the lvm binary at {paths} (is lvm2 installed from a package?)"""


class ForeignDiversion(UsageError):
    """{binary} is diverted to {true} (by {by}), not by the guard; the guard will not \
stack on another diversion nor remove it"""


class NotAWrapper(ExecError):
    """{binary} is diverted to {real}, but {phys} is not a fenceless wrapper; not touching \
it (look at it; the diversion can be removed by hand with \
`dpkg-divert --local --remove --rename --divert {real} {binary}`)"""


class NotTheBinary(UsageError):
    """{phys} is not the LVM binary (missing or a script); the guard will not wrap it"""


@dataclass(frozen=True)
class GuardPaths:
    """Where the guard works; the defaults are the machine's."""

    candidates: tuple[str, ...] = ("/sbin/lvm", "/usr/sbin/lvm")  # the binary, as dpkg may know it
    lvm_conf: str = "/etc/lvm/lvm.conf"
    state_dir: str = "/var/lib/fenceless"
    run_dir: str = "/run/fenceless"
    real_binary: str = GUARDED_BINARY  # where the binary is diverted to

    @classmethod
    def for_host(cls, cfg: HostConfig) -> GuardPaths:
        conf_dir = cfg.lvm_system_dir or "/etc/lvm"
        return cls(lvm_conf=os.path.join(conf_dir, "lvm.conf"), state_dir=cfg.state_dir,
                   run_dir=cfg.run_dir)

    @property
    def record(self) -> Path:
        return Path(self.state_dir) / INSTALL_RECORD

    @property
    def conf_orig(self) -> Path:
        return Path(self.state_dir) / CONF_ORIG

    @property
    def old_link(self) -> Path:
        return Path(self.state_dir) / OLD_LINK

    @property
    def real_dir(self) -> str:
        return os.path.dirname(self.real_binary)


# --- pure parts -----------------------------------------------------------------------


def add_block(text: str) -> str:
    """lvm.conf text with the guard's block appended (after a newline, if missing)."""
    if BLOCK_BEGIN in text:
        text = strip_block(text)
    sep = "" if not text or text.endswith("\n") else "\n"
    return text + sep + BLOCK


def strip_block(text: str) -> str:
    """lvm.conf text without the guard's block (the lines from BEGIN to END)."""
    out: list[str] = []
    inside = False
    for line in text.splitlines(keepends=True):
        if line.rstrip("\n") == BLOCK_BEGIN:
            inside = True
        elif inside and line.rstrip("\n") == BLOCK_END:
            inside = False
        elif not inside:
            out.append(line)
    return "".join(out)


def settings_for(cfg: HostConfig, paths: GuardPaths | None = None) -> WrapperSettings:
    paths = paths or GuardPaths.for_host(cfg)
    return WrapperSettings(
        host=cfg.host, shared_vgs=tuple(v.name for v in cfg.vgs), real_binary=paths.real_binary,
        role_file=str(rolemod.role_path(paths.run_dir)), version=__version__)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _is_wrapper(data: bytes | None) -> bool:
    return data is not None and data.startswith(b"#!/bin/sh\n" + WRAPPER_MARK.encode())


# --- file helpers --------------------------------------------------------------------


def _read(path: str | Path) -> bytes | None:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        return None


def _write_atomic(path: str | Path, data: bytes, mode: int = 0o644,
                  like: str | Path | None = None) -> None:
    """Write via a temporary file and rename; keep the mode and owner of ``like``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.fenceless.tmp")
    uid = gid = -1
    if like is not None:
        with contextlib.suppress(FileNotFoundError):
            st = os.stat(like)
            mode, uid, gid = st.st_mode & 0o7777, st.st_uid, st.st_gid
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        if uid >= 0:
            os.chown(tmp, uid, gid)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _copy_binary(src: str, dst: str) -> None:
    """``src`` to ``dst`` (maybe another filesystem) via a temporary file and rename."""
    tmp = os.path.join(os.path.dirname(dst), f".{os.path.basename(dst)}.fenceless.tmp")
    try:
        shutil.copy2(src, tmp)
        st = os.stat(src)
        os.chown(tmp, st.st_uid, st.st_gid)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, dst)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


# --- dpkg ------------------------------------------------------------------------------


def dpkg_path(runner: Runner, paths: GuardPaths) -> str:
    """The LVM binary's path as dpkg knows it (a diversion applies only to that path)."""
    for cand in paths.candidates:
        res = runner.run(["dpkg-query", "-S", cand], check=False, timeout=30)
        if res.rc == 0 and res.stdout.strip():
            return cand
    raise UnknownToDpkg(paths=" or ".join(paths.candidates))


def diversion(runner: Runner, path: str) -> tuple[str, str | None]:
    """(true name, diverting package or None) of ``path``: ``path`` itself when not diverted."""
    true = runner.run(["dpkg-divert", "--truename", path], timeout=30).stdout.strip()
    pkg = runner.run(["dpkg-divert", "--listpackage", path], timeout=30).stdout.strip()
    return true, (pkg or None)


def _divert(runner: Runner, action: str, rename: bool, to: str, binary: str) -> None:
    runner.run(["dpkg-divert", "--local", action, "--rename" if rename else "--no-rename",
                "--divert", to, binary], timeout=60)


def _physical(path: str) -> str:
    """``/sbin/lvm`` -> ``/usr/sbin/lvm``: where the bytes are (for the atomic rename)."""
    return os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))


# --- install ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Found:
    """The LVM binary as install and remove find it."""

    binary: str  # as dpkg knows it
    phys: str  # where its bytes are
    true: str  # where dpkg says it is: binary (not diverted), ours, or someone else's
    pkg: str | None

    @property
    def old(self) -> str:
        return self.binary + OLD_DIVERT_SUFFIX


def _find(runner: Runner, paths: GuardPaths, binary: str | None = None) -> _Found:
    binary = binary or dpkg_path(runner, paths)
    true, pkg = diversion(runner, binary)
    return _Found(binary, _physical(binary), true, pkg)


def install(cfg: HostConfig, runner: Runner, paths: GuardPaths | None = None) -> dict[str, Any]:
    """Divert the binary, write the wrapper and the lvm.conf block (idempotent).

    Refused, with nothing changed, when ``lvm_binary`` is not the distribution's
    path, or when someone else already diverts the binary.
    """
    paths = paths or GuardPaths.for_host(cfg)
    if cfg.lvm_binary not in GUARDED_PATHS:
        raise NotTheDistributionBinary(binary=cfg.lvm_binary, paths=" or ".join(GUARDED_PATHS))
    f = _find(runner, paths)
    real = paths.real_binary
    if f.true not in (f.binary, real, f.old):
        raise ForeignDiversion(binary=f.binary, true=f.true, by=f.pkg or "local")
    if f.true != f.binary:
        current = _read(f.phys)
        if current and not _is_wrapper(current):
            raise NotAWrapper(binary=f.binary, real=f.true, phys=f.phys)
    elif not os.path.isfile(f.phys) or (_read(f.phys) or b"").startswith(b"#!"):
        raise NotTheBinary(phys=f.phys)
    conf_before = _read(paths.lvm_conf)
    _write_record(paths, f, conf_before)
    wrapper = generate(settings_for(cfg, paths)).encode()
    # The wrapper next to the binary first, so the path is without an lvm only between
    # dpkg-divert's rename and ours; an old install's wrapper stays until the new one.
    tmp = Path(f.phys).with_name(".lvm.fenceless-guard.tmp")
    _write_atomic(tmp, wrapper, 0o755)
    try:
        if f.true == f.binary:
            _make_real_dir(paths)
            _divert(runner, "--add", True, real, f.binary)
        elif f.true == f.old:
            _move_old_diversion(runner, paths, f)
        os.replace(tmp, f.phys)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(FileNotFoundError):
        os.unlink(paths.old_link)
    new_conf = add_block((conf_before or b"").decode()).encode()
    if new_conf != conf_before:
        Path(paths.lvm_conf).parent.mkdir(parents=True, exist_ok=True)
        _write_atomic(paths.lvm_conf, new_conf, 0o644, like=paths.lvm_conf)
    return {"host": cfg.host, "installed": True, "already": f.true == real,
            "moved_from": f.old if f.true == f.old else None, "binary": f.binary,
            "diverted_to": real, "wrapper_sha256": _sha256(wrapper),
            "lvm_conf": paths.lvm_conf, "role_file": str(rolemod.role_path(paths.run_dir)),
            "shared_vgs": [v.name for v in cfg.vgs]}


def _write_record(paths: GuardPaths, f: _Found, conf_before: bytes | None) -> None:
    """What remove needs to restore, written once (a second install must not save ours)."""
    record = _read_record(paths)
    paths.record.parent.mkdir(parents=True, exist_ok=True)
    if record is None:
        if conf_before is not None:
            _write_atomic(paths.conf_orig, conf_before, 0o600)
        record = {"binary": f.binary, "lvm_conf": paths.lvm_conf,
                  "lvm_conf_existed": conf_before is not None,
                  "lvm_conf_sha256": _sha256(conf_before) if conf_before is not None else None}
    if record.get("format") != RECORD_FORMAT:  # new, or an earlier fenceless's
        try:
            mode: int | None = stat.S_IMODE(os.stat(paths.real_dir).st_mode)
        except FileNotFoundError:
            mode = None
        record.update(format=RECORD_FORMAT, diverted_to=paths.real_binary, real_dir_mode=mode)
    _write_atomic(paths.record, (json.dumps(record, indent=1, sort_keys=True) + "\n").encode(),
                  0o600)


def _make_real_dir(paths: GuardPaths) -> None:
    """The directory the binary goes to: root's only (0700), on no PATH."""
    os.makedirs(paths.real_dir, mode=0o700, exist_ok=True)
    os.chmod(paths.real_dir, 0o700)


def _move_old_diversion(runner: Runner, paths: GuardPaths, f: _Found) -> None:
    """An earlier install's ``lvm.distrib`` to the real binary's place, diversion and all.

    The old wrapper stays at the binary's path throughout; it fails closed (the
    real binary is not reachable) from the unlink until the new wrapper replaces it.
    """
    _make_real_dir(paths)
    _copy_binary(f.old, paths.real_binary)
    _divert(runner, "--remove", False, f.old, f.binary)
    _divert(runner, "--add", False, paths.real_binary, f.binary)
    os.unlink(f.old)


def _read_record(paths: GuardPaths) -> dict[str, Any] | None:
    data = _read(paths.record)
    if data is None:
        return None
    try:
        rec = json.loads(data)
    except ValueError:
        return None
    return rec if isinstance(rec, dict) else None


# --- remove ----------------------------------------------------------------------------


def remove(cfg: HostConfig, runner: Runner, paths: GuardPaths | None = None) -> dict[str, Any]:
    """Put back the distribution's binary, the diversion list and lvm.conf as they were."""
    paths = paths or GuardPaths.for_host(cfg)
    record = _read_record(paths)
    f = _find(runner, paths, str(record["binary"]) if record else None)
    notes: list[str] = []
    if f.true in (paths.real_binary, f.old):
        current = _read(f.phys)
        if current is not None and not _is_wrapper(current):
            raise NotAWrapper(binary=f.binary, real=f.true, phys=f.phys)
        if current is not None:
            os.unlink(f.phys)
        _divert(runner, "--remove", True, f.true, f.binary)
    elif f.true != f.binary:
        raise ForeignDiversion(binary=f.binary, true=f.true, by=f.pkg or "local")
    else:
        notes.append(f"{f.binary} was not diverted")
    _restore_real_dir(paths, record, notes)
    _restore_conf(paths, record, notes)
    for p in (paths.old_link, paths.conf_orig, paths.record):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(p)
    return {"host": cfg.host, "installed": False, "binary": f.binary, "notes": notes}


def _restore_real_dir(paths: GuardPaths, record: dict[str, Any] | None,
                      notes: list[str]) -> None:
    """Take out the directory install made, or give one that was there its mode back."""
    if record is None or record.get("format") != RECORD_FORMAT:
        return
    mode = record.get("real_dir_mode")
    try:
        if mode is None:
            os.rmdir(paths.real_dir)
        else:
            os.chmod(paths.real_dir, int(mode))
    except FileNotFoundError:
        pass
    except OSError as exc:
        notes.append(f"{paths.real_dir} was left in place: {exc.strerror}")


def _restore_conf(paths: GuardPaths, record: dict[str, Any] | None, notes: list[str]) -> None:
    conf_now = _read(paths.lvm_conf)
    if record is not None and conf_now is not None:
        orig = _read(paths.conf_orig) if record.get("lvm_conf_existed") else None
        expected = add_block((orig or b"").decode()).encode()
        if conf_now == expected:
            if orig is None:
                os.unlink(paths.lvm_conf)
            else:
                _write_atomic(paths.lvm_conf, orig, like=paths.lvm_conf)
        elif BLOCK_BEGIN.encode() in conf_now:
            _write_atomic(paths.lvm_conf, strip_block(conf_now.decode()).encode(),
                          like=paths.lvm_conf)
            notes.append(f"{paths.lvm_conf} was edited since install: only the guard's "
                         "block was taken out")
    elif conf_now is not None and BLOCK_BEGIN.encode() in conf_now:
        _write_atomic(paths.lvm_conf, strip_block(conf_now.decode()).encode(),
                      like=paths.lvm_conf)


# --- status ----------------------------------------------------------------------------


def status(cfg: HostConfig, runner: Runner, paths: GuardPaths | None = None,
           *, lvm_report: bool = True) -> dict[str, Any]:
    """What is in place, and whether it is what ``install`` would write now."""
    paths = paths or GuardPaths.for_host(cfg)
    f = _find(runner, paths)
    diverted = f.true == paths.real_binary
    current = _read(f.phys) or b""
    expected = generate(settings_for(cfg, paths)).encode()
    conf = _read(paths.lvm_conf)
    block = conf is not None and BLOCK in conf.decode(errors="replace")
    installed = f.true in (paths.real_binary, f.old) and _is_wrapper(current)
    real_ok = os.path.isfile(f.true) and os.access(f.true, os.X_OK)
    warnings: list[str] = []
    if not installed:
        warnings.append("the guard is not installed: every LVM command here can change the "
                        "shared VG (`fenceless guard install`)")
    else:
        warnings += _install_warnings(paths, f, current == expected, block, real_ok)
    roles = _role_status(cfg, paths)
    if installed:
        for r in roles:
            if r["state"] != "valid":
                warnings.append(f"VG {r['vg']}: role file line {r['state']}: the wrapper "
                                "treats this host as a reader (is `fenceless agent` running?)")
    auto = autoactivation(cfg, runner) if lvm_report else []
    for a in auto:
        if a.get("autoactivation") is True:
            warnings.append(f"VG {a['vg']} has autoactivation on: it may come up at boot on "
                            f"every host (`vgchange --setautoactivation n {a['vg']}` on the "
                            "writer)")
    # What `fenceless check` calls the guard (E_GUARD), from the facts, not from the
    # warnings' words: a role file not yet written (an agent starting) or an initramfs
    # hook is not a broken guard.
    state = "missing" if not installed else \
        "broken" if current != expected or not real_ok or f.true == f.old else "ok"
    return {
        "host": cfg.host, "installed": installed, "state": state, "binary": f.binary,
        "diverted": diverted,
        "diverted_to": f.true if f.true != f.binary else None, "diverted_by": f.pkg,
        "wrapper": {"present": _is_wrapper(current), "matches": current == expected,
                    "sha256": _sha256(current) if current else None},
        "real_binary": {"path": f.true if installed else paths.real_binary,
                        "ok": installed and real_ok},
        "lvm_conf": {"path": paths.lvm_conf, "block": block},
        "role_file": {"path": str(rolemod.role_path(paths.run_dir)), "vgs": roles},
        "autoactivation": auto, "warnings": warnings,
    }


def _install_warnings(paths: GuardPaths, f: _Found, matches: bool, block: bool,
                      real_ok: bool) -> list[str]:
    out: list[str] = []
    if f.true == f.old:
        out.append(f"an earlier fenceless diverted {f.binary} to {f.old}, on PATH: run "
                   f"`fenceless guard install` again to move it to {paths.real_binary}")
    elif not matches:
        out.append("the wrapper differs from what this fenceless and config would write "
                   "(run `fenceless guard install` again)")
    if not real_ok:
        out.append(f"the real binary {f.true} is missing: every LVM command here fails "
                   "(`fenceless guard install` again, or reinstall lvm2)")
    if not block:
        out.append(f"the guard's block is missing from {paths.lvm_conf}")
    if os.path.exists(INITRAMFS_HOOKS):
        out.append("initramfs-tools copies /sbin/lvm into the initramfs: with the guard that "
                   "is the wrapper, without the real binary; make sure the initramfs does not "
                   f"need LVM, or add a hook that copies {f.true} as /sbin/lvm")
    return out


def _role_status(cfg: HostConfig, paths: GuardPaths) -> list[dict[str, Any]]:
    rf = rolemod.read_role_file(paths.run_dir)
    try:
        boot: str | None = rolemod.current_boot_id()
    except OSError:
        boot = None
    now = rolemod.boottime_cs()
    out: list[dict[str, Any]] = []
    for vg in cfg.vgs:
        e = rf.entries.get(vg.name) if rf is not None else None
        if e is None:
            out.append({"vg": vg.name, "state": "missing", "role": None, "writer": None,
                        "epoch": None, "seconds_left": None})
            continue
        left = (e.valid_until_cs - now) / 100
        state = "valid" if left > 0 else "expired"
        if rf is None or boot is None or rf.boot_id != boot:
            state = "of an earlier boot"
        out.append({"vg": vg.name, "state": state, "role": e.role, "writer": e.writer,
                    "epoch": e.epoch, "seconds_left": round(left, 2)})
    return out


def autoactivation(cfg: HostConfig, runner: Runner,
                   only: str | None = None) -> list[dict[str, Any]]:
    """Each shared VG's autoactivation flag (``only``: that VG's), read through
    fenceless's adapter (--readonly)."""
    from fenceless.lvm.adapter import Lvm

    out: list[dict[str, Any]] = []
    for vg in [v for v in cfg.vgs if only in (None, v.name)]:
        try:
            res = Lvm(runner, cfg, vg, timeout=30, binary=resolve_lvm_binary(cfg)).run(
                "vgs", "--reportformat", "json", "-o", "vg_name,autoactivation", vg.name)
            rows = json.loads(res.stdout)["report"][0]["vg"]
            flag = (rows[0].get("vg_autoactivation") or rows[0].get("autoactivation")) \
                if rows else None
            out.append({"vg": vg.name, "autoactivation": flag == "enabled", "raw": flag})
        except (FencelessError, CommandFailed, ValueError, KeyError, IndexError) as exc:
            out.append({"vg": vg.name, "autoactivation": None, "error": str(exc)})
    return out
