"""What this host has mapped of a shared VG, kept in step with the VG's metadata.

Every agent notices a new VG metadata seqno from LVM's own metadata header on
the PV (one 4 KiB O_DIRECT read, no LVM process, nothing that could "repair"
metadata) and brings every LV it has active to its new size, so that a reader
never runs ``lvchange --refresh`` and an extend on the writer is followed
everywhere. What is active here is published as this host's claims
(``ledger/claims.py``): they keep the writer from removing an LV in use.
"""

from __future__ import annotations

from collections.abc import Callable

from fenceless.blockio import BlockDevice
from fenceless.clock import Clock
from fenceless.errors import FencelessError
from fenceless.ledger.claims import Claim
from fenceless.lvm import mda
from fenceless.lvm.activation import Activator
from fenceless.lvm.adapter import Lvm

ACTIVE_EVERY = 2.0  # seconds between looks at which LVs are active here


class LocalLvs:
    """This host's mappings of one VG, and the VG metadata seqno they follow."""

    def __init__(self, activator: Callable[[], Activator], reader: Callable[[], Lvm],
                 clock: Clock, log: Callable[[str], None]) -> None:
        self.activator = activator
        self.reader = reader
        self.clock = clock
        self.log = log
        self.mapping: dict[str, str] = {}  # lv -> mode: claimed, the mapping being made
        self.modes: dict[str, str] = {}  # lv -> mode of the mappings this agent made
        # Claims found on the disk at start: kept until this host's mappings could be
        # listed, so a restart never withdraws a claim it cannot yet account for.
        self.inherited: dict[str, Claim] = {}
        self.listed = False
        self.cache: dict[str, int] = {}
        self.checked = -ACTIVE_EVERY
        self.seqno: int | None = None
        self.mda_location: mda.MdaLocation | None = None
        self.mda_key: object | None = None
        self.logged: set[str] = set()
        self._backup_dir: str | None = None  # LVM's (backup_dir)

    def backup_dir(self) -> str | None:
        """LVM's ``backup/backup_dir`` on this host, asked once (None: unknown)."""
        if self._backup_dir is None:
            try:
                out = self.reader().run("lvmconfig", "--typeconfig", "full",
                                        "backup/backup_dir").stdout.strip()
                self._backup_dir = out.partition("=")[2].strip().strip('"')
            except FencelessError as exc:
                self.log(f"LVM's backup dir unknown ({exc}): only fenceless's copy is kept")
                self._backup_dir = ""
        return self._backup_dir or None

    def log_once(self, msg: str) -> None:
        if msg not in self.logged:
            self.logged.add(msg)
            self.log(msg)

    def active(self, force: bool = False) -> dict[str, int]:
        """LVs active on this host and their mapped sizes (looked up every ACTIVE_EVERY s)."""
        now = self.clock.now()
        if force or now - self.checked >= ACTIVE_EVERY:
            self.checked = now
            try:
                self.cache = {a.lv: a.size for a in self.activator().active()}
                self.listed = True
            except FencelessError as exc:
                self.log_once(f"cannot list active LVs: {exc}")
        return self.cache

    def claims(self) -> dict[str, Claim]:
        """What this host claims: every mapping it has (with its size), and the LVs being
        mapped (size 0). Every mapping is claimed, also one this agent did not make."""
        active = self.active()
        out = {} if self.listed else dict(self.inherited)
        out.update({lv: Claim(0, mode) for lv, mode in self.mapping.items()})
        for lv, size in active.items():
            out[lv] = Claim(size, self.modes.get(lv, "rw"))
        return out

    def metadata_key(self, dev: BlockDevice, size: int) -> object | None:
        """LVM's metadata header on the PV (offset, size, checksum of the text), or None
        if it cannot be read: equal keys mean byte-identical VG metadata."""
        try:
            return mda.read_mda_header(dev, location=self.mda_location, size=size).key
        except FencelessError:
            return None

    def seqno_changed(self, dev: BlockDevice, size: int) -> bool:
        """Whether LVM's metadata seqno on the PV moved since the last look."""
        try:
            info = mda.read_mda_header(dev, location=self.mda_location, size=size)
            self.mda_location = info.location
            if info.key == self.mda_key:
                return False
            _text, seqno = mda.read_metadata_text(dev, location=info.location, size=size)
            self.mda_key = info.key
        except FencelessError as exc:
            self.mda_location = None
            self.log_once(f"cannot read the VG metadata header: {exc}")
            return False
        if seqno == self.seqno:
            return False
        self.seqno = seqno
        return True

    def forget_metadata(self) -> None:
        """After this host changed the metadata: the next look reads it again."""
        self.mda_key = None

    def refresh(self, force: bool = False) -> bool:
        """Bring every active mapping to the size in the metadata; True if any changed."""
        active = self.active(force=force)
        if not active:
            return False
        changed = False
        try:
            sizes = {lv.name: lv.size for lv in self.reader().lvs()}
            activator = self.activator()
            for lv, size in active.items():
                if lv in sizes and sizes[lv] != size:
                    got = activator.refresh(lv)
                    self.log(f"refreshed {lv}: {size} -> {got.size} bytes")
                    changed = True
        except FencelessError as exc:
            self.log(f"refresh failed: {exc}")
        if changed:
            self.active(force=True)
        return changed
