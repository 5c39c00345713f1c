"""Who has an LV mapped: the claims every host publishes, read fresh by the writer.

A change that takes an LV away (remove, rename, a metadata restore that
changes it) is checked against these once its intent is journaled
(``JournaledOp.check_claims``); docs/design.md, "Claims", says why that order
makes the check safe.
"""

from __future__ import annotations

from fenceless.errors import UserError
from fenceless.lease.delta import HostState
from fenceless.ondisk.errors import CorruptRecord
from fenceless.ops.port import WriterPort


class ClaimsUnknown(UserError):
    """Refused: host {host}'s claims cannot be read ({detail}); until it writes them again \
(or is DEAD) no volume is removed or renamed. Nothing was changed"""


def claims(port: WriterPort, lv: str) -> list[str]:
    """Hosts that claim ``lv`` (it is mapped there, or being mapped), from fresh reads.

    A host's claims count until it withdraws them, also while its agent is
    restarting (its lease is FREE then); only a DEAD host's are void: its
    watchdog has fired, so nothing of it maps anything any more. Claims that do
    not read count as claiming everything (docs/design.md, "Claims").
    """
    states = {h.host_id: h.state for h in port.hosts_now()}  # observed now
    out: set[str] = set()
    for hid, got in sorted(port.claims_now().items()):
        if states.get(hid, port.host_state(hid)) is HostState.DEAD:
            continue
        if isinstance(got, CorruptRecord):
            raise ClaimsUnknown(host=port.host_name(hid), detail=str(got))
        if lv in got.lvs:
            out.add(got.host)
    if lv in port.local_active(force=True):
        out.add(port.host)
    return sorted(out)


def claims_of_others(port: WriterPort, lv: str, me: int) -> list[tuple[str, str]]:
    """(host, mode) of every other host that claims ``lv``, from fresh reads; DEAD hosts'
    claims are void, and claims that do not read count as a read-write claim."""
    states = {h.host_id: h.state for h in port.hosts_now()}
    out = []
    for hid, got in sorted(port.claims_now().items()):
        if hid == me or states.get(hid, port.host_state(hid)) is HostState.DEAD:
            continue
        if isinstance(got, CorruptRecord):
            raise ClaimsUnknown(host=port.host_name(hid), detail=str(got))
        claim = got.lvs.get(lv)
        if claim is not None:
            out.append((got.host, claim.mode))
    return out
