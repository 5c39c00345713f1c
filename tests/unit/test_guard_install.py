"""The guard's install, remove and status on a temp dir, against a fake dpkg-divert.

The lab (tests/integration/test_guard.py) runs the real dpkg-divert in a
host's namespace; here a fake keeps the diversion list in memory and renames
files the way ``dpkg-divert --rename`` does, so every step is fast to check.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path

import pytest

from fenceless.config import HostConfig, VgConfig
from fenceless.errors import UsageError
from fenceless.guard import install, role
from fenceless.guard.binary import GUARDED_BINARY, resolve_lvm_binary
from fenceless.ops.context import Context
from fenceless.runner import Result, Runner, SubprocessRunner

LVM_BYTES = b"\x7fELF the real lvm\n"


@pytest.mark.parametrize("orig", [
    "", "global {\n    umask = 077\n}\n", "no newline at end", "# only a comment\n\n",
])
def test_block_comes_out_exactly(orig):
    with_block = install.add_block(orig)
    assert install.BLOCK in with_block
    assert "metadata_read_only = 1" in with_block
    assert install.add_block(with_block) == with_block, "install twice adds one block"
    stripped = install.strip_block(with_block)
    assert stripped == orig or (stripped == orig + "\n" and not orig.endswith("\n"))


def test_strip_keeps_edits_made_after_install():
    text = install.add_block("a = 1\n") + "b = 2\n"
    assert install.strip_block(text) == "a = 1\nb = 2\n"


def cfg(tmp_path, binary="/usr/sbin/lvm"):
    return HostConfig(path="/c", host="h2", state_dir=str(tmp_path / "state"), io_timeout=1.0,
                      vgs=(VgConfig("sanvg", ("/dev/loop3",)),), lvm_binary=binary,
                      run_dir=str(tmp_path / "run"))


def test_fenceless_runs_the_diverted_binary_when_guarded(tmp_path):
    real = tmp_path / "libexec" / "fenceless" / "lvm"
    c = cfg(tmp_path)
    assert resolve_lvm_binary(c, str(real)) == "/usr/sbin/lvm"
    real.parent.mkdir(parents=True)
    real.write_text("#!/bin/sh\n")
    real.chmod(0o755)
    # Named lvm: LVM takes its command from argv[0] unless that is "lvm".
    assert resolve_lvm_binary(c, str(real)) == str(real)
    assert resolve_lvm_binary(cfg(tmp_path, "/sbin/lvm"), str(real)) == str(real)
    # An admin's own binary is kept.
    assert resolve_lvm_binary(cfg(tmp_path, "/opt/lvm/sbin/lvm"), str(real)) == "/opt/lvm/sbin/lvm"
    # The guard half-removed: the configured path, which is safe either way.
    real.unlink()
    assert resolve_lvm_binary(c, str(real)) == "/usr/sbin/lvm"


def test_the_diverted_binary_is_named_lvm_and_off_path():
    assert os.path.basename(GUARDED_BINARY) == "lvm"
    path = os.environ.get("PATH", "") + ":/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:" \
        "/sbin:/bin"
    assert os.path.dirname(GUARDED_BINARY) not in path.split(":")
    if not os.path.exists(GUARDED_BINARY):
        c = HostConfig(path="/c", host="h1", state_dir="/s", io_timeout=1.0,
                       vgs=(VgConfig("sanvg", ("/dev/loop3",)),))
        assert Context(c, runner=SubprocessRunner()).lvm().argv("lvs", [])[0] == "/usr/sbin/lvm"


def test_settings_embed_the_config(tmp_path):
    s = install.settings_for(cfg(tmp_path))
    assert s.shared_vgs == ("sanvg",)
    assert s.host == "h2"
    assert s.role_file == str(tmp_path / "run" / "guard" / "role")
    assert s.real_binary == GUARDED_BINARY
    assert s.boot_id_file == role.BOOT_ID_PATH


class NoProcess(Runner):
    def run(self, argv, **kw):
        raise AssertionError(f"a process was started: {argv}")


def test_install_refuses_a_non_default_binary(tmp_path):
    with pytest.raises(UsageError, match="lvm_binary"):
        install.install(cfg(tmp_path, "/opt/lvm"), NoProcess())


# --- install and remove against a fake dpkg ----------------------------------------------


class FakeDpkg:
    """dpkg-query -S and dpkg-divert for one binary, diversions in a dict."""

    def __init__(self, known: str) -> None:
        self.known = known
        self.diversions: dict[str, str] = {}
        self.calls: list[list[str]] = []

    def run(self, argv, *, check=True, **kw) -> Result:
        argv = list(argv)
        self.calls.append(argv)
        out, rc = "", 0
        if argv[:2] == ["dpkg-query", "-S"]:
            rc = 0 if argv[2] == self.known else 1
            out = f"lvm2: {argv[2]}\n" if rc == 0 else ""
        elif "--truename" in argv:
            out = self.diversions.get(argv[-1], argv[-1]) + "\n"
        elif "--listpackage" in argv:
            out = "LOCAL\n" if argv[-1] in self.diversions else ""
        else:
            self._divert(argv)
        return Result(tuple(argv), rc, out, "")

    def _divert(self, argv: list[str]) -> None:
        path, to = argv[-1], argv[argv.index("--divert") + 1]
        assert "--local" in argv
        if "--add" in argv:
            assert path not in self.diversions
            self.diversions[path] = to
            src, dst = path, to
        else:
            assert self.diversions.pop(path) == to
            src, dst = to, path
        if "--rename" in argv and os.path.exists(src):
            assert not os.path.exists(dst), "dpkg-divert: rename would overwrite"
            Path(dst).write_bytes(Path(src).read_bytes())
            os.chmod(dst, os.stat(src).st_mode)
            os.unlink(src)
        else:
            assert "--no-rename" in argv


@pytest.fixture
def machine(tmp_path):
    sbin = tmp_path / "sbin"
    sbin.mkdir()
    (sbin / "lvm").write_bytes(LVM_BYTES)
    (sbin / "lvm").chmod(0o755)
    (tmp_path / "libexec").mkdir()
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "lvm.conf").write_text("global {\n    umask = 077\n}\n")
    paths = install.GuardPaths(candidates=(str(sbin / "lvm"),),
                               lvm_conf=str(tmp_path / "etc" / "lvm.conf"),
                               state_dir=str(tmp_path / "state"), run_dir=str(tmp_path / "run"),
                               real_binary=str(tmp_path / "libexec" / "fenceless" / "lvm"))
    return paths, FakeDpkg(str(sbin / "lvm"))


def snapshot(paths: install.GuardPaths, dpkg: FakeDpkg) -> dict[str, object]:
    root = Path(paths.lvm_conf).parents[1]
    files = {}
    for p in sorted(root.rglob("*")):
        if "state" in p.relative_to(root).parts[:1]:
            continue
        st = p.lstat()
        data = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None
        files[str(p.relative_to(root))] = (stat.S_IMODE(st.st_mode), data)
    return {"files": files, "diversions": dict(dpkg.diversions)}


def test_install_diverts_off_path_and_remove_restores_exactly(tmp_path, machine):
    paths, dpkg = machine
    before = snapshot(paths, dpkg)
    res = install.install(cfg(tmp_path), dpkg, paths)
    assert res["diverted_to"] == paths.real_binary and res["moved_from"] is None
    assert dpkg.diversions == {paths.candidates[0]: paths.real_binary}
    assert Path(paths.real_binary).read_bytes() == LVM_BYTES
    assert stat.S_IMODE(os.stat(paths.real_dir).st_mode) == 0o700
    wrapper = Path(paths.candidates[0]).read_bytes()
    assert wrapper.startswith(b"#!/bin/sh\n# fenceless LVM guard")
    assert f"FL_LVM={paths.real_binary}\n".encode() in wrapper
    assert not (Path(paths.state_dir) / "guard" / "lvm").exists()
    st = install.status(cfg(tmp_path), dpkg, paths, lvm_report=False)
    assert st["installed"] and st["diverted"] and st["wrapper"]["matches"]
    assert st["state"] == "ok"
    assert st["real_binary"] == {"path": paths.real_binary, "ok": True}
    assert install.install(cfg(tmp_path), dpkg, paths)["already"]
    install.remove(cfg(tmp_path), dpkg, paths)
    assert snapshot(paths, dpkg) == before


def old_install(tmp_path, paths: install.GuardPaths, dpkg: FakeDpkg) -> None:
    """What an earlier fenceless left: lvm.distrib next to the wrapper, a link to it."""
    binary = paths.candidates[0]
    dpkg.run(["dpkg-divert", "--local", "--add", "--rename", "--divert", binary + ".distrib",
              binary])
    Path(binary).write_text("#!/bin/sh\n# fenceless LVM guard for host h2 (older)\n")
    link = Path(paths.state_dir) / "guard" / "lvm"
    link.parent.mkdir(parents=True)
    os.symlink(binary + ".distrib", link)
    conf = Path(paths.lvm_conf)
    orig = conf.read_bytes()
    (Path(paths.state_dir) / "guard" / "lvm.conf.orig").write_bytes(orig)
    conf.write_text(install.add_block(orig.decode()))
    (Path(paths.state_dir) / "guard" / "install.json").write_text(json.dumps({
        "binary": binary, "diverted_to": binary + ".distrib", "format": 1,
        "lvm_conf": paths.lvm_conf, "lvm_conf_existed": True, "lvm_conf_sha256": "x"}))


def test_install_moves_an_old_diversion_and_remove_restores_exactly(tmp_path, machine):
    paths, dpkg = machine
    before = snapshot(paths, dpkg)
    old_install(tmp_path, paths, dpkg)
    binary = paths.candidates[0]
    st = install.status(cfg(tmp_path), dpkg, paths, lvm_report=False)
    assert st["installed"] and any("earlier fenceless" in w for w in st["warnings"])
    assert st["state"] == "broken"
    res = install.install(cfg(tmp_path), dpkg, paths)
    assert res["moved_from"] == binary + ".distrib"
    assert dpkg.diversions == {binary: paths.real_binary}
    assert not os.path.exists(binary + ".distrib")
    assert not os.path.lexists(Path(paths.state_dir) / "guard" / "lvm")
    assert Path(paths.real_binary).read_bytes() == LVM_BYTES
    assert stat.S_IMODE(os.stat(paths.real_binary).st_mode) == 0o755
    # The wrapper stayed at the binary's path: the diversion moved without renames there.
    moves = [c for c in dpkg.calls if "--add" in c or "--remove" in c][1:]
    assert all("--no-rename" in c for c in moves)
    st = install.status(cfg(tmp_path), dpkg, paths, lvm_report=False)
    assert st["installed"] and st["wrapper"]["matches"]
    assert not [w for w in st["warnings"] if "initramfs" not in w and "role file" not in w]
    install.remove(cfg(tmp_path), dpkg, paths)
    assert snapshot(paths, dpkg) == before
    assert install.status(cfg(tmp_path), dpkg, paths, lvm_report=False)["state"] == "missing"


def test_remove_of_an_old_install_restores_exactly(tmp_path, machine):
    paths, dpkg = machine
    before = snapshot(paths, dpkg)
    old_install(tmp_path, paths, dpkg)
    install.remove(cfg(tmp_path), dpkg, paths)
    assert snapshot(paths, dpkg) == before
    assert not (Path(paths.state_dir) / "guard" / "lvm").exists()


def test_a_libexec_dir_that_was_there_keeps_its_mode(tmp_path, machine):
    paths, dpkg = machine
    os.mkdir(paths.real_dir, 0o755)
    before = snapshot(paths, dpkg)
    install.install(cfg(tmp_path), dpkg, paths)
    assert stat.S_IMODE(os.stat(paths.real_dir).st_mode) == 0o700
    install.remove(cfg(tmp_path), dpkg, paths)
    assert snapshot(paths, dpkg) == before


def test_someone_elses_diversion_is_left_alone(tmp_path, machine):
    paths, dpkg = machine
    dpkg.diversions[paths.candidates[0]] = "/usr/sbin/lvm.other"
    with pytest.raises(install.ForeignDiversion, match="not by the guard"):
        install.install(cfg(tmp_path), dpkg, paths)
    with pytest.raises(install.ForeignDiversion):
        install.remove(cfg(tmp_path), dpkg, paths)
    assert not os.path.exists(paths.real_dir)


def test_role_status_sees_another_boots_file(tmp_path, machine):
    paths, dpkg = machine
    role.write_role_file(paths.run_dir, [role.entry("sanvg", "writer", "h2", 3, 60.0)],
                         boot_id="00000000-0000-4000-8000-000000000000")
    install.install(cfg(tmp_path), dpkg, paths)
    st = install.status(cfg(tmp_path), dpkg, paths, lvm_report=False)
    assert st["role_file"]["path"] == str(tmp_path / "run" / "guard" / "role")
    assert st["role_file"]["vgs"][0]["state"] == "of an earlier boot"
    assert any("of an earlier boot" in w for w in st["warnings"])
    # A role file not (yet) valid, as while an agent starts: the guard itself is sound, and
    # `fenceless check` must not call it broken (it did, from the warning's words).
    assert st["state"] == "ok"
    role.write_role_file(paths.run_dir, [role.entry("sanvg", "writer", "h2", 3, 60.0)])
    st = install.status(cfg(tmp_path), dpkg, paths, lvm_report=False)
    assert st["role_file"]["vgs"][0]["state"] == "valid"
