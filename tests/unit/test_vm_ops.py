"""Definition changes on the writer (ops/vm.apply): checks, slots, versions, history."""

from __future__ import annotations

import pytest

from fenceless.hv.domain import BadDefinition
from fenceless.ledger import vmstore
from fenceless.ledger.state import LedgerState, RequestInfo
from fenceless.ops import vm
from tests.unit.test_domain import WEB

VG = "sanvg"


class Store(vm.VmStorePort):
    """Uploads and slots in dicts; the volumes the VG has."""

    def __init__(self, slots: int = 8) -> None:
        self.uploads: dict[int, tuple[str, str]] = {}
        self.written: dict[int, tuple[str, str, int]] = {}
        self.lvs = {"vm-web01", "debian-12-iso", "vm-db01"}
        super().__init__(self.stage, self.write, slots, lambda: set(self.lvs))

    def stage(self, host_id: int, name: str, sha: str) -> str:
        got = self.uploads.get(host_id)
        if got is None or got[0] != name or vmstore.digest(got[1]) != sha:
            raise vmstore.StageMismatch(host_id=host_id, name=name, detail="test")
        return got[1]

    def write(self, slot: int, name: str, xml: str, seq: int) -> None:
        self.written[slot] = (name, xml, seq)

    def upload(self, host_id: int, xml: str, name: str = "web01") -> str:
        self.uploads[host_id] = (name, xml)
        return vmstore.digest(xml)


def define(state, store, xml=WEB, *, name="web01", replace=False, host_id=2):
    sha = store.upload(host_id, xml, name)
    req = RequestInfo("r1", "vm-define", {"name": name, "sha": sha, "replace": replace,
                                          "source": "xml"})
    return vm.apply(state, req, host_id, VG, 7, store, now_ms=lambda: 1000)


def test_define_writes_a_slot_and_indexes_it():
    store = Store()
    state, result = define(LedgerState(), store)
    web = state.vms["web01"]
    assert (web.slot, web.seq, web.epoch, web.state, web.host) == (0, 1, 7, "stopped", None)
    assert [d.to_json() for d in web.disks] == [["vda", "vm-web01", "rw"],
                                                ["vdb", "debian-12-iso", "ro"]]
    assert store.written[0] == ("web01", WEB, 1)
    assert result["version"] == 1 and state.vm_seq == 1


def test_an_edit_takes_a_new_slot_and_keeps_the_earlier_version():
    store = Store()
    state, _ = define(LedgerState(), store)
    edited = WEB.replace("<vcpu>2</vcpu>", "<vcpu>4</vcpu>")
    state, result = define(state, store, edited, replace=True)
    web = state.vms["web01"]
    assert (web.slot, web.seq, web.vcpus) == (1, 2, 4) and result["edited"]
    assert [(h.seq, h.slot, h.action) for h in state.vm_history] == [(1, 0, "edit")]


def test_slots_of_earlier_versions_are_reused_oldest_first_when_none_is_free():
    store = Store(slots=2)
    state, _ = define(LedgerState(), store)
    for vcpus in (3, 4):
        state, _ = define(state, store, WEB.replace("<vcpu>2", f"<vcpu>{vcpus}"),
                          replace=True)
    assert state.vms["web01"].slot == 0 and state.vms["web01"].seq == 3
    assert [(h.seq, h.slot) for h in state.vm_history] == [(2, 1)]


@pytest.mark.parametrize("kw,error,match", [
    ({"name": "web02"}, vm.VmNameMismatch, "names VM web01, not web02"),
    ({"replace": True}, vm.NoSuchVm, "no VM named web01"),
    ({"xml": WEB.replace("vm-web01", "gone")}, vm.MissingVolume,
     "volume gone, which VG sanvg does not have"),
    ({"xml": "<domain>"}, BadDefinition, "malformed"),
])
def test_a_refused_define_writes_nothing(kw, error, match):
    store = Store()
    with pytest.raises(error, match=match):
        define(LedgerState(), store, **kw)
    assert store.written == {}


def test_a_taken_name_is_refused():
    store = Store()
    state, _ = define(LedgerState(), store)
    with pytest.raises(vm.VmExists, match="vm edit web01"):
        define(state, store)


def test_an_upload_that_is_not_the_requested_one_is_refused():
    store = Store()
    req = RequestInfo("r1", "vm-define", {"name": "web01", "sha": "0" * 64})
    store.upload(2, WEB)
    with pytest.raises(vmstore.StageMismatch):
        vm.apply(LedgerState(), req, 2, VG, 7, store)


DB = WEB.replace("web01</name>", "db01</name>")


