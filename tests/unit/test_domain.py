"""VM definitions: libvirt XML and xl configs read into name, size and disks on the VG."""

from __future__ import annotations

import pytest

from fenceless.hv.domain import (
    MAX_XML,
    BadDefinition,
    BadVmName,
    Disk,
    parse_domain_xml,
    parse_xl,
    volume_of,
)

WEB = """<domain type='qemu'>
  <name>web01</name>
  <memory unit='MiB'>256</memory>
  <vcpu>2</vcpu>
  <devices>
    <disk type='block' device='disk'>
      <source dev='/dev/sanvg/vm-web01'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <disk type='block' device='disk'>
      <source dev='/dev/mapper/sanvg-debian--12--iso'/>
      <target dev='vdb' bus='virtio'/>
      <readonly/>
    </disk>
    <disk type='file' device='cdrom'>
      <target dev='hdc' bus='ide'/>
    </disk>
  </devices>
</domain>
"""


def test_a_domain_xml_gives_name_size_and_disks_with_their_modes():
    spec = parse_domain_xml(WEB, "sanvg")
    assert (spec.name, spec.memory_mib, spec.vcpus) == ("web01", 256, 2)
    assert spec.disks == (Disk("vda", "vm-web01", "rw"), Disk("vdb", "debian-12-iso", "ro"))
    assert spec.xml == WEB


def test_memory_defaults_to_kib_as_libvirt_reads_it():
    xml = WEB.replace("<memory unit='MiB'>256</memory>", "<memory>524288</memory>")
    assert parse_domain_xml(xml, "sanvg").memory_mib == 512


@pytest.mark.parametrize("path,vg,volume", [
    ("/dev/sanvg/a", "sanvg", "a"),
    ("/dev/mapper/san--vg-my--disk", "san-vg", "my-disk"),
    ("/dev/othervg/a", "sanvg", None),
    ("/dev/sanvg/a/b", "sanvg", None),
    ("/dev/mapper/sanvg-a-b", "sanvg", None),  # a single dash: another layer, not an LV
    ("/var/lib/libvirt/images/a.img", "sanvg", None),
])
def test_volume_of_a_device_path(path, vg, volume):
    assert volume_of(path, vg) == volume


@pytest.mark.parametrize("change,match", [
    (("<name>web01</name>", "<name>web 01</name>"), None),
    (("/dev/sanvg/vm-web01", "/var/lib/libvirt/images/web01.img"), "not a volume of VG"),
    (("type='block' device='disk'>\n      <source dev='/dev/sanvg/vm",
      "type='file' device='disk'>\n      <source dev='/dev/sanvg/vm"), "of type 'file'"),
    (("/dev/mapper/sanvg-debian--12--iso", "/dev/sanvg/vm-web01"), "attached twice"),
    (("<target dev='vdb'", "<target dev='vda'"), "two disks use target vda"),
    (("<vcpu>2</vcpu>", "<vcpu>lots</vcpu>"), "not a count"),
    (("<memory unit='MiB'>256", "<memory unit='parsecs'>256"), "not a size"),
    (("</domain>", ""), "malformed XML"),
    (("<domain type='qemu'>", "<!DOCTYPE d [<!ENTITY a 'aaaa'>]>\n<domain type='qemu'>"),
     "DOCTYPE"),
    (("/dev/sanvg/vm-web01", "/dev/sanvg/bad_tmeta"), "reserves"),
])
def test_a_bad_definition_is_refused_with_what_is_wrong(change, match):
    xml = WEB.replace(*change)
    assert xml != WEB
    error = BadVmName if match is None else BadDefinition
    with pytest.raises(error, match=match or "not a VM name") as info:
        parse_domain_xml(xml, "sanvg", source="web01.xml")
    assert "nothing was changed" in str(info.value)


def test_an_entity_bomb_never_reaches_the_parser():
    bomb = ('<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol">'
            + "".join(f'<!ENTITY lol{i} "{"&lol;" * 10}">' for i in range(1, 9))
            + ']><domain><name>&lol8;</name></domain>')
    with pytest.raises(BadDefinition, match="DOCTYPE"):
        parse_domain_xml(bomb, "sanvg")


