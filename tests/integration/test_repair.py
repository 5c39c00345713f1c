"""`fenceless repair ledger` in a real lab: both ledger slots overwritten with foreign
bytes, the plan shown (nothing written), then the repair, after which the cluster works
again with its hosts, its VMs where they ran, and the damaged bytes kept."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from tests.integration.test_check import codes, findings
from tests.integration.test_cluster import _corrupt, _read_abs, wait_until
from tests.integration.test_volumes import volume_lab
from tests.unit.test_domain import WEB

pytestmark = pytest.mark.lab

DB = WEB.replace("web01", "db01").replace("vm-web01", "vm-db01")
GONE = WEB.replace("web01", "gone01").replace("vm-web01", "vm-gone01")


def test_a_ledger_with_no_valid_slot_is_rebuilt_from_the_rest_of_the_lun(make_lab, tmp_path):
    lab = volume_lab(make_lab)
    for name, size in (("vm-web01", "16M"), ("debian-12-iso", "8M"), ("vm-db01", "16M"),
                       ("vm-gone01", "8M")):
        lab.on("h2", "volume", "create", name, size)
    for name, xml in (("web01", WEB), ("db01", DB), ("gone01", GONE)):
        path = tmp_path / f"{name}.xml"
        path.write_text(xml)
        lab.on("h3", "vm", "define", name, "--xml", str(path))
    lab.on("h3", "vm", "undefine", "gone01")
    # web01's disk mapped read-write on h2 by hand: the claims record shows where it runs.
    from tests.conftest import cli

    cli("lab", "activate", "--by-hand", "--dir", str(lab.dir), "h2", "vm-web01")
    wait_until(lambda: ("E_VM_LEASE", "h2") in codes(findings(lab, "h1")[1]), 15,
               "h2's claim on vm-web01")

    rng = random.Random(11)
    damaged = [_corrupt(lab, "h1", (slot, 0), lambda old: rng.randbytes(4096))
               for slot in ("ledger_a", "ledger_b")]
    res = lab.on("h2", "status", check=False)
    assert res.returncode == 4 and "Ledger has no valid slot" in res.stderr
    assert "`fenceless repair ledger` shows how it would rebuild it" in res.stderr
    unread = [f for f in findings(lab, "h2")[1] if f["code"] == "E_UNREADABLE"]
    assert unread and all(f["fix"].startswith("on the writer: fenceless repair ledger")
                          for f in unread)

    # The writer dies too: another host takes the role over a ledger it cannot write
    # (the lease makes the writer), so that it can repair it.
    from tests.integration.test_cluster import agent

    agent(lab, "h1", "kill")
    lab.on("h2", "writer", "takeover", "--wait", "--timeout", "60")
    # Only the writer repairs.
    res = lab.on("h3", "repair", "ledger", check=False)
    assert res.returncode == 2 and "h2 is, epoch 2" in res.stderr, res.stderr
    # The plan: nothing written.
    plan = json.loads(lab.on("h2", "repair", "ledger", "--json").stdout)
    assert plan["applied"] is False
    for off, data in damaged:
        assert _read_abs(lab, "h1", off) == data
    assert plan["hosts"] == {"1": "h1", "2": "h2", "3": "h3"} and plan["mode"] == "rebuild"
    assert {v["name"]: (v["host"], v["state"]) for v in plan["vms"]} == {
        "web01": ("h2", "running"), "db01": (None, "stopped")}
    assert any(x.startswith("VM gone01 (version 3): undefined") for x in plan["left_out"])
    text = lab.on("h2", "repair", "ledger").stdout
    assert "Would write a ledger (rebuilt from the rest of the LUN) at writer epoch 2" in text
    assert f"--yes --plan {plan['plan']}` to write it" in text
    res = lab.on("h2", "repair", "ledger", "--yes", check=False)  # which plan?
    assert res.returncode == 2 and "--plan ID" in res.stderr

    done = json.loads(lab.on("h2", "repair", "ledger", "--yes", "--plan", plan["plan"],
                             "--json").stdout)
    assert done["applied"] is True
    kept = Path(done["kept"]).read_bytes()
    for i, (_off, data) in enumerate(damaged):
        assert kept[i * (len(kept) // 2):][:4096] == data  # the damaged bytes, kept

    # The cluster works again: status, the VMs where they were, a new change.
    st = json.loads(lab.on("h3", "status", "--json").stdout)
    assert st["ledger"]["problems"] == [] and st["writer"]["host"] == "h2"
    vms = {v["name"]: v for v in json.loads(lab.on("h3", "vm", "list", "--json").stdout)}
    assert set(vms) == {"web01", "db01"} and vms["web01"]["host"] == "h2"
    lab.on("h3", "volume", "create", "after-repair", "8M", "--timeout", "30")
    assert "E_UNREADABLE" not in {f["code"] for f in findings(lab, "h2")[1]}
    log = json.loads(lab.on("h3", "log", "--json").stdout)
    rows = [(" ".join(e["command"]), e["result"]) for e in log][-3:]
    asked = f"fenceless repair ledger --yes --plan {plan['plan']}"
    assert rows == [(asked, "started"), (asked, "ok"),
                    ("fenceless volume create after-repair 8M", "ok")]
    # Asked again: the ledger reads, nothing to repair.
    res = lab.on("h2", "repair", "ledger", check=False)
    assert res.returncode == 4 and "the ledger reads" in res.stderr
    agent(lab, "h1", "start")  # and the old writer comes back as a reader