@pytest.mark.parametrize("change,ok", [
    (("vm-web01", "vm-db01"), True),  # its own disk
    (("/dev/sanvg/vm-db01'/>", "/dev/sanvg/vm-web01'/>"), False),  # web01's rw disk
])
def test_a_read_write_disk_belongs_to_one_vm_and_read_only_ones_are_shared(change, ok):
    store = Store()
    state, _ = define(LedgerState(), store)
    db = DB.replace("/dev/sanvg/vm-web01'/>", "/dev/sanvg/vm-db01'/>")
    if not ok:
        db = db.replace(*change)
    if ok:
        state, _ = define(state, store, db, name="db01")  # shares debian-12-iso read-only
        assert vm.users_of("debian-12-iso", state.vms) == ["db01", "web01"]
    else:
        with pytest.raises(vm.DiskTaken, match="read-write disk of VM web01"):
            define(state, store, db, name="db01")


def test_undefine_keeps_the_last_version_in_the_history_and_refuses_a_running_vm():
    store = Store()
    state, _ = define(LedgerState(), store)
    running = state.vms["web01"].__class__(**{**state.vms["web01"].__dict__,
                                              "state": "running", "host": "h2"})
    busy = LedgerState(vms={"web01": running})
    req = RequestInfo("r2", "vm-undefine", {"name": "web01"})
    with pytest.raises(vm.VmNotStopped, match="running on h2"):
        vm.apply(busy, req, 2, VG, 7, store)
    state, result = vm.apply(state, req, 2, VG, 7, store)
    assert state.vms == {} and result["undefined"]
    assert [(h.name, h.action) for h in state.vm_history] == [("web01", "undefine")]
    with pytest.raises(vm.NoSuchVm):
        vm.apply(state, req, 2, VG, 7, store)


def place(state, store, host, action, **args):
    req = RequestInfo("r", "vm-place", {"name": "web01", "host": host, "action": action,
                                        **args})
    return vm.apply(state, req, 2, VG, 7, store, now_ms=lambda: 1000)[0]


def test_a_move_is_asked_for_then_done_by_the_two_hosts_in_turn():
    from fenceless.ledger.state import HostEntry

    store = Store()
    state, _ = define(LedgerState(hosts={i: HostEntry(f"h{i}", 1) for i in (1, 2, 3)}), store)
    with pytest.raises(vm.VmNotRunningThere):  # a migration moves a running VM
        place(state, store, "h2", "want", move=True)
    state = place(state, store, "h1", "start")
    with pytest.raises(vm.VmRunningElsewhere, match="on h1 since"):  # a start is no move
        place(state, store, "h2", "want")
    with pytest.raises(vm.NoSuchHost, match="hosts: h1, h2, h3"):
        place(state, store, "h9", "want", move=True)
    state = place(state, store, "h2", "want", move=True)
    assert state.vms["web01"].want == "h2"
    with pytest.raises(vm.WantedElsewhere):
        place(state, store, "h3", "want", move=True)
    state = place(state, store, "h1", "stop")  # h1's agent hands it off
    assert (state.vms["web01"].state, state.vms["web01"].want) == ("stopped", "h2")
    state = place(state, store, "h2", "start")  # h2's agent takes it
    assert (state.vms["web01"].host, state.vms["web01"].want) == ("h2", None)


def test_a_move_that_cannot_happen_is_abandoned_with_its_reason():
    store = Store()
    state, _ = define(LedgerState(), store)
    state = place(state, store, "h1", "start")
    state = vm.replace(state, vms={"web01": vm.replace(state.vms["web01"], want="h2")})
    state = place(state, store, "h1", "abandon", error="h1: did not shut down")
    web = state.vms["web01"]
    assert (web.want, web.error, web.host) == (None, "h1: did not shut down", "h1")


def test_only_a_host_itself_takes_or_gives_back_its_grant():
    store = Store()
    state, _ = define(LedgerState(), store)
    state = place(state, store, "h1", "start")
    req = RequestInfo("r", "vm-place", {"name": "web01", "host": "h1", "action": "stop"})
    with pytest.raises(vm.NotYourHost, match="h3 cannot stop a grant for h1"):
        vm.apply(state, req, 3, VG, 7, store, requester="h3")
    assert vm.apply(state, req, 1, VG, 7, store, requester="h1")[0].vms["web01"].host is None


def test_the_disks_of_a_running_vm_do_not_change_but_the_rest_may():
    store = Store()
    state, _ = define(LedgerState(), store)
    state = place(state, store, "h1", "start")
    with pytest.raises(vm.DisksOfRunningVm, match="runs on h1"):
        define(state, store, WEB.replace("/dev/sanvg/vm-web01", "/dev/sanvg/vm-db01"),
               replace=True)
    state, _ = define(state, store, WEB.replace("<vcpu>2", "<vcpu>3"), replace=True)
    web = state.vms["web01"]
    assert (web.vcpus, web.host, web.state, web.since_ms) == (3, "h1", "running", 1000)


