"""ops/check.py: each hazard from what ``gather`` read, and nothing on a healthy cluster.

The same hazards planted in a real lab: tests/integration/test_check.py."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from fenceless.config import HostConfig, VgConfig
from fenceless.errors import NotFound
from fenceless.ledger.state import LedgerState, VmDisk, VmEntry
from fenceless.lvm.parse import LvInfo, VgInfo
from fenceless.ops import check

CFG = HostConfig(path="-", host="h1", state_dir="/tmp/x", io_timeout=0.2,
                 vgs=(VgConfig("sanvg", ("/dev/loop9",)),))
VG = VgInfo(name="sanvg", uuid="u", size=1 << 34, free=1 << 33, extent_size=4 << 20,
            extent_count=4096, free_count=2048, seqno=9, lv_count=3, pv_count=1,
            mda_size=16 << 20, mda_free=7 << 20, attr="wz--n-", tags=())


def lv(name: str, size: int = 8 << 20, tags: tuple[str, ...] = ("fenceless_req_1",)) -> LvInfo:
    return LvInfo("sanvg", name, f"u-{name}", size, "-wi-------", tags, 1)


def host(hid: int, name: str, lease: str = "live", claims: dict[str, Any] | None = None,
         **facts: Any) -> dict[str, Any]:
    return {"id": hid, "name": name, "lease": lease, "generation": 1, "age": 0.1,
            "facts": {"version": "0.1.0", "guard": "ok", "io_timeout": 0.2, **facts},
            "claims": claims or {}}


def vm(name: str, host: str | None, disk: str, **kw: Any) -> VmEntry:
    return VmEntry(name=name, slot=1, seq=1, sha="0" * 64, disks=(VmDisk("vda", disk, "rw"),),
                   memory_mib=64, vcpus=1, source="xml", epoch=1, changed_ms=0, host=host,
                   state="running" if host else "stopped", **kw)


def healthy() -> check.Facts:
    status = {"vg": "sanvg", "io_timeout": 0.2, "ledger": {"problems": []},
              "writer": {"host": "h1", "id": 1, "epoch": 3, "released": False,
                         "state": "active"},
              "hosts": [host(1, "h1"), host(2, "h2", claims={
                  "web-disk": {"size_bytes": 8 << 20, "mode": "rw"}}), host(3, "h3")]}
    ledger = replace(LedgerState(), vms={"web": vm("web", "h2", "web-disk")})
    return check.Facts(CFG, "sanvg", status=status, ledger=ledger, vg=VG,
                       lvs=[lv("fenceless-ctl", tags=()), lv("web-disk"), lv("spare")],
                       autoactivation=False,
                       guard={"installed": True, "state": "ok", "warnings": []})


def codes(facts: check.Facts) -> list[tuple[str, str, str | None]]:
    return [(f.code, f.severity, f.host) for f in check.run_checks(facts)]


def test_a_healthy_cluster_has_no_finding():
    assert codes(healthy()) == []


def hosts_of(facts: check.Facts) -> list[dict[str, Any]]:
    assert facts.status is not None
    return facts.status["hosts"]


def test_a_host_without_the_guard():
    facts = healthy()
    hosts_of(facts)[2]["facts"]["guard"] = "missing"
    hosts_of(facts)[1]["facts"]["guard"] = "broken"
    found = check.run_checks(facts)
    assert [(f.code, f.host) for f in found] == [("E_GUARD", "h2"), ("E_GUARD", "h3")]
    assert found[1].fix == "on h3: fenceless guard install"
    # This host's own guard is looked at directly, not through its published facts.
    facts = healthy()
    facts.guard = {"installed": False, "state": "missing", "warnings": []}
    assert codes(facts) == [("E_GUARD", "error", "h1")]
    # A sound guard whose role file is not yet written (an agent starting), on a host with
    # initramfs-tools: warnings that name the wrapper, and no hazard (it was E_GUARD).
    facts = healthy()
    facts.guard = {"installed": True, "state": "ok", "warnings": [
        "VG sanvg: role file line missing: the wrapper treats this host as a reader",
        "initramfs-tools copies /sbin/lvm into the initramfs: with the guard that is the "
        "wrapper, without the real binary"]}
    assert codes(facts) == []


def test_an_lv_read_write_on_two_hosts_and_a_vm_disk_outside_its_grant():
    facts = healthy()
    hosts_of(facts)[2]["claims"] = {"web-disk": {"size_bytes": 8 << 20, "mode": "rw"}}
    assert codes(facts) == [("E_RW_TWICE", "error", None), ("E_VM_LEASE", "error", "h3")]
    # During a live migration both hosts hold the disks on purpose.
    assert facts.ledger is not None
    facts.ledger = replace(facts.ledger, vms={"web": vm("web", "h2", "web-disk",
                                                        moving_to="h3")})
    assert codes(facts) == []


def test_a_dead_hosts_claims_do_not_count():
    facts = healthy()
    hosts_of(facts)[2]["claims"] = {"web-disk": {"size_bytes": 8 << 20, "mode": "rw"}}
    hosts_of(facts)[2]["lease"] = "dead"
    assert codes(facts) == []


def test_a_stale_size_after_an_extend():
    facts = healthy()
    facts.lvs = [lv("fenceless-ctl", tags=()), lv("web-disk", 12 << 20), lv("spare")]
    found = check.run_checks(facts)
    assert [(f.code, f.host) for f in found] == [("W_STALE_SIZE", "h2")]
    assert found[0].fix == "on h2: lvchange --refresh sanvg/web-disk"


@pytest.mark.parametrize("lease", ["fail", "dead"])
def test_a_vm_on_a_failing_or_dead_host(lease):
    facts = healthy()
    hosts_of(facts)[1]["lease"] = lease
    assert ("E_VM_HOST", "error", "h2") in codes(facts)


def test_the_writer():
    facts = healthy()
    assert facts.status is not None
    facts.status["writer"]["state"] = "fail"
    assert codes(facts) == [("W_WRITER", "warning", "h1")]
    facts.status["writer"] = None
    assert codes(facts) == [("E_WRITER", "error", None)]


def test_versions_and_io_timeouts_that_differ():
    facts = healthy()
    hosts_of(facts)[0]["facts"]["version"] = "0.2.0"
    hosts_of(facts)[2]["facts"]["io_timeout"] = 1.0
    assert codes(facts) == [("W_IO_TIMEOUT", "warning", "h3"), ("W_VERSIONS", "warning", "h2"),
                            ("W_VERSIONS", "warning", "h3")]
    fix = {f.host: f.fix for f in check.run_checks(facts) if f.code == "W_VERSIONS"}
    assert fix["h2"] == "on h2: upgrade fenceless to 0.2.0, then fenceless guard install " \
        "(its wrapper names the version), then systemctl restart fenceless-agent"
    hosts_of(facts)[1]["facts"]["version"] = "0.10.0"  # newer than 0.2.0, as numbers
    assert [f.host for f in check.run_checks(facts) if f.code == "W_VERSIONS"] == ["h1", "h3"]


def test_lvm_metadata_hazards():
    facts = healthy()
    facts.autoactivation = True
    facts.vg = replace(VG, pv_count=2, mda_free=1 << 20, lv_count=3000)
    found = {f.code: f for f in check.run_checks(facts)}
    # (the config lists one device: the second PV is also one LVM finds missing)
    assert set(found) == {"W_AUTOACTIVATION", "W_MDA_PVS", "E_MDA_FULL", "E_PV_UNLISTED"}
    assert found["E_PV_UNLISTED"].message.startswith(
        "VG sanvg has 2 PVs, but the device(s) this host's config lists (/dev/loop9) hold 1")
    assert "88% used" in found["E_MDA_FULL"].message
    assert "about 428 more LVs fit" in found["E_MDA_FULL"].message  # 7 MiB for 3000 LVs
    facts.vg = replace(VG, mda_free=3 << 20, lv_count=3000)
    assert [f.code for f in check.run_checks(facts)] == ["W_AUTOACTIVATION", "W_MDA_FULL"]
    assert found["W_AUTOACTIVATION"].fix == "on the writer: vgchange --setautoactivation n sanvg"


def test_an_lv_nobody_accounts_for():
    facts = healthy()
    facts.lvs = [*(facts.lvs or []), lv("by-hand", tags=())]
    found = check.run_checks(facts)
    assert [(f.code, f.severity) for f in found] == [("I_UNACCOUNTED", "info")]
    assert found[0].fix.endswith("fenceless volume remove by-hand")


def test_damage_in_the_control_area():
    facts = healthy()
    assert facts.status is not None
    facts.status["ledger"]["problems"] = ["ledger slot A: checksum mismatch"]
    hosts_of(facts)[1]["error"] = "bad magic"
    assert codes(facts) == [("E_CONTROL_AREA", "error", None),
                            ("E_CONTROL_AREA", "error", "h2")]


def test_a_code_can_be_demoted_to_a_warning():
    facts = healthy()
    facts.guard = {"installed": False, "state": "missing", "warnings": []}
    assert [f.severity for f in check.run_checks(facts, frozenset({"E_GUARD"}))] == ["warning"]


def test_what_cannot_be_read_is_a_finding_and_silences_what_needs_it():
    def fails(*_a: Any, **_k: Any) -> Any:
        raise NotFound(kind="VG", name="sanvg", where="")

    facts = check.gather(CFG, None, fails, fails, fails, lambda: None, lambda: {})
    found = check.run_checks(facts)
    assert {f.code for f in found} == {"E_UNREADABLE"}
    assert len(found) == 3  # the control area, the VM index, LVM's report
    assert "the control area could not be read" in found[0].message


def test_every_check_has_a_documented_code():
    assert all(fn.__doc__ for fn in check.CHECKS.values())
    assert all(code[:2] in ("E_", "W_", "I_") for code in check.CHECKS)


def test_the_json_has_the_minimum_shape():
    facts = healthy()
    facts.guard = {"installed": False, "state": "missing", "warnings": []}
    out = check.as_json(check.run_checks(facts))
    (f,) = out["findings"]
    assert set(f) == {"code", "severity", "host", "message", "fix"}
    assert (out["errors"], out["warnings"]) == (1, 0)


def test_a_host_in_maintenance_is_noted():
    from fenceless.ledger.state import HostEntry

    facts = healthy()
    assert facts.ledger is not None
    facts.ledger = replace(facts.ledger, hosts={2: HostEntry("h2", 1, maintenance=True)})
    found = check.run_checks(facts)
    assert [(f.code, f.severity, f.host, f.fix) for f in found] == [
        ("I_MAINTENANCE", "info", "h2", "when it is ready: fenceless host resume h2")]


def test_a_writer_whose_renewals_are_late():
    facts = healthy()
    hosts_of(facts)[0]["age"] = 1.4  # 7N at N = 0.2: renewed every 2N, fails at 8N
    found = check.run_checks(facts)
    assert [(f.code, f.host) for f in found] == [("W_WRITER", "h1")]
    assert "last renewed 1.4s ago (7N;" in found[0].message
    hosts_of(facts)[0]["age"] = 1.0
    assert check.run_checks(facts) == []


def test_a_second_pv_listed_everywhere_and_copies_that_disagree():
    facts = healthy()
    facts.cfg = CFG._replace(vgs=(VgConfig("sanvg", ("/dev/loop9", "/dev/loop10")),))
    facts.vg = replace(VG, pv_count=2)
    facts.copies = [("/dev/loop9", 12, "", False), ("/dev/loop10", 12, "", False)]
    assert codes(facts) == [("W_MDA_PVS", "warning", None)]
    facts.copies = [("/dev/loop9", 12, "", False), ("/dev/loop10", 11, "", False)]
    found = check.run_checks(facts)
    assert [(f.code, f.host) for f in found] == [("E_MDA_COPIES", "h1"), ("W_MDA_PVS", None)]
    assert "(/dev/loop10 seqno 11, /dev/loop9 seqno 12)" in found[0].message
    assert found[0].fix == "on the writer: vgck --updatemetadata sanvg"
    facts.copies = [("/dev/loop9", 12, "", False), ("/dev/loop10", None, "checksum", True)]
    found = check.run_checks(facts)
    assert found[0].code == "E_MDA_COPIES" and "on /dev/loop10 does not read: checksum" \
        in found[0].message
    # A listed device that is not one of the VG's PVs: the config is wrong, not LVM.
    facts.copies = [("/dev/loop9", 12, "", False),
                    ("/dev/loop10", None, "it holds the metadata of VG other", False)]
    found = check.run_checks(facts)
    assert [f.code for f in found] == ["W_MDA_PVS", "W_PV_LISTED"]
    assert found[1].fix.startswith("on h1: correct devices of [vg.sanvg] in fenceless.toml")


def test_a_pv_on_no_listed_device_is_found_by_identity_not_by_count():
    from fenceless.lvm.parse import PvInfo

    facts = healthy()
    # Two paths listed, but both the same PV (an alias): the second PV is on neither.
    facts.cfg = CFG._replace(vgs=(VgConfig("sanvg", ("/dev/loop9", "/dev/disk/x")),))
    facts.vg = replace(VG, pv_count=2)
    pv = PvInfo("/dev/loop9", "sanvg", "pv-1", 1 << 30, 0, 1 << 20, 1 << 30, 256, 10)
    facts.pvs = [pv, replace(pv, name="/dev/disk/x")]
    assert "E_PV_UNLISTED" in {f.code for f in check.run_checks(facts)}
    facts.pvs = [pv, replace(pv, name="/dev/loop10", uuid="pv-2")]
    assert "E_PV_UNLISTED" not in {f.code for f in check.run_checks(facts)}
    # LVM's report names a PV it knows of but does not find "[unknown]": not seen.
    facts.pvs = [pv, replace(pv, name="[unknown]", uuid="pv-2")]
    assert "E_PV_UNLISTED" in {f.code for f in check.run_checks(facts)}


def test_a_full_metadata_area_names_the_volumes_with_the_most_text():
    facts = healthy()
    facts.vg = replace(VG, mda_free=3 << 20, lv_count=3)
    facts.lvs = [lv("fenceless-ctl", tags=()), lv("web-disk"),
                 lv("big", tags=tuple(f"t{i}" + "x" * 900 for i in range(50)))]
    (found,) = [f for f in check.run_checks(facts) if f.code == "W_MDA_FULL"]
    assert found.message.endswith("; the most text is that of big (their tags)")
    assert found.fix.startswith("fenceless volume remove NAME, for each volume no longer")


@pytest.mark.parametrize(("older", "newer"), [
    ("0.9.3", "0.10.1"), ("0.1.9", "0.1.10+g1"), ("0.1.9-1", "0.1.10-1"),
    ("0.2.0.dev1", "0.2.0"), ("0.2.0rc1", "0.2.0"), ("0.2.0", "0.2.0.post1"),
    ("unknown", "0.0.1")])
def test_versions_compare_as_releases(older: str, newer: str) -> None:
    assert check._version_key(older) < check._version_key(newer)


def test_equal_releases_in_other_spellings_are_one_version() -> None:
    assert check._version_key("1.0") == check._version_key("1.0.0") == \
        check._version_key("1.0.0+local") == check._version_key("1.0-2")
