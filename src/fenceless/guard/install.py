"""``fenceless guard install|remove|status``: put the wrapper in front of LVM, and take it out.

- The binary is moved aside with ``dpkg-divert --add --rename``, a local
  diversion, so that an lvm2 upgrade installs the new binary as
  ``lvm.distrib`` and leaves the wrapper alone. On merged-/usr Debian 12 the
  package lists ``/sbin/lvm`` (``/sbin`` links to ``/usr/sbin``), and a
  diversion only applies to the path dpkg knows, so the path is asked of
  ``dpkg-query -S``.
- ``global/metadata_read_only=1`` goes into lvm.conf in a marked block, for
  LVM 2.02 (2.03 ignores it; the wrapper is what 2.03 obeys).
- ``remove`` restores exactly what was there: the original lvm.conf bytes are
  kept in the state dir, and the diversion is removed with ``--rename``.

Everything that changes a file takes its paths from ``GuardPaths`` so the
lab (one mount namespace per host, with /usr/sbin and /var/lib/dpkg
overlaid) runs exactly this code.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fenceless import __version__
from fenceless.config import HostConfig
from fenceless.errors import CommandFailed, ExecError, FencelessError, UsageError
from fenceless.guard import role as rolemod
from fenceless.guard.binary import GUARDED_PATHS, lvm_link, resolve_lvm_binary
from fenceless.guard.wrapper import WrapperSettings, generate
from fenceless.runner import Runner

DIVERT_SUFFIX = ".distrib"
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
CONF_ORIG = "guard/lvm.conf.orig"
INITRAMFS_HOOKS = "/usr/share/initramfs-tools/hook-functions"


@dataclass(frozen=True)
class GuardPaths:
    """Where the guard works; the defaults are the machine's."""

    candidates: tuple[str, ...] = ("/sbin/lvm", "/usr/sbin/lvm")  # the binary, as dpkg may know it
    lvm_conf: str = "/etc/lvm/lvm.conf"
    state_dir: str = "/var/lib/fenceless"

    @classmethod
    def for_host(cls, cfg: HostConfig) -> GuardPaths:
        conf_dir = cfg.lvm_system_dir or "/etc/lvm"
        return cls(lvm_conf=os.path.join(conf_dir, "lvm.conf"), state_dir=cfg.state_dir)

    @property
    def record(self) -> Path:
        return Path(self.state_dir) / INSTALL_RECORD

    @property
    def conf_orig(self) -> Path:
        return Path(self.state_dir) / CONF_ORIG


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


def settings_for(cfg: HostConfig, real_binary: str) -> WrapperSettings:
    return WrapperSettings(
        host=cfg.host, shared_vgs=tuple(v.name for v in cfg.vgs), real_binary=real_binary,
        lvm_link=str(lvm_link(cfg.state_dir)), role_file=str(rolemod.role_path(cfg.state_dir)),
        version=__version__)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


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


# --- dpkg ------------------------------------------------------------------------------


def dpkg_path(runner: Runner, paths: GuardPaths) -> str:
    """The LVM binary's path as dpkg knows it (a diversion applies only to that path)."""
    for cand in paths.candidates:
        res = runner.run(["dpkg-query", "-S", cand], check=False, timeout=30)
        if res.rc == 0 and res.stdout.strip():
            return cand
    raise UsageError(detail="dpkg does not know the lvm binary at "
                     + " or ".join(paths.candidates) + " (is lvm2 installed from a package?)")


def diversion(runner: Runner, path: str) -> tuple[str, str | None]:
    """(true name, diverting package or None) of ``path``: ``path`` itself when not diverted."""
    true = runner.run(["dpkg-divert", "--truename", path], timeout=30).stdout.strip()
    pkg = runner.run(["dpkg-divert", "--listpackage", path], timeout=30).stdout.strip()
    return true, (pkg or None)


def _physical(path: str) -> str:
    """``/sbin/lvm`` -> ``/usr/sbin/lvm``: where the bytes are (for the atomic rename)."""
    return os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))


# --- install ---------------------------------------------------------------------------