def three_hosts(store):
    from fenceless.ledger.state import HostEntry

    state, _ = define(LedgerState(hosts={i: HostEntry(f"h{i}", 1) for i in (1, 2, 3)}), store)
    return place(state, store, "h1", "start")


def test_a_live_migration_is_recorded_step_by_step_and_the_source_releases_last():
    store = Store()
    state = three_hosts(store)
    with pytest.raises(vm.NotAskedHere, match="no live migration to this host"):
        place(state, store, "h2", "migrate-begin")  # nobody asked for it
    state = place(state, store, "h2", "want", move=True, live=True)
    assert (state.vms["web01"].want, state.vms["web01"].want_live) == ("h2", True)
    with pytest.raises(vm.NotAskedHere):
        place(state, store, "h3", "migrate-begin")  # asked of h2, not h3
    state = place(state, store, "h2", "migrate-begin")
    web = state.vms["web01"]
    assert (web.state, web.host, web.moving_to) == ("migrating", "h1", "h2")
    for action, host in (("stop", "h1"), ("start", "h3"), ("want", "h3")):
        with pytest.raises(vm.VmBeingMigrated, match="from h1 to h2"):
            place(state, store, host, action, move=True)
    with pytest.raises(vm.NotAskedHere):
        place(state, store, "h3", "migrate-done")
    state = place(state, store, "h2", "migrate-done")
    web = state.vms["web01"]
    assert (web.state, web.host, web.moving_to, web.want, web.left) == (
        "running", "h2", None, None, "h1")
    with pytest.raises(vm.NotAskedHere, match="h1 has not yet unmapped"):
        place(state, store, "h3", "want", move=True, live=True)  # h1 holds the disks still
    with pytest.raises(vm.NotAskedHere):
        place(state, store, "h3", "released")
    state = place(state, store, "h1", "released")
    assert state.vms["web01"].left is None
    assert vm.VmEntry.from_json("web01", state.vms["web01"].to_json(), "t") == state.vms["web01"]


def test_a_live_migration_called_off_leaves_the_vm_where_it_ran():
    store = Store()
    state = place(three_hosts(store), store, "h2", "want", move=True, live=True)
    state = place(state, store, "h2", "migrate-begin")
    moving = state.vms["web01"]
    assert vm.VmEntry.from_json("web01", moving.to_json(), "t") == moving
    with pytest.raises(vm.NotAskedHere):
        place(state, store, "h3", "migrate-abort", error="x")  # not part of it
    state = place(state, store, "h2", "migrate-abort", error="h2: transfer failed")
    web = state.vms["web01"]
    assert (web.state, web.host, web.moving_to, web.want, web.error, web.left) == (
        "running", "h1", None, None, "h2: transfer failed", None)


def test_a_live_migration_begins_only_from_a_live_source_with_no_third_holder():
    store = Store()
    state = place(three_hosts(store), store, "h2", "want", move=True, live=True)
    store.host_state = lambda host: "fail" if host == "h1" else "live"
    with pytest.raises(vm.NotAskedHere, match="its host h1 is fail"):
        place(state, store, "h2", "migrate-begin")
    store.host_state = lambda host: "live"
    store.claims = lambda lv: [("h1", "rw"), ("h3", "rw")] if lv == "vm-web01" else []
    with pytest.raises(vm.DiskHeldElsewhere, match="active read-write on h3"):
        place(state, store, "h2", "migrate-begin")
    store.claims = lambda lv: [("h1", "rw")] if lv == "vm-web01" else []
    assert place(state, store, "h2", "migrate-begin").vms["web01"].moving_to == "h2"


def test_only_the_writers_adopt_records_where_an_adopted_vm_runs():
    store = Store()
    state, _ = define(LedgerState(), store)
    req = RequestInfo("r", "vm-place", {"name": "web01", "host": "h2", "action": "adopt"})
    with pytest.raises(vm.AdoptOnWriterOnly, match="h3 asked for h2"):
        vm.apply(state, req, 3, VG, 7, store, requester="h3", writer="h1")
    state, res = vm.apply(state, req, 1, VG, 7, store, requester="h1", writer="h1")
    assert (state.vms["web01"].host, state.vms["web01"].state, res["adopted"]) == (
        "h2", "running", True)
    again, _ = vm.apply(state, req, 1, VG, 7, store, requester="h1", writer="h1")
    assert again == state  # a second adopt run changes nothing
    other = RequestInfo("r", "vm-place", {"name": "web01", "host": "h3", "action": "adopt"})
    with pytest.raises(vm.VmAlreadyRunning, match="on h2"):
        vm.apply(state, other, 1, VG, 7, store, requester="h1", writer="h1")


