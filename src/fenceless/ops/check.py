"""``fenceless check``: every known hazard of the cluster, each with the command that fixes it.

The setup fenceless replaces is safe only while everybody remembers its rules;
this makes the rules visible instead. As in a cluster verify, every check is a
small read-only function registered under a stable code; it looks at what
``gather`` read once (the control area with every host's claims and facts, the
VM index, LVM's ``--readonly`` report of the VG, this host's guard) and returns
findings: (code, severity, host, plain explanation, exact fix). A new hazard is
one function and one test. Nothing here writes anything, runs a metadata
command or trusts a cached view: the control area is read fresh.

Codes start with the severity they have by default: ``E`` (error: the cluster
is unsafe or broken now), ``W`` (warning: unsafe soon, or by one more
mistake), ``I`` (information).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from fenceless.config import HostConfig
from fenceless.errors import FencelessError
from fenceless.ledger.slots import LedgerUnreadable
from fenceless.ledger.state import LedgerState
from fenceless.lvm.parse import LvInfo, PvInfo, VgInfo, metadata_area_use
from fenceless.lvm.policy import CONTROL_LV

SEVERITIES = ("error", "warning", "info")
REQ_TAG = "fenceless_req_"  # ops/volume.py: every LV fenceless creates carries one
MDA_WARN, MDA_ERROR = 0.5, 0.8  # share of the metadata area in use
REPAIR_LEDGER = ("on the writer: fenceless repair ledger (it shows what it would write), then "
                 "fenceless repair ledger --yes")
MISSING_PV = "[unknown]"
BIG_TAGS = 4096  # bytes of tags that make an LV's metadata text stand out
LATE_N = 6  # the writer's host lease unchanged this many N: late (sanlock warns at 6N)


@dataclass(frozen=True)
class Finding:
    code: str
    severity: str
    host: str | None
    message: str
    fix: str


@dataclass
class Facts:
    """What the checks look at, read once by ``gather``; None where it could not be read
    (``unread`` says why, and is itself a finding)."""

    cfg: HostConfig
    vg_name: str
    status: dict[str, Any] | None = None
    ledger: LedgerState | None = None
    vg: VgInfo | None = None
    lvs: list[LvInfo] | None = None
    autoactivation: bool | None = None
    guard: dict[str, Any] | None = None  # this host's ``guard status``
    # Each listed device of the VG that holds a metadata copy: (path, its seqno or None,
    # why not, whether the copy itself is bad); None if not looked at (lvm/mda.py).
    copies: list[tuple[str, int | None, str, bool]] | None = None
    pvs: list[PvInfo] | None = None  # LVM's report of the PVs on the listed devices
    unread: list[str] = field(default_factory=list)
    unread_fix: dict[str, str] = field(default_factory=dict)  # why -> its fix, if known

    def hosts(self) -> list[dict[str, Any]]:
        return list(self.status["hosts"]) if self.status else []

    def live_hosts(self) -> list[dict[str, Any]]:
        return [h for h in self.hosts() if h["lease"] == "live"]


Check = Callable[[Facts], list[Finding]]
CHECKS: dict[str, Check] = {}


def check(code: str) -> Callable[[Check], Check]:
    """Register a check under its code (the first letter gives its default severity)."""
    def add(fn: Check) -> Check:
        assert code not in CHECKS and code[0] in "EWI"
        CHECKS[code] = fn
        return fn
    return add


def finding(code: str, host: str | None, message: str, fix: str) -> Finding:
    return Finding(code, {"E": "error", "W": "warning", "I": "info"}[code[0]], host,
                   message, fix)


def run_checks(facts: Facts, demote: frozenset[str] = frozenset()) -> list[Finding]:
    """Every registered check's findings, errors first; ``demote``: codes reported as
    warnings only (as an admin who accepts a known hazard asks)."""
    out = [finding("E_UNREADABLE", None, why, facts.unread_fix.get(
        why, "see the message; run `fenceless check` again once it is readable"))
        for why in facts.unread]
    for code, fn in sorted(CHECKS.items()):
        if facts.status is None and code != "E_UNREADABLE":
            break
        for f in fn(facts):
            out.append(Finding(f.code, "warning", f.host, f.message, f.fix)
                       if f.code in demote and f.severity == "error" else f)
    return sorted(out, key=lambda f: (SEVERITIES.index(f.severity), f.code, f.host or ""))


def as_json(findings: list[Finding]) -> dict[str, Any]:
    return {"findings": [asdict(f) for f in findings],
            "errors": sum(f.severity == "error" for f in findings),
            "warnings": sum(f.severity == "warning" for f in findings)}


# --- the hosts --------------------------------------------------------------------------


@check("E_GUARD")
def guard_missing(facts: Facts) -> list[Finding]:
    """A host where LVM is not guarded: any command there may change the shared VG."""
    out = []
    for h in facts.live_hosts():
        state = h["facts"].get("guard")
        if h["name"] == facts.cfg.host and facts.guard is not None:
            state = facts.guard.get("state")  # guard/install.py's status
        if state in ("missing", "broken"):
            what = "is not installed" if state == "missing" else \
                "is installed but its wrapper or the real binary is not as installed"
            out.append(finding("E_GUARD", h["name"],
                               f"the LVM guard on {h['name']} {what}: any LVM command run "
                               "there by hand can change the shared VG's metadata while "
                               "another host writes it, and corrupt it",
                               f"on {h['name']}: fenceless guard install"))
    return out


@check("W_VERSIONS")
def agent_versions(facts: Facts) -> list[Finding]:
    """Agents of different fenceless versions: each host older than the newest."""
    seen = {h["name"]: str(h["facts"].get("version")) for h in facts.live_hosts()}
    if len(set(seen.values())) < 2:
        return []
    newest = max(seen.values(), key=_version_key)
    listing = ", ".join(f"{n} {v}" for n, v in sorted(seen.items()))
    return [finding("W_VERSIONS", name, f"the agents run different fenceless versions "
                    f"({listing}): finish the upgrade, one host at a time",
                    f"on {name}: upgrade fenceless to {newest}, then fenceless guard install "
                    "(its wrapper names the version), then systemctl restart fenceless-agent")
            for name, v in sorted(seen.items()) if v != newest]


def _version_key(v: str) -> tuple[tuple[int, ...], int, str]:
    """Release numbers first ("0.10.1" after "0.9.3", "1.0" equal to "1.0.0"); then a
    pre-release ("rc1", ".dev2") before the release and a ".post1" after it; a local or
    distribution suffix ("+g1234", "-1") counts for nothing."""
    m = re.match(r"(\d+(?:\.\d+)*)(.*)", v)
    if m is None:
        return (), -2, v
    numbers = tuple(int(p) for p in m.group(1).split("."))
    while len(numbers) > 1 and numbers[-1] == 0:
        numbers = numbers[:-1]
    rest = m.group(2).split("+")[0]
    tag = rest.lstrip(".-_").lower()
    rank = 0 if not tag or rest.startswith("-") else 1 if tag.startswith("post") else -1
    return numbers, rank, tag if rank else ""


@check("W_IO_TIMEOUT")
def io_timeouts(facts: Facts) -> list[Finding]:
    """Hosts whose config's io_timeout is not the cluster's: their idea of when a lease
    expires is not the others'."""
    assert facts.status is not None
    cluster = float(facts.status["io_timeout"])
    out = []
    for h in facts.live_hosts():
        mine = h["facts"].get("io_timeout")
        if isinstance(mine, int | float) and abs(float(mine) - cluster) > 1e-6:
            out.append(finding("W_IO_TIMEOUT", h["name"],
                               f"{h['name']}'s config sets io_timeout = {mine}, the cluster's "
                               f"is {cluster} (the superblock's, which the leases use)",
                               f"on {h['name']}: set io_timeout = {cluster} in its "
                               "fenceless.toml, then systemctl restart fenceless-agent"))
    return out