def test_a_definition_over_64_kib_is_refused():
    xml = WEB.replace("</domain>", "<!--" + "x" * MAX_XML + "--></domain>")
    with pytest.raises(BadDefinition, match="larger than 64 KiB"):
        parse_domain_xml(xml, "sanvg")


XL = """# web server, moved from the old ext4 config LV
name = "web01"
memory = 1024
vcpus = 2
disk = [ 'phy:/dev/sanvg/web01-disk,xvda,w',
         'phy:/dev/sanvg/debian-iso,xvdc:cdrom,r',  # the installer
         'format=raw, vdev=xvdb, access=rw, target=/dev/sanvg/web01-data' ]
on_crash = 'restart'
"""


def test_an_xl_config_becomes_a_spec_and_libvirt_xml_that_reads_back_the_same():
    spec = parse_xl(XL, "sanvg")
    assert (spec.name, spec.memory_mib, spec.vcpus) == ("web01", 1024, 2)
    assert spec.disks == (Disk("xvda", "web01-disk", "rw"), Disk("xvdc", "debian-iso", "ro"),
                          Disk("xvdb", "web01-data", "rw"))
    again = parse_domain_xml(spec.xml, "sanvg")
    assert (again.name, again.memory_mib, again.vcpus, again.disks) == \
        (spec.name, spec.memory_mib, spec.vcpus, spec.disks)
    assert "<domain type=\"xen\">" in spec.xml


@pytest.mark.parametrize("text,match", [
    ('memory = 1024\n', "no name"),
    ('name = "web01\n', "unexpected"),
    ('name = "web01"\ndisk = [ "phy:/dev/sanvg/a,xvda,w"\n', "not closed"),
    ('name = "web01"\ndisk = [ phy:/dev/sanvg/a ]\n', "unexpected ':'"),
    ('name = "web01"\ndisk = [ 3 ]\n', "must be quoted strings"),
    ('name = "web01"\ndisk = [ "phy:/dev/other/a,xvda,w" ]\n', "not a volume of VG"),
    ('name = "web01"\ndisk = [ "phy:/dev/sanvg/a,xvda,maybe" ]\n', "access 'maybe'"),
    ('name = "web01"\nmemory = "lots"\n', "whole number of MiB"),
    ('name = "web01" memory = 3\n', "unexpected"),
    ('name = "../etc"\n', "not a VM name"),
    ('= 3\n', "KEY = VALUE"),
])
def test_a_bad_xl_config_is_refused(text, match):
    with pytest.raises((BadDefinition, BadVmName), match=match):
        parse_xl(text, "sanvg")


@pytest.mark.parametrize("extra,match", [
    ("<hostdev mode='capabilities' type='storage'><source><block>/dev/sanvg/vm-db01</block>"
     "</source></hostdev>", "<hostdev> is not allowed"),
    ("<controller type='usb'/><qemu:commandline xmlns:qemu="
     "'http://libvirt.org/schemas/domain/qemu/1.0'><qemu:arg value='-drive'/>"
     "</qemu:commandline>", "<commandline> is not allowed"),
    ("<filesystem type='mount'><source dir='/dev/sanvg/vm-db01'/><target dir='x'/>"
     "</filesystem>", "may only be a <disk>'s source"),
])
def test_a_volume_may_come_in_only_as_a_disk(extra, match):
    """Another VM's read-write volume must not sneak in past the grant and the claims."""
    xml = WEB.replace("  </devices>", f"    {extra}\n  </devices>")
    with pytest.raises(BadDefinition, match=match):
        parse_domain_xml(xml, "sanvg")


def test_a_live_migration_sends_each_disk_at_the_targets_path():
    from fenceless.hv.domain import with_target_paths

    live = WEB.replace("/dev/sanvg/vm-web01", "/dev/loop7")  # as the source mapped it
    out = with_target_paths(live, {"vda": "/dev/loop9", "vdb": "/dev/loop10"})
    assert "/dev/loop9" in out and "/dev/loop10" in out and "/dev/loop7" not in out
    with pytest.raises(BadDefinition, match="no disk vdz"):
        with_target_paths(live, {"vdz": "/dev/loop9"})
