"""The lab's VM ground: one real libvirtd per lab host, and the tiny counter guest booting
under TCG from a volume mapped on that host (issue 9, the lab part)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

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


GUEST_SLOTS = 2  # TCG guests are CPU-bound: at most this many of these tests at once


@pytest.fixture(autouse=True)
def guest_slot():
    """One of GUEST_SLOTS machine-wide slots (a flock), held for the whole test: with more
    guests booting at once on two cores than that, a boot could outlast the tests' waits."""
    import fcntl

    deadline = time.monotonic() + 1200
    while True:
        for i in range(GUEST_SLOTS):
            fd = os.open(f"/tmp/fenceless-test-guest-slot-{i}.lock",
                         os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            try:
                yield
            finally:
                os.close(fd)
            return
        assert time.monotonic() < deadline, "no guest slot came free"
        time.sleep(0.2)


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
        return guest.read_counter(dev.read(0, 512 * 2048))
    finally:
        dev.close()


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
        wait_until(lambda: len(records(mapped["device"])) >= 3, 120, "the guest to count")
        assert [d.name() for d in conns["h1"].listAllDomains()] == ["ctr"]
        assert conns["h2"].listAllDomains() == []  # h2's daemon is another one
        got = records(mapped["device"])
        assert [n for n, _ in got] == list(range(1, len(got) + 1))
        idents = {ident for _, ident in got}
        assert len(idents) == 1 and idents.pop().startswith("h1-1-")  # one boot of it
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


def counter_lab(make_lab):
    """Three hosts with agents and libvirtds, h1 the writer, and the counter guest ctr
    defined (stopped) on its volume ctr-disk."""
    lab = make_lab(3, "--agents", "--libvirt")
    lab.on("h1", "init")
    for h in ("h2", "h3"):
        lab.on(h, "join")
    wait_until(lambda: all_live(lab, "h1", lab.hosts), 20, "all hosts live")
    cli("lab", "demo-vm", "--dir", str(lab.dir), "ctr")
    return lab


def counter_of(lab, host: str, volume: str) -> list[tuple[int, str]]:
    """The counter records as read through ``host``'s own view of the LUN (no mapping
    needed: the volume's extent, read with O_DIRECT from the host's LUN device)."""
    from fenceless import config
    from fenceless.lvm.mapping import single_extent
    from fenceless.ops.context import Context

    cfg = config.load(lab.config(host))
    lvm = Context(cfg).lvm(None)
    pvs = {p.name: p for p in lvm.pvs()}
    ext = single_extent(lvm.segments(volume), pvs, lvm.vg_info().extent_size, "sanvg", volume)
    dev = open_device(ext.device, writable=False)
    try:
        return guest.read_counter(dev.read(ext.offset, 512 * 2048))
    finally:
        dev.close()


def instance_changes(records: list[tuple[int, str]]) -> list[int]:
    """Check the count has no gap and no repeat; the positions where the writing instance
    changed (two instances writing at once would show as several changes)."""
    assert [n for n, _ in records] == list(range(1, len(records) + 1)), records
    ids = [i for _, i in records]
    return [k for k in range(1, len(ids)) if ids[k] != ids[k - 1]]


def test_a_vm_runs_on_one_host_only_and_moves_with_its_counter(make_lab):
    from tests.integration.test_volumes import lab_mapped

    lab = counter_lab(make_lab)
    lab.on("h2", "vm", "start", "ctr")
    vms = {v["name"]: v for v in json.loads(lab.on("h3", "vm", "list", "--json").stdout)}
    assert (vms["ctr"]["host"], vms["ctr"]["state"]) == ("h2", "running")
    wait_until(lambda: len(counter_of(lab, "h3", "ctr-disk")) >= 3, 120, "ctr to count")

    # h3 may not start it, nor map its disk: refused, with who has it since when.
    res = lab.on("h3", "vm", "start", "ctr", check=False)
    assert res.returncode == 2, res.stderr
    assert "ctr's disk ctr-disk is active read-write on h2 since" in res.stderr
    assert "(epoch 1); stop it there or migrate it" in res.stderr
    assert lab_mapped(lab, "h3") == set()
    res = cli("lab", "activate", "--dir", str(lab.dir), "h3", "ctr-disk", check=False)
    assert res.returncode == 2 and "active read-write on h2" in res.stderr

    # Stopped on h2 and started on h3: the count goes on, one instance at a time.
    lab.on("h2", "vm", "stop", "ctr", "--force")
    assert lab_mapped(lab, "h2") == set()
    before = counter_of(lab, "h1", "ctr-disk")
    lab.on("h3", "vm", "start", "ctr")
    wait_until(lambda: len(counter_of(lab, "h1", "ctr-disk")) >= len(before) + 3, 120,
               "ctr to count on h3")
    after = counter_of(lab, "h1", "ctr-disk")
    changes = instance_changes(after)
    # One hand-over, no overlap. The guest writes record n to the ring, then to sector 0;
    # destroyed (--force) between the two, its record n is in the ring but sector 0 says
    # n-1, so the next boot counts on from there and writes n again: the hand-over is one
    # record earlier, and that record is the new boot's (a CI run met this).
    killed_mid_record = after[len(before) - 1][1] != before[-1][1]
    assert changes == [len(before) - 1 if killed_mid_record else len(before)], (before, after)
    lab.on("h3", "vm", "stop", "ctr", "--force")
    assert json.loads(lab.on("h1", "vm", "list", "--json").stdout)[0]["state"] == "stopped"


def test_a_frozen_host_has_its_vm_fenced_before_another_may_recover_it(make_lab):
    from fenceless.clock import boottime
    from tests.integration.test_check import findings
    from tests.integration.test_fencing import fired
    from tests.integration.test_volumes import lab_mapped

    lab = counter_lab(make_lab)
    lab.on("h2", "vm", "start", "ctr")
    wait_until(lambda: len(counter_of(lab, "h1", "ctr-disk")) >= 3, 120, "ctr to count")

    cli("lab", "agent", "--dir", str(lab.dir), "h2", "pause")  # SIGSTOP: no own timer runs
    try:
        res = lab.on("h3", "vm", "recover", "ctr", check=False)
        assert res.returncode == 2 and "not DEAD" in res.stderr, res.stderr
        assert lab_mapped(lab, "h3") == set()
        # `fenceless check` names the hazard, with the recover below as its fix.
        hazard = wait_until(lambda: [f for f in findings(lab, "h3")[1]
                                     if f["code"] == "E_VM_HOST"], 20, "E_VM_HOST")
        assert [(f["host"], f["severity"]) for f in hazard] == [("h2", "error")]
        assert hazard[0]["fix"].startswith("fenceless vm recover ctr (once h2 is DEAD)")
        wait_until(lambda: lab.on("h3", "vm", "recover", "ctr", check=False).returncode == 0,
                   30, "h2 to be DEAD and ctr recovered on h3")
        recovered_at = boottime()
        assert "E_VM_HOST" not in {f["code"] for f in findings(lab, "h3")[1]}
        got = fired(lab, "h2")
        assert len(got) == 1 and got[0]["fired_at"] < recovered_at, got
        before = len(counter_of(lab, "h1", "ctr-disk"))
        wait_until(lambda: len(counter_of(lab, "h1", "ctr-disk")) >= before + 3, 120,
                   "ctr to count on h3")
        # h2's instance, then h3's: never both at once
        assert len(instance_changes(counter_of(lab, "h1", "ctr-disk"))) == 1
        vms = {v["name"]: v for v in json.loads(lab.on("h1", "vm", "list", "--json").stdout)}
        assert vms["ctr"]["host"] == "h3"
    finally:
        cli("lab", "agent", "--dir", str(lab.dir), "h2", "resume", check=False)
    lab.on("h3", "vm", "stop", "ctr", "--force")


def test_started_on_another_host_and_migrated_cold_from_a_third(make_lab):
    lab = counter_lab(make_lab)

    res = json.loads(lab.on("h1", "vm", "start", "ctr", "--on", "h2", "--json").stdout)
    assert (res["host"], res["state"]) == ("h2", "running")
    wait_until(lambda: len(counter_of(lab, "h1", "ctr-disk")) >= 3, 120, "ctr to count on h2")
    refused = lab.on("h1", "vm", "start", "ctr", "--on", "h3", check=False)
    assert refused.returncode == 2  # it runs on h2: a start is not a migration
    assert "ctr's disk ctr-disk is active read-write on h2" in refused.stderr, refused.stderr

    res = json.loads(lab.on("h3", "vm", "migrate", "ctr", "--to", "h1", "--force",
                            "--json").stdout)
    assert (res["host"], res["from"]) == ("h1", "h2")
    before = len(counter_of(lab, "h3", "ctr-disk"))
    wait_until(lambda: len(counter_of(lab, "h3", "ctr-disk")) >= before + 3, 120,
               "ctr to count on h1")
    assert len(instance_changes(counter_of(lab, "h3", "ctr-disk"))) == 1
    vms = {v["name"]: v for v in json.loads(lab.on("h2", "vm", "list", "--json").stdout)}
    assert (vms["ctr"]["host"], vms["ctr"]["want"]) == ("h1", None)
    lab.on("h1", "vm", "stop", "ctr", "--force")


def test_a_host_whose_renewals_fail_kills_its_own_vms_before_its_watchdog_fires(make_lab):
    """h2's agent runs on, but every write it makes to the LUN fails (EIO, injected with
    strace): past 6N it kills its own VM; the watchdog's firing at 10N finds it gone."""
    import signal
    import subprocess

    from fenceless.clock import boottime
    from tests.integration.test_fencing import fired

    lab = counter_lab(make_lab)
    lab.on("h2", "vm", "start", "ctr")
    from fenceless.lab.libvirt import qemu_pids

    pids = wait_until(lambda: qemu_pids(lab.dir / "hosts" / "h2"), 30, "ctr's QEMU")
    agent_pid = json.loads((lab.dir / "lab.json").read_text())["hosts"][1]["agent_pid"]
    tracer = subprocess.Popen(["strace", "-f", "-qq", "-o", "/dev/null", "-p", str(agent_pid),
                               "-e", "trace=pwritev2,pwritev",
                               "-e", "inject=pwritev2,pwritev:error=EIO"])
    try:
        def gone() -> float | None:
            for p in pids:
                try:
                    stat = Path(f"/proc/{p}/stat").read_text()
                except OSError:
                    continue
                if stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X"):
                    return None
            return boottime()

        died = wait_until(gone, 30, "h2's VM to be fenced")
        got = wait_until(lambda: fired(lab, "h2"), 30, "h2's watchdog to fire")
        assert died < got[0]["fired_at"], (died, got)  # the agent's own timer came first
        log = (lab.dir / "hosts" / "h2" / "agent.log").read_text()
        assert "FENCING THIS HOST'S VMs" in log
    finally:
        tracer.send_signal(signal.SIGINT)
        tracer.wait(timeout=30)


def test_a_live_migration_keeps_the_guest_counting_and_a_failed_one_leaves_it_in_place(
        make_lab):
    """Live h2 -> h3: one boot of the guest counts on, with no number lost or repeated,
    and h2 unmaps the disk once the guest left. Before that, a migration whose transfer
    cannot connect (h3 gives the guest's memory an address nobody listens on) leaves the
    guest running on h2, with nothing mapped on h3."""
    from tests.integration.test_cluster import agent
    from tests.integration.test_volumes import lab_mapped

    lab = counter_lab(make_lab)
    lab.on("h2", "vm", "start", "ctr")
    wait_until(lambda: len(counter_of(lab, "h1", "ctr-disk")) >= 3, 120, "ctr to count")
    config = Path(lab.config("h3"))
    good = config.read_text()

    def restart_h3(text: str) -> None:
        config.write_text(text)
        agent(lab, "h3", "stop")
        agent(lab, "h3", "start")
        wait_until(lambda: all_live(lab, "h1", lab.hosts), 30, "h3 back")

    restart_h3(good.replace('migration_uri = "tcp://127.0.0.1"',
                            'migration_uri = "tcp://192.0.2.1"'))  # TEST-NET: unreachable
    res = lab.on("h1", "vm", "migrate", "ctr", "--to", "h3", "--live", check=False)
    assert res.returncode == 3, res
    assert "was not migrated live to h3 (it runs on h2 still)" in res.stderr, res.stderr
    vms = {v["name"]: v for v in json.loads(lab.on("h1", "vm", "list", "--json").stdout)}
    assert (vms["ctr"]["host"], vms["ctr"]["state"], vms["ctr"]["moving_to"],
            vms["ctr"]["want"]) == ("h2", "running", None, None)
    assert lab_mapped(lab, "h3") == set()
    before = len(counter_of(lab, "h1", "ctr-disk"))
    wait_until(lambda: len(counter_of(lab, "h1", "ctr-disk")) >= before + 3, 120,
               "ctr to count on h2 still")

    restart_h3(good)
    res = json.loads(lab.on("h1", "vm", "migrate", "ctr", "--to", "h3", "--live",
                            "--json").stdout)
    assert (res["host"], res["from"], res["live"]) == ("h3", "h2", True)
    moved = len(counter_of(lab, "h1", "ctr-disk"))
    wait_until(lambda: len(counter_of(lab, "h1", "ctr-disk")) >= moved + 3, 120,
               "ctr to count on h3")
    # Never backwards, and one boot: it kept running through the move.
    assert instance_changes(counter_of(lab, "h1", "ctr-disk")) == []
    wait_until(lambda: lab_mapped(lab, "h2") == set(), 30, "h2 to unmap the disk")
    vms = {v["name"]: v for v in json.loads(lab.on("h2", "vm", "list", "--json").stdout)}
    wait_until(lambda: json.loads(lab.on("h2", "vm", "list", "--json").stdout)[0]["left"]
               is None, 30, "h2's release to be recorded")
    assert (vms["ctr"]["host"], vms["ctr"]["state"]) == ("h3", "running")
    assert lab_mapped(lab, "h3") == {"ctr-disk"}
    lab.on("h3", "vm", "stop", "ctr", "--force")


def test_a_read_only_disk_is_shared_by_vms_on_two_hosts_and_never_attached_read_write(
        make_lab):
    """ctr (on h2) and ctr2 (on h3) both have shared-img read-only: the writer makes its
    LVM permission ``r`` for as long as a definition has it read-only; a read-write
    mapping of it, or a definition with it read-write, is refused meanwhile."""
    lab = counter_lab(make_lab)
    cli("lab", "demo-vm", "--dir", str(lab.dir), "ctr2")
    lab.on("h1", "volume", "create", "shared-img", "16M")

    def attr() -> str:
        out = cli("lab", "exec", "--dir", str(lab.dir), "h3", "--", "lvs", "--noheadings",
                  "-o", "lv_attr,lv_tags", "sanvg/shared-img").stdout.split()
        return " ".join(out)

    assert attr().startswith("-wi")
    disk = ("<disk type='block' device='disk'><driver name='qemu' type='raw' cache='none'/>"
            "<source dev='/dev/sanvg/shared-img'/><target dev='vdb' bus='virtio'/>"
            "<readonly/><shareable/></disk>")
    for name in ("ctr", "ctr2"):
        xml = json.loads(lab.on("h1", "vm", "show", name, "--json").stdout)["xml"]
        path = lab.dir / f"{name}.xml"
        path.write_text(xml.replace("</devices>", disk + "</devices>"))
        lab.on("h2", "vm", "edit", name, "--xml", str(path))
    assert attr().startswith("-ri") and "fenceless_vm_ro" in attr()

    lab.on("h2", "vm", "start", "ctr")
    lab.on("h3", "vm", "start", "ctr2")
    from tests.integration.test_volumes import lab_mapped

    assert "shared-img" in lab_mapped(lab, "h2") and "shared-img" in lab_mapped(lab, "h3")
    vms = {v["name"]: v for v in json.loads(lab.on("h1", "vm", "list", "--json").stdout)}
    assert [(vms[n]["host"], vms[n]["state"]) for n in ("ctr", "ctr2")] == [
        ("h2", "running"), ("h3", "running")]
    wait_until(lambda: len(counter_of(lab, "h1", "ctr-disk")) >= 3
               and len(counter_of(lab, "h1", "ctr2-disk")) >= 3, 90, "both guests to count")

    res = cli("lab", "activate", "--dir", str(lab.dir), "h1", "shared-img", check=False)
    assert res.returncode == 2 and "active read-only on h" in res.stderr, res.stderr
    xml = json.loads(lab.on("h1", "vm", "show", "ctr2", "--json").stdout)["xml"]
    rw = lab.dir / "rw.xml"
    rw.write_text(xml.replace("<name>ctr2</name>", "<name>ctr3</name>")
                  .replace("/dev/sanvg/ctr2-disk", "/dev/sanvg/shared-img")
                  .replace("<readonly/><shareable/>", "", 1))
    res = lab.on("h1", "vm", "define", "ctr3", "--xml", str(rw), check=False)
    assert res.returncode == 2 and "shared-img" in res.stderr, res.stderr

    lab.on("h2", "vm", "stop", "ctr", "--force")
    lab.on("h3", "vm", "stop", "ctr2", "--force")
    lab.on("h1", "vm", "undefine", "ctr2")
    assert attr().startswith("-ri")  # ctr has it read-only still
    path = lab.dir / "ctr.xml"
    path.write_text(path.read_text().replace(disk, ""))
    lab.on("h3", "vm", "edit", "ctr", "--xml", str(path))
    # No definition has it any more: read-write again, and fenceless's tag is gone.
    assert attr().startswith("-wi") and "fenceless_vm_ro" not in attr()


def test_a_start_or_stop_killed_part_way_is_settled_by_the_hosts_agent(make_lab):
    """`vm start` SIGKILLed with the grant recorded and the disk mapped, and `vm stop`
    SIGKILLed with the domain stopped but the disk still mapped: each time h2's agent
    finds the VM granted to h2 with no domain and no command working on it, unmaps the
    disk and returns the grant; the VM starts again after."""
    from tests.integration.test_volumes import lab_mapped

    lab = counter_lab(make_lab)

    def ctr() -> dict:
        return json.loads(lab.on("h1", "vm", "list", "--json").stdout)[0]

    def settled() -> bool:
        return ctr()["state"] == "stopped" and lab_mapped(lab, "h2") == set()

    res = lab.on("h2", "vm", "start", "ctr", check=False,
                 env={"FENCELESS_CRASHPOINT": "vm.start.mapped"})
    assert res.returncode == -9, res  # killed: no undo ran
    # The grant it took and the disk it mapped stay, until h2's agent (which may be quick
    # about it: it looks every 2 s) settles them.
    assert ((ctr()["host"], ctr()["state"]) == ("h2", "running")
            and lab_mapped(lab, "h2") == {"ctr-disk"}) or settled()
    wait_until(settled, 30, "h2's agent to settle the interrupted start")

    lab.on("h2", "vm", "start", "ctr")
    wait_until(lambda: len(counter_of(lab, "h1", "ctr-disk")) >= 3, 120, "ctr to count")
    res = lab.on("h2", "vm", "stop", "ctr", "--force", check=False,
                 env={"FENCELESS_CRASHPOINT": "vm.stop.domain-stopped"})
    assert res.returncode == -9, res
    assert (ctr()["state"] == "running" and lab_mapped(lab, "h2") == {"ctr-disk"}) \
        or settled()
    wait_until(settled, 30, "h2's agent to settle the interrupted stop")
    log = lab.dir / "hosts" / "h2" / "agent.log"  # its line comes after the settling itself
    wait_until(lambda: log.read_text().count("granted here but not running") == 2, 10,
               "h2's agent to say what it settled")
    lab.on("h3", "vm", "start", "ctr")  # free to run anywhere again
    lab.on("h3", "vm", "stop", "ctr", "--force")


def test_draining_a_host_moves_its_guests_away_live_and_places_nothing_there(make_lab):
    """`host drain h2` with two guests counting on h2: both run elsewhere afterwards, one
    boot each (moved live), their counts going on; nothing may be moved to h2 until
    `host resume h2`."""
    lab = counter_lab(make_lab)
    cli("lab", "demo-vm", "--dir", str(lab.dir), "ctr2")
    for name in ("ctr", "ctr2"):
        lab.on("h2", "vm", "start", name)
    for name in ("ctr", "ctr2"):
        wait_until(lambda n=name: len(counter_of(lab, "h1", f"{n}-disk")) >= 3, 180,
                   f"{name} to count on h2")
    res = lab.on("h1", "host", "drain", "h2", "--timeout", "120")
    assert res.stdout.count("migration h2 -> ") == 2, res.stdout
    assert "h2 is in maintenance and runs no VM" in res.stdout
    vms = {v["name"]: v for v in json.loads(lab.on("h3", "vm", "list", "--json").stdout)}
    assert {vms[n]["host"] for n in ("ctr", "ctr2")} == {"h1", "h3"}  # spread, not stacked
    assert all(vms[n]["state"] == "running" for n in ("ctr", "ctr2"))
    for name in ("ctr", "ctr2"):
        moved = len(counter_of(lab, "h1", f"{name}-disk"))
        wait_until(lambda n=name, m=moved: len(counter_of(lab, "h1", f"{n}-disk")) >= m + 3,
                   120, f"{name} to count on after the drain")
        assert instance_changes(counter_of(lab, "h1", f"{name}-disk")) == []  # one boot
    # Nothing goes to h2 while it is in maintenance, and `check` shows none of its VMs.
    res = lab.on("h1", "vm", "migrate", "ctr", "--to", "h2", "--live", check=False)
    assert res.returncode == 2 and "h2 is in maintenance" in res.stderr, res.stderr
    lab.on("h1", "host", "resume", "h2")
    res = json.loads(lab.on("h1", "vm", "migrate", "ctr", "--to", "h2", "--live",
                            "--json").stdout)
    assert res["host"] == "h2"
    for name, host in (("ctr", "h2"), ("ctr2", vms["ctr2"]["host"])):
        lab.on(host, "vm", "stop", name, "--force")
