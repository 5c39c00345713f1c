"""Hazards that fenceless itself prevents, planted past it in a real lab, found by
`fenceless check` with their code and fix, and cleared by running that fix.

"Past it" is what an admin without fenceless (or a colleague who undid it) does by
hand: an LV mapped with `fenceless lab activate --by-hand` (the lab's `lvchange -ay`
on a host without the guard), a mapping left at its old size, a PV added with
`vgextend`, tags piled into the metadata, bytes written over a host's record, an
agent of another version. This kernel has no device-mapper, so a fix that says
`lvchange -an VG/LV` or `lvchange --refresh VG/LV` runs as the lab's stand-in for it
(`fenceless lab deactivate|refresh`), and `systemctl restart fenceless-agent` as
`fenceless lab agent HOST stop|start`. The others run as they are written.
"""

from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path

import pytest

from tests.conftest import cli
from tests.integration.test_check import codes, findings
from tests.integration.test_cluster import _corrupt, agent, all_live, wait_until
from tests.integration.test_volumes import volume_lab
from tests.unit.test_domain import WEB

pytestmark = pytest.mark.lab


def found(lab, host: str, code: str, timeout: float = 15) -> list[dict]:
    """The findings of ``code`` that `check` on ``host`` reports, once it does."""
    return wait_until(lambda: [f for f in findings(lab, host)[1] if f["code"] == code],
                      timeout, f"{code} from {host}")


def gone(lab, host: str, code: str, timeout: float = 15) -> None:
    wait_until(lambda: code not in {c for c, _h in codes(findings(lab, host)[1])},
               timeout, f"{code} cleared")


def run_fix(lab, fix: str, host: str | None = None) -> None:
    """Run a finding's fix ("on HOST: ..." or "on the writer: ..."), the lab's stand-ins
    for device-mapper and systemd in place of theirs."""
    where, _, command = fix.partition(": ")
    where = host or {"on the writer": "h1"}.get(where, where.removeprefix("on "))
    command = command.rpartition("then ")[2]  # "stop what uses it ..., then CMD"
    argv = shlex.split(command.split(" (")[0])
    if argv[:2] == ["lvchange", "-an"] or argv[:2] == ["lvchange", "--refresh"]:
        action = "deactivate" if argv[1] == "-an" else "refresh"
        cli("lab", action, "--dir", str(lab.dir), where, argv[2].split("/")[1])
    elif argv == ["systemctl", "restart", "fenceless-agent"]:
        agent(lab, where, "stop")
        agent(lab, where, "start")
    else:
        lab.exec(where, *argv)


def healthy(lab, host: str) -> bool:
    rc, got = findings(lab, host)
    return (rc, [f for f in got if f["severity"] != "info"]) == (0, [])


@pytest.fixture
def plab(make_lab):
    """Three hosts with agents and guards, h1 the writer."""
    lab = volume_lab(make_lab)
    for h in lab.hosts:
        lab.exec(h, "fenceless", "guard", "install")
    return lab


