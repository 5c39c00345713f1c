"""Metadata history, restore and the audit log on the LUN, on a lab with real agents."""

from __future__ import annotations

import json
import subprocess

import pytest

from fenceless.lvm.mda import vg_section
from fenceless.ops.metadata import changed_lvs, lv_blocks
from tests.conftest import cli
from tests.integration.test_volumes import vgck, volumes

pytestmark = pytest.mark.lab


@pytest.fixture
def mlab(make_lab):
    from tests.integration.test_cluster import all_live, wait_until

    lab = make_lab(3, "--agents")
    lab.on("h1", "init")
    for h in ("h2", "h3"):
        lab.on(h, "join")
    wait_until(lambda: all_live(lab, "h1", lab.hosts), 20, "all live")
    return lab


def test_every_change_is_in_history_and_in_the_audit_log(mlab):
    lab = mlab
    lab.on("h3", "volume", "create", "a", "8M")
    lab.on("h2", "volume", "create", "b", "8M")
    lab.on("h3", "volume", "extend", "a", "+4M")
    refused = lab.on("h2", "volume", "remove", "nope", check=False)
    assert refused.returncode == 2
    hist = json.loads(lab.on("h2", "metadata", "history", "--json").stdout)
    seqnos = [h["seqno"] for h in hist]
    current = json.loads(lab.on("h2", "scan", "--json").stdout)["vg"]["seqno"]
    assert seqnos[0] == current and len(seqnos) == 3
    text = lab.on("h3", "metadata", "show", str(current)).stdout
    assert set(lv_blocks(text)) == {"fenceless-ctl", "a", "b"}
    diff = lab.on("h3", "metadata", "diff", str(seqnos[1]), str(seqnos[0])).stdout
    assert f"-seqno = {seqnos[1]}" in diff and f"+seqno = {seqnos[0]}" in diff
    log = json.loads(lab.on("h1", "log", "--json").stdout)
    rows = [(e["host"], " ".join(e["command"]), e["result"]) for e in log]
    assert rows == [
        ("h3", "fenceless volume create a 8M", "ok"),
        ("h2", "fenceless volume create b 8M", "ok"),
        ("h3", "fenceless volume extend a +4M", "ok"),
        ("h2", "fenceless volume remove nope", "refused"),
    ]
    assert all(e["epoch"] == 1 and e["user"] for e in log)


def test_restore_from_history_yields_the_stored_metadata(mlab):
    lab = mlab
    lab.on("h3", "volume", "create", "keep", "8M")
    lab.on("h3", "volume", "create", "gone", "8M")
    target = max(h["seqno"] for h in json.loads(lab.on("h1", "metadata", "history",
                                                       "--json").stdout))
    stored = lab.on("h1", "metadata", "show", str(target)).stdout
    lab.on("h3", "volume", "remove", "gone")
    lab.on("h3", "volume", "create", "new", "8M")
    # Only the writer restores; it is a dry run unless --yes.
    res = lab.on("h2", "metadata", "restore", str(target), check=False)
    assert res.returncode == 2 and "not the metadata writer" in res.stderr
    dry = json.loads(lab.on("h1", "metadata", "restore", str(target), "--json").stdout)
    assert dry["applied"] is False and dry["changes"] == ["gone", "new"]
    assert set(volumes(lab, "h2")) == {"keep", "new"}
    # Refused while an LV it would change is active somewhere.
    cli("lab", "activate", "--dir", str(lab.dir), "h2", "new")
    busy = lab.on("h1", "metadata", "restore", str(target), "--yes", check=False)
    assert busy.returncode == 2 and "new is active on h2" in busy.stderr
    cli("lab", "deactivate", "--dir", str(lab.dir), "h2", "new")
    done = json.loads(lab.on("h1", "metadata", "restore", str(target), "--yes",
                             "--json").stdout)
    assert done["applied"] and done["new_seqno"] > dry["current_seqno"]
    assert set(volumes(lab, "h3")) == {"keep", "gone"}
    now = lab.on("h1", "metadata", "show", str(done["new_seqno"])).stdout
    assert lv_blocks(now) == lv_blocks(stored)
    assert changed_lvs(stored, now) == []
    assert vg_section(now).name == vg_section(stored).name
    vgck(lab, "h1")


@pytest.mark.slow
def test_a_restore_is_journaled_and_the_next_writer_finishes_it(mlab):
    """kill -9 the writer around its vgcfgrestore: the next writer finishes the restore
    exactly once (never twice, never lost) and records it; a retry by id tells the outcome."""
    from tests.conftest import CLI
    from tests.integration.test_cluster import all_live, status, wait_until
    from tests.integration.test_volumes import ledger_state

    lab = mlab
    for step in ("journaled", "applied"):
        lab.on("h3", "volume", "create", f"keep-{step}", "8M")
        lab.on("h3", "volume", "create", f"back-{step}", "8M")
        target = json.loads(lab.on("h3", "scan", "--json").stdout)["vg"]["seqno"]
        lab.on("h3", "volume", "remove", f"back-{step}")
        before = json.loads(lab.on("h3", "scan", "--json").stdout)["vg"]["seqno"]
        writer = status(lab, "h3")["writer"]["host"]
        survivor = next(h for h in ("h1", "h2") if h != writer)
        cli("lab", "agent", "--dir", str(lab.dir), writer, "stop")
        cli("lab", "agent", "--dir", str(lab.dir), writer, "start",
            env={"FENCELESS_CRASHPOINT": f"volume.restore.{step}"})
        lab.on(writer, "writer", "takeover", "--wait")
        rid = f"restore-{step}"
        died = subprocess.run([*CLI, "-c", lab.config(writer), "metadata", "restore",
                               str(target), "--yes", "--request-id", rid],
                              check=False, capture_output=True, text=True, timeout=120)
        assert died.returncode != 0, "the agent died at the crash point"
        lab.on(survivor, "writer", "takeover", "--wait")
        # The new writer reconciles right after it takes the role.
        state = wait_until(lambda: (s := ledger_state(lab, "h3"))["intents"] == {} and s, 30,
                           "the journaled restore reconciled")
        outcome = state["requests"][rid]
        assert outcome["status"] == "ok", outcome
        assert outcome["result"]["new_seqno"] == before + 1, "restored exactly once"
        assert {f"keep-{step}", f"back-{step}"} <= set(volumes(lab, "h2"))
        # Asked again by id, the new writer answers from the record.
        again = json.loads(lab.on(survivor, "metadata", "restore", str(target), "--yes",
                                  "--request-id", rid, "--json").stdout)
        assert again["applied"] and again["new_seqno"] == before + 1
        assert json.loads(lab.on("h3", "scan", "--json").stdout)["vg"]["seqno"] == before + 1
        log = json.loads(lab.on("h3", "log", "--json").stdout)
        assert [e["result"] for e in log if e["request_id"] == rid] == ["ok"]
        hist = json.loads(lab.on("h3", "metadata", "history", "--json").stdout)
        assert [h["seqno"] for h in hist if h["request_id"] == rid] == [before + 1]
        vgck(lab, survivor)
        cli("lab", "agent", "--dir", str(lab.dir), writer, "start")
        wait_until(lambda: all_live(lab, "h3", lab.hosts), 30, "all live again")