def install(cfg: HostConfig, runner: Runner, paths: GuardPaths | None = None) -> dict[str, Any]:
    """Divert the binary, write the wrapper and the lvm.conf block (idempotent).

    Refused, with nothing changed, when ``lvm_binary`` is not the distribution's
    path, or when someone else already diverts the binary.
    """
    paths = paths or GuardPaths.for_host(cfg)
    if cfg.lvm_binary not in GUARDED_PATHS:
        raise UsageError(detail=f"the config sets lvm_binary = {cfg.lvm_binary!r}; the guard "
                         f"wraps the distribution's binary only ({' or '.join(GUARDED_PATHS)})")
    binary = dpkg_path(runner, paths)
    real = binary + DIVERT_SUFFIX
    true, pkg = diversion(runner, binary)
    already = true == real
    if true != binary and not already:
        raise UsageError(detail=f"{binary} is already diverted to {true} (by {pkg or 'local'}); "
                         "the guard will not stack on another diversion")
    wrapper = generate(settings_for(cfg, real)).encode()
    phys = _physical(binary)
    if already:
        current = _read(phys) or b""
        if current and not current.startswith(b"#!/bin/sh\n" + WRAPPER_MARK.encode()):
            raise ExecError(detail=f"{binary} is diverted to {real}, but {phys} is not a "
                            "fenceless wrapper; look at it before running install again")
    elif not os.path.isfile(phys) or (_read(phys) or b"").startswith(b"#!"):
        raise UsageError(detail=f"{phys} is not the LVM binary (missing or a script); "
                         "the guard will not wrap it")

    # The link named "lvm" that fenceless and the wrapper run the real binary by.
    link = lvm_link(cfg.state_dir)
    link.parent.mkdir(parents=True, exist_ok=True)
    if os.path.islink(link) and os.readlink(link) != real:
        os.unlink(link)
    if not os.path.islink(link):
        os.symlink(real, link)

    # lvm.conf: keep the original bytes (once: a second install must not save ours).
    conf_before = _read(paths.lvm_conf)
    record = _read_record(paths)
    if record is None:
        if conf_before is not None:
            _write_atomic(paths.conf_orig, conf_before, 0o600)
        record = {"format": 1, "binary": binary, "diverted_to": real,
                  "lvm_conf": paths.lvm_conf, "lvm_conf_existed": conf_before is not None,
                  "lvm_conf_sha256": _sha256(conf_before) if conf_before is not None else None}
    _write_atomic(paths.record, (json.dumps(record, indent=1, sort_keys=True) + "\n").encode(),
                  0o600)

    # Wrapper next to the binary first, so the path is without an lvm only between
    # dpkg-divert's rename and ours.
    tmp = Path(phys).with_name(".lvm.fenceless-guard.tmp")
    _write_atomic(tmp, wrapper, 0o755)
    try:
        if not already:
            runner.run(["dpkg-divert", "--local", "--add", "--rename", "--divert", real, binary],
                       timeout=60)
        os.replace(tmp, phys)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    conf_text = (conf_before or b"").decode()
    new_conf = add_block(conf_text).encode()
    if new_conf != conf_before:
        Path(paths.lvm_conf).parent.mkdir(parents=True, exist_ok=True)
        _write_atomic(paths.lvm_conf, new_conf, 0o644, like=paths.lvm_conf)
    return {"host": cfg.host, "installed": True, "already": already, "binary": binary,
            "diverted_to": real, "lvm_link": str(link), "wrapper_sha256": _sha256(wrapper),
            "lvm_conf": paths.lvm_conf, "role_file": str(rolemod.role_path(cfg.state_dir)),
            "shared_vgs": [v.name for v in cfg.vgs]}


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
    binary = str(record["binary"]) if record else dpkg_path(runner, paths)
    real = binary + DIVERT_SUFFIX
    true, _pkg = diversion(runner, binary)
    notes: list[str] = []
    phys = _physical(binary)
    if true == real:
        current = _read(phys)
        if current is not None and not current.startswith(
                b"#!/bin/sh\n" + WRAPPER_MARK.encode()):
            raise ExecError(detail=f"{phys} is not a fenceless wrapper any more; not touching it "
                            f"(the real binary is {real}; remove the diversion by hand with "
                            f"`dpkg-divert --remove --rename --divert {real} {binary}`)")
        if current is not None:
            os.unlink(phys)
        runner.run(["dpkg-divert", "--local", "--remove", "--rename", "--divert", real, binary],
                   timeout=60)
    elif true != binary:
        raise UsageError(detail=f"{binary} is diverted to {true}, not by the guard; "
                         "leaving it alone")
    else:
        notes.append(f"{binary} was not diverted")

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
    for p in (lvm_link(cfg.state_dir), paths.conf_orig, paths.record):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(p)
    return {"host": cfg.host, "installed": False, "binary": binary, "notes": notes}


