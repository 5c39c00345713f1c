"""The adopt plan from a config directory's contents (ops/adopt.py): pure, no LVM."""

from __future__ import annotations

import pytest

from fenceless.ops import adopt

WEB = """name = "web01"
memory = 256
disk = [ 'phy:/dev/sanvg/web01-disk,xvda,w', 'phy:/dev/sanvg/iso,xvdb:cdrom,r' ]
"""
DB = WEB.replace("web01", "db01")
LVS = {"web01-disk": 8 << 20, "db01-disk": 8 << 20, "iso": 4 << 20, "spare": 4 << 20}


def found(files, links=None):
    return adopt.ConfigDir("/srv/vmconfigs", files, links or {})


def test_configs_and_links_make_the_plan():
    plan = adopt.plan("sanvg", LVS, found(
        {"web01.cfg": WEB, "db01.cfg": DB},
        {"h1": [("/srv/vmconfigs/h1/web01.cfg", "web01.cfg")]}))
    assert [(v.name, v.host) for v in plan.vms] == [("db01", None), ("web01", "h1")]
    out = plan.to_json()
    assert out["unaccounted"] == ["spare"]
    assert {v["name"]: v["used_by"] for v in out["volumes"]}["iso"] == ["db01:ro", "web01:ro"]
    assert "<name>web01</name>" in plan.vms[1].xml  # an xl config is stored as libvirt XML


@pytest.mark.parametrize("files, links, error, match", [
    ({"web01.cfg": WEB, "w2.cfg": WEB}, {}, adopt.SameNameTwice, "w2.cfg and web01.cfg"),
    ({"web01.cfg": WEB.replace("iso", "gone")}, {}, adopt.NoSuchVolume, "volume gone"),
    ({"web01.cfg": WEB, "db01.cfg": DB.replace("db01-disk", "web01-disk")}, {},
     adopt.DiskOfTwoVms, "read-write in"),
    ({"web01.cfg": WEB}, {"h1": [("l1", "web01.cfg")], "h2": [("l2", "web01.cfg")]},
     adopt.RunsOnTwoHosts, "h1, h2"),
    ({"web01.cfg": WEB}, {"h1": [("l1", "db01.cfg")]}, adopt.LinkOutside, "db01.cfg"),
    ({"web01.cfg": "name = web01 ("}, {}, adopt.BadConfig, "web01.cfg"),
])
def test_a_plan_that_cannot_be_carried_out_is_refused_before_anything(files, links, error,
                                                                     match):
    with pytest.raises(error, match=match):
        adopt.plan("sanvg", LVS, found(files, links))


def test_the_directory_is_read_without_following_links_out_of_it(tmp_path):
    (tmp_path / "web01.cfg").write_text(WEB)
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "h1").mkdir()
    (tmp_path / "h1" / "web01.cfg").symlink_to("../web01.cfg")
    got = adopt.read_config_dir(str(tmp_path))
    assert got.files == {"web01.cfg": WEB} and got.skipped == ["notes.txt"]
    assert got.links == {"h1": [(str(tmp_path / "h1" / "web01.cfg"), "web01.cfg")]}
    (tmp_path / "h1" / "evil.cfg").symlink_to("/etc/passwd")
    with pytest.raises(adopt.LinkOutside, match="/etc/passwd"):
        adopt.read_config_dir(str(tmp_path))
    with pytest.raises(adopt.ConfigDirUnreadable):
        adopt.read_config_dir(str(tmp_path / "nope"))


def test_a_loop_of_links_is_refused_clearly(tmp_path):
    (tmp_path / "web01.cfg").write_text(WEB)
    (tmp_path / "h1").mkdir()
    (tmp_path / "h1" / "a.cfg").symlink_to("b.cfg")
    (tmp_path / "h1" / "b.cfg").symlink_to("a.cfg")
    with pytest.raises(adopt.LinkOutside):
        adopt.read_config_dir(str(tmp_path))
