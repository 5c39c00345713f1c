"""``fenceless adopt`` on a VG that an admin made by hand, with VM disks that hold data
and VM configs on an ext4 LV with per-host links (issue 9, "Adopt")."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from tests.integration.test_cluster import all_live, wait_until

pytestmark = [pytest.mark.lab]
MiB = 1 << 20

WEB_XL = """# web01, as the old setup had it
name = "web01"
memory = 256
vcpus = 2
disk = [ 'phy:/dev/sanvg/web01-disk,xvda,w', 'phy:/dev/sanvg/iso,xvdb:cdrom,r' ]
"""
DB_XML = """<domain type='kvm'>
  <name>db01</name>
  <memory unit='MiB'>512</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64'>hvm</type></os>
  <devices>
    <disk type='block' device='disk'><source dev='/dev/sanvg/db01-disk'/>
      <target dev='vda' bus='virtio'/></disk>
    <disk type='block' device='disk'><source dev='/dev/sanvg/iso'/>
      <target dev='vdb' bus='virtio'/><readonly/></disk>
  </devices>
</domain>
"""


def lvm(lab, *argv: str) -> str:
    return lab.exec("h1", *argv).stdout


def extents(lab) -> dict[str, tuple[int, int]]:
    """LV -> (byte offset in the LUN, length), for the single-segment LVs made here."""
    pe_start = int(lvm(lab, "pvs", "--noheadings", "--units", "b", "--nosuffix",
                       "-o", "pe_start").split()[0])
    rows = json.loads(lvm(lab, "lvs", "--segments", "--reportformat", "json", "-o",
                          "lv_name,seg_pe_ranges,seg_size_pe", "sanvg"))["report"][0]["seg"]
    out = {}
    for r in rows:
        first = int(r["seg_pe_ranges"].split(":")[1].split("-")[0])
        out[r["lv_name"]] = (pe_start + first * 4 * MiB, int(r["seg_size_pe"]) * 4 * MiB)
    return out


def digests(image: str, where: dict[str, tuple[int, int]]) -> dict[str, str]:
    with open(image, "rb") as f:
        out = {}
        for name, (offset, length) in where.items():
            f.seek(offset)
            out[name] = hashlib.sha256(f.read(length)).hexdigest()
        return out


def fill(image: str, where: tuple[int, int]) -> None:
    """Data of a VM's disk: random bytes, written into the LUN image."""
    with open(image, "r+b") as f:
        f.seek(where[0])
        f.write(os.urandom(where[1]))
        os.fsync(f.fileno())


def adopt(lab, *args: str) -> str:
    """`fenceless adopt` as h1 runs it, in h1's namespace (where the config LV is mounted)."""
    from tests.conftest import CLI

    return str(lab.exec("h1", *CLI, "-c", lab.config("h1"), "adopt", *args).stdout)


def admin_vg(lab, *lvs: tuple[str, str]) -> str:
    """A VG made by hand on h1's view of the LUN, the way the setup fenceless replaces is
    made: a PV on the whole LUN and plain LVs. Its device."""
    dev = lab.device("h1")
    lvm(lab, "pvcreate", "-q", dev)
    lvm(lab, "vgcreate", "-q", "sanvg", dev)
    for name, size in lvs:
        lvm(lab, "lvcreate", "-q", "-an", "-Zn", "-L", size, "-n", name, "sanvg")
    return dev


def test_init_adopt_writes_nothing_when_the_pv_reaches_into_the_anchors_place(make_lab):
    """A whole-LUN PV whose last extent covers the LUN's last MiB (a LUN one MiB over a
    multiple of the extent size), and an LV with data there: adopting is refused before
    anything is written, the init lock included (the old code wrote it there first)."""
    lab = make_lab(1, "--agents", "--size", "1025M")
    dev = admin_vg(lab)
    count = int(lvm(lab, "pvs", "--noheadings", "-o", "pv_pe_count").split()[0])
    lvm(lab, "lvcreate", "-q", "-an", "-Zn", "-l", "1", "-n", "last", "sanvg",
        f"{dev}:{count - 1}")
    image = lab.images[0]
    where = extents(lab)
    assert where["last"][0] + where["last"][1] == os.path.getsize(image)  # up to the end
    fill(image, where["last"])
    with open(image, "r+b") as f:  # the end of a disk no file has reached yet: zeros,
        f.seek(os.path.getsize(image) - MiB)  # which no foreign-data check can tell
        f.write(bytes(MiB))  # from an unused lease area
    before = digests(image, where)
    res = lab.on("h1", "init", "--adopt", check=False)
    assert res.returncode == 2, res
    assert "reaches into the last MiB" in res.stderr and "pvresize" in res.stderr
    assert digests(image, where) == before
    res = lab.on("h1", "adopt", check=False)
    assert res.returncode == 2 and "reaches into the last MiB" in res.stderr
    assert digests(image, where) == before