def test_mappings_past_fenceless_are_found_and_fixed(plab, tmp_path):
    """E_RW_TWICE, W_STALE_SIZE and E_VM_LEASE: an LV mapped or resized past fenceless."""
    from fenceless.lab import loopdev

    lab = plab
    # (d1 last: its extend below stays one segment, which the lab's mapping needs)
    for name, size in (("vm-web01", "16M"), ("debian-12-iso", "8M"), ("d1", "8M")):
        lab.on("h2", "volume", "create", name, size)
    wait_until(lambda: healthy(lab, "h2"), 10, "a healthy start")

    # d1 read-write on h2 through fenceless, and by hand on h3 too.
    cli("lab", "activate", "--dir", str(lab.dir), "h2", "d1")
    cli("lab", "activate", "--by-hand", "--dir", str(lab.dir), "h3", "d1")
    (twice,) = found(lab, "h1", "E_RW_TWICE")
    assert twice["message"].startswith("volume d1 is mapped read-write on h2, h3")
    assert twice["fix"].endswith("then lvchange -an sanvg/d1")
    run_fix(lab, twice["fix"], host="h3")  # ("on all but one of them")
    gone(lab, "h1", "E_RW_TWICE")

    # An extend: fenceless brings h2's mapping to the new size at once ...
    lab.on("h3", "volume", "extend", "d1", "+4M")
    wait_until(lambda: healthy(lab, "h1"), 10, "h2's mapping refreshed")
    # ... and a host that missed it maps the old size: h2's mapping put back by hand.
    mapped = json.loads(cli("lab", "refresh", "--dir", str(lab.dir), "h2", "d1",
                            "--json").stdout)
    assert mapped["size_bytes"] == 12 << 20
    loopdev.set_sizelimit(mapped["device"], 8 << 20)
    (stale,) = found(lab, "h1", "W_STALE_SIZE")
    assert stale["host"] == "h2" and stale["fix"] == "on h2: lvchange --refresh sanvg/d1"
    assert "h2 maps volume d1 at 8388608 bytes, the VG says 12582912" in stale["message"]
    run_fix(lab, stale["fix"])
    gone(lab, "h1", "W_STALE_SIZE")
    cli("lab", "deactivate", "--dir", str(lab.dir), "h2", "d1")

    # A VM's disk mapped read-write by hand on a host the VM does not run on.
    web = tmp_path / "web01.xml"
    web.write_text(WEB)
    lab.on("h3", "vm", "define", "web01", "--xml", str(web))
    cli("lab", "activate", "--by-hand", "--dir", str(lab.dir), "h3", "vm-web01")
    (lease,) = found(lab, "h2", "E_VM_LEASE")
    assert lease["host"] == "h3" and "a disk of VM web01, read-write, but the VM runs " \
        "nowhere" in lease["message"]
    assert lease["fix"] == "on h3: stop what holds vm-web01 open, then lvchange -an " \
        "sanvg/vm-web01"
    run_fix(lab, lease["fix"])
    gone(lab, "h2", "E_VM_LEASE")
    wait_until(lambda: healthy(lab, "h3"), 10, "healthy again")


