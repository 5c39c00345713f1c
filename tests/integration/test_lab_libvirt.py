"""The lab's VM ground: one real libvirtd per lab host, and the tiny counter guest booting
under TCG from a volume mapped on that host (issue 9, the lab part)."""

from __future__ import annotations

import json
import os
import time

import pytest

from fenceless.blockio import open_device
from fenceless.lab import guest
from fenceless.runner import SubprocessRunner
from tests.conftest import cli
from tests.integration.test_cluster import all_live, wait_until

pytestmark = [pytest.mark.lab, pytest.mark.slow]

if os.environ.get("CI") == "true":
    import libvirt  # in CI a missing libvirt is a broken .ci/run, never a reason to skip
else:
    libvirt = pytest.importorskip("libvirt")


def counter_xml(name: str, device: str, ident: str) -> str:
    kernel, initrd = guest.build(SubprocessRunner())
    return f"""<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>128</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{kernel}</kernel><initrd>{initrd}</initrd>
    <cmdline>console=ttyS0 quiet fl_mode=counter fl_id={ident}</cmdline></os>
  <devices>
    <disk type='block' device='disk'><driver name='qemu' type='raw' cache='none'/>
      <source dev='{device}'/><target dev='vda' bus='virtio'/></disk>
    <serial type='file'><source path='/var/log/libvirt/qemu/{name}-console.log'/></serial>
  </devices>
</domain>"""


def records(device: str) -> list[tuple[int, str]]:
    """The counter records on the disk, by number (read with O_DIRECT: no stale cache)."""
    dev = open_device(device, writable=False)
    try:
        raw = dev.read(0, 512 * 2048)
    finally:
        dev.close()
    out = {}
    for i in range(1, 2048):
        parts = raw[i * 512:(i + 1) * 512].split()
        if len(parts) == 3 and parts[0] == guest.RECORD.encode():
            out[int(parts[1])] = parts[2].decode()
    return sorted(out.items())


def test_each_host_has_its_own_libvirtd_and_the_guest_counts_on_a_mapped_volume(make_lab):
    lab = make_lab(2, "--agents", "--libvirt")
    lab.on("h1", "init")
    lab.on("h2", "join")
    wait_until(lambda: all_live(lab, "h1", lab.hosts), 20, "both hosts live")
    lab.on("h2", "volume", "create", "ctr-disk", "16M")
    mapped = json.loads(cli("lab", "activate", "--dir", str(lab.dir), "h1", "ctr-disk",
                            "--json").stdout)
    conns = {h: libvirt.open(cfg_uri(lab, h)) for h in lab.hosts}
    try:
        dom = conns["h1"].createXML(counter_xml("ctr", mapped["device"], "h1-1"), 0)
        wait_until(lambda: len(records(mapped["device"])) >= 3, 60, "the guest to count")
        assert [d.name() for d in conns["h1"].listAllDomains()] == ["ctr"]
        assert conns["h2"].listAllDomains() == []  # h2's daemon is another one
        got = records(mapped["device"])
        assert [n for n, _ in got] == list(range(1, len(got) + 1))
        assert {ident for _, ident in got} == {"h1-1"}
        dom.destroy()
        time.sleep(0.5)
        frozen = records(mapped["device"])
        time.sleep(1.0)
        assert records(mapped["device"]) == frozen  # stopped means no more writes
    finally:
        for c in conns.values():
            c.close()


def cfg_uri(lab, host: str) -> str:
    from fenceless import config

    uri = config.load(lab.config(host)).hypervisor_uri
    assert uri is not None and str(lab.dir) in uri
    return uri