def test_a_start_on_the_source_of_a_live_migration_takes_over_its_mapped_disks():
    store = Store()
    state = place(three_hosts(store), store, "h2", "want", move=True, live=True)
    state = place(place(state, store, "h2", "migrate-begin"), store, "h2", "migrate-done")
    state = place(state, store, "h2", "stop")
    assert state.vms["web01"].left == "h1"
    store.claims = lambda lv: [("h1", "rw")] if lv == "vm-web01" else []
    with pytest.raises(vm.DiskHeldElsewhere, match="on h1"):
        place(state, store, "h3", "start")  # h1 still has the disk mapped
    state = place(state, store, "h1", "start")
    assert (state.vms["web01"].host, state.vms["web01"].left) == ("h1", None)


def test_a_grant_names_its_holders_host_id_and_generation_and_a_return_clears_them():
    store = Store()
    store.holder = lambda host: {"h1": (1, 4), "h2": (2, 9)}.get(host, (0, 0))
    state, _ = define(LedgerState(), store)
    state = place(state, store, "h1", "start")
    web = state.vms["web01"]
    assert (web.holder_id, web.holder_gen, web.since_epoch) == (1, 4, 7)
    assert vm.VmEntry.from_json("web01", web.to_json(), "t") == web
    state = place(state, store, "h1", "stop")
    assert (state.vms["web01"].holder_id, state.vms["web01"].holder_gen) == (0, 0)


def test_only_a_dead_targets_migration_is_called_off_by_its_source():
    store = Store()
    state = place(three_hosts(store), store, "h2", "want", move=True, live=True)
    state = place(state, store, "h2", "migrate-begin")
    with pytest.raises(vm.NotAskedHere, match="its target h2 is live, not DEAD"):
        place(state, store, "h1", "migrate-abort", error="x")
    store.host_state = lambda host: "dead" if host == "h2" else "live"
    web = place(state, store, "h1", "migrate-abort", error="h2 died").vms["web01"]
    assert (web.host, web.state, web.moving_to) == ("h1", "running", None)


def test_disks_still_mapped_by_a_migrations_source_keep_the_definition():
    store = Store()
    state = place(three_hosts(store), store, "h2", "want", move=True, live=True)
    state = place(place(state, store, "h2", "migrate-begin"), store, "h2", "migrate-done")
    state = place(state, store, "h2", "stop")
    req = RequestInfo("u", "vm-undefine", {"name": "web01"})
    with pytest.raises(vm.DisksStillMapped, match="h1 has VM web01's disks mapped"):
        vm.apply(state, req, 2, VG, 7, store)
    with pytest.raises(vm.DisksStillMapped):
        define(state, store, WEB.replace("/dev/mapper/sanvg-debian--12--iso",
                                         "/dev/sanvg/vm-db01"), replace=True)
    store.host_state = lambda host: "dead" if host == "h1" else "live"  # its claims void
    assert "web01" not in vm.apply(state, req, 2, VG, 7, store)[0].vms


def test_a_host_that_runs_no_vms_is_not_asked_to():
    store = Store()
    from fenceless.ledger.state import HostEntry

    state, _ = define(LedgerState(), store)
    state = vm.replace(state, hosts={1: HostEntry("h1", 1), 3: HostEntry("h3", 1)})
    store.runs_vms = lambda host: host != "h3"
    with pytest.raises(vm.NoVmsThere, match="h3 runs no VMs"):
        place(state, store, "h3", "want")
    assert place(state, store, "h1", "want").vms["web01"].want == "h1"


def test_a_command_waits_out_a_brief_hold_of_the_vm_lock_but_not_a_long_one(tmp_path):
    """The agent's look at a VM holds this host's lock on it for a moment: a `vm stop`
    then must not be refused (it was, now and then, in CI). A command that holds it for
    longer than the wait still refuses the second one."""
    import threading

    from fenceless.localstate import VmBusyHere, vm_lock

    held, release = threading.Event(), threading.Event()

    def holder() -> None:
        with vm_lock(str(tmp_path), "web", wait=False):
            held.set()
            release.wait(5)

    t = threading.Thread(target=holder)
    t.start()
    held.wait(5)
    with pytest.raises(VmBusyHere), vm_lock(str(tmp_path), "web", wait=False):
        pass
    with pytest.raises(VmBusyHere), vm_lock(str(tmp_path), "web", wait=0.2):
        pass
    threading.Timer(0.2, release.set).start()
    with vm_lock(str(tmp_path), "web", wait=5.0):  # the holder lets go meanwhile
        pass
    t.join()