@check("E_WRITER")
def writer_lease(facts: Facts) -> list[Finding]:
    """No metadata writer, or one whose lease is failing: volume and VM changes stop."""
    assert facts.status is not None
    w = facts.status.get("writer")
    if w is None or w.get("released") or w.get("state") == "gone":
        held = "nobody holds the writer role" if w is None or w.get("released") else \
            f"the writer role names {w['host']} (epoch {w['epoch']}), whose lease is gone"
        return [finding("E_WRITER", None, f"{held}: no volume or VM change can run",
                        "on a live host: fenceless writer takeover --wait")]
    age = next((h["age"] for h in facts.hosts() if h["name"] == w.get("host")), None)
    io = float(facts.status["io_timeout"])
    if w.get("state") == "active" and isinstance(age, int | float) and age > LATE_N * io:
        # Renewed every 2N: a sector unchanged for over 6N is a writer whose renewals are
        # late and close to FAIL (8N); its own agent stops exclusive work at 6N too.
        return [finding("W_WRITER", w.get("host"),
                        f"the writer {w['host']}'s host lease was last renewed {age:.1f}s "
                        f"ago ({age / io:.0f}N; it is renewed every 2N and fails at 8N): "
                        "its path to the LUN or its agent is slow",
                        f"check {w['host']}'s path to the LUN and its agent's log; if "
                        f"{w['host']} is down, on another host: fenceless writer takeover "
                        "--wait")]
    if w.get("state") != "active":
        return [finding("W_WRITER", w.get("host"),
                        f"the writer {w['host']}'s host lease is {w.get('state')}: its role "
                        "ends when the lease does, and another host may take it over",
                        f"check {w['host']}'s path to the LUN; if it is lost, on another "
                        "host: fenceless writer takeover --wait")]
    return []