# --- status ----------------------------------------------------------------------------


def status(cfg: HostConfig, runner: Runner, paths: GuardPaths | None = None,
           *, lvm_report: bool = True) -> dict[str, Any]:
    """What is in place, and whether it is what ``install`` would write now."""
    paths = paths or GuardPaths.for_host(cfg)
    warnings: list[str] = []
    binary = dpkg_path(runner, paths)
    real = binary + DIVERT_SUFFIX
    true, pkg = diversion(runner, binary)
    diverted = true == real
    current = _read(_physical(binary)) or b""
    expected = generate(settings_for(cfg, real)).encode()
    is_wrapper = current.startswith(b"#!/bin/sh\n" + WRAPPER_MARK.encode())
    link = lvm_link(cfg.state_dir)
    conf = _read(paths.lvm_conf)
    block = conf is not None and BLOCK in conf.decode(errors="replace")
    installed = diverted and is_wrapper
    if not installed:
        warnings.append("the guard is not installed: every LVM command here can change the "
                        "shared VG (`fenceless guard install`)")
    else:
        if current != expected:
            warnings.append("the wrapper differs from what this fenceless and config would "
                            "write (run `fenceless guard install` again)")
        if not block:
            warnings.append(f"the guard's block is missing from {paths.lvm_conf}")
        if not os.path.isfile(link):
            warnings.append(f"{link} does not lead to {real}")
        if os.path.exists(INITRAMFS_HOOKS):
            warnings.append("initramfs-tools copies /sbin/lvm into the initramfs: with the "
                            "guard that is the wrapper, without the real binary; make sure "
                            "the initramfs does not need LVM, or add a hook that copies "
                            f"{real} as /sbin/lvm")
    roles = _role_status(cfg)
    if installed:
        for r in roles:
            if r["state"] in ("missing", "expired"):
                warnings.append(f"VG {r['vg']}: role file line {r['state']}: the wrapper "
                                "treats this host as a reader (is `fenceless agent` running?)")
    auto = _autoactivation(cfg, runner) if lvm_report else []
    for a in auto:
        if a.get("autoactivation") is True:
            warnings.append(f"VG {a['vg']} has autoactivation on: it may come up at boot on "
                            f"every host (`vgchange --setautoactivation n {a['vg']}` on the "
                            "writer)")
    return {
        "host": cfg.host, "installed": installed, "binary": binary, "diverted": diverted,
        "diverted_to": true if true != binary else None, "diverted_by": pkg,
        "wrapper": {"present": is_wrapper, "matches": current == expected,
                    "sha256": _sha256(current) if current else None},
        "lvm_link": {"path": str(link), "ok": os.path.isfile(link)},
        "lvm_conf": {"path": paths.lvm_conf, "block": block},
        "role_file": {"path": str(rolemod.role_path(cfg.state_dir)), "vgs": roles},
        "autoactivation": auto, "warnings": warnings,
    }


def _role_status(cfg: HostConfig) -> list[dict[str, Any]]:
    entries = rolemod.read_role_file(cfg.state_dir)
    now = rolemod.boottime_cs()
    out: list[dict[str, Any]] = []
    for vg in cfg.vgs:
        e = (entries or {}).get(vg.name)
        if e is None:
            out.append({"vg": vg.name, "state": "missing", "role": None, "writer": None,
                        "epoch": None, "seconds_left": None})
            continue
        left = (e.valid_until_cs - now) / 100
        out.append({"vg": vg.name, "state": "valid" if left > 0 else "expired",
                    "role": e.role, "writer": e.writer, "epoch": e.epoch,
                    "seconds_left": round(left, 2)})
    return out


def _autoactivation(cfg: HostConfig, runner: Runner) -> list[dict[str, Any]]:
    """Each shared VG's autoactivation flag, read through fenceless's adapter (--readonly)."""
    from fenceless.lvm.adapter import Lvm

    out: list[dict[str, Any]] = []
    for vg in cfg.vgs:
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