def test_damage_metadata_load_and_an_old_agent_are_found_and_fixed(plab, tmp_path):
    """E_CONTROL_AREA, W_MDA_FULL and W_VERSIONS."""
    from fenceless.ondisk.layout import CLAIMS_SLOT_SIZE

    lab = plab
    wait_until(lambda: healthy(lab, "h2"), 10, "a healthy start")

    # Foreign bytes over h3's claims record (host id 3).
    _corrupt(lab, "h1", ("claims", 2 * CLAIMS_SLOT_SIZE // 4096), lambda old: b"\xa5" * 4096)
    (damage,) = found(lab, "h2", "E_CONTROL_AREA")
    assert damage["host"] == "h3" and "foreign data" in damage["message"]
    assert damage["fix"].startswith("on h3: systemctl restart fenceless-agent")
    run_fix(lab, damage["fix"])
    wait_until(lambda: all_live(lab, "h2", lab.hosts), 20, "h3 back")
    gone(lab, "h2", "E_CONTROL_AREA")

    # Five LVs made by hand on the writer, each with 900 tags of 1000 bytes: half of the
    # metadata area's room for its text is gone.
    tags = [a for i in range(900) for a in ("--addtag", f"t{i:04d}" + "x" * 1000)]
    for i in range(1, 6):
        lab.exec("h1", "lvcreate", "-q", "-an", "-Zn", "-L", "4m", "-n", f"big{i}", *tags,
                 "sanvg")
    (full,) = found(lab, "h2", "W_MDA_FULL")
    assert "more LVs fit; the most text is that of big1, big2, big3, big4, big5 (their " \
        "tags)" in full["message"], full
    assert full["fix"].startswith("fenceless volume remove NAME, for each volume no longer")
    for i in range(1, 6):  # the fix, for each of them
        lab.exec("h2", *shlex.split(full["fix"].split(",")[0].replace("NAME", f"big{i}")))
    gone(lab, "h2", "W_MDA_FULL")

    # h3's agent started from an older fenceless (a copy of this one that says 0.0.9).
    import fenceless

    old = tmp_path / "old"
    shutil.copytree(Path(fenceless.__file__).parent, old / "fenceless",
                    ignore=shutil.ignore_patterns("__pycache__"))
    init = old / "fenceless" / "__init__.py"
    init.write_text(init.read_text().replace(f'"{fenceless.__version__}"', '"0.0.9"'))
    agent(lab, "h3", "stop")
    cli("lab", "agent", "--dir", str(lab.dir), "h3", "start", env={"PYTHONPATH": str(old)})
    (versions,) = found(lab, "h2", "W_VERSIONS", timeout=20)
    assert versions["host"] == "h3" and "h3 0.0.9" in versions["message"]
    assert versions["fix"] == f"on h3: upgrade fenceless to {fenceless.__version__}, then " \
        "fenceless guard install (its wrapper names the version), then systemctl restart " \
        "fenceless-agent"
    run_fix(lab, "on h3: fenceless guard install")  # (the upgrade is to run this one)
    run_fix(lab, "on h3: systemctl restart fenceless-agent")
    gone(lab, "h2", "W_VERSIONS", timeout=20)
    wait_until(lambda: healthy(lab, "h1"), 20, "healthy again")


def test_a_second_pv_and_metadata_copies_that_disagree_are_found_and_fixed(make_lab):
    """E_PV_UNLISTED, W_MDA_PVS and E_MDA_COPIES: a second LUN added to the VG by hand.

    (No guard here: the lab's second LUN is a shared VG of its own in every host's
    config, so the guard rightly refuses a command naming a device unless this host
    writes both VGs; tests/integration/test_guard*.py cover what it lets through.)"""
    from fenceless.blockio import open_device

    lab = make_lab(2, "--agents", "--vg", "sanvg", "--vg", "spare")
    lab.on("h1", "init", "--vg", "sanvg")
    lab.on("h2", "join", "--vg", "sanvg")
    wait_until(lambda: all(h["lease"] == "live" for h in json.loads(lab.on(
        "h2", "status", "--vg", "sanvg", "--json").stdout)["hosts"]), 20, "all live")
    spare = {h: lab.device(h, "spare") for h in lab.hosts}

    def check(host: str) -> list[dict]:
        res = lab.exec(host, "fenceless", "check", "--vg", "sanvg", "--json", check=False)
        assert res.returncode in (0, 6), res.stderr
        return json.loads(res.stdout)["findings"]

    def of(host: str, code: str) -> list[dict]:
        return [f for f in check(host) if f["code"] == code]

    # The other LUN added to sanvg on the writer: the configs list one device for sanvg.
    lab.exec("h1", "vgextend", "-q", "sanvg", spare["h1"])
    (unlisted,) = of("h2", "E_PV_UNLISTED")
    assert unlisted["message"].startswith(f"VG sanvg has 2 PVs, but the device(s) this "
                                          f"host's config lists ({lab.device('h2')}) hold 1")
    assert "or add it after the first device in devices of [vg.sanvg] in each host's " \
        "fenceless.toml" in unlisted["fix"]
    # Its second fix: each host's config lists both LUNs for sanvg.
    configs = {h: Path(lab.config(h)).read_text() for h in lab.hosts}
    for h in lab.hosts:
        text = configs[h].split("[vg.spare]")[0].replace(
            f'devices = ["{lab.device(h)}"]', f'devices = ["{lab.device(h)}", "{spare[h]}"]')
        Path(lab.config(h)).write_text(text)
    assert of("h2", "E_PV_UNLISTED") == []
    (two,) = of("h2", "W_MDA_PVS")

    # An old copy: the second PV's metadata area put back as it was before a change.
    dev = open_device(spare["h1"], writable=True)
    try:
        before = dev.read(0, 1 << 20)
        lab.exec("h1", "lvcreate", "-q", "-an", "-Zn", "-L", "4m", "-n", "by-hand", "sanvg")
        dev.write(0, before)
    finally:
        dev.close()
    (copies,) = of("h2", "E_MDA_COPIES")
    assert "the metadata copies of VG sanvg disagree" in copies["message"]
    assert f"{spare['h2']} seqno" in copies["message"]
    assert copies["fix"] == "on the writer: vgck --updatemetadata sanvg"
    run_fix(lab, copies["fix"])
    assert of("h2", "E_MDA_COPIES") == []

    # W_MDA_PVS's fix: the second PV out of the VG (no LV uses it), and out of the configs.
    assert "vgreduce" in two["fix"]
    lab.exec("h1", "vgreduce", "-q", "sanvg", spare["h1"])
    for h in lab.hosts:
        Path(lab.config(h)).write_text(configs[h])
    assert {f["code"] for f in check("h2")} & {"W_MDA_PVS", "E_PV_UNLISTED",
                                                "E_MDA_COPIES"} == set()