@check("E_CONTROL_AREA")
def control_area(facts: Facts) -> list[Finding]:
    """Records of the control area that do not read back."""
    assert facts.status is not None
    out = [finding("E_CONTROL_AREA", None, f"the ledger: {p}",
                   "fenceless status shows it; see docs/runbook.md, \"Damage on the LUN\"")
           for p in facts.status["ledger"].get("problems", [])]
    for h in facts.hosts():
        if h.get("error"):
            out.append(finding("E_CONTROL_AREA", h["name"], f"the host sector of id "
                               f"{h['id']}: {h['error']}",
                               f"on {h['name']}: systemctl restart fenceless-agent (it "
                               "rewrites its own sector)"))
        if h.get("claims_error"):
            out.append(finding("E_CONTROL_AREA", h["name"], f"{h['name']}'s claims record: "
                               f"{h['claims_error']}", f"on {h['name']}: systemctl restart "
                               "fenceless-agent (it rewrites its own claims)"))
    return out


# --- volumes and VMs -------------------------------------------------------------------


def _claims(facts: Facts) -> dict[str, list[tuple[str, str, int]]]:
    """LV -> [(host, mode, size)] over every host whose claims count (not DEAD)."""
    out: dict[str, list[tuple[str, str, int]]] = {}
    for h in facts.hosts():
        if h["lease"] in ("dead", "free"):
            continue
        for lv, c in (h.get("claims") or {}).items():
            out.setdefault(lv, []).append((h["name"], c["mode"], int(c["size_bytes"])))
    return out


def _moving(facts: Facts) -> set[str]:
    """Disks of VMs in a live migration: both hosts hold them on purpose."""
    if facts.ledger is None:
        return set()
    return {d.volume for v in facts.ledger.vms.values() if v.moving_to or v.left
            for d in v.disks}


@check("E_RW_TWICE")
def read_write_twice(facts: Facts) -> list[Finding]:
    """An LV mapped read-write on two hosts: two writers on one disk corrupt it."""
    out = []
    moving = _moving(facts)
    for lv, holders in sorted(_claims(facts).items()):
        rw = sorted(h for h, mode, _s in holders if mode == "rw")
        if len(rw) > 1 and lv not in moving:
            out.append(finding("E_RW_TWICE", None,
                               f"volume {lv} is mapped read-write on {', '.join(rw)}: "
                               "writes from both corrupt it",
                               f"on all but one of them: stop what uses it (fenceless vm stop "
                               f"VM, for a VM's disk), then lvchange -an {facts.vg_name}/{lv}"))
    return out


