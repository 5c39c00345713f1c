"""The guard's pure parts: the lvm.conf block, and the binary fenceless itself runs."""

from __future__ import annotations

import os

import pytest

from fenceless.config import HostConfig, VgConfig
from fenceless.guard import install
from fenceless.guard.binary import lvm_link, resolve_lvm_binary
from fenceless.ops.context import Context
from fenceless.runner import Runner, SubprocessRunner


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
    return HostConfig(path="/c", host="h2", state_dir=str(tmp_path), io_timeout=1.0,
                      vgs=(VgConfig("sanvg", ("/dev/loop3",)),), lvm_binary=binary)


def test_fenceless_runs_the_real_binary_through_the_link_when_guarded(tmp_path):
    real = tmp_path / "lvm.distrib"
    real.write_text("#!/bin/sh\n")
    real.chmod(0o755)
    c = cfg(tmp_path)
    assert resolve_lvm_binary(c) == "/usr/sbin/lvm"
    link = lvm_link(c.state_dir)
    link.parent.mkdir(parents=True)
    os.symlink(real, link)
    # Named lvm: LVM takes its command from argv[0] unless that is "lvm".
    assert os.path.basename(resolve_lvm_binary(c)) == "lvm"
    assert resolve_lvm_binary(c) == str(link)
    assert Context(c, runner=SubprocessRunner()).lvm().argv("lvs", [])[0] == str(link)
    assert resolve_lvm_binary(cfg(tmp_path, "/sbin/lvm")) == str(link)
    # An admin's own binary is kept.
    assert resolve_lvm_binary(cfg(tmp_path, "/opt/lvm/sbin/lvm")) == "/opt/lvm/sbin/lvm"
    # A dangling link (the guard half-removed) falls back to the wrapper, which is safe.
    real.unlink()
    assert resolve_lvm_binary(c) == "/usr/sbin/lvm"


def test_settings_embed_the_config(tmp_path):
    s = install.settings_for(cfg(tmp_path), "/sbin/lvm.distrib")
    assert s.shared_vgs == ("sanvg",)
    assert s.host == "h2"
    assert s.role_file == str(tmp_path / "guard" / "role")
    assert s.lvm_link == str(tmp_path / "guard" / "lvm")


def test_install_refuses_a_non_default_binary(tmp_path):
    from fenceless.errors import UsageError

    class NoProcess(Runner):
        def run(self, argv, **kw):
            raise AssertionError(f"a process was started: {argv}")

    with pytest.raises(UsageError, match="lvm_binary"):
        install.install(cfg(tmp_path, "/opt/lvm"), NoProcess())
