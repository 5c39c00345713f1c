"""VM definitions on the LUN, in a lab with real agents and real LVM: defined from any
host, read by every host with no LVM call, refused when they would break a volume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.integration.test_volumes import vgck, volume_lab
from tests.unit.test_domain import WEB

pytestmark = pytest.mark.lab

XL = """name = "db01"
memory = 512
vcpus = 1
disk = [ 'phy:/dev/sanvg/vm-db01,xvda,w', 'phy:/dev/sanvg/debian-12-iso,xvdc:cdrom,r' ]
"""


def vms(lab, host, **kw):
    return {v["name"]: v for v in json.loads(lab.on(host, "vm", "list", "--json", **kw).stdout)}


def refused(lab, host, *args):
    res = lab.on(host, *args, check=False)
    assert res.returncode == 2, (res.returncode, res.stdout, res.stderr)
    return res.stderr


@pytest.fixture
def vmlab(make_lab, tmp_path):
    lab = volume_lab(make_lab)
    for name, size in (("vm-web01", "16M"), ("vm-db01", "16M"), ("debian-12-iso", "8M")):
        lab.on("h2", "volume", "create", name, size)
    web = tmp_path / "web01.xml"
    web.write_text(WEB)
    return lab, web


def test_a_definition_made_on_one_host_is_read_by_every_host_without_lvm(vmlab, tmp_path):
    lab, web = vmlab
    res = json.loads(lab.on("h3", "vm", "define", "web01", "--xml", str(web), "--json").stdout)
    assert res["version"] == 1 and res["epoch"] == 1
    no_lvm = {"PATH": "/nonexistent"}
    for host in lab.hosts:
        got = vms(lab, host, env=no_lvm)["web01"]
        assert (got["host"], got["state"], got["memory_mib"], got["vcpus"]) == \
            (None, "stopped", 256, 2)
        assert [(d["volume"], d["mode"]) for d in got["disks"]] == \
            [("vm-web01", "rw"), ("debian-12-iso", "ro")]
        show = json.loads(lab.on(host, "vm", "show", "web01", "--json", env=no_lvm).stdout)
        assert show["xml"] == WEB

    # An edit from a third host: a new version; the earlier one stays readable.
    edited = tmp_path / "web01-4cpu.xml"
    edited.write_text(WEB.replace("<vcpu>2</vcpu>", "<vcpu>4</vcpu>"))
    lab.on("h1", "vm", "edit", "web01", "--xml", str(edited))
    assert vms(lab, "h2")["web01"]["vcpus"] == 4
    old = json.loads(lab.on("h3", "vm", "show", "web01", "--version", "1", "--json").stdout)
    assert old["xml"] == WEB and old["versions"] == [1, 2]

    # An xl config, imported on the writer.
    xl = tmp_path / "db01.cfg"
    xl.write_text(XL)
    lab.on("h1", "vm", "import", "--xl", str(xl))
    db = vms(lab, "h3")["db01"]
    assert [(d["volume"], d["mode"]) for d in db["disks"]] == \
        [("vm-db01", "rw"), ("debian-12-iso", "ro")]
    assert db["memory_mib"] == 512

    # Every change is in the audit log, with who asked from where.
    log = json.loads(lab.on("h2", "log", "--json").stdout)
    mine = [(e["host"], e["result"], e["command"][:3]) for e in log
            if e["command"][:2] == ["fenceless", "vm"]]
    assert mine == [("h3", "ok", ["fenceless", "vm", "define"]),
                    ("h1", "ok", ["fenceless", "vm", "edit"]),
                    ("h1", "ok", ["fenceless", "vm", "import"])]


def test_refusals_name_what_is_wrong_and_change_nothing(vmlab, tmp_path):
    lab, web = vmlab
    lab.on("h2", "vm", "define", "web01", "--xml", str(web))
    before = vms(lab, "h1")

    assert "defined already" in refused(lab, "h3", "vm", "define", "web01", "--xml", str(web))
    missing = tmp_path / "missing.xml"
    missing.write_text(WEB.replace("web01</name>", "web02</name>").replace(
        "/dev/sanvg/vm-web01", "/dev/sanvg/vm-web02"))
    assert "volume vm-web02, which VG sanvg does not have" in refused(
        lab, "h3", "vm", "define", "web02", "--xml", str(missing))
    broken = tmp_path / "broken.xml"
    broken.write_text(WEB[:-20])
    assert "malformed XML" in refused(lab, "h3", "vm", "define", "web01", "--xml", str(broken))
    taken = tmp_path / "taken.xml"
    taken.write_text(WEB.replace("web01</name>", "web03</name>"))
    assert "read-write disk of VM web01" in refused(
        lab, "h1", "vm", "define", "web03", "--xml", str(taken))

    # The volumes of a defined VM stay: no remove, no rename, from any host.
    for host in ("h1", "h3"):
        assert "disk of VM web01" in refused(lab, host, "volume", "remove", "vm-web01")
        assert "disk of VM web01" in refused(lab, host, "volume", "rename", "debian-12-iso",
                                             "iso")
    assert vms(lab, "h1") == before
    names = {v["name"] for v in json.loads(lab.on("h3", "volume", "list", "--json").stdout)}
    assert {"vm-web01", "debian-12-iso"} <= names

    # Undefined, the VM is gone and its volumes may go.
    lab.on("h3", "vm", "undefine", "web01")
    assert vms(lab, "h2") == {}
    assert "was undefined" in refused(lab, "h1", "vm", "show", "web01")
    lab.on("h3", "volume", "remove", "vm-web01")
    vgck(lab, "h1")


def test_a_definition_survives_a_change_of_writer(vmlab):
    lab, web = vmlab
    lab.on("h3", "vm", "define", "web01", "--xml", str(web))
    lab.on("h1", "writer", "handover", "h2")
    assert vms(lab, "h3")["web01"]["version"] == 1
    assert json.loads(lab.on("h2", "vm", "show", "web01", "--json").stdout)["xml"] == WEB
    Path(web).write_text(WEB.replace("<vcpu>2</vcpu>", "<vcpu>3</vcpu>"))
    res = json.loads(lab.on("h1", "vm", "edit", "web01", "--xml", str(web), "--json").stdout)
    assert res["version"] == 2 and res["epoch"] == 2