@check("W_STALE_SIZE")
def stale_size(facts: Facts) -> list[Finding]:
    """A host that maps an LV at an older size (an extend it has not picked up)."""
    if facts.lvs is None:
        return []
    sizes = {lv.name: lv.size for lv in facts.lvs}
    out = []
    for lv, holders in sorted(_claims(facts).items()):
        for host, _mode, size in holders:
            if lv in sizes and size != sizes[lv]:
                out.append(finding("W_STALE_SIZE", host,
                                   f"{host} maps volume {lv} at {size} bytes, the VG says "
                                   f"{sizes[lv]}: what runs there sees the old size",
                                   f"on {host}: lvchange --refresh {facts.vg_name}/{lv}"))
    return out


@check("E_VM_HOST")
def vms_on_bad_hosts(facts: Facts) -> list[Finding]:
    """VMs placed on a host whose lease is failing or dead."""
    if facts.ledger is None:
        return []
    state = {h["name"]: h["lease"] for h in facts.hosts()}
    out = []
    for name, vm in sorted(facts.ledger.vms.items()):
        lease = state.get(vm.host or "", "free") if vm.host else None
        if vm.host and lease in ("fail", "dead", "free", "unknown"):
            out.append(finding("E_VM_HOST", vm.host,
                               f"VM {name} is placed on {vm.host}, whose lease is {lease}: "
                               "it may be running there unprotected, or not at all",
                               f"fenceless vm recover {name} (once {vm.host} is DEAD), or "
                               f"fenceless vm start {name} --on ANOTHER-HOST"))
    return out


@check("E_VM_LEASE")
def vm_outside_grant(facts: Facts) -> list[Finding]:
    """A VM disk mapped read-write on a host the VM index does not place it on."""
    if facts.ledger is None:
        return []
    owner = {d.volume: (vm.name, {h for h in (vm.host, vm.moving_to, vm.left) if h})
             for vm in facts.ledger.vms.values() for d in vm.disks if d.mode == "rw"}
    out = []
    for lv, holders in sorted(_claims(facts).items()):
        if lv not in owner:
            continue
        vm, allowed = owner[lv]
        for host, mode, _s in holders:
            if mode == "rw" and host not in allowed:
                out.append(finding("E_VM_LEASE", host,
                                   f"{host} maps {lv}, a disk of VM {vm}, read-write, but the "
                                   f"VM runs {_where(allowed)}: something outside fenceless "
                                   "uses it there",
                                   f"on {host}: stop what holds {lv} open, then lvchange -an "
                                   f"{facts.vg_name}/{lv}"))
    return out


@check("I_MAINTENANCE")
def hosts_in_maintenance(facts: Facts) -> list[Finding]:
    """Hosts in maintenance: nothing is placed there until they resume."""
    if facts.ledger is None:
        return []
    return [finding("I_MAINTENANCE", h.name, f"{h.name} is in maintenance: no VM is started "
                    "or moved there", f"when it is ready: fenceless host resume {h.name}")
            for h in sorted(facts.ledger.hosts.values(), key=lambda h: h.name)
            if h.maintenance]


def _where(hosts: set[str]) -> str:
    return "on " + ", ".join(sorted(hosts)) if hosts else "nowhere"


@check("I_UNACCOUNTED")
def unaccounted_lvs(facts: Facts) -> list[Finding]:
    """LVs that neither fenceless made nor any VM uses: someone's by hand, or left over."""
    if facts.lvs is None:
        return []
    used = {d.volume for v in (facts.ledger.vms.values() if facts.ledger else [])
            for d in v.disks}
    out = []
    for lv in sorted(facts.lvs, key=lambda x: x.name):
        if lv.name == CONTROL_LV or lv.name in used or any(t.startswith(REQ_TAG)
                                                           for t in lv.tags):
            continue
        out.append(finding("I_UNACCOUNTED", None,
                           f"volume {lv.name} was not made by fenceless and no VM uses it",
                           f"if it is still needed, nothing; else: fenceless volume remove "
                           f"{lv.name}"))
    return out


