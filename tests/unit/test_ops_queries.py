"""ops.queries: volume list/show from given readers (no LVM, no LUN)."""

from __future__ import annotations

import pytest

from fenceless.config import HostConfig, VgConfig
from fenceless.errors import ExecError, NotFound
from fenceless.ops.queries import active_on, volume_list, volume_show

CFG = HostConfig(path="/etc/fenceless/fenceless.toml", host="h1", state_dir="/run/fenceless",
                 io_timeout=1.0, vgs=(VgConfig("sanvg", ("/dev/sdx",)),))

VOLS = [{"name": "a", "size_bytes": 1 << 30, "shared_ro": False},
        {"name": "img", "size_bytes": 8 << 30, "shared_ro": True}]


def report():
    return [dict(v) for v in VOLS]


def host(hid, name, claims, lease="live"):
    entry = {"id": hid, "name": name, "lease": lease, "facts": {"lvm_role": "reader"}}
    if claims is not ...:
        entry["claims"] = claims
    return entry


STATUS = {"hosts": [host(1, "h1", {"a": {"size_bytes": 1, "mode": "rw"}}),
                    host(2, "h2", None),
                    host(3, "h3", {"img": {}, "a": {}}),
                    host(4, "h4", ...),
                    host(5, "h5", {"img": {}}),
                    host(6, "h6", {"img": {}}, lease="dead")]}


def test_active_on_reads_the_hosts_claims_and_not_a_dead_ones():
    assert active_on(STATUS, "a") == ["h1", "h3"]
    assert active_on(STATUS, "img") == ["h3", "h5"]
    assert active_on(STATUS, "nope") == []
    assert active_on({"hosts": []}, "a") == []


def test_volume_list_is_the_report():
    assert volume_list(CFG, None, report=report) == VOLS


def test_show_adds_where_the_volume_is_active():
    got = volume_show(CFG, None, "img", report=report, read_status=lambda: STATUS)
    assert got == {"name": "img", "size_bytes": 8 << 30, "shared_ro": True,
                   "active_on": ["h3", "h5"]}


def test_show_of_a_missing_volume_is_not_found_in_the_vg():
    with pytest.raises(NotFound) as exc:
        volume_show(CFG, None, "gone", report=report,
                    read_status=lambda: pytest.fail("no status read for a missing volume"))
    assert str(exc.value) == "volume 'gone' not found in VG sanvg"
    assert exc.value.exit_code == 2


def test_show_without_a_readable_status_leaves_active_on_out():
    def unreadable():
        raise ExecError(detail="I/O error")

    got = volume_show(CFG, "sanvg", "a", report=report, read_status=unreadable)
    assert got == VOLS[0]
    assert "active_on" not in got


def test_show_does_not_hide_a_bug_in_the_status_read():
    def buggy():
        raise KeyError("hosts")

    with pytest.raises(KeyError):
        volume_show(CFG, None, "a", report=report, read_status=buggy)


def test_a_cluster_made_before_claims_had_a_region_publishes_them_as_facts():
    old = {"hosts": [{"id": 1, "name": "h1", "lease": "live", "facts": {"active": {"a": 1}}}]}
    assert active_on(old, "a") == ["h1"]