@pytest.fixture
def config_lv(tmp_path):
    """The config LV of the replaced setup: an ext4 made on its extent (a loop device
    over the LUN image) from a directory, then mounted read-only *inside h1's lab
    namespace*, as on a host that is not the writer. (A mount in this process's namespace
    would be copied into the namespaces of labs other tests bring up meanwhile, and keep
    the loop device busy there after it is unmounted here.)"""
    made: list[tuple[object, str, str]] = []

    def mount(lab, image: str, where: tuple[int, int], source: Path) -> str:
        loop = subprocess.run(["losetup", "--find", "--show", "--offset", str(where[0]),
                               "--sizelimit", str(where[1]), image],
                              capture_output=True, text=True, check=True).stdout.strip()
        point = str(tmp_path / "vmconfigs")
        os.mkdir(point)
        made.append((lab, loop, point))
        subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(source), loop], check=True)
        lab.exec("h1", "mount", "-o", "ro,noload", loop, point)
        return point

    yield mount
    for lab, loop, point in made:
        lab.exec("h1", "umount", point, check=False)  # type: ignore[attr-defined]
        for _ in range(100):  # marked for removal while still open: wait until gone
            subprocess.run(["losetup", "-d", loop], capture_output=True, check=False)
            listed = subprocess.run(["losetup", "-a"], capture_output=True, text=True,
                                    check=True).stdout
            if not any(line.startswith(loop + ":") for line in listed.splitlines()):
                break
            time.sleep(0.1)
        else:
            raise AssertionError(f"{loop} (the config LV's mount) does not detach")


def test_adopt_stores_the_configs_and_placements_and_changes_no_existing_byte(
        make_lab, config_lv, tmp_path_factory):
    lab = make_lab(2, "--agents")
    admin_vg(lab, ("web01-disk", "8M"), ("db01-disk", "8M"), ("iso", "8M"), ("spare", "4M"),
             ("vmconfigs", "16M"))
    image = lab.images[0]
    where = extents(lab)
    for lv in ("web01-disk", "db01-disk", "iso", "spare"):
        fill(image, where[lv])

    # The configs, on the ext4 LV, with per-host links: web01 runs on h1, db01 on h2.
    src = tmp_path_factory.mktemp("configs")
    (src / "web01.cfg").write_text(WEB_XL)
    (src / "db01.xml").write_text(DB_XML)
    (src / "README").write_text("do not edit on a read-only host\n")
    for host, conf in (("h1", "web01.cfg"), ("h2", "db01.xml")):
        (src / host).mkdir()
        (src / host / conf).symlink_to(f"../{conf}")
    configs = config_lv(lab, image, where["vmconfigs"], src)
    before = digests(image, where)

    # A dry run reads and checks everything and changes nothing at all.
    with open(image, "rb") as f:
        whole = hashlib.sha256(f.read()).hexdigest()
    plan = json.loads(adopt(lab, "--configs", configs, "--dry-run", "--json"))["plan"]
    assert [(v["name"], v["host"], v["source"]) for v in plan["vms"]] == [
        ("db01", "h2", "xml"), ("web01", "h1", "xl")]
    assert plan["unaccounted"] == ["spare", "vmconfigs"]
    assert plan["skipped"] == ["README", "lost+found/"]
    used = {v["name"]: v["used_by"] for v in plan["volumes"]}
    assert used["iso"] == ["db01:ro", "web01:ro"] and used["web01-disk"] == ["web01:rw"]
    with open(image, "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == whole

    out = json.loads(adopt(lab, "--configs", configs, "--json"))
    assert any("added control LV fenceless-ctl" in d for d in out["done"]), out
    assert "recorded web01 as running on h1" in out["done"]
    assert "recorded db01 as running on h2" in out["done"]
    lab.on("h2", "join")
    wait_until(lambda: all_live(lab, "h2", ["h1", "h2"]), 20, "both hosts live")
    vms = {v["name"]: v for v in json.loads(lab.on("h2", "vm", "list", "--json").stdout)}
    assert (vms["web01"]["host"], vms["web01"]["state"]) == ("h1", "running")
    assert (vms["db01"]["host"], vms["db01"]["state"]) == ("h2", "running")
    assert json.loads(lab.on("h2", "vm", "show", "db01", "--json").stdout)["xml"] == DB_XML
    res = lab.on("h1", "vm", "start", "web01", "--on", "h2", check=False)  # runs on h1
    assert res.returncode == 2 and "active read-write on h1" in res.stderr, res.stderr

    # Every existing LV is where it was, with the same bytes and the same permissions;
    # the only new LV is the control LV.
    after = extents(lab)
    assert {k: v for k, v in after.items() if k != "fenceless-ctl"} == where
    assert digests(image, where) == before
    attrs = dict(line.split() for line in lvm(lab, "lvs", "--noheadings", "-o",
                                              "lv_name,lv_attr", "sanvg").splitlines())
    assert set(attrs) == {*where, "fenceless-ctl"}
    assert all(attrs[lv].startswith("-wi") for lv in where)

    # Run again: everything is done already, nothing changes.
    again = json.loads(adopt(lab, "--configs", configs, "--json"))
    assert again["done"] == ["VG sanvg is a fenceless cluster already: going on with the VMs"]
    assert digests(image, where) == before