# --- LVM's metadata -------------------------------------------------------------------


@check("W_AUTOACTIVATION")
def autoactivation(facts: Facts) -> list[Finding]:
    """Auto-activation on for the shared VG: it may come up read-write on every host."""
    if facts.autoactivation is not True:
        return []
    return [finding("W_AUTOACTIVATION", None,
                    f"VG {facts.vg_name} has autoactivation on: at boot or on a rescan "
                    "every host may activate every LV, read-write",
                    f"on the writer: vgchange --setautoactivation n {facts.vg_name}")]


@check("E_PV_UNLISTED")
def pvs_not_configured(facts: Facts) -> list[Finding]:
    """A PV of the VG on no device this host's config lists (a ``vgextend`` by hand, or a
    stale path): LVM, which fenceless runs on the listed devices only, finds it missing
    and refuses every change to the VG."""
    listed = facts.cfg.vg(facts.vg_name).devices
    if facts.vg is None:
        return []
    # (LVM reports a PV it knows of but does not find as "[unknown]")
    seen = len({p.uuid for p in facts.pvs if p.vg_name == facts.vg_name
                and p.name != MISSING_PV}) if facts.pvs is not None else len(listed)
    if facts.vg.pv_count <= seen:
        return []
    return [finding("E_PV_UNLISTED", facts.cfg.host,
                    f"VG {facts.vg_name} has {facts.vg.pv_count} PVs, but the device(s) this "
                    f"host's config lists ({', '.join(listed)}) hold {seen}: LVM, run on "
                    "those only, finds the others missing and refuses every volume change",
                    f"on the writer: vgreduce {facts.vg_name} PV, for each PV not listed that "
                    "no LV uses (`pvs -o pv_name,vg_name,pv_used` shows them); or add it "
                    f"after the first device in devices of [vg.{facts.vg_name}] in each "
                    "host's fenceless.toml, then systemctl restart fenceless-agent on each")]


@check("E_MDA_COPIES")
def metadata_copies_disagree(facts: Facts) -> list[Finding]:
    """The VG's metadata copies on its PVs at different versions, or one that does not
    read: LVM uses the newest it finds, so a PV seen without the others brings an old
    version back."""
    fix = f"on the writer: vgck --updatemetadata {facts.vg_name}"
    out = [finding("E_MDA_COPIES", facts.cfg.host, f"the metadata copy of VG "
                   f"{facts.vg_name} on {path} does not read: {why}", fix)
           for path, seqno, why, bad in facts.copies or [] if seqno is None and bad]
    seqnos = {c[0]: c[1] for c in facts.copies or [] if c[1] is not None}
    if len(set(seqnos.values())) > 1:
        listing = ", ".join(f"{p} seqno {n}" for p, n in sorted(seqnos.items()))
        out.append(finding("E_MDA_COPIES", facts.cfg.host,
                           f"the metadata copies of VG {facts.vg_name} disagree ({listing}): "
                           "LVM uses the newest, and an older one comes back if its PV is "
                           "seen alone", fix))
    return out


@check("W_PV_LISTED")
def listed_devices(facts: Facts) -> list[Finding]:
    """A device listed for the VG that does not open, or holds another VG's metadata."""
    return [finding("W_PV_LISTED", facts.cfg.host, f"{path}, listed in devices of "
                    f"[vg.{facts.vg_name}], is not one of its PVs as it should be: {why}",
                    f"on {facts.cfg.host}: correct devices of [vg.{facts.vg_name}] in "
                    "fenceless.toml, then systemctl restart fenceless-agent")
            for path, seqno, why, bad in facts.copies or [] if seqno is None and not bad]


@check("W_MDA_PVS")
def metadata_on_many_pvs(facts: Facts) -> list[Finding]:
    """VG metadata on more than one PV: fenceless reads and records one copy."""
    if facts.vg is None or facts.vg.pv_count <= 1:
        return []
    return [finding("W_MDA_PVS", None,
                    f"VG {facts.vg_name} has {facts.vg.pv_count} PVs: LVM keeps a copy of its "
                    "metadata on each, and a PV that goes missing stops every change; "
                    "fenceless's history records the first device's copy only",
                    f"keep one PV per shared VG: on the writer, vgreduce {facts.vg_name} PV "
                    "for each other PV once no LV uses it, and drop it from devices in each "
                    "host's fenceless.toml; docs/runbook.md, \"Replace the LUN\"")]


@check("W_MDA_FULL")
def metadata_area_full(facts: Facts) -> list[Finding]:
    """The metadata area filling up: LVM refuses every change once the text does not fit
    twice (the old and the new copy)."""
    vg = facts.vg
    if vg is None or vg.mda_size <= 0 or vg.lv_count <= 0:
        return []
    usable, in_use = metadata_area_use(vg.mda_size, vg.mda_free)
    used = in_use / usable
    per_lv = in_use / vg.lv_count
    fit = int(vg.mda_free / per_lv) if per_lv > 0 else 0
    if used < MDA_WARN:
        return []
    code = "E_MDA_FULL" if used >= MDA_ERROR else "W_MDA_FULL"
    return [finding(code, None,
                    f"VG {facts.vg_name}'s metadata area is {used:.0%} used ({vg.mda_free} "
                    f"bytes free of the {int(usable)} its text may take): about {fit} more "
                    f"LVs fit{_largest(facts)}",
                    "fenceless volume remove NAME, for each volume no longer needed; or, "
                    f"for tags no longer needed, on the writer: lvchange --deltag TAG "
                    f"{facts.vg_name}/NAME; for room, a new PV with a larger "
                    "--metadatasize and docs/runbook.md, \"Replace the LUN\"")]


def _largest(facts: Facts) -> str:
    """The LVs that take the most of the metadata text: those whose tags take over 4 KiB
    (a plain LV's whole section is about 0.5 KiB), the ones to look at first."""
    size = {lv.name: sum(len(t) + 4 for t in lv.tags) for lv in facts.lvs or []}
    big = sorted((n for n, b in size.items() if b > BIG_TAGS), key=lambda n: (-size[n], n))
    if not big:
        return ""
    more = f" and {len(big) - 5} more" if len(big) > 5 else ""
    return f"; the most text is that of {', '.join(big[:5])}{more} (their tags)"


def gather(cfg: HostConfig, vg_name: str | None,
           read_status: Callable[..., dict[str, Any]],
           read_ledger: Callable[[], LedgerState],
           report: Callable[[], tuple[VgInfo, list[LvInfo]]],
           autoactivation: Callable[[], bool | None],
           guard: Callable[[], dict[str, Any]],
           copies: Callable[[], list[tuple[str, int | None, str, bool]]] | None = None,
           pvs: Callable[[], list[PvInfo]] | None = None) -> Facts:
    """Read everything the checks look at, each part on its own: a part that cannot be
    read is a finding, and the checks that need it say nothing."""
    facts = Facts(cfg, cfg.vg(vg_name).name)
    parts: list[tuple[str, Callable[[], None]]] = [
        ("the control area", lambda: setattr(facts, "status",
                                             read_status(cfg, vg_name, with_claims=True))),
        ("the VM index", lambda: setattr(facts, "ledger", read_ledger())),
        ("LVM's report of the VG", lambda: _take_report(facts, report())),
        ("the VG's autoactivation flag", lambda: setattr(facts, "autoactivation",
                                                         autoactivation())),
        ("this host's guard", lambda: setattr(facts, "guard", guard())),
    ]
    if copies is not None:
        parts.append(("the metadata copies", lambda: setattr(facts, "copies", copies())))
    if pvs is not None:
        parts.append(("LVM's report of the PVs", lambda: setattr(facts, "pvs", pvs())))
    for what, read in parts:
        try:
            read()
        except FencelessError as exc:
            why = f"{what} could not be read: {exc}"
            facts.unread.append(why)
            if isinstance(exc, LedgerUnreadable):
                facts.unread_fix[why] = REPAIR_LEDGER
    return facts


def _take_report(facts: Facts, got: tuple[VgInfo, list[LvInfo]]) -> None:
    facts.vg, facts.lvs = got
